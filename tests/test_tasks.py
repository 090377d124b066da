"""tasks.py's synthetic task suite through data.ReasoningData: every family's answers recomputed from the
prompt text with plain Python (add, mul, chain, sort; hop, hopo, iter), the sizes and levels drawn, the
held-out split (disjoint, deterministic, ~10% of each prompt space), the block size each suite needs,
level errors, and `data/prepare.py show`. Expected values are recomputed here independently, never taken
from the code under test."""

import ast
import functools
import itertools
import re

import numpy as np
import pytest
import torch

from conftest import run_script
from data import ReasoningData
from tasks import ITER_F, is_eval_prompt
from test_data import unpack


def solve(prompt):
    """The synthetic tasks' answers, recomputed from the prompt text with plain Python."""
    if m := re.fullmatch(r"(\d+)([+*])(\d+)=", prompt):  # numbers least significant digit first, zero-padded
        a, b = int(m[1][::-1]), int(m[3][::-1])
        assert len(m[1]) == len(m[3]) if m[2] == "+" else len(m[3]) == 1 and b >= 2
        return str(a + b if m[2] == "+" else a * b).zfill(len(m[1]) + 1)[::-1]
    if m := re.fullmatch(r"sort\((\d+)\)=", prompt):
        return "".join(sorted(m[1]))
    if m := re.fullmatch(r"f\^(\d)\((\d+)\)=", prompt):  # iter: the suite's fixed f, a digit -> digit table
        f, x = {str(d): ITER_F[d] for d in range(10)}, m[2]
        return "".join(functools.reduce(lambda v, _: f[v], range(int(m[1])), d) for d in x)
    if ">" in prompt:  # hop, hopo: the map written in the prompt
        f, _, start, L = hop_map(prompt)
        return functools.reduce(lambda v, _: f[v], range(L), start)
    *statements, query = prompt.split(";")
    env = {}
    for s in statements:
        if m := re.fullmatch(r"([a-z])=(\d)", s):
            env[m[1]] = int(m[2])
        else:
            name, src, op, d = re.fullmatch(r"([a-z])=([a-z])([-+*])(\d)", s).groups()
            env[name] = {"+": env[src] + int(d), "-": env[src] - int(d), "*": env[src] * int(d)}[op] % 10
    return str(env[re.fullmatch(r"([a-z])\?", query)[1]])


def size_of(prompt):
    """(family, size) of a synthetic prompt: digits of the first operand, hops, or list length."""
    if m := re.fullmatch(r"(\d+)([+*])\d+=", prompt):
        return "add" if m[2] == "+" else "mul", len(m[1])
    if m := re.fullmatch(r"sort\((\d+)\)=", prompt):
        return "sort", len(m[1])
    return "chain", prompt.count(";") - 1


def hop_map(prompt):
    """A hop prompt parsed back: ({key: value}, the keys in written order, the start symbol, L)."""
    pairs, query = prompt.split(";")
    kv = [re.fullmatch(r"([a-z])>([a-z])", pair).groups() for pair in pairs.split(",")]
    L, start = re.fullmatch(r"f\^(\d)\(([a-z])\)=", query).groups()
    return dict(kv), [k for k, _ in kv], start, int(L)


def train_prompts(rd, n, batch_size=256):
    """At least n training prompts of a byte-tokenized synthetic ReasoningData, in order, from batch 0 on."""
    train, index = [], 0
    while len(train) < n:
        b = rd.get_batch(index, batch_size)
        rows = b.x.numpy()
        for r in range(len(rows)):  # prompts end right before the first masked target
            row, m = rows[r], b.answer_mask[r].numpy()
            starts = np.flatnonzero(m & ~np.r_[False, m[:-1]])
            eots = np.flatnonzero(row == 256)
            train += [bytes(row[eots[eots <= s][-1] + 1:s + 1].tolist()).decode() for s in starts]
        index += 1
    return train


def check_seeds_and_eval_set(rd, byte, tasks, other_block_size, last_task):
    """rd (seed 0, 4 tasks): its batches are those of the same seed and not of another; its eval set does not
    depend on the seed or the block size, and each task's eval examples (here the last's) not on the rest of
    the suite."""
    same = ReasoningData("synthetic", byte, rd.block_size, seed=0, tasks=tasks)
    assert torch.equal(rd.get_batch(3, 4).x, same.get_batch(3, 4).x)  # same seed, same data
    other = ReasoningData("synthetic", byte, rd.block_size, seed=1, tasks=tasks)
    assert not torch.equal(rd.get_batch(3, 4).x, other.get_batch(3, 4).x)
    resized = ReasoningData("synthetic", byte, other_block_size, seed=5, tasks=tasks)
    assert resized.eval_examples(100) == rd.eval_examples(100)
    alone = ReasoningData("synthetic", byte, 64, tasks=last_task).eval_examples(25)
    assert alone == rd.eval_examples(100)[3::4]


# -----------------------------------------------------------------------------
# add, mul, chain, sort

@pytest.mark.parametrize("name", ["byte", "gpt2"])
def test_synthetic_answers_and_masks(name, byte, gpt2):
    tok = byte if name == "byte" else gpt2
    tasks = "add:3,mul:2,chain:3,sort:5"
    rd = ReasoningData("synthetic", tok, 128, seed=1, tasks=tasks)
    sizes = {}
    for index in range(5):
        b = rd.get_batch(index, 8)
        assert b.kind == "reasoning" and b.x.shape == (8, 128)
        assert torch.equal(b.answer_mask, b.answer_id >= 0)
        examples = unpack(b, tok)
        assert len(examples) > 8 * 5  # rows are packed with several examples
        for p, a, _ in examples:
            prompt, answer = tok.decode(p), tok.decode(a)
            assert p == tok.encode(prompt) and answer == solve(prompt)
            family, size = size_of(prompt)
            sizes.setdefault(family, set()).add(size)
    # fixed size; sort 1..level
    assert sizes == {"add": {3}, "mul": {2}, "chain": {3}, "sort": {1, 2, 3, 4, 5}}
    # eval: every example once, in order, answer_id = its index; masks decode to the answers
    evals, tags = rd.eval_examples(50), rd.eval_tags(50)
    for (p, a), tag in zip(evals, tags):
        family, level = tag.split(":")
        size = size_of(p)[1]
        assert solve(p) == a and size_of(p)[0] == family
        assert (size <= int(level) if family == "sort" else size == int(level))
    got = [(tok.decode(p), tok.decode(a), i) for b in rd.eval_batches(4, 50) for p, a, i in unpack(b, tok)]
    assert got == [(p, a, i) for i, (p, a) in enumerate(evals)]


def test_synthetic_split_is_disjoint_and_deterministic(byte):
    tasks = "add:2,mul:2,chain:2,sort:4"  # small prompt spaces, so a leak could not hide
    rd = ReasoningData("synthetic", byte, 128, seed=0, tasks=tasks)
    evals = {p for p, _ in rd.eval_examples(4000)}
    train = train_prompts(rd, 100_000)
    assert not evals & set(train)
    add = {p for p in set(train) | evals if re.fullmatch(r"\d+\+\d+=", p)}  # add:2 has ~10^4 prompts
    assert len(add - evals) > 5_000 and len(add & evals) > 300  # both sides of the split are well sampled
    check_seeds_and_eval_set(rd, byte, tasks, other_block_size=64, last_task="sort:4")


def test_block_size_bound_is_exact(byte):
    """sort:5 examples have up to 12 + 5 tokens:
    block_size 18 holds eot + example + eot, 17 is a clear error."""
    with pytest.raises(ValueError, match="block_size >= 18, got block_size=17"):
        ReasoningData("synthetic", byte, 17, tasks="sort:5")
    rd = ReasoningData("synthetic", byte, 18, tasks="sort:5")
    lengths = [len(p) + len(a) for i in range(4) for p, a, _ in unpack(rd.get_batch(i, 16), byte)]
    assert max(lengths) == 17 and lengths.count(17) > 5


# -----------------------------------------------------------------------------
# hop, hopo, iter

HOP_ITER = "hop:3,hopo:2,iter:1,iter:4"


@pytest.mark.parametrize("name", ["byte", "gpt2"])
def test_hop_and_iter_answers(name, byte, gpt2):
    """Answers recomputed from the prompt text (hop: the map parsed back; iter: tasks.ITER_F as a table);
    hop's map is a permutation of p..w forming one 8-cycle, its keys shuffled (hop) or in order (hopo);
    levels exact."""
    tok = byte if name == "byte" else gpt2
    rd = ReasoningData("synthetic", tok, 64, seed=2, tasks=HOP_ITER)
    train = [(tok.decode(p), tok.decode(a), None) for i in range(12)
             for p, a, _ in unpack(rd.get_batch(i, 8), tok)]
    evals = [(p, a, tag) for (p, a), tag in zip(rd.eval_examples(80), rd.eval_tags(80))]
    seen, hop_orders = {}, []
    for prompt, answer, tag in train + evals:
        assert answer == solve(prompt)
        if ">" in prompt:
            f, keys, start, L = hop_map(prompt)
            assert sorted(keys) == sorted(f.values()) == list("pqrstuvw") and len(tok.encode(answer)) == 1
            walk = functools.reduce(lambda w, _: w + [f[w[-1]]], range(7), [start])
            assert len(set(walk)) == 8 and answer == walk[L] != start  # a single 8-cycle: L hops, L+1 symbols
            family = "hopo" if keys == sorted(keys) else "hop"
            if family == "hop":
                hop_orders.append(tuple(keys))
        else:
            L, x = re.fullmatch(r"f\^(\d)\((\d{4})\)=", prompt).groups()
            family, L = "iter", int(L)
            assert len(answer) == 4 and (name != "byte" or len(tok.encode(answer)) == 4)  # a digit per token
        seen.setdefault(family, set()).add(L)
        assert tag in (None, f"{family}:{L}")
    assert seen == {"hop": {3}, "hopo": {2}, "iter": {1, 4}}
    assert len(hop_orders) > 20 and len(set(hop_orders)) == len(hop_orders)  # hop's key order is random


def test_hop_maps_are_fresh_and_answers_uniform(byte):
    """Every hop example brings its own map: nothing to memorise;
    the answer is spread over the 7 non-start symbols."""
    rd = ReasoningData("synthetic", byte, 64, seed=0, tasks="hop:2")
    prompts = train_prompts(rd, 2000)
    maps = [tuple(sorted(hop_map(p)[0].items())) for p in prompts]
    assert len(set(maps)) > 1500  # 2000 draws of 5040 single 8-cycles: ~1650 distinct expected
    # consecutive examples: the same map by chance, ~0.4 times
    assert sum(a == b for a, b in zip(maps, maps[1:])) < 5
    values = {k: {dict(m)[k] for m in maps} for k in "pqrstuvw"}
    assert all(len(v) == 7 and k not in v for k, v in values.items())  # each key maps to every other symbol
    answers = [solve(p) for p in prompts]
    counts = [answers.count(c) for c in "pqrstuvw"]
    assert all(150 < c < 350 for c in counts), counts  # ~250 each
    assert all(solve(p) != hop_map(p)[2] for p in prompts)


def test_iter_is_one_fixed_10_cycle():
    """iter's f is one permutation of the digits, a single 10-cycle:
    f^1..f^9 are distinct and have no fixed point."""
    f = {d: int(ITER_F[d]) for d in range(10)}
    assert sorted(f.values()) == list(range(10))
    powers = [list(range(10))]
    for _ in range(10):
        powers.append([f[v] for v in powers[-1]])
    assert all(all(p[d] != d for d in range(10)) for p in powers[1:10]) and powers[10] == powers[0]
    assert len({tuple(p) for p in powers[:10]}) == 10


def test_hop_iter_split_is_disjoint_and_deterministic(byte):
    tasks = "iter:1,hopo:1,iter:2,hop:1"
    rd = ReasoningData("synthetic", byte, 64, seed=0, tasks=tasks)
    evals = {p for p, _ in rd.eval_examples(4000)}
    train = set(train_prompts(rd, 40_000))
    assert not evals & train
    iter1 = lambda ps: {p for p in ps if p.startswith("f^1(")}  # iter:1 has 10^4 prompts
    assert len(iter1(train)) > 4000 and len(iter1(evals)) > 400  # both sides of the split are well sampled
    assert {p for p in train | evals if ">" in p and hop_map(p)[1] == sorted(hop_map(p)[1])}  # hopo is there
    check_seeds_and_eval_set(rd, byte, tasks, other_block_size=128, last_task="hop:1")


def test_hopo_and_iter_prompt_spaces_split_about_10_percent(byte):
    """The whole prompt space of iter:L (10^4) and hopo:L (7! cycles x 8 starts = 40320), enumerated
    here: ~10% of each level is held out, and the generated prompts lie in it. (hop: x 8! key orders,
    ~1.6e9 per level.)"""
    def iter_prompts(L):
        return [f"f^{L}({x:04d})=" for x in range(10_000)]

    def hopo_prompts(L):
        out = []
        for rest in itertools.permutations("qrstuvw"):
            cycle = ("p",) + rest
            f = {cycle[i]: cycle[(i + 1) % 8] for i in range(8)}
            out += [",".join(f"{k}>{f[k]}" for k in "pqrstuvw") + f";f^{L}({s})=" for s in "pqrstuvw"]
        return out

    for family, space, levels in [("iter", iter_prompts, range(1, 10)), ("hopo", hopo_prompts, range(1, 8))]:
        for L in levels:
            prompts = space(L)
            assert len(set(prompts)) == (10_000 if family == "iter" else 40_320)
            held = sum(map(is_eval_prompt, prompts))
            assert 0.09 < held / len(prompts) < 0.11, (family, L, held)  # ~1000 and ~4000 eval prompts
            if L == 2:  # the generator draws from exactly this space
                rd = ReasoningData("synthetic", byte, 64, tasks=f"{family}:{L}")
                assert set(train_prompts(rd, 300)) | {p for p, _ in rd.eval_examples(100)} <= set(prompts)


def test_hop_iter_level_and_block_size_errors(byte):
    bad_specs = [("hop:8", "1..7"), ("hopo:0", "1..7"), ("iter:10", "1..9"), ("iter:x", "1..9"),
                 ("hop", "1..7")]
    for spec, levels in bad_specs:
        with pytest.raises(ValueError, match=re.escape(f"needs a level {levels}")) as e:
            ReasoningData("synthetic", byte, 64, tasks=f"add:2,{spec}")
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="block_size >= 41, got block_size=40"):  # hop examples: 39 + 1 bytes
        ReasoningData("synthetic", byte, 40, tasks="hop:7")
    batch = ReasoningData("synthetic", byte, 41, tasks="hop:7").get_batch(0, 8)
    lengths = {len(p) + len(a) for p, a, _ in unpack(batch, byte)}
    assert lengths == {40}
    with pytest.raises(ValueError, match="block_size >= 15, got block_size=14"):
        ReasoningData("synthetic", byte, 14, tasks="iter:9")


@pytest.mark.slow
def test_show_cli_prints_hop_and_iter():
    run = lambda spec: run_script("data/prepare.py", "show", f"--reasoning_tasks={spec}")
    r = run("hop:2,iter:3")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    parsed = [re.fullmatch(r"(\S+)\s+('.*')\s+-> ('.*')", line).groups() for line in lines]
    assert [tag for tag, _, _ in parsed] == ["hop:2", "iter:3"] * 3
    for tag, prompt, answer in parsed:
        prompt, answer = ast.literal_eval(prompt), ast.literal_eval(answer)
        assert solve(prompt) == answer and (">" in prompt) == tag.startswith("hop")
    r = run("hop:9")
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert "needs a level 1..7" in r.stderr
