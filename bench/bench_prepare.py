"""
Throughput of `python data/prepare.py fluency` (README "Performance"): tokens/s with 1, 2, ... processes, side
by side with a plain single-process loop of tiktoken's encode_ordinary over the same documents.

  python bench/bench_prepare.py [--num_proc=1,2] [--repeat=4] [--docs=0] [--rounds=3] [--tokenizer_file=PATH]

The documents are this Python's standard library (*.py files, offline on every machine), saved as a
datasets save_to_disk folder, the path a hub corpus takes (needs `pip install datasets`). Each round runs the
plain loop and then prepare with each num_proc; the table shows each one's median over the rounds.
Targets: prepare with 1 process >= 0.9x the plain loop, and n processes within 10% of n x 1 process.
"""

import os
import sys
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "data")]  # the root (data.py) and data/ (prepare.py, sources.py)

import argparse
import collections
import glob
import multiprocessing
import statistics
import sysconfig
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout

from data import get_tokenizer
from prepare import prepare
from sources import _import_datasets, open_source


def stdlib_documents(repeat, docs=0):
    """The standard library's .py files (not site-packages), sorted by path, the first `docs` (0: all),
    `repeat` times: real text, the same on every machine with this Python."""
    pattern = os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py")
    files = sorted(f for f in glob.glob(pattern, recursive=True) if "site-packages" not in f)
    return [open(f, encoding="utf-8", errors="replace").read() for f in files[:docs or None]] * repeat


def plain_loop(docs, enc):
    """Tokens/s of encode_ordinary over docs in this process (+1 per document: the eot prepare appends)."""
    t0, n = time.perf_counter(), 0
    for doc in docs:
        n += len(enc.encode_ordinary(doc)) + 1
    return n / (time.perf_counter() - t0)


_docs, _enc = None, None  # a side-by-side worker's documents and encoder


def _init_plain(repeat, docs, tokenizer_file):
    global _docs, _enc
    _docs, _enc = stdlib_documents(repeat, docs), get_tokenizer("gpt2", tokenizer_file).enc


def _plain_slice(i_n):
    i, n = i_n
    return sum(len(_enc.encode_ordinary(doc)) + 1 for doc in _docs[i::n])


def plain_side_by_side(n_proc, args):
    """Tokens/s of n_proc independent plain loops at once, each over 1/n_proc of the documents: what this
    machine gives n_proc processes that never talk to each other (the documents are loaded before timing)."""
    spawn = multiprocessing.get_context("spawn")  # as prepare starts its workers
    with spawn.Pool(n_proc, _init_plain, (args.repeat, args.docs, args.tokenizer_file)) as pool:
        pool.map(abs, range(n_proc), chunksize=1)  # every worker is up and has its documents
        t0 = time.perf_counter()
        n = sum(pool.map(_plain_slice, [(i, n_proc) for i in range(n_proc)], chunksize=1))
        return n / (time.perf_counter() - t0)


def prepare_rate(folder, out_dir, tok, num_proc):
    with open(os.devnull, "w") as null, redirect_stdout(null), redirect_stderr(null):  # no progress bar
        t0 = time.perf_counter()
        meta = prepare(open_source(input=folder), out_dir, tok, num_proc=num_proc, min_val_tokens=0)
        seconds = time.perf_counter() - t0
    for f in os.listdir(out_dir):  # the next run starts from nothing, not from this one's shards
        os.remove(os.path.join(out_dir, f))
    return meta["tokens"] / seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--num_proc", default="1,2", help="comma-separated process counts")
    ap.add_argument("--repeat", type=int, default=4, help="copies of the standard library's files")
    ap.add_argument("--docs", type=int, default=0, help="only the first this many files (0: all)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokenizer_file", default="", help="GPT-2's gpt2.tiktoken, offline")
    args = ap.parse_args()
    procs = [int(p) for p in args.num_proc.split(",")]
    tok = get_tokenizer("gpt2", args.tokenizer_file)
    docs = stdlib_documents(args.repeat, args.docs)
    rates = collections.defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp:
        folder, out_dir = os.path.join(tmp, "docs"), os.path.join(tmp, "out")
        _import_datasets().Dataset.from_dict({"text": docs}).save_to_disk(folder)
        print(f"{len(docs):,} documents, {sum(map(len, docs)) / 1e6:.1f}M characters, {args.rounds} rounds, "
              f"{os.cpu_count()} cores")
        for _ in range(args.rounds):
            rates["plain", 1].append(plain_loop(docs, tok.enc))
            for p in procs:
                if p > 1:
                    rates["plain", p].append(plain_side_by_side(p, args))
                rates["prepare", p].append(prepare_rate(folder, out_dir, tok, p))
    rate = {key: statistics.median(r) for key, r in rates.items()}
    print(f"{'':38s} {'tokens/s':>11s} {'per process':>11s} {'/ plain':>8s} {'/ linear':>8s}")
    for (what, p), r in sorted(rate.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        name = f"prepare num_proc={p}" if what == "prepare" else \
            f"plain encode_ordinary x{p}" + (" side by side" if p > 1 else "")
        linear = p * rate[what, 1] if (what, 1) in rate else float("nan")
        print(f"{name:38s} {r:11,.0f} {r / p:11,.0f} {r / rate['plain', p]:8.2f} {r / linear:8.2f}")
    print("/ plain: vs as many plain loops side by side; / linear: vs num_proc x the same with 1 process")

if __name__ == "__main__":
    main()
