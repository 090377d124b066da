"""data.py, tasks.py: tokenizers, answer-span masks, JSONL, routing, errors (the synthetic task suite:
test_tasks.py; preparing token files: test_prepare.py). Expected values are recomputed here independently
(Python int arithmetic, tiktoken's own pattern), never taken from the code under test."""

import json
import math
import os
import re

import numpy as np
import pytest
import tiktoken
import torch
from tiktoken.load import load_tiktoken_bpe

from conftest import run_script
from data import FluencyData, ReasoningData, get_tokenizer
from tasks import read_eval_jsonl
from schedules import Router, micro_batch_index

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
GSM8K = os.path.join(FIXTURES, "gsm8k_sample.jsonl")
PROMPT_ANSWER = os.path.join(FIXTURES, "prompt_answer_sample.jsonl")
TEXTS = ["Hello, world! It's 2024 and we've got   spaces\n\n\tand tabs.",
         "héllo wörld — 日本語 🙂 naïve café", "0123456789 31415926535 -42 +7"]
PARAGRAPH = ("GPT-2's tokenizer doesn't treat   runs of spaces, numbers like 1234567 or 3.14159, and\n\n"
             "new paragraphs the way you'd guess; unicode like déjà vu, 東京, emoji 🚀 and CamelCaseWords too. "
             "They'll, we're, I've, she'd, you'll: contractions.\t\tTabs\r\nand CRLF. <|endoftext|> is text "
             "here.  ")


def unpack(batch, tok):
    """Check a reasoning batch's layout and return its examples [(prompt ids, answer ids, answer id)]:
    rows are eot + (prompt + answer + eot)* + padding; the mask is exactly each answer's targets + its eot."""
    eot, out = tok.eot_token, []
    for r in range(batch.x.shape[0]):
        x, y, mask, aid = (t[r].tolist() for t in (batch.x, batch.y, batch.answer_mask, batch.answer_id))
        n = sum(t != -1 for t in y)
        assert all(t != -1 for t in y[:n]) and all(t == -1 for t in y[n:]), "padding is a suffix"
        assert not any(mask[n:]) and all(i == -1 for i in aid[n:])
        seq = [x[0]] + y[:n]  # the row's tokens; target t is seq[t+1]
        assert x[:n] == seq[:-1] and seq[0] == eot and seq[-1] == eot
        eots = [i for i, t in enumerate(seq) if t == eot]
        for a, b in zip(eots, eots[1:]):  # one example: seq[a+1..b], its targets t = a..b-1
            m = mask[a:b]
            start = m.index(True)  # the answer starts at seq[a + start + 1]
            suffix = all(m[start:]) and not any(m[:start])
            assert suffix, "the mask is the segment's suffix: no prompt token in it"
            assert len(set(aid[a + start:b])) == 1 and aid[a + start] >= 0
            assert all(i == -1 for i in aid[a:a + start])
            out.append((seq[a + 1:a + start + 1], seq[a + start + 1:b], aid[a + start]))
    ids = [i for _, _, i in out]
    assert len(set(ids)) == len(ids), "answer ids are unique within the batch"
    return out


# -----------------------------------------------------------------------------
# tokenizers

@pytest.mark.parametrize("name", ["byte", "gpt2"])
def test_tokenizer_round_trips(name, byte, gpt2):
    tok = byte if name == "byte" else gpt2
    assert (tok.vocab_size, tok.eot_token) == ((257, 256) if name == "byte" else (50257, 50256))
    for text in TEXTS + [PARAGRAPH]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text and all(0 <= i < tok.eot_token for i in ids)
    # '<|endoftext|>' inside text is ordinary text; the eot token decodes to it
    assert tok.eot_token not in tok.encode("a<|endoftext|>b")
    assert tok.decode(tok.encode("a") + [tok.eot_token] + tok.encode("b")) == "a<|endoftext|>b"
    if name == "byte":  # digit-level: one token per digit
        assert byte.encode("0123456789") == list(range(48, 58)) and byte.encode("é") == [0xC3, 0xA9]


def test_gpt2_matches_tiktoken_r50k(gpt2, gpt2_tokenizer_file):
    from tiktoken_ext.openai_public import r50k_pat_str  # tiktoken's own r50k_base definition
    ref = tiktoken.Encoding(name="r50k_base", pat_str=r50k_pat_str, special_tokens={"<|endoftext|>": 50256},
                            mergeable_ranks=load_tiktoken_bpe(gpt2_tokenizer_file))
    assert gpt2.encode(PARAGRAPH) == ref.encode_ordinary(PARAGRAPH) and len(set(gpt2.encode(PARAGRAPH))) > 40
    assert gpt2.encode("Hello world") == [15496, 995]  # GPT-2's well-known ids


def test_gpt2_file_errors(tmp_path, gpt2_tokenizer_file, monkeypatch):
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_bytes(open(gpt2_tokenizer_file, "rb").read()[:-10])  # a truncated copy
    with pytest.raises(ValueError, match="sha256"):
        get_tokenizer("gpt2", str(bad))
    with pytest.raises(FileNotFoundError, match="nope.tiktoken"):
        get_tokenizer("gpt2", str(tmp_path / "nope.tiktoken"))
    monkeypatch.setenv("NANORLRP_TOKENIZER_FILE", str(bad))  # the environment variable is honoured
    with pytest.raises(ValueError, match="sha256"):
        get_tokenizer("gpt2")
    # no file and no network: the error says how to provide the file
    monkeypatch.delenv("NANORLRP_TOKENIZER_FILE")
    offline = lambda name: (_ for _ in ()).throw(ConnectionError("offline"))
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(FileNotFoundError,
                       match=r"tokenizer_file=.*NANORLRP_TOKENIZER_FILE.*data/prepare.py tokenizer"):
        get_tokenizer("gpt2")
    with pytest.raises(ValueError, match="unknown tokenizer 'bpe'"):
        get_tokenizer("bpe")


def test_pydoc_default(byte):
    from pydoc_data.topics import topics
    corpus = [t for k in sorted(topics) for t in list(topics[k].encode("utf-8")) + [256]]
    tail = corpus[-(len(corpus) // 10):]  # the last 10% is val
    fd = FluencyData("pydoc", byte, 32)
    b = fd.get_batch("val", 0, 8)
    starts = [i for i in range(len(tail) - 32) if tail[i:i + 32] == b.x[0].tolist()]
    assert starts and tail[starts[0] + 32] == b.y[0, -1]
    assert fd.get_batch("train", 0, 8).x.shape == (8, 32) and len(fd.data["train"]) + len(tail) == len(corpus)

# -----------------------------------------------------------------------------
# reasoning data

def test_gsm8k_fixture_final_answers(byte, gpt2):
    lines = [json.loads(l) for l in open(GSM8K)]
    finals = ["15", "21", "80", "29", "90", "3,750"]
    examples = [(p, a) for p, a, _ in read_eval_jsonl(GSM8K)]
    assert [a for _, a in examples] == finals
    for (p, _), line in zip(examples, lines):  # the worked solution is on the prompt side
        assert p.startswith(line["question"] + "\n") and p.endswith("#### ")
        assert line["answer"].split("####")[0] in p
    assert [(p, a) for p, a, _ in read_eval_jsonl(GSM8K, "solution")] == \
        [(l["question"] + "\n", l["answer"]) for l in lines]
    for tok in (byte, gpt2):
        rd = ReasoningData(GSM8K, tok, 384, eval_source=PROMPT_ANSWER)
        train = {(tok.decode(p), tok.decode(a)) for i in range(10)
                 for p, a, _ in unpack(rd.get_batch(i, 8), tok)}
        assert train == set(examples)
        evals = [(tok.decode(p), tok.decode(a)) for b in rd.eval_batches(2, 10) for p, a, _ in unpack(b, tok)]
        assert evals == [tuple(json.loads(l).values()) for l in open(PROMPT_ANSWER, encoding="utf-8")]
        assert rd.eval_examples(10) == evals and rd.eval_tags(10) == ["jsonl"] * 5


def test_jsonl_held_out_slice(tmp_path, byte):
    path = tmp_path / "qa.jsonl"
    pairs = [(f"q{i}:", f"a{i * i}") for i in range(300)]
    path.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in pairs) + "\n")
    rd = ReasoningData(str(path), byte, 32)
    evals = rd.eval_examples(1000)
    train = {(byte.decode(p), byte.decode(a)) for i in range(40)
             for p, a, _ in unpack(rd.get_batch(i, 8), byte)}
    assert 15 < len(evals) < 50 and not set(evals) & train and set(evals) <= set(pairs)
    assert len(train) > 200 and train <= set(pairs) - set(evals)


def test_reasoning_errors(tmp_path, byte, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad_lines = ['{"prompt": "a", "answer": ', '{"prompt": "a"}', '["a", "b"]',
                 '{"question": "q", "answer": "no final"}']
    for line in bad_lines:
        bad.write_text('{"prompt": "1+1=", "answer": "2"}\n\n' + line + "\n")
        with pytest.raises(ValueError, match=re.escape(f"{bad}:3:")):
            ReasoningData(str(bad), byte, 64)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl: no examples"):
        ReasoningData(str(tmp_path / "empty.jsonl"), byte, 64)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        ReasoningData(str(tmp_path / "missing.jsonl"), byte, 64)
    with pytest.raises(FileNotFoundError, match="missing_eval.jsonl"):
        ReasoningData(GSM8K, byte, 256, eval_source=str(tmp_path / "missing_eval.jsonl"))
    with pytest.raises(ValueError, match="gsm8k_answer"):
        ReasoningData(GSM8K, byte, 256, gsm8k_answer="last")
    with pytest.raises(ValueError, match="block_size >= "):
        ReasoningData(GSM8K, byte, 100, eval_source=PROMPT_ANSWER)
    with pytest.raises(ValueError, match="0 eval examples.*reasoning_eval_data"):  # too small for a 10% slice
        ReasoningData(PROMPT_ANSWER, byte, 64)
    with pytest.raises(ValueError, match="0 train and 6 eval"):  # every prompt is an eval prompt
        ReasoningData(GSM8K, byte, 384, eval_source=GSM8K)
    with pytest.raises(ValueError, match="unknown task 'div'"):
        ReasoningData("synthetic", byte, 64, tasks="add:3,div:2")
    for spec in ["add", "add:0", "add:x", "chain:99"]:
        with pytest.raises(ValueError, match="needs a level"):
            ReasoningData("synthetic", byte, 64, tasks=spec)
    monkeypatch.setattr("tasks.is_eval_prompt", lambda prompt: True)  # no prompt left to train on
    with pytest.raises(ValueError, match="sort:1 has too few prompts"):
        ReasoningData("synthetic", byte, 64, tasks="sort:1")


def train_error(tmp_path, *args):
    """train.py's stderr line on bad data given by args (a tiny CPU run, stopped before any model exists)."""
    r = run_script("train.py", "--device=cpu", "--compile=False", "--tokenizer=byte", "--max_iters=0",
                   "--block_size=64", f"--out_dir={tmp_path / 'run'}", *args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    return lines[0]


@pytest.mark.slow
def test_train_names_a_jsonl_file_that_is_not_utf8(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "1+1=", "answer": "2"}\n\xff\xfe{"prompt": "2+2=", "answer": "4"}\n')
    line = train_error(tmp_path, "--fluency_data=pydoc", f"--reasoning_data={bad}")
    assert f"{bad}:2:" in line and "utf-8" in line, line


@pytest.mark.slow
@pytest.mark.parametrize("meta", ['{"tokenizer": "byte",', '["byte", 257]',
                                  '{"tokenizer": "byte", "vocab_size": 257, "dtype": "uint16", '
                                  '"shards": [{"tokens": 100}], "train_tokens": 90}'])
def test_train_names_a_malformed_meta_json(tmp_path, meta):
    """Invalid JSON, not an object, a shard without its file: one line naming meta.json, not a traceback."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "meta.json").write_text(meta)
    line = train_error(tmp_path, f"--fluency_data={tmp_path / 'folder'}")
    assert str(tmp_path / "folder" / "meta.json") in line and "re-prepare" in line, line


# -----------------------------------------------------------------------------
# routing and DDP indices

@pytest.mark.parametrize("rho", [0.0, 0.1, 0.25, 1 / 3, 0.5, 0.77, 0.999, 1.0])
def test_router_fraction_and_spread(rho):
    router = Router(rho)
    steps = [s for s in range(10_000) if router.kind(s) == "reasoning"]
    assert abs(len(steps) / 10_000 - rho) <= 1 / 10_000
    if len(steps) > 1:  # spread evenly: gaps between reasoning steps differ by at most one
        gaps = set(np.diff(steps).tolist())
        assert gaps <= {math.floor(1 / rho), math.ceil(1 / rho)}
    assert {router.kind(s) for s in range(100)} <= {"fluency", "reasoning"}


def test_router_rejects_bad_fraction():
    for rho in (-0.1, 1.5):
        with pytest.raises(ValueError, match="reasoning_fraction"):
            Router(rho)


def test_two_ranks_see_what_one_process_sees(byte):
    rd, router, G = ReasoningData("synthetic", byte, 64, tasks="add:2,sort:3"), Router(0.5), 4
    for step in range(6):
        one = [micro_batch_index(step, m, 0, 1, G) for m in range(G)]
        ranks = [[micro_batch_index(step, m, r, 2, G) for m in range(G // 2)] for r in range(2)]
        assert sorted(one) == list(range(step * G, (step + 1) * G))  # each index once, never reused
        # rank r: r, r+W, ...
        assert ranks == [[step * G + r + 2 * m for m in range(G // 2)] for r in range(2)]
        assert sorted(ranks[0] + ranks[1]) == sorted(one)
        xs = {i: rd.get_batch(i, 2).x for i in one}
        for i in ranks[0] + ranks[1]:
            assert torch.equal(rd.get_batch(i, 2).x, xs[i])
        assert not torch.equal(rd.get_batch(ranks[0][0], 2).x, rd.get_batch(ranks[1][0], 2).x)
        # the kind depends on the step only
        assert router.kind(step) == ("reasoning" if step % 2 else "fluency")
    with pytest.raises(ValueError, match="divisible"):
        micro_batch_index(0, 0, 0, 3, 4)


def test_batch_to_keeps_everything(byte):
    b = ReasoningData("synthetic", byte, 32, tasks="add:2").get_batch(0, 2)
    c = b.to("cpu")
    assert c.kind == b.kind
    assert all(torch.equal(getattr(b, f), getattr(c, f)) for f in ("x", "y", "answer_mask", "answer_id"))


def test_every_data_subcommand_prints_its_help(tmp_path):
    """argparse %-formats help texts: a bare % in one (prepare's '10% of the corpus') crashed `fluency -h`.
    From another folder too: data/prepare.py puts the project root on sys.path itself."""
    for sub in ("fluency", "reasoning", "tokenizer", "show"):
        r = run_script(os.path.join(ROOT, "data", "prepare.py"), sub, "-h", cwd=tmp_path)
        assert r.returncode == 0 and r.stderr == "" and f"usage: prepare.py {sub}" in r.stdout, \
            (sub, r.stderr)
    help = run_script("data/prepare.py", "fluency", "-h").stdout
    assert "capped at 10% of the corpus" in " ".join(help.split())
