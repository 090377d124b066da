"""Checkpoints and resume (checkpoint.py, train.py): the checkpoint's config (an old one's chain_length folded
into step_targets), one-line errors for a bad file, exact resume (random K, dropout, fp16), the last good
checkpoint kept, crash recovery of the metric records, evaluation-only runs, and a stop signal that
checkpoints the finished step."""

import json
import os
import signal
import subprocess
import sys
import time

from dataclasses import replace

import pytest
import torch

import checkpoint
import schedules
import train
from configurator import ConfigError
from conftest import crash_at_step
from model import GPT
from test_train import ROOT, TINY, final_params, records

# -----------------------------------------------------------------------------
# the checkpoint's config, a bad file, checkpoints between evals

def test_resume_takes_the_checkpoints_config_and_refuses_changes_that_make_another_run(tmp_path, capsys):
    train.main(TINY + [f"--out_dir={tmp_path}", "--max_iters=2", "--eval_interval=2"])
    for arg, message in [("--n_layer=3", "n_layer=3 differs from the checkpoint's 2"),
                         ("--block_size=64", "block_size=64 differs from the checkpoint's 48"),
                         ("--reasoning_tasks=add:1", "reasoning_tasks='add:1' differs from the checkpoint's"),
                         ("--lambda_rl=0.9", "lambda_rl=0.9 differs from the checkpoint's 0.5"),
                         ("--gelu=tanh", "gelu='tanh' differs from the checkpoint's 'exact'")]:
        with pytest.raises(ConfigError, match=message) as e:
            train.main(TINY + [f"--out_dir={tmp_path}", "--init_from=resume", arg])
        assert "\n" not in str(e.value)
    # no preset, no TINY: everything (byte tokenizer, pydoc, the tiny shape) comes from the checkpoint;
    # max_iters and eval_interval are safe to change
    train.main([f"--out_dir={tmp_path}", "--init_from=resume", "--max_iters=4", "--eval_interval=4"])
    assert [r["iter"] for r in records(tmp_path, "train")] == [1, 2, 3, 4]
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert ckpt["config"]["n_layer"] == 2
    assert ckpt["config"]["gelu"] == ckpt["model_args"]["gelu"] == "exact"      # from scratch: nanoGPT's


def test_a_checkpoint_from_before_the_gelu_key_loads_generates_and_resumes_as_tanh(tmp_path):
    """Every model ran GPT-2's tanh GELU before the key came: a checkpoint without it is still that model."""
    train.main(TINY + [f"--out_dir={tmp_path}", "--max_iters=2", "--eval_interval=2", "--gelu=tanh"])
    path = tmp_path / "ckpt.pt"
    ckpt = torch.load(path, weights_only=False)
    assert ckpt["model_args"]["gelu"] == ckpt["config"]["gelu"] == "tanh"
    idx = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(0))
    before = checkpoint.saved_model(ckpt).eval()
    with torch.no_grad():
        want_logits, want = before(idx)[0], before.generate(idx, 10, temperature=0)
    del ckpt["model_args"]["gelu"], ckpt["config"]["gelu"]                # as written before the key existed
    torch.save(ckpt, path)
    old = checkpoint.saved_model(torch.load(path, weights_only=False)).eval()
    assert old.config.gelu == "tanh"
    with torch.no_grad():
        assert torch.equal(old(idx)[0], want_logits)                      # bit for bit
        assert torch.equal(old.generate(idx, 10, temperature=0), want)
        exact = GPT(replace(old.config, gelu="exact")).eval()             # the same weights, the other GELU:
        exact.load_state_dict(old.state_dict())                           # another model
        assert not torch.allclose(exact(idx)[0], want_logits)
    # resumed: still tanh, which a resume may not change
    with pytest.raises(ConfigError, match="gelu='exact' differs from the checkpoint's 'tanh'") as e:
        train.main([f"--out_dir={tmp_path}", "--init_from=resume", "--gelu=exact"])
    assert "\n" not in str(e.value)
    train.main([f"--out_dir={tmp_path}", "--init_from=resume", "--max_iters=3", "--eval_interval=3"])
    resumed = torch.load(path, weights_only=False)
    assert resumed["iter_num"] == 3 and resumed["model_args"]["gelu"] == resumed["config"]["gelu"] == "tanh"


@pytest.mark.parametrize("targets, n, want", [("final", 0, "final"), ("final", 3, "final"),
                                              ("chain", 0, "chain"), ("chain", 3, "chain:3")])
def test_saved_config_folds_an_old_chain_length_into_step_targets(targets, n, want, capsys):
    old = {"step_targets": targets, "chain_length": n, "n_layer": 2}             # as written before the fold
    assert checkpoint.saved_config(old) == {"step_targets": want, "n_layer": 2, "gelu": "tanh"}
    assert capsys.readouterr().out == f"checkpoint: chain_length={n} -> step_targets={want!r} (the key was " \
                                      "folded into step_targets)\n"
    assert checkpoint.saved_config({"step_targets": want, "gelu": "exact"}) == {"step_targets": want,
                                                                                "gelu": "exact"}
    assert capsys.readouterr().out == ""                                         # today's: nothing to say


def test_a_checkpoint_with_chain_length_resumes_as_its_step_targets_exactly(tmp_path, capsys):
    """A run written as step_targets='chain', chain_length=2 resumes as 'chain:2' and continues where the
    same run under the new key does."""
    extra = ["--reasoning_tasks=hopo:1,hopo:2", "--step_targets=chain:2", "--lambda_imp=0",
             "--eval_interval=4"]
    full, half = tmp_path / "full", tmp_path / "half"
    train.main(TINY + extra + [f"--out_dir={full}", "--max_iters=4"])
    train.main(TINY + extra + [f"--out_dir={half}", "--max_iters=2"])
    ckpt = torch.load(half / "ckpt.pt", weights_only=False)
    ckpt["config"].update(step_targets="chain", chain_length=2)
    torch.save(ckpt, half / "ckpt.pt")
    capsys.readouterr()
    with pytest.raises(ConfigError, match="step_targets='chain' differs from the checkpoint's 'chain:2'"):
        train.main([f"--out_dir={half}", "--init_from=resume", "--step_targets=chain"])
    train.main([f"--out_dir={half}", "--init_from=resume", "--max_iters=4"])
    lines = capsys.readouterr().out.splitlines()
    assert lines.count("checkpoint: chain_length=2 -> step_targets='chain:2' (the key was folded into "
                       "step_targets)") == 2                                     # once per resume
    resumed = torch.load(half / "ckpt.pt", weights_only=False)["config"]
    assert resumed["step_targets"] == "chain:2" and "chain_length" not in resumed
    assert [r["loss"] for r in records(full, "train")] == [r["loss"] for r in records(half, "train")]

def test_unreadable_checkpoint_is_one_line_naming_the_file_and_the_previous_one(tmp_path):
    train.main(TINY + [f"--out_dir={tmp_path}", "--max_iters=4", "--eval_interval=2"])
    # the one before the latest
    assert torch.load(tmp_path / "ckpt.prev.pt", weights_only=False)["iter_num"] == 2
    data = (tmp_path / "ckpt.pt").read_bytes()
    (tmp_path / "ckpt.pt").write_bytes(data[: len(data) // 2])                         # truncated
    out = subprocess.run([sys.executable, "train.py", f"--out_dir={tmp_path}", "--init_from=resume"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    (line,) = out.stderr.strip().splitlines()
    assert f"{tmp_path}/ckpt.pt is unreadable" in line
    assert f"the previous checkpoint is {tmp_path}/ckpt.prev.pt" in line


def test_checkpoint_interval_saves_between_evals(tmp_path):
    train.main(TINY + [f"--out_dir={tmp_path}", "--max_iters=5", "--eval_interval=100",
                       "--checkpoint_interval=2"])
    iters = [torch.load(tmp_path / f, weights_only=False)["iter_num"] for f in ("ckpt.prev.pt", "ckpt.pt")]
    assert iters == [4, 5]                         # 2, 4 by the interval, 5 at the end (with its eval)


# -----------------------------------------------------------------------------
# exact resume

def run_and_resume(tmp_path, extra):
    """The same 6 iterations uninterrupted, and interrupted at 3 then resumed: (full, half) train records."""
    full, half = str(tmp_path / "full"), str(tmp_path / "half")
    train.main(TINY + extra + [f"--out_dir={full}", "--max_iters=6"])
    train.main(TINY + extra + [f"--out_dir={half}", "--max_iters=3"])
    train.main(TINY + extra + [f"--out_dir={half}", "--max_iters=6", "--init_from=resume"])
    a, b = records(full, "train"), records(half, "train")
    assert [r["iter"] for r in b] == list(range(1, 7))
    return full, half, a, b


def test_resume_continues_exactly(tmp_path):
    # dropout and random K make the RNG and the K schedule part of what must resume exactly
    extra = ["--dropout=0.1", "--n_steps_dist=uniform", "--eval_interval=3"]
    full, half, a, b = run_and_resume(tmp_path, extra)
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["n_steps"] for r in a] == [r["n_steps"] for r in b]
    for k, v in final_params(full).items():
        assert torch.equal(v, final_params(half)[k]), k
    evals = records(full, "eval")
    assert [r["iter"] for r in evals] == [0, 3, 6]
    for r in evals:
        assert len(r["fluency_loss"]) == len(r["answer_exact_match"]) == len(r["answer_token_acc"]) == 2
        assert r["tokens"] == r["iter"] * 2 * 4 * 48


def test_resume_continues_exactly_with_lognormal_k(tmp_path):
    # the log-normal Poisson K schedule (here 1, 2, 2, 3, 3, 3: deeper than K = 2 too) with dropout and
    # truncated backward, interrupted at iter 3
    extra = ["--dropout=0.1", "--n_steps_dist=lognormal", "--grad_steps=1", "--eval_interval=3"]
    full, half, a, b = run_and_resume(tmp_path, extra)
    c, _ = train.load_config(TINY + extra)
    drawn = [[schedules.n_steps_at(it, c)] for it in range(6)]
    assert [r["n_steps"] for r in a] == [r["n_steps"] for r in b] == drawn
    assert max(r["n_steps"][0] for r in a) > 2
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    for k, v in final_params(full).items():
        assert torch.equal(v, final_params(half)[k]), k


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real_batches, real_loss, steps = train.micro_batches, train.Run.micro_step, []

    def counting(*args, **kwargs):                     # one call per optimizer step
        steps.append(1)
        return real_batches(*args, **kwargs)

    def poisoned(run, *args):                          # iter 3's micro-batches give a NaN loss
        loss, logged = real_loss(run, *args)
        nan = float("nan") if len(steps) == 4 else 1.0
        return loss * nan, dict(logged, loss=logged["loss"] * nan)
    monkeypatch.setattr(train, "micro_batches", counting)
    monkeypatch.setattr(train.Run, "micro_step", poisoned)
    with pytest.raises(FloatingPointError, match="non-finite loss at iter 3"):
        train.main(TINY + [f"--out_dir={tmp_path}", "--max_iters=8", "--eval_interval=2"])
    ckpt = torch.load(tmp_path / "ckpt.pt", map_location="cpu", weights_only=False)
    assert ckpt["iter_num"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert not os.path.exists(tmp_path / "ckpt.pt.tmp")


# -----------------------------------------------------------------------------
# evaluation-only runs, fp16 resume, crash recovery, stop signals

def test_eval_only_on_a_resumed_run_evaluates_once_and_leaves_the_checkpoint_alone(tmp_path, capsys):
    train.main(TINY + [f"--out_dir={tmp_path}", "--max_iters=4", "--eval_interval=2"])
    ckpt = (tmp_path / "ckpt.pt").read_bytes()
    before = (tmp_path / "metrics.jsonl").read_text()
    for max_iters in (4, 10):                     # a finished run, and one that could still train
        capsys.readouterr()
        train.main(TINY + [f"--out_dir={tmp_path}", "--init_from=resume", "--eval_only=True",
                           f"--max_iters={max_iters}", "--eval_interval=2"])
        assert "eval @ iter 4" in capsys.readouterr().out
        assert (tmp_path / "ckpt.pt").read_bytes() == ckpt
    lines = (tmp_path / "metrics.jsonl").read_text()
    assert lines.startswith(before)               # nothing trained, nothing dropped
    extra = [json.loads(line) for line in lines[len(before):].splitlines()]
    assert [(r["type"], r["iter"]) for r in extra] == [("eval_only", 4)] * 2
    assert extra[0]["fluency_loss"] == records(tmp_path, "eval")[-1]["fluency_loss"]


def test_fp16_resume_is_exact_with_the_loss_scaler_state(tmp_path):
    fp16 = [a for a in TINY if not a.startswith("--dtype")] + ["--dtype=float16", "--eval_interval=3"]
    full, half = str(tmp_path / "full"), str(tmp_path / "half")
    train.main(fp16 + [f"--out_dir={full}", "--max_iters=6"])
    train.main(fp16 + [f"--out_dir={half}", "--max_iters=3"])
    train.main(fp16 + [f"--out_dir={half}", "--max_iters=6", "--init_from=resume"])
    a, b = (torch.load(os.path.join(d, "ckpt.pt"), map_location="cpu", weights_only=False)
            for d in (full, half))
    assert a["scaler"] == b["scaler"] and a["scaler"]["_growth_tracker"] == 6   # steps since an overflow
    assert [r["loss"] for r in records(full, "train")] == [r["loss"] for r in records(half, "train")]
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def test_resume_after_a_crash_drops_metric_records_past_the_checkpoint(tmp_path, monkeypatch):
    real_batches = crash_at_step(monkeypatch, train, 4)     # iter 4's batches: a crash after iter 3
    with pytest.raises(FloatingPointError):
        train.main(TINY + [f"--out_dir={tmp_path}", "--max_iters=6", "--eval_interval=2"])
    assert [r["iter"] for r in records(tmp_path, "train")] == [1, 2, 3]  # iter 3 is past the checkpoint (2)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"type": "train", "iter": 4, "lo')                          # a line cut short by the crash
    monkeypatch.setattr(train, "micro_batches", real_batches)
    train.main(TINY + [f"--out_dir={tmp_path}", "--max_iters=6", "--eval_interval=2", "--init_from=resume"])
    assert [r["iter"] for r in records(tmp_path, "train")] == [1, 2, 3, 4, 5, 6]
    assert [r["iter"] for r in records(tmp_path, "eval")] == [0, 2, 4, 6]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_checkpoints_the_finished_step_and_resume_equals_an_uninterrupted_run(tmp_path, sig):
    # one thread in the subprocess and here: bit-equal parameters need the same order of float sums
    before = torch.get_num_threads()
    args = TINY + ["--dropout=0.1", "--n_steps_dist=uniform", "--eval_interval=1000",
                   "--checkpoint_minutes=0", "--threads=1"]
    cut, full = tmp_path / "cut", tmp_path / "full"
    proc = subprocess.Popen([sys.executable, "train.py", *args, "--max_iters=1000", f"--out_dir={cut}"],
                            cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    metrics = cut / "metrics.jsonl"                       # being written: count lines, do not parse them
    while not metrics.exists() or metrics.read_text().count('"type": "train"') < 3:   # a few steps in
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig
    n = torch.load(cut / "ckpt.pt", weights_only=False)["iter_num"]
    assert 3 <= n < 1000
    assert err.strip().splitlines()[-1] == (f"train.py: stopped by a signal after iter {n}; checkpoint "
                                            f"written to {cut}/ckpt.pt (continue with --init_from=resume)")
    try:
        train.main(TINY + [f"--out_dir={cut}", "--init_from=resume", f"--max_iters={n + 3}"])
        train.main(args + [f"--out_dir={full}", f"--max_iters={n + 3}"])
    finally:
        torch.set_num_threads(before)
    a, b = records(full, "train"), records(cut, "train")
    assert [r["iter"] for r in b] == list(range(1, n + 4))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    for k, v in final_params(full).items():
        assert torch.equal(v, final_params(cut)[k]), k
