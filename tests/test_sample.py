"""sample.py: its decoded exact match against train.py's teacher-forced one, the CLI (--show_steps, --eval,
--plot, GPT-2 from a local folder, end-of-text) and its errors (generation: tests/test_generation.py)."""

import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

import data
import sample
from configurator import ConfigError
from conftest import run_script
from model import GPT, GPTConfig
from test_generation import BS, tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -----------------------------------------------------------------------------
# decoded exact match == train.py's teacher-forced exact match


def one_example_rows(examples, T, eot):
    """A data.Batch with one encoded example per row, laid out as data.py packs them."""
    x = torch.full((len(examples), T), eot)
    y, answer_id = torch.full_like(x, -1), torch.full_like(x, -1)
    for r, (p, a) in enumerate(examples):
        buf = p + a
        x[r, :len(buf) - 1], y[r, :len(buf) - 1] = torch.tensor(buf[:-1]), torch.tensor(buf[1:])
        answer_id[r, len(p) - 1:len(buf) - 1] = r
    return data.Batch(x, y, "reasoning", answer_id >= 0, answer_id)


def test_eval_encoding_matches_data_packing():
    tok = data.get_tokenizer("byte")
    rd = data.ReasoningData("synthetic", tok, BS, tasks="sort:3")     # two examples never fit in a row of 16
    examples = sample.encode_examples(tok, rd.eval_examples(8))
    got = rd.eval_batches(8, 8)[0]
    want = one_example_rows(examples, BS, tok.eot_token)
    T = got.x.size(1)                                              # eval rows are cut to the longest example
    assert (want.y[:, T:] == -1).all() and (want.y[:, T - 1] != -1).any()
    for f in ("x", "y", "answer_mask", "answer_id"):
        assert torch.equal(getattr(got, f), getattr(want, f)[:, :T]), f


def test_decoded_exact_match_equals_teacher_forced():
    from evaluate import evaluate_reasoning
    model = tiny_model(K=2)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (100, 6), generator=g)
    free = model.generate(x, 4, temperature=0, n_steps=2)[:, 6:]
    eot = int(free.flatten().mode().values)                                   # a token it emits often
    # prompts whose greedy answer at K' = 2 ends with `eot` within 4 tokens: right answers for K' = 2;
    # the same prompts with the first answer token changed: wrong ones
    x[:, 0] = eot
    out = model.generate(x, 4, temperature=0, n_steps=2, stop_token=eot)[:, 6:].tolist()
    right = [(p, a[:a.index(eot) + 1]) for p, a in zip(x.tolist(), out) if a[0] != eot and eot in a][:12]
    wrong = [(p, [(a[0] + 1) % 256] + a[1:]) for p, a in right[:6]]
    examples = right + wrong
    assert len(right) == 12
    batch = one_example_rows(examples, BS, eot)
    curve = []
    for k in range(5):
        decoded, _, _ = sample.decode_answers(model, examples, eot, k, batch_size=7)
        teacher = evaluate_reasoning(model, [batch], k)["answer_exact_match"][-1]
        assert sum(decoded) / len(decoded) == pytest.approx(teacher), k
        curve.append(teacher)
    assert curve[2] == pytest.approx(12 / 18) and len(set(curve)) > 1

# -----------------------------------------------------------------------------
# sample.py


def save_checkpoint(out_dir, K=2, tasks="sort:3", block_size=BS):
    """A checkpoint in train.py's format from a tiny random model (byte tokenizer, built-in reasoning
    suite)."""
    model = tiny_model(K=K, block_size=block_size)
    model_args = dict(block_size=block_size, vocab_size=257, n_layer=2, n_head=2, n_embd=32, dropout=0.0,
                      bias=True, n_steps=K, n_latent=24)
    config = dict(tokenizer="byte", tokenizer_file="", reasoning_data="synthetic", reasoning_eval_data="",
                  reasoning_tasks=tasks, block_size=block_size, seed=0, n_steps=K)
    os.makedirs(out_dir, exist_ok=True)
    torch.save(dict(model_args=model_args, model=model.state_dict(), config=config, iter_num=0),
               os.path.join(out_dir, "ckpt.pt"))
    return model


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("ckpt"))
    save_checkpoint(out_dir)
    return out_dir


def test_load_checkpoint(ckpt_dir):
    model, config, _ = sample.load_checkpoint(ckpt_dir, "cpu")
    assert not model.training and model.config.n_steps == 2 and config["tokenizer"] == "byte"
    want = tiny_model(K=2)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), want.state_dict().values()))


def test_cli_show_steps(ckpt_dir, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("sort(321)=")
    args = [f"--out_dir={ckpt_dir}", f"--start=FILE:{prompt}", "--num_samples=1", "--max_new_tokens=5",
            "--temperature=0", "--n_steps=3", "--show_steps=True", "--exit_threshold=0.0"]
    sample.main(args)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("sort(321)=")
    header = lines[1].split()
    assert header == ["token", "k=0", "k=1", "k=2", "k=3", "steps"]
    assert len(lines) == 1 + 1 + 5 + 2 and all(line.split()[-1] == "3" for line in lines[2:7])
    assert "3.00 steps per token of K'=3" in lines[7]


def test_cli_eval_scaling_curve(ckpt_dir, capsys):
    from evaluate import evaluate_reasoning
    curve = sample.main([f"--out_dir={ckpt_dir}", "--eval=True", "--eval_examples=8", "--exit_threshold=1e9"])
    out = capsys.readouterr().out
    assert len(curve) == 5 and "trained with K=2" in out                  # K' = 0..2K
    assert "adaptive exit at K'=2" in out and "mean steps per token 1.00 vs 2" in out
    model, _, _ = sample.load_checkpoint(ckpt_dir, "cpu")
    suite = data.ReasoningData("synthetic", data.get_tokenizer("byte"), BS, tasks="sort:3")
    batches = suite.eval_batches(8, 8)
    want = [evaluate_reasoning(model, batches, k)["answer_exact_match"][-1] for k in range(5)]
    assert curve == pytest.approx(want)


def test_cli_eval_on_a_jsonl_file(ckpt_dir, tmp_path):
    """--eval_data=FILE.jsonl, a file apart from the checkpoint's data: its first eval_examples rows."""
    rows = tmp_path / "eval.jsonl"
    rows.write_text("".join(f'{{"prompt": "sort({p})=", "answer": "{"".join(sorted(p))}"}}\n'
                            for p in ("321", "213", "132", "312", "231")))
    r = run_script("sample.py", f"--out_dir={ckpt_dir}", "--eval=True", f"--eval_data={rows}",
                   "--eval_examples=4", "--device=cpu")
    assert r.returncode == 0, r.stderr
    assert f"exact match on 4 eval examples ({rows})" in r.stdout


def test_cli_plot(ckpt_dir, tmp_path):
    path = tmp_path / "curve.png"
    args = [f"--out_dir={ckpt_dir}", "--eval=True", "--eval_examples=2", "--n_steps=1", f"--plot={path}"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="--plot needs matplotlib"):
            sample.main(args)
        return
    sample.main(args)
    assert path.stat().st_size > 0


def test_cli_gpt2_from_a_local_hugging_face_model(tmp_path, gpt2_tokenizer_file, capsys):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50257, n_positions=32, n_embd=32,
                                                              n_layer=1, n_head=2))
    hf.save_pretrained(tmp_path)
    sample.main([f"--init_from={tmp_path}", f"--tokenizer_file={gpt2_tokenizer_file}", "--start=Hello world",
                 "--num_samples=1", "--max_new_tokens=4", "--temperature=0", "--show_steps=True"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("Hello world") and lines[1].split()[-2:] == ["k=4", "steps"]


def test_cli_bad_input(ckpt_dir, tmp_path):
    base = [f"--out_dir={ckpt_dir}", "--max_new_tokens=2"]
    with pytest.raises(FileNotFoundError, match=r"ckpt\.pt not found: train\.py writes it"):
        sample.main([f"--out_dir={tmp_path / 'none'}"])
    with pytest.raises(ConfigError, match="n_steps must be an integer >= 0"):
        sample.main(base + ["--n_steps=-1"])
    with pytest.raises(ConfigError, match="unknown config key 'steps'"):
        sample.main(base + ["--steps=2"])
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"caf\xe9")
    with pytest.raises(ValueError, match="cannot be encoded: it is not valid UTF-8"):
        sample.main(base + [f"--start=FILE:{latin1}"])
    with pytest.raises(FileNotFoundError, match="--start's file .*missing.txt' not found"):
        sample.main(base + [f"--start=FILE:{tmp_path / 'missing.txt'}"])
    k0 = str(tmp_path / "k0")
    save_checkpoint(k0, K=0)
    with pytest.raises(ValueError, match="built with n_steps=0"):
        sample.main([f"--out_dir={k0}", "--n_steps=2"])


@pytest.mark.slow
def test_cli_errors_are_one_line(tmp_path):
    r = subprocess.run([sys.executable, "sample.py", f"--out_dir={tmp_path}"], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0 and "ckpt.pt not found" in r.stderr


def test_cli_corrupt_checkpoint_is_one_line(tmp_path):
    """A damaged ckpt.pt (random bytes, as a bad copy leaves it) is one line naming the file, as train.py's
    resume gives it (checkpoint.load), never an unpickling traceback."""
    path = tmp_path / "ckpt.pt"
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())
    r = run_script("sample.py", f"--out_dir={tmp_path}", "--device=cpu")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert str(path) in r.stderr and "corrupt" in r.stderr


@pytest.fixture(scope="module")
def cats_dir(tmp_path_factory):
    """A checkpoint of a tiny model trained (a few seconds) until greedy decoding continues 'ca' as
    'cats<eot>cats<eot>...': a sample that reaches the end-of-text token and would run on past it."""
    tok = data.get_tokenizer("byte")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=BS, vocab_size=257, n_layer=2, n_head=2, n_embd=32, n_steps=2,
                          n_latent=24))
    seq = torch.tensor(([tok.eot_token] + tok.encode("cats")) * 8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        starts = torch.randint(0, len(seq) - BS - 1, (8,)).tolist()
        x, y = (torch.stack([seq[s + i:s + i + BS] for s in starts]) for i in (0, 1))
        model(x, y)[1].mean().backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    assert tok.decode(model.generate(torch.tensor([[256, 99, 97]]), 8, temperature=0)[0].tolist()) == \
        "<|endoftext|>cats<|endoftext|>cats<|endoftext|>"
    out_dir = str(tmp_path_factory.mktemp("cats"))
    torch.save(dict(model_args=asdict(model.config), model=model.state_dict(), iter_num=0,
                    config=dict(tokenizer="byte", tokenizer_file="", block_size=BS, seed=0, n_steps=2)),
               os.path.join(out_dir, "ckpt.pt"))
    return out_dir


def run_sample(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8")
    return subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, capture_output=True, text=True,
                          encoding="utf-8", env=env, timeout=120)


@pytest.mark.slow
def test_cli_stops_at_end_of_text_and_prints_a_greedy_sample_once(cats_dir):
    base = [f"--out_dir={cats_dir}", "--start=ca", "--temperature=0", "--max_new_tokens=12"]
    r = run_sample(*base)                                        # num_samples=3 by default
    assert r.returncode == 0, r.stderr[-2000:]
    note, *rest = r.stdout.splitlines()
    assert "greedy decoding" in note and "same sample every time" in note and "num_samples=3" in note
    assert rest == ["cats", "---------------"]                   # once, and stopped at <|endoftext|>
    r = run_sample(*base, "--stop_at_eot=False", "--num_samples=1")
    assert r.returncode == 0, r.stderr[-2000:]
    # all 12 tokens
    assert r.stdout.splitlines() == ["cats<|endoftext|>cats<|endoftext|>cats", "---------------"]


def test_sampled_generation_stops_at_eot_too(cats_dir, capsys):
    sample.main([f"--out_dir={cats_dir}", "--start=ca", "--num_samples=2", "--max_new_tokens=12",
                 "--temperature=0.01", "--show_steps=True"])
    out = capsys.readouterr().out.splitlines()
    # no greedy note
    assert [line for line in out if not line.startswith(" ")] == ["cats", "---------------"] * 2
    rows = [line.split()[0] for line in out if line.startswith(" ") and "k=0" not in line]
    assert rows == ["'t'", "'s'", "'<eot>'"] * 2           # the per-step view shows the token that stopped it


def test_device_default_is_cuda_then_mps_then_cpu(monkeypatch):
    assert sample.DEFAULTS["device"] is None and sample.DEFAULTS["dtype"] is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    c = sample.load_config([])
    assert c["device"] == "mps" and c["dtype"] == "float32"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert sample.load_config([])["device"] == "cpu"
    assert sample.load_config(["--device=cuda:1", "--dtype=float16"])["device"] == "cuda:1"
