"""model.py and latent_head.py: the invariants I1–I5 (README "The method in one screen"), ℓ, GPT-2 loading,
compile, errors (the attending heads, head_attn = trunk | latent: test_attending_head.py)."""

import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from checkpoint import build_model
from latent_head import LatentHead
from model import GPT, GPTConfig

V = 67


def tiny_config(**kw):
    cfg = dict(block_size=16, vocab_size=V, n_layer=2, n_head=2, n_embd=32, n_steps=3, n_latent=24,
               dropout=0.0)
    cfg.update(kw)
    return GPTConfig(**cfg)


def tiny_model(seed=0, trained_head=True, **kw):
    """A tiny model; trained_head=True gives W_out and β non-trivial values, as after training."""
    torch.manual_seed(seed)
    model = GPT(tiny_config(**kw))
    if trained_head and model.latent_head is not None:
        with torch.no_grad():
            model.latent_head.w_out.weight.normal_(0, 0.5)
            model.latent_head.b.normal_(0, 2.0)
    return model.eval()


def tokens(B=2, T=12, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def trunk_logits(model, idx):
    """The plain GPT's logits, computed by hand from the trunk: lm_head(LN_f(h))."""
    return model.lm_head(model.transformer.ln_f(model.trunk(idx)))


def gelu_formula(x, gelu):
    """GELU written out: exact x·Φ(x) with the error function; tanh, GPT-2's approximation."""
    if gelu == "exact":
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


OTHER_GELU = {"exact": "tanh", "tanh": "exact"}

# -----------------------------------------------------------------------------
# the GELU (config.gelu): the trunk's MLPs and the head's update run the configured one

@pytest.mark.parametrize("gelu", ["exact", "tanh"])
def test_trunk_mlps_run_the_configured_gelu(gelu):
    model = tiny_model(gelu=gelu, n_steps=0).double()
    x = torch.randn(2, 5, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for block in model.transformer.h:
        mlp = block.mlp
        with torch.no_grad():
            mlp.c_fc.weight.normal_(0, 0.3)            # pre-activations of order 1:
                                                       # the two GELUs differ there
            mlp.c_proj.weight.normal_(0, 0.3)
        a = mlp.c_fc(x)
        got = mlp(x)
        assert torch.equal(got, mlp.c_proj(F.gelu(a) if gelu == "exact" else F.gelu(a, approximate="tanh")))
        assert torch.allclose(got, mlp.c_proj(gelu_formula(a, gelu)), atol=1e-12, rtol=0)
        assert (got - mlp.c_proj(gelu_formula(a, OTHER_GELU[gelu]))).abs().max() > 1e-4


@pytest.mark.parametrize("gelu", ["exact", "tanh"])
def test_head_update_runs_the_gpt_configs_gelu(gelu):
    model = tiny_model(gelu=gelu).double()
    head = model.latent_head
    with torch.no_grad():
        for p in head.parameters():                    # every tensor non-trivial: pre-activations of order 1
            p.normal_(0, 0.3)
    h = torch.randn(2, 5, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    o = head(h, 3)
    assert torch.allclose(o, reference_head(head, h, 3, gelu)[0], atol=1e-12, rtol=0)
    assert (o - reference_head(head, h, 3, OTHER_GELU[gelu])[0]).abs().max() > 1e-4


def test_gelu_defaults_to_exact_and_rejects_other_values():
    assert GPTConfig().gelu == "exact" and LatentHead(32, 24).approximate == "none"
    with pytest.raises(ValueError, match="gelu must be one of exact, tanh, got 'relu'"):
        GPTConfig(gelu="relu")
    with pytest.raises(ValueError, match="gelu must be one of exact, tanh, got 'none'"):
        LatentHead(32, 24, gelu="none")

# -----------------------------------------------------------------------------
# the latent head is exactly the documented update

def reference_head(head, h, K, gelu="exact"):
    """The head's equations written out literally: one Linear on the concatenation [LN_z(z); LN_h(h)]."""
    hn = F.layer_norm(h, h.shape[-1:], head.ln_h.weight, head.ln_h.bias)
    W1 = torch.cat([head.fc_z.weight, head.fc_h.weight], dim=1)            # (H, D + C)
    beta = torch.sigmoid(head.b)
    z = torch.tanh(hn @ head.w_in.weight.T + head.w_in.bias)
    zs, outs = [z], []
    for _ in range(K):
        zn = F.layer_norm(z, z.shape[-1:], head.ln_z.weight, head.ln_z.bias)
        first = torch.cat([zn, hn], -1) @ W1.T + head.fc_h.bias
        u = gelu_formula(first, gelu) @ head.proj.weight.T + head.proj.bias
        z = z + beta * (torch.tanh(u) - z)
        zs.append(z)
        outs.append(h + z @ head.w_out.weight.T + head.w_out.bias)
    return torch.stack(outs), torch.stack(zs)


def test_head_matches_the_design_formulas():
    head = tiny_model().latent_head
    h = torch.randn(2, 5, 32)
    o, z = head(h, 4, return_latents=True)
    ro, rz = reference_head(head, h, 4)
    assert o.shape == (4, 2, 5, 32) and z.shape == (5, 2, 5, 24)
    assert torch.allclose(o, ro, atol=1e-5) and torch.allclose(z, rz, atol=1e-6)


def test_I1_latents_stay_bounded_for_1000_steps_and_huge_inputs():
    torch.manual_seed(0)
    head = LatentHead(32, 24)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 3.0)
    h = torch.randn(2, 5, 32) * 1e4
    with torch.no_grad():
        _, z = head(h, 1000, return_latents=True)
    max_beta = torch.sigmoid(head.b).max()
    assert z.abs().max() <= 1.0
    assert (z[1:] - z[:-1]).abs().max() <= 2 * max_beta
    assert torch.isfinite(z).all()


# -----------------------------------------------------------------------------
# I2–I5

def test_I2_identity_at_init():
    torch.manual_seed(0)
    model = GPT(tiny_config(n_steps=4)).eval()   # fresh: W_out = 0
    idx = tokens()
    logits, _ = model(idx)
    plain = trunk_logits(model, idx)
    assert logits.shape == (4, 2, 12, V)
    for k in range(4):
        assert torch.equal(logits[k], plain)


def test_I3_causal_and_position_wise():
    model = tiny_model()
    idx = tokens(B=1, T=12)
    changed = idx.clone()
    changed[0, 7:] = (changed[0, 7:] + 1) % V
    a, _ = model(idx)
    b, _ = model(changed)
    assert torch.allclose(a[:, :, :7], b[:, :, :7], atol=1e-6)   # every step at t <= 6 unchanged
    assert not torch.allclose(a[:, :, 7:], b[:, :, 7:])
    # position-wise: the head on shuffled positions gives the shuffled outputs
    h = torch.randn(2, 9, 32)
    perm = torch.randperm(9)
    assert torch.allclose(model.latent_head(h, 3)[:, :, perm], model.latent_head(h[:, perm], 3), atol=1e-6)


def test_I4_steps_are_a_run_time_argument():
    model = tiny_model(n_steps=2)
    idx = tokens()
    logits2, _ = model(idx)
    logits5, _ = model(idx, n_steps=5)
    logits0, _ = model(idx, n_steps=0)
    assert logits5.shape[0] == 5 and logits0.shape[0] == 1
    assert torch.allclose(logits5[:2], logits2, atol=1e-6)          # the same steps, whatever K' is
    assert not torch.allclose(logits5[4], logits5[1])               # more steps do change the output
    assert torch.allclose(logits0[0], trunk_logits(model, idx))    # K' = 0 is the plain trunk


def test_I5_zero_steps_builds_a_plain_gpt():
    rlrp = tiny_model(n_steps=3)
    gpt = GPT(tiny_config(n_steps=0)).eval()
    assert gpt.latent_head is None
    gpt_keys = set(gpt.state_dict())
    assert gpt_keys == {k for k in rlrp.state_dict() if not k.startswith("latent_head.")}
    gpt.load_state_dict({k: v for k, v in rlrp.state_dict().items() if k in gpt_keys})
    idx = tokens()
    logits, _ = gpt(idx)
    assert logits.shape == (1, 2, 12, V)
    assert torch.equal(logits[0], trunk_logits(rlrp, idx))
    with pytest.raises(ValueError, match="built with n_steps=0"):
        gpt(idx, n_steps=2)


# -----------------------------------------------------------------------------
# ℓ from the model

@pytest.mark.parametrize("K", [0, 1, 3])
def test_nll_equals_log_softmax_of_the_logits(K):
    model = tiny_model(n_steps=max(K, 1))
    idx = tokens()
    y = tokens(seed=1)
    y[0, :3] = -1
    logits, _ = model(idx, n_steps=K)
    y_k = y.clamp(min=0).expand(logits.shape[:-1])                        # (K', B, T)
    want = -torch.log_softmax(logits, -1).gather(-1, y_k[..., None]).squeeze(-1)
    want = torch.where(y >= 0, want, 0.0)
    none, nll = model(idx, y, n_steps=K)
    assert none is None and nll.shape == (max(K, 1), 2, 12)
    assert torch.allclose(nll, want, atol=1e-5)
    upstream = torch.randn_like(nll)
    params = [p for p in model.parameters()]
    g_got = torch.autograd.grad((nll * upstream).sum(), params, allow_unused=True)
    g_want = torch.autograd.grad((want * upstream).sum(), params, allow_unused=True)
    for a, b in zip(g_got, g_want):
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-5)


def test_grad_steps_truncates_the_recurrence():
    head = tiny_model().latent_head
    h = torch.randn(2, 5, 32)
    o = head(h, 4, grad_steps=1)
    assert torch.allclose(o, head(h, 4), atol=1e-6)        # same values
    g_trunc, = torch.autograd.grad(o[-1].sum(), head.fc_z.weight)
    # reference: steps 1..3 from a detached z, then one step with gradient
    _, z = head(h, 3, return_latents=True)
    z_last = head.update(z[-1].detach(), *head.init_state(h)[1])
    g_ref, = torch.autograd.grad((h + head.w_out(z_last)).sum(), head.fc_z.weight)
    assert torch.allclose(g_trunc, g_ref, atol=1e-6)


# -----------------------------------------------------------------------------
# GPT-2 weights, through a tiny locally built Hugging Face model

def test_from_pretrained_matches_hugging_face_at_every_step(tmp_path):
    transformers = pytest.importorskip("transformers")  # a test-only requirement, installed by .ci/run
    hf_config = transformers.GPT2Config(vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    # every tensor non-trivial: HF initialises biases to 0 and norms to 1, which hides a tensor that is not
    # loaded at all
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path)
    model = GPT.from_pretrained(str(tmp_path), n_steps=3, n_latent=16).eval()
    idx = tokens(T=20)
    with torch.no_grad():
        want = hf(idx).logits
        logits, _ = model(idx)
        plain, _ = model(idx, n_steps=0)
    assert logits.shape == (3, 2, 20, V)
    assert torch.allclose(plain[0], want, atol=1e-5)           # K' = 0: the plain GPT-2 (off by ~5e-7)
    for k in range(3):
        assert torch.allclose(logits[k], want, atol=1e-5)      # every step at init (I2)
    # GPT-2's tanh GELU, the head's too; the exact one, on the same weights, fails the check above
    assert model.config.gelu == "tanh" and model.latent_head.approximate == "tanh"
    exact = GPT(replace(model.config, gelu="exact")).eval()
    exact.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(exact(idx, n_steps=0)[0][0], want, atol=1e-4)    # off by ~7e-4
    # train.py's init_from=DIR: GPT-2's tanh, whatever the run's gelu says (like n_layer, bias)
    c = dict(init_from=str(tmp_path), n_steps=2, n_latent=0, dropout=0.0, head_attn="none", gelu="exact",
             block_size=32)
    built = build_model(c, SimpleNamespace(vocab_size=V, name="tiny"), None).eval()
    assert built.config.gelu == "tanh"
    with torch.no_grad():
        assert torch.allclose(built(idx, n_steps=0)[0][0], want, atol=1e-5)
    # a Hugging Face GPT-2 with another activation is not GPT-2: refused, as before
    transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**hf_config.to_dict(),
                                                            "activation_function": "gelu"})
                                 ).save_pretrained(tmp_path / "exact")
    with pytest.raises(ValueError, match="activation 'gelu' is not GPT-2's tanh GELU"):
        GPT.from_pretrained(str(tmp_path / "exact"))


# -----------------------------------------------------------------------------
# torch.compile: the whole model, K-step loop included, with fullgraph=True

@pytest.mark.slow
def test_compile_fullgraph_matches_eager():
    model = tiny_model()
    model.train()
    compiled = torch.compile(model, fullgraph=True)
    idx, y = tokens(), tokens(seed=1)
    _, nll_eager = model(idx, y)
    _, nll_comp = compiled(idx, y)
    assert torch.allclose(nll_comp, nll_eager, atol=1e-5)
    g_eager = torch.autograd.grad(nll_eager.mean(), list(model.parameters()))
    g_comp = torch.autograd.grad(nll_comp.mean(), list(model.parameters()))
    for a, b in zip(g_comp, g_eager):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_compiled_parts_reuse_the_same_graphs_for_every_k():
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = tiny_model()
    model.train()
    eager = tiny_model()                                       # the same weights, not compiled
    eager.train()
    model.compile_parts()
    idx, y = tokens(), tokens(seed=1)
    graphs = []
    for K in (4, 1, 7, 2, 8, 3, 5, 6):                         # random K, as n_steps_dist='uniform' draws it
        _, nll = model(idx, y, n_steps=K)
        _, want = eager(idx, y, n_steps=K)
        assert torch.allclose(nll, want, atol=1e-5)
        g_got = torch.autograd.grad(nll.mean(), list(model.parameters()))
        g_want = torch.autograd.grad(want.mean(), list(eager.parameters()))
        for a, b in zip(g_got, g_want):
            assert torch.allclose(a, b, atol=1e-5)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs == [4] * 8                                   # the trunk, z_0, one step, one ℓ_k: for any K


# -----------------------------------------------------------------------------
# bad input: one clear line, before any heavy work

def test_bad_input_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="n_steps .* must be >= 0"):
        GPTConfig(n_steps=-1)
    with pytest.raises(ValueError, match="n_steps must be >= 0"):
        model(tokens(), n_steps=-2)
    with pytest.raises(ValueError, match="longer than block_size 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 67\)"):
        model(torch.full((1, 4), V))
    with pytest.raises(ValueError, match="targets must be in"):
        model(tokens(), torch.full((2, 12), -5))
    with pytest.raises(ValueError, match="larger than the model's"):
        model.crop_block_size(32)


def test_configure_optimizers_decays_only_matrices():
    model = tiny_model()
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    n_unique = len({id(p) for p in model.parameters()})
    assert len(decay["params"]) + len(no_decay["params"]) == n_unique
    assert any(p is model.latent_head.b for p in no_decay["params"])


def test_flops_per_token_counts_the_head_per_step():
    model = tiny_model(n_steps=3)
    f1, f4 = model.flops_per_token(n_steps=1), model.flops_per_token(n_steps=4)
    assert f1["trunk"] == f4["trunk"]
    assert f4["unembed"] == 4 * f1["unembed"] == 4 * 6 * 32 * V
    per_step = 6 * (24 * 96 + 96 * 24 + 24 * 32)   # fc_z, proj, W_out matmuls (D=24, hidden 4D=96, C=32)
    assert f4["head"] - f1["head"] == 3 * per_step
    assert model.flops_per_token(n_steps=0)["head"] == 0
    # truncated backward, K = 4, grad_steps = 1: z_0 and steps 1..3 forward only (2), their W_out weight
    # gradient only (4), step 4 and the injection in full (6)
    w_in, fc_h, step, w_out = 32 * 24, 32 * 96, 24 * 96 + 96 * 24, 24 * 32
    want = 2 * w_in + 6 * fc_h + 3 * (2 * step + 4 * w_out) + 6 * (step + w_out)
    assert model.flops_per_token(n_steps=4, grad_steps=1)["head"] == want
    assert model.flops_per_token(n_steps=4, grad_steps=4) == f4
    assert model.flops_per_token(n_steps=4, grad_steps=9) == f4
