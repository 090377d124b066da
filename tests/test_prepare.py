"""data/prepare.py and the token files training reads: text files and Hugging Face datasets (built here, offline:
save_to_disk, parquet, JSONL, arrow, a local copy of a hub repository) into shards + meta.json, resume after
a kill, the val split, GSM8K to JSONL, the throughput benchmark. Expected tokens come from tiktoken's own
r50k_base definition (or the UTF-8 bytes), documents joined by end-of-text, never from the code under test."""

import functools
import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import tarfile
import time

import datasets
import numpy as np
import pytest
import tiktoken
import torch
from tiktoken.load import load_tiktoken_bpe

from conftest import ROOT, run_script
from data import FluencyData
from tasks import read_jsonl
from prepare import MIN_VAL_TOKENS, fetch_gpt2_ranks, prepare, prepare_reasoning
from sources import _text_pieces, open_source
from test_data import GSM8K, PARAGRAPH, TEXTS

PREPARE = os.path.join("data", "prepare.py")  # the data CLI, run from the project root

DOCS = TEXTS + [PARAGRAPH, "", "<|endoftext|> is text, not eot", None] + \
    [f"Document {i}: " + " ".join(f"word{i * j % 97}" for j in range(i % 23)) + "\n\n  indented\n"
     for i in range(60)]


class WideTok:
    """A tokenizer whose ids do not fit uint16: 70000 + each UTF-8 byte."""
    name, vocab_size, eot_token, sha256 = "wide", 70_257, 70_256, "w" * 64

    def encode_array(self, text):
        return np.array([70_000 + b for b in text.encode("utf-8")], np.uint32)


@pytest.fixture(scope="module")
def r50k(gpt2_tokenizer_file):
    from tiktoken_ext.openai_public import r50k_pat_str  # tiktoken's own r50k_base definition
    return tiktoken.Encoding(name="r50k_base", pat_str=r50k_pat_str, special_tokens={"<|endoftext|>": 50256},
                             mergeable_ranks=load_tiktoken_bpe(gpt2_tokenizer_file))


def joined(docs, encode, eot):
    """The documents' tokens, each followed by eot: what prepare must write."""
    return [t for doc in docs for t in encode(doc or "") + [eot]]


def stream(folder):
    """A prepared folder's tokens: meta.json's shards concatenated, read with numpy alone."""
    meta = json.load(open(os.path.join(folder, "meta.json")))
    return np.concatenate([np.fromfile(os.path.join(folder, s["file"]), meta["dtype"])
                           for s in meta["shards"]]).tolist()


def leftovers(folder):
    """Files a finished prepare must not leave: temporary shards, progress.json."""
    return [f for f in os.listdir(folder) if f.endswith(".tmp") or f == "progress.json"]


def dataset_inputs(tmp_path, docs):
    """The same documents as each local input prepare takes; {kind: open_source(...) kwargs}."""
    ds = datasets.Dataset.from_dict({"id": list(range(len(docs))), "text": docs})
    ds.save_to_disk(str(tmp_path / "disk"))
    os.makedirs(tmp_path / "pq")
    ds.to_parquet(str(tmp_path / "pq" / "part-0.parquet"))
    ds.to_json(str(tmp_path / "docs.jsonl"))
    repo = tmp_path / "repo"  # a hub repository's layout, as `huggingface-cli download` leaves it
    os.makedirs(repo / "sub")
    ds.to_parquet(str(repo / "sub" / "train-00000-of-00001.parquet"))
    (repo / "README.md").write_text("---\nconfigs:\n- config_name: sub\n  data_files:\n  - split: train\n"
                                    "    path: sub/train-*\n---\n")
    arrow = next(f for f in os.listdir(tmp_path / "disk") if f.endswith(".arrow"))
    return {"save_to_disk": dict(input=str(tmp_path / "disk")),
            "parquet": dict(input=str(tmp_path / "pq")),
            "jsonl": dict(input=str(tmp_path / "docs.jsonl")),
            "arrow": dict(input=str(tmp_path / "disk" / arrow)),
            "hub repository": dict(hf_dataset=str(repo), hf_config="sub", split="train")}

# -----------------------------------------------------------------------------
# what prepare writes


def test_every_dataset_input_is_tiktoken_joined_by_eot(tmp_path, gpt2, r50k, gpt2_tokenizer_file):
    want = joined(DOCS, r50k.encode_ordinary, 50256)
    sha = hashlib.sha256(open(gpt2_tokenizer_file, "rb").read()).hexdigest()
    for i, (kind, kwargs) in enumerate(dataset_inputs(tmp_path, DOCS).items()):
        out = str(tmp_path / f"out{i}")
        meta = prepare(open_source(**kwargs), out, gpt2, num_proc=1 + i % 2, shard_tokens=300, task_chars=500,
                       min_val_tokens=0)
        assert stream(out) == want, kind
        shards = [s["tokens"] for s in meta["shards"]]
        assert len(shards) >= 4 and min(shards[:-1]) >= 300 and sum(shards) == meta["tokens"] == len(want)
        assert (meta["documents"], meta["dtype"], meta["tokenizer"], meta["tokenizer_sha256"]) == \
            (len(DOCS), "uint16", "gpt2", sha), kind
        assert (meta["train_tokens"] + meta["val_tokens"] == len(want)
                and meta == json.load(open(out + "/meta.json")))
        assert leftovers(out) == []


@pytest.mark.slow
def test_workers_started_by_spawn(tmp_path, gpt2_tokenizer_file, r50k):
    """macOS's and Windows' start method (and forkserver, Python 3.14's Linux default) pickles the tokenizer
    and the dataset for each worker instead of forking: the same tokens."""
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(tmp_path / "disk"))
    script = ("import multiprocessing, sys\n"
              "if __name__ == '__main__':\n"
              "    multiprocessing.set_start_method('spawn', force=True)\n"
              "    from data import get_tokenizer\n"
              "    from prepare import prepare\n"
              "    from sources import open_source\n"
              "    tok = get_tokenizer('gpt2', sys.argv[3])\n"
              "    prepare(open_source(sys.argv[1]), sys.argv[2], tok, num_proc=2, shard_tokens=300,\n"
              "            task_chars=500)\n")
    (tmp_path / "spawned.py").write_text(script)
    args = [str(tmp_path / "spawned.py"), str(tmp_path / "disk"), str(tmp_path / "out"), gpt2_tokenizer_file]
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1",
                                PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "data")])))
    assert r.returncode == 0, r.stderr
    assert stream(tmp_path / "out") == joined(DOCS, r50k.encode_ordinary, 50256)


def test_text_files_the_same_in_one_shard_or_many_and_any_process_count(tmp_path, byte):
    texts = write_corpus(tmp_path / "corpus")
    want = joined(texts, lambda t: list(t.encode("utf-8")), 256)
    one = prepare(open_source(str(tmp_path / "corpus")), str(tmp_path / "one"), byte, val_fraction=0.1,
                  num_proc=1)
    many = prepare(open_source(str(tmp_path / "corpus")), str(tmp_path / "many"), byte, val_fraction=0.1,
                   num_proc=2, shard_tokens=40, task_chars=30)
    assert stream(tmp_path / "one") == stream(tmp_path / "many") == want
    assert len(one["shards"]) == 1 and len(many["shards"]) == 3 and one["documents"] == many["documents"] == 3
    assert one["val_tokens"] == many["val_tokens"] == math.ceil(0.1 * len(want))
    assert sorted(os.listdir(tmp_path / "one")) == ["meta.json", "tokens_000000.bin"]
    glob_only = prepare(open_source(str(tmp_path / "corpus" / "*.txt")), str(tmp_path / "glob"), byte)
    assert stream(tmp_path / "glob") == joined(texts[:2], lambda t: list(t.encode("utf-8")), 256)
    assert glob_only["source"] == str(tmp_path / "corpus" / "*.txt")


def write_corpus(root):
    texts = {"a.txt": "First document.\n" * 50, "b.txt": "Zweites Dokument — ünïcödé 🙂\n\nline\n",
             "sub/c.txt": "third " * 300, ".hidden.txt": "never read"}
    for name, text in texts.items():
        os.makedirs(os.path.dirname(root / name), exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return [texts[k] for k in ("a.txt", "b.txt", "sub/c.txt")]  # sorted order, hidden files skipped


def test_a_file_read_in_pieces_tokenizes_like_the_whole(tmp_path, gpt2, r50k, monkeypatch):
    """A file read in small pieces tokenizes exactly like the whole file at once (GPT-2 BPE); an empty file
    is an empty document (just its eot)."""
    text = "".join(f"Line {i}:  it's   here\n\n  indented {i * 37}\n\t\ttabbed\n\n\n" for i in range(200))
    text += PARAGRAPH
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "big.txt").write_text(text, encoding="utf-8")
    (tmp_path / "in" / "empty.txt").write_text("")
    whole = r50k.encode_ordinary(open(tmp_path / "in" / "big.txt", encoding="utf-8").read()) + [50256, 50256]
    pieces = functools.partial(_text_pieces, chunk_chars=40)
    assert len(list(pieces(str(tmp_path / "in" / "big.txt")))) > 100  # the file really is cut in many pieces
    monkeypatch.setattr("sources._text_pieces", pieces)
    prepare(open_source(str(tmp_path / "in")), str(tmp_path / "out"), gpt2, num_proc=2, shard_tokens=500,
            task_chars=300)
    assert stream(tmp_path / "out") == whole


def test_large_vocab_is_stored_as_uint32(tmp_path):
    (tmp_path / "doc.txt").write_text("wide vocabulary " * 20)
    meta = prepare(open_source(str(tmp_path / "doc.txt")), str(tmp_path / "out"), WideTok(), val_fraction=0.1)
    want = [70_000 + b for b in ("wide vocabulary " * 20).encode()] + [70_256]
    assert meta["dtype"] == "uint32" and stream(tmp_path / "out") == want
    assert os.path.getsize(tmp_path / "out" / "tokens_000000.bin") == 4 * len(want)
    b = FluencyData(str(tmp_path / "out"), WideTok(), 8).get_batch("train", 0, 4)
    assert b.x.min() >= 70_000 and torch.equal(b.x[:, 1:], b.y[:, :-1])

# -----------------------------------------------------------------------------
# what training reads


def test_shard_boundaries_lose_nothing(tmp_path, byte):
    """Many shards read as the one stream they cut: every window, those across a boundary included, and every
    batch equal those of the same tokens in one shard."""
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(tmp_path / "disk"))
    prepare(open_source(str(tmp_path / "disk")), str(tmp_path / "one"), byte, val_fraction=0.2)
    meta = prepare(open_source(str(tmp_path / "disk")), str(tmp_path / "many"), byte, val_fraction=0.2,
                   shard_tokens=37, task_chars=20)
    tokens, cut = np.array(stream(tmp_path / "one")), meta["train_tokens"]
    one, many = (FluencyData(str(tmp_path / d), byte, 16, seed=1) for d in ("one", "many"))
    assert len(many.data["train"]) == cut and len(many.data["val"]) == len(tokens) - cut
    for split, lo in (("train", 0), ("val", cut)):
        s = many.data[split]
        for i in range(len(s) - 17):
            assert s[i:i + 17].tolist() == tokens[lo + i:lo + i + 17].tolist()
        for index in range(20):
            a, b = one.get_batch(split, index, 8), many.get_batch(split, index, 8)
            assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    bounds = np.cumsum([s["tokens"] for s in meta["shards"]])
    assert len(bounds) > 20 and any(0 < b < cut for b in bounds)


def test_fluency_windows_inside_the_stream_and_shifted(tmp_path, byte):
    (tmp_path / "doc.txt").write_text("".join(chr(65 + i % 26) + str(i % 7) for i in range(60)))
    meta = prepare(open_source(str(tmp_path / "doc.txt")), str(tmp_path / "out"), byte, val_fraction=0.2)
    T, all_tokens = 16, stream(tmp_path / "out")
    train, v = all_tokens[:meta["train_tokens"]], all_tokens[meta["train_tokens"]:]
    windows = {tuple(train[i:i + T + 1]): i for i in range(len(train) - T)}
    fd = FluencyData(str(tmp_path / "out"), byte, T, seed=3)
    starts = set()
    for index in range(200):
        b = fd.get_batch("train", index, 4)
        assert b.x.shape == b.y.shape == (4, T) and b.x.dtype == b.y.dtype == torch.int64
        assert b.kind == "fluency"
        assert torch.equal(b.x[:, 1:], b.y[:, :-1]) and not b.answer_mask.any() and (b.answer_id == -1).all()
        for r in range(4):
            starts.add(windows[tuple(b.x[r].tolist() + [b.y[r, -1].item()])])  # KeyError = outside train
    assert starts == set(range(len(train) - T)), "every window, the last one included, is drawn"
    val = fd.get_batch("val", 0, 2)
    assert all(tuple(val.x[r].tolist()) in {tuple(v[i:i + T]) for i in range(len(v) - T)} for r in range(2))
    # a pure function of (seed, split, index)
    batch7 = lambda seed: FluencyData(str(tmp_path / "out"), byte, T, seed=seed).get_batch("train", 7, 4).x
    assert torch.equal(fd.get_batch("train", 7, 4).x, batch7(3))
    assert not torch.equal(fd.get_batch("train", 7, 4).x, fd.get_batch("train", 8, 4).x)
    assert not torch.equal(fd.get_batch("train", 7, 4).x, batch7(4))


def test_nanogpt_folder_reads_train_bin_then_val_bin(tmp_path, byte):
    """nanoGPT's train.bin/val.bin (and this project's older prepares) with a hand-written meta.json."""
    train, val = np.arange(100, dtype=np.uint16) % 250, (np.arange(40, dtype=np.uint16) * 7) % 250
    train.tofile(tmp_path / "train.bin")
    val.tofile(tmp_path / "val.bin")
    (tmp_path / "meta.json").write_text('{"tokenizer": "byte", "vocab_size": 257, "dtype": "uint16"}')
    fd = FluencyData(str(tmp_path), byte, 8)
    assert (fd.data["train"][0:100].tolist() == train.tolist()
            and fd.data["val"][0:40].tolist() == val.tolist())
    assert len(fd.data["train"]) == 100 and len(fd.data["val"]) == 40


def test_fluency_errors(tmp_path, byte):
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        FluencyData(str(tmp_path / "missing_dir"), byte, 8)
    with pytest.raises(FileNotFoundError, match="--input"):
        open_source(str(tmp_path / "nothing*.txt"))
    (tmp_path / "doc.txt").write_text("some text for the tests " * 10)
    out = tmp_path / "out"
    prepare(open_source(str(tmp_path / "doc.txt")), str(out), byte, val_fraction=0.1)
    with pytest.raises(ValueError, match="block_size"):  # val holds 25 tokens
        FluencyData(str(out), byte, 64)
    with pytest.raises(ValueError, match="'byte'.*tokenizer='wide'"):
        FluencyData(str(out), WideTok(), 8)
    meta = json.load(open(out / "meta.json"))
    for bad, match in [({"dtype": "uint32"}, "dtype 'uint32'"),
                       ({"tokenizer_sha256": "0" * 64}, "vocabulary of sha256 0{64}, not this run.s .byte.")]:
        json.dump({**meta, **bad}, open(out / "meta.json", "w"))
        with pytest.raises(ValueError, match=match):
            FluencyData(str(out), byte, 8)
    json.dump(meta, open(out / "meta.json", "w"))
    with open(out / "tokens_000000.bin", "ab") as f:
        f.write(b"\0")  # half a token
    with pytest.raises(ValueError, match="tokens_000000.bin"):
        FluencyData(str(out), byte, 8)
    os.remove(out / "meta.json")
    with pytest.raises(FileNotFoundError, match='meta.json missing.*resumes.*"tokenizer": "byte"'):
        FluencyData(str(out), byte, 8)

# -----------------------------------------------------------------------------
# reruns: resume, restart, nothing half-written is read


def kill_after_first_shard(args):
    """Start `python data/prepare.py fluency ARGS`, SIGKILL it once progress.json lists a shard; its output dir."""
    out = next(a.split("=", 1)[1] for a in args if a.startswith("--out_dir="))
    p = subprocess.Popen([sys.executable, PREPARE, "fluency", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 120
    while (not os.path.exists(os.path.join(out, "progress.json")) and p.poll() is None
           and time.time() < deadline):
        time.sleep(0.002)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not os.path.exists(os.path.join(out, "meta.json")), \
        "killed before it finished (make the corpus bigger)"
    return out


@pytest.mark.slow
def test_killed_prepare_leaves_nothing_training_reads_then_resumes(tmp_path, gpt2, gpt2_tokenizer_file, r50k):
    rng = np.random.default_rng(0)
    words = np.array(["the", "cat", "sat", "on", "a", "mat,", "and", "then", "1234", "éé", "\n\n", "ran."])
    docs = [" ".join(words[rng.integers(0, len(words), int(rng.integers(50, 400)))]) for _ in range(40_000)]
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "disk"))
    common = [f"--input={tmp_path / 'disk'}", f"--out_dir={tmp_path / 'out'}", "--num_proc=2",
              f"--tokenizer_file={gpt2_tokenizer_file}", "--min_val_tokens=0"]
    # a finished folder re-prepared with other arguments and killed: its meta.json went first
    assert run_script(PREPARE, "fluency", *common, "--shard_tokens=1000000").returncode == 0
    out = kill_after_first_shard(common + ["--shard_tokens=20000"])
    with pytest.raises(FileNotFoundError, match="meta.json missing"):
        FluencyData(out, gpt2, 64)
    r = run_script(PREPARE, "fluency", *common, "--shard_tokens=20000")
    assert r.returncode == 0, r.stderr
    resumed = int(re.search(r"resuming after (\d+) shards", r.stdout)[1])
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert 1 <= resumed < len(meta["shards"]) and leftovers(out) == []
    assert stream(out) == joined(docs, r50k.encode_ordinary, 50256)
    assert sorted(f for f in os.listdir(out) if f.startswith("tokens_")) == \
        [s["file"] for s in meta["shards"]]
    # the same arguments again: nothing is re-tokenized, only the val split is redone
    mtimes = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out) if f.startswith("tokens_")}
    r = run_script(PREPARE, "fluency", *common, "--shard_tokens=20000", "--val_fraction=0.25")
    assert r.returncode == 0 and "already tokenized" in r.stdout and "tokenized 0 tokens" in r.stdout
    assert mtimes == {f: os.path.getmtime(os.path.join(out, f)) for f in mtimes}
    assert json.load(open(os.path.join(out, "meta.json")))["val_tokens"] == math.ceil(0.25 * meta["tokens"])

# -----------------------------------------------------------------------------
# the val split


def byte_corpus(path, n_tokens):
    """A file that the byte tokenizer turns into exactly n_tokens tokens (its bytes, then eot)."""
    text = "".join(chr(97 + i % 26) + ("\n" if i % 60 == 59 else "") for i in range(n_tokens - 1))
    path.write_text(text[:n_tokens - 1])
    return str(path)


def test_prepare_val_holds_a_few_blocks(tmp_path, byte, capsys):
    """val = max(val_fraction * N, min(min_val_tokens, 10% of N)): 0.0005 of a 50k-token corpus is 25
    tokens, too few for one window of block_size 1024; the default min_val_tokens (4 windows of 1024 + 1)
    is taken instead."""
    doc = open_source(byte_corpus(tmp_path / "doc.txt", 50_000))
    meta = prepare(doc, str(tmp_path / "out"), byte)
    assert MIN_VAL_TOKENS == 4 * 1025
    assert (meta["val_tokens"], meta["train_tokens"]) == (4100, 50_000 - 4100)
    out = capsys.readouterr().out
    assert "val: 4,100 tokens = 4.0 blocks of 1024+1" in out and "warning" not in out
    fd = FluencyData(str(tmp_path / "out"), byte, 1024)
    assert fd.get_batch("val", 0, 2).x.shape == (2, 1024)
    # the fraction wins when it asks for more; min_val_tokens=0 leaves the fraction alone
    assert prepare(doc, str(tmp_path / "out"), byte, val_fraction=0.25)["val_tokens"] == 12_500
    assert prepare(doc, str(tmp_path / "out"), byte, min_val_tokens=0)["val_tokens"] == 25
    assert prepare(doc, str(tmp_path / "out"), byte, min_val_tokens=5000)["val_tokens"] == 5000
    capsys.readouterr()
    # never more than 10% of the corpus for the minimum: a small corpus gets a warning
    meta = prepare(open_source(byte_corpus(tmp_path / "small.txt", 5000)), str(tmp_path / "small"), byte)
    assert meta["val_tokens"] == 500 and meta["train_tokens"] == 4500
    captured = capsys.readouterr()
    assert "val: 500 tokens = 0.5 blocks of 1024+1" in captured.out
    assert captured.err.count("warning:") == 1 and "--min_val_tokens=4100" in captured.err
    # 0.0005 of 24k tokens was 12 tokens (no window of 1024 fits); now 10% of the corpus, 2.3 windows
    mid = prepare(open_source(byte_corpus(tmp_path / "mid.txt", 24_000)), str(tmp_path / "mid"), byte)
    assert mid["val_tokens"] == 2400
    assert "val: 2,400 tokens = 2.3 blocks" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--min_val_tokens=-1"):
        prepare(doc, str(tmp_path / "out"), byte, min_val_tokens=-1)


def test_short_split_is_one_line_naming_the_folder_and_the_fix(tmp_path, byte):
    prepare(open_source(byte_corpus(tmp_path / "doc.txt", 3000)), str(tmp_path / "out"), byte)
    with pytest.raises(ValueError) as e:
        FluencyData(str(tmp_path / "out"), byte, 1024)
    msg = str(e.value)
    assert "\n" not in msg and f"{str(tmp_path / 'out')!r}: val holds 300 tokens" in msg
    assert "block_size+1=1025" in msg and "--min_val_tokens" in msg and "bigger corpus" in msg
    with pytest.raises(ValueError, match=re.escape(f"{str(tmp_path / 'out')!r}: train holds 2,700")):
        FluencyData(str(tmp_path / "out"), byte, 4000)


@pytest.mark.slow
def test_prepare_cli_then_train_stops_with_one_line(tmp_path):
    """The real CLIs: prepare prints the val split (and warns on a small corpus); train.py on a val split
    shorter than block_size+1 stops before training with one line naming the split and the fix."""
    r = run_script(PREPARE, "fluency", f"--input={byte_corpus(tmp_path / 'doc.txt', 50_000)}",
                   f"--out_dir={tmp_path / 'ok'}", "--tokenizer=byte")
    assert r.returncode == 0, r.stderr
    assert "val: 4,100 tokens = 4.0 blocks of 1024+1" in r.stdout and "warning" not in r.stdout + r.stderr
    assert json.load(open(tmp_path / "ok" / "meta.json"))["val_tokens"] == 4100
    r = run_script(PREPARE, "fluency", f"--input={byte_corpus(tmp_path / 'small.txt', 3000)}",
                   f"--out_dir={tmp_path / 'small'}", "--tokenizer=byte")
    assert r.returncode == 0, r.stderr
    assert "val: 300 tokens" in r.stdout and "warning:" in r.stderr
    r = run_script("train.py", f"--fluency_data={tmp_path / 'small'}", "--tokenizer=byte", "--device=cpu",
                   "--compile=False", f"--out_dir={tmp_path / 'run'}")
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1, r.stderr
    assert f"{str(tmp_path / 'small')!r}: val holds 300" in lines[0] and "--min_val_tokens" in lines[0], \
        lines[0]
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")


def test_prepare_errors_are_one_line(tmp_path):
    """The real CLI, before any tokenizing: what to fix, in one line."""
    ds = datasets.Dataset.from_dict({"body": ["a", "b"], "n": [1, 2]})
    ds.save_to_disk(str(tmp_path / "disk"))
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.txt").write_text("text")
    ds.to_parquet(str(tmp_path / "mixed" / "b.parquet"))
    out = f"--out_dir={tmp_path / 'out'}"
    cases = [([out, "--tokenizer=byte"], "exactly one of --input"),
             ([f"--input={tmp_path / 'disk'}", "--hf_dataset=x", out, "--tokenizer=byte"],
              "exactly one of --input"),
             ([f"--input={tmp_path / 'disk'}", out, "--tokenizer=byte"],
              "--text_field='text' is not a column.*'body'"),
             ([f"--input={tmp_path / 'mixed'}", out, "--tokenizer=byte"], "mixes file kinds"),
             ([f"--input={tmp_path / 'disk'}", "--text_field=n", out, "--tokenizer=byte"],
              "--text_field='n' of .* holds Value\\('int64'\\), not text"),
             (["--hf_dataset=nobody/nothing", out, "--tokenizer=byte"],  # the tests run with HF_HUB_OFFLINE=1
              "reach 'nobody/nothing' on the Hub.*without internet, copy the repository.*--hf_dataset=DIR"),
             ([f"--input={tmp_path / 'disk'}", "--text_field=body", out, "--tokenizer=byte", "--num_proc=-1"],
              "--num_proc=-1"),
             ([f"--hf_dataset={tmp_path / 'disk'}", out, "--tokenizer=byte"],  # datasets' own error: use
              f"--hf_dataset={re.escape(str(tmp_path / 'disk'))} is a datasets save_to_disk folder: "  # load_from_disk
              f"pass it as --input={re.escape(str(tmp_path / 'disk'))}")]
    for args, match in cases:
        r = run_script(PREPARE, "fluency", *args)
        assert r.returncode == 1 and re.search(match, r.stderr) and len(r.stderr.strip().splitlines()) == 1, \
            (args, r.stderr)
    assert not os.path.exists(tmp_path / "out" / "meta.json")
    # without the optional `datasets` package: a parquet input says what to install
    no_datasets = "import runpy, sys; sys.modules['datasets'] = None; sys.argv = sys.argv[1:]; " \
                  "runpy.run_path('data/prepare.py', run_name='__main__')"
    r = run_script("-c", no_datasets, PREPARE, "fluency", f"--input={tmp_path / 'disk'}", out,
                   "--tokenizer=byte")
    assert r.returncode == 1 and r.stderr.strip() == "error: Hugging Face and parquet/arrow/JSONL input " \
        "needs the optional `datasets` package: pip install datasets", r.stderr

# -----------------------------------------------------------------------------
# reasoning JSONL from the hub, GPT-2's tokenizer file


def gsm8k_repo(root, rows):
    """openai/gsm8k's repository layout (config 'main', train and test parquet) holding these rows."""
    for split, part in (("train", rows[:-2]), ("test", rows[-2:])):
        os.makedirs(root / "main", exist_ok=True)
        datasets.Dataset.from_list(part).to_parquet(str(root / "main" / f"{split}-00000-of-00001.parquet"))
    (root / "README.md").write_text("---\nconfigs:\n- config_name: main\n  data_files:\n  - split: train\n"
                                    "    path: main/train-*\n  - split: test\n    path: main/test-*\n---\n")
    return str(root)


@pytest.mark.slow
def test_gsm8k_to_jsonl_then_the_gsm8k_preset_trains(tmp_path, gpt2_tokenizer_file):
    """`data/prepare.py reasoning` on a local copy of openai/gsm8k writes data/gsm8k/{train,test}.jsonl, and
    config/train_gpt2_gsm8k.py trains on them (a tiny model, pydoc for fluency: no hub)."""
    rows = [json.loads(line) for line in open(GSM8K)]
    repo = gsm8k_repo(tmp_path / "gsm8k_repo", rows)
    r = run_script(os.path.join(ROOT, PREPARE), "reasoning", f"--hf_dataset={repo}",
                   "--hf_config=main", "--out_dir=data/gsm8k", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for split, part in (("train", rows[:-2]), ("test", rows[-2:])):
        lines = [json.loads(line) for line in open(tmp_path / "data" / "gsm8k" / f"{split}.jsonl")]
        assert lines == [{"question": x["question"], "answer": x["answer"]} for x in part]
        finals = [a for _, a in read_jsonl(str(tmp_path / "data" / "gsm8k" / f"{split}.jsonl"))]
        assert finals == [x["answer"].rsplit("####", 1)[1].strip() for x in part]
    r = run_script(os.path.join(ROOT, "train.py"), os.path.join(ROOT, "config", "train_gpt2_gsm8k.py"),
                   "--init_from=scratch", "--fluency_data=pydoc", f"--tokenizer_file={gpt2_tokenizer_file}",
                   "--n_layer=1", "--n_head=2", "--n_embd=32", "--n_latent=16", "--batch_size=2",
                   "--gradient_accumulation_steps=1", "--max_iters=2", "--eval_interval=2", "--eval_iters=1",
                   "--device=cpu", "--compile=False", f"--out_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    evals = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl") if '"eval"' in line]
    assert [e["iter"] for e in evals] == [0, 2] and all(len(e["answer_exact_match"]) == 4 for e in evals)
    assert list(evals[0]["task_exact_match"]) == ["jsonl"]  # scored on test.jsonl


def test_prepare_reasoning_checks_every_row(tmp_path):
    rows = [{"question": "1+1?", "answer": "2\n#### 2"}, {"question": "2+2?", "answer": "four"},
            {"question": "3+3?", "answer": "6\n#### 6"}]
    repo = gsm8k_repo(tmp_path / "repo", rows)
    with pytest.raises(ValueError, match=r"\[test\] row 0: GSM8K answer must end with"):
        prepare_reasoning(repo, str(tmp_path / "out"), "main")
    with pytest.raises(ValueError, match=r"no column \['solution'\]"):
        prepare_reasoning(repo, str(tmp_path / "out"), "main", answer_field="solution")
    counts = prepare_reasoning(repo, str(tmp_path / "plain"), "main", format="plain")
    assert counts == {"train": 1, "test": 2}
    assert read_jsonl(str(tmp_path / "plain" / "train.jsonl")) == [("1+1?", "2\n#### 2")]


def test_fetch_gpt2_ranks_extracts_and_verifies(tmp_path, gpt2_tokenizer_file, monkeypatch):
    """fetch_gpt2_ranks on a stand-in sdist (the real download runs in conftest on a fresh checkout)."""
    def fake_pip(content):
        def run(cmd, **kw):
            assert cmd[1:4] == ["-m", "pip", "download"] and "openai-whisper==20250625" in cmd
            src = tmp_path / "gpt2.src"
            src.write_bytes(content)
            sdist = os.path.join(cmd[cmd.index("-d") + 1], "openai_whisper-20250625.tar.gz")
            with tarfile.open(sdist, "w:gz") as tf:
                tf.add(src, arcname="openai_whisper-20250625/whisper/assets/gpt2.tiktoken")
        return run
    ranks = open(gpt2_tokenizer_file, "rb").read()
    monkeypatch.setattr(subprocess, "run", fake_pip(ranks))
    path = fetch_gpt2_ranks(str(tmp_path / "out"))
    assert open(path, "rb").read() == ranks and os.listdir(tmp_path / "out") == ["gpt2.tiktoken"]
    monkeypatch.setattr(subprocess, "run", fake_pip(ranks + b"x"))
    with pytest.raises(ValueError, match="sha256"):
        fetch_gpt2_ranks(str(tmp_path / "out2"))

# -----------------------------------------------------------------------------
# the throughput benchmark


@pytest.mark.slow
def test_bench_prepare_cli_prints_its_table(gpt2_tokenizer_file):
    r = run_script("bench/bench_prepare.py", "--docs=150", "--rounds=1", "--num_proc=1,2",
                   f"--tokenizer_file={gpt2_tokenizer_file}")
    assert r.returncode == 0, r.stderr
    rows = {}
    for line in r.stdout.splitlines():
        name, *values = re.split(r"\s{2,}", line.strip())
        if name.startswith(("plain", "prepare")):
            rows[name] = [float(v.replace(",", "")) for v in values]
    assert set(rows) == {"plain encode_ordinary x1", "plain encode_ordinary x2 side by side",
                         "prepare num_proc=1", "prepare num_proc=2"}, r.stdout
    assert all(v[0] > 0 and len(v) == 4 for v in rows.values()), r.stdout
    assert rows["plain encode_ordinary x1"][2:] == [1.0, 1.0]
