"""experiments/compose.py: every arm a legal train.py run, the report against plain recomputations from the
saved checkpoints and prompts, the validation draw apart from the held-out set, reuse (run folders kept
without their weights included), and bad input."""

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import compose
import train
from ablation import run_args, run_state
from config.defaults import check_reasoning, training_rows
from sample import load_checkpoint
from schedules import max_n_steps
from tasks import chain_answers, eval_set, is_eval_prompt, parse_tasks, root_shortcuts, split_key
from test_ablation import table_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "compose.py")
PRESET = os.path.join(ROOT, "config", "train_steps.py")
# the steps preset, small and at a high learning rate: 150 iterations reach exact matches between 0 and 1
TINY_PRESET = f"""
exec(open({PRESET!r}).read())
n_layer = 1; n_embd = 32; n_latent = 16; batch_size = 4
learning_rate = 3e-2; min_lr = 1e-3; warmup_iters = 1; eval_examples = 14; log_interval = 10
"""
N_EVAL = 10   # held-out examples per level, validation examples per level


def compose_cmd(tmp_path, *args):
    preset = tmp_path / "tiny.py"
    preset.write_text(TINY_PRESET)
    return [sys.executable, SCRIPT, f"--preset={preset}", f"--eval_per_level={N_EVAL}",
            f"--val_per_level={N_EVAL}", "--out=out", *args]


def run(cmd, tmp_path):
    subprocess.run(cmd, check=True, cwd=tmp_path, capture_output=True,
                   env=dict(os.environ, OMP_NUM_THREADS="1"))


def first_numbers(row):
    """The means of a report row's cells ('0.300 ± 0.000 (min 0.300)' -> 0.3)."""
    return [float(cell.split()[0]) for cell in row]


def body(report):
    """A report without its line of command and cost: what the runs say."""
    return [line for line in report.splitlines() if not line.startswith("`python ")]


@torch.no_grad()
def plain_exact_match(model, tok, examples, n_steps):
    """Exact match of (prompt, answer) examples by a plain loop: each alone after [eot], one forward of
    n_steps steps, every answer token and the closing eot the argmax of the last step's logits."""
    hits = []
    for prompt, answer in examples:
        p, a = tok.encode(prompt), tok.encode(answer)
        seq = [tok.eot_token, *p, *a, tok.eot_token]
        logits = model(torch.tensor([seq[:-1]]), n_steps=n_steps)[0][-1, 0]     # (T, V): the last step's
        answer_positions = range(len(p), len(p) + len(a) + 1)                  # they predict a, then eot
        hits.append(all(logits[t].argmax().item() == seq[t + 1] for t in answer_positions))
    return float(np.mean(hits))


def prompts_of(batches, tok):
    """The prompts of one-example-per-row batches: the tokens after the leading eot, up to the answer."""
    prompts = []
    for b in batches:
        for x, m in zip(b.x, b.answer_mask):
            first = int(m.nonzero()[0])          # the last prompt token predicts the first answer token
            prompts.append(tok.decode(x[1:first + 1].tolist()))
    return prompts


@pytest.mark.parametrize("task", list(compose.TASKS))
def test_every_arm_is_a_legal_run_of_the_preset(task):
    every = ",".join([*compose.GPTS, *compose.ARMS])
    c, arms = compose.parse_args([f"--task={task}", f"--preset={PRESET}", f"--variants={every}"])
    stages = compose.curriculum_stages(c["cfg"], 32000)
    assert stages == c["cfg"]["curriculum_iters"] == "6000,12000"   # the preset's curriculum at its budget
    for name, (_, overrides) in arms.items():
        cfg = train.load_config([PRESET, *compose.arm_args(task, overrides, stages)])[0]
        check_reasoning(cfg, training_rows(train.load_data(cfg)[2]), max_n_steps(cfg))
        assert (cfg["reasoning_tasks"], cfg["eval_tasks"]) == (f"{task}:1-3", f"{task}:1-7")
        assert cfg["n_steps"] == (0 if name in compose.GPTS else 3)
        # the preset trains random K; every arm states its own K on the fixed-K base (FIXED_BASE)
        assert cfg["n_steps_dist"] == ("uniform" if name.endswith("_rk") else "fixed")
        if name == "steps_rk":
            assert cfg["beyond_chain"] == compose.TASKS[task][2]
        if name.startswith("progressive"):
            assert (cfg["level_steps"], cfg["progressive_alpha"]) == ("from", 0.5)


def test_every_committed_run_is_its_arm_today():
    """results/compose/runs/ (records without weights) rebuild the reports only while each run's saved config
    is what its arm asks for now: a preset changed under them would stop the report (ablation.run_state)."""
    kept = os.path.join(ROOT, "results", "compose", "runs")
    names = sorted(os.listdir(kept))
    assert len(names) >= 19   # the runs committed by 2026-12-07: more come, none go
    for name in names:
        task, arm, seed = re.fullmatch(r"(\w+?)-(\w+)-s(\d+)", name).groups()
        c, arms = compose.parse_args([f"--task={task}", f"--preset={PRESET}", f"--variants={arm}"])
        args = run_args(os.path.join(kept, name), PRESET, compose.arm_args(task, arms[arm][1], c["stages"]),
                        int(seed), c["max_iters"])
        assert run_state(os.path.join(kept, name), args) == "done", name


@pytest.mark.slow
def test_hopo_report_is_the_checkpoints_own_reading(tmp_path):
    """The real command on a tiny preset: every arm and level in the tables, K' = L per level (and step 7 of
    the hop table on level 7) and the validation ranking recomputed from the checkpoints by a plain loop, the
    validation draw apart from the held-out prompts, a second invocation that retrains and re-evaluates
    nothing, its plots named after its report, and a third from the run folders copied without weights."""
    cmd = compose_cmd(tmp_path, "--task=hopo", "--iters=150", "--variants=gpt,level_at,steps_rk")
    run(cmd, tmp_path)
    out = tmp_path / "out"
    report = (out / "hopo.md").read_text()
    for title in ("## EM at K' = L", "## Validation ranking", "## Iterations until"):
        assert set(table_rows(report, title)) == {"gpt", "level_at", "steps_rk"}
    for title in ("## EM at step 1", "## EM at K' = 21", "## EM at adaptive exit", "## Mean steps",
                  "## Necessity"):
        assert set(table_rows(report, title)) == {"level_at", "steps_rk"}
    levels = " | ".join(f"hopo:{L}" for L in range(1, 8))
    assert report.count(f"| variant | {levels} |") == 7            # 6 held-out tables and the ranking
    assert (out / "hopo_vs_test_k.png").exists() == (out / "hopo_over_training.png").exists()
    at_l, held_out = table_rows(report, "## EM at K' = L"), eval_set(parse_tasks("hopo:1-7"), 7 * N_EVAL)
    for name in ("gpt", "level_at"):                                    # held_out[i] has level i % 7 + 1
        model, cfg, tok = load_checkpoint(str(out / "runs" / f"hopo-{name}-s0"), "cpu")
        plain = [plain_exact_match(model, tok, held_out[L - 1::7], L * (name != "gpt")) for L in range(1, 8)]
        assert first_numbers(at_l[name]) == pytest.approx(plain, abs=5e-4)
    assert 0 < sum(first_numbers(at_l["level_at"])) < 7                 # a test that can fail: not all 0 or 1
    hops = table_rows(report, "## Does step k take hop k?")
    assert set(hops) == {"level_at", "steps_rk"} and all(len(row) == 7 for row in hops.values())
    for name, row in hops.items():        # step 7 against f^7(x), the answer: K' = L on hopo:7, another path
        assert first_numbers(row)[-1] == pytest.approx(first_numbers(at_l[name])[-1], abs=5e-4)
    # validation: held-out side (never trained), no prompt the report reads; the ranking's cells are its EM
    batches, tags = compose.validation(cfg, tok, "hopo:1-7", N_EVAL, N_EVAL)
    every = prompts_of(batches, tok)
    assert len(every) == 7 * N_EVAL and tags == [f"hopo:{i % 7 + 1}" for i in range(7 * N_EVAL)]
    assert not set(every) & {p for p, _ in held_out}
    assert all(is_eval_prompt(split_key("hopo", p)) for p in every)
    ranked = first_numbers(table_rows(report, "## Validation ranking")["level_at"])
    for L in range(1, 8):
        examples = [(p, chain_answers("hopo", p, L)[-1]) for p in every[L - 1::7]]
        assert f"f^{L}(" in examples[0][0]
        assert ranked[L - 1] == pytest.approx(plain_exact_match(model, tok, examples, L), abs=5e-4)
    # a second invocation retrains nothing and evaluates nothing again
    files = [out / "runs" / f"hopo-{n}-s0" / f for n in ("gpt", "level_at")
             for f in ("ckpt.pt", "compose_eval.json", compose.HOPS_FILE)]
    before = [os.stat(f).st_mtime_ns for f in files]
    run(cmd + ["--report=again.md"], tmp_path)
    assert [os.stat(f).st_mtime_ns for f in files] == before
    assert "(3 of 3 runs trained by it" in report                       # the first invocation's cost line
    assert "(0 of 3 runs trained by it" in (out / "again.md").read_text()
    assert (out / "again_vs_test_k.png").exists() == (out / "hopo_vs_test_k.png").exists()
    # copied elsewhere without their weights (as results/compose/runs/ is committed), the runs give the same
    # report and train nothing
    shutil.copytree(out / "runs", tmp_path / "kept" / "runs",
                    ignore=shutil.ignore_patterns("*.pt*", "log.txt"))
    kept = [arg.replace("--out=out", "--out=kept") for arg in cmd]
    run(kept, tmp_path)
    report = (tmp_path / "kept" / "hopo.md").read_text()
    assert body(report) == body((out / "again.md").read_text()) and "(0 of 3 runs trained by it" in report
    assert not list((tmp_path / "kept").glob("runs/*/*.pt"))
    r = subprocess.run(kept + ["--eval_per_level=11"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "without its weights (ckpt.pt)" in r.stderr



@pytest.mark.slow
def test_root_reads_the_shortcuts_on_the_held_out_prompts(tmp_path):
    """--task=root: every arm gets root's overrides, and the shortcut rows are tasks.root_shortcuts' exact
    match on the held-out prompts, recomputed plainly."""
    run(compose_cmd(tmp_path, "--task=root", "--iters=6", "--variants=gpt"), tmp_path)
    report = (tmp_path / "out" / "root.md").read_text()
    rows = table_rows(report, "## EM at K' = L")
    held_out = eval_set(parse_tasks("root:1-7"), 7 * N_EVAL)
    for name in ("any root", "tallest tree"):
        plain = [np.mean([root_shortcuts(p)[name] == a for p, a in held_out[L - 1::7]]) for L in range(1, 8)]
        assert rows[f"{name} (shortcut)"] == [f"{v:.3f}" for v in plain]
    saved = torch.load(tmp_path / "out" / "runs" / "root-gpt-s0" / "ckpt.pt", weights_only=False)["config"]
    assert (saved["reasoning_tasks"], saved["eval_tasks"]) == ("root:1-3", "root:1-7")
    sizing = train.load_config([PRESET, os.path.join(ROOT, "config", "root.py")])[0]   # config/root.py's keys
    assert [saved[k] for k in ("block_size", "answer_weight", "n_head")] == [56, 20.0, 4] == \
        [sizing[k] for k in ("block_size", "answer_weight", "n_head")]


@pytest.mark.parametrize("args, says", [
    (["--task=hop"], "task must be one of hopo, root"),
    (["--variants=gpt,level_att"], "['level_att']"),
    (["--variants=gpt,gpt"], "names a variant twice"),
    (["--seeds=0,x"], "seeds must be"),
    (["--seeds=1,1"], "seeds must be"),
    (["--val_per_level=0"], "val_per_level"),
    (["--iters=5"], "too few for the curriculum"),
])
def test_bad_input_is_one_line(args, says):
    r = subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 1 and r.stdout == "" and r.stderr.count("\n") == 1 and says in r.stderr, r.stderr
