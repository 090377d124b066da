"""
Data for nanoRLRP (README "Data", "The method in one screen"): tokenizers, fluency
token files, reasoning examples with answer-span masks, the fluency/reasoning router, data preparation. Offline.

Config keys (train.py exposes them):
  tokenizer            'byte' (UTF-8 bytes + eot 256, vocab 257; digit-level) | 'gpt2' (tiktoken GPT-2 BPE, vocab 50257)
  tokenizer_file       local GPT-2 ranks file gpt2.tiktoken (or env NANORLRP_TOKENIZER_FILE) for machines without
                       internet; `python data.py fetch_tokenizer --out=DIR` gets it from the openai-whisper sdist on PyPI
  fluency_data         a folder made by `python data.py prepare` (train.bin, val.bin, meta.json), or 'pydoc':
                       CPython's own documentation text (pydoc_data.topics), embedded, last 10% of tokens = val.
                       prepare's val split, of N tokens: max(val_fraction * N, min(min_val_tokens, 10% of N))
  reasoning_data       'synthetic' (the built-in suite) or a .jsonl file: {"prompt","answer"} or GSM8K {"question","answer"}
  reasoning_eval_data  a .jsonl file; '' = the held-out hash slice (10% of prompts) of reasoning_data
  reasoning_tasks      the synthetic suite, 'family:level,...' (families in TASKS below; default DEFAULT_TASKS)
  reasoning_fraction   rho: optimizer step s is a reasoning step iff floor((s+1) rho) > floor(s rho)
  gsm8k_answer         'final': worked solution on the prompt side, the text after #### is the answer | 'solution'

Packing: a reasoning row holds block_size+1 tokens: eot, then whole examples `prompt + answer + eot`, then
padding (y = -1). The leading eot gives every prompt the same left context. answer_mask marks the targets
that are answer tokens or the answer's closing eot, so greedy decoding stops at eot and an exact match is
"every answer token and the eot are the argmax given the gold prefix". Prompt tokens are trained with CE too.
Batches are pure functions of (seed, index): resume is exact, and with micro_batch_index the data does not
depend on how many DDP ranks share a global batch.

CLI: python data.py prepare --input=FILE|DIR|GLOB --out_dir=DIR [--tokenizer=gpt2|byte] [--tokenizer_file=]
                            [--val_fraction=0.0005] [--min_val_tokens=4100]
     python data.py fetch_tokenizer --out=DIR
     python data.py show [--reasoning_tasks=...] [--n=3]      (print eval examples of the synthetic suite)
"""

import argparse
import glob
import hashlib
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass

import numpy as np
import tiktoken
import torch
from tiktoken.load import load_tiktoken_bpe
from tqdm import tqdm


@dataclass
class Batch:
    x: torch.Tensor            # (B, T) int64 inputs
    y: torch.Tensor            # (B, T) int64 targets, -1 = ignored (padding)
    kind: str                  # "fluency" | "reasoning"
    answer_mask: torch.Tensor  # (B, T) bool, targets inside an answer span, its closing eot included
    answer_id: torch.Tensor    # (B, T) int64, which answer a masked target belongs to (unique in the batch), -1 elsewhere

    def to(self, device) -> "Batch":
        cuda = torch.device(device).type == "cuda"  # pinned host memory lets the copy overlap with compute
        move = lambda t: t.pin_memory().to(device, non_blocking=True) if cuda else t.to(device)
        return Batch(move(self.x), move(self.y), self.kind, move(self.answer_mask), move(self.answer_id))

# -----------------------------------------------------------------------------
# tokenizers

EOT = "<|endoftext|>"
GPT2_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # r50k_base.tiktoken
# tiktoken's r50k pattern: GPT-2's original pre-tokenization regex, in a faster equivalent form
R50K_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
WHISPER_SDIST = "openai-whisper==20250625"  # its sdist ships whisper/assets/gpt2.tiktoken, identical to r50k_base's
HOW_TO_GET_GPT2 = ("set tokenizer_file=PATH (or env NANORLRP_TOKENIZER_FILE=PATH) to GPT-2's ranks file gpt2.tiktoken; "
                   "`python data.py fetch_tokenizer --out=DIR` downloads it from PyPI")


class Tokenizer:
    """encode treats text as ordinary text (a literal '<|endoftext|>' is not eot); decode shows eot as '<|endoftext|>'."""

    def __init__(self, name, enc=None):
        self.name, self.enc = name, enc  # enc: a tiktoken.Encoding, or None for UTF-8 bytes
        self.vocab_size = enc.n_vocab if enc else 257
        self.eot_token = enc.eot_token if enc else 256

    def encode(self, text: str) -> list:
        return self.enc.encode_ordinary(text) if self.enc else list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.enc:
            return self.enc.decode(ids)
        return b"".join(EOT.encode() if i == 256 else bytes([i]) for i in ids).decode("utf-8", errors="replace")


def _check_gpt2_ranks(data: bytes, what: str):
    h = hashlib.sha256(data).hexdigest()
    if h != GPT2_SHA256:
        raise ValueError(f"{what} has sha256 {h}, not GPT-2's ranks file ({GPT2_SHA256}); {HOW_TO_GET_GPT2}")


def get_tokenizer(name: str, tokenizer_file: str = "") -> Tokenizer:
    if name == "byte":
        return Tokenizer("byte")
    if name != "gpt2":
        raise ValueError(f"unknown tokenizer {name!r}: use tokenizer='byte' or tokenizer='gpt2'")
    path = tokenizer_file or os.environ.get("NANORLRP_TOKENIZER_FILE", "")
    if not path:
        try:
            return Tokenizer("gpt2", tiktoken.get_encoding("gpt2"))
        except Exception as e:  # tiktoken downloads its files: fails offline
            raise FileNotFoundError(f"tokenizer 'gpt2': tiktoken could not load its files ({type(e).__name__}); "
                                    f"{HOW_TO_GET_GPT2}") from None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GPT-2 tokenizer file {path!r} not found; {HOW_TO_GET_GPT2}")
    with open(path, "rb") as f:
        _check_gpt2_ranks(f.read(), f"tokenizer file {path!r}")
    enc = tiktoken.Encoding(name="gpt2", pat_str=R50K_PAT, mergeable_ranks=load_tiktoken_bpe(path),
                            special_tokens={EOT: 50256})
    return Tokenizer("gpt2", enc)


def fetch_gpt2_ranks(dest_dir: str) -> str:
    """Fetch GPT-2's ranks file from the openai-whisper sdist on PyPI (pip, so the usual index settings apply)."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        WHISPER_SDIST, "-d", tmp], check=True, stdout=subprocess.DEVNULL)
        (sdist,) = glob.glob(os.path.join(tmp, "*.tar.gz"))
        with tarfile.open(sdist) as tf:
            member = next(m for m in tf.getmembers() if m.name.endswith("/whisper/assets/gpt2.tiktoken"))
            data = tf.extractfile(member).read()
    _check_gpt2_ranks(data, f"gpt2.tiktoken from {WHISPER_SDIST}")
    os.makedirs(dest_dir, exist_ok=True)
    path = os.path.join(dest_dir, "gpt2.tiktoken")
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)
    return path

# -----------------------------------------------------------------------------
# fluency data: nanoGPT's train.bin/val.bin token files, plus meta.json

def _dtype(vocab_size):
    return "uint16" if vocab_size <= 2**16 else "uint32"


def _input_files(input):
    if os.path.isfile(input):
        return [input]
    pattern = os.path.join(input, "**", "*") if os.path.isdir(input) else input  # glob skips hidden files
    files = sorted(f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
    if not files:
        raise FileNotFoundError(f"--input={input!r}: no such file, no files in that folder, or no glob match")
    return files


def _text_pieces(path, chunk_chars=1 << 20):
    """Yield a text file in pieces, each cut just before a newline that precedes a non-space character: GPT-2's
    pre-tokenizer splits the same way there at a string's end and inside it, so the tokens equal the whole file's."""
    buf = ""
    with open(path, encoding="utf-8", errors="replace") as f:  # a stray bad byte should not stop a long prepare
        while chunk := f.read(chunk_chars):
            buf += chunk
            cut = buf.rfind("\n", 0, len(buf) - 1)
            while cut > 0 and buf[cut + 1].isspace():
                cut = buf.rfind("\n", 0, cut)
            if cut > 0:
                yield buf[:cut]
                buf = buf[cut:]
    if buf:
        yield buf


VAL_BLOCK = 1024 + 1           # one eval window of the default block_size: block_size + 1 tokens
MIN_VAL_TOKENS = 4 * VAL_BLOCK  # prepare's default floor on the val split: 4 windows of block_size 1024
MAX_VAL_SHARE = 0.1            # the floor never takes more than this share of the corpus


def val_split_size(n: int, val_fraction: float, min_val_tokens: int) -> int:
    """Tokens of n that go to val: max(val_fraction * n, min(min_val_tokens, MAX_VAL_SHARE * n)). A fraction
    of a small corpus can be shorter than one window (0.0005 of 24k tokens = 12), which the floor prevents."""
    return max(math.ceil(n * val_fraction), min(min_val_tokens, math.floor(n * MAX_VAL_SHARE)))


def prepare(input: str, out_dir: str, tok: Tokenizer, val_fraction: float = 0.0005, min_val_tokens: int = MIN_VAL_TOKENS):
    """Tokenize text files (each one document, followed by eot) into out_dir/{train,val}.bin + meta.json.
    Streams: memory stays O(one piece). The last val_split_size(...) tokens (the last files, sorted) are val."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val_fraction={val_fraction} must be in (0, 1)")
    if min_val_tokens < 0:
        raise ValueError(f"--min_val_tokens={min_val_tokens} must be >= 0")
    files, dtype = _input_files(input), _dtype(tok.vocab_size)
    os.makedirs(out_dir, exist_ok=True)
    train_tmp, val_tmp, meta_path = (os.path.join(out_dir, f) for f in ("train.bin.tmp", "val.bin.tmp", "meta.json"))
    n = 0
    with open(train_tmp, "wb") as f, tqdm(total=sum(map(os.path.getsize, files)), unit="B", unit_scale=True,
                                          desc=f"tokenizing {len(files)} files") as bar:
        for path in files:
            for piece in _text_pieces(path):
                ids = tok.encode(piece)
                f.write(np.array(ids, dtype).tobytes())
                n += len(ids)
                bar.update(len(piece.encode("utf-8")))
            f.write(np.array([tok.eot_token], dtype).tobytes())
            n += 1
    n_val = val_split_size(n, val_fraction, min_val_tokens)
    with open(train_tmp, "r+b") as f, open(val_tmp, "wb") as g:  # move the tail into val.bin
        f.seek((n - n_val) * np.dtype(dtype).itemsize)
        shutil.copyfileobj(f, g)
        f.truncate((n - n_val) * np.dtype(dtype).itemsize)
    meta = dict(tokenizer=tok.name, vocab_size=tok.vocab_size, eot_token=tok.eot_token, dtype=dtype,
                train_tokens=n - n_val, val_tokens=n_val, documents=len(files))
    if os.path.exists(meta_path):  # no meta = not a finished folder, until the new one lands
        os.remove(meta_path)
    os.replace(train_tmp, os.path.join(out_dir, "train.bin"))
    os.replace(val_tmp, os.path.join(out_dir, "val.bin"))
    with open(meta_path + ".tmp", "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(meta_path + ".tmp", meta_path)
    print(f"wrote {n - n_val:,} train and {n_val:,} val tokens ({dtype}) to {out_dir}")
    print(f"val: {n_val:,} tokens = {n_val / VAL_BLOCK:.1f} blocks of {VAL_BLOCK - 1}+1 tokens (evaluates any "
          f"block_size <= {max(n_val - 1, 0):,})")
    if n_val < min_val_tokens:
        print(f"warning: the corpus ({n:,} tokens) is too small for --min_val_tokens={min_val_tokens} within "
              f"{MAX_VAL_SHARE:.0%} of it; val holds {n_val:,}: train with block_size <= {max(n_val - 1, 0):,} "
              f"or use a bigger corpus", file=sys.stderr)
    return meta


def _open_token_files(folder, tok):
    """{split: memmap} of a prepared folder, after checking meta.json against the run's tokenizer."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"fluency_data folder {folder!r} not found: make it with "
                                f"`python data.py prepare --input=... --out_dir={folder}`, or use fluency_data='pydoc'")
    meta_path, dtype = os.path.join(folder, "meta.json"), _dtype(tok.vocab_size)
    if not os.path.isfile(meta_path):  # e.g. a folder prepared by nanoGPT: its files work once it has a meta.json
        raise FileNotFoundError(f"{meta_path} missing: prepare {folder!r} with `python data.py prepare`, or write "
                                f'{{"tokenizer": "{tok.name}", "vocab_size": {tok.vocab_size}, "dtype": "{dtype}"}} there')
    with open(meta_path) as f:
        meta = json.load(f)
    if (meta.get("tokenizer"), meta.get("vocab_size")) != (tok.name, tok.vocab_size):
        raise ValueError(f"{meta_path}: tokenized with {meta.get('tokenizer')!r} (vocab {meta.get('vocab_size')}) but "
                         f"this run has tokenizer={tok.name!r} (vocab {tok.vocab_size}): set tokenizer or re-prepare")
    if meta.get("dtype") != dtype:
        raise ValueError(f"{meta_path}: dtype {meta.get('dtype')!r}, but vocab {tok.vocab_size} is stored as {dtype!r}")
    data = {}
    for split in ("train", "val"):
        path = os.path.join(folder, f"{split}.bin")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} missing: re-prepare {folder!r} with `python data.py prepare`")
        size, n = os.path.getsize(path), meta.get(f"{split}_tokens")
        if size % np.dtype(dtype).itemsize or (n is not None and size != n * np.dtype(dtype).itemsize):
            raise ValueError(f"{path}: {size} bytes do not match meta.json ({n} tokens of {dtype}): re-prepare {folder!r}")
        data[split] = np.memmap(path, dtype=dtype, mode="r")
    return data


def _pydoc_tokens(tok):
    from pydoc_data.topics import topics  # ~465k characters of Python docs, shipped with every CPython
    return np.array([t for key in sorted(topics) for t in tok.encode(topics[key]) + [tok.eot_token]], np.int64)


class FluencyData:
    """Random windows of block_size+1 tokens; batch `index` of a split is a pure function of (seed, split, index)."""

    def __init__(self, source: str, tok: Tokenizer, block_size: int, seed: int = 0):
        self.block_size, self.seed = block_size, seed
        if source == "pydoc":
            ids = _pydoc_tokens(tok)
            n_val = len(ids) // 10
            self.data = {"train": ids[:-n_val], "val": ids[-n_val:]}
        else:
            self.data = _open_token_files(source, tok)
        for split, d in self.data.items():
            if len(d) < block_size + 1:
                what = f"fluency_data {source!r}: {split}" if source == "pydoc" else os.path.join(source, f"{split}.bin")
                fix = (f"re-run `python data.py prepare` with --min_val_tokens={block_size + 1} or more (it takes at "
                       f"most {MAX_VAL_SHARE:.0%} of the corpus: else a larger --val_fraction or a bigger corpus)"
                       if split == "val" else "prepare a bigger corpus")
                raise ValueError(f"{what} holds {len(d):,} tokens, fewer than block_size+1={block_size + 1}: "
                                 f"{fix}, or lower block_size")

    def get_batch(self, split: str, index: int, batch_size: int) -> Batch:
        data, T = self.data[split], self.block_size
        rng = np.random.default_rng([self.seed, ("train", "val").index(split), index])
        ix = rng.integers(0, len(data) - T, size=batch_size)  # window [i, i+T] lies inside the data
        w = torch.from_numpy(np.stack([data[i:i + T + 1] for i in ix]).astype(np.int64))  # (B, T+1)
        x, y = w[:, :-1].contiguous(), w[:, 1:].contiguous()
        return Batch(x, y, "fluency", torch.zeros_like(x, dtype=torch.bool), torch.full_like(x, -1))

# -----------------------------------------------------------------------------
# synthetic reasoning tasks: generator(rng, level) -> (prompt, answer). add, mul and chain have a fixed size per
# level (L digits, L hops), so every operand digit sits at the same distance from the answer digit that needs it:
# with sizes mixed 1..L the model must first find the size, and a 4-layer model learned none of add/mul/chain in
# 2000 steps (README "Data"). Numbers are written least significant digit first and zero-padded, operands and
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


# hop and iter pose the same question, f applied L times, and differ in where f is. hop: in the prompt, a fresh
# map per example, so nothing can be memorised and each hop is one lookup in the context. iter: nowhere, one
# fixed map for the whole dataset, learnable as a table (the control). Both maps are single cycles: the L hops
# visit L+1 distinct symbols (no fixed point or short cycle to shortcut) and f^L differs for every L < cycle length.
HOP_SYMBOLS = "pqrstuvw"  # hop's symbols, one token each (no f: f names the map); prompts of 39 bytes, block_size >= 41
ITER_F = "8475692310"     # iter's f: d -> ITER_F[d], the 10-cycle 0>8>1>4>6>2>7>3>5>9>0, the same for every seed
ITER_WIDTH = 4            # iter applies f^L to each of 4 digits: 10^4 prompts per level (one digit: only 10)


def _hop(rng, level, ordered=False):  # level 2: 'w>t,q>s,v>r,r>p,u>q,p>w,t>u,s>v;f^2(r)=' -> 'w' (r>p>w)
    cycle = [HOP_SYMBOLS[i] for i in rng.permutation(len(HOP_SYMBOLS))]  # f(cycle[i]) = cycle[i + 1]: a random 8-cycle
    f = {a: b for a, b in zip(cycle, cycle[1:] + cycle[:1])}
    keys = sorted(f) if ordered else [cycle[i] for i in rng.permutation(len(cycle))]  # hopo: keys p..w in order
    start = int(rng.integers(len(cycle)))
    return ",".join(f"{k}>{f[k]}" for k in keys) + f";f^{level}({cycle[start]})=", cycle[(start + level) % len(cycle)]


def _iter(rng, level):  # level 2: 'f^2(4071)=' -> '2156': f = ITER_F twice on each digit (4>6>2, 0>8>1, ...)
    x = "".join(map(str, rng.integers(10, size=ITER_WIDTH)))
    y = x
    for _ in range(level):
        y = "".join(ITER_F[int(d)] for d in y)
    return f"f^{level}({x})=", y


# family: (generator, max level, longest prompt+answer in characters: a bound on tokens for both tokenizers)
TASKS = {
    "add": (_add, 18, lambda L: 3 * L + 3),
    "mul": (_mul, 18, lambda L: 2 * L + 4),
    "chain": (_chain, 25, lambda L: 6 * L + 7),
    "sort": (_sort, 60, lambda L: 2 * L + 7),
    "hop": (_hop, len(HOP_SYMBOLS) - 1, lambda L: 4 * len(HOP_SYMBOLS) + 8),  # keys in random order
    "hopo": (lambda rng, L: _hop(rng, L, ordered=True), len(HOP_SYMBOLS) - 1, lambda L: 4 * len(HOP_SYMBOLS) + 8),
    "iter": (_iter, len(ITER_F) - 1, lambda L: 10 + ITER_WIDTH),
}
DEFAULT_TASKS = "add:2,mul:2,chain:2,sort:8"  # measured on the CPU preset: README "Data"
EVAL_STREAM = 1_000_003  # the synthetic eval set's rng key: the same for every seed and every suite


def parse_tasks(spec: str) -> list:
    """'add:3,chain:2' -> [('add', 3), ('chain', 2)]"""
    tasks = []
    for item in spec.split(","):
        name, _, level = item.strip().partition(":")
        if name not in TASKS:
            raise ValueError(f"reasoning_tasks={spec!r}: unknown task {name!r}; families: {', '.join(TASKS)}")
        if not level.isdigit() or not 1 <= int(level) <= TASKS[name][1]:
            raise ValueError(f"reasoning_tasks={spec!r}: {item.strip()!r} needs a level 1..{TASKS[name][1]}, e.g. '{name}:3'")
        tasks.append((name, int(level)))
    return tasks


def is_eval_prompt(prompt: str) -> bool:
    """The held-out 10% of the prompt space, by a stable hash (never Python's salted hash())."""
    return int.from_bytes(hashlib.blake2b(prompt.encode("utf-8"), digest_size=8).digest(), "little") % 100 < 10


def _draw(task, rng, eval_side):
    """One example of task (name, level) from the eval or the train side of the hash split, by rejection."""
    for _ in range(10_000):
        prompt, answer = TASKS[task[0]][0](rng, task[1])
        if is_eval_prompt(prompt) == eval_side:
            return prompt, answer
    raise ValueError(f"reasoning_tasks: {task[0]}:{task[1]} has too few prompts for a train/eval split; raise its level")

# -----------------------------------------------------------------------------
# JSONL reasoning data

def _jsonl_example(ex, gsm8k_answer):
    strings = lambda *keys: isinstance(ex, dict) and all(isinstance(ex.get(k), str) for k in keys)
    if strings("prompt", "answer"):
        return ex["prompt"], ex["answer"]
    if not strings("question", "answer"):
        raise ValueError('expected {"prompt": str, "answer": str} or GSM8K {"question": str, "answer": str}')
    if gsm8k_answer == "solution":
        return ex["question"] + "\n", ex["answer"]
    solution, sep, final = ex["answer"].rpartition("####")
    if not sep or not final.strip():
        raise ValueError('GSM8K answer must end with "#### <final answer>"')
    return f"{ex['question']}\n{solution}#### ", final.strip()


def read_jsonl(path: str, gsm8k_answer: str = "final") -> list:
    """[(prompt, answer)] from a .jsonl file; GSM8K lines are split according to gsm8k_answer."""
    if gsm8k_answer not in ("final", "solution"):
        raise ValueError(f"gsm8k_answer={gsm8k_answer!r}: use 'final' or 'solution'")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reasoning data file {path!r} not found")
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    examples.append(_jsonl_example(json.loads(line), gsm8k_answer))
                except ValueError as e:  # json's decode error is a ValueError too
                    raise ValueError(f"{path}:{lineno}: {e}") from None
    if not examples:
        raise ValueError(f"{path}: no examples (empty file)")
    return examples

# -----------------------------------------------------------------------------
# reasoning batches

class ReasoningData:
    """(prompt, answer) examples packed into rows with answer-span masks; synthetic suite or JSONL."""

    def __init__(self, source: str, tok: Tokenizer, block_size: int, seed: int = 0, eval_source: str = "",
                 tasks: str = DEFAULT_TASKS, gsm8k_answer: str = "final"):
        self.tok, self.block_size, self.seed = tok, block_size, seed
        if source == "synthetic":
            self.tasks = parse_tasks(tasks)
            longest, what = max(TASKS[name][2](level) for name, level in self.tasks), f"reasoning_tasks={tasks!r}"
            for task, eval_side in itertools.product(self.tasks, (True, False)):  # a task too small to split fails now
                _draw(task, np.random.default_rng(0), eval_side)
        else:
            self.tasks = None
            examples = read_jsonl(source, gsm8k_answer)
            self.evals = read_jsonl(eval_source, gsm8k_answer) if eval_source else \
                [e for e in examples if is_eval_prompt(e[0])]
            held_out = {prompt for prompt, _ in self.evals}  # no eval prompt is ever trained on
            self.train = [self._encode(p, a) for p, a in examples if p not in held_out]
            if not self.train or not self.evals:
                raise ValueError(f"reasoning_data {source!r}: {len(self.train)} train and {len(self.evals)} eval examples "
                                 "after the split; set reasoning_eval_data to a separate .jsonl file")
            lengths = [len(p) + len(a) for p, a in self.train + [self._encode(p, a) for p, a in self.evals]]
            longest, what = max(lengths), f"reasoning_data {source!r}"
        if 1 + longest + 1 > block_size + 1:  # leading eot + example + closing eot
            raise ValueError(f"{what}: an example of up to {longest} tokens needs block_size >= {longest + 1}, "
                             f"got block_size={block_size}")

    def _encode(self, prompt, answer):
        return self.tok.encode(prompt), self.tok.encode(answer)

    def _batch(self, rows, trim=False) -> Batch:
        """Rows of examples -> Batch of width block_size, or (trim) of the longest row: trailing padding only."""
        eot = self.tok.eot_token
        x = np.full((len(rows), self.block_size), eot, np.int64)  # (B, T)
        y, answer_id = np.full_like(x, -1), np.full_like(x, -1)
        width = 0
        for r, row in enumerate(rows):
            buf = [eot]
            for prompt, answer, i in row:
                s = len(buf) + len(prompt)  # buf index of the first answer token
                buf += prompt + answer + [eot]
                answer_id[r, s - 1:s + len(answer)] = i  # target t is buf[t+1]: the answer tokens and the closing eot
            x[r, :len(buf) - 1], y[r, :len(buf) - 1] = buf[:-1], buf[1:]
            width = max(width, len(buf) - 1)
        x, y, answer_id = (torch.from_numpy(a[:, :width] if trim else a) for a in (x, y, answer_id))
        return Batch(x, y, "reasoning", answer_id >= 0, answer_id)

    def _train_example(self, rng):
        if self.tasks:
            return self._encode(*_draw(self.tasks[rng.integers(len(self.tasks))], rng, False))
        return self.train[rng.integers(len(self.train))]

    def get_batch(self, index: int, batch_size: int) -> Batch:
        """Training batch `index`, a pure function of (seed, index): examples packed greedily, one that does not
        fit starts the next row."""
        rng = np.random.default_rng([self.seed, index])
        rows, row, used = [], [], 1  # used: tokens in the row, the leading eot included
        for i in itertools.count():
            prompt, answer = self._train_example(rng)
            if used + len(prompt) + len(answer) + 1 > self.block_size + 1:
                rows.append(row)
                if len(rows) == batch_size:
                    return self._batch(rows)
                row, used = [], 1
            row.append((prompt, answer, i))
            used += len(prompt) + len(answer) + 1

    def eval_examples(self, n_examples: int) -> list:
        """The fixed eval set, [(prompt, answer)]: synthetic example i is the (i // n_tasks)-th of task i % n_tasks,
        independent of the seed and of the other tasks; a JSONL eval set is its first n_examples lines."""
        if self.tasks is None:
            return self.evals[:n_examples]
        n = len(self.tasks)
        return [_draw(self.tasks[i % n], np.random.default_rng([EVAL_STREAM, i // n]), True) for i in range(n_examples)]

    def eval_tags(self, n_examples: int) -> list:
        """Which task each eval example comes from ('add:3', ...; 'jsonl' for files), for per-task metrics."""
        if self.tasks is None:
            return ["jsonl"] * len(self.eval_examples(n_examples))
        return ["%s:%d" % self.tasks[i % len(self.tasks)] for i in range(n_examples)]

    def eval_batches(self, batch_size: int, n_examples: int) -> list:
        """eval_examples(n_examples), one per row, so each is scored on exactly the context greedy decoding from
        [eot] + prompt has (no earlier example in the row); answer_id = the example's index in that list."""
        rows = [[(*self._encode(p, a), i)] for i, (p, a) in enumerate(self.eval_examples(n_examples))]
        return [self._batch(rows[i:i + batch_size], trim=True) for i in range(0, len(rows), batch_size)]

# -----------------------------------------------------------------------------
# routing (ii) and the global micro-batch index

class Router:
    """Step s is a reasoning step iff floor((s+1) rho) > floor(s rho): rho spread evenly, the same on every rank."""

    def __init__(self, reasoning_fraction: float):
        if not 0 <= reasoning_fraction <= 1:
            raise ValueError(f"reasoning_fraction={reasoning_fraction} must be in [0, 1]")
        self.rho = reasoning_fraction

    def kind(self, step: int) -> str:
        return "reasoning" if math.floor((step + 1) * self.rho) > math.floor(step * self.rho) else "fluency"


def micro_batch_index(step: int, micro_step: int, rank: int, world_size: int, grad_accum: int) -> int:
    """Global index of a micro-batch; grad_accum = micro-batches per optimizer step over all ranks.
    Rank r of W takes r, r+W, ... within the step, so the examples do not depend on W."""
    if grad_accum % world_size:
        raise ValueError(f"gradient_accumulation_steps={grad_accum} must be divisible by the world size {world_size}")
    return step * grad_accum + micro_step * world_size + rank

# -----------------------------------------------------------------------------

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="nanoRLRP data tools")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="tokenize text files into train.bin/val.bin/meta.json")
    p.add_argument("--input", required=True, help="a text file, a folder (all files in it, recursively) or a glob")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--tokenizer", default="gpt2", choices=["gpt2", "byte"])
    p.add_argument("--tokenizer_file", default="")
    p.add_argument("--val_fraction", type=float, default=0.0005, help="share of the tokens for val (the tail)")
    p.add_argument("--min_val_tokens", type=int, default=MIN_VAL_TOKENS,
                   help=f"val holds at least this many tokens (default: {MIN_VAL_TOKENS // VAL_BLOCK} windows of block_size "
                        f"1024), capped at {MAX_VAL_SHARE:.0%} of the corpus")
    p = sub.add_parser("fetch_tokenizer", help="download GPT-2's ranks file gpt2.tiktoken from PyPI")
    p.add_argument("--out", default=".")
    p = sub.add_parser("show", help="print eval examples of the synthetic suite")
    p.add_argument("--reasoning_tasks", default=DEFAULT_TASKS)
    p.add_argument("--n", type=int, default=3)
    args = ap.parse_args()
    try:
        if args.cmd == "prepare":
            prepare(args.input, args.out_dir, get_tokenizer(args.tokenizer, args.tokenizer_file), args.val_fraction,
                    args.min_val_tokens)
        elif args.cmd == "fetch_tokenizer":
            print(fetch_gpt2_ranks(args.out))
        else:
            rd = ReasoningData("synthetic", get_tokenizer("byte"), 1024, tasks=args.reasoning_tasks)
            n = args.n * len(rd.tasks)
            for tag, (prompt, answer) in zip(rd.eval_tags(n), rd.eval_examples(n)):
                print(f"{tag:10s} {prompt!r:40s} -> {answer!r}")
    except (ValueError, FileNotFoundError) as e:  # bad input: one line, no traceback
        sys.exit(f"error: {e}")
