"""hf_trunk.py: any Hugging Face causal LM as the trunk, against the HF model itself (its logits, its
cross-entropy, its generate) on tiny locally built folders of every family, every parameter perturbed."""

import pytest
import torch
import torch.nn.functional as F
import transformers

import hf_trunk
from conftest import HF_FAMILIES, tiny_hf_folder

K, T = 3, 16


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """family -> its tiny folder, built once per module."""
    made = {}

    def get(family):
        if family not in made:
            made[family] = tiny_hf_folder(tmp_path_factory.mktemp(family), family)
        return made[family]
    return get


def hf_model(path):
    """The folder's own HF model, as transformers loads it (its default attention), fp32, eval mode."""
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def ids(V=97, B=2, seed=1):
    return torch.randint(V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", sorted(HF_FAMILIES))
@torch.no_grad()
def test_every_step_is_the_hf_model_at_w_out_zero(folder, family):
    """I2 exact: with W_out = 0 the logits of K' = 0 and of every step k = 1..K are the HF model's, bit for
    bit; ℓ_k is HF's cross-entropy (within 1e-5: the fused loss sums in tiles)."""
    hf, model = hf_model(folder(family)), hf_trunk.from_folder(folder(family), n_steps=K, n_latent=24).eval()
    x = ids()
    y = torch.roll(x, -1, 1)
    y[0, 5] = -1                                                     # an ignored target
    want = hf(x).logits                                              # (B, T, V)
    assert torch.equal(model(x, n_steps=0)[0][0], want)
    logits = model(x)[0]                                             # (K, B, T, V)
    assert logits.shape[0] == K and all(torch.equal(step, want) for step in logits)
    nll = model(x, y)[1]                                             # ℓ, (K, B, T)
    ce = F.cross_entropy(want.flatten(0, 1), y.flatten(), ignore_index=-1, reduction="none").view_as(y)
    for step in nll:
        torch.testing.assert_close(step, ce, rtol=0, atol=1e-5)


def test_a_step_keeps_its_logits_up_to_keep_logits(tmp_path):
    """As HF's own model does, a step's logits are kept for backward (plain cross-entropy), not recomputed
    (linear_ce), up to hf_trunk.KEEP_LOGITS of them: here 32 × 16 × 1,000 = 512,000, beyond one CPU tile."""
    model = hf_trunk.from_folder(tiny_hf_folder(tmp_path, "llama", vocab_size=1000), n_steps=K)
    x = torch.randint(1000, (32, T), generator=torch.Generator().manual_seed(2))
    nll = model.step_nll(model.trunk(x), torch.roll(x, -1, 1))
    assert 32 * T * 1000 <= hf_trunk.KEEP_LOGITS
    assert type(nll.grad_fn.next_functions[0][0]).__name__ == "NllLossBackward0"


@pytest.mark.parametrize("family", sorted(HF_FAMILIES))
@torch.no_grad()
def test_k0_is_the_hf_model(folder, family):
    """I5: K = 0 builds no head: the HF model's parameters and nothing else, and its logits."""
    hf, model = hf_model(folder(family)), hf_trunk.from_folder(folder(family), n_steps=0).eval()
    assert model.latent_head is None
    assert model.get_num_params() == sum(p.numel() for p in hf.parameters())
    x = ids()
    assert torch.equal(model(x)[0][0], hf(x).logits)


def test_a_trained_head_changes_the_logits_and_dropout_is_this_projects(folder):
    """The head acts once W_out is not 0 (the identity above is not a head that is off); the HF config's
    dropout is replaced by the dropout key."""
    model = hf_trunk.from_folder(folder("phi3"), n_steps=2, dropout=0.0).eval()
    x = ids()
    with torch.no_grad():
        model.latent_head.w_out.weight.normal_(0, 0.5)
        assert not torch.equal(model(x)[0][1], model(x, n_steps=0)[0][0])
    drops = lambda m: {k: v for k, v in m.hf.config.to_dict().items() if k.endswith(("dropout", "pdrop"))}
    assert set(drops(model).values()) == {0.0} and "resid_pdrop" in drops(model)
    assert set(drops(hf_trunk.from_folder(folder("phi3"), dropout=0.25)).values()) == {0.25}


@pytest.mark.parametrize("family, extra, why", [
    ("gemma2", dict(head_dim=16), "gemma2: final_logit_softcapping=30.0 caps the logits after lm_head"),
    ("phi", {}, "phi: lm_head has a bias"),
])
def test_families_that_change_logits_after_lm_head_are_refused(tmp_path, family, extra, why):
    with pytest.raises(ValueError) as e:
        hf_trunk.from_folder(tiny_hf_folder(tmp_path, family, **extra))
    assert str(e.value).startswith(why) and "\n" not in str(e.value)


def test_the_load_probe_refuses_a_trunk_that_is_not_the_hf_model(tmp_path):
    """Falcon-H1 multiplies its logits by lm_head_multiplier, which nothing here knows of: the I2 probe
    against the HF model's own logits catches it, in one line."""
    path = tiny_hf_folder(tmp_path, "falcon_h1", lm_head_multiplier=0.5, mamba_d_ssm=32, mamba_n_heads=2,
                          mamba_d_head=16, mamba_d_state=8, mamba_chunk_size=8)
    with pytest.raises(ValueError, match=r"\(falcon_h1\): the trunk's logits differ .* \(I2 fails\)"):
        hf_trunk.from_folder(path)


@pytest.mark.parametrize("family, gated, kv", [("llama", True, 1), ("gpt_neox", False, 2)])
def test_trunk_flops_are_the_configs(folder, family, gated, kv):
    """The decoder's FLOPs per token counted from its weights equal the config's formula: 6 per weight of q,
    k, v, o (kv heads for k, v: GPT-NeoX has no grouped queries) and the MLP (gated: 3 matrices, else 2),
    plus 12·L·n_head·head_dim·T for the scores."""
    model = hf_trunk.from_folder(folder(family), n_steps=0)
    c = model.hf.config
    hd = c.hidden_size // c.num_attention_heads
    per_layer = c.hidden_size * hd * (2 * c.num_attention_heads + 2 * kv) \
        + (3 if gated else 2) * c.hidden_size * c.intermediate_size
    want = 6 * c.num_hidden_layers * per_layer + 12 * c.num_hidden_layers * c.hidden_size * T
    assert model.flops_per_token(seq_len=T)["trunk"] == want


def uncached_greedy(model, idx, n, K):
    """nanoGPT's generation: the whole (cropped) context through the model for every token."""
    for _ in range(n):
        logits, _ = model(idx[:, -model.config.block_size:], n_steps=K)    # (K', B, T, V)
        idx = torch.cat([idx, logits[-1, :, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
@pytest.mark.parametrize("head_attn", ["none", "trunk", "latent"])
@torch.no_grad()
def test_cached_generation_equals_uncached_with_a_trained_head(folder, family, head_attn):
    """The trunk through HF's DynamicCache, the head through its own: greedy decoding equals recomputing the
    whole context per token, with a random W_out, for every head_attn; past block_size the window slides
    (Gemma 3's sliding window of 4 is shorter than the context)."""
    torch.manual_seed(0)
    model = hf_trunk.from_folder(folder(family), n_steps=K, n_latent=24, head_attn=head_attn).eval()
    model.crop_block_size(T)
    model.latent_head.w_out.weight.normal_(0, 0.5)
    model.latent_head.b.normal_(0, 2.0)
    idx = ids()[:, :5]
    cached = model.generate(idx, T, temperature=0)
    assert torch.equal(cached, uncached_greedy(model, idx, T, K))
    steps = model.generate(idx, 4, temperature=0, exit_threshold=1e9, return_steps=True)[1]
    assert steps["used"].eq(1).all()                    # adaptive exit: unchanged, it stops after step 1


@pytest.mark.slow
@pytest.mark.parametrize("family, causal", [("llama", True), ("qwen2", True), ("mistral", False),
                                            ("gemma3_text", False)])
def test_compiled_trunk_takes_sdpas_causal_path_where_exact(folder, family, causal):
    """compile_parts puts a full-causal trunk on SDPA's causal path (no dense mask); a sliding window shorter
    than block_size keeps HF's. Compiled, every step's logits are the eager model's (and so HF's)."""
    torch._dynamo.reset()                      # HFGPT.trunk's graphs of the other families: not this one's
    model = hf_trunk.from_folder(folder(family), n_steps=2).eval()
    model.crop_block_size(T)
    x = ids()
    with torch.no_grad():
        want = model(x)[0]
        model.compile_parts()
        assert (model.hf.config._attn_implementation == hf_trunk.CAUSAL_SDPA) == causal
        torch.testing.assert_close(model(x)[0], want, rtol=0, atol=1e-5)
