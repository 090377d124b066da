"""
RLRP losses. Everything is a function of one tensor, the per-step token NLL (DESIGN.md §2 "Losses"):

    ℓ ∈ R^{K×B×T},  ℓ[k,b,t] = −log softmax(logits_k)[y_t]

`token_nll` computes ℓ from the hidden states without ever holding the K full-vocabulary logits
tensors; the loss terms below only see ℓ and (B, T) masks.
"""

import torch
import torch.nn.functional as F

WEIGHT_SCHEDULES = ("uniform", "linear", "exp", "last")


# -----------------------------------------------------------------------------
# ℓ: fused unembedding + cross-entropy, chunked over rows, logits recomputed in backward

def default_chunk_rows(vocab_size, max_elements=2**24):
    """Rows per chunk so one chunk of logits holds at most `max_elements` (64 MB in fp32)."""
    return max(1, max_elements // vocab_size)


def _compute_dtype(x):
    """The matmul dtype autocast would pick (bf16/fp16 under autocast), else x's own dtype."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    """nll[n] = logsumexp(x[n] @ W.T) − (x[n] @ W.T)[y[n]], 0 where y[n] = −1.
    Forward keeps only x, W, y and the logsumexp (N floats); backward recomputes each chunk's logits,
    so peak memory is one chunk of logits instead of N×V. Cost: one extra x @ W.T matmul in backward."""

    @staticmethod
    def forward(ctx, x, weight, targets, chunk_rows):
        # x: (N, C), weight: (V, C), targets: (N,) int64 with −1 = ignored
        dtype = _compute_dtype(x)
        acc = torch.promote_types(dtype, torch.float32)    # softmax math in >= fp32 (fp64 stays fp64)
        xc, wc = x.to(dtype), weight.to(dtype)
        valid = targets >= 0
        safe_targets = targets.clamp(min=0)
        nlls, lses = [], []
        for i in range(0, x.size(0), chunk_rows):
            logits = (xc[i:i + chunk_rows] @ wc.T).to(acc)                      # (n, V)
            lse = torch.logsumexp(logits, dim=-1)                               # (n,)
            target_logit = logits.gather(1, safe_targets[i:i + chunk_rows, None]).squeeze(1)
            nlls.append(lse - target_logit)
            lses.append(lse)
        nll = torch.where(valid, torch.cat(nlls), 0.0)
        ctx.save_for_backward(x, weight, targets, torch.cat(lses))
        ctx.chunk_rows, ctx.dtype, ctx.acc = chunk_rows, dtype, acc
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        x, weight, targets, lse = ctx.saved_tensors
        xc, wc = x.to(ctx.dtype), weight.to(ctx.dtype)
        grad_scale = torch.where(targets >= 0, grad_nll, 0.0).to(ctx.acc)        # (N,), 0 on ignored rows
        safe_targets = targets.clamp(min=0)
        grad_x = torch.empty_like(x)
        grad_w = torch.zeros_like(weight, dtype=ctx.acc)
        for i in range(0, x.size(0), ctx.chunk_rows):
            s = slice(i, i + ctx.chunk_rows)
            logits = (xc[s] @ wc.T).to(ctx.acc)                                   # recomputed, (n, V)
            # d nll / d logits = softmax − onehot(y), scaled by the incoming gradient
            grad_logits = torch.exp(logits - lse[s, None])
            grad_logits.scatter_add_(1, safe_targets[s, None], -torch.ones_like(lse[s, None]))
            grad_logits = (grad_logits * grad_scale[s, None]).to(ctx.dtype)
            grad_x[s] = grad_logits @ wc
            grad_w += grad_logits.T @ xc[s]
        return grad_x, grad_w.to(weight.dtype), None, None


def token_nll(x, weight, targets, chunk_rows=None):
    """
    ℓ for already-normalised hidden states: x (..., C), weight (V, C) the unembedding, targets (...)
    with −1 = ignored. Returns (...) NLL in float32 (float64 for float64 inputs), 0 at ignored positions.
    """
    chunk_rows = chunk_rows or default_chunk_rows(weight.size(0))
    flat = _LinearCrossEntropy.apply(x.reshape(-1, x.size(-1)), weight, targets.reshape(-1), chunk_rows)
    return flat.view(targets.shape)


# -----------------------------------------------------------------------------
# step weights w and masked means

def step_weights(n_steps, schedule="linear", gamma=0.5):
    """
    w ∈ R^K, w_k ≥ 0, Σ_k w_k = 1:
      uniform: w_k = 1/K    linear: w_k ∝ k    exp: w_k ∝ γ^(K−k)    last: w_K = 1
    """
    if schedule not in WEIGHT_SCHEDULES:
        raise ValueError(f"weight_schedule must be one of {', '.join(WEIGHT_SCHEDULES)}, got {schedule!r}")
    if n_steps < 1:
        raise ValueError(f"step weights need n_steps >= 1, got {n_steps}")
    k = torch.arange(1, n_steps + 1, dtype=torch.float32)
    if schedule == "uniform":
        w = torch.ones(n_steps)
    elif schedule == "linear":
        w = k
    elif schedule == "exp":
        if not gamma > 0:
            raise ValueError(f"the exp weight schedule needs gamma > 0, got {gamma}")
        w = gamma ** (n_steps - k)
    else:
        w = (k == n_steps).float()
    return w / w.sum()


def check_weights(weights, n_steps):
    """Weights must be a length-K probability vector."""
    if weights.shape != (n_steps,):
        raise ValueError(f"step weights must have shape ({n_steps},) to match ℓ's {n_steps} steps, "
                         f"got {tuple(weights.shape)}")
    if (weights < 0).any() or abs(weights.sum().item() - 1.0) > 1e-5:
        raise ValueError(f"step weights must be >= 0 and sum to 1, got sum {weights.sum().item():.6f}")


def masked_mean(a, mask, count=None):
    """
    masked_mean(a, m) = Σ a·m / max(Σ m, 1) over the last two dims: a (..., B, T), mask (B, T) bool.
    count replaces Σ m when the mean spans more than this batch: the micro-batches of one optimizer step
    on all ranks, so that accumulating micro-batches equals one large batch token for token.
    """
    count = mask.sum() if count is None else count
    return torch.where(mask, a, 0.0).sum(dim=(-2, -1)) / torch.as_tensor(count).clamp(min=1)


# -----------------------------------------------------------------------------
# the three loss terms

def deep_supervision_loss(nll, weights, mask, count=None):
    """(i) L_DS = Σ_k w_k · masked_mean(ℓ_k, m_valid)."""
    check_weights(weights, nll.size(0))
    return (weights.to(nll) * masked_mean(nll, mask, count)).sum()


def soft_rl_loss(nll, weights, mask, q=1.0, count=None):
    """
    (iii) L_RL = − Σ_k w_k · masked_mean(exp(−ℓ_k), m_RL).
    exp(−ℓ) = p_k(y_t) is the exact expected reward of sampling from softmax(logits_k) with reward
    1[token = y_t]; its gradient is p·∇log p. Generalised (optional) exponent q: − p^q / q, whose
    gradient p^q·∇log p moves from CE's (q → 0) to the paper's (q = 1, the formula above).
    """
    check_weights(weights, nll.size(0))
    reward = torch.exp(-q * nll) / q  # p^q / q
    return -(weights.to(nll) * masked_mean(reward, mask, count)).sum()


def improvement_penalty(nll, mask, margin=0.0, count=None):
    """
    L_IMP = 1/(K−1) · Σ_{k=2..K} masked_mean(relu(ℓ_k − sg(ℓ_1) + margin), m_valid), 0 when K ≤ 1.
    sg = stop-gradient: the penalty pushes later steps down, never step 1 up.
    """
    if nll.size(0) <= 1:
        return nll.new_zeros(())
    excess = F.relu(nll[1:] - nll[:1].detach() + margin)   # (K−1, B, T)
    return masked_mean(excess, mask, count).mean()


def loss_masks(targets, answer_mask, rl_answer_only=True):
    """(m_valid, m_RL), both (B, T) bool: m_valid = (y ≠ −1); m_RL = the answer mask if rl_answer_only else m_valid."""
    m_valid = targets >= 0
    return m_valid, (answer_mask & m_valid if rl_answer_only else m_valid)


def rlrp_loss(nll, targets, answer_mask, kind, weights, lambda_rl=0.0, lambda_imp=0.0,
              rl_answer_only=True, margin=0.0, rl_q=1.0, counts=None):
    """
    (ii) data-aware routing: the objective for one batch by its kind.
      fluency:   L = L_DS + λ_imp·L_IMP
      reasoning: L = L_DS + λ_rl·L_RL + λ_imp·L_IMP, L_RL on answer spans if rl_answer_only
    Every term is always computed and switched by its weight, never by a branch on tensor values,
    so every DDP rank builds the same graph. Returns (loss, parts) with parts detached for logging.
    nll: (K, B, T); targets: (B, T) with −1 = ignored; answer_mask: (B, T) bool; kind: str.
    counts: optional (Σ m_valid, Σ m_RL) over the whole optimizer step (see masked_mean), else this batch's.
    """
    if kind not in ("fluency", "reasoning"):
        raise ValueError(f"batch kind must be 'fluency' or 'reasoning', got {kind!r}")
    m_valid, m_rl = loss_masks(targets, answer_mask, rl_answer_only)
    n_valid, n_rl = counts if counts is not None else (None, None)
    l_ds = deep_supervision_loss(nll, weights, m_valid, n_valid)
    l_rl = soft_rl_loss(nll, weights, m_rl, q=rl_q, count=n_rl)
    l_imp = improvement_penalty(nll, m_valid, margin, n_valid)
    lam_rl = lambda_rl if kind == "reasoning" else 0.0
    loss = l_ds + lam_rl * l_rl + lambda_imp * l_imp
    parts = {"ds": l_ds.detach(), "rl": l_rl.detach(), "imp": l_imp.detach(),
             "nll_k": masked_mean(nll.detach(), m_valid, n_valid)}   # nll_k: (K,) per-step token NLL
    return loss, parts
