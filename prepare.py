"""
Data preparation, before training: GPT-2's tokenizer file, and text files tokenized into fluency token files.

fetch_gpt2_ranks gets GPT-2's ranks file gpt2.tiktoken from the openai-whisper sdist on PyPI, for machines
where tiktoken cannot download it. prepare tokenizes text files, streaming, into nanoGPT's format: a folder
with train.bin, val.bin and meta.json, which data.FluencyData reads. val is the corpus' tail, of N tokens:
max(val_fraction * N, min(min_val_tokens, 10% of N)).

Both run from data.py's CLI: `python data.py prepare ...` and `python data.py fetch_tokenizer --out=DIR`.
"""

import glob
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

import numpy as np
from tqdm import tqdm

from data import Tokenizer, check_gpt2_ranks, token_dtype

# its sdist ships whisper/assets/gpt2.tiktoken, identical to tiktoken's r50k_base.tiktoken
WHISPER_SDIST = "openai-whisper==20250625"


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
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)
    return path

# -----------------------------------------------------------------------------
# fluency token files: text files in, nanoGPT's train.bin/val.bin plus meta.json out

def _input_files(input):
    if os.path.isfile(input):
        return [input]
    pattern = os.path.join(input, "**", "*") if os.path.isdir(input) else input  # glob skips hidden files
    files = sorted(f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
    if not files:
        raise FileNotFoundError(f"--input={input!r}: no such file, no files in that folder, or no glob match")
    return files


def _text_pieces(path, chunk_chars=1 << 20):
    """Yield a text file in pieces, each cut just before a newline that precedes a non-space character:
    GPT-2's pre-tokenizer splits the same way there at a string's end and inside it, so the tokens equal
    the whole file's."""
    buf = ""
    # errors="replace": a stray bad byte should not stop a long prepare
    with open(path, encoding="utf-8", errors="replace") as f:
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


def _tokenize(files, tok, dtype, out_path):
    """Write the files' tokens to out_path, each file followed by eot; return how many tokens."""
    n = 0
    with open(out_path, "wb") as f, tqdm(total=sum(map(os.path.getsize, files)), unit="B", unit_scale=True,
                                         desc=f"tokenizing {len(files)} files") as bar:
        for path in files:
            for piece in _text_pieces(path):
                ids = tok.encode(piece)
                f.write(np.array(ids, dtype).tobytes())
                n += len(ids)
                bar.update(len(piece.encode("utf-8")))
            f.write(np.array([tok.eot_token], dtype).tobytes())
            n += 1
    return n


VAL_BLOCK = 1024 + 1           # one eval window of the default block_size: block_size + 1 tokens
MIN_VAL_TOKENS = 4 * VAL_BLOCK  # prepare's default floor on the val split: 4 windows of block_size 1024
MAX_VAL_SHARE = 0.1            # the floor never takes more than this share of the corpus


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


def prepare(input: str, out_dir: str, tok: Tokenizer, val_fraction: float = 0.0005,
            min_val_tokens: int = MIN_VAL_TOKENS):
    """Tokenize text files (each one document, followed by eot) into out_dir/{train,val}.bin + meta.json.
    Streams: memory stays O(one piece). val is the last val_split_size(...) tokens: the last files, sorted."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val_fraction={val_fraction} must be in (0, 1)")
    if min_val_tokens < 0:
        raise ValueError(f"--min_val_tokens={min_val_tokens} must be >= 0")
    files, dtype = _input_files(input), token_dtype(tok.vocab_size)
    os.makedirs(out_dir, exist_ok=True)
    train_tmp, val_tmp, meta_path = (os.path.join(out_dir, f)
                                     for f in ("train.bin.tmp", "val.bin.tmp", "meta.json"))
    n = _tokenize(files, tok, dtype, train_tmp)
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
    _report_val_split(n, n_val, min_val_tokens)
    return meta
