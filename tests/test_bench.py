"""bench/bench.py and the fast paths it measures: tiled ℓ equals plain cross-entropy; bench runs end to end;
FLOPs match a hand count. Nothing here is timed (a benchmark is a script, never a timed test)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench
import gpu_check
from conftest import run_script
from linear_ce import CPU_TILE, default_chunk_rows, default_tile, token_nll

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=16", "--block_size=8", "--batch_size=2", "--vocab=97",
        "--warmup=1", "--iters=1"]


def plain_nll(x, weight, y):
    logits = x @ weight.T
    nll = -torch.log_softmax(logits, -1).gather(-1, y.clamp(min=0)[..., None]).squeeze(-1)
    return torch.where(y >= 0, nll, 0.0)


def nll_and_grads(fn, x, weight, y, upstream):
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    nll = fn(x, weight, y)
    return (nll, *torch.autograd.grad((nll * upstream).sum(), (x, weight)))


# -----------------------------------------------------------------------------
# the tiled fused ℓ (linear_ce.token_nll) equals the plain one

# (600, None, None): the default CPU tile splits both rows (600 > 512) and vocabulary (1100 > 512)
@pytest.mark.parametrize("N, rows, cols", [(600, None, None), (30, 1, 2000), (30, 5, 7), (200, 64, 100),
                                           (30, 1000, 1000)])
def test_tiled_nll_equals_plain_cross_entropy(N, rows, cols):
    g = torch.Generator().manual_seed(0)
    C, V = 16, 1100
    x, weight = torch.randn(N, C, generator=g), torch.randn(V, C, generator=g)
    y, upstream = torch.randint(-1, V, (N,), generator=g), torch.randn(N, generator=g)
    got = nll_and_grads(lambda a, b, t: token_nll(a, b, t, rows, cols), x, weight, y, upstream)
    want = nll_and_grads(plain_nll, x, weight, y, upstream)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    assert torch.equal(got[1][y < 0], torch.zeros_like(got[1][y < 0]))  # ignored rows: exactly no gradient


def test_one_tile_of_logits_takes_plain_cross_entropy_with_the_same_result():
    g = torch.Generator().manual_seed(3)
    x, weight = torch.randn(30, 16, generator=g), torch.randn(50, 16, generator=g)
    y, upstream = torch.randint(-1, 50, (30,), generator=g), torch.randn(30, generator=g)
    plain_path = nll_and_grads(token_nll, x, weight, y, upstream)   # 30×50 logits: one tile, no recompute
    tiled = lambda a, b, t: token_nll(a, b, t, chunk_rows=7, chunk_cols=9)
    tiled_path = nll_and_grads(tiled, x, weight, y, upstream)
    for a, b in zip(plain_path, tiled_path):
        assert torch.allclose(a, b, atol=1e-5)
    assert token_nll(x.double(), weight.double(), y).dtype == torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert token_nll(x, weight, y).dtype == torch.float32


@pytest.mark.slow
def test_compiled_tiled_nll_equals_eager():
    g = torch.Generator().manual_seed(4)
    x, weight = torch.randn(12, 16, generator=g), torch.randn(20, 16, generator=g)
    y, upstream = torch.randint(-1, 20, (12,), generator=g), torch.randn(12, generator=g)
    tiled = lambda a, b, t: token_nll(a, b, t, chunk_rows=5, chunk_cols=7)
    compiled = nll_and_grads(torch.compile(tiled, fullgraph=True), x, weight, y, upstream)
    for a, b in zip(compiled, nll_and_grads(tiled, x, weight, y, upstream)):
        assert torch.allclose(a, b, atol=1e-5)


def test_tiled_nll_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 6, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(23, 6, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(-1, 23, (9,), generator=g)
    assert torch.autograd.gradcheck(lambda a, b: token_nll(a, b, y, chunk_rows=4, chunk_cols=5), (x, weight))


def test_tiled_nll_under_bf16_autocast_is_close_and_never_negative():
    g = torch.Generator().manual_seed(2)
    x, weight = torch.randn(64, 16, generator=g), torch.randn(1000, 16, generator=g)
    weight[7] *= 4  # target 7 gets p ≈ 1: the case where lse − target logit could round below 0
    y = torch.where(torch.arange(64) % 2 == 0, 7, torch.randint(0, 1000, (64,), generator=g))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = token_nll(x, weight, y, chunk_rows=16, chunk_cols=300)
    assert got.dtype == torch.float32 and (got >= 0).all()
    assert torch.allclose(got, plain_nll(x, weight, y), atol=0.1, rtol=0.05)


def test_default_tile_is_cache_sized_on_cpu_and_whole_rows_elsewhere():
    assert default_tile(256, torch.device("cpu")) == (CPU_TILE, CPU_TILE)
    # the memory budget wins
    assert default_tile(50257, torch.device("cpu")) == (default_chunk_rows(50257), CPU_TILE)
    assert default_tile(50257, torch.device("meta")) == (default_chunk_rows(50257), 50257)


# -----------------------------------------------------------------------------
# bench/bench.py end to end on a tiny config

def test_parse_args_literals_strings_and_unknown_keys():
    cfg = bench.parse_args(["--n_steps=2", "--vocab=gpt2", "--compile=False"])
    assert cfg["n_steps"] == 2 and cfg["vocab"] == "gpt2" and cfg["compile"] is False
    assert bench.vocab_size(cfg) == 50257
    with pytest.raises(SystemExit, match="unknown config key 'nsteps'"):
        bench.parse_args(["--nsteps=2"])


def test_cli_prints_one_json_object_per_row_with_the_promised_keys():
    out = subprocess.run([sys.executable, "bench/bench.py", *TINY, "--n_steps=2", "--json=True"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    (r,) = [json.loads(line) for line in out.splitlines()]
    assert r["n_steps"] == 2 and r["tokens_per_s"] > 0 and r["peak_mem_mb"] > 0 and r["flops_per_token"] > 0


@pytest.mark.parametrize("sampled", [False, True])
def test_sweep_cli_end_to_end(sampled):
    """The README's sweeps, for real: each K's memory comes from a child bench/bench.py process; sampled deep
    supervision counts ~1 + 2f unembeddings per token at every K >= 2."""
    out = subprocess.run([sys.executable, "bench/bench.py", *TINY, "--sweep=True", "--json=True",
                          f"--sampled_supervision={sampled}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["n_steps"] for r in rows] == list(bench.SWEEP_STEPS)
    assert all(r["peak_mem_mb"] > 0 for r in rows)
    assert rows[0]["time_ratio"] == rows[0]["flop_ratio"] == 1.0
    for r in rows:
        assert r["quotient"] == pytest.approx(r["time_ratio"] / r["flop_ratio"])
        assert r["flop_ratio"] == pytest.approx(r["flops_per_token"] / rows[0]["flops_per_token"])
        unembeds = r["unembed_flops"] / rows[0]["unembed_flops"]
        assert unembeds == (max(r["n_steps"], 1) if not sampled else 1 if r["n_steps"] < 2 else
                            pytest.approx(1 + 2 * 0.125, abs=0.01))


def test_reference_mode_compares_each_gelu_of_ours_against_both_references(capsys):
    bench.main([*TINY, "--reference=True"])
    header = capsys.readouterr().out.splitlines()[1]
    assert all(h in header for h in ("gelu", "vs ref", "vs ref(tanh)", "vs exact"))
    exact, tanh = bench.run_reference(bench.parse_args([*TINY, "--iters=2"]))
    assert (exact["gelu"], tanh["gelu"], exact["speed_vs_exact"]) == ("exact", "tanh", 1.0)
    for r in (exact, tanh):
        # the nanoGPT reference's tokens/s, from the same timings as 'vs ref'
        assert r["reference_tokens_per_s"] == pytest.approx(r["tokens_per_s"] / r["speed_vs_reference"])
    assert tanh["speed_vs_exact"] == pytest.approx(tanh["tokens_per_s"] / exact["tokens_per_s"])


def test_the_benchmarked_model_takes_gelu_with_train_pys_default():
    import train
    assert bench.DEFAULTS["gelu"] == train.DEFAULTS["gelu"] == "exact"
    cfg = bench.parse_args([*TINY, "--gelu=tanh"])
    assert bench.make_step(cfg)[1].config.gelu == "tanh"
    assert bench.make_step(cfg, gelu="exact")[1].config.gelu == "exact"
    assert bench.make_step(cfg, plain="tanh")[1].approximate == "tanh"
    assert bench.make_step(cfg, plain="exact")[1].approximate == "none"       # nanoGPT's nn.GELU()
    with pytest.raises(SystemExit, match="gelu must be one of exact, tanh, got 'relu'"):
        bench.parse_args([*TINY, "--gelu=relu"])


def test_gpu_check_runs_end_to_end_on_cpu():
    """`bench/gpu_check.py` for real at its tiny CPU shape, so it cannot rot before it meets a GPU: every
    section prints its result line, and train.py's 20 steps their losses. The tokenizer falls back to bytes
    unless NANORLRP_TOKENIZER_FILE is set (then GPT-2's, as on a GPU machine)."""
    r = run_script("bench/gpu_check.py", "--device=cpu", "--threads=1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert not [l for l in lines if "FAILED" in l]
    said = lambda section, *words: [l for l in lines if f"[{section}]" in l and all(w in l for w in words)]
    assert len(said("1 speed", "K=0:", "tok/s", "MB")) == len(said("1 speed", "K=4:", "tok/s", "MB")) == 1
    assert said("2 compile", "first step at K=4", "graphs") and said("2 compile", "random K", "no recompiles")
    assert said("3 sampled", "not implemented yet")
    assert said("5 train", "prepare.prepare wrote")   # the folder from the project's own prepare
    losses = [l.split("] iter")[1].split()[:3] for l in said("5 train", "] iter ", " loss ")]
    assert [int(it) for it, _, _ in losses] == list(range(1, 21))
    assert all(word == "loss" and 0 < float(loss) < 20 for _, word, loss in losses)
    assert said("5 train", "20 train records of 20 iters", "wall", "exit 0")
    assert said("4 bf16", "K=4 loss: bfloat16", "float32", "difference")
    assert said("gpu check", "done: 0 section(s) failed")


def test_a_failing_gpu_check_section_says_so_in_one_line_and_the_check_goes_on(capsys):
    assert gpu_check.section("9 demo", lambda: 1 / 0) == 1
    assert gpu_check.section("9 demo", gpu_check.check_sampled, {}) == 0
    out = capsys.readouterr()
    (failed, slot) = out.out.splitlines()
    assert failed.endswith("[9 demo] FAILED: ZeroDivisionError: division by zero") and "Traceback" in out.err
    assert slot.endswith("[3 sampled] sampled_supervision vs full deep supervision: not implemented yet")


# -----------------------------------------------------------------------------
# analytic FLOPs against a count by hand

def test_flops_per_token_match_a_hand_count():
    L, C, T, V, K, D = 2, 16, 8, 97, 3, 16
    (r,) = bench.run_one(bench.parse_args([*TINY, f"--n_steps={K}"]))
    # 6 FLOPs per multiply-add per token (forward 2, backward 4)
    qkv, attn_proj, fc, mlp_proj = C * 3 * C, C * C, C * 4 * C, 4 * C * C
    scores = 2 * C * T                                     # q·k and att·v, per layer, per token
    trunk = 6 * L * (qkv + attn_proj + fc + mlp_proj) + 6 * L * scores
    w_in, fc_h, fc_z, proj, w_out = C * D, C * 4 * D, D * 4 * D, 4 * D * D, D * C
    head = 6 * (w_in + fc_h) + 6 * K * (fc_z + proj + w_out)
    unembed = 6 * C * V * K
    assert (r["trunk_flops"], r["head_flops"], r["unembed_flops"]) == (trunk, head, unembed)
    assert r["flops_per_token"] == trunk + head + unembed \
        == 6 * (12 * L * C * C + 2 * L * C * T) + head + unembed
