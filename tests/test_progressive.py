"""The progressive loss (Bansal et al. 2022): its draws, its gradient against a second head pass written out
by hand, and its second pass under level-matched supervision (README "Steps that earn their keep")."""

import pytest
import torch

import data
import schedules
import train
from losses import ObjectiveConfig, rlrp_loss, step_weights, supervise
from test_train import TINY, forward_backward, tiny_gpt

BYTE = data.get_tokenizer("byte")


def trained_grads(batch, K, c, progressive):
    """(a tiny model with a non-zero W_out, the gradients train.py's objective gives it on batch), its
    gradients zeroed for the by-hand recomputation."""
    torch.manual_seed(0)
    model = tiny_gpt(n_layer=1, n_steps=K)
    with torch.no_grad():
        model.latent_head.w_out.weight.normal_(0, 0.1)
    forward_backward(model, [(0, batch)], K, c, progressive=progressive)
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return model, got


def test_progressive_draws_cover_every_n_and_k_and_repeat_per_iteration():
    c = {"seed": 5, "progressive_alpha": 0.5}
    draws = [schedules.progressive_steps(it, c, 4) for it in range(400)]
    assert set(draws) == {(n, k) for n in range(4) for k in range(1, 5 - n)}
    assert draws == [schedules.progressive_steps(it, c, 4) for it in range(400)]
    assert schedules.progressive_steps(0, c, 0) is None
    assert schedules.progressive_steps(0, {**c, "progressive_alpha": 0.0}, 4) is None


@pytest.mark.parametrize("n, k", [(0, 2), (2, 1), (1, 2)])
def test_progressive_loss_equals_a_plain_recomputation(n, k):
    """(1 − α)·L_K + α·L_{n+k}: its gradient, against a second head pass written out by hand."""
    alpha, K = 0.3, 3
    c, _ = train.load_config(TINY + [f"--n_steps={K}", f"--progressive_alpha={alpha}", "--lambda_imp=0",
                                     "--lambda_rl=0.5"])
    rd = data.ReasoningData("synthetic", BYTE, 48, seed=0)
    batch = rd.get_batch(0, 4)
    model, got = trained_grads(batch, K, c, (n, k))
    head, w = model.latent_head, step_weights(K, "linear")
    h = model.trunk(batch.x)
    nll = torch.stack([model.step_nll(o, batch.y) for o in head(h, K)])
    main, _ = rlrp_loss(nll, batch.y, batch.answer_mask, "reasoning", w, lambda_rl=0.5)
    z, (inject, beta, kv) = head.init_state(h)
    z = z.detach() if n else z                                # Bansal: the first n steps carry no gradient
    with torch.no_grad():
        for _ in range(n):
            z = head.update(z, inject, beta, kv)
    for _ in range(k):
        z = head.update(z, inject, beta, kv)
    nll_p = model.step_nll(head.readout(h, z), batch.y)[None]
    second, _ = rlrp_loss(nll_p, batch.y, batch.answer_mask, "reasoning", torch.ones(1), lambda_rl=0.5)
    ((1 - alpha) * main + alpha * second).backward()
    for (name, p), g in zip(model.named_parameters(), got):
        assert torch.allclose(p.grad, g, atol=1e-6), name


@pytest.mark.parametrize("level_steps, n, k", [("at", 0, 1), ("at", 1, 1), ("from", 0, 1), ("from", 1, 1)])
def test_the_progressive_pass_trains_step_n_plus_k_only_where_level_steps_allow_it(level_steps, n, k):
    """Level-matched supervision with the progressive loss: the second pass's step n+k gets no loss on an
    answer whose level it may not be read at (at: k = L only; from: k >= L), as the main pass's W."""
    alpha, K = 0.5, 3
    c, _ = train.load_config(TINY + [f"--n_steps={K}", f"--progressive_alpha={alpha}", "--lambda_imp=0",
                                     "--lambda_rl=0", "--step_targets=final", f"--level_steps={level_steps}",
                                     "--reasoning_tasks=hopo:1-3"])
    batch = data.ReasoningData("synthetic", BYTE, 48, tasks="hopo:1-3", seed=0).get_batch(0, 6)
    assert set(batch.level[batch.answer_mask].tolist()) == {1, 2, 3}
    sup = supervise(batch, K, ObjectiveConfig.of(c), (n, k))
    step, level = n + k, batch.level
    ok = (level == 0) | (level == step if level_steps == "at" else level <= step)     # by hand, L <= K
    assert torch.equal(sup.second_weights[0], ok.float())
    assert not ok[batch.answer_mask].all() and ok[batch.answer_mask].any()           # both kinds present
    model, got = trained_grads(batch, K, c, (n, k))
    head = model.latent_head
    h = model.trunk(batch.x)
    nll = torch.stack([model.step_nll(o, batch.y) for o in head(h, K)])
    main, _ = rlrp_loss(nll, batch.y, batch.answer_mask, "reasoning", sup.weights)
    second = model.step_nll(head(h, step, grad_steps=k)[-1], batch.y)        # o_{n+k}, (B, T)
    valid = batch.y != -1
    ((1 - alpha) * main + alpha * (second * ok)[valid].sum() / valid.sum()).backward()
    for (name, p), g in zip(model.named_parameters(), got):
        assert torch.allclose(p.grad, g, atol=1e-6), name


def test_progressive_needs_lambda_imp_zero():
    with pytest.raises(train.ConfigError, match="progressive_alpha > 0 needs lambda_imp=0"):
        train.load_config(TINY + ["--progressive_alpha=0.5"])
