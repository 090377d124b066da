"""train.py's configuration: presets and command-line overrides, the threads key, and every bad setting (an
unknown key, a value out of range, a missing device or package, a batch that does not divide over the
ranks) as one line before anything heavy, also on the command line and under torchrun."""

import os
import subprocess
import sys

import pytest
import torch

import train
from configurator import ConfigError
from test_train import ROOT, TINY


@pytest.mark.parametrize("args, message", [
    (["--n_stepz=3"], "unknown config key 'n_stepz'"),
    (["--n_steps=two"], "n_steps must be int, got 'two'"),
    (["--learning_rate=fast"], "learning_rate must be float"),
    (["--learning_rate=-1"], "learning_rate must be > 0, got -1"),   # named, not as a min_lr problem
    (["--n_steps=-1"], "n_steps must be >= 0, got -1"),
    (["--reasoning_fraction=1.5"], r"reasoning_fraction must be in \[0, 1\], got 1.5"),
    (["--lambda_rl=-0.1"], "lambda_rl must be >= 0, got -0.1"),
    (["--lambda_imp=-1.0"], "lambda_imp must be >= 0"),
    (["--weight_schedule=cosine"], "weight_schedule must be one of uniform, linear, exp, last, got 'cosine'"),
    (["--head_attn=global"], "head_attn must be one of none, trunk, latent, got 'global'"),
    (["--dtype=float8"], "dtype must be float32, bfloat16 or float16"),
    (["--reasoning_data=", "--reasoning_fraction=0.5"], "reasoning_fraction > 0 needs reasoning_data"),
    (["missing_preset.py"], "config file 'missing_preset.py' not found"),
    (["--fluency_data=/nonexistent/folder"], "/nonexistent/folder"),
    (["--n_steps_dist=poisson"], "n_steps_dist must be fixed, uniform or lognormal, got 'poisson'"),
    (["--n_steps_max=-1"], "n_steps_max must be >= 0, got -1"),
    (["--n_steps_dist=lognormal", "--n_steps_max=1"],
     r"n_steps_max must be 0 \(= 4·n_steps\) or >= n_steps=2, got 1"),
    (["--weight_skip=-1"], "weight_skip must be >= 0, got -1"),
    (["--weight_skip=2"], r"weight_skip must be < n_steps=2 \(steps 1..weight_skip get no weight"),
    (["--n_steps=0", "--weight_skip=1"], "weight_skip must be < n_steps=0"),
    (["--imp_fraction=0"], r"imp_fraction must be in \(0, 1\] \(0 would switch the improvement penalty off"),
    (["--imp_fraction=1.5"], r"imp_fraction must be in \(0, 1\]"),
])
def test_config_errors(tmp_path, args, message):
    with pytest.raises(ConfigError, match=message):
        train.main(TINY + [f"--out_dir={tmp_path}"] + args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without a CUDA GPU")
def test_a_missing_device_is_one_line():
    r = subprocess.run([sys.executable, "train.py", "config/train_cpu.py", "--device=cuda"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"train.py: device='cuda', but torch {torch.__version__} sees no such device here: set device=cpu, "
        "or leave device unset for the best available"], r.stderr


def test_batch_must_divide_over_ranks(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "3")   # checked before the process group would start
    with pytest.raises(ConfigError,
                       match="gradient_accumulation_steps=2 must be divisible by the number of processes"):
        train.main(TINY + [f"--out_dir={tmp_path}"])


def test_missing_optional_packages_and_offline_weights_are_one_line_errors(tmp_path):
    import importlib.util
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ConfigError, match=r"wandb_log=True needs wandb: pip install wandb"):
            train.load_config(TINY + ["--wandb_log=True"])
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    out = subprocess.run([sys.executable, "train.py", *TINY, "--init_from=gpt2", f"--out_dir={tmp_path}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("train.py: cannot load GPT-2 weights 'gpt2'") and "init_from=DIR" in line


def test_threads_key_sets_the_cpu_threads(tmp_path):
    before = torch.get_num_threads()
    try:
        train.main(TINY + [f"--out_dir={tmp_path}", "--max_iters=1", "--threads=1"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_config_error_is_one_line_on_the_command_line(tmp_path):
    out = subprocess.run([sys.executable, "train.py", "--n_steps=-1", f"--out_dir={tmp_path}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == ["train.py: n_steps must be >= 0, got -1"]
    assert not os.path.exists(tmp_path / "ckpt.pt")


def test_preset_file_and_override_order(tmp_path):
    preset = tmp_path / "preset.py"
    preset.write_text("n_steps = 3\nlambda_rl = 0.25\n")
    c, _ = train.load_config([str(preset), "--n_steps=5"])
    assert (c["n_steps"], c["lambda_rl"], c["n_layer"]) == (5, 0.25, train.DEFAULTS["n_layer"])
    for name in ("train_cpu.py", "train_gpt2_gsm8k.py"):
        train.load_config([os.path.join(ROOT, "config", name)])   # the shipped presets are valid


@pytest.mark.parametrize("args, message", [
    (["--rl_q=0"], "rl_q must be > 0"),
    (["--weight_gamma=0.0"], "weight_gamma must be > 0"),
    (["--min_lr=1e-2"], r"min_lr must be in \[0, learning_rate=0.003\], got 0.01"),
])
def test_config_values_that_would_crash_or_mislead_later(tmp_path, args, message):
    with pytest.raises(ConfigError, match=message):
        train.main(TINY + [f"--out_dir={tmp_path}", "--max_iters=2"] + args)


@pytest.mark.slow
def test_a_config_error_under_torchrun_is_one_line_from_rank_0(tmp_path):
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train.py", "config/train_cpu.py", f"--out_dir={tmp_path}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    lines = out.stderr.splitlines()
    mine = [line for line in lines if "must be divisible" in line]             # rank 1 exits quietly
    assert mine == ["train.py: gradient_accumulation_steps=1 must be divisible by the number of processes "
                    "(2)"]
    assert not any('train.py", line' in line for line in lines)                 # no traceback from train.py
