"""evaluate.py: answer positions only are unembedded, a rank without eval batches under DDP, no float64."""

import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import data
from evaluate import evaluate_fluency, evaluate_reasoning
from model import GPT, GPTConfig

K = 3


def setup():
    """A small model whose refinement steps differ, and its fluency and reasoning eval batches (deterministic)."""
    tok = data.get_tokenizer("byte")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=48, vocab_size=257, n_layer=1, n_head=2, n_embd=32, n_steps=K, n_latent=16))
    with torch.no_grad():
        model.latent_head.w_out.weight.normal_(0, 1.0)
    model.eval()
    fd = data.FluencyData("pydoc", tok, 48, seed=0)
    fluency = [fd.get_batch("val", i, 4) for i in range(3)]
    reasoning = data.ReasoningData("synthetic", tok, 48, seed=0).eval_batches(4, 18)
    return model, fluency, reasoning


def reference_reasoning(model, batches, n_examples):
    """The same metrics from full (K, B, T, V) logits, counted in Python."""
    wrong, seen, nll_pairs = {}, {}, []
    for b in batches:
        logits, _ = model(b.x)
        pred = logits.argmax(-1)
        for r, t in zip(*torch.nonzero(b.answer_mask, as_tuple=True)):
            i = int(b.answer_id[r, t])
            seen[i] = seen.get(i, 0) + 1
            wrong[i] = [w + int(pred[k, r, t] != b.y[r, t]) for k, w in enumerate(wrong.get(i, [0] * K))]
            nll = [F.cross_entropy(logits[k, r, t][None].float(), b.y[r, t][None]).item() for k in (0, K - 1)]
            nll_pairs.append(nll)
    exact = torch.full((n_examples, K), float("nan"))
    for i, w in wrong.items():
        exact[i] = torch.tensor([float(x == 0) for x in w])
    n_tok = sum(seen.values())
    return {
        "answer_exact_match": [sum(w[k] == 0 for w in wrong.values()) / len(wrong) for k in range(K)],
        "answer_token_acc": [1 - sum(w[k] for w in wrong.values()) / n_tok for k in range(K)],
        "step_K_beats_1": sum(last < first for first, last in nll_pairs) / n_tok,
        "per_example_exact": exact,
    }


def assert_same_reasoning(got, want):
    assert got["answer_exact_match"] == pytest.approx(want["answer_exact_match"])
    assert got["answer_token_acc"] == pytest.approx(want["answer_token_acc"], rel=1e-6)
    assert got["step_K_beats_1"] == pytest.approx(want["step_K_beats_1"], rel=1e-6)
    assert torch.equal(got["per_example_exact"].isnan(), want["per_example_exact"].isnan())
    assert torch.equal(got["per_example_exact"].nan_to_num(-1), want["per_example_exact"].nan_to_num(-1))

# -----------------------------------------------------------------------------
# only answer positions are unembedded


def test_reasoning_unembeds_only_answer_positions():
    model, _, batches = setup()
    rows = []                                                 # rows of hidden states each lm_head call unembeds
    hook = model.lm_head.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[:-1].numel()))
    try:
        got = evaluate_reasoning(model, batches, K)
    finally:
        hook.remove()
    answer_tokens = [int(b.answer_mask.sum()) for b in batches]
    assert rows == [n for n in answer_tokens for _ in range(K)], \
        f"lm_head unembedded {rows} rows; the answer tokens per batch are {answer_tokens} (once per step)"
    assert_same_reasoning(got, reference_reasoning(model, batches, 18))


def test_reasoning_unembeds_only_answer_positions_with_k_zero():
    tok = data.get_tokenizer("byte")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=48, vocab_size=257, n_layer=1, n_head=2, n_embd=32, n_steps=0)).eval()
    batches = data.ReasoningData("synthetic", tok, 48, seed=0).eval_batches(4, 8)
    got = evaluate_reasoning(model, batches, 0)
    logits = [model(b.x)[0][0] for b in batches]             # (B, T, V), the plain GPT
    exact = []
    for b, lg in zip(batches, logits):
        ok = (lg.argmax(-1) == b.y) | ~b.answer_mask
        exact += [bool(ok[b.answer_id == i].all()) for i in b.answer_id[b.answer_mask].unique().tolist()]
    assert got["answer_exact_match"] == pytest.approx([sum(exact) / len(exact)])
    assert got["step_K_beats_1"] == 0.0

# -----------------------------------------------------------------------------
# a DDP rank with no eval batches


def test_reasoning_without_batches_needs_n_examples():
    model, _, batches = setup()
    with pytest.raises(ValueError, match="evaluate_reasoning needs n_examples"):
        evaluate_reasoning(model, [], K)
    with pytest.raises(ValueError, match="evaluate_reasoning needs n_examples"):
        evaluate_reasoning(model, batches, K, world=2)    # ranks would infer different sizes: refused up front
    empty = evaluate_reasoning(model, [], K, n_examples=18)
    assert empty["per_example_exact"].shape == (18, K) and empty["per_example_exact"].isnan().all()
    assert evaluate_fluency(model, [], K) == [0.0] * K


def _ddp_worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # a collective one rank skips fails after the timeout instead of hanging the test run
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        model, fluency, reasoning = setup()
        mine = (lambda bs: bs) if rank == 0 else (lambda bs: [])   # rank 1 has no eval shard at all
        res = {"fluency": evaluate_fluency(model, mine(fluency), K, world=2),
               "reasoning": evaluate_reasoning(model, mine(reasoning), K, n_examples=18, world=2),
               "fluency_k1": evaluate_fluency(model, mine(fluency)[1:], 1, world=2)}  # and again: still in step
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_rank_without_batches_gets_the_global_result(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    model, fluency, reasoning = setup()
    want_fluency = evaluate_fluency(model, fluency, K)
    want_reasoning = evaluate_reasoning(model, reasoning, K, n_examples=18)
    want_k1 = evaluate_fluency(model, fluency[1:], 1)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert got["fluency"] == pytest.approx(want_fluency, rel=1e-6), rank
        assert got["fluency_k1"] == pytest.approx(want_k1, rel=1e-6), rank
        assert_same_reasoning(got["reasoning"], want_reasoning)

# -----------------------------------------------------------------------------
# no float64 (MPS has none)


class DtypeRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.float64_ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in tree_flatten(out)[0]):
            self.float64_ops.append(str(func))
        return out


def test_evaluation_creates_no_float64_tensors():
    model, fluency, reasoning = setup()
    with torch.no_grad():
        want = [sum(float(model(b.x, b.y, n_steps=K)[1][k].double().sum()) for b in fluency) /
                sum(int((b.y >= 0).sum()) for b in fluency) for k in range(K)]
    with DtypeRecorder() as rec:
        got = evaluate_fluency(model, fluency, K)
        evaluate_reasoning(model, reasoning, K, n_examples=18)
    assert rec.float64_ops == [], f"float64 tensors made by {sorted(set(rec.float64_ops))}"
    assert got == pytest.approx(want, rel=1e-5)
