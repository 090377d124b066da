"""A Hugging Face folder's tokenizer (hf_trunk.HFTokenizer) in the data: EOS and BOS as the tokenizers library
itself applies them, prompts and answers tokenized as the whole text, prepared token folders, the optional
packages' one-line errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from tokenizers import Tokenizer

import data
from conftest import ROOT, TOKENIZER_KINDS, run_script, tiny_tokenizer

KINDS = sorted(TOKENIZER_KINDS)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """kind -> a folder holding a tiny tokenizer of that kind."""
    root = tmp_path_factory.mktemp("tokenizers")
    for kind in KINDS:
        tiny_tokenizer(root / kind, kind)
    return {kind: str(root / kind) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_eos_and_bos_are_the_tokenizers_own(folders, kind):
    """eot = the folder's EOS; bos = what the tokenizers library's tokenizer(text) puts before a text, read
    from its behaviour (the same code reads all three kinds)."""
    tok, ref = data.get_tokenizer("hf", folders[kind]), Tokenizer.from_file(folders[kind] + "/tokenizer.json")
    bos, eos = TOKENIZER_KINDS[kind]
    assert tok.eot_token == ref.token_to_id(eos)
    assert tok.bos == ([ref.token_to_id(bos)] if bos else [])
    text = "Sort the list (3, 1, 2)."
    assert ref.encode(text).ids == tok.bos + tok.encode(text)
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(eos)) > 1       # a special token's text in a document is ordinary text


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("prompt, answer", [("The capital of France is", " Paris"), ("Q: 6*7? A:", " 42"),
                                            ("f(3)=", "9"), ("sort(321)=", "123")])
def test_a_prompt_and_its_answer_are_the_whole_texts_tokens(folders, kind, prompt, answer, tmp_path):
    """bos + prompt + answer = tokenizer(prompt + answer): no BOS of the answer's own, and no prefix space
    (SentencePiece's ▁, which encoding the answer alone would add)."""
    tok, ref = data.get_tokenizer("hf", folders[kind]), Tokenizer.from_file(folders[kind] + "/tokenizer.json")
    rd = data.ReasoningData(jsonl(tmp_path, [(prompt, answer)]), tok, 64, 0, jsonl(tmp_path, []))
    example = rd.train[0]
    assert example.prompt + example.answer == ref.encode(prompt + answer).ids
    if kind == "metaspace":
        assert tok.encode(answer.strip()) != tok.encode_answer(answer.strip())   # the ▁ it drops


def test_rows_and_documents_start_with_bos(folders, tmp_path):
    """A reasoning row: eot, bos + prompt, answer, eot; pydoc's documents: bos + text + eot."""
    tok = data.get_tokenizer("hf", folders["bos"])
    rd = data.ReasoningData(jsonl(tmp_path, [(f"f({i})=", str(2 * i)) for i in range(40)]), tok, 64, 0,
                            jsonl(tmp_path, []))
    x = rd.get_batch(0, 2).x[0].tolist()
    assert x[:2] == [tok.eot_token] + tok.bos
    ex = rd.train[0]
    assert ex.prompt[:1] == tok.bos and tok.bos[0] not in ex.answer
    stream = data.FluencyData("pydoc", tok, 32).data["train"]
    assert stream[0] == tok.bos[0] and np.all(stream[1:][stream[:-1] == tok.eot_token] == tok.bos[0])


def jsonl(tmp_path, rows):
    """A JSONL file of (prompt, answer) rows (none: an eval file of one row), its path."""
    path = tmp_path / ("train.jsonl" if rows else "eval.jsonl")
    rows = rows or [("f(99)=", "198")]
    path.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in rows))
    return str(path)


def test_prepare_fluency_with_the_folders_tokenizer_and_refuse_another(folders, tmp_path):
    """data/prepare.py fluency --tokenizer=hf: the stream is bos doc eot bos doc eot (bos), read back by
    training with the same tokenizer; a folder prepared with another tokenizer is refused in one line."""
    docs = tmp_path / "docs"
    docs.mkdir()
    texts = ["First document, some words." * 40, "Second one, other words." * 40]
    for i, text in enumerate(texts):
        (docs / f"{i}.txt").write_text(text)
    out = tmp_path / "prepared"
    r = run_script("data/prepare.py", "fluency", f"--input={docs}", f"--out_dir={out}", "--tokenizer=hf",
                   f"--tokenizer_file={folders['bos']}", "--num_proc=1", "--min_val_tokens=10")
    assert r.returncode == 0, r.stderr
    tok = data.get_tokenizer("hf", folders["bos"])
    want = [t for text in texts for t in tok.bos + tok.encode(text) + [tok.eot_token]] + tok.bos
    split = data.FluencyData(str(out), tok, 8).data
    assert [t for s in ("train", "val") for t in split[s][0:len(split[s])].tolist()] == want
    for other in (data.get_tokenizer("hf", folders["metaspace"]), data.get_tokenizer("byte")):
        with pytest.raises(ValueError) as e:
            data.FluencyData(str(out), other, 8)
        assert "tokenized with" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("package, call", [
    ("tokenizers", "data.get_tokenizer('hf', {folder!r})"),
    ("transformers", "hf_trunk.from_folder({folder!r})"),
])
def test_optional_packages_missing_is_one_line_naming_the_install(folders, package, call):
    code = (f"import sys; sys.modules[{package!r}] = None; import data, hf_trunk\n"
            f"try:\n    {call.format(folder=folders['bos'])}\nexcept ImportError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True).stdout
    assert out.strip().endswith(f"needs {package}: pip install {package}") and out.count("\n") == 1
    assert os.path.isdir(folders["bos"])
