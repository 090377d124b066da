"""data/prepare.py: text files and Hugging Face datasets (built here, offline: save_to_disk, parquet, JSONL,
arrow, a local copy of a hub repository) into shards + meta.json, resume after a kill, one-line errors,
GSM8K to JSONL, GPT-2's tokenizer file, the throughput benchmark (the token files as training reads them,
the val split: test_fluency_data.py). Expected tokens come from tiktoken's own r50k_base definition (or the
UTF-8 bytes), documents joined by end-of-text, never from the code under test."""

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
from tasks import read_eval_jsonl
from prepare import fetch_gpt2_ranks, prepare, prepare_reasoning
from sources import _text_pieces, open_source
from test_data import GSM8K, PARAGRAPH, TEXTS

PREPARE = os.path.join("data", "prepare.py")  # the data CLI, run from the project root

DOCS = TEXTS + [PARAGRAPH, "", "<|endoftext|> is text, not eot", None] + \
    [f"Document {i}: " + " ".join(f"word{i * j % 97}" for j in range(i % 23)) + "\n\n  indented\n"
     for i in range(60)]


class WideTok:
    """A tokenizer whose ids do not fit uint16: 70000 + each UTF-8 byte."""
    name, vocab_size, eot_token, sha256, bos = "wide", 70_257, 70_256, "w" * 64, []

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
    """prepare spawns its workers (a fork of a process with threads can hang): each worker gets the tokenizer
    and the dataset pickled and imports the script that runs it as __mp_main__; the same tokens."""
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(tmp_path / "disk"))
    script = ("import sys\n"
              "if __name__ == '__main__':\n"
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
# reruns: resume, restart, nothing half-written is read


def kill_after_first_shard(args):
    """Start `python data/prepare.py fluency ARGS`, SIGKILL it once progress.json lists a shard; its output
    dir."""
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
# bad arguments: one line, before any tokenizing


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
              f"--hf_dataset={re.escape(str(tmp_path / 'disk'))} is a datasets "  # load_from_disk
              "save_to_disk folder: "
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
        finals = [a for _, a, _ in read_eval_jsonl(str(tmp_path / "data" / "gsm8k" / f"{split}.jsonl"))]
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
    assert read_eval_jsonl(str(tmp_path / "plain" / "train.jsonl")) == [("1+1?", "2\n#### 2", 0)]


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
