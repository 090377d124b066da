"""experiments/depth.py: the necessity cuts, the FLOP matching, the one-pass test-time curve, the report from
the runs."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import depth
from evaluate import evaluate_reasoning
from ablation import train_config
from model import GPT, GPTConfig
from test_ablation import table_rows

VOCAB = data.get_tokenizer("byte").vocab_size
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_PRESET = """
device = "cpu"; dtype = "float32"; compile = False
tokenizer = "byte"; fluency_data = "pydoc"; reasoning_data = "synthetic"; reasoning_tasks = "hopo:1,iter:1"
reasoning_fraction = 1.0; n_steps_dist = "fixed"
n_layer = 1; n_head = 2; n_embd = 32; n_steps = 2; n_latent = 16; block_size = 48; batch_size = 4
gradient_accumulation_steps = 1
eval_iters = 2; eval_examples = 8; log_interval = 1; warmup_iters = 1; max_iters = 8; lr_decay_iters = 8
"""


def small(**changes):
    """The tiny preset's model shape with some GPTConfig fields changed."""
    shape = dict(block_size=48, vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=32, n_steps=2, n_latent=16)
    return GPT(GPTConfig(**(shape | changes)))


def trained_head(attn):
    """A small model whose head is not at its zero init (W_out = 0 would hide the readout)."""
    torch.manual_seed(0)
    model = small(n_steps=3, head_attn=attn)
    with torch.no_grad():
        for p in model.latent_head.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("attn", ["none", "latent"])
def test_cut_latent_reads_out_zero_or_another_positions_z(attn):
    model = trained_head(attn)
    h = torch.randn(2, 7, 32)
    _, z = model.latent_head(h, 3, return_latents=True)        # (4, 2, 7, 16)
    w, b = model.latent_head.w_out.weight, model.latent_head.w_out.bias
    zero = depth.cut_latent(model, "zero")(h, 3)
    torch.testing.assert_close(zero, (h + b).expand(3, -1, -1, -1))
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(5))
    shuffled = depth.cut_latent(model, "shuffle", seed=5)(h, 3)
    for k in range(3):
        for t in range(7):
            torch.testing.assert_close(shuffled[k, :, t], h[:, t] + z[k + 1, :, perm[t]] @ w.T + b)
    assert not torch.allclose(shuffled, model.head_outputs(h, 3))    # the cut changes what the logits see


def test_one_pass_of_3K_steps_is_the_test_time_curve():
    """Step k's logits, and so its exact match, from one 3K-step pass equal those of a K' = k pass."""
    model = trained_head("trunk")
    suite = data.ReasoningData("synthetic", data.get_tokenizer("byte"), 48, tasks="hopo:1,iter:2")
    batches = suite.eval_batches(8, 40)
    long_logits = model(batches[0].x, n_steps=9)[0]                      # (9, B, T, V)
    long = evaluate_reasoning(model, batches, 9)
    for k in (1, 2, 5, 9):
        torch.testing.assert_close(model(batches[0].x, n_steps=k)[0][-1], long_logits[k - 1])
        short = evaluate_reasoning(model, batches, k)
        assert short["answer_token_acc"][-1] == long["answer_token_acc"][k - 1]
        assert torch.equal(short["per_example_exact"][:, -1], long["per_example_exact"][:, k - 1])
    assert len(set(long["answer_token_acc"])) > 1                        # the steps do differ


def test_matched_gpts_are_the_closest_in_flops(tmp_path):
    preset = tmp_path / "preset.py"
    preset.write_text(TINY_PRESET)
    cfg = train_config([str(preset)])
    match, target = depth.matched_gpts(cfg)
    heads = [small(head_attn=a).flops_per_token()["total"] for a in ("none", "trunk", "latent")]
    assert target == max(heads)
    gpt_flops = lambda **changes: small(n_steps=0, **changes).flops_per_token()["total"]
    off = lambda f: abs(np.log(f / target))
    n = match["gpt_deep"]
    assert n > 1
    assert off(gpt_flops(n_layer=n)) <= min(off(gpt_flops(n_layer=n - 1)), off(gpt_flops(n_layer=n + 1)))
    w = match["gpt_wide"]
    assert w > 32 and w % 16 == 0
    assert off(gpt_flops(n_embd=w)) <= min(off(gpt_flops(n_embd=w - 16)), off(gpt_flops(n_embd=w + 16)))


def test_a_resumed_runs_flops_are_its_models(tmp_path):
    """The reports read FLOPs from a run's saved config; a resumed run's says init_from='resume' (no
    checkpoint named to build from): the same model's FLOPs."""
    preset = tmp_path / "preset.py"
    preset.write_text(TINY_PRESET)
    cfg = train_config([str(preset)])
    want = small(head_attn=cfg["head_attn"]).flops_per_token()["total"]
    assert depth.model_flops(cfg | {"init_from": "resume"}) == depth.model_flops(cfg) == want


@pytest.mark.slow
def test_depth_report_matches_runs(tmp_path):
    """The real command on a tiny preset: every number of the report is the runs' own evaluation."""
    preset = tmp_path / "preset.py"
    preset.write_text(TINY_PRESET)
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "depth.py"), "--quick=True", "--iters=4",
           f"--preset={preset}", "--variants=gpt,gpt_deep,none,latent_rk", "--eval_per_task=6", "--out=out"]
    one_thread = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(cmd, check=True, cwd=tmp_path, capture_output=True, env=one_thread)
    out = tmp_path / "out"
    report = (out / "depth.md").read_text()
    evals = {n: json.loads((out / "runs" / f"{n}-s0" / "depth_eval.json").read_text())
             for n in ("gpt", "gpt_deep", "none", "latent_rk")}
    tasks = depth.EVAL_TASKS.split(",")
    at_k = table_rows(report, "## Exact match at step K")
    for name, res in evals.items():
        assert at_k[name] == [f"{res['curve'][t][res['K']]:.3f} ± 0.000" for t in tasks]
    assert evals["gpt"]["K"] == 0 and evals["none"]["K"] == 2
    assert all(len(evals["none"]["curve"][t]) == 3 * 2 + 1 for t in tasks)     # K' = 0..3K
    delta = table_rows(report, "## Step K minus step 1")
    assert list(delta) == ["none", "latent_rk"]                               # heads only
    assert delta["none"] == [f"{evals['none']['curve'][t][2] - evals['none']['curve'][t][1]:.3f} ± 0.000"
                             for t in tasks]
    necessity = [line for line in report.splitlines() if line.startswith("| none | z shuffled |")]
    shuffled = " | ".join(f"{evals['none']['shuffle'][t][evals['none']['K'] - 1]:.3f}" for t in tasks)
    assert necessity == [f"| none | z shuffled | {shuffled} |"]
    deep = table_rows(report, "| variant | what |")["gpt_deep"]
    n_layer = depth.matched_gpts(train_config([str(preset)]))[0]["gpt_deep"]
    assert deep[0] == f"GPT, {n_layer} layers (FLOP-matched)"
    ckpt = torch.load(out / "runs" / "gpt_deep-s0" / "ckpt.pt", weights_only=False)
    assert ckpt["model_args"]["n_layer"] == n_layer and ckpt["model_args"]["n_steps"] == 0
    assert (out / "depth_vs_test_k.png").exists() == (out / "depth_over_training.png").exists()
    # a second run reuses runs and their evaluations
    before = os.stat(out / "runs" / "none-s0" / "depth_eval.json").st_mtime_ns
    subprocess.run(cmd, check=True, cwd=tmp_path, capture_output=True, env=one_thread)
    assert os.stat(out / "runs" / "none-s0" / "depth_eval.json").st_mtime_ns == before
    assert "(4 of 4 runs trained by it" in report                       # the first invocation's cost line
    assert "(0 of 4 runs trained by it" in (out / "depth.md").read_text()


def test_unknown_variant_is_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "depth.py"),
                        "--variants=gpt,trunkk"], cwd=ROOT,
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 1 and r.stdout == "" and r.stderr.count("\n") == 1 and "['trunkk']" in r.stderr


@pytest.mark.slow
def test_steps_suite_reads_each_level_at_its_own_step(tmp_path):
    """experiments/depth.py --suite=steps on a tiny chain preset: the answer-step table is the curve at K' =
    the level, the cuts are read there too, and the report is steps.md."""
    preset = tmp_path / "preset.py"
    preset.write_text(TINY_PRESET.replace('"hopo:1,iter:1"', '"hopo:1,hopo:2"') +
                      'step_targets = "chain:2"; lambda_imp = 0.0\n')
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "depth.py"),
           "--suite=steps", "--seeds=0", "--iters=16",
           f"--preset={preset}", "--variants=gpt,chain_trunk,curric_trunk", "--eval_per_task=4", "--out=out"]
    subprocess.run(cmd, check=True, cwd=tmp_path, capture_output=True,
                   env=dict(os.environ, OMP_NUM_THREADS="1"))
    out = tmp_path / "out"
    report = (out / "steps.md").read_text()
    res = json.loads((out / "runs" / "chain_trunk-s0" / "depth_eval.json").read_text())
    tasks = depth.SUITES["steps"][1].split(",")
    assert "Never trained on: hopo:3, hopo:4, hopo:5, hopo:6, hopo:7." in report
    at_level = table_rows(report, "## Exact match at the answer step")
    assert at_level["chain_trunk"] == [f"{res['curve'][t][min(int(t[-1]), 6)]:.3f} ± 0.000" for t in tasks]
    gpt = json.loads((out / "runs" / "gpt-s0" / "depth_eval.json").read_text())
    assert at_level["gpt"] == [f"{gpt['curve'][t][0]:.3f} ± 0.000" for t in tasks]
    zeroed = [line for line in report.splitlines() if line.startswith("| chain_trunk | z zeroed |")]
    assert zeroed == ["| chain_trunk | z zeroed | " + " | ".join(
        f"{res['zero'][t][min(int(t[-1]), 6) - 1]:.3f}" for t in tasks) + " |"]
    assert (out / "steps_vs_test_k.png").exists() == (out / "steps_over_training.png").exists()
    # the curriculum arm: hopo:2 joins at 3/16 of the budget
    curric = [json.loads(line) for line in open(out / "runs" / "curric_trunk-s0" / "metrics.jsonl")]
    assert [r["curriculum_level"] for r in curric if r["type"] == "train"] == [1] * 3 + [2] * 13
