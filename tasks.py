"""
The reasoning examples: the synthetic suite (reasoning_data='synthetic': task generators, their train/eval
split, specs) and JSONL rows (reasoning_data=path.jsonl: read_jsonl_examples, checked line by line).

A task is (family, level); its generator(rng, level) returns a (prompt, answer) pair of strings.
reasoning_tasks names the suite as 'family:level,...' (TASKS holds the families, DEFAULT_TASKS the default).
The split is by prompt: a stable hash holds out 10% of each task's prompt space and draw() rejects examples
from the other side, so no eval prompt is ever trained on (the chain families hash it without its level,
split_key). hop, hopo and iter also give their per-step answers f^1(x)..f^n(x) (chain_answers).
A JSONL row is {"prompt", "answer"} or GSM8K's {"question", "answer"}, with optional "step_answers" and
"level". data.ReasoningData packs the examples into rows.
"""

import hashlib
import itertools
import json
import re
from typing import NamedTuple

import numpy as np
import torch

from configurator import existing_file

# -----------------------------------------------------------------------------
# generator(rng, level) -> (prompt, answer). add, mul and chain have a fixed size per level (L digits,
# L hops), so every operand digit sits at the same distance from the answer digit that needs it: with sizes
# mixed 1..L the model must first find the size, and a 4-layer model learned none of add/mul/chain in 2000
# steps (README "Data"). Numbers are written least significant digit first and zero-padded, operands and
# answer alike: what is left to compute per answer digit is the digit table and the carry.

def _rev(n, width):  # 1171, 4 -> '1711'
    return str(n).zfill(width)[::-1]


def _add(rng, level):  # level 3: '253+918=' -> '1711': 352 + 819 = 1171
    a, b = (int(v) for v in rng.integers(10**level, size=2))
    return f"{_rev(a, level)}+{_rev(b, level)}=", _rev(a + b, level + 1)


def _mul(rng, level):  # level 3: '253*7=' -> '4642': 352 * 7 = 2464
    a, b = int(rng.integers(10**level)), int(rng.integers(2, 10))
    return f"{_rev(a, level)}*{b}=", _rev(a * b, level + 1)


def _chain(rng, level):  # level 2: 'q=3;x=q+4;c=x+5;c?' -> '2': each hop adds a digit mod 10
    names = [chr(97 + i) for i in rng.choice(26, size=level + 1, replace=False)]  # random, so that every
    v = int(rng.integers(10))  # (value, digit) pair is trained on even though 10% of the prompts are held out
    prompt = f"{names[0]}={v};"
    for prev, name in zip(names, names[1:]):
        d = int(rng.integers(1, 10))
        v = (v + d) % 10
        prompt += f"{name}={prev}+{d};"
    return prompt + f"{names[-1]}?", str(v)


def _sort(rng, level):  # 'sort(93712)=' -> '12379': 1..level digits (sorting is content-, not position-based)
    digits = "".join(map(str, rng.integers(10, size=int(rng.integers(1, level + 1)))))
    return f"sort({digits})=", "".join(sorted(digits))


# hop and iter pose the same question, f applied L times, and differ in where f is. hop: in the prompt, a
# fresh map per example, so nothing can be memorised and each hop is one lookup in the context. iter:
# nowhere, one fixed map for the whole dataset, learnable as a table (the control). Both maps are single
# cycles: the L hops visit L+1 distinct symbols (no fixed point or short cycle to shortcut) and f^L differs
# for every L < cycle length.
HOP_SYMBOLS = "pqrstuvw"  # hop's symbols, one token each (no f: f names the map); prompts of 39 bytes,
                          # block_size >= 41
ITER_F = "8475692310"     # iter's f: d -> ITER_F[d], the 10-cycle 0>8>1>4>6>2>7>3>5>9>0, for every seed
ITER_WIDTH = 4            # iter applies f^L to each of 4 digits: 10^4 prompts per level (one digit: only 10)


def _hop(rng, level, ordered=False):  # level 2: 'w>t,q>s,v>r,r>p,u>q,p>w,t>u,s>v;f^2(r)=' -> 'w' (r>p>w)
    cycle = [HOP_SYMBOLS[i] for i in rng.permutation(len(HOP_SYMBOLS))]
    f = {a: b for a, b in zip(cycle, cycle[1:] + cycle[:1])}  # f(cycle[i]) = cycle[i + 1]: a random 8-cycle
    keys = sorted(f) if ordered else [cycle[i] for i in rng.permutation(len(cycle))]  # hopo: p..w in order
    start = int(rng.integers(len(cycle)))
    prompt = ",".join(f"{k}>{f[k]}" for k in keys) + f";f^{level}({cycle[start]})="
    return prompt, cycle[(start + level) % len(cycle)]


def _iter(rng, level):  # level 2: 'f^2(4071)=' -> '2156': f = ITER_F twice on each digit (4>6>2, 0>8>1, ...)
    x = "".join(map(str, rng.integers(10, size=ITER_WIDTH)))
    y = x
    for _ in range(level):
        y = "".join(ITER_F[int(d)] for d in y)
    return f"f^{level}({x})=", y


def _hop_chain(prompt, n):  # 'w>t,...;f^2(r)=', 3 -> [f(r), f²(r), f³(r)], read from the prompt's map
    pairs, query = prompt.split(";")
    f = dict(pair.split(">") for pair in pairs.split(","))
    x, chain = query[query.index("(") + 1], []
    for _ in range(n):
        x = f[x]
        chain.append(x)
    return chain


def _iter_chain(prompt, n):  # 'f^2(4071)=', 2 -> ['8143', '2156']: ITER_F on each digit, 1..n times
    x, chain = prompt[prompt.index("(") + 1:prompt.index(")")], []
    for _ in range(n):
        x = "".join(ITER_F[int(d)] for d in x)
        chain.append(x)
    return chain


# root: the fixed-point family. Pointer chasing to a fixed point: the root of a node at depth L of a random
# forest whose roots point to themselves, so f^k(x) stays at the root from k = L on and running more steps
# than needed never hurts. The prompt does not state L. Every forest has 3 roots, two of them with a spine of
# ROOT_DEPTH nodes, the third alone: a query of any depth has two trees that reach it, so neither "a root"
# (1/3) nor "the root of the tallest tree" (1/2) answers it, and a deep query does not single out a tree.
ROOT_SYMBOLS = "abcdefghijklmnopq"   # 3 roots + 2 spines of ROOT_DEPTH: 17 symbols, prompts of 53 bytes
ROOT_DEPTH = 7


def _root(rng, level, ordered=True):  # level 2: 'ab,bb,cd,dd,...;h=' -> the root of h, two parents up
    s = [ROOT_SYMBOLS[i] for i in rng.permutation(len(ROOT_SYMBOLS))]
    roots, spines = s[:3], (s[3:3 + ROOT_DEPTH], s[3 + ROOT_DEPTH:])
    parent = {r: r for r in roots}
    for root, spine in zip(roots, spines):                 # spine[i] has depth i + 1
        parent.update(zip(spine, [root, *spine[:-1]]))
    keys = sorted(parent) if ordered else [s[i] for i in rng.permutation(len(s))]  # rootr: a content lookup
    tree = int(rng.integers(2))
    return ",".join(k + parent[k] for k in keys) + f";{spines[tree][level - 1]}=", roots[tree]


def _root_chain(prompt, n):  # 'ab,bb,...;h=', 3 -> [f(h), f²(h), f³(h)]: the ancestors, then the root
    pairs, query = prompt.split(";")
    parent, x, chain = dict(pairs.split(",")), query[0], []
    for _ in range(n):
        x = parent[x]
        chain.append(x)
    return chain


def root_shortcuts(prompt):
    """What two shortcuts answer to a root prompt, without chasing the query's parents: 'any root' (the first
    in symbol order: right 1/3 of the time) and 'tallest tree' (the root with the deepest node below it, the
    first on a tie: 1/2)."""
    parent = dict(pairs for pairs in prompt.split(";")[0].split(","))
    depth = lambda x: 0 if parent[x] == x else 1 + depth(parent[x])
    root = lambda x: x if parent[x] == x else root(parent[x])
    roots = sorted(k for k in parent if parent[k] == k)
    tallest = max(roots, key=lambda r: (max(depth(k) for k in parent if root(k) == r), -ord(r)))
    return {"any root": roots[0], "tallest tree": tallest}


# the families whose answer is f^L(x): their per-step answers f^1(x)..f^n(x), read from the prompt
CHAINS = {"hop": _hop_chain, "hopo": _hop_chain, "iter": _iter_chain, "root": _root_chain,
          "rootr": _root_chain}


def chain_answers(family, prompt, n):
    """[f^1(x), ..., f^n(x)] of a hop/hopo/iter prompt (per-step targets); None for other families."""
    return CHAINS[family](prompt, n) if family in CHAINS else None


def chain_steps(step_targets: str, level: int) -> int:
    """How many steps a hop/hopo/iter example of this level trains on its own chain f^1(x)..f^n(x): n = 0 for
    step_targets 'final' (the answer at every step), its level L for 'chain' (then f^L), N for 'chain:N'."""
    kind, _, n = step_targets.partition(":")
    return int(n) if n else level if kind == "chain" else 0


def answer_step(level, cap):
    """The step an answer of level L is read at, one step per hop: min(L, cap). cap: the training K (the
    losses, the curriculum's check and its chain cut) or the test-time K'. level: an int or a tensor."""
    return level.clamp(max=cap) if torch.is_tensor(level) else min(level, cap)


class Example(NamedTuple):
    """One encoded reasoning example: token ids of the prompt and the answer, the per-step answers a_1..a_S
    (each as many tokens as the answer; () = the answer at every step) and the level (0 = unknown)."""
    prompt: list
    answer: list
    steps: tuple = ()
    level: int = 0


# family: (generator, max level, longest prompt+answer in characters: a bound on tokens for both tokenizers)
TASKS = {
    "add": (_add, 18, lambda L: 3 * L + 3),
    "mul": (_mul, 18, lambda L: 2 * L + 4),
    "chain": (_chain, 25, lambda L: 6 * L + 7),
    "sort": (_sort, 60, lambda L: 2 * L + 7),
    "hop": (_hop, len(HOP_SYMBOLS) - 1, lambda L: 4 * len(HOP_SYMBOLS) + 8),  # keys in random order
    "hopo": (lambda rng, L: _hop(rng, L, ordered=True), len(HOP_SYMBOLS) - 1,
             lambda L: 4 * len(HOP_SYMBOLS) + 8),  # keys in order p..w
    "iter": (_iter, len(ITER_F) - 1, lambda L: 10 + ITER_WIDTH),
    "root": (_root, ROOT_DEPTH, lambda L: 3 * len(ROOT_SYMBOLS) + 3),                 # keys in order
    "rootr": (lambda rng, L: _root(rng, L, ordered=False), ROOT_DEPTH, lambda L: 3 * len(ROOT_SYMBOLS) + 3),
}
DEFAULT_TASKS = "add:2,mul:2,chain:2,sort:8"  # measured on the CPU preset: README "Data"
EVAL_STREAM = 1_000_003  # the synthetic eval set's rng key: the same for every seed and every suite
SLICE_STREAM = 1_000_033  # a curriculum's training-side slice: its own rng key, apart from the eval set's
VALIDATION_STREAM = 1_000_037  # a validation draw (held-out side, not the eval set): where experiments rank
MAX_LEVEL = 1000          # a JSONL row's level and chain length: a number of steps, so never many

# -----------------------------------------------------------------------------
# specs and the train/eval split

def parse_tasks(spec: str, key: str = "reasoning_tasks") -> list:
    """'add:3,hopo:1-3' -> [('add', 3), ('hopo', 1), ('hopo', 2), ('hopo', 3)]; key names the spec's key in
    the error."""
    tasks = []
    for item in spec.split(","):
        name, _, levels = item.strip().partition(":")
        if name not in TASKS:
            raise ValueError(f"{key}={spec!r}: unknown task {name!r}; families: {', '.join(TASKS)}")
        first, _, last = levels.partition("-")
        top = TASKS[name][1]
        if not re.fullmatch(r"\d+(-\d+)?", levels) or not 1 <= int(first) <= int(last or first) <= top:
            raise ValueError(f"{key}={spec!r}: {item.strip()!r} needs a level 1..{top} or a range of them, "
                             f"e.g. '{name}:3' or '{name}:1-3'")
        tasks += [(name, L) for L in range(int(first), int(last or first) + 1)]
    return tasks


def jsonl_tag(level):
    """An eval example's tag (per-task tables) for a JSONL row: 'jsonl', or 'jsonl:L' with its level."""
    return f"jsonl:{level}" if level else "jsonl"


def tag_level(tag):
    """The level an eval example is read at, K' = L, from its tag: a chain family's ('hopo:3') or a JSONL
    row's ('jsonl:3'); 0 for the other families, whose level is a size, not a number of steps."""
    family, _, level = tag.partition(":")
    return int(level) if level and (family in CHAINS or family == "jsonl") else 0


def check_fits(longest, block_size, what):
    """One line naming what, when its longest example (prompt + answer tokens) does not fit a row of
    data.ReasoningData: the leading eot, the example and its closing eot are block_size + 1 tokens at most."""
    if 1 + longest + 1 > block_size + 1:
        raise ValueError(f"{what}: an example of {longest} tokens needs block_size >= {longest + 1}, got "
                         f"block_size={block_size}")


def is_eval_prompt(prompt: str) -> bool:
    """The held-out 10% of the prompt space, by a stable hash (never Python's salted hash())."""
    digest = hashlib.blake2b(prompt.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 100 < 10


def split_key(family, prompt):
    """What the train/eval split hashes: the prompt, without its level for the chain families ('f^3(r)=' ->
    'f^(r)='), so a held-out (map, start) is held out at every level: with per-step targets a training
    example's steps are trained on f^k(x), the answers of the same prompt at the other levels k. root: the
    forest alone, its keys sorted, so a held-out forest is held out under every query and key order."""
    if family in ("root", "rootr"):
        return ",".join(sorted(prompt.split(";")[0].split(",")))
    return re.sub(r"f\^\d+\(", "f^(", prompt) if family in CHAINS else prompt


def draw(task, rng, eval_side, exclude=()):
    """One example of task (name, level) from the eval or the train side of the hash split, by rejection;
    exclude: prompts never drawn (the rows of a separate eval file)."""
    for _ in range(10_000):
        prompt, answer = TASKS[task[0]][0](rng, task[1])
        if is_eval_prompt(split_key(task[0], prompt)) == eval_side and prompt not in exclude:
            return prompt, answer
    raise ValueError(f"reasoning_tasks: {task[0]}:{task[1]} has too few prompts for a train/eval split; "
                     "raise its level")


def check_split(tasks):
    """Fail now, not mid-training, for a task too small to have prompts on both sides of the split."""
    for task, eval_side in itertools.product(tasks, (True, False)):
        draw(task, np.random.default_rng(0), eval_side)


def eval_set(tasks, n_examples):
    """The fixed eval set, [(prompt, answer)]: example i is the (i // n_tasks)-th of task i % n_tasks,
    independent of the seed and of the other tasks."""
    n = len(tasks)
    return [draw(tasks[i % n], np.random.default_rng([EVAL_STREAM, i // n]), True) for i in range(n_examples)]


def validation_set(tasks, n_examples, exclude):
    """A fixed draw from the held-out side of the split that shares no prompt with exclude (the eval set an
    experiment reports): where it ranks its arms. Example i is of task i % n_tasks, as eval_set's."""
    n = len(tasks)
    return [draw(tasks[i % n], np.random.default_rng([VALIDATION_STREAM, i // n]), True, exclude)
            for i in range(n_examples)]


def training_slice(tasks, level, n_examples, exclude=()):
    """A fixed training-side slice (never the held-out set nor exclude) of n_examples examples of this level's
    tasks."""
    tasks = [t for t in tasks if t[1] == level]
    return [draw(tasks[i % len(tasks)], np.random.default_rng([SLICE_STREAM, i]), False, exclude)
            for i in range(n_examples)]

# -----------------------------------------------------------------------------
# JSONL rows (reasoning_data=path.jsonl)

def jsonl_example(ex, gsm8k_answer):
    """(prompt, answer) of a parsed JSONL row: {"prompt", "answer"}, or GSM8K's {"question", "answer"} with
    the worked solution on the prompt side (gsm8k_answer 'final') or on the answer side ('solution')."""
    strings = lambda *keys: isinstance(ex, dict) and all(isinstance(ex.get(k), str) for k in keys)
    if strings("prompt", "answer"):
        if not ex["answer"]:
            raise ValueError('"answer" is empty: an answer is what is trained and scored')
        return ex["prompt"], ex["answer"]
    if not strings("question", "answer"):
        raise ValueError('expected {"prompt": str, "answer": str} or GSM8K {"question": str, "answer": str}')
    if gsm8k_answer == "solution" and ex["answer"]:
        return ex["question"] + "\n", ex["answer"]
    solution, sep, final = ex["answer"].rpartition("####")
    if not sep or not final.strip():
        raise ValueError('GSM8K answer must end with "#### <final answer>"')
    return f"{ex['question']}\n{solution}#### ", final.strip()


def _jsonl_steps(ex, answer):
    """(step_answers or None, level) of a JSONL row: "step_answers" [a_1, ..., a_S] (1 <= S <= MAX_LEVEL
    strings) and "level" (an int in 1..MAX_LEVEL), both optional; the level defaults to S, else 0 (unknown).
    The answer must be the chain's a_min(L, S): the step answer of its level, or a_S where the chain is
    shorter (steps past a chain keep a_S)."""
    steps, level = ex.get("step_answers"), ex.get("level")
    if steps is not None and not (isinstance(steps, list) and 1 <= len(steps) <= MAX_LEVEL
                                  and all(isinstance(a, str) for a in steps)):
        raise ValueError(f'"step_answers" must be a list of 1..{MAX_LEVEL} strings, got '
                         f"{json.dumps(steps)[:60]}")
    if level is not None and not (type(level) is int and 1 <= level <= MAX_LEVEL):
        raise ValueError(f'"level" must be an integer in 1..{MAX_LEVEL}, got {json.dumps(level)[:60]}')
    level = level or (len(steps) if steps else 0)
    if steps and steps[min(level, len(steps)) - 1] != answer:
        k = min(level, len(steps))
        raise ValueError(f'"answer" {answer!r} is not step_answers[{k - 1}] {steps[k - 1]!r}, the answer of '
                         f"level {level}: the answer of a chain is its step at the level (a_S past its end)")
    return steps, level


def read_jsonl_examples(path: str, gsm8k_answer: str = "final") -> list:
    """[(prompt, answer, step_answers or None, level, line number)] from a .jsonl file: each row's prompt and
    answer (jsonl_example; GSM8K's split by gsm8k_answer), its per-step answers and level (_jsonl_steps)."""
    if gsm8k_answer not in ("final", "solution"):
        raise ValueError(f"gsm8k_answer={gsm8k_answer!r}: use 'final' or 'solution'")
    examples = []
    with open(existing_file(path, "reasoning data file"), "rb") as f:  # bytes, decoded line by line: a line
        for lineno, line in enumerate(f, 1):                            # that is not UTF-8 is named
            try:
                line = line.decode("utf-8-sig" if lineno == 1 else "utf-8")   # a leading BOM is skipped
                if line.strip():
                    ex = json.loads(line)
                    prompt, answer = jsonl_example(ex, gsm8k_answer)
                    examples.append((prompt, answer, *_jsonl_steps(ex, answer), lineno))
            except ValueError as e:  # json's and UTF-8's decode errors are ValueErrors too
                raise ValueError(f"{path}:{lineno}: {e}") from None
    if not examples:
        raise ValueError(f"{path}: no examples (empty file)")
    return examples


def read_eval_jsonl(path: str, gsm8k_answer: str = "final") -> list:
    """[(prompt, answer, level)] from a .jsonl eval file (read_jsonl_examples' rows; level 0 = none)."""
    return [(p, a, level) for p, a, _, level, _ in read_jsonl_examples(path, gsm8k_answer)]


def split_jsonl(source, eval_source="", gsm8k_answer="final"):
    """(training rows as read_jsonl_examples gives them, eval [(prompt, answer, level)]) of a .jsonl file:
    eval = eval_source's rows, or the held-out hash slice (10% of prompts) of source's; no eval prompt is
    trained on."""
    examples = read_jsonl_examples(source, gsm8k_answer)
    evals = read_eval_jsonl(eval_source, gsm8k_answer) if eval_source else \
        [(p, a, level) for p, a, _, level, _ in examples if is_eval_prompt(p)]
    held_out = {prompt for prompt, *_ in evals}
    return [e for e in examples if e[0] not in held_out], evals
