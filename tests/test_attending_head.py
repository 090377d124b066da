"""latent_head.py's attending heads (head_attn = trunk | latent), whose step k at position t reads the
trunk's states or the latents at s <= t: the same invariants as the position-wise head, causal instead
of position-wise, values and gradients against a plain loop over positions, generation equal to the
uncached model, FLOPs counted by hand and pass by pass, and the compiled step equal to eager."""

import pytest
import torch
import torch.nn.functional as F

from latent_head import LatentHead
from model import GPT
from test_model import V, gelu_formula, tiny_config, tiny_model, tokens, trunk_logits

ATTN = ("trunk", "latent")


def reference_attending_head(head, h, K, gelu):
    """The attending head written out with a plain loop over positions: step k at t reads s <= t only."""
    B, T, C = h.shape
    ln = lambda x, m: F.layer_norm(x, x.shape[-1:], m.weight, m.bias)
    hn = ln(h, head.ln_h)
    beta = torch.sigmoid(head.b)
    nh, hs = head.n_head, head.head_size
    z, outs = torch.tanh(hn @ head.w_in.weight.T + head.w_in.bias), []
    for _ in range(K):
        zn = ln(z, head.ln_z)
        if head.attn == "trunk":
            q = zn @ head.w_q.weight.T + head.w_q.bias
            k, v = (hn @ head.w_kv.weight.T + head.w_kv.bias).split(q.size(-1), -1)
        else:
            q, k, v = (zn @ head.w_qkv.weight.T + head.w_qkv.bias).split(zn.size(-1), -1)
        a = torch.zeros_like(zn)
        for t in range(T):
            for i in range(nh):
                d = slice(i * hs, (i + 1) * hs)
                att = torch.softmax(torch.einsum("bd,bsd->bs", q[:, t, d], k[:, :t + 1, d]) / hs ** 0.5, -1)
                a[:, t, d] = torch.einsum("bs,bsd->bd", att, v[:, :t + 1, d])          # over s <= t
        first = zn @ head.fc_z.weight.T + hn @ head.fc_h.weight.T + head.fc_h.bias + a @ head.fc_a.weight.T
        u = gelu_formula(first, gelu) @ head.proj.weight.T + head.proj.bias
        z = z + beta * (torch.tanh(u) - z)
        outs.append(h + z @ head.w_out.weight.T + head.w_out.bias)
    return torch.stack(outs)


@pytest.mark.parametrize("attn, D, gelu", [("trunk", 24, "exact"), ("latent", 24, "tanh"),
                                           ("trunk", 128, "tanh"), ("latent", 128, "exact")])
def test_attending_head_matches_a_plain_loop_values_and_gradients(attn, D, gelu):
    torch.manual_seed(0)
    head = LatentHead(32, D, attn=attn, gelu=gelu).double()          # fp64: the two computations
                                                                     # agree to rounding
    with torch.no_grad():
        for p in head.parameters():                       # every tensor non-trivial, W_out included
            p.normal_(0, 0.3)
    assert head.n_head == (2 if D == 128 else 1)
    h = torch.randn(2, 7, 32, dtype=torch.float64)
    got, want = head(h, 3), reference_attending_head(head, h, 3, gelu)
    assert torch.allclose(got, want, atol=1e-10)
    up = torch.randn_like(got)
    g_got = torch.autograd.grad((got * up).sum(), list(head.parameters()))
    g_want = torch.autograd.grad((want * up).sum(), list(head.parameters()))
    for a, b in zip(g_got, g_want):
        assert torch.allclose(a, b, atol=1e-10)


@pytest.mark.parametrize("attn", ATTN)
def test_attending_heads_keep_I1_I2_I4_I5_and_are_causal_I3(attn):
    torch.manual_seed(0)
    fresh = GPT(tiny_config(n_steps=3, head_attn=attn)).eval()                      # I2: W_out = 0
    idx = tokens()
    logits, _ = fresh(idx)
    for k in range(3):
        assert torch.equal(logits[k], trunk_logits(fresh, idx))
    model = tiny_model(head_attn=attn)
    with torch.no_grad():                                   # as after training: every head tensor non-trivial
        for p in model.latent_head.parameters():
            p.normal_(0, 0.3)
    # I1: bounded for 1000 steps and huge inputs
    with torch.no_grad():
        _, z = model.latent_head(torch.randn(1, 5, 32) * 1e4, 1000, return_latents=True)
    assert z.abs().max() <= 1.0 and torch.isfinite(z).all()
    # I3 causal: tokens changed from position 7 on change no step at positions <= 6, and do change later ones
    changed = idx.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % V
    a, _ = model(idx)
    b, _ = model(changed)
    assert torch.allclose(a[:, :, :7], b[:, :, :7], atol=1e-6)
    assert not torch.allclose(a[:, :, 7:], b[:, :, 7:])
    # ... and the head reads other positions: unlike head_attn='none', it is not position-wise
    h = torch.randn(1, 9, 32)
    h2 = h.clone()
    h2[:, 3] += torch.randn(32)                             # (a constant shift would vanish in LN_h)
    o, o2 = model.latent_head(h, 3), model.latent_head(h2, 3)
    assert torch.allclose(o[:, :, :3], o2[:, :, :3], atol=1e-6)
    assert not torch.allclose(o[:, :, 4:], o2[:, :, 4:])
    # I4: K is a run-time argument, the first steps are the same whatever K' is
    logits5, _ = model(idx, n_steps=5)
    logits3, _ = model(idx)
    assert torch.allclose(logits5[:3], logits3, atol=1e-6)
    # I5: the K = 0 model has no head (any variant)
    assert GPT(tiny_config(n_steps=0, head_attn=attn)).latent_head is None


@pytest.mark.parametrize("attn", ATTN)
def test_attending_head_generation_equals_the_uncached_model(attn):
    model = tiny_model(head_attn=attn)
    prompt = tokens(B=2, T=5)
    for K in (1, 3, 5):                                          # K' < K, = K, > K
        got = model.generate(prompt, 14, temperature=0, n_steps=K)   # past block_size 16: the window slides
        want = prompt
        for _ in range(14):
            logits, _ = model(want[:, -16:], n_steps=K)
            want = torch.cat([want, logits[-1, :, -1].argmax(-1)[:, None]], 1)
        assert torch.equal(got, want)
    # adaptive exit and the step trace: each step's logits at the newest token, from the uncached model
    thr = {"trunk": 3e-4, "latent": 1e-3}[attn]                     # some tokens exit at 2, some run all 3
    got, steps = model.generate(prompt, 6, temperature=0, exit_threshold=thr, return_steps=True)
    assert set(steps["used"].flatten().tolist()) == {2, 3}
    for i in range(6):
        logits, _ = model(got[:, :5 + i])                            # (K, B, T, V): every step, no cache
        trunk = trunk_logits(model, got[:, :5 + i])
        per_step = torch.cat([trunk[None], logits])[:, :, -1].float()      # (K+1, B, V), k = 0 the trunk
        p = per_step.softmax(-1)
        kl = (p[1:] * (p[1:].log() - p[:-1].log())).sum(-1)                # KL(p_k || p_k-1), (K, B)
        first = [next((k + 1 for k in range(3) if kl[k, b] < thr), 3) for b in range(2)]
        assert steps["used"][:, i].tolist() == first
        for b in range(2):                                                 # steps after the exit: -1
            want = p.argmax(-1)[:, b].masked_fill(torch.arange(4) > first[b], -1)
            assert torch.equal(steps["top1"][b, i], want)
        assert torch.equal(got[:, 5 + i], per_step[first, [0, 1]].argmax(-1))


@pytest.mark.parametrize("attn", ATTN)
def test_attending_head_flops_per_token_by_hand(attn):
    model = tiny_model(n_steps=3, head_attn=attn)               # C = 32, D = 24, hidden 96, V = 67
    C, D, H, T = 32, 24, 96, 16
    attn_w = D * D + C * 2 * D if attn == "trunk" else 3 * D * D    # W_q + W_kv, or W_qkv
    per_step = D * H + H * D + D * C + D * H + 2 * D * T + (D * D if attn == "trunk" else 3 * D * D)
    once = C * H + (C * 2 * D if attn == "trunk" else 0)
    assert attn_w > 0
    want = 6 * once + 6 * C * D + 3 * 6 * per_step
    assert model.flops_per_token(n_steps=3, seq_len=T)["head"] == want


@pytest.mark.parametrize("attn", ("none",) + ATTN)
@pytest.mark.parametrize("grad_steps", [None, 1, 2, 5])
def test_head_counts_its_own_flops_pass_by_pass(attn, grad_steps):
    """LatentHead.flops_per_token against its matmuls listed by hand, counted pass by pass: 2 FLOPs per
    multiply-add forward, 2 for the input gradient, 2 for the weight gradient (for the attention scores: of
    the second operand). GPT.flops_per_token's head share is the head's count."""
    C, D, H, T, K = 32, 24, 96, 16, 3
    model = tiny_model(n_steps=K, head_attn=attn)            # n_embd C, n_latent D, hidden 4D = H
    step_w = D * H + H * D + {"none": 0, "trunk": D * D + D * H, "latent": 3 * D * D + D * H}[attn]
    scores = 0 if attn == "none" else 2 * D * T                  # q·k and att·v over T positions
    once = C * H + (C * 2 * D if attn == "trunk" else 0)         # fc_h, and W_kv of the trunk's h
    w_in, w_out = C * D, D * C
    g = K if grad_steps is None else min(K, grad_steps)          # the last g steps have a backward
    z0 = w_in if g == K else 0                                   # z_0 is detached unless every step has one
    forward = w_in + once + K * (step_w + scores + w_out)
    input_grad = z0 + once + g * (step_w + scores + w_out)
    weight_grad = z0 + once + g * (step_w + scores) + K * w_out     # every o_k's loss reaches W_out
    want = 2 * (forward + input_grad + weight_grad)
    assert model.latent_head.flops_per_token(K, T, grad_steps) == want
    assert model.flops_per_token(K, T, grad_steps)["head"] == want


@pytest.mark.slow
@pytest.mark.parametrize("attn", ATTN)
def test_compiled_attending_step_equals_eager(attn):
    model = tiny_model(head_attn=attn)
    head = model.latent_head
    step = torch.compile(head.update, fullgraph=True)
    for T in (9, 5, 7):                               # a new length makes dynamo compile T as a dynamic size
        z, shared = head.init_state(torch.randn(2, T, 32))
        assert torch.allclose(step(z, *shared), head.update(z, *shared), atol=1e-6)
