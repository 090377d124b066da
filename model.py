"""
The RLRP model: a GPT trunk (nanoGPT-style, GPT-2 compatible) that owns a LatentHead.

    h = trunk(x)                        (B, T, C)  after the last block, before the final LayerNorm
    o_1..o_K = latent_head(h, K)        (K, B, T, C)
    logits_k = lm_head(LN_f(o_k))       the trunk's own final norm and tied unembedding

With targets the model returns ℓ (K, B, T), the per-step token NLL, instead of logits: the K
full-vocabulary logits tensors are never alive at once (linear_ce.token_nll). A model built with
n_steps = 0 has no head and is exactly a GPT (I5); n_steps is also a run-time argument (I4).

Generation (GPT.generate) caches the trunk's keys and values, and what an attending head's steps read: each
new token costs one trunk pass and K head steps on one position until the context fills block_size; then the
window slides and each new token re-runs the last block_size tokens (positions are absolute, so cached keys
cannot be shifted).
"""

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from latent_head import LatentHead, LayerKV, exit_logits, gelu_approximate, newest_outputs
from linear_ce import token_nll


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for efficiency
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True        # bias in Linears and LayerNorms, like GPT-2
    n_steps: int = 4         # K, refinement steps of the latent head; 0 = no head, a plain GPT
    n_latent: int = 0        # D, latent width; 0 = n_embd
    head_attn: str = "none"  # what a step may read besides h_t: none | trunk | latent (latent_head.py)
    gelu: str = "exact"      # the GELU of every MLP, trunk and head: exact (nanoGPT's) | tanh (GPT-2's)

    def __post_init__(self):
        if self.n_steps < 0:
            raise ValueError(f"n_steps (K) must be >= 0, got {self.n_steps}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_latent == 0:
            self.n_latent = self.n_embd
        gelu_approximate(self.gelu)  # a ValueError for a value that is not a GELU here


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x, kv=None):
        """x (B, T, C). kv: generation's cache of this layer (latent_head.LayerKV), extended with this call's
        keys and values; None in training (the graph is then the plain one)."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in (q, k, v))    # (B, nh, T, hs)
        # a sequence attends causally to itself (training, prefill); one new token (decode) to every cached
        # one. A plain bool, also when a compiled graph has a dynamic T
        causal = True if T > 1 else False
        if kv is not None:
            k, v = kv.extend(k, v)                                                  # (B, nh, T_all, hs)
        # flash / memory-efficient attention kernels where the device has them
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=causal)   # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        # config.gelu: exact (nanoGPT's; PyTorch's exact GELU is several times faster than its tanh form on a
        # CPU) or tanh (GPT-2's: its pretrained weights reproduce their logits only with it)
        self.approximate = gelu_approximate(config.gelu)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, kv=None):
        x = x + self.attn(self.ln_1(x), kv)
        return x + self.mlp(self.ln_2(x))


# -----------------------------------------------------------------------------
# generation's cache and next token (GPT.generate)

class KVCache:
    """The model's: one LayerKV per trunk block, and the latent head's own (LatentHead.new_cache; None for a
    position-wise head or K' = 0)."""

    def __init__(self, n_layer, head=None):
        self.layers = [LayerKV() for _ in range(n_layer)]
        self.head = head

    def __len__(self):
        return len(self.layers[0])                # the tokens cached: the next one's position


def next_token(logits, temperature, top_k):
    """logits (B, V) -> next token ids (B,): greedy at temperature 0, else sampled from the top_k."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float("inf")
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1).squeeze(-1)


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        # I5: a model built with K = 0 has no head at all: a plain GPT, the baseline, on the same code path
        self.latent_head = (LatentHead(config.n_embd, config.n_latent, config.bias, attn=config.head_attn,
                                       gelu=config.gelu) if config.n_steps > 0 else None)
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):  # GPT-2's scaled init of the residual projections
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if self.latent_head is not None:
            self.latent_head.reset_parameters()  # its own init: W_out = 0, so o_k = h_t at first (I2)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        """Parameters; position embeddings excluded by default (token embeddings count: tied lm_head)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    # -------------------------------------------------------------------------
    # forward

    def resolve_steps(self, n_steps):
        """The K this call runs: the built K by default, any K' >= 0 on request. I4: K is a run-time argument,
        not part of the weights; steps 1..k give the same o_k whatever K' is (LatentHead.latents)."""
        K = self.config.n_steps if n_steps is None else n_steps
        if K < 0:
            raise ValueError(f"n_steps must be >= 0, got {K}")
        if K > 0 and self.latent_head is None:
            raise ValueError(f"n_steps={K} asks for refinement steps, but this model was built with "
                             "n_steps=0 (no latent head); use n_steps=0")
        return K

    def check_inputs(self, idx, targets):
        T = idx.size(1)
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size {self.config.block_size}")
        if torch.compiler.is_compiling():
            return  # the value checks below sync with the device: eager runs do them, compiled graphs don't
        V = self.config.vocab_size
        if idx.numel() and (idx.min() < 0 or idx.max() >= V):
            raise ValueError(f"token ids must be in [0, {V}), got range "
                             f"[{idx.min().item()}, {idx.max().item()}]")
        if targets is not None and targets.numel() and (targets.min() < -1 or targets.max() >= V):
            raise ValueError(f"targets must be in [0, {V}) or -1 (ignored), got range "
                             f"[{targets.min().item()}, {targets.max().item()}]")

    def trunk(self, idx, cache=None):
        """
        idx (B, T) -> h (B, T, C): the hidden state after the last block, before LN_f.
        cache: generation's KVCache, whose layers this call extends; idx then continues the cached tokens, so
        its positions start after them.
        """
        t0 = 0 if cache is None else len(cache)
        pos = torch.arange(t0, t0 + idx.size(1), dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            x = block(x, None if cache is None else cache.layers[i])
        return x

    def head_outputs(self, h, K, grad_steps=None, readout_grad="all"):
        """h (B, T, C) -> o (max(K,1), B, T, C): o_1..o_K from the latent head, or h itself for K = 0."""
        return self.latent_head(h, K, grad_steps=grad_steps, readout_grad=readout_grad) if K > 0 \
            else h.unsqueeze(0)

    def unembed(self, o):
        """o_k (..., C) -> logits_k (..., V)."""
        return self.lm_head(self.transformer.ln_f(o))          # logits_k = lm_head(LN_f(o_k))

    def step_nll(self, o, targets):
        """ℓ_k (B, T) of one step's o_k (B, T, C): unembed fused with the cross-entropy (linear_ce)."""
        # ℓ_k = −log softmax(lm_head(LN_f(o_k)))[y], without holding logits_k
        return token_nll(self.transformer.ln_f(o), self.lm_head.weight, targets)

    def forward(self, idx, targets=None, n_steps=None):
        """
        idx: (B, T) token ids. Returns (logits, nll):
          targets None:  logits (K1, B, T, V), one row per step, K1 = max(K, 1); nll None
          targets given: logits None; nll = ℓ (K1, B, T) per-step token NLL, 0 where targets = −1
        targets: y (B, T), the same at every step, or Y (K1, B, T), step k's own (losses.step_supervision).
        Training composes these parts itself (losses.Objective: truncated backward, sampled rows, the
        progressive pass); this forward is the model's plain one.
        """
        K = self.resolve_steps(n_steps)
        self.check_inputs(idx, targets)
        o = self.head_outputs(self.trunk(idx), K)                                    # o_k, (K1, B, T, C)
        if targets is None:
            return self.unembed(o), None
        if targets.dim() == 2:
            targets = targets.expand(len(o), *targets.shape)
        if targets.shape[:2] != (len(o), idx.size(0)):
            raise ValueError(f"per-step targets must have shape ({len(o)}, B, T), got {tuple(targets.shape)}")
        return None, torch.stack([self.step_nll(o_k, y_k) for o_k, y_k in zip(o, targets)])   # ℓ, (K1, B, T)

    def compile_parts(self):
        """
        torch.compile (fullgraph=True) what does not depend on K: the trunk, z_0, one refinement step, and one
        step's ℓ. The K-step loop stays in Python, so every K (a random K per optimizer step, any K' at
        evaluation) reuses the same graphs instead of compiling one per K; compiling forward whole unrolls
        the loop and recompiles for each new K. Returns self; parameters and state_dict names are unchanged.
        """
        self.trunk = torch.compile(self.trunk, fullgraph=True)
        self.step_nll = torch.compile(self.step_nll, fullgraph=True)
        if self.latent_head is not None:
            self.latent_head.init_state = torch.compile(self.latent_head.init_state, fullgraph=True)
            self.latent_head.update = torch.compile(self.latent_head.update, fullgraph=True)
        return self

    # -------------------------------------------------------------------------
    # generation: the cache (KVCache), the head's newest outputs and adaptive exit (latent_head.py)

    def new_cache(self, head=None):
        """An empty generation cache: the trunk's, and the head's own (LatentHead.new_cache)."""
        return KVCache(self.config.n_layer, head)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, n_steps=None, exit_threshold=None,
                 stop_token=None, return_steps=False):
        """
        Continue idx (B, T) by max_new_tokens tokens -> (B, T + N), the model in eval mode. Each new token:
        K' head steps on its position, logits_K' -> next token (temperature 0 = greedy; top_k keeps the k most
        likely). The context is the last block_size tokens, exactly what the uncached model would see.
        exit_threshold: adaptive exit (latent_head.exit_logits). stop_token: a row that emits it is padded
        with it from then on, and generation ends early once every row has (N < max_new_tokens).
        return_steps: also return a dict of (B, N) `used`, the steps each token ran (-1 = padding after
        stop_token), and (B, N, K'+1) `top1`, `prob`: what each step k would have predicted (exit_logits).
        """
        K = self.resolve_steps(n_steps)
        bs = self.config.block_size
        self.check_inputs(idx[:, -bs:], None)
        if exit_threshold is not None and exit_threshold < 0:
            raise ValueError(f"exit_threshold must be >= 0, got {exit_threshold}")
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        cache, steps = None, []
        for _ in range(max_new_tokens):
            if cache is None or len(cache) == bs:                  # (re)fill from the last block_size tokens
                head_cache = self.latent_head.new_cache(K) if K else None
                cache, new = self.new_cache(head_cache), idx[:, -bs:]
            else:
                new = idx[:, -1:]                                   # the newest token only
            outs = newest_outputs(self.latent_head, self.trunk(new, cache), K, cache.head)
            if K and self.config.head_attn == "latent":
                # every step runs, exit or not: step k at a later token reads step k−1 here, as uncached
                outs = list(outs)
            logits, used, top1, prob = exit_logits(outs, K, self.unembed, exit_threshold, return_steps)
            idx_next = next_token(logits, temperature, top_k)                   # (B,)
            if stop_token is not None:
                idx_next, used = idx_next.masked_fill(done, stop_token), used.masked_fill(done, -1)
                done = done | (idx_next == stop_token)
            idx = torch.cat((idx, idx_next[:, None]), dim=1)
            steps.append((used, top1, prob))
            if stop_token is not None and done.all():
                break
        if not return_steps:
            return idx
        B = idx.size(0)
        used, top1, prob = ((torch.stack(t, dim=1) for t in zip(*steps)) if steps else  # (B, N), (B, N, K'+1)
                            (idx.new_zeros(B, 0), idx.new_zeros(B, 0, K + 1), torch.zeros(B, 0, K + 1)))
        return idx, dict(used=used, top1=top1, prob=prob)

    # -------------------------------------------------------------------------
    # pretrained weights

    def crop_block_size(self, block_size):
        """Shrink the context length (e.g. GPT-2's 1024 down to a smaller block_size)."""
        if block_size > self.config.block_size:
            raise ValueError(f"block_size {block_size} is larger than the model's {self.config.block_size}")
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    @classmethod
    def from_pretrained(cls, name_or_dir, n_steps=4, n_latent=0, dropout=0.0, head_attn="none"):
        """
        GPT-2 weights from the Hugging Face hub ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl') or a local
        directory written by `save_pretrained`, plus a fresh latent head (which, by I2, changes nothing yet).
        The architecture is GPT-2's, its tanh GELU included (gelu='tanh', the head's too): with it the trunk
        reproduces GPT-2's logits.
        """
        try:
            from transformers import GPT2LMHeadModel
        except ImportError as e:
            raise ImportError("loading GPT-2 weights needs transformers: pip install transformers") from e
        try:  # a local folder or the Hugging Face cache first: no network
            hf = GPT2LMHeadModel.from_pretrained(name_or_dir, local_files_only=True)
        except OSError:
            try:
                hf = GPT2LMHeadModel.from_pretrained(name_or_dir)
            except OSError as e:
                raise OSError(
                    f"cannot load GPT-2 weights {name_or_dir!r}: not a local folder, not in the Hugging Face "
                    f"cache, and the hub is unreachable. For an offline machine: "
                    f"GPT2LMHeadModel.from_pretrained({name_or_dir!r}).save_pretrained(DIR) where the hub is "
                    f"reachable, copy DIR over, use init_from=DIR (HF_HUB_OFFLINE=1 skips the hub's retries)"
                ) from e
        c = hf.config
        if c.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"{name_or_dir}: activation {c.activation_function!r} is not GPT-2's tanh GELU")
        config = GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer,
                           n_head=c.n_head, n_embd=c.n_embd, dropout=dropout, bias=True, n_steps=n_steps,
                           n_latent=n_latent, head_attn=head_attn, gelu="tanh")
        model = cls(config)
        sd, sd_hf = model.state_dict(), hf.state_dict()
        # HF stores these as Conv1D (in, out); ours are Linear (out, in)
        transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        # every trunk tensor of ours comes from HF (HF's extra causal-mask buffers have no counterpart here)
        for k in (k for k in sd if not k.startswith("latent_head.")):
            w = sd_hf[k].t() if k.endswith(transposed) else sd_hf[k]
            if w.shape != sd[k].shape:
                raise ValueError(f"{name_or_dir}: {k} has shape {tuple(w.shape)}, "
                                 f"expected {tuple(sd[k].shape)}")
            sd[k].copy_(w)
        return model

    # -------------------------------------------------------------------------
    # optimizer and accounting

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW; weight decay only on tensors with >= 2 dims (matmuls, embeddings), fused where available."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))

    def flops_per_token(self, n_steps=None, seq_len=None, grad_steps=None, unembeds=None):
        """
        Training FLOPs per token (forward + backward = 6 per multiply-add per parameter, PaLM appendix B),
        split into trunk (blocks + attention scores), head (LatentHead.flops_per_token, with grad_steps) and
        unembed (lm_head, once per step; or `unembeds` times per token, sampled deep supervision's 1 + 2M/N).
        """
        cfg, K = self.config, self.resolve_steps(n_steps)
        T = seq_len or cfg.block_size
        trunk = self.trunk_flops(T)
        head = self.latent_head.flops_per_token(K, T, grad_steps) if K > 0 else 0
        unembed = 6 * cfg.n_embd * cfg.vocab_size * (max(K, 1) if unembeds is None else unembeds)
        return {"trunk": trunk, "head": head, "unembed": unembed, "total": trunk + head + unembed}

    def trunk_flops(self, seq_len):
        """The blocks' training FLOPs per token: 6 per weight of their matrices, and the attention scores."""
        blocks = sum(p.numel() for p in self.transformer.h.parameters() if p.dim() >= 2)
        return 6 * blocks + 12 * self.config.n_layer * self.config.n_embd * seq_len
