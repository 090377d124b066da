"""Generation (GPT.generate): the KV cache against full recomputation (every head, prefill then decode), the
block_size window, adaptive exit, the per-step view and stop tokens."""

import pytest
import torch

import data
from latent_head import newest_outputs
from model import GPT, GPTConfig, KVCache

BS = 16  # block_size of the tiny models


def tiny_model(K=3, vocab_size=257, seed=0, block_size=BS):
    """A tiny model whose head is as after training (W_out, β non-trivial), so every step changes the
    logits."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32,
                          n_steps=K, n_latent=24))
    if K > 0:
        with torch.no_grad():
            model.latent_head.w_out.weight.normal_(0, 0.5)
            model.latent_head.b.normal_(0, 2.0)
    return model.eval()


def uncached_greedy(model, idx, n, K):
    """nanoGPT's generation: the whole (cropped) context through the model for every token."""
    for _ in range(n):
        logits, _ = model(idx[:, -model.config.block_size:], n_steps=K)    # (K', B, T, V)
        idx = torch.cat([idx, logits[-1, :, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


@pytest.fixture(scope="module")
def gpt2_tok(gpt2_tokenizer_file):
    return data.get_tokenizer("gpt2", gpt2_tokenizer_file)


# -----------------------------------------------------------------------------
# model.generate


@pytest.mark.parametrize("attn", ["none", "trunk", "latent"])
def test_newest_outputs_with_the_cache_equal_the_head(attn):
    """Generation's step-by-step head, fed a 3-position prefix and then one position at a time with its cache,
    gives at the newest position what LatentHead.forward gives on the whole sequence, at every step."""
    model = tiny_model(K=3)
    if attn != "none":
        model = GPT(GPTConfig(block_size=BS, vocab_size=257, n_layer=2, n_head=2, n_embd=32, n_steps=3,
                              n_latent=24, head_attn=attn)).eval()
        with torch.no_grad():
            for p in model.latent_head.parameters():
                p.normal_(0, 0.3)
    h = torch.randn(2, 6, 32)
    cache = model.latent_head.new_cache(5)
    for t in range(3, 7):
        new = h[:, :t] if t == 3 else h[:, t - 1:t]
        o = list(newest_outputs(model.latent_head, new, 5, cache))
        assert len(o) == 6 and torch.equal(o[0], h[:, t - 1])                 # o_0 = h_t, the trunk's own
        assert torch.allclose(torch.stack(o[1:]), model.latent_head(h[:, :t], 5)[:, :, -1], atol=1e-5)
    if attn == "latent":
        assert [len(step) for step in cache.steps] == [6] * 5                  # every step, every position
    if attn == "trunk":
        assert len(cache.kv) == 6                                              # one set for every step


@torch.no_grad()
def test_kv_cache_prefill_then_decode_equals_the_uncached_trunk():
    model = tiny_model(K=2)
    idx = torch.randint(0, 257, (2, 8), generator=torch.Generator().manual_seed(0))
    cache = KVCache(model.config.n_layer)
    h = [model.trunk(idx[:, :5], cache)]                                 # prefill: an empty cache, 5 tokens
    h += [model.trunk(idx[:, t:t + 1], cache) for t in range(5, 8)]      # decode: one token at a time
    assert len(cache) == 8 and [len(layer) for layer in cache.layers] == [8, 8]
    assert torch.allclose(torch.cat(h, 1), model.trunk(idx), atol=1e-5)
    with pytest.raises(AssertionError, match="one token at a time"):
        model.trunk(idx[:, :2], cache)


@pytest.mark.parametrize("tokenizer", ["byte", "gpt2"])
@pytest.mark.parametrize("K", [0, 1, 3])
def test_cached_equals_uncached_greedy(K, tokenizer, request):
    tok = data.get_tokenizer("byte") if tokenizer == "byte" else request.getfixturevalue("gpt2_tok")
    model = tiny_model(K=max(K, 1), vocab_size=tok.vocab_size)
    prompts = ["Hello, world! 12+34=", "def f(x): return x"]
    idx = torch.tensor([[tok.eot_token] + tok.encode(p)[:5] for p in prompts])
    new = BS       # one token at a time through the cache, then past block_size: the window slides
    cached = model.generate(idx, new, temperature=0, n_steps=K)
    assert torch.equal(cached, uncached_greedy(model, idx, new, K))


def test_generation_never_feeds_more_than_block_size():
    model = tiny_model(K=2)
    fed, cached = [], []
    model.transformer.wpe.register_forward_hook(lambda m, args, out: fed.append(args[0].tolist()))
    for block in model.transformer.h:
        block.attn.register_forward_hook(lambda m, args, out: cached.append(len(args[1])))
    prompt = torch.randint(0, 257, (1, 10))
    model.generate(prompt, 20, temperature=1.0, top_k=5)
    assert max(max(p) for p in fed) == BS - 1 and max(cached) == BS
    # the prompt once, then one new position per token until the cache holds block_size tokens, then the
    # window slides: positions are absolute, so each later token recomputes the last block_size tokens
    assert fed[0] == list(range(10))
    assert fed[1:BS - 9] == [[t] for t in range(10, BS)]
    assert all(p == list(range(BS)) for p in fed[BS - 9:]) and len(fed) == 20


def test_adaptive_exit_threshold_zero_is_fixed_K_and_large_is_one_step():
    model = tiny_model(K=3)
    idx = torch.randint(0, 257, (3, 6))
    fixed = model.generate(idx, 10, temperature=0)
    same, s0 = model.generate(idx, 10, temperature=0, exit_threshold=0.0, return_steps=True)
    assert torch.equal(same, fixed) and (s0["used"] == 3).all()
    one, s1 = model.generate(idx, 10, temperature=0, exit_threshold=1e9, return_steps=True)
    assert (s1["used"] == 1).all() and torch.equal(one, model.generate(idx, 10, temperature=0, n_steps=1))
    _, s = model.generate(idx, 10, temperature=0, n_steps=8, exit_threshold=1e-3, return_steps=True)
    assert 1 <= s["used"].min() and s["used"].max() <= 8


def test_steps_view_is_each_steps_argmax():
    model = tiny_model(K=3)
    idx = torch.randint(0, 257, (2, 5))
    out, steps = model.generate(idx, 6, temperature=0, n_steps=4, return_steps=True)
    logits, _ = model(out[:, :-1], n_steps=4)                         # (4, B, T, V)
    plain = model.lm_head(model.transformer.ln_f(model.trunk(out[:, :-1])))
    per_step = torch.cat([plain[None], logits])[:, :, 4:]            # k = 0..4 at the 6 generating positions
    assert steps["top1"].shape == (2, 6, 5)
    assert torch.equal(steps["top1"], per_step.argmax(-1).permute(1, 2, 0))
    assert torch.allclose(steps["prob"], per_step.softmax(-1).amax(-1).permute(1, 2, 0), atol=1e-6)
    assert torch.equal(steps["top1"][:, :, -1], out[:, 5:])          # the token is step K's top-1


def test_stop_token_pads_finished_rows():
    model = tiny_model(K=2)
    idx = torch.randint(0, 257, (4, 5))
    free = model.generate(idx, 8, temperature=0)[:, 5:]
    stop = int(free[0, 2])                                            # row 0 emits it at its third token
    out, steps = model.generate(idx, 8, temperature=0, stop_token=stop, return_steps=True)
    new = out[:, 5:]
    for r in range(4):
        hit = (free[r] == stop).nonzero()
        end = int(hit[0]) + 1 if len(hit) else new.size(1)
        assert torch.equal(new[r, :end], free[r, :end]) and (new[r, end:] == stop).all()
        assert (steps["used"][r, :end] == 2).all() and (steps["used"][r, end:] == -1).all()
