"""
Generation's parts besides GPT.generate: the KV cache, the head's outputs at the newest position, adaptive
exit and the next token.

The cache says which of three modes an attention call is in:
    no cache   training and the uncached forward: the sequence attends causally to itself
    empty      prefill: the prompt (or the re-filled window) attends causally to itself, and is stored
    filled     decode: one new token attends to every cached position, and is appended
"""

import itertools

import torch
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# the KV cache

class LayerKV:
    """One attention's cached keys and values, each (B, nh, T_cached, hs); empty until the prompt fills it."""

    def __init__(self):
        self.k = self.v = None

    def __len__(self):
        return 0 if self.k is None else self.k.size(2)                # T_cached

    def extend(self, k, v):
        """Stores this call's k, v (B, nh, T, hs) after the cached ones -> all keys and values, (B, nh, T_all,
        hs). After the prompt one token at a time: more would need a causal mask offset by T_cached."""
        if self.k is not None:
            assert k.size(2) == 1, "the KV cache takes one token at a time after the prompt"
            k, v = torch.cat([self.k, k], 2), torch.cat([self.v, v], 2)
        self.k, self.v = k, v
        return k, v


class KVCache:
    """The model's: one LayerKV per trunk block, and the latent head's own (LatentHead.new_cache; None for a
    position-wise head or K' = 0)."""

    def __init__(self, n_layer, head=None):
        self.layers = [LayerKV() for _ in range(n_layer)]
        self.head = head

    def __len__(self):
        return len(self.layers[0])                # the tokens cached: the next one's position


# -----------------------------------------------------------------------------
# per token: the head's outputs at the newest position, adaptive exit, the next token

def newest_outputs(head, h, K, cache):
    """
    Yields o_0 = h_t (the trunk's own), then o_1..o_K at the newest position t, each (B, C), one at a time so
    that adaptive exit can stop after any step. h (B, T, C): the positions this call adds; head: the model's
    LatentHead (None when K = 0), cache its own generation cache (LatentHead.new_cache), extended here.
    """
    yield h[:, -1]
    if K == 0:
        return
    if head.attn == "none":
        h = h[:, -1:]                                # position-wise: the newest position is all it needs
    for z in itertools.islice(head.latents(h, K, cache=cache), 1, None):     # z_1..z_K, (B, T, D)
        yield head.readout(h[:, -1], z[:, -1])                               # o_k, (B, C)


def exit_logits(outs, K, unembed, exit_threshold=None, return_steps=False):
    """
    outs: o_0 = h, o_1..o_K (each (B, C)) at the newest position (newest_outputs); unembed: o_k -> logits_k.
    Returns (logits (B, V) of the step each row ends at, steps used (B,), top1, prob).
    Adaptive exit: a row stops at the first k >= 1 with KL(p_k || p_{k-1}) < exit_threshold, p_0 being the
    trunk's own distribution, and takes logits_k; KL >= 0, so a threshold of 0 (or None) runs all K steps.
    return_steps: top1, prob (B, K+1) = each step's argmax and its probability (k = 0 the trunk; -1/nan where
    a row had exited), else None.
    """
    outs = iter(outs)
    h = next(outs)                                                 # o_0, the trunk's own
    B, adaptive = h.size(0), bool(exit_threshold)
    used = torch.full((B,), K, dtype=torch.long, device=h.device)
    done = torch.zeros(B, dtype=torch.bool, device=h.device)
    top1 = torch.full((B, K + 1), -1, dtype=torch.long, device=h.device) if return_steps else None
    prob = torch.full((B, K + 1), float("nan"), device=h.device) if return_steps else None
    out = logp_prev = None
    for k, o in enumerate(itertools.chain([h], outs)):            # lazily: an early exit stops computing
        if k < K and not (adaptive or return_steps):
            continue  # fixed K: only logits_K is needed
        logits = unembed(o)                                        # logits_k, (B, V)
        logp = F.log_softmax(logits.float(), dim=-1)
        if return_steps:
            p, i = logp.max(-1)
            top1[:, k], prob[:, k] = i.masked_fill(done, -1), p.exp().masked_fill(done, float("nan"))
        out = logits if out is None else torch.where(done[:, None], out, logits)  # exited rows keep theirs
        if adaptive and k > 0:
            kl = (logp.exp() * (logp - logp_prev)).sum(-1).clamp(min=0)      # KL(p_k || p_{k-1}), (B,)
            exit_now = ~done & (kl < exit_threshold)
            used, done = torch.where(exit_now, k, used), done | exit_now
            if done.all():
                break
        logp_prev = logp
    return out, used, top1, prob


def next_token(logits, temperature, top_k):
    """logits (B, V) -> next token ids (B,): greedy at temperature 0, else sampled from the top_k."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float("inf")
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1).squeeze(-1)
