"""
ℓ from hidden states: the unembedding fused with the cross-entropy, tile by tile.

    ℓ[n] = −log softmax(x[n] · W^T)[y[n]] = logsumexp(x[n] · W^T) − x[n] · W[y[n]],   0 where y[n] = −1

The model's K steps would each hold N×V logits; here they are made one tile at a time and recomputed in
backward instead of stored. It equals plain cross-entropy (tests); losses.py builds the objective from ℓ.
"""

import torch
import torch.nn.functional as F


def token_nll(x, weight, targets, chunk_rows=None, chunk_cols=None, keep_max=None):
    """
    ℓ for already-normalised hidden states: x (..., C), weight (V, C) the unembedding, targets (...)
    with −1 = ignored. Returns (...) NLL in float32 (float64 for float64 inputs), 0 at ignored positions.
    The logits x @ weight.T (N×V for N positions: at GPT-2's vocabulary far more numbers than the model has
    weights) are made one tile of chunk_rows × chunk_cols at a time (default_tile when not given) and
    recomputed in backward (_LinearCrossEntropy) instead of stored. keep_max: up to this many logits are
    made at once and kept for backward, as plain cross-entropy does (default: one tile's).
    """
    rows, cols = default_tile(weight.size(0), x.device)
    x, flat_targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)
    if chunk_rows is None and chunk_cols is None and x.size(0) * weight.size(0) <= (keep_max or rows * cols):
        # few enough logits: plain cross-entropy keeps them for backward instead of recomputing them (6·C·V
        # FLOPs per row instead of 8·C·V), which is faster when memory allows
        logits = x @ weight.T
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        flat = F.cross_entropy(logits, flat_targets, ignore_index=-1, reduction="none")   # (N,)
    else:
        flat = _LinearCrossEntropy.apply(x, weight, flat_targets, chunk_rows or rows, chunk_cols or cols)
    return flat.view(targets.shape)                                    # ℓ = −log softmax(x W^T)[y], (...)


# -----------------------------------------------------------------------------
# how token_nll tiles: the tile size, and the autograd function that recomputes each tile in backward

def default_chunk_rows(vocab_size, max_elements=2**24):
    """Rows per chunk so one chunk of logits holds at most `max_elements` (64 MB in fp32)."""
    return max(1, max_elements // vocab_size)


# On CPU, tiles of at most 512×512 logits (1 MB in fp32) stay in the L2 cache, so the softmax passes between
# the matmuls run at cache speed instead of streaming whole-vocabulary row chunks through memory (at GPT-2's
# vocabulary, training steps ~2× faster; bench.py measures it).
CPU_TILE = 512


def default_tile(vocab_size, device):
    """(rows, cols) of one tile of logits. GPUs, and compiled graphs (which unroll the loops), get whole
    vocabulary rows: few, large kernels."""
    rows = default_chunk_rows(vocab_size)
    if device.type == "cpu" and not torch.compiler.is_compiling():
        return min(rows, CPU_TILE), CPU_TILE
    return rows, vocab_size


def _compute_dtype(x):
    """The matmul dtype autocast would pick (bf16/fp16 under autocast), else x's own dtype."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    """nll[n] = logsumexp(x[n] @ W.T) − x[n]·W[y[n]], 0 where y[n] = −1.
    Forward keeps only x, W, y and the logsumexp (N floats); backward recomputes each tile of logits, so
    peak memory is one tile of logits instead of N×V. Cost: one extra x @ W.T matmul in backward."""

    @staticmethod
    def forward(ctx, x, weight, targets, chunk_rows, chunk_cols):
        # x: (N, C), weight: (V, C), targets: (N,) int64 with −1 = ignored
        dtype = _compute_dtype(x)
        acc = torch.promote_types(dtype, torch.float32)    # softmax math in >= fp32 (fp64 stays fp64)
        xc, wc = x.to(dtype), weight.to(dtype)
        lse = torch.empty(x.size(0), dtype=acc, device=x.device)
        for i in range(0, x.size(0), chunk_rows):
            r = slice(i, i + chunk_rows)
            tiles = [torch.logsumexp((xc[r] @ wc[j:j + chunk_cols].T).to(acc), dim=1)
                     for j in range(0, weight.size(0), chunk_cols)]
            lse[r] = torch.stack(tiles).logsumexp(0)        # logsumexp over the vocabulary, tile by tile
        # the target's logit is one dot product per row, rounded like the matmul's logits so nll >= 0 holds
        # under autocast too
        w_target = wc.index_select(0, targets.clamp(min=0))                              # W[y[n]], (N, C)
        target_logit = (xc.to(acc) * w_target.to(acc)).sum(1).to(dtype).to(acc)
        ctx.save_for_backward(x, weight, targets, lse)
        ctx.chunk_rows, ctx.chunk_cols, ctx.dtype, ctx.acc = chunk_rows, chunk_cols, dtype, acc
        return torch.where(targets >= 0, lse - target_logit, 0.0)   # logsumexp(x W^T) − x·W[y], (N,)

    @staticmethod
    def backward(ctx, grad_nll):
        x, weight, targets, lse = ctx.saved_tensors
        rows, cols, dtype, acc = ctx.chunk_rows, ctx.chunk_cols, ctx.dtype, ctx.acc
        xc, wc = x.to(dtype), weight.to(dtype)
        g = torch.where(targets >= 0, grad_nll, 0.0).to(acc)[:, None]   # (N, 1), 0 on ignored rows
        grad_x = torch.zeros_like(x, dtype=acc)
        grad_w = torch.zeros_like(weight, dtype=acc)
        for i in range(0, x.size(0), rows):
            r = slice(i, i + rows)
            # where the one-hot part goes: the tile holding each row's target (−1 for ignored rows) and its
            # column there; −g is added in that tile with scatter_add_ (no boolean indexing: no GPU sync)
            target_tile = targets[r].div(cols, rounding_mode="floor")[:, None]
            target_col, minus_g = (targets[r] % cols)[:, None], -g[r]
            for j in range(0, weight.size(0), cols):
                c = slice(j, j + cols)
                # d nll / d logits = (softmax − onehot(y))·g from recomputed logits, in place: no extra
                # tile-sized buffers. Formed in acc before the cast to the matmul dtype: for a confident
                # token p(y) → 1 and the two parts nearly cancel, so rounding p alone to bf16 (~2^-9) would
                # swamp 1 − p
                d = (xc[r] @ wc[c].T).to(acc).sub_(lse[r, None]).exp_().mul_(g[r])
                d.scatter_add_(1, target_col.clamp(max=d.size(1) - 1),  # clamp: the last tile may be narrower
                               torch.where(target_tile == j // cols, minus_g, 0.0))
                d = d.to(dtype)
                grad_x[r] += d @ wc[c]
                grad_w[c] += d.T @ xc[r]
        return grad_x.to(x.dtype), grad_w.to(weight.dtype), None, None, None
