"""
The GPU check: one command, sized for <= 8 minutes on one H100/H200 with cold compiles, that says
whether a GPU machine runs nanoRLRP as it should. Each result is printed (and flushed) as soon as it is
measured, each line stamped with the seconds since the start; a section that fails prints one line
`[n name] FAILED: ...` (its traceback goes to stderr) and the next one runs, so a run cut short has printed
everything up to where it stopped. The exit status is the number of sections that failed.

    python bench/gpu_check.py --device=cuda --tokenizer_file=PATH/gpt2.tiktoken
    python bench/gpu_check.py --device=cpu      # the same sections, tiny (tests/test_bench.py)

It takes bench/bench.py's keys (--help lists them).

  [1 speed]    GPT-2 small (12 layers x 768, 12 heads, block 1024, vocab 50257, batch 12), bf16 autocast,
               GPT.compile_parts, at K = 0 and K = n_steps (4): tokens/s, MFU against gpu_peak_tflops, peak
               memory (torch.cuda.max_memory_allocated) and the first step's compile time: bench.run_one's row
  [2 compile]  after torch._dynamo.reset, the first step at K again (inductor's caches now warm from [1]),
               then steps at random K ~ U{1..2K-1} (train.py's n_steps_dist=uniform): the graphs dynamo
               compiled, counted as --compare_compile counts them. compile_parts compiles one step for every
               K, so the count should not grow with new K
  [3 sampled]  sampled against full deep supervision: not implemented yet (there is no sampled_supervision)
  [4 bf16]     the RLRP loss of one batch, same model, same batch, under bf16 autocast and in fp32; difference
  [5 train]    20 steps of train.py in a subprocess, from a fluency folder this check prepares in a temp dir:
               pydoc's text through GPT-2's tokenizer read from tokenizer_file or $NANORLRP_TOKENIZER_FILE
               (never the network: a GPU machine may have none; with neither, the byte tokenizer), written by
               the project's prepare.prepare (else train.py's embedded fluency_data=pydoc). Every train loss
               as train.py logs it to metrics.jsonl, then its wall time

On cpu the shape is 2 layers x 64, block 64, byte vocabulary, batch 4: [1] runs eager in fp32 (as bench's CPU
rows do), [2] traces with dynamo's eager backend (graphs counted as on a GPU, without inductor's ~1 minute of
CPU codegen), train.py runs uncompiled in fp32; [4] uses CPU bf16 autocast. Shape keys given on the command
line (--batch_size=8, --compile=False, ...) override the check's own.
"""

import contextlib
import functools
import gc
import io
import os
import subprocess
import sys
import tempfile
import time
import traceback

import torch

import bench
from bench import OBJECTIVE, ROOT, build_model, first_step_s, make_step, random_batch, run_one, train_loss
from train import Objective

SHAPES = {  # the check's own shape per device; keys given on the command line win
    "cuda": dict(vocab="gpt2", n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=12,
                 compile=True),
    "cpu": dict(vocab="byte", n_layer=2, n_head=2, n_embd=64, block_size=64, batch_size=4, warmup=1, iters=2,
                compile=False),
}
TRAIN_ITERS = 20
TRAIN_TIMEOUT_S = {"cuda": 240, "cpu": 150}  # train.py's share of the 8 minutes: killed after it
RANDOM_K_DRAWS = 8
T0 = time.perf_counter()


def say(section, text):
    """One result line, out at once: the run may be cut off before the next one."""
    print(f"{time.perf_counter() - T0:5.0f}s [{section}] {text}", flush=True)


def section(name, fn, *args):
    """Run one section; a failure is one line here (traceback on stderr), and the check goes on. -> failed"""
    try:
        fn(*args)
        return 0
    except Exception as e:
        traceback.print_exc()
        message = str(e).strip().splitlines()
        say(name, f"FAILED: {type(e).__name__}" + (f": {message[0]}" if message else ""))
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # an OOM's tensors died with the exception: give the next section the memory
    return 1

# -----------------------------------------------------------------------------
# [1] speed, [2] compile, [3] sampled supervision


def check_speed(cfg, K):
    """bench's one-row measurement (run_one) at K, with this K's own peak memory."""
    if cfg["device"] == "cuda":
        gc.collect()  # the previous K's model, optimizer and compiled parts: gone before this peak
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    (r,) = run_one(dict(cfg, n_steps=K))
    mfu = f"MFU {r['mfu']:.1%} of {cfg['gpu_peak_tflops']:g} TFLOP/s" if "mfu" in r else "MFU n/a on cpu"
    peak = "peak" if cfg["device"] == "cuda" else "peak RSS"   # CPU: the process's high-water mark
    compiled = f", first step (compiles) {r['compile_s']:.1f} s" if "compile_s" in r else ", eager"
    say("1 speed", f"K={K}: {r['tokens_per_s']:,.0f} tok/s, {r['ms_per_iter']:.1f} ms/iter, {mfu}, "
                   f"{peak} {r['peak_mem_mb']:,.0f} MB{compiled}")


@contextlib.contextmanager
def compile_backend(backend):
    """torch.compile with this backend inside (GPT.compile_parts takes no options): 'eager' lets dynamo trace
    and count graphs without inductor's codegen."""
    compile = torch.compile
    torch.compile = functools.partial(compile, backend=backend)
    try:
        yield
    finally:
        torch.compile = compile


def check_compile(cfg):
    """The first step's compile time and the graphs dynamo compiles at K, then at random K."""
    from torch._dynamo.utils import counters
    from schedules import n_steps_at
    K, backend = cfg["n_steps"], "inductor" if cfg["compile"] else "eager"
    torch._dynamo.reset()  # forget [1]'s graphs: count this model's own
    counters.clear()
    with compile_backend(backend):
        step, _ = make_step(cfg, compile=True)
    t = first_step_s(step)
    graphs = counters["stats"]["unique_graphs"]
    say("2 compile", f"first step at K={K} after torch._dynamo.reset ({backend}): {t:.1f} s, {graphs} graphs")
    draws = dict(n_steps=K, n_steps_dist="uniform", seed=cfg["seed"])
    ks = [n_steps_at(it, draws) for it in range(RANDOM_K_DRAWS)]
    times = [first_step_s(step, k) for k in ks]
    more = counters["stats"]["unique_graphs"] - graphs
    say("2 compile", f"random K {ks}: steps {min(times):.2f}-{max(times):.2f} s, graphs {graphs} -> "
                     f"{graphs + more} ({'no recompiles' if more == 0 else f'{more} more: recompiled'})")


def check_sampled(cfg):
    """Sampled against full deep supervision. There is no sampled_supervision yet; when there is, this section
    is one line: run_one with it on, printed as [1]'s rows, next to [1]'s K row."""
    say("3 sampled", "sampled_supervision vs full deep supervision: not implemented yet")

# -----------------------------------------------------------------------------
# [5] 20 steps of train.py


def tokenizer(cfg):
    """(tokenizer, train.py's tokenizer_file, what it is): GPT-2's from a local file, else the byte one."""
    import data
    path = cfg["tokenizer_file"] or os.environ.get("NANORLRP_TOKENIZER_FILE", "")
    if not path:
        return data.get_tokenizer("byte"), "", "byte (no tokenizer_file or NANORLRP_TOKENIZER_FILE)"
    try:
        return data.get_tokenizer("gpt2", path), os.path.abspath(path), f"gpt2 from {path}"
    except (ValueError, FileNotFoundError) as e:
        return data.get_tokenizer("byte"), "", f"byte: {e}"


def prepare_fluency(tok, folder):
    """folder <- pydoc's text as token shards + meta.json, by the project's own data/prepare.py (imported
    here: a failure there falls back to the embedded pydoc). -> (train.py's fluency_data, what was done)"""
    from pydoc_data.topics import topics  # ~465k characters of Python docs, in every CPython
    if os.path.join(ROOT, "data") not in sys.path:
        sys.path.insert(1, os.path.join(ROOT, "data"))
    try:
        import prepare
        texts, out = os.path.join(folder, "text"), os.path.join(folder, "pydoc")
        os.makedirs(texts)
        for i, key in enumerate(sorted(topics)):  # a file per topic, a document each, as data.py's pydoc
            with open(os.path.join(texts, f"{i:03d}.txt"), "w", encoding="utf-8") as f:
                f.write(topics[key])
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            meta = prepare.prepare(prepare.open_source(input=texts), out, tok, num_proc=1)  # its progress
    except Exception as e:  # the check is of the GPU machine; tests/test_prepare.py checks prepare
        return "pydoc", f"prepare failed ({type(e).__name__}: {e}): fluency_data=pydoc, embedded"
    return out, (f"prepare.prepare wrote {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens "
                 f"to {out}")


def train_args(cfg, tok, tok_file, fluency, out_dir):
    """train.py's command line: the check's shape, one micro-batch per step, a record every step, the evals
    at 0 and 20 small."""
    same = ("device", "n_layer", "n_head", "n_embd", "block_size", "batch_size", "n_steps", "n_latent",
            "head_attn", "compile", "gpu_peak_tflops", "threads", "seed")
    return [*(f"--{k}={cfg[k]}" for k in same), f"--tokenizer={tok.name}", f"--tokenizer_file={tok_file}",
            f"--fluency_data={fluency}", "--reasoning_data=synthetic", f"--out_dir={out_dir}",
            f"--dtype={cfg['dtype'] if cfg['device'] == 'cuda' else 'float32'}", f"--max_iters={TRAIN_ITERS}",
            "--gradient_accumulation_steps=1", "--log_interval=1", f"--eval_interval={TRAIN_ITERS}",
            "--eval_iters=2", "--eval_examples=8", "--warmup_iters=2", f"--lr_decay_iters={TRAIN_ITERS}"]


def show_train_records(path, shown):
    """Print the train records of metrics.jsonl after the first `shown`; -> how many are shown now."""
    from records import read_metrics
    records = [r for r in read_metrics(path) if r["type"] == "train"] if os.path.isfile(path) else []
    for r in records[shown:]:
        kinds = "+".join(kind for kind in ("fluency", "reasoning") if kind in r)   # the window's step kinds
        ks = ",".join(map(str, r["n_steps"])) if isinstance(r["n_steps"], list) else r["n_steps"]
        say("5 train", f"iter {r['iter']:>3} loss {r['loss']:.4f} ({kinds}, K={ks}, "
                       f"{r['tokens_per_s']:,.0f} tok/s)")
    return max(shown, len(records))


def run_train(args, out_dir, log_path, limit):
    """train.py as a user runs it, its train records printed while it writes them, killed after limit
    seconds. -> (exit status, wall seconds, train records shown)"""
    metrics, shown, t0 = os.path.join(out_dir, "metrics.jsonl"), 0, time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=log, stderr=log)
        try:
            while True:
                try:
                    rc = proc.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    shown = show_train_records(metrics, shown)
                if time.perf_counter() - t0 > limit:
                    break
        finally:  # past the limit, or this check interrupted: no train.py left holding the GPU
            if proc.poll() is None:
                proc.kill()
            rc = proc.wait()
    return rc, time.perf_counter() - t0, show_train_records(metrics, shown)


def check_train(cfg):
    """20 steps of train.py from a fluency folder prepared here, in a temp dir."""
    with tempfile.TemporaryDirectory(prefix="nanorlrp-gpu-check-") as tmp:
        tok, tok_file, what = tokenizer(cfg)
        say("5 train", f"tokenizer {what}")
        fluency, done = prepare_fluency(tok, tmp)
        say("5 train", done)
        out_dir, limit = os.path.join(tmp, "out"), TRAIN_TIMEOUT_S[cfg["device"]]
        log_path = os.path.join(tmp, "train.log")
        args = train_args(cfg, tok, tok_file, fluency, out_dir)
        rc, wall, shown = run_train(args, out_dir, log_path, limit)
        say("5 train", f"train.py: {shown} train records of {TRAIN_ITERS} iters, wall {wall:.1f} s, "
                       f"exit {rc}")
        if rc != 0:
            with open(log_path) as f:
                tail = f.read().strip().splitlines()[-20:]
            print("\n".join(tail), file=sys.stderr)
            why = f"killed after {limit} s" if wall > limit else f"exited {rc}"
            raise RuntimeError(f"train.py {why}: {tail[-1] if tail else 'no output'}")

# -----------------------------------------------------------------------------
# [4] bf16 against fp32, and the check


def check_precision(cfg):
    """One batch's RLRP loss, the same model and batch, under autocast in cfg's dtype and in fp32."""
    K, dev, dtype = cfg["n_steps"], cfg["device"], cfg["dtype"]
    model, batch = Objective(build_model(cfg, K), OBJECTIVE), random_batch(cfg)
    with torch.no_grad():
        with torch.autocast(dev, dtype=getattr(torch, dtype)):
            low = train_loss(model, batch, K).item()
        full = train_loss(model, batch, K).item()
    say("4 bf16", f"K={K} loss: {dtype} {low:.6f}, float32 {full:.6f}, difference {low - full:+.2e} "
                  f"({abs(low - full) / abs(full):.1e} relative)")


def run(cfg, given=()):
    """The check on bench's cfg, under the check's shape for the device except the keys given on the command
    line. -> the number of sections that failed."""
    dev = cfg["device"]
    if dev == "cuda" and not torch.cuda.is_available():
        say("gpu check", f"device=cuda, but torch {torch.__version__} sees no GPU here")
        return 1
    cfg = {**cfg, **{k: v for k, v in SHAPES[dev].items() if k not in given}}
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    say("gpu check", f"{name}, torch {torch.__version__}: L={cfg['n_layer']} H={cfg['n_head']} "
                     f"C={cfg['n_embd']} T={cfg['block_size']} V={bench.vocab_size(cfg)} "
                     f"B={cfg['batch_size']} K={cfg['n_steps']} compile={cfg['compile']} "
                     f"{cfg['dtype'] + ' autocast' if dev == 'cuda' else 'float32'}")
    failed = sum(section(*s) for s in [
        ("1 speed", check_speed, cfg, 0), ("1 speed", check_speed, cfg, cfg["n_steps"]),
        ("2 compile", check_compile, cfg), ("3 sampled", check_sampled, cfg),
        ("4 bf16", check_precision, cfg),
        ("5 train", check_train, cfg)])   # the quick bf16 check before the slowest section
    say("gpu check", f"done: {failed} section(s) failed")
    return failed


def main(argv):
    cfg = bench.parse_args(argv, __file__)
    sys.exit(run(cfg, given={a[2:].split("=")[0] for a in argv if a.startswith("--")}))


if __name__ == "__main__":
    main(sys.argv[1:])
