"""
Sample from a trained nanoRLRP model, see what each latent step predicts, or measure the test-time curve.

    python sample.py --out_dir=out-cpu --start="352+819=" --temperature=0 --n_steps=8 --show_steps=True
    python sample.py --out_dir=out-cpu --start=FILE:prompt.txt --exit_threshold=0.01
    python sample.py --out_dir=out-cpu --eval=True --plot=scaling.png
    python sample.py --init_from=gpt2 --tokenizer_file=gpt2.tiktoken --start="The meaning of life is"

The test-time curve (--eval): reasoning exact match for every K' = 0..2K, teacher-forced
(evaluate.exact_match_curve, equal to greedy decoding's), then greedy decoding at the trained K with adaptive
exit against fixed K, and where examples have levels (the chain families, JSONL "level"), the reading per
level: at step 1, at K' = L, at K' = 21, at adaptive exit (evaluate.level_reading); on the chain families
also whether step k gives f^k(x), the k-th hop, for k = 1..L (evaluate.hop_reading).

Prompts: every prompt follows an end-of-text token, as every document and reasoning example does in
training, so an empty --start samples unconditionally. A prompt is UTF-8 text; one that is not (a file in
another encoding, raw bytes on the command line) cannot be encoded and is refused. A literal
'<|endoftext|>' in a prompt is ordinary text, as in training (data.Tokenizer.encode). A sample ends where the
model emits the end-of-text token, which is not printed (--stop_at_eot=False continues past it, printed as
'<|endoftext|>'); with --temperature=0 every sample is the same greedy one, so one is printed.
"""

import os
import sys
from collections import defaultdict
from contextlib import nullcontext

import torch

import checkpoint
import data
import hf_trunk
from configurator import ConfigError, autocast, configure, default_device, default_dtype, existing_file
from evaluate import (EXIT_THRESHOLD, LONG_STEPS, chain_batches, exact_match_curve, hop_reading, hop_table,
                      level_reading, level_table)
from records import pyplot
from model import GPT
import tasks

DEFAULTS = dict(
    init_from="resume",     # 'resume' = out_dir/ckpt.pt (train.py writes it); GPT-2: 'gpt2', ... or a local
                            # HF folder
    out_dir="out",          # the folder of ckpt.pt, for init_from='resume'
    start="\n",             # the prompt, or FILE:path to read it from a file
    num_samples=3,          # with temperature=0 one is printed: greedy decoding gives the same sample every
                            # time
    max_new_tokens=200,     # tokens generated per sample, at most
    stop_at_eot=True,       # end a sample at the end-of-text token; False = continue past it up to
                            # max_new_tokens
    temperature=0.8,        # 0 = greedy
    top_k=200,              # None = the whole vocabulary
    seed=1337,              # torch.manual_seed before loading and sampling
    device=None,            # None = best available: cuda, then mps, then cpu
    dtype=None,             # None = best the device supports: bfloat16, then float16 on cuda; float32
                            # elsewhere
    n_steps=None,           # K': refinement steps at test time, any value >= 0; None = the K the model was
                            # trained with
    exit_threshold=None,    # adaptive exit: a token stops refining once KL(p_k || p_{k-1}) < this; None =
                            # always K'
    show_steps=False,       # per generated token: each step's top-1 token and its probability
    tokenizer_file="",      # GPT-2's gpt2.tiktoken, where the checkpoint's path does not exist on this
                            # machine
    eval=False,             # reasoning eval: exact match for K' = 0..2K (or 0..n_steps), the scaling curve,
                            # and adaptive exit against fixed K
    eval_data="",           # '' = the checkpoint's reasoning eval set; 'synthetic' or a .jsonl file
    eval_tasks="",          # synthetic suite, e.g. 'add:3,sort:5'; '' = the checkpoint's
    eval_examples=200,      # with eval: this many examples
    eval_batch_size=64,     # with eval: examples per batch (decoded: prompts of one length share a batch)
    plot="",                # with eval: save the scaling curve to this PNG (needs matplotlib)
)


def load_config(argv):
    """DEFAULTS with argv applied, device and dtype resolved (None = the best available), checked."""
    c = configure(DEFAULTS, argv, doc=__file__)
    c["device"] = c["device"] or default_device()
    c["dtype"] = c["dtype"] or default_dtype(c["device"])
    check_config(c)
    return c


def check_config(c):
    """Bad values stop here with one line, before any model is loaded."""
    n, thr = c["n_steps"], c["exit_threshold"]
    if n is not None and (type(n) is not int or n < 0):
        raise ConfigError(f"n_steps must be an integer >= 0 (or None for the trained K), got {n!r}")
    if thr is not None and (type(thr) not in (int, float) or thr < 0):
        raise ConfigError(f"exit_threshold must be a number >= 0 (or None for fixed K'), got {thr!r}")
    if c["temperature"] < 0:
        raise ConfigError(f"temperature must be >= 0, got {c['temperature']}")
    if c["top_k"] is not None and (type(c["top_k"]) is not int or c["top_k"] < 1):
        raise ConfigError(f"top_k must be an integer >= 1 or None, got {c['top_k']!r}")
    if min(c["num_samples"], c["max_new_tokens"], c["eval_examples"], c["eval_batch_size"]) < 1:
        raise ConfigError("num_samples, max_new_tokens, eval_examples and eval_batch_size must be >= 1")
    if c["dtype"] not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype must be float32, bfloat16 or float16, got {c['dtype']!r}")
    if c["plot"] and pyplot() is None:   # matplotlib is optional: only --plot needs it
        raise ConfigError("--plot needs matplotlib: pip install matplotlib")


def load_checkpoint(out_dir, device, tokenizer_file=""):
    """out_dir/ckpt.pt as train.py writes it -> (model in eval mode on device, the training config dict in
    today's keys: checkpoint.saved_config, its tokenizer: checkpoint.tokenizer). A damaged file is a
    ConfigError naming it (checkpoint.load)."""
    path = os.path.join(out_dir, "ckpt.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} not found: train.py writes it (python train.py "
                                f"--out_dir={out_dir}), or sample pretrained GPT-2 with --init_from=gpt2")
    ckpt = checkpoint.load(path)
    cfg = checkpoint.saved_config(ckpt["config"])
    file = tokenizer_file or cfg.get("tokenizer_file", "")
    tok = checkpoint.tokenizer({**cfg, "tokenizer_file": file}, ckpt)
    return checkpoint.saved_model(ckpt).eval().to(device), cfg, tok


def load_model(c):
    """(model, tokenizer, training config) for init_from."""
    if c["init_from"] == "resume":
        model, train_cfg, tok = load_checkpoint(c["out_dir"], c["device"], c["tokenizer_file"])
    else:  # pretrained weights with a fresh latent head, which changes nothing yet (I2)
        K, folder = 4 if c["n_steps"] is None else c["n_steps"], c["init_from"]
        hf = hf_trunk.is_hf_folder(folder)
        model = hf_trunk.from_folder(folder, n_steps=K) if hf else GPT.from_pretrained(folder, n_steps=K)
        model, train_cfg = model.eval().to(c["device"]), dict(tokenizer="hf" if hf else "gpt2")
        tok = data.get_tokenizer(train_cfg["tokenizer"], c["tokenizer_file"] or (folder if hf else ""))
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer {tok.name!r} has {tok.vocab_size} tokens, the model "
                         f"{model.config.vocab_size}")
    return model, tok, train_cfg


def encode_prompt(tok, start):
    """--start (or FILE:path) -> [eot] + bos + its tokens: a prompt starts a document, as in training."""
    if start.startswith("FILE:"):   # a leading BOM is skipped; invalid bytes are reported below
        path = existing_file(start[5:], "--start's file")
        with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
            start = f.read()
    bad = next((i for i, ch in enumerate(start) if "\ud800" <= ch <= "\udfff"), None)
    if bad is not None:
        raise ValueError(f"--start: the prompt cannot be encoded: it is not valid UTF-8 text (at character "
                         f"{bad}); save it as UTF-8")
    return [tok.eot_token] + tok.bos + tok.encode(start)

# -----------------------------------------------------------------------------
# sampling


def show_steps(tok, new_ids, steps):
    """One row per generated token: each step k's top-1 token and its probability (k = 0 is the trunk's)."""
    def show(i):  # a token as text; #id for a piece of a multi-byte character
        text = "<eot>" if i == tok.eot_token else tok.decode([i])
        return f"#{i}" if "\ufffd" in text else repr(text)[:9]
    K1 = steps["top1"].size(-1)
    print(f"{'token':>9} " + " ".join(f"{f'k={k}':>15}" for k in range(K1)) + "  steps")
    for t, tid in enumerate(new_ids):
        cells = [f"{show(int(i)):>9} {float(p):.3f}" if i >= 0 else "-"
                 for i, p in zip(steps["top1"][0, t], steps["prob"][0, t])]
        used = int(steps["used"][0, t])
        print(f"{show(tid):>9} " + " ".join(f"{cell:>15}" for cell in cells) + f"  {used:>5}")


def sample(model, tok, c, ctx):
    K = model.resolve_steps(c["n_steps"])
    x = torch.tensor([encode_prompt(tok, c["start"])], device=c["device"])
    n, stop = c["num_samples"], tok.eot_token if c["stop_at_eot"] else None
    if c["temperature"] == 0 and n > 1:
        print(f"num_samples={n} with temperature=0: greedy decoding gives the same sample every time, "
              "printed once")
        n = 1
    want_steps = c["show_steps"] or c["exit_threshold"] is not None  # else only logits_K' is computed
    for _ in range(n):
        with ctx:
            y = model.generate(x, c["max_new_tokens"], temperature=c["temperature"], top_k=c["top_k"],
                               n_steps=K, exit_threshold=c["exit_threshold"], stop_token=stop,
                               return_steps=want_steps)
        y, steps = y if want_steps else (y, None)
        new = y[0, x.size(1):].tolist()
        ended = stop is not None and new[-1:] == [stop]
        # without the eots around the text, and the bos
        print(tok.decode(x[0, 1 + len(tok.bos):].tolist() + new[:-1 if ended else None]))
        if c["show_steps"]:
            show_steps(tok, new, steps)
        if c["exit_threshold"] is not None:
            mean = steps["used"].float().mean()
            print(f"adaptive exit (KL < {c['exit_threshold']}): {mean:.2f} steps per token of K'={K}")
        print("---------------")

# -----------------------------------------------------------------------------
# reasoning evaluation: the test-time scaling curve


def eval_set(c, train_cfg, tok, block_size):
    """([(prompt, answer)], task tag per example, description) from --eval_data or else the checkpoint's
    config."""
    source = (c["eval_data"] or train_cfg.get("reasoning_eval_data")
              or train_cfg.get("reasoning_data", "synthetic"))
    n, gsm8k = c["eval_examples"], train_cfg.get("gsm8k_answer", "final")
    if source not in ("synthetic", train_cfg.get("reasoning_data")):   # a separate file: its first n lines
        rows = tasks.read_eval_jsonl(source, gsm8k)[:n]
        return [(p, a) for p, a, _ in rows], [tasks.jsonl_tag(level) for *_, level in rows], source
    # the built-in suite, or the held-out slice of the training JSONL (never trained on)
    suite = (c["eval_tasks"] or train_cfg.get("eval_tasks") or train_cfg.get("reasoning_tasks")
             or data.DEFAULT_TASKS)
    rd = data.ReasoningData(source, tok, block_size, train_cfg.get("seed", 0), tasks=suite,
                            gsm8k_answer=gsm8k)
    return rd.eval_examples(n), rd.eval_tags(n), f"{source} {suite}" if source == "synthetic" else source


def encode_examples(tok, examples):
    """[(prompt, answer)] -> [([eot] + bos + prompt ids, answer ids + [eot])]: as in training's rows."""
    return [([tok.eot_token] + tok.bos + tok.encode(p), tok.encode_answer(a) + [tok.eot_token])
            for p, a in examples]


def decode_answers(model, examples, eot, K, exit_threshold=None, batch_size=64, device="cpu",
                   ctx=nullcontext()):
    """
    Greedy answers at K' steps to encoded examples [(prompt ids, answer ids + [eot])] -> (exact match per
    example, generated ids per example, steps used per answer token). A match is generated tokens == answer +
    [eot]. Prompts of equal length share a batch, so no padding is needed.
    """
    by_len = defaultdict(list)
    for i, (p, _) in enumerate(examples):
        by_len[len(p)].append(i)
    gen, used = [None] * len(examples), []
    for group in by_len.values():
        for chunk in (group[j:j + batch_size] for j in range(0, len(group), batch_size)):
            x = torch.tensor([examples[i][0] for i in chunk], device=device)
            n = max(len(examples[i][1]) for i in chunk)   # answer + eot: enough tokens to decide the match
            with ctx:
                y, steps = model.generate(x, n, temperature=0, n_steps=K, exit_threshold=exit_threshold,
                                          stop_token=eot, return_steps=True)
            for r, i in enumerate(chunk):
                m = len(examples[i][1])
                gen[i] = y[r, x.size(1):x.size(1) + m].tolist()
                used += [s for s in steps["used"][r, :m].tolist() if s >= 0]
    return [g == a for g, (_, a) in zip(gen, examples)], gen, used


def example_batches(examples, eot, batch_size):
    """Encoded [(prompt ids, answer ids + [eot])] -> reasoning Batches of batch_size examples, one per row,
    laid out as data.ReasoningData.eval_batches lays out its own: answer_id = the example's index."""
    batches = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        x = torch.full((len(chunk), max(len(p) + len(a) for p, a in chunk) - 1), eot)
        y, answer_id = torch.full_like(x, -1), torch.full_like(x, -1)
        for r, (p, a) in enumerate(chunk):
            ids = p + a
            x[r, :len(ids) - 1], y[r, :len(ids) - 1] = torch.tensor(ids[:-1]), torch.tensor(ids[1:])
            answer_id[r, len(p) - 1:len(ids) - 1] = start + r
        batches.append(data.Batch(x=x, y=y, kind="reasoning", answer_mask=answer_id >= 0,
                                  answer_id=answer_id))
    return batches


def evaluate(model, tok, c, train_cfg, ctx):
    """Print exact match for K' = 0..2K (overall and per task), adaptive exit against fixed K, the reading
    per level and, on the chain families, step k against hop k."""
    K = model.config.n_steps
    top = 2 * K if c["n_steps"] is None else c["n_steps"]
    texts, tags, what = eval_set(c, train_cfg, tok, model.config.block_size)
    examples = encode_examples(tok, texts)   # each [eot] + prompt, answer + [eot]: 2 tokens more
    tasks.check_fits(max(len(p) + len(a) for p, a in examples) - 2, model.config.block_size,
                     f"eval examples of {what} (the model's block_size)")
    batches = [b.to(c["device"]) for b in example_batches(examples, tok.eot_token, c["eval_batch_size"])]
    with ctx:
        curve, by_task = exact_match_curve(model, batches, top, tags)
    columns = list(by_task) if len(by_task) > 1 else []
    print(f"test-time scaling: exact match on {len(examples)} eval examples ({what}), teacher-forced "
          f"(= greedy decoding's); trained with K={K}")
    print("K'".rjust(6) + f" {'all':>7} " + " ".join(f"{t:>9}" for t in columns))
    for k, em in enumerate(curve):
        print(f"{k:>6} {em:>7.3f} " + " ".join(f"{by_task[t][k]:>9.3f}" for t in columns))
    thr = EXIT_THRESHOLD if c["exit_threshold"] is None else c["exit_threshold"]
    if 0 < K <= top:
        compare_adaptive_exit(model, examples, tok.eot_token, c, ctx, threshold=thr)
    with ctx:
        reading = level_reading(model, batches, tags, LONG_STEPS if K else 0, thr)
    if reading:
        print(f"exact match per level (adaptive exit: KL < {thr}, at most K'={LONG_STEPS if K else 0}):")
        print("\n".join(level_table(reading)))
    chains = [i for i, t in enumerate(tags) if t.partition(":")[0] in tasks.CHAINS]   # f^k(x) is known
    if K and chains:
        hop_tags = [tags[i] for i in chains]
        hops = chain_batches(tok, model.config.block_size, [texts[i] for i in chains], hop_tags,
                             c["eval_batch_size"])
        with ctx:
            reading = hop_reading(model, [b.to(c["device"]) for b in hops], hop_tags)
        print("does step k take hop k? exact match of step k against f^k(x), teacher-forced:")
        print("\n".join(hop_table(reading)))
    if c["plot"]:
        plot_curve(curve, K, what, c["plot"])
    return curve


def compare_adaptive_exit(model, examples, eot, c, ctx, threshold):
    """Greedy decoding at the trained K with adaptive exit (KL < threshold) against fixed K: exact match, the
    tokens both generate alike, and the steps a token runs."""
    K, thr = model.config.n_steps, threshold
    run = lambda t: decode_answers(model, examples, eot, K, exit_threshold=t, batch_size=c["eval_batch_size"],
                                   device=c["device"], ctx=ctx)
    (match_a, gen_a, used_a), (match_f, gen_f, _) = run(thr), run(None)
    same = sum(a == f for ga, gf in zip(gen_a, gen_f) for a, f in zip(ga, gf)) / sum(map(len, gen_f))
    em = lambda match: sum(match) / len(match)
    print(f"adaptive exit at K'={K} (KL(p_k || p_k-1) < {thr}): exact match {em(match_a):.3f} vs "
          f"{em(match_f):.3f} fixed, tokens identical {same:.1%}, "
          f"mean steps per token {sum(used_a) / max(len(used_a), 1):.2f} vs {K}")


def plot_curve(curve, K, what, path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(range(len(curve)), curve, marker="o")
    ax.axvline(K, color="gray", linestyle="--", label=f"trained K={K}")
    ax.set(xlabel="test-time steps K'", ylabel="exact match (greedy)", title=what[:60], ylim=(0, 1))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"saved the scaling curve to {path}")

# -----------------------------------------------------------------------------


def main(argv):
    c = load_config(argv)
    torch.manual_seed(c["seed"])
    model, tok, train_cfg = load_model(c)
    model.resolve_steps(c["n_steps"])   # n_steps > 0 on a model built with K = 0: one clear line, now
    ctx = autocast(c["device"], c["dtype"])
    return evaluate(model, tok, c, train_cfg, ctx) if c["eval"] else sample(model, tok, c, ctx)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ConfigError, ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
