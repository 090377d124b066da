"""Bad input on the newer features, tried as a user would: every class through the real CLI in a subprocess
(exit code, one line, no traceback, the key or file named), its other instances in-process. Refused: values
that are not finite or out of range, keys set where they do nothing, JSONL rows that train something other
than they say, data the supervision cannot train, a resume with nothing to train, an eval example longer
than the model's block. Accepted: a UTF-8 BOM, a separate eval file beside the synthetic suite (then the
eval set, never drawn for training). Warned once at the start: the latent steps' keys at n_steps=0.
evaluate.py --plot skips records of the wrong types, and says so."""

import json
import os

import numpy as np
import pytest

import data
import tasks
import train
from config.defaults import check_reasoning
from configurator import ConfigError
from records import PLOTS
from conftest import run_script
from test_train import TINY

BASE = [*TINY, "--max_iters=2", "--eval_interval=2"]
BYTE = data.get_tokenizer("byte")


def one_line_error(r, *words):
    """Whether the CLI stopped on one line of stderr naming every word, with no traceback (asserted here, for
    the message)."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr[-3000:]
    assert all(w in lines[0] for w in words), lines[0]
    return True


def warnings_of(r):
    return [line for line in r.stderr.splitlines() if line.startswith("train.py: warning: ")]


def write_jsonl(path, rows, prefix=b""):
    path.write_bytes(prefix + "".join(json.dumps(r) + "\n" for r in rows).encode())
    return str(path)


def hop_rows(n, level=2, steps=3, seed=0):
    """hopo rows of this level with the chain f^1..f^steps and, as the answer, f^level."""
    rng, rows = np.random.default_rng(seed), []
    for _ in range(n):
        prompt, answer = tasks.TASKS["hopo"][0](rng, level)
        rows.append({"prompt": prompt, "answer": answer, "level": level,
                     "step_answers": tasks.chain_answers("hopo", prompt, steps)})
    return rows


def refused_in_process(argv, *words):
    """Whether train.Run(argv) stops with ConfigError naming every word, before the model is built."""
    with pytest.raises(ConfigError) as e:
        train.Run(argv)
    assert all(w in str(e.value) for w in words), str(e.value)
    return True

# -----------------------------------------------------------------------------
# values: finite, in range; keys that do nothing where they are set


@pytest.mark.parametrize("args, words", [
    (["--answer_weight=1e999"], ["answer_weight must be a finite number, got inf"]),
    (["--weight_schedule=exp", "--weight_gamma=1e999"], ["weight_gamma must be a finite number"]),
    (["--imp_margin=-1e999"], ["imp_margin must be a finite number, got -inf"]),
    (["--learning_rate=1e999"], ["learning_rate must be a finite number"]),
    (["--dropout=1.5"], ["dropout must be in [0, 1), got 1.5"]),
    (["--beta2=1.0"], ["beta2 must be in [0, 1), got 1.0"]),
    (["--n_steps_max=9"], ["n_steps_max=9 does nothing without n_steps_dist='lognormal'"]),
    (["--weight_gamma=0.3"], ["weight_gamma=0.3 does nothing without weight_schedule='exp'"]),
    (["--imp_fraction=0.5"], ["imp_fraction=0.5 does nothing without sampled_supervision=True"]),
    (["--lambda_rl=0", "--rl_q=0.5"], ["rl_q=0.5 does nothing without lambda_rl > 0"]),
])
def test_values_and_keys_that_do_nothing_are_refused_by_name(tmp_path, args, words):
    path = write_jsonl(tmp_path / "rows.jsonl", hop_rows(40))
    args = [a.replace("FILE", path) for a in args]
    with pytest.raises(ConfigError) as e:
        train.load_config(BASE + args)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_a_bad_value_stops_every_entry_point_with_one_line(tmp_path):
    assert one_line_error(run_script("train.py", *BASE, "--answer_weight=1e999"),
                          "train.py: answer_weight must be a finite number, got inf")
    assert one_line_error(run_script("train.py", *BASE, "--dropout=1.5"), "dropout must be in [0, 1)")
    assert one_line_error(run_script("sample.py", "--temperature=1e999"),
                          "temperature must be a finite number")
    # bench.py shares train.py's rules on the keys it has (config/defaults.check(partial=True))
    assert one_line_error(run_script("bench/bench.py", "--n_steps=-1"),
                          "bench/bench.py: n_steps must be >= 0")
    assert one_line_error(run_script("bench/bench.py", "--sampled_supervision=True", "--imp_fraction=0"),
                          "imp_fraction must be in (0, 1]")
    assert one_line_error(run_script("bench/bench.py", "--vocab=many"),
                          "vocab must be byte, gpt2, char or a size")
    preset = tmp_path / "preset.py"
    preset.write_text("n_steps = (\n")
    assert one_line_error(run_script("train.py", str(preset)), f"config file {str(preset)!r}, line 1:")

# -----------------------------------------------------------------------------
# JSONL rows: their fields' ranges and types, an answer the chain does not give, a BOM, a folder


@pytest.mark.parametrize("row, words", [
    ({"level": 10**30}, ['"level" must be an integer in 1..1000, got 1000000000000000000000000000000']),
    ({"level": 2.0}, ['"level" must be an integer in 1..1000, got 2.0']),
    ({"step_answers": ["q"] * 1001}, ['"step_answers" must be a list of 1..1000 strings']),
    ({"answer": ""}, ['"answer" is empty']),
    ({"answer": "w"}, ['"answer" \'w\' is not step_answers[1] ', "the answer of level 2"]),
    ({"level": 5}, ['"answer"', "is not step_answers[2] ", "the answer of level 5"]),   # past S: a_S
])
def test_bad_rows_are_refused_naming_the_file_and_line(tmp_path, row, words):
    rows = hop_rows(40)
    rows[6] = {**rows[6], **row}
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    assert refused_in_process([*BASE, f"--reasoning_data={path}"], f"{path}:7: ", *words)


def test_a_row_refused_through_the_cli_a_folder_named_and_a_bom_accepted(tmp_path):
    rows = hop_rows(40)
    path = write_jsonl(tmp_path / "rows.jsonl", rows[:3] + [{**rows[3], "level": 10**30}] + rows[4:])
    assert one_line_error(run_script("train.py", *BASE, f"--reasoning_data={path}"),
                          f"{path}:4: \"level\" must be")
    assert one_line_error(run_script("train.py", *BASE, f"--reasoning_data={tmp_path}"),
                          f"reasoning data file {str(tmp_path)!r} is a folder, not a file")
    plain = write_jsonl(tmp_path / "plain.jsonl", rows)
    bom = write_jsonl(tmp_path / "bom.jsonl", rows, prefix="\ufeff".encode())
    assert tasks.read_jsonl_examples(bom) == tasks.read_jsonl_examples(plain)
    assert tasks.read_eval_jsonl(bom)[0] == (rows[0]["prompt"], rows[0]["answer"], 2)

# -----------------------------------------------------------------------------
# the data against the keys that supervise it


PLAIN = [{"prompt": f"{i}=", "answer": "a"} for i in range(40)]   # no level, no chain


@pytest.mark.parametrize("args, rows, words", [
    (["--step_targets=chain"], hop_rows(40, level=5, steps=5),
     ["rows.jsonl:1: the answer (level 5, chain of 5) is its chain's step 5, beyond the largest K this run "
      "draws (2): it is never a target"]),
    (["--step_targets=chain", "--reasoning_tasks=hopo:1,hopo:3"], None,
     ["hopo:3: the answer (level 3, chain of 3) is its chain's step 3"]),
    (["--step_targets=chain:1", "--reasoning_tasks=hopo:1,hopo:2"], None,
     ["hopo:2: the answer (level 2) is in no step of the chain step_targets='chain:1' trains (f^1..f^1)"]),
    (["--step_targets=chain:2"], hop_rows(40, level=3, steps=4),
     ["rows.jsonl:1: the answer (level 3) is in no step of the chain step_targets='chain:2' trains"]),
    (["--step_targets=chain", "--reasoning_tasks=add:2,sort:4"], None,
     ["step_targets='chain', but no reasoning example has a chain"]),
    (["--step_targets=chain"], PLAIN, ["no reasoning example has a chain"]),
    (["--level_steps=at"], PLAIN, ["level_steps='at', but no reasoning row has a level"]),
    (["--curriculum_iters=5"], PLAIN, ["curriculum_iters steps through the reasoning data's levels, and the "
                                       'data has no levels: no row has a "level"']),
])
def test_data_the_supervision_cannot_train_is_refused(tmp_path, args, rows, words):
    data_args = [f"--reasoning_data={write_jsonl(tmp_path / 'rows.jsonl', rows)}"] if rows else []
    assert refused_in_process([*BASE, "--lambda_imp=0", *data_args, *args], *words)


def test_chains_past_k_are_legal_and_the_largest_drawn_k_decides():
    c, _ = train.load_config([*BASE, "--lambda_imp=0", "--step_targets=chain"])
    c = {**c, "reasoning_data": "a.jsonl"}
    rows = [("a.jsonl:1", 2, 5), ("a.jsonl:2", 1, 1)]          # a chain of 5 on a level-2 row: fine at K = 2
    assert check_reasoning(c, rows, max_k=2) is None
    with pytest.raises(ConfigError, match=r"a.jsonl:3: the answer \(level 3, chain of 4\) is its chain"):
        check_reasoning(c, rows + [("a.jsonl:3", 3, 4)], max_k=2)
    assert check_reasoning(c, rows + [("a.jsonl:3", 3, 4), ("a.jsonl:4", 5, 2)], max_k=3) is None  # a_2
    c_at = {**c, "step_targets": "final", "level_steps": "at", "reasoning_data": "synthetic"}
    with pytest.raises(ConfigError, match="level_steps='at': levels 4, 5 are above the largest K this run "
                                          r"draws \(3\), so no step reads them and they are never trained"):
        check_reasoning(c_at, [("hopo:1", 1, 0), ("hopo:4", 4, 0), ("hopo:5", 5, 0)], max_k=3)
    assert check_reasoning(c_at, [("hopo:4", 4, 0)], max_k=4) is None


def test_a_latent_key_at_k0_is_a_warning_and_a_separate_eval_file_is_the_eval_set(tmp_path):
    """Through the CLI, one run: the latent steps' keys at n_steps=0 warn once; a separate eval file beside
    the synthetic suite is what the run evaluates (and a missing one is refused)."""
    assert one_line_error(run_script("train.py", *BASE, f"--reasoning_eval_data={tmp_path / 'none.jsonl'}"),
                          f"reasoning data file {str(tmp_path / 'none.jsonl')!r} not found")
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": r["prompt"], "answer": r["answer"]}
                                                   for r in hop_rows(9)])
    r = run_script("train.py", *BASE, "--reasoning_tasks=hopo:1,hopo:2,hopo:3", "--n_steps=0",
                   "--step_targets=chain:3", "--lambda_imp=0", f"--reasoning_eval_data={evals}",
                   "--reasoning_fraction=1.0", f"--out_dir={tmp_path}/out")
    assert r.returncode == 0, r.stderr[-3000:]
    assert warnings_of(r) == ["train.py: warning: n_steps=0 is the plain GPT: n_latent=16, "
                              "step_targets='chain:3' act on the latent steps and have no effect"]
    assert "EM jsonl" in r.stdout and "EM hopo" not in r.stdout
    c, _ = train.load_config([*BASE, "--n_steps=0", "--lambda_imp=0"])
    assert train.latent_keys_warning(c) == ["n_steps=0 is the plain GPT: n_latent=16 act on the latent steps "
                                            "and have no effect"]
    assert train.latent_keys_warning({**c, "n_latent": 0}) == []


def test_a_separate_eval_files_prompts_are_never_drawn_for_training(tmp_path):
    """sort:1 has ten prompts: an eval file holding five of them leaves training the rest, drawn alone."""
    train_side = sorted({tasks.draw(("sort", 1), np.random.default_rng(i), False) for i in range(200)})
    held = train_side[:len(train_side) // 2]
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": p, "answer": a} for p, a in held])
    rd = data.ReasoningData("synthetic", BYTE, 48, tasks="sort:1", eval_source=evals)
    assert rd.eval_examples(100) == held and rd.eval_tags(3) == ["jsonl"] * 3
    drawn = {BYTE.decode(row.tolist()) for i in range(20) for row in rd.get_batch(i, 4).x}
    texts = "".join(drawn)
    assert all(p not in texts for p, _ in held) and any(p in texts for p, _ in train_side[len(held):])

# -----------------------------------------------------------------------------
# a trained run: resume, sample.py --eval and evaluate.py --plot on it


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    r = run_script("train.py", *BASE, f"--out_dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_a_resume_with_nothing_to_train_is_refused(run_dir):
    for n in (1, 2):
        r = run_script("train.py", "--init_from=resume", f"--out_dir={run_dir}", f"--max_iters={n}")
        assert one_line_error(r, f"max_iters={n}, but {run_dir}/ckpt.pt is at iter 2 already: nothing to "
                              "train")


def test_sample_eval_refuses_an_example_longer_than_the_block_and_takes_a_bom(run_dir, tmp_path):
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "x" * 200, "answer": "a"}])
    assert one_line_error(run_script("sample.py", f"--out_dir={run_dir}", "--device=cpu", "--eval=True",
                              f"--eval_data={long}"), "an example of 201 tokens needs block_size >= 202, got "
                   "block_size=48")
    bom = write_jsonl(tmp_path / "bom.jsonl", [{"prompt": "ab=", "answer": "c"}] * 3,
                      prefix="\ufeff".encode())
    r = run_script("sample.py", f"--out_dir={run_dir}", "--device=cpu", "--eval=True", f"--eval_data={bom}")
    assert r.returncode == 0 and "exact match on 3 eval examples" in r.stdout, r.stderr[-3000:]


def test_plot_skips_records_of_the_wrong_types_and_says_so(run_dir, tmp_path):
    pytest.importorskip("matplotlib")
    good = (run_dir / "metrics.jsonl").read_bytes()
    bad = [{"type": "eval", "iter": "4", "fluency_loss": [1.0]}, {"type": "eval", "iter": None},
           {"type": "eval", "iter": 5, "fluency_loss": 1.0},
           {"type": "eval", "iter": 6, "task_exact_match": [1]},
           {"type": "eval", "iter": 7, "answer_exact_match": ["0.5"]},
           {"type": "train", "iter": 8, "fluency": 3}]
    lines = b"".join(json.dumps(r).encode() + b"\n" for r in bad) + b'{"iter": 9, "x": "caf\xe9"}\n'
    (tmp_path / "metrics.jsonl").write_bytes(good + lines)
    r = run_script("evaluate.py", "--plot", f"--out_dir={tmp_path}")
    n = good.count(b"\n")
    assert r.returncode == 0 and r.stderr.strip() == (
        f"evaluate.py: skipped line(s) {', '.join(str(n + i) for i in range(1, 6))} ... of "
        f"{tmp_path}/metrics.jsonl: not train.py's records"), r.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == sorted(["metrics.jsonl", *PLOTS.values()])
    os.remove(tmp_path / "metrics.jsonl")
    os.mkdir(tmp_path / "metrics.jsonl")
    assert one_line_error(run_script("evaluate.py", "--plot", f"--out_dir={tmp_path}"),
                          f"metrics file '{tmp_path}/metrics.jsonl' is a folder, not a file")


def test_a_non_finite_loss_names_no_checkpoint_before_there_is_one(tmp_path):
    """(The progress bar shares stderr: the error is its last line.)"""
    r = run_script("train.py", *BASE, "--learning_rate=1e30", "--grad_clip=0", "--max_iters=6",
                   "--eval_interval=6", f"--out_dir={tmp_path}")
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "non-finite loss at iter" in last and "no checkpoint written yet; lower learning_rate" in last
