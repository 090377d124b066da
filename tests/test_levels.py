"""Steps that can run until done: the fixed-point family root/rootr (its forests, chains, shortcuts and
held-out split), task ranges, level-aware random K (no loss on an answer above the drawn K), and the reading
per level (step 1, K' = L, K' = 21, adaptive exit) against greedy generation, in train.py's eval and
sample.py --eval."""

import json
import os

import numpy as np
import pytest
import torch

import data
import tasks
import train
from conftest import ROOT, run_script
from evaluate import chain_batches, hop_reading, level_reading, read_steps
from model import GPT, GPTConfig
from sample import example_batches
from schedules import micro_batches, readable_at
from test_train import TINY

BYTE = data.get_tokenizer("byte")


def forest(prompt):
    """(parent map, query) of a root prompt."""
    pairs, query = prompt.split(";")
    return dict((p[0], p[1]) for p in pairs.split(",")), query[0]


def depth(parent, x):
    return 0 if parent[x] == x else 1 + depth(parent, parent[x])

# -----------------------------------------------------------------------------
# the fixed-point family


@pytest.mark.parametrize("family", ["root", "rootr"])
def test_every_forest_has_three_roots_and_two_trees_reaching_every_depth(family):
    rng = np.random.default_rng(0)
    for level in range(1, tasks.ROOT_DEPTH + 1):
        for _ in range(50):
            prompt, answer = tasks.TASKS[family][0](rng, level)
            parent, x = forest(prompt)
            roots = [k for k, v in parent.items() if k == v]
            deepest = {parent_root(parent, k) for k in parent if depth(parent, k) == tasks.ROOT_DEPTH}
            tall = [r for r in roots if r in deepest]
            assert len(roots) == 3 and len(tall) == 2 and len(parent) == len(tasks.ROOT_SYMBOLS)
            assert depth(parent, x) == level and parent_root(parent, x) == answer
            assert not any(ch.isdigit() for ch in prompt)                    # the prompt does not state L
            keys = [p[0] for p in prompt.split(";")[0].split(",")]
            assert (keys == sorted(keys)) == (family == "root") or len(keys) == len(set(keys))


def parent_root(parent, x):
    return x if parent[x] == x else parent_root(parent, parent[x])


def test_the_chain_climbs_to_the_root_and_stays_there():
    rng = np.random.default_rng(1)
    for level in range(1, tasks.ROOT_DEPTH + 1):
        prompt, answer = tasks.TASKS["root"][0](rng, level)
        parent, x = forest(prompt)
        chain = tasks.chain_answers("root", prompt, 12)
        climbed = []
        for _ in range(12):
            x = parent[x]
            climbed.append(x)
        assert chain == climbed and chain[level - 1:] == [answer] * (13 - level)
        assert answer not in chain[:level - 1]                               # no earlier step is the root


def test_the_shortcuts_stay_at_a_third_and_a_half_at_every_depth():
    """'a root' and 'the root of the tallest tree' (tasks.root_shortcuts) against the answer."""
    rng = np.random.default_rng(2)
    for level in (1, 4, 7):
        drawn = [tasks.TASKS["rootr"][0](rng, level) for _ in range(3000)]
        for name, expected in (("any root", 1 / 3), ("tallest tree", 1 / 2)):
            em = np.mean([tasks.root_shortcuts(p)[name] == a for p, a in drawn])
            assert abs(em - expected) < 0.04, (level, name, em)


def test_a_held_out_forest_is_held_out_under_every_query_level_and_key_order():
    prompt, _ = tasks.TASKS["rootr"][0](np.random.default_rng(3), 2)
    parent, x = forest(prompt)
    other = ",".join(k + parent[k] for k in reversed(sorted(parent))) + ";" + parent[x] + "="
    assert tasks.split_key("rootr", prompt) == tasks.split_key("rootr", other)
    rd = data.ReasoningData("synthetic", BYTE, 56, seed=0, tasks="root:1-3", eval_tasks="root:1-7",
                            step_targets="chain:3")
    eval_keys = {tasks.split_key("root", p) for p, _ in rd.eval_examples(2100)}
    trained = {tasks.split_key("root", BYTE.decode(row[1:].tolist()).split("=")[0] + "=")
               for i in range(30) for row in rd.get_batch(i, 16).x}
    assert len(trained) > 400 and len(eval_keys) == 300 and not trained & eval_keys   # one forest, 7 levels


def test_task_ranges_and_jsonl_levels_tag_the_eval_set(tmp_path):
    assert tasks.parse_tasks("hopo:1-3,add:2") == [("hopo", 1), ("hopo", 2), ("hopo", 3), ("add", 2)]
    for bad in ("hopo:3-1", "hopo:1-9", "hopo:1-", "root:0-2"):
        with pytest.raises(ValueError, match="needs a level 1..7 or a range of them"):
            tasks.parse_tasks(bad, "eval_tasks")
    assert [tasks.tag_level(t) for t in ("hopo:3", "root:7", "jsonl:2", "jsonl", "add:2")] == [3, 7, 2, 0, 0]
    rows = [{"prompt": f"{i}=", "answer": "a", "level": 1 + i % 2} for i in range(30)]
    (tmp_path / "e.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rd = data.ReasoningData("synthetic", BYTE, 56, tasks="root:1", eval_source=str(tmp_path / "e.jsonl"))
    assert rd.eval_tags(4) == ["jsonl:1", "jsonl:2", "jsonl:1", "jsonl:2"]

# -----------------------------------------------------------------------------
# level-aware random K


def test_no_loss_on_an_answer_above_the_drawn_k_and_nothing_else_changes():
    rd = data.ReasoningData("synthetic", BYTE, 56, seed=4, tasks="root:1-3")
    b = rd.get_batch(0, 8)
    for K in (1, 2, 3):
        kept = readable_at(b, K)
        for r in range(b.y.size(0)):                 # plain: every position, one at a time
            for t in range(b.y.size(1)):
                above = int(b.level[r, t]) > K
                assert int(kept.y[r, t]) == (-1 if above else int(b.y[r, t]))
                assert bool(kept.answer_mask[r, t]) == (bool(b.answer_mask[r, t]) and not above)
        assert torch.equal(kept.x, b.x) and (K < 3) == bool((kept.y != b.y).any())
    c = {"level_steps": "at", "routing": "step", "batch_size": 8, "gradient_accumulation_steps": 1}
    (_, got), = micro_batches(0, c, (None, rd), kind="reasoning", n_steps=2)
    assert torch.equal(got.y, readable_at(rd.get_batch(0, 8), 2).y)
    (_, same), = micro_batches(0, {**c, "level_steps": "all"}, (None, rd), kind="reasoning", n_steps=2)
    assert torch.equal(same.y, b.y)

# -----------------------------------------------------------------------------
# the reading per level


def teacher_forced_generation(model, examples, K, threshold):
    """Per example, through GPT.generate one token at a time from the gold prefix: (exact at K steps, exact
    at adaptive exit, the mean steps adaptive exit ran)."""
    out = []
    for prompt, answer in examples:
        fixed = exit_ok = True
        steps = []
        for j in range(len(answer)):
            x = torch.tensor([prompt + answer[:j]])
            fixed &= int(model.generate(x, 1, temperature=0, n_steps=K)[0, -1]) == answer[j]
            y, info = model.generate(x, 1, temperature=0, n_steps=21, exit_threshold=threshold,
                                     return_steps=True)
            exit_ok &= int(y[0, -1]) == answer[j]
            steps.append(int(info["used"][0, 0]))
        out.append((fixed, exit_ok, sum(steps) / len(steps)))
    return out


def test_the_reading_per_level_equals_greedy_generation_from_the_gold_prefix():
    """The answers are the model's own greedy ones at K' = L (so that exact match is not all 0 on a random
    model): exact at K' = L is then 1 everywhere, and elsewhere whatever generation says."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=257, block_size=56, n_layer=1, n_head=2, n_embd=32, n_steps=3,
                          n_latent=16, head_attn="trunk")).eval()
    with torch.no_grad():                            # a head that moves the logits: the exit step varies
        model.latent_head.w_out.weight.normal_(0, 1.0)
    rd = data.ReasoningData("synthetic", BYTE, 56, tasks="root:1-3", eval_tasks="root:1-4")
    n, tags = 16, rd.eval_tags(16)
    prompts = [torch.tensor([[BYTE.eot_token] + BYTE.encode(p)]) for p, _ in rd.eval_examples(n)]
    answer = lambda x, L: model.generate(x, 2, temperature=0, n_steps=L)[0, -2:].tolist()   # + eot, or not
    examples = [(x[0].tolist(), answer(x, tasks.tag_level(t))) for x, t in zip(prompts, tags)]
    batches = example_batches(examples, BYTE.eot_token, 5)
    exact, exit_exact, exit_steps = read_steps(model, batches, 21, n, threshold=0.01)
    for i, (ex, tag) in enumerate(zip(examples, tags)):
        L = tasks.tag_level(tag)
        (fixed, exit_ok, steps), = teacher_forced_generation(model, [ex], L, 0.01)
        assert fixed and bool(exact[i, L - 1]) and bool(exit_exact[i]) == exit_ok
        assert abs(float(exit_steps[i]) - steps) < 1e-6
    assert 0 < exit_exact.mean() < 1 and 0 < exact[:, 0].mean() < 1
    reading = level_reading(model, batches, tags, threshold=0.01)
    levels = np.array([tasks.tag_level(t) for t in tags])
    for L, r in reading.items():
        rows = levels == L
        assert r["n"] == rows.sum() and r["long"] == 21
        assert r["at_L"] == pytest.approx(float(exact[rows, L - 1].mean()))
        assert r["at_long"] == pytest.approx(float(exact[rows, 20].mean()))
        assert r["exit_steps"] == pytest.approx(float(exit_steps[rows].mean()))
    assert 1 < np.mean([r["exit_steps"] for r in reading.values()]) < 21
    assert [r["at_L"] for r in reading.values()] == [1.0] * 4


def test_chain_batches_hold_each_examples_chain_on_its_answer_tokens():
    """step_y[k - 1] is f^k(x) on the answer's tokens and eot on the closing one, for k = 1..L (iter: answers
    of several tokens)."""
    rd = data.ReasoningData("synthetic", BYTE, 80, tasks="root:1-4,iter:1-3,hopo:2")
    n, tags = 18, rd.eval_tags(18)
    examples = rd.eval_examples(n)
    for b in chain_batches(BYTE, 80, examples, tags, 5):
        for r in range(b.x.size(0)):
            i = int(b.answer_id[r][b.answer_mask[r]][0])
            (family, L), (prompt, answer) = tasks.parse_tasks(tags[i])[0], examples[i]
            assert len(b.step_y) >= L
            for k, f_k in enumerate(tasks.chain_answers(family, prompt, L)):
                assert b.step_y[k, r][b.answer_mask[r]].tolist() == BYTE.encode(f_k) + [BYTE.eot_token]
            assert f_k == answer                                    # f^L(x): the answer


def test_hop_reading_is_each_steps_teacher_forced_generation():
    """Step k's targets are the model's own greedy tokens at K' = k from the gold prefix, except where one is
    changed (on the answer token, or on the closing eot, by (i + k) % 3): the reading is the share left."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=257, block_size=56, n_layer=1, n_head=2, n_embd=32, n_steps=3,
                          n_latent=16, head_attn="trunk")).eval()
    with torch.no_grad():
        model.latent_head.w_out.weight.normal_(0, 1.0)
    rd = data.ReasoningData("synthetic", BYTE, 56, tasks="root:1-4")
    n, tags = 16, rd.eval_tags(16)
    batches = chain_batches(BYTE, 56, rd.eval_examples(n), tags, 5)
    keep = {}
    for b in batches:
        for r, t in zip(*torch.nonzero(b.answer_mask, as_tuple=True)):
            i, x = int(b.answer_id[r, t]), b.x[r:r + 1, :t + 1]
            for k in range(len(b.step_y)):
                own = int(model.generate(x, 1, temperature=0, n_steps=k + 1)[0, -1])
                change = (i + k) % 3 == int(b.y[r, t] == BYTE.eot_token)
                b.step_y[k, r, t] = (own + 1) % 257 if change else own
                keep[i, k] = (i + k) % 3 == 2
    levels = [tasks.tag_level(t) for t in tags]
    expected = {L: [np.mean([keep[i, k] for i in range(n) if levels[i] == L]) for k in range(L)]
                for L in sorted(set(levels))}
    reading = hop_reading(model, batches, tags)
    assert reading.keys() == expected.keys()
    for L in reading:
        assert reading[L] == pytest.approx(expected[L])


@pytest.mark.slow
def test_train_and_sample_print_the_reading_per_level(tmp_path):
    out = tmp_path / "out"
    r = run_script("train.py", *TINY, "--reasoning_tasks=hopo:1-2", "--eval_tasks=hopo:1-4",
                   "--eval_examples=16", "--reasoning_fraction=1.0", "--max_iters=2", "--eval_interval=2",
                   f"--out_dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "exact match per level" in r.stdout and "EM hopo:4" in r.stdout
    rec = [json.loads(line) for line in open(out / "metrics.jsonl") if '"eval"' in line][-1]
    assert list(rec["level_exact_match"]) == ["1", "2", "3", "4"]
    assert [v["n"] for v in rec["level_exact_match"].values()] == [4, 4, 4, 4]
    s = run_script("sample.py", f"--out_dir={out}", "--device=cpu", "--eval=True", "--eval_examples=8",
                   "--eval_tasks=hopo:5-6")
    assert s.returncode == 0, s.stderr[-3000:]
    table = s.stdout.split("exact match per level")[1].splitlines()
    assert table[1].split() == ["level", "n", "step", "1", "K'=L", "K'=21", "exit", "steps"]
    assert [row.split()[:2] for row in table[2:4]] == [["5", "4"], ["6", "4"]]
    hops = s.stdout.split("does step k take hop k?")[1].splitlines()
    assert hops[1].split() == ["level", *(f"k={k}" for k in range(1, 7))]
    assert [hops[i].split()[0] for i in (2, 3)] == ["5", "6"]
    assert [len(hops[i].split()) for i in (2, 3)] == [6, 7]                 # the level, then k = 1..L


def test_train_levels_is_train_steps_with_level_matched_supervision_and_takes_a_jsonl(tmp_path):
    """The two recipes differ in what each step is trained on and nothing else; both run on a JSONL with
    levels over the preset's synthetic keys (config/train_levels.py includes train_steps.py by path)."""
    steps, _ = train.load_config([os.path.join(ROOT, "config", "train_steps.py")])
    levels, _ = train.load_config([os.path.join(ROOT, "config", "train_levels.py")])
    assert {k for k in steps if steps[k] != levels[k]} == {"out_dir", "step_targets", "level_steps",
                                                           "beyond_chain"}
    assert (levels["step_targets"], levels["level_steps"], levels["beyond_chain"]) == ("final", "at", "stay")
    assert levels["n_steps_dist"] == steps["n_steps_dist"] == "uniform"   # random K in both recipes
    rng, rows = np.random.default_rng(5), []
    for i in range(60):
        prompt, answer = tasks.TASKS["hopo"][0](rng, 1 + i % 3)
        rows.append({"prompt": prompt, "answer": answer, "level": 1 + i % 3,
                     "step_answers": tasks.chain_answers("hopo", prompt, 1 + i % 3)})
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for preset in ("train_steps.py", "train_levels.py"):
        run = train.Run([os.path.join(ROOT, "config", preset), f"--reasoning_data={tmp_path / 't.jsonl'}",
                         f"--out_dir={tmp_path / preset}"])
        assert run.reasoning.levels == [1, 2, 3] and run.curriculum.switches == [6000, 12000]
