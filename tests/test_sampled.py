"""Sampled deep supervision (losses.StepDraw): the draw, its estimates against the full objective and a plain
recomputation, what it logs, what it counts, and train.py with it on."""

import os
from types import SimpleNamespace

import pytest
import torch

import data
import schedules
import train
from conftest import run_script
from losses import (ObjectiveConfig, Supervision, rlrp_loss, sampled_unembeds, step_supervision, step_weights,
                    supervise)
from schedules import draw_steps, imp_positions
from train import Objective
from test_train import TINY, forward_backward, records, tiny_gpt

LAMBDA_RL, LAMBDA_IMP = 0.7, 0.4


def objective(nll, y, answer, W, draw=None, margin=0.0):
    """rlrp_loss on a reasoning batch with every term on, answer tokens weighted 2: (loss, parts)."""
    return rlrp_loss(nll, y, answer, "reasoning", W, lambda_rl=LAMBDA_RL, lambda_imp=LAMBDA_IMP,
                     margin=margin, rl_q=0.5, answer_weight=2.0, draw=draw)


def random_problem(K, seed=0, B=3, T=5):
    """A realistic ℓ (K', B, T) leaf with values around log V, targets with padding, an answer mask."""
    g = torch.Generator().manual_seed(seed)
    nll = (torch.rand(max(K, 1), B, T, generator=g) * 4 + 0.5).requires_grad_()
    y = torch.randint(0, 50, (B, T), generator=g)
    y[0, -2:] = -1                                               # padding: ignored
    answer = (torch.rand(B, T, generator=g) < 0.5) & (y >= 0)
    return nll, y, answer


def step_grid(name, K, y):
    """The step weights of a named case: a schedule's w (K',), or a per-token grid W (K', B, T)."""
    if name == "levels":                         # level_steps='from': each answer from its own level L on
        level = torch.where(torch.arange(y.size(1)) % 2 == 0, 1, K).expand_as(y)
        return step_supervision(y, K, step_weights(K), level=level, level_steps="from")[1]
    schedule, skip = {"skip": ("linear", 1)}.get(name, (name, 0))
    return step_weights(max(K, 1), schedule, 0.5, skip if K > 1 else 0)


def test_draw_k_follows_the_weights_and_never_draws_a_step_of_weight_zero():
    W = torch.tensor([0.1, 0.0, 0.6, 0.3, 0.0])
    draws = torch.cat([draw_steps(W, 5, (10, 10), 0.25, torch.Generator().manual_seed(s)).k.flatten()
                       for s in range(100)])                            # 10,000 draws
    freq = torch.bincount(draws - 1, minlength=5).float() / draws.numel()
    assert torch.allclose(freq, W, atol=0.015)                          # 3 standard errors at most
    assert freq[1] == 0 and freq[4] == 0


def test_draw_sizes_are_fixed_and_the_penalty_positions_distinct():
    for K in (1, 2, 4):
        d = draw_steps(step_weights(K), K, (4, 6), 0.1, torch.Generator().manual_seed(0))
        M = imp_positions(K, 24, 0.1)
        assert M == (3 if K > 1 else 0)                                 # ⌈0.1·24⌉
        assert d.k.shape == (4, 6) and d.imp_pos.shape == d.imp_j.shape == (M,)
        assert len(set(d.imp_pos.tolist())) == M and ((d.imp_j >= 2) & (d.imp_j <= K)).all()
        assert d.rows().shape == (24 + 2 * M,)


def test_a_fixed_draw_equals_a_plain_recomputation():
    K, tok = 3, data.get_tokenizer("byte")
    b = data.ReasoningData("synthetic", tok, 48, seed=0).get_batch(0, 4)
    torch.manual_seed(0)
    model = tiny_gpt(n_layer=1, n_steps=K)
    with torch.no_grad():
        model.latent_head.w_out.weight.normal_(0, 0.5)                   # steps that differ
    W = step_weights(K)
    draw = draw_steps(W, K, b.y.shape, 0.2, torch.Generator().manual_seed(1))
    _, full = model(b.x, b.y, n_steps=K)                                # ℓ (K, B, T)
    sup = Supervision(targets=b.y.expand(K, *b.y.shape), weights=W, n_steps=K, draw=draw)
    picked = Objective(model, ObjectiveConfig()).step_nll(b.x, sup)     # ℓ at the drawn rows only
    assert torch.allclose(picked, full.flatten()[draw.rows()], atol=1e-5)
    loss, parts = objective(picked, b.y, b.answer_mask, W, draw)
    # by hand, position by position
    valid, (B, T) = b.y >= 0, b.y.shape
    a = torch.where(b.answer_mask, 2.0, 1.0)
    ds = rl = 0.0
    for i in range(B):
        for t in range(T):
            ell = full[draw.k[i, t] - 1, i, t]
            ds += valid[i, t] * a[i, t] * ell
            rl += (valid[i, t] & b.answer_mask[i, t]) * (1 - torch.exp(-0.5 * ell)) / 0.5
    ds, rl = ds / (a * valid).sum(), rl / (valid & b.answer_mask).sum()
    imp = sum(valid.flatten()[p] * torch.relu(full[j - 1].flatten()[p] - full[0].flatten()[p])
              for p, j in zip(draw.imp_pos, draw.imp_j)) * (B * T / len(draw.imp_pos)) / valid.sum()
    assert parts["ds"] == pytest.approx(ds.item(), rel=1e-5)
    assert parts["rl"] == pytest.approx(rl.item(), rel=1e-5)
    assert parts["imp"] == pytest.approx(imp.item(), rel=1e-5) and parts["imp"] > 0
    assert loss.item() == pytest.approx((ds + LAMBDA_RL * rl + LAMBDA_IMP * imp).item(), rel=1e-5)
    # the logged ℓ_k: the mean over the valid tokens that drew step k, as sums over Σ m_valid
    for k in range(K):
        hit = (draw.k == k + 1) & valid
        assert parts["drawn_k"][k] == pytest.approx((hit.sum() / valid.sum()).item())
        assert parts["nll_k"][k] == pytest.approx((full[k][hit].sum() / valid.sum()).item(), rel=1e-5)


@pytest.mark.parametrize("K", [1, 2, 5])
@pytest.mark.parametrize("case", ["uniform", "linear", "exp", "last", "skip", "levels"])
def test_the_estimate_and_its_gradient_average_to_the_full_objective(K, case):
    nll, y, answer = random_problem(K, seed=K)
    W = step_grid(case, K, y)
    full, _ = objective(nll, y, answer, W, margin=0.3)
    full_grad, = torch.autograd.grad(full, nll)
    n_draws, gen = 600, torch.Generator().manual_seed(0)
    values, grads = [], []
    for _ in range(n_draws):
        draw = draw_steps(W, K, y.shape, 0.2, gen)
        rows = draw.rows()
        est, _ = objective(nll.flatten()[rows], y, answer, W, draw, margin=0.3)
        values.append(est.detach())
        grads.append(torch.autograd.grad(est, nll)[0])
    values, grads = torch.stack(values), torch.stack(grads)
    # within 5 standard errors of the mean (a true mismatch, e.g. a wrong weight, is many more)
    se = values.std() / n_draws ** 0.5
    assert abs(values.mean() - full.detach()) <= 5 * se + 1e-6, (values.mean(), full)
    grad_se = grads.std(0) / n_draws ** 0.5
    assert ((grads.mean(0) - full_grad).abs() <= 5 * grad_se + 1e-6).all()
    assert full_grad.abs().sum() > 0
    if K > 1:
        assert se > 0                   # a random estimate (K = 1 has one step and no penalty: it is exact)


def test_the_model_gradient_of_the_estimate_averages_to_the_full_one():
    K, tok = 3, data.get_tokenizer("byte")
    c, _ = train.load_config(TINY + ["--n_steps=3", "--lambda_rl=0.5", "--lambda_imp=0.3"])
    micro = [(i, data.ReasoningData("synthetic", tok, 48, seed=0).get_batch(i, 2)) for i in range(2)]

    def grads(config, n_draws=1):
        torch.manual_seed(0)
        model = tiny_gpt(n_layer=1, n_steps=K)
        with torch.no_grad():
            model.latent_head.w_out.weight.normal_(0, 0.3)
        per_draw = []
        for d in range(n_draws):                  # a different draw: the micro-batches' indices shift
            model.zero_grad()
            forward_backward(model, [(i + 1000 * d, b) for i, b in micro], K, config)
            per_draw.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        return torch.stack(per_draw)

    full = grads(c)[0]
    sampled = grads({**c, "sampled_supervision": True}, n_draws=150)
    se = sampled.std(0) / 150 ** 0.5
    assert ((sampled.mean(0) - full).abs() <= 5 * se + 1e-6).all()
    assert (sampled[0] - full).abs().max() > 1e-4          # one draw is not the full gradient


def test_sampled_flops_count_the_unembeddings_that_run():
    model = tiny_gpt(n_layer=1, n_steps=4)
    C, V = model.config.n_embd, model.config.vocab_size
    B, T, f = 4, 48, 0.125
    assert sampled_unembeds(4, B * T, f) == (B * T + 2 * 24) / (B * T)        # M = ⌈0.125·192⌉ = 24
    assert sampled_unembeds(1, B * T, f) == 1                                  # K = 1: no penalty pairs
    flops = model.flops_per_token(4, T, unembeds=1.25)
    assert flops["unembed"] == 6 * C * V * 1.25
    assert flops["total"] == model.flops_per_token(4, T)["total"] - 6 * C * V * (4 - 1.25)
    c, _ = train.load_config(TINY + ["--n_steps=4", "--sampled_supervision=True", "--imp_fraction=0.125"])
    run = SimpleNamespace(c=c, raw_model=model)
    step = schedules.StepPlan(kind="reasoning", n_steps=4, lr=1.0, progressive=None, level=0)
    assert train.Run.flops_per_token(run, step) == model.flops_per_token(4, 48, unembeds=1.25)["total"]


def test_train_with_sampled_supervision_logs_none_for_steps_never_drawn(tmp_path):
    # 'last' puts all the weight on step K: steps 1..K−1 are never drawn, their logged ℓ_k is null
    out = str(tmp_path / "out")
    r = run_script("train.py", *TINY, "--n_steps=3", "--sampled_supervision=True", "--weight_schedule=last",
                   "--max_iters=4", "--eval_interval=4", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    recs = records(out, "train")
    for rec in recs:
        nll_k = (rec.get("fluency") or rec["reasoning"])["nll_k"]
        assert nll_k[:2] == [None, None] and nll_k[2] > 0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert "NaN" not in f.read()                                    # strict JSON: null, not NaN


def test_the_progressive_second_pass_keeps_its_full_row_under_sampling():
    # L = (1 − α)·L̂ + α·L_{n+k}: the drawn rows of steps 1..K, then every position of the second pass's step
    K, (n, k), index = 3, (1, 2), 7
    c, _ = train.load_config(TINY + ["--n_steps=3", "--sampled_supervision=True", "--progressive_alpha=0.4",
                                     "--lambda_imp=0", "--lambda_rl=0.5"])
    b = data.ReasoningData("synthetic", data.get_tokenizer("byte"), 48, seed=0).get_batch(0, 3)
    torch.manual_seed(0)
    model = tiny_gpt(n_layer=1, n_steps=K)
    counts = train.step_counts([b], c, "cpu", 1)
    W = step_weights(K)
    sup = supervise(b, K, ObjectiveConfig.of(c), (n, k), schedules.sampling_generator(c, index))
    loss, _ = Objective(model, ObjectiveConfig.of(c))(b, sup, "reasoning", counts)
    draw = draw_steps(W, K, b.y.shape, c["imp_fraction"], schedules.sampling_generator(c, index))
    h = model.trunk(b.x)                                                # the second pass, by hand: o_{n+k}
    second = model.step_nll(model.latent_head(h, n + k, grad_steps=k)[-1], b.y)[None]
    full = torch.cat([model(b.x, b.y, n_steps=K)[1], second])           # ℓ (K + 1, B, T)
    term = lambda ell, w, d=None: rlrp_loss(ell, b.y, b.answer_mask, "reasoning", w, lambda_rl=0.5,
                                            lambda_imp=0.0, counts=counts, draw=d)[0]
    want = 0.6 * term(full[:K].flatten()[draw.rows()], W, draw) + 0.4 * term(full[K:], torch.ones(1))
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
