"""evaluate.py: answer positions only are unembedded, a rank without eval batches under DDP, no float64; the
plots of one run's metrics.jsonl (`python evaluate.py --plot --out_dir=DIR`)."""

import datetime
import json
import os
import socket
import struct
import subprocess
import sys
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import data
from evaluate import evaluate_fluency, evaluate_reasoning
from records import PLOTS, plot_series
from model import GPT, GPTConfig

K = 3


def setup():
    """A small model whose refinement steps differ, and its fluency and reasoning eval batches
    (deterministic)."""
    tok = data.get_tokenizer("byte")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=48, vocab_size=257, n_layer=1, n_head=2, n_embd=32, n_steps=K,
                          n_latent=16))
    with torch.no_grad():
        model.latent_head.w_out.weight.normal_(0, 1.0)
    model.eval()
    fd = data.FluencyData("pydoc", tok, 48, seed=0)
    fluency = [fd.get_batch("val", i, 4) for i in range(3)]
    reasoning = data.ReasoningData("synthetic", tok, 48, seed=0).eval_batches(4, 18)
    return model, fluency, reasoning


def reference_reasoning(model, batches, n_examples):
    """The same metrics from full (K, B, T, V) logits, counted in Python."""
    wrong, seen, nll_pairs = {}, {}, []
    for b in batches:
        logits, _ = model(b.x)
        pred = logits.argmax(-1)
        for r, t in zip(*torch.nonzero(b.answer_mask, as_tuple=True)):
            i = int(b.answer_id[r, t])
            seen[i] = seen.get(i, 0) + 1
            wrong[i] = [w + int(pred[k, r, t] != b.y[r, t]) for k, w in enumerate(wrong.get(i, [0] * K))]
            nll = [F.cross_entropy(logits[k, r, t][None].float(), b.y[r, t][None]).item() for k in (0, K - 1)]
            nll_pairs.append(nll)
    exact = torch.full((n_examples, K), float("nan"))
    for i, w in wrong.items():
        exact[i] = torch.tensor([float(x == 0) for x in w])
    n_tok = sum(seen.values())
    return {
        "answer_exact_match": [sum(w[k] == 0 for w in wrong.values()) / len(wrong) for k in range(K)],
        "answer_token_acc": [1 - sum(w[k] for w in wrong.values()) / n_tok for k in range(K)],
        "step_K_beats_1": sum(last < first for first, last in nll_pairs) / n_tok,
        "per_example_exact": exact,
    }


def assert_same_reasoning(got, want):
    assert got["answer_exact_match"] == pytest.approx(want["answer_exact_match"])
    assert got["answer_token_acc"] == pytest.approx(want["answer_token_acc"], rel=1e-6)
    assert got["step_K_beats_1"] == pytest.approx(want["step_K_beats_1"], rel=1e-6)
    assert torch.equal(got["per_example_exact"].isnan(), want["per_example_exact"].isnan())
    assert torch.equal(got["per_example_exact"].nan_to_num(-1), want["per_example_exact"].nan_to_num(-1))

# -----------------------------------------------------------------------------
# only answer positions are unembedded


def test_reasoning_unembeds_only_answer_positions():
    model, _, batches = setup()
    rows = []                                        # rows of hidden states each lm_head call unembeds
    hook = model.lm_head.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[:-1].numel()))
    try:
        got = evaluate_reasoning(model, batches, K)
    finally:
        hook.remove()
    answer_tokens = [int(b.answer_mask.sum()) for b in batches]
    assert rows == [n for n in answer_tokens for _ in range(K)], \
        f"lm_head unembedded {rows} rows; the answer tokens per batch are {answer_tokens} (once per step)"
    assert_same_reasoning(got, reference_reasoning(model, batches, 18))


def test_reasoning_unembeds_only_answer_positions_with_k_zero():
    tok = data.get_tokenizer("byte")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=48, vocab_size=257, n_layer=1, n_head=2, n_embd=32, n_steps=0)).eval()
    batches = data.ReasoningData("synthetic", tok, 48, seed=0).eval_batches(4, 8)
    got = evaluate_reasoning(model, batches, 0)
    logits = [model(b.x)[0][0] for b in batches]             # (B, T, V), the plain GPT
    exact = []
    for b, lg in zip(batches, logits):
        ok = (lg.argmax(-1) == b.y) | ~b.answer_mask
        exact += [bool(ok[b.answer_id == i].all()) for i in b.answer_id[b.answer_mask].unique().tolist()]
    assert got["answer_exact_match"] == pytest.approx([sum(exact) / len(exact)])
    assert got["step_K_beats_1"] == 0.0

# -----------------------------------------------------------------------------
# a DDP rank with no eval batches


def test_reasoning_without_batches_needs_n_examples():
    model, _, batches = setup()
    with pytest.raises(ValueError, match="evaluate_reasoning needs n_examples"):
        evaluate_reasoning(model, [], K)
    with pytest.raises(ValueError, match="evaluate_reasoning needs n_examples"):
        evaluate_reasoning(model, batches, K, world=2)    # ranks would infer different sizes: refused
    empty = evaluate_reasoning(model, [], K, n_examples=18)
    assert empty["per_example_exact"].shape == (18, K) and empty["per_example_exact"].isnan().all()
    assert evaluate_fluency(model, [], K) == {"fluency_loss": [0.0] * K, "readout_scale": [0.0] * K}


def _ddp_worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # a collective one rank skips fails after the timeout instead of hanging the test run
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        model, fluency, reasoning = setup()
        mine = (lambda bs: bs) if rank == 0 else (lambda bs: [])   # rank 1 has no eval shard at all
        res = {"fluency": evaluate_fluency(model, mine(fluency), K, world=2),
               "reasoning": evaluate_reasoning(model, mine(reasoning), K, n_examples=18, world=2),
               "fluency_k1": evaluate_fluency(model, mine(fluency)[1:], 1, world=2)}  # again: still in step
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_rank_without_batches_gets_the_global_result(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    model, fluency, reasoning = setup()
    want_fluency = evaluate_fluency(model, fluency, K)
    want_reasoning = evaluate_reasoning(model, reasoning, K, n_examples=18)
    want_k1 = evaluate_fluency(model, fluency[1:], 1)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for key in want_fluency:
            assert got["fluency"][key] == pytest.approx(want_fluency[key], rel=1e-6), rank
            assert got["fluency_k1"][key] == pytest.approx(want_k1[key], rel=1e-6), rank
        assert_same_reasoning(got["reasoning"], want_reasoning)


def test_readout_scale_is_the_mean_of_w_out_z_over_h():
    """readout_scale[k] = the mean over valid targets of ‖W_out·z_k‖/‖h_t‖, from the head's own latents."""
    model, fluency, _ = setup()
    fluency[0].y[0, :5] = -1                                    # ignored targets do not count
    with torch.no_grad():
        ratios = []
        for b in fluency:
            h = model.trunk(b.x)
            _, z = model.latent_head(h, K, return_latents=True)     # z_0..z_K, (K+1, B, T, D)
            r = model.latent_head.w_out(z[1:]).norm(dim=-1) / h.norm(dim=-1)   # (K, B, T)
            ratios.append(r[:, b.y >= 0])
    want = torch.cat(ratios, 1).mean(1)
    got = evaluate_fluency(model, fluency, K)
    assert got["readout_scale"] == pytest.approx(want.tolist(), rel=1e-4)
    assert min(got["readout_scale"]) > 0.1                      # setup's W_out ~ N(0, 1): far from zero
    model.latent_head.reset_parameters()                        # W_out = 0: the steps do not move h (I2)
    assert evaluate_fluency(model, fluency, K)["readout_scale"] == [0.0] * K
    assert "readout_scale" not in evaluate_fluency(model, fluency, 0)


# -----------------------------------------------------------------------------
# no float64 (MPS has none)


class DtypeRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.float64_ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in tree_flatten(out)[0]):
            self.float64_ops.append(str(func))
        return out


def test_evaluation_creates_no_float64_tensors():
    model, fluency, reasoning = setup()
    with torch.no_grad():
        want = [sum(float(model(b.x, b.y, n_steps=K)[1][k].double().sum()) for b in fluency) /
                sum(int((b.y >= 0).sum()) for b in fluency) for k in range(K)]
    with DtypeRecorder() as rec:
        got = evaluate_fluency(model, fluency, K)["fluency_loss"]
        evaluate_reasoning(model, reasoning, K, n_examples=18)
    assert rec.float64_ops == [], f"float64 tensors made by {sorted(set(rec.float64_ops))}"
    assert got == pytest.approx(want, rel=1e-5)


# -----------------------------------------------------------------------------
# python evaluate.py --plot --out_dir=DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ("add:2", "sort:8")


def train_record(it, kinds, old=False):
    """A train record as train.py logs it: old = top-level kind and loss; new = a sub-dict per kind that ran
    since the last log, plus the mean loss over all those steps."""
    parts = {kind: {"steps": 5, "loss": 3.0 - it / 100 + (kind == "reasoning"), "ds": 2.5, "rl": 0.3,
                    "imp": 0.01, "nll_k": [2.6, 2.5, 2.4]} for kind in kinds}
    base = {"type": "train", "iter": it, "tokens": it * 2048, "n_steps": K, "lr": 1e-3,
            "tokens_per_s": 9000.0}
    if old:
        (kind,) = kinds
        return {**base, "kind": kind, **parts[kind]}
    return {**base, **parts, "loss": sum(p["loss"] for p in parts.values()) / len(parts)}


def eval_record(it, kind="eval"):
    em = lambda j: [min(1.0, 0.1 * it / 100 + 0.05 * k + j) for k in range(K)]
    return {"type": kind, "iter": it, "tokens": it * 2048,
            "fluency_loss": [2.0 - it / 1000 - 0.01 * k for k in range(K)],
            "answer_exact_match": em(0), "answer_token_acc": em(0.1), "step_K_beats_1": 0.4,
            "task_exact_match": {task: em(0.2 * j) for j, task in enumerate(TASKS)}}


def write_metrics(folder, records):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def new_format_run():
    records = []
    for it in range(0, 101, 10):
        if it:
            records.append(train_record(it, ("fluency", "reasoning") if it % 20 else ("reasoning",)))
        if it % 50 == 0:
            records.append(eval_record(it))
    return records + [eval_record(100, "eval_only")]


def png_size(path):
    """(width, height) of a PNG file, after checking its signature, every chunk's CRC and the closing IEND."""
    blob = open(path, "rb").read()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n", f"{path}: not a PNG"
    pos, chunks = 8, []
    while pos < len(blob):
        n, kind = struct.unpack(">I4s", blob[pos:pos + 8])
        body, crc = blob[pos + 8:pos + 8 + n], struct.unpack(">I", blob[pos + 8 + n:pos + 12 + n])[0]
        assert zlib.crc32(kind + body) == crc, f"{path}: bad CRC in chunk {kind}"
        chunks.append(kind)
        pos += 12 + n
    assert chunks[0] == b"IHDR" and chunks[-1] == b"IEND" and b"IDAT" in chunks and pos == len(blob)
    return struct.unpack(">II", blob[16:24])


def run_evaluate(*args, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))


def test_plot_series_reads_old_and_new_train_records():
    new = plot_series(new_format_run())
    iters = list(range(10, 101, 10))
    assert new["train_loss"]["reasoning"] == (iters, [3.0 - it / 100 + 1 for it in iters])
    assert new["train_loss"]["fluency"] == (iters[::2], [3.0 - it / 100 for it in iters[::2]])
    evals = [0, 50, 100]  # the eval_only record is left out
    assert [s[0] for s in new["fluency_loss"]] == [evals] * K
    assert new["fluency_loss"][2][1] == [eval_record(it)["fluency_loss"][2] for it in evals]
    assert new["answer_exact_match"][0][1] == [eval_record(it)["answer_exact_match"][0] for it in evals]
    assert new["task_exact_match"]["sort:8"] == \
        (evals, [eval_record(it)["task_exact_match"]["sort:8"][-1] for it in evals])
    old = plot_series([train_record(it, ("fluency" if it % 20 else "reasoning",), old=True) for it in iters])
    assert old["train_loss"]["fluency"] == (iters[::2], [3.0 - it / 100 for it in iters[::2]])
    assert old["train_loss"]["reasoning"] == (iters[1::2], [3.0 - it / 100 + 1 for it in iters[1::2]])
    assert old["fluency_loss"] == old["answer_exact_match"] == [] and old["task_exact_match"] == {}


@pytest.mark.slow
def test_plot_cli_writes_pngs_next_to_metrics(tmp_path):
    pytest.importorskip("matplotlib",
                        reason="matplotlib is an optional extra (requirements-extra.txt), not installed")
    run = str(tmp_path / "run")
    write_metrics(run, new_format_run())
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write('{"type": "train", "iter": 1')  # a line cut short by a crash is skipped
    r = run_evaluate("--plot", f"--out_dir={run}")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(run)) == sorted(["metrics.jsonl", *PLOTS.values()])
    for name in PLOTS.values():
        w, h = png_size(os.path.join(run, name))
        assert w > 100 and h > 100 and os.path.join(run, name) in r.stdout
    # a run without reasoning evaluation (old train records): only what it has is plotted
    old = str(tmp_path / "old")
    write_metrics(old, [train_record(10, ("fluency",), old=True), train_record(20, ("fluency",), old=True),
                        {k: v for k, v in eval_record(20).items()
                         if k in ("type", "iter", "tokens", "fluency_loss")}])
    r = run_evaluate("--plot", f"--out_dir={old}")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(old)) == sorted(["metrics.jsonl", PLOTS["train_loss"], PLOTS["fluency_loss"]])


@pytest.mark.slow
def test_plot_cli_one_line_errors(tmp_path):
    r = run_evaluate("--help")
    assert r.returncode == 0 and "--plot" in r.stdout and "--out_dir" in r.stdout
    r = run_evaluate("--plot", f"--out_dir={tmp_path / 'nowhere'}")  # no metrics.jsonl
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0, r.stderr
    assert str(tmp_path / "nowhere" / "metrics.jsonl") in r.stderr and "train.py" in r.stderr
    # matplotlib missing (a stand-in package that fails to import): one line, what to install
    blocker = tmp_path / "blocker" / "matplotlib"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ModuleNotFoundError('matplotlib hidden by the test')\n")
    write_metrics(str(tmp_path / "run"), new_format_run())
    r = run_evaluate("--plot", f"--out_dir={tmp_path / 'run'}", env={"PYTHONPATH": str(tmp_path / "blocker")})
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "pip install matplotlib" in r.stderr
    assert os.listdir(tmp_path / "run") == ["metrics.jsonl"]
