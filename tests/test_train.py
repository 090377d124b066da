"""train.py: the logged records, DDP == one process, accumulation == one large batch, eval, throughput.
Configuration and its errors: test_train_config.py; checkpoints and resume: test_resume.py; the schedules:
test_schedules.py."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import data
import schedules
import train
from evaluate import evaluate_reasoning
from configurator import ConfigError
from conftest import run_torchrun
from losses import ObjectiveConfig, supervise
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--device=cpu", "--dtype=float32", "--compile=False", "--tokenizer=byte", "--fluency_data=pydoc",
        "--reasoning_data=synthetic", "--n_layer=2", "--n_head=2", "--n_embd=32", "--n_steps=2",
        "--n_latent=16", "--block_size=48", "--batch_size=4", "--gradient_accumulation_steps=2",
        "--eval_iters=2", "--eval_examples=12", "--log_interval=1", "--warmup_iters=2", "--lr_decay_iters=8",
        "--learning_rate=3e-3"]


def tiny_gpt(n_layer, n_steps):
    """A model of TINY's shape (byte vocabulary, block 48, 2 heads, C = 32, D = 16)."""
    return GPT(GPTConfig(block_size=48, vocab_size=257, n_layer=n_layer, n_head=2, n_embd=32, n_steps=n_steps,
                         n_latent=16))


def forward_backward(model, micro, K, c, progressive=None):
    """One optimizer step's micro-steps as train.py's loop runs them on one process (forward, objective,
    backward per (index, Batch)) -> the logged sums, each a tensor (nll_k: (K,))."""
    counts = train.step_counts([b for _, b in micro], c, "cpu", 1)
    objective = train.Objective(model, ObjectiveConfig.of(c))
    logged = {}
    for index, b in micro:
        schedules.seed_micro_batch(c, index)
        sup = supervise(b, K, objective.cfg, progressive, schedules.sampling_generator(c, index))
        loss, parts = objective(b, sup, "reasoning", counts)
        loss.backward()
        logged = {k: logged.get(k, 0) + v for k, v in parts.items()}
    return logged


def records(out_dir, kind):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["type"] == kind]


def final_params(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), map_location="cpu", weights_only=False)["model"]


# -----------------------------------------------------------------------------
# the train records: the mean of each kind since the last log

def test_train_records_log_the_mean_of_each_kind_since_the_last_log(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    args = TINY + ["--max_iters=6", "--eval_interval=6", "--n_steps_dist=uniform", "--n_steps=2"]
    train.main(args + [f"--out_dir={one}", "--log_interval=1"])
    train.main(args + [f"--out_dir={two}", "--log_interval=3"])
    steps, windows = records(one, "train"), records(two, "train")
    assert [r["iter"] for r in windows] == [3, 6]
    for w in windows:
        its = steps[w["iter"] - 3: w["iter"]]
        assert w["n_steps"] == [r["n_steps"][0] for r in its]
        assert w["loss"] == pytest.approx(sum(r["loss"] for r in its) / 3)
        for kind in ("fluency", "reasoning"):                    # ρ = 0.5: both kinds in every window of 3
            mine = [r[kind] for r in its if kind in r]
            assert w[kind]["steps"] == len(mine) > 0
            assert w[kind]["loss"] == pytest.approx(sum(m["loss"] for m in mine) / len(mine))
            for k, v in enumerate(w[kind]["nll_k"]):             # ℓ_k over the steps that ran step k
                ran = [m["nll_k"][k] for m in mine if len(m["nll_k"]) > k]
                assert v == pytest.approx(sum(ran) / len(ran))


# -----------------------------------------------------------------------------
# DDP with random K and truncated backward

class _DDPBuilt(Exception):
    pass


@pytest.mark.parametrize("dist, grad_steps, cap, unused", [
    ("lognormal", 2, 0, True),      # K=2, but draws reach the cap 4K = 8 > grad_steps: W_in sometimes unused
    ("lognormal", 2, 2, False),     # capped at 2 = grad_steps: every step backprops through z_0
    ("uniform", 2, 0, True),        # up to 2K−1 = 3
    ("fixed", 2, 0, False),
    ("lognormal", 0, 0, False),     # grad_steps = 0: all steps
])
def test_ddp_finds_unused_parameters_whenever_a_drawn_k_can_exceed_grad_steps(tmp_path, monkeypatch, dist,
                                                                              grad_steps, cap, unused):
    seen = {}

    def fake_ddp(model, **kwargs):
        seen.update(kwargs)
        raise _DDPBuilt
    # as rank 0 of 2, without a process group
    monkeypatch.setattr(train, "setup_system", lambda c: (0, 0, 2, "cpu"))
    monkeypatch.setattr(train, "DDP", fake_ddp)
    with pytest.raises(_DDPBuilt):
        train.main(TINY + [f"--out_dir={tmp_path}", f"--n_steps_dist={dist}", f"--grad_steps={grad_steps}",
                           f"--n_steps_max={cap}"])
    assert seen["find_unused_parameters"] is unused


# -----------------------------------------------------------------------------
# the training step

def test_train_step_weights_skip_the_first_steps_also_when_k_is_drawn_small():
    # L_DS = Σ_k w_k ℓ_k, so the logged ds shows the weights the training step used
    c, _ = train.load_config(TINY + ["--n_steps=3", "--weight_skip=1", "--weight_schedule=linear"])
    _, _, reasoning = train.load_data(c)
    micro = [(i, reasoning.get_batch(i, 4)) for i in range(2)]
    torch.manual_seed(0)
    model = tiny_gpt(n_layer=1, n_steps=3)
    for K, w in [(3, [0, 2 / 5, 3 / 5]), (2, [0, 1]), (1, [1])]:      # K = 1 <= weight_skip: its only step
        logged = forward_backward(model, micro, K, c)
        assert logged["ds"] == pytest.approx(sum(wk * nk for wk, nk in zip(w, logged["nll_k"].tolist())),
                                             rel=1e-5), K


def test_mixed_routing_keeps_soft_rl_on_the_reasoning_rows():
    """routing='mixed' with rl_answer_only=False: L_RL over the reasoning rows' valid tokens only (the method
    puts soft RL on reasoning data), against a plain recomputation; over every row it would differ."""
    c, _ = train.load_config(TINY + ["--routing=mixed", "--rl_answer_only=False", "--lambda_rl=1.0",
                                     "--batch_size=4", "--n_steps=2", "--weight_schedule=uniform"])
    _, fluency, reasoning = train.load_data(c)
    index, b = train.micro_batches(3, c, (fluency, reasoning), kind="reasoning", n_steps=c["n_steps"])[0]
    torch.manual_seed(0)
    model = tiny_gpt(n_layer=1, n_steps=2)
    with torch.no_grad():   # confident predictions: p far from uniform, so the rows' soft RL terms differ
        model.transformer.wte.weight.normal_(0, 2.0)
    counts = train.step_counts([b], c, "cpu", 1)
    objective = train.Objective(model, ObjectiveConfig.of(c))              # w = (0.5, 0.5): uniform
    _, logged = objective(b, supervise(b, 2, objective.cfg), "reasoning", counts)
    with torch.no_grad():
        _, nll = model(b.x, b.y.expand(2, *b.y.shape), n_steps=2)              # (K, B, T)
    valid = b.y >= 0
    reasoning_rows = torch.arange(4)[:, None] >= 2          # cat_batches: 2 fluency rows,
                                                            # then 2 reasoning rows
    rl_of = lambda m: sum(0.5 * ((1 - torch.exp(-nll[k])) * m).sum() / m.sum() for k in range(2))
    assert logged["rl"] == pytest.approx(rl_of(valid & reasoning_rows).item(), rel=1e-5)
    assert abs(rl_of(valid & reasoning_rows) - rl_of(valid)) > 0.01          # the test can tell them apart


def test_accumulating_micro_batches_equals_one_large_batch():
    tok = data.get_tokenizer("byte")
    rd = data.ReasoningData("synthetic", tok, 48, seed=0)
    micro = [rd.get_batch(i, 3) for i in range(4)]            # different padding in every micro-batch
    big = data.cat_batches(micro, "reasoning")
    c, _ = train.load_config(TINY + ["--lambda_rl=0.5", "--lambda_imp=0.3"])
    results = []
    for batches in ([big], micro):
        torch.manual_seed(0)
        model = tiny_gpt(n_layer=2, n_steps=2)
        with torch.no_grad():
            model.latent_head.w_out.weight.normal_(0, 0.1)    # so the head's gradients are not trivially zero
        logged = forward_backward(model, list(enumerate(batches)), 2, c)
        results.append((logged, [p.grad.clone() for p in model.parameters()]))
    (t_big, g_big), (t_acc, g_acc) = results
    for k in t_big:                                          # loss and its parts
        assert torch.allclose(t_big[k], t_acc[k], atol=1e-6), k
    for a, b in zip(g_big, g_acc):                           # the gradient the optimizer step will use
        assert torch.allclose(a, b, atol=1e-6)


def test_evaluate_reasoning_matches_a_plain_count():
    tok = data.get_tokenizer("byte")
    rd = data.ReasoningData("synthetic", tok, 48, seed=0)
    torch.manual_seed(0)
    model = tiny_gpt(n_layer=1, n_steps=3)
    with torch.no_grad():
        model.latent_head.w_out.weight.normal_(0, 1.0)
    model.eval()
    batches = rd.eval_batches(4, 30)
    got = evaluate_reasoning(model, batches, 3)
    correct = {}                                              # example -> [all tokens right at step k]
    n_tok, n_right = 0, [0, 0, 0]
    for b in batches:
        logits, _ = model(b.x)                               # (K, B, T, V), all at once
        pred = logits.argmax(-1)
        for r, t in zip(*torch.nonzero(b.answer_mask, as_tuple=True)):
            i = int(b.answer_id[r, t])
            ok = [bool(pred[k, r, t] == b.y[r, t]) for k in range(3)]
            correct[i] = [a and o for a, o in zip(correct.get(i, [True] * 3), ok)]
            n_tok += 1
            n_right = [n + o for n, o in zip(n_right, ok)]
    assert len(correct) == 30
    want_em = [sum(v[k] for v in correct.values()) / 30 for k in range(3)]
    assert got["answer_exact_match"] == pytest.approx(want_em)
    assert got["answer_token_acc"] == pytest.approx([n / n_tok for n in n_right], rel=1e-5)

# -----------------------------------------------------------------------------
# whole runs: DDP == one process, compile, routing, throughput, precision

@pytest.mark.slow
@pytest.mark.parametrize("sampled", [False, True])
def test_ddp_two_processes_equal_one_process(tmp_path, sampled):
    # dropout (masks seeded by global micro-batch index), random K (log-normal Poisson) with truncated
    # backward (W_in then gets no gradient in some steps) and no weight on step 1, an attending head, and one
    # fluency eval batch for two ranks (rank 1 has no fluency shard); sampled: the draws too
    args = TINY + ["--max_iters=4", "--eval_interval=4", "--reasoning_fraction=0.5", "--dropout=0.1",
                   "--n_steps_dist=lognormal", "--n_steps=3", "--grad_steps=1", "--weight_skip=1",
                   "--head_attn=trunk", "--eval_iters=1", f"--sampled_supervision={sampled}"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "train.py", *args, f"--out_dir={one}"], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=300)
    ddp = run_torchrun(*args, out_dir=two)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = records(one, "train"), records(two, "train")
    kinds = lambda recs: [next(k for k in ("fluency", "reasoning") if k in r) for r in recs]
    assert kinds(a) == kinds(b) == ["fluency", "reasoning"] * 2
    assert [r["n_steps"] for r in a] == [r["n_steps"] for r in b] and max(r["n_steps"][0] for r in a) > 1
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-5)
    pa, pb = final_params(one), final_params(two)
    for k in pa:
        assert torch.allclose(pa[k], pb[k], atol=1e-5), k
    ea, eb = records(one, "eval")[-1], records(two, "eval")[-1]
    assert ea["answer_exact_match"] == pytest.approx(eb["answer_exact_match"])
    assert ea["fluency_loss"] == pytest.approx(eb["fluency_loss"], abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("attn", ["none", "latent"])
def test_compiled_training_runs_and_saves_plain_names(tmp_path, attn):
    # random K and eval batches of other lengths than training's: the compiled parts must take both
    train.main(TINY + [f"--out_dir={tmp_path}", "--compile=True", "--max_iters=3", "--eval_interval=3",
                       f"--head_attn={attn}", "--n_steps_dist=uniform"])
    state = final_params(tmp_path)
    assert not any(k.startswith("_orig_mod.") for k in state)
    assert all(math.isfinite(r["loss"]) for r in records(tmp_path, "train"))


def test_mixed_routing_puts_both_kinds_in_every_micro_batch():
    c, _ = train.load_config(TINY + ["--routing=mixed", "--reasoning_fraction=0.25"])
    _, fluency, reasoning = train.load_data(c)
    micro = train.micro_batches(5, c, (fluency, reasoning), kind="reasoning", n_steps=c["n_steps"])
    assert [i for i, _ in micro] == [10, 11]                     # global micro-batch indices of step 5
    for _, b in micro:
        assert b.x.shape == (4, 48) and b.kind == "reasoning"
        assert not b.answer_mask[:3].any() and b.answer_mask[3].any()   # 3 fluency rows, 1 reasoning row
    with pytest.raises(ConfigError, match="routing='mixed' needs 0 < reasoning_fraction < 1"):
        train.load_config(TINY + ["--routing=mixed", "--reasoning_fraction=0.0"])


def test_throughput_counts_only_training_time_and_the_flops_actually_run(tmp_path, monkeypatch):
    clock = iter(range(10**6))
    monkeypatch.setattr(train, "perf_counter", lambda: 0.5 * next(clock))    # every training step takes 0.5 s
    args = TINY + [f"--out_dir={tmp_path}", "--max_iters=9", "--eval_interval=3", "--log_interval=2",
                   "--n_steps_dist=uniform", "--n_steps=3", "--grad_steps=1"]
    train.main(args)
    c, _ = train.load_config(args)
    model = tiny_gpt(n_layer=2, n_steps=3)
    tokens_per_iter = 2 * 4 * 48
    logs = records(tmp_path, "train")
    assert [r["iter"] for r in logs] == [2, 4, 6, 8]
    for r in logs:                                 # evals at 3 and 6 fall inside windows and must not count
        assert r["tokens_per_s"] == tokens_per_iter / 0.5
        its = range(r["iter"] - 2, r["iter"])
        flops = sum(model.flops_per_token(schedules.n_steps_at(it, c), 48, grad_steps=1)["total"]
                    for it in its)
        assert r["tflops"] == pytest.approx(flops * tokens_per_iter / (0.5 * len(its)) / 1e12)


def test_bf16_autocast_training_on_cpu(tmp_path):
    bf16 = [a for a in TINY if not a.startswith("--dtype")] + ["--dtype=bfloat16"]
    train.main(bf16 + [f"--out_dir={tmp_path}", "--max_iters=4", "--eval_interval=4"])
    losses = [r["loss"] for r in records(tmp_path, "train")]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert all(torch.isfinite(v).all() for v in final_params(tmp_path).values())
    assert math.isfinite(records(tmp_path, "eval")[-1]["fluency_loss"][-1])


def test_training_step_makes_no_float64_tensors():
    """MPS has no float64: the step's counts and sums must use dtypes every device has."""
    from torch.utils._python_dispatch import TorchDispatchMode

    made_float64 = []

    class DtypeLog(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                    made_float64.append(str(func))
            return out
    c, _ = train.load_config(TINY)
    _, _, reasoning = train.load_data(c)
    micro = [(i, reasoning.get_batch(i, 4)) for i in range(2)]
    model = tiny_gpt(n_layer=1, n_steps=2)
    with DtypeLog():
        forward_backward(model, micro, 2, c)
    assert made_float64 == []
