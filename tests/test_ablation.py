"""experiments/ablation.py: the ablation report is regenerated from the runs' own metrics, and finished runs
are reused."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import ablation
from conftest import crash_at_step
from configurator import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1")
TINY_PRESET = """
device = "cpu"; dtype = "float32"; compile = False
tokenizer = "byte"; fluency_data = "pydoc"; reasoning_data = "synthetic"; reasoning_tasks = "add:1,sort:3"
n_layer = 1; n_head = 2; n_embd = 32; n_steps = 2; n_latent = 16; block_size = 32; batch_size = 4
eval_iters = 2; eval_examples = 20; log_interval = 1; warmup_iters = 1; max_iters = 6; lr_decay_iters = 6
"""


def table_rows(text, header_start):
    """{first cell: [other cells]} of the markdown table right after the line starting with header_start."""
    lines = text[text.index(header_start):].splitlines()
    rows = {}
    for line in lines[4:] if header_start.startswith("#") else lines[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.slow
def test_ablation_report_matches_runs(tmp_path):
    preset, out = tmp_path / "tiny.py", tmp_path / "res"
    preset.write_text(TINY_PRESET)
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "ablation.py"), "--quick=True", "--iters=3",
           "--variants=gpt,rlrp", f"--preset={preset}", f"--out={out}"]
    subprocess.run(cmd, check=True, cwd=tmp_path, capture_output=True, env=ENV)
    report = (out / "ablation.md").read_text()
    assert "(2 of 2 runs trained by it, the rest reused)" in report
    main = table_rows(report, "| variant | what |")
    assert list(main) == ["gpt", "rlrp"]
    for name, cells in main.items():
        run = out / "runs" / f"{name}-s0"
        state = torch.load(run / "ckpt.pt", map_location="cpu", weights_only=False)["model"]
        # the tied lm_head once
        tensors = {v.data_ptr(): v for k, v in state.items() if k != "transformer.wpe.weight"}
        n_params = sum(v.numel() for v in tensors.values())  # nanoGPT's count: position embeddings left out
        last = [json.loads(line) for line in open(run / "metrics.jsonl") if '"eval"' in line][-1]
        assert last["iter"] == 3
        assert cells[1] == f"{n_params / 1e6:.3f}M"
        assert cells[4] == f"{last['fluency_loss'][-1]:.3f} ± 0.000"  # one seed: std 0
        assert cells[5:7] == [f"{last['answer_exact_match'][i]:.3f} ± 0.000" for i in (0, -1)]
        per_task = table_rows(report, "## Exact match at step K, per task")[name]
        assert per_task == [f"{em[-1]:.3f} ± 0.000" for em in last["task_exact_match"].values()]
        curve = table_rows(report, "## Test-time steps K'")[name]
        assert len([c for c in curve if c]) == (5 if name == "rlrp" else 1)  # K' = 0..2K, or the trunk alone
    assert re.search(r"\| variant \| add:1 \| sort:3 \|", report)  # one column per task of the suite
    pngs = ["loss_per_step.png", "em_vs_test_k.png", "step_k_beats_1.png", "em_over_training.png"]
    has_plots = importlib.util.find_spec("matplotlib") is not None  # optional: without it, the table only
    assert [(out / p).exists() for p in pngs] == [has_plots] * len(pngs)
    # an interrupted or repeated ablation reuses finished runs instead of training them again
    ckpt = out / "runs" / "rlrp-s0" / "ckpt.pt"
    before = os.stat(ckpt).st_mtime_ns
    subprocess.run(cmd, check=True, cwd=tmp_path, capture_output=True, env=ENV)
    assert os.stat(ckpt).st_mtime_ns == before
    assert "(0 of 2 runs trained by it, the rest reused)" in (out / "ablation.md").read_text()
    # ... but only when the configuration is the same: a changed preset trains again
    rlrp_run = str(out / "runs" / "rlrp-s0")
    args = ablation.run_args(rlrp_run, str(preset), ablation.VARIANTS["rlrp"][1], 0, 3)
    assert ablation.run_state(rlrp_run, args) == "done"
    # a run from before the gelu key ran GPT-2's tanh GELU: not the exact-GELU run asked for now
    old_run = tmp_path / "old-rlrp-s0"
    shutil.copytree(rlrp_run, old_run)
    old = torch.load(old_run / "ckpt.pt", weights_only=False)
    assert old["config"]["gelu"] == "exact"
    del old["config"]["gelu"], old["model_args"]["gelu"]
    torch.save(old, old_run / "ckpt.pt")
    assert ablation.run_state(str(old_run), args) is None
    preset.write_text(TINY_PRESET.replace('"add:1,sort:3"', '"add:1,sort:4"'))
    assert ablation.run_state(rlrp_run, args) is None
    preset.write_text(TINY_PRESET)
    # --sweep writes its own report next to the ablation's, sharing (and reusing) the runs
    report = (out / "ablation.md").read_text()
    sweep = [c for c in cmd if c != "--quick=True"] + ["--sweep=True", "--variants=rlrp,rlrp_k2"]
    subprocess.run(sweep, check=True, cwd=tmp_path, capture_output=True, env=ENV)
    assert os.stat(ckpt).st_mtime_ns == before and (out / "ablation.md").read_text() == report
    assert list(table_rows((out / "sweep.md").read_text(), "| variant | what |")) == ["rlrp", "rlrp_k2"]


def test_a_stopped_run_goes_on_from_its_checkpoint(tmp_path, monkeypatch):
    import train
    preset, out = tmp_path / "tiny.py", str(tmp_path / "run")
    preset.write_text(TINY_PRESET)
    args = ablation.run_args(out, str(preset), [], 0, 6)
    crash_at_step(monkeypatch, train, 4)
    with pytest.raises(FloatingPointError):
        train.main(args)
    n = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)["iter_num"]
    before = [r for r in ablation.run_records(out)[0] if r["iter"] <= n]
    assert n == 3 and ablation.run_state(out, args) == "stopped"
    ablation.train_run(out, str(preset), [], 0, 6)       # train.py in a subprocess, as the suites call it
    train_recs, evals = ablation.run_records(out)
    # the records up to the checkpoint are the first process's own (a fresh run would time its steps anew)
    assert train_recs[:n] == before and [r["iter"] for r in train_recs] == [1, 2, 3, 4, 5, 6]
    assert evals[-1]["iter"] == 6 and ablation.run_state(out, args) == "done"


def test_records_kept_without_weights_are_never_trained_over(tmp_path):
    """A run folder kept without its weights (results/compose/runs/) is done while its config is the one asked
    for; asked for another, run_state stops with one line instead of training over the only copy."""
    import train
    preset, out, kept = tmp_path / "tiny.py", str(tmp_path / "run"), tmp_path / "kept"
    preset.write_text(TINY_PRESET)
    train.main(ablation.run_args(out, str(preset), [], 0, 3))
    ablation.run_config(out)                                 # writes its CONFIG beside metrics.jsonl
    kept.mkdir()
    for name in ("metrics.jsonl", ablation.CONFIG):
        shutil.copy(os.path.join(out, name), kept / name)
    assert ablation.run_state(str(kept), ablation.run_args(str(kept), str(preset), [], 0, 3)) == "done"
    with pytest.raises(ConfigError, match="of a run with other values of seed: ask for that run"):
        ablation.run_state(str(kept), ablation.run_args(str(kept), str(preset), [], 1, 3))
    # with its weights, a run of other settings is trained again into its folder
    assert ablation.run_state(out, ablation.run_args(out, str(preset), [], 1, 3)) is None


def run_cli(cwd, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "ablation.py"), *args], cwd=cwd,
                          capture_output=True, text=True, env=ENV)


def one_line_error(r, words):
    return r.returncode == 1 and r.stdout == "" and r.stderr.strip().count("\n") == 0 and words in r.stderr


def test_unknown_variant_is_one_line_error(tmp_path):
    r = run_cli(tmp_path, "--quick=True", "--variants=gpt,rlrpp")
    assert one_line_error(r, "unknown variant(s) ['rlrpp']")


def test_arguments_are_key_value_like_every_entry_point(tmp_path):
    c, names = ablation.parse_args(["--sweep=True", "--jobs=1"])
    assert c["sweep"] is True and c["quick"] is False and c["jobs"] == 1 and names == ablation.SWEEP
    c, names = ablation.parse_args(["--quick=True", "--variants=gpt,rlrp", "--variants=rlrp"])  # in order
    assert c["quick"] is True and names == ["rlrp"] and c["preset"] == "config/train_cpu.py"
    assert ablation.parse_args([])[1] == ablation.ABLATION
    with pytest.raises(ConfigError, match="jobs must be >= 1"):
        ablation.parse_args(["--jobs=0"])
    # the old argparse flags are one-line errors naming the form to write; nothing starts training
    assert one_line_error(run_cli(tmp_path, "--sweep", "--variants=nope"), "write --sweep=True")
    assert one_line_error(run_cli(tmp_path, "--preset=missing.py"), "config file 'missing.py' not found")
