"""The curriculum over levels (README "Steps that earn their keep"): the level at each iteration, a stage
that draws only its levels and cuts the chains there (synthetic and JSONL), curriculum_iters and
curriculum_threshold switching where they say and resuming exactly, the training slice the threshold is
scored on, under DDP as on one process, and bad settings as one-line errors."""

import re

import pytest
import torch

import data
import schedules
import tasks
from conftest import run_script, run_torchrun
from losses import step_supervision, step_weights
from test_steps import BYTE, lookup_rows, write_jsonl
from test_train import TINY, records


def test_curriculum_level_steps_through_the_levels_at_the_switch_iterations():
    switches = schedules.curriculum_switches({"curriculum_iters": "3000,6000"})
    got = [schedules.curriculum_level(it, switches, [1, 2, 4]) for it in (0, 2999, 3000, 5999, 6000, 99999)]
    assert switches == [3000, 6000] and got == [1, 1, 2, 2, 4, 4]
    assert schedules.curriculum_switches({"curriculum_iters": ""}) == []


def test_a_curriculum_stage_draws_only_its_levels_and_cuts_the_chains_there():
    rd = data.ReasoningData("synthetic", BYTE, 48, seed=3, tasks="hopo:1,hopo:2,hopo:3",
                            step_targets="chain:3")
    assert rd.levels == [1, 2, 3]
    full = rd.get_batch(4, 16)
    assert all(torch.equal(getattr(full, f), getattr(rd.get_batch(4, 16, 0), f))
               for f in ("x", "y", "step_y", "level"))          # max_level = 0:
                                                                # the batch without a curriculum
    assert set(full.level[full.answer_mask].tolist()) == {1, 2, 3}
    for top in (1, 2):
        b = rd.get_batch(4, 16, top)
        spans = b.answer_mask & (b.y != BYTE.eot_token)
        assert set(b.level[spans].tolist()) <= set(range(1, top + 1)) and b.step_y.size(0) == top
        # steps past the stage's highest level keep its target: the chain f^1..f^top, then f^top
        Y, _ = step_supervision(b.y, 3, step_weights(3, "linear"), b.step_y, b.chain_len, b.level)
        for r, t in torch.nonzero(spans).tolist():                # one example a row at this width
            text = BYTE.decode(b.x[r][b.x[r] != BYTE.eot_token].tolist())
            prompt = text[:text.index("=") + 1]
            want = tasks.chain_answers("hopo", prompt, top)
            want += [want[-1]] * (3 - top)
            assert [BYTE.decode([int(Y[k, r, t])]) for k in range(3)] == want


def test_a_curriculum_with_the_papers_targets_draws_its_levels_on_final_answers():
    rd = data.ReasoningData("synthetic", BYTE, 48, seed=3, tasks="hopo:1,hopo:2,hopo:3")   # no chains
    b = rd.get_batch(0, 16, max_level=2)
    assert b.step_y is None and set(b.level[b.answer_mask].tolist()) == {1, 2}


def test_a_curriculum_over_jsonl_levels_keeps_rows_of_unknown_level(tmp_path):
    rows = lookup_rows(40)
    for i, row in enumerate(rows):
        row["level"] = 1 + i % 2 if i % 4 else None
        if row["level"] is None:
            del row["level"], row["step_answers"]                 # level unknown: drawn at every stage
    rd = data.ReasoningData(write_jsonl(tmp_path / "t.jsonl", rows[:32]), BYTE, 48,
                            eval_source=write_jsonl(tmp_path / "e.jsonl", rows[32:]), step_targets="chain")
    assert rd.levels == [1, 2]
    b = rd.get_batch(0, 64, max_level=1)
    levels = b.level[b.answer_mask].tolist()
    assert set(levels) == {0, 1}                                  # no level-2 row, and the unknown ones
    assert b.step_y.size(0) == 1                                  # the 2-step answers are cut at step 1


def test_curriculum_switches_where_it_says_and_resumes_exactly(tmp_path):
    extra = ["--reasoning_tasks=hopo:1,hopo:2", "--reasoning_fraction=1.0", "--curriculum_iters=3",
             "--step_targets=chain:2", "--lambda_imp=0", "--eval_interval=6"]
    full, half = str(tmp_path / "full"), str(tmp_path / "half")
    r = run_script("train.py", *TINY, *extra, f"--out_dir={full}", "--max_iters=6")
    assert r.returncode == 0, r.stderr
    run_script("train.py", *TINY, *extra, f"--out_dir={half}", "--max_iters=2")
    run_script("train.py", *TINY, *extra, f"--out_dir={half}", "--max_iters=6", "--init_from=resume")
    a, b = (records(d, "train") for d in (full, half))
    assert [r["curriculum_level"] for r in a] == [1, 1, 1, 2, 2, 2]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


@pytest.mark.parametrize("iters, message", [
    ("3000", r"curriculum_iters='3000' has 1 iterations; the reasoning data's levels \[1, 2, 3\] need 2"),
    ("6000,3000", "curriculum_iters must be ascending iterations >= 1"),
    ("0,3000", "curriculum_iters must be ascending iterations >= 1"),
    ("3000;6000", "curriculum_iters must be ascending iterations >= 1"),
])
def test_bad_curriculum_iters_are_one_line_errors(iters, message):
    r = run_script("train.py", *TINY, "--reasoning_tasks=hopo:1,hopo:2,hopo:3", f"--curriculum_iters={iters}",
                   "--max_iters=1")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert re.search(message, r.stderr), r.stderr


def test_training_slice_is_fixed_of_one_level_and_never_held_out():
    rd = data.ReasoningData("synthetic", BYTE, 48, seed=3, tasks="hopo:1,hopo:2,hopo:3",
                            step_targets="chain:3")
    batches = rd.slice_batches(2, 16, 40)
    again = rd.slice_batches(2, 16, 40)
    assert sum(b.x.size(0) for b in batches) == 40
    assert all(torch.equal(a.x, b.x) and torch.equal(a.y, b.y) for a, b in zip(batches, again))
    for b in batches:
        assert b.step_y is None                                   # scored on the final answer
        for row in b.x:
            text = BYTE.decode(row[row != BYTE.eot_token].tolist())
            prompt = text[:text.index("=") + 1]
            assert "f^2(" in prompt and not tasks.is_eval_prompt(tasks.split_key("hopo", prompt))


def easy_levels(tmp_path):
    """JSONL of two levels a tiny model learns in a few steps: level 1 always answers 'a', level 2 'b'."""
    rows = [{"prompt": f"k{i}=", "answer": "a", "level": 1} for i in range(40)] + \
           [{"prompt": f"m{i}=", "answer": "b", "level": 2} for i in range(40)]
    return [f"--reasoning_data={write_jsonl(tmp_path / 't.jsonl', rows)}",
            f"--reasoning_eval_data={write_jsonl(tmp_path / 'e.jsonl', rows[::10])}"]


def test_threshold_curriculum_switches_when_the_slice_is_learned_and_resumes_exactly(tmp_path):
    extra = [*easy_levels(tmp_path), "--reasoning_fraction=1.0", "--curriculum_threshold=0.9",
             "--curriculum_interval=2", "--learning_rate=1e-2", "--lr_decay_iters=20", "--eval_interval=20"]
    full, half = str(tmp_path / "full"), str(tmp_path / "half")
    r = run_script("train.py", *TINY, *extra, f"--out_dir={full}", "--max_iters=20")
    assert r.returncode == 0, r.stderr
    levels = [r["curriculum_level"] for r in records(full, "train")]
    switch = levels.index(2)                                      # the first iteration of level 2
    assert 0 < switch and switch % 2 == 0 and levels == [1] * switch + [2] * (20 - switch)
    assert f"curriculum: level 2 joins at iter {switch}" in r.stdout
    saved = torch.load(f"{full}/ckpt.pt", weights_only=False)["curriculum_switches"]
    assert saved == [switch]
    run_script("train.py", *TINY, *extra, f"--out_dir={half}", f"--max_iters={switch + 2}")
    run_script("train.py", *TINY, *extra, f"--out_dir={half}", "--max_iters=20", "--init_from=resume")
    assert [r["loss"] for r in records(full, "train")] == [r["loss"] for r in records(half, "train")]


@pytest.mark.parametrize("args, message", [
    (["--curriculum_iters=5", "--curriculum_threshold=0.5"], "both set when the next level joins: use one"),
    (["--curriculum_threshold=2"], r"curriculum_threshold must be in \[0, 1\], got 2"),
    (["--curriculum_threshold=0.5", "--reasoning_tasks=hopo:1"],
     r"curriculum_threshold steps through the reasoning data's levels, and the data has only level 1"),
])
def test_bad_threshold_curricula_are_one_line_errors(args, message):
    r = run_script("train.py", *TINY, *args, "--max_iters=1")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert re.search(message, r.stderr), r.stderr


@pytest.mark.slow
def test_threshold_curriculum_under_ddp_switches_where_one_process_does(tmp_path):
    args = [*TINY, *easy_levels(tmp_path), "--reasoning_fraction=1.0", "--curriculum_threshold=0.9",
            "--curriculum_interval=2", "--learning_rate=1e-2", "--lr_decay_iters=16", "--eval_interval=16",
            "--max_iters=16"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    r = run_script("train.py", *args, f"--out_dir={one}")
    assert r.returncode == 0, r.stderr
    ddp = run_torchrun(*args, out_dir=two)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = records(one, "train"), records(two, "train")
    assert [r["curriculum_level"] for r in a] == [r["curriculum_level"] for r in b]
    assert 2 in [r["curriculum_level"] for r in a]
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], abs=1e-5)
