"""The token files as training reads them (data.FluencyData on a folder data/prepare.py wrote): many shards
read as the one stream they cut, windows inside the stream and shifted, nanoGPT's train.bin/val.bin,
one-line errors for a folder it cannot use; the val split prepare sizes to hold a few blocks, and train.py
stopping with one line on one too short (writing the folder: test_prepare.py)."""

import json
import os
import re

import datasets
import numpy as np
import pytest
import torch

from conftest import run_script
from data import FluencyData
from prepare import MIN_VAL_TOKENS, prepare
from sources import open_source
from test_prepare import DOCS, PREPARE, WideTok, stream

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
