"""
The RLRP latent head: K bounded residual refinement steps of a latent state z, run on every token.
README "The method in one screen"; the code below uses the same symbols.

    z_0 = tanh(W_in · LN_h(h_t))
    for k = 1..K:
        u_k = MLP([LN_z(z_{k-1}) ; LN_h(h_t)])      # input injection: every step sees h_t
        z_k = z_{k-1} + β ⊙ (tanh(u_k) − z_{k-1})   # bounded residual iteration, β = sigmoid(b) ∈ (0,1)^D
        o_k = h_t + W_out · z_k                      # back to the hidden space; W_out starts at 0

z_k is a convex combination of z_{k-1} ∈ [−1,1]^D and tanh(u_k) ∈ [−1,1]^D, so it never leaves the
box however many steps run (I1).

head_attn chooses what a step may read besides h_t (README "The method in one screen"):
    none    position-wise: the head never mixes tokens, the literal reading of the method
    trunk   a_k = Attn(q = W_q LN_z(z_{k-1})_t; keys, values = W_kv LN_h(h_s), s <= t)
            (keys and values computed once per token)
    latent  a_k = Attn(q, keys, values = W_qkv LN_z(z_{k-1})_s, s <= t)   a tiny universal-transformer block
            u_k = MLP([LN_z(z_{k-1}) ; LN_h(h_t) ; a_k])
Both attend causally (I3: step k at position t reads positions <= t only), with one set of weights for every
step; the update and W_out are unchanged, so I1, I2, I4 and I5 hold as before. Heads: D // 64 of size 64
(GPT-2's head size) when D is a multiple of 64 and at least 128, else one head of size D. a_k's output
projection is folded into the MLP's first layer (fc_a), as the product of two linear maps is one.

Generation's parts that belong to the steps are here too: the attention cache (LayerKV, HeadCache), the
newest position's outputs o_0..o_K (newest_outputs) and adaptive exit over them (exit_logits).
"""

import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F


READOUT_GRAD = ("all", "first")  # which steps' losses reach h_t through the readout's residual (forward)
HEAD_ATTN = ("none", "trunk", "latent")
# the GELU of the trunk's MLP and the head's update (GPTConfig.gelu): F.gelu's `approximate` for each
GELU = {"exact": "none", "tanh": "tanh"}   # exact: nanoGPT's nn.GELU(), fast; tanh: GPT-2's approximation


def gelu_approximate(gelu):
    """F.gelu's `approximate` for a gelu value ('exact' | 'tanh'); a ValueError for any other."""
    if gelu not in GELU:
        raise ValueError(f"gelu must be one of {', '.join(GELU)}, got {gelu!r}")
    return GELU[gelu]


class LayerKV:
    """
    One attention's cached keys and values at generation, each (B, nh, T_cached, hs), for a trunk block
    or an attending head. It says which of three modes an attention call is in:
        no cache   training and the uncached forward: the sequence attends causally to itself
        empty      prefill: the prompt (or the re-filled window) attends causally to itself, and is stored
        filled     decode: one new token attends to every cached position, and is appended
    """

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


class HeadCache:
    """
    Generation's cache of what an attending head's steps read at earlier positions (LatentHead.new_cache),
    extended by latents:
      head_attn='trunk'   kv: the keys and values of LN_h(h), one set for every step (2·D numbers per token)
      head_attn='latent'  steps[k−1]: step k's keys and values of LN_z(z_{k−1}) (2·D·K per token): all K steps
                          must run for every token, since later tokens read them
    """

    def __init__(self, attn, n_steps):
        self.kv = LayerKV() if attn == "trunk" else None
        self.steps = [LayerKV() for _ in range(n_steps)] if attn == "latent" else None


class LatentHead(nn.Module):

    def __init__(self, n_embd, n_latent, bias=True, mlp_ratio=4, attn="none", gelu="exact"):
        """gelu: the update MLP's GELU, 'exact' | 'tanh'; GPT passes its config's, the trunk's own."""
        super().__init__()
        if attn not in HEAD_ATTN:
            raise ValueError(f"head_attn must be one of {', '.join(HEAD_ATTN)}, got {attn!r}")
        self.approximate = gelu_approximate(gelu)
        hidden = mlp_ratio * n_latent
        self.attn, self.n_latent = attn, n_latent
        self.n_head = n_latent // 64 if n_latent % 64 == 0 and n_latent >= 128 else 1
        self.head_size = n_latent // self.n_head
        self.ln_h = nn.LayerNorm(n_embd, bias=bias)           # LN_h
        self.w_in = nn.Linear(n_embd, n_latent, bias=bias)    # W_in
        self.ln_z = nn.LayerNorm(n_latent, bias=bias)         # LN_z
        # MLP([LN_z(z); LN_h(h)]): its first layer is split into a z-part and an h-part. Identical to one
        # Linear on the concatenation, but the h-part is the same at every step, so it is computed once.
        self.fc_z = nn.Linear(n_latent, hidden, bias=False)
        self.fc_h = nn.Linear(n_embd, hidden, bias=bias)
        self.proj = nn.Linear(hidden, n_latent, bias=bias)
        self.b = nn.Parameter(torch.zeros(n_latent))           # β = sigmoid(b); starts at 0.5
        self.w_out = nn.Linear(n_latent, n_embd, bias=bias)   # W_out
        if attn == "trunk":
            self.w_q = nn.Linear(n_latent, n_latent, bias=bias)      # W_q
            self.w_kv = nn.Linear(n_embd, 2 * n_latent, bias=bias)   # W_kv: keys, values of LN_h(h)
        elif attn == "latent":
            self.w_qkv = nn.Linear(n_latent, 3 * n_latent, bias=bias)  # W_qkv of LN_z(z_{k-1})
        if attn != "none":
            self.fc_a = nn.Linear(n_latent, hidden, bias=False)     # a_k's part of the MLP's first layer
        self.reset_parameters()

    def reset_parameters(self):
        attn = [getattr(self, n) for n in ("w_q", "w_kv", "w_qkv", "fc_a") if hasattr(self, n)]
        for lin in (self.w_in, self.fc_z, self.fc_h, self.proj, *attn):
            nn.init.normal_(lin.weight, mean=0.0, std=0.02)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        nn.init.zeros_(self.b)
        # I2: W_out (and its bias) start at zero, so o_k = h_t and the augmented model is exactly its trunk
        nn.init.zeros_(self.w_out.weight)
        if self.w_out.bias is not None:
            nn.init.zeros_(self.w_out.bias)

    def init_state(self, h):
        """h (B, T, C) -> z_0 (B, T, D), and what every step reuses: (injection (B, T, H), β (D,), the keys
        and values of LN_h(h) for head_attn='trunk' (2 × (B, nh, T, hs)), else None). head_attn='none' also
        takes h (..., C) of any shape."""
        hn = self.ln_h(h)                                   # LN_h(h_t)
        kv = self.heads(self.w_kv(hn)).chunk(2, dim=1) if self.attn == "trunk" else None
        z = torch.tanh(self.w_in(hn))                       # z_0 = tanh(W_in · LN_h(h_t))
        # the h-part of the MLP's first layer is the same at every step: computed once
        return z, (self.fc_h(hn), torch.sigmoid(self.b), kv)   # (injection, β = sigmoid(b), keys/values)

    def update(self, z, inject, beta, kv, cache=None):
        """One refinement step k: z_{k-1} (B, T, D) -> z_k (B, T, D). cache: generation's LayerKV of this
        step's keys/values at earlier positions (head_attn='latent'), extended here; see latents."""
        zn = self.ln_z(z)                                          # LN_z(z_{k-1})
        first = self.fc_z(zn) + inject                             # 1st layer on [LN_z(z_{k-1}) ; LN_h(h_t)]
        # I3: step k at position t reads positions <= t only: every op here is per position, and the one that
        # mixes positions, an attending head's read, is causal
        if self.attn != "none":
            first = first + self.fc_a(self.read(zn, kv, cache))    # a_k joins the MLP input: [... ; a_k]
        u = self.proj(F.gelu(first, approximate=self.approximate))  # u_k = MLP([LN_z(z_{k-1}) ; LN_h(h_t)])
        # I1: z_k ∈ [−1,1]^D however many steps run: with β ∈ (0,1) z_k is a convex combination of z_{k-1} and
        # tanh(u_k), both in the box (z_0 = tanh(...) starts there)
        return z + beta * (torch.tanh(u) - z)                      # z_k = z_{k-1} + β ⊙ (tanh(u_k) − z_{k-1})

    def heads(self, x):
        """(B, T, n·D) -> (B, n·nh, T, hs): attention heads, n = 1, 2, 3 for q, kv, qkv."""
        B, T, _ = x.shape
        return x.view(B, T, -1, self.head_size).transpose(1, 2)

    def read(self, zn, kv, cache=None):
        """a_k (B, T, D): causal attention of each position's LN_z(z_{k-1}) over positions <= t. In
        generation the keys may hold earlier positions too (kv, cache); then T is the whole window or the
        newest token."""
        B, T, D = zn.shape
        if self.attn == "trunk":
            q, (k, v) = self.heads(self.w_q(zn)), kv                                  # (B, nh, T, hs)
        else:
            q, k, v = self.heads(self.w_qkv(zn)).chunk(3, dim=1)
            if cache is not None:                                        # generation: earlier positions' too
                k, v = cache.extend(k, v)                                # (B, nh, T_all, hs)
        # a sequence attends causally to itself (I3); one new token (decode) to every cached position. A plain
        # bool, also when a compiled graph has a dynamic T
        causal = True if T > 1 else False
        a = F.scaled_dot_product_attention(q, k, v, is_causal=causal)                  # (B, nh, T, hs)
        return a.transpose(1, 2).reshape(B, T, D)

    def readout(self, h, z):
        """o_k (..., C), back in the hidden space."""
        return h + self.w_out(z)                                   # o_k = h_t + W_out · z_k

    def latents(self, h, n_steps, grad_steps=None, cache=None):
        """
        Yields z_0, z_1..z_K (each (B, T, D)) for h (B, T, C), one step at a time: forward takes them all,
        generation may stop after any step (adaptive exit).
        grad_steps: backpropagate through only the last `grad_steps` steps (None = all). Earlier steps run
        without autograd, so they cost no activation memory.
        cache: generation's HeadCache of what an attending head's steps read of earlier positions, extended
        here (h then holds the positions this call adds: the whole window on a (re)fill, else the newest
        token).
        """
        # I4: K is a run-time argument: one set of weights for every step, so any n_steps >= 0 runs, and z_k
        # does not depend on how many steps follow it
        first_grad_step = 1 if grad_steps is None else max(1, n_steps - grad_steps + 1)
        z, (inject, beta, kv) = self.init_state(h)                 # z_0 (B, T, D)
        if cache is not None and self.attn == "trunk":
            kv = cache.kv.extend(*kv)                  # earlier positions' first, (B, nh, T_all, hs)
        if first_grad_step > 1:
            z = z.detach()
        yield z
        for k in range(1, n_steps + 1):
            step_cache = cache.steps[k - 1] if cache is not None and self.attn == "latent" else None
            with torch.set_grad_enabled(torch.is_grad_enabled() and k >= first_grad_step):
                z = self.update(z, inject, beta, kv, step_cache)   # z_k
            yield z

    def forward(self, h, n_steps, return_latents=False, grad_steps=None, readout_grad="all"):
        """
        h: (B, T, C) trunk output. Returns o: (K, B, T, C), o[k-1] = o_k, and with return_latents=True
        also z: (K+1, B, T, D), z[k] = z_k. grad_steps: see latents; the o_k of the steps run without
        autograd still pass gradient to h and W_out through the loss on step k. readout_grad='first': the
        readout's residual h_t passes gradient from step 1's loss only, o_k = sg(h_t) + W_out·z_k for k ≥ 2
        (the same values; the steps' reads of h still pass gradient).
        """
        latents = self.latents(h, n_steps, grad_steps)
        zs, outs = [next(latents)], []                             # z_0
        for k, z in enumerate(latents, 1):                         # z_1..z_K
            zs.append(z)
            # o_k as each step ends: another order would change the float sums of h's gradient
            outs.append(self.readout(h if k == 1 or readout_grad == "all" else h.detach(), z))
        o = torch.stack(outs)                                      # (K, B, T, C)
        return (o, torch.stack(zs)) if return_latents else o

    def new_cache(self, n_steps):
        """An empty HeadCache for generation with n_steps steps; None for head_attn='none', whose steps read
        h_t only."""
        return None if self.attn == "none" else HeadCache(self.attn, n_steps)

    def flops_per_token(self, n_steps, seq_len, grad_steps=None):
        """
        Training FLOPs per token of n_steps = K steps over seq_len = T positions: 6 per multiply-add of a
        weight (forward 2, backward 4: PaLM appendix B). grad_steps (truncated backward, latents): the steps
        before the last grad_steps run forward only (2), z_0 too, and their W_out needs only its weight
        gradient (4). Every Linear of the head is counted: the ones below run once per token or per readout,
        all the others are a step's.
        """
        K, T = n_steps, seq_len
        size = lambda layers: sum(lin.weight.numel() for lin in layers)
        once = [self.fc_h] + ([self.w_kv] if self.attn == "trunk" else [])  # the injection, trunk keys/values
        not_a_step = (self.w_in, self.w_out, *once)
        steps = [m for m in self.modules() if isinstance(m, nn.Linear) and m not in not_a_step]
        # per step: its matmuls, and for an attending head the scores q·k and att·v over T positions
        step = size(steps) + (2 * self.n_latent * T if self.attn != "none" else 0)
        n_grad = K if not grad_steps else min(K, grad_steps)                 # steps with a full backward
        w_in, w_out = self.w_in.weight.numel(), self.w_out.weight.numel()
        return (6 * size(once) + (6 if n_grad == K else 2) * w_in
                + n_grad * 6 * (step + w_out) + (K - n_grad) * (2 * step + 4 * w_out))


# -----------------------------------------------------------------------------
# generation, per token: the head's outputs at the newest position, adaptive exit over its steps

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
