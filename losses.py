"""
RLRP losses: ℓ, the per-step token NLL, and the loss terms L_DS, L_RL, L_IMP built from it.
README "The method in one screen"; the code below uses the same symbols.

    ℓ ∈ R^{K×B×T},  ℓ[k,b,t] = −log softmax(logits_k)[Y_k[b,t]],  p = exp(−ℓ) the target token's probability

What each step is trained on is two (K, B, T) tensors (step_supervision): the targets Y and the step weights
W, with Σ_k W[k,b,t] = 1 at every position. The paper's recipe is the special case Y_k = y (the next token,
the same at every step) and W[k,b,t] = w_k, one weight vector (Σ_k w_k = 1); per-step targets (a chain
a_1..a_S on an answer span) and level-matched supervision change Y and W per token. The loss terms see
only ℓ, W and (B, T) masks:

    L_DS  = Σ_{b,t} a_t · Σ_k W_k ℓ_k / Σ_{b,t} a_t   over m_valid; a_t = ω on answer tokens, 1 elsewhere
    L_RL  = Σ_k masked_mean(W_k · (1 − p_k^q) / q, m_RL)       q > 0; q = 1: 1 − p_k
    L_IMP = 1/(K−1) · Σ_{k=2..K} masked_mean(relu(ℓ_k − sg(ℓ_1) + margin), m_valid)
    L     = L_DS + λ_rl·L_RL + λ_imp·L_IMP                       λ_rl = 0 on fluency batches

(ω = answer_weight, 1 by default: every valid token counts the same.) ℓ itself is computed from the hidden
states by linear_ce.token_nll, without ever holding the K full-vocabulary logits tensors. Sampled deep
supervision (schedules.StepDraw) computes ℓ at one drawn step per token instead of all K: unbiased estimates
of the same three terms at ~1 + 2f unembeddings per token instead of K.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

from data import pad_chain
from schedules import StepDraw, draw_steps, imp_positions
from tasks import answer_step

WEIGHT_SCHEDULES = ("uniform", "linear", "exp", "last")


# -----------------------------------------------------------------------------
# step weights w and masked means

def step_weights(n_steps, schedule="linear", gamma=0.5, skip=0):
    """
    w ∈ R^K, w_k ≥ 0, Σ_k w_k = 1:
      uniform: w_k = 1/K    linear: w_k ∝ k    exp: w_k ∝ γ^(K−k)    last: w_K = 1
    skip = s puts no weight on the first steps: w_k = 0 for k ≤ s, and the schedule's own weights of steps
    s+1..K renormalised to sum to 1 (linear stays ∝ k, not ∝ k − s). With random K a step may draw K ≤ s;
    then s is taken as K − 1: only step K, the last, is supervised, as it is whenever exactly one step is
    left. (config/defaults.py's CONSTRAINTS require s < n_steps: the configured K always keeps K − s steps.)
    """
    if schedule not in WEIGHT_SCHEDULES:
        raise ValueError(f"weight_schedule must be one of {', '.join(WEIGHT_SCHEDULES)}, got {schedule!r}")
    if n_steps < 1:
        raise ValueError(f"step weights need n_steps >= 1, got {n_steps}")
    if skip < 0:
        raise ValueError(f"weight_skip must be >= 0, got {skip}")
    k = torch.arange(1, n_steps + 1, dtype=torch.float32)
    if schedule == "uniform":
        w = torch.ones(n_steps)                  # v_k = 1
    elif schedule == "linear":
        w = k                                    # v_k = k
    elif schedule == "exp":
        if not gamma > 0:
            raise ValueError(f"the exp weight schedule needs gamma > 0, got {gamma}")
        w = gamma ** (n_steps - k)               # v_k = γ^(K−k)
    else:
        w = (k == n_steps).float()               # v_k = 1[k = K]
    # w_k = v_k · 1[k > s'] / Σ_{j > s'} v_j,  s' = min(skip, K − 1),  v = the schedule's weights above
    w = w * (k > min(skip, n_steps - 1))
    return w / w.sum()


def check_weights(weights, n_steps):
    """Weights must be a length-K probability vector."""
    if weights.shape != (n_steps,):
        raise ValueError(f"step weights must have shape ({n_steps},) to match ℓ's {n_steps} steps, "
                         f"got {tuple(weights.shape)}")
    if (weights < 0).any() or abs(weights.sum().item() - 1.0) > 1e-5:
        raise ValueError(f"step weights must be >= 0 and sum to 1, got sum {weights.sum().item():.6f}")


def weight_grid(weights, nll):
    """W, broadcastable to ℓ (K, B, T): one (K,) vector w (checked, viewed as (K, 1, 1)) or a (K, B, T) grid
    from step_supervision."""
    if weights.dim() == 1:
        check_weights(weights, nll.size(0))
        return weights.to(nll).view(-1, 1, 1)                         # (K, 1, 1)
    if weights.shape != nll.shape:
        raise ValueError(f"per-token step weights must have ℓ's shape {tuple(nll.shape)}, "
                         f"got {tuple(weights.shape)}")
    return weights.to(nll)


def masked_mean(a, mask, count=None):
    """
    The mean of a (..., B, T) over the positions where mask (B, T) is true, per leading index: (...).
    count replaces Σ m when the mean spans more than this batch: the micro-batches of one optimizer step
    on all ranks, so that accumulating micro-batches equals one large batch token for token.
    """
    count = mask.sum() if count is None else count
    # masked_mean(a, m) = Σ a·m / max(Σ m, 1) over the last two dims
    return torch.where(mask, a, 0.0).sum(dim=(-2, -1)) / torch.as_tensor(count).clamp(min=1)


# -----------------------------------------------------------------------------
# what each step is trained on: the targets Y and step weights W, both (K, B, T)

BEYOND_CHAIN = ("stay", "none")       # steps past a chain a_1..a_S: keep a_S, or get no loss
LEVEL_STEPS = ("all", "at", "from")   # which steps an answer of level L is supervised at


def step_supervision(y, n_steps, weights, step_y=None, chain_len=None, level=None, beyond_chain="stay",
                     level_steps="all"):
    """
    (Y (K1, B, T), W): the targets and the step weights for K = n_steps, K1 = max(K, 1) = len(weights)
    (step_weights). Y_k = y, the same next token at every step (the paper's), or with step_y (S, B, T), a
    batch's per-step targets (data.Batch: equal to y outside chain spans), Y_k = step_y[min(k, S)]: step
    k ≤ S is trained on a_k, steps past S on a_S; K = 0 (the plain GPT, one step) trains on y, the final
    answer. chain_len, level (B, T): an answer span's chain length S and level L, 0 elsewhere (data.Batch).
    W is the schedule's w (K1,) itself unless per-token rules apply (allowed_steps), then a (K1, B, T) grid
    with Σ_k W[k,b,t] = 1: the allowed steps keep their w_k, renormalised; a token whose allowed steps all
    have w_k = 0 ('last' when a chain ends before K, weight_skip ≥ L) is supervised at its last allowed step.
    Prompt tokens and fluency rows keep w. An answer whose level is above K has no step to be read at: it
    gets no loss (schedules.readable_at drops it).
    """
    if beyond_chain not in BEYOND_CHAIN:
        raise ValueError(f"beyond_chain must be one of {', '.join(BEYOND_CHAIN)}, got {beyond_chain!r}")
    if level_steps not in LEVEL_STEPS:
        raise ValueError(f"level_steps must be one of {', '.join(LEVEL_STEPS)}, got {level_steps!r}")
    Y = y.expand(max(n_steps, 1), *y.shape) if step_y is None or n_steps == 0 else pad_chain(step_y, n_steps)
    K = weights.numel()
    if n_steps == 0:
        return Y, weights                                                 # the plain GPT: one step
    k = torch.arange(1, K + 1).view(K, 1, 1)                              # (K, 1, 1)
    allowed = allowed_steps(K, y.shape, chain_len=chain_len, level=level, beyond_chain=beyond_chain,
                            level_steps=level_steps)
    if allowed.all():
        return Y, weights                                                 # the schedule's w everywhere
    W = weights.view(K, 1, 1) * allowed                                   # w_k · 1[step k allowed]
    last_allowed = (k * allowed).amax(0)                                  # (B, T)
    W = torch.where((W.sum(0) == 0) & (k == last_allowed), 1.0, W)        # no weight left: the last allowed
    return Y, W / W.sum(0)                                 # W_k = w_k·1[k ok] / Σ_j w_j·1[j ok]


def allowed_steps(K, shape, *, chain_len=None, level=None, beyond_chain="stay", level_steps="all"):
    """(K, B, T) bool: the steps k = 1..K each token may be trained at (step_supervision's per-token rules):
    beyond_chain='none': k ≤ S on a chain's answer span (chain_len = S > 0); level_steps='at': an answer of
    level L (level > 0) at step min(L, K) only; level_steps='from': at the steps k ≥ min(L, K)."""
    k = torch.arange(1, K + 1).view(K, 1, 1)                              # (K, 1, 1)
    allowed = torch.ones(K, *shape, dtype=torch.bool)
    if beyond_chain == "none" and chain_len is not None:
        allowed &= (chain_len == 0) | (k <= chain_len)                    # no loss past a_S
    if level_steps != "all" and level is not None:
        L = answer_step(level, K)                                         # min(L, K)
        allowed &= (level == 0) | (k == L if level_steps == "at" else k >= L)
    return allowed


# -----------------------------------------------------------------------------
# the three loss terms and the objective

def deep_supervision_loss(nll, weights, mask, count=None, token_weight=None):
    """
    (i) deep supervision: every step is trained to predict its target. nll: ℓ (K, B, T); weights: w (K,) or
    W (K, B, T); token_weight: a_t (B, T), None = 1 (count is then Σ a_t·m over the optimizer step).
    """
    W = weight_grid(weights, nll)
    per_token = (W * nll).sum(0)                                       # Σ_k W_k ℓ_k, (B, T)
    if token_weight is not None:
        count = (token_weight * mask).sum() if count is None else count
        per_token = per_token * token_weight
    # L_DS = Σ_{b,t} a_t · Σ_k W_k ℓ_k / Σ_{b,t} a_t over m_valid; with a = 1: Σ_k w_k · masked_mean(ℓ_k)
    return masked_mean(per_token, mask, count)


def soft_rl_loss(nll, weights, mask, q=1.0, count=None):
    """
    (iii) soft RL: p_k = exp(−ℓ_k) = p_k(y_t) is the exact expected reward of sampling from softmax(logits_k)
    with reward 1[token = y_t], so at q = 1 L_RL is the expected loss 1 − p, with gradient −∇p = −p·∇log p.
    The exponent q reweights it: ∂L_RL/∂ℓ = p^q per token, CE's gradient weighted by p^q, from CE (q → 0,
    where (1 − p^q)/q → ℓ too) to the paper's (q = 1). With per-step targets, y_t is step k's target.
    """
    if not q > 0:
        raise ValueError(f"rl_q must be > 0 (the soft RL loss divides by it; q → 0 is plain CE), got {q}")
    W = weight_grid(weights, nll)
    # (1 − p^q)/q differs from −p^q/q (reward maximisation) by the constant 1/q, so the two have the same
    # gradient; the constant makes the logged value ≥ 0 and 0 at p = 1. expm1 keeps 1 − p^q exact as p^q → 1.
    expected_loss = -torch.expm1(-q * nll) / q                         # (1 − p_k^q) / q, (K, B, T)
    # L_RL = Σ_k masked_mean(W_k · (1 − p_k^q) / q, m_RL)
    return masked_mean((W * expected_loss).sum(0), mask, count)


def improvement_penalty(nll, mask, margin=0.0, count=None):
    """
    Later steps must not be worse than step 1; 0 when K ≤ 1. sg = stop-gradient: the penalty pushes later
    steps down, never step 1 up. It compares ℓ_k and ℓ_1 of the same label: with per-step targets the labels
    differ, and train.py requires λ_imp = 0.
    """
    if nll.size(0) <= 1:
        return nll.new_zeros(())
    excess = F.relu(nll[1:] - nll[:1].detach() + margin)   # relu(ℓ_k − sg(ℓ_1) + margin), (K−1, B, T)
    # L_IMP = 1/(K−1) · Σ_{k=2..K} masked_mean(relu(ℓ_k − sg(ℓ_1) + margin), m_valid)
    return masked_mean(excess, mask, count).mean()


# -----------------------------------------------------------------------------
# sampled deep supervision: ℓ at one drawn step per token, and at a few (1, j) pairs for L_IMP

def sampled_unembeds(n_steps, n_positions, imp_fraction):
    """Unembeddings per token a sampled step computes: (N + 2M) / N ≈ 1 + 2f (GPT.flops_per_token's)."""
    return (n_positions + 2 * imp_positions(n_steps, n_positions, imp_fraction)) / n_positions


def sampled_improvement_penalty(nll_1, nll_j, valid, n_positions, margin=0.0, count=None):
    """
    L_IMP estimated on M positions pos_m drawn uniformly from the batch's N = B·T, each with j_m ~ U{2..K}:
      L̂_IMP = (N/M) · Σ_m 1[valid_m] · relu(ℓ_{j_m} − sg(ℓ_1) + margin) / Σ m_valid
    Each position is in the sample with probability M/N, and E_j[relu(ℓ_j − ...)] = 1/(K−1) Σ_{k≥2} relu(...),
    so E[L̂_IMP] = L_IMP. nll_1, nll_j, valid: (M,) at pos_m; count: Σ m_valid (of the optimizer step).
    """
    M = nll_1.numel()
    if M == 0:
        return nll_1.new_zeros(())
    excess = F.relu(nll_j - nll_1.detach() + margin)                       # (M,)
    count = valid.sum() if count is None else count
    return torch.where(valid, excess, 0.0).sum() * (n_positions / M) / torch.as_tensor(count).clamp(min=1)


def sampled_terms(nll, draw, masks, counts, *, n_ds, token_weight, q, margin):
    """
    (L̂_DS, L̂_RL, L̂_IMP, logged ℓ_k sums, drawn counts) from ℓ at draw.rows(): nll (N + 2M,).
    E_{k_t ~ W_t}[ℓ[k_t, t]] = Σ_k W_k ℓ_k, so one drawn ℓ per token, given weight 1, is an unbiased estimate
    of L_DS and L_RL (their W-weighted sums over steps); L_IMP as sampled_improvement_penalty. The estimates
    are linear in the drawn ℓ, so their gradients are unbiased too. The logged ℓ_k: Σ over the valid tokens
    that drew step k, and how many did (both / Σ m_valid: they add up over micro-batches and ranks).
    masks: (m_valid, m_RL); counts: Counts; n_ds: Σ a_t over m_valid (rlrp_loss).
    """
    m_valid, m_rl = masks
    N, M = m_valid.numel(), len(draw.imp_pos)
    drawn = nll[:N].view(1, *m_valid.shape)                            # ℓ[k_t, b, t], (1, B, T)
    one = torch.ones(1)                                                # the drawn step's weight
    l_ds = deep_supervision_loss(drawn, one, m_valid, n_ds, token_weight)
    l_rl = soft_rl_loss(drawn, one, m_rl, q=q, count=counts.rl)
    l_imp = sampled_improvement_penalty(nll[N + M:], nll[N:N + M], m_valid.flatten()[draw.imp_pos], N,
                                        margin=margin, count=counts.valid)
    hit = F.one_hot(draw.k - 1, draw.n_steps).movedim(-1, 0).bool()   # 1[k_t = k], (K1, B, T)
    logged = (masked_mean(hit * drawn.detach(), m_valid, counts.valid),
              masked_mean(hit.float(), m_valid, counts.valid))
    return l_ds, l_rl, l_imp, *logged


def loss_masks(targets, answer_mask, rl_answer_only=True, rl_rows=None):
    """(m_valid, m_RL), both (B, T) bool: m_valid = (y ≠ −1); m_RL = the answer mask if rl_answer_only,
    else m_valid; rl_rows (B,) bool: soft RL only on these rows (a mixed batch's reasoning rows)."""
    m_valid = targets >= 0
    m_rl = answer_mask & m_valid if rl_answer_only else m_valid
    return m_valid, (m_rl if rl_rows is None else m_rl & rl_rows[:, None])


class Counts(NamedTuple):
    """The loss terms' denominators: token counts summed over every micro-batch of an optimizer step on every
    rank, so that accumulated micro-batches (and DDP) equal one large batch token for token (masked_mean)."""
    valid: torch.Tensor    # Σ m_valid
    rl: torch.Tensor       # Σ m_RL
    answer: torch.Tensor   # Σ answer_mask · m_valid

    @staticmethod
    def of(batches, rl_answer_only=True):
        """The three counts of these batches as one int64 tensor (3,), (valid, rl, answer): exact, on every
        device, and one all-reduce sums them over ranks (train.step_counts)."""
        counts = torch.zeros(3, dtype=torch.int64)
        for b in batches:
            m_valid, m_rl = loss_masks(b.y, b.answer_mask, rl_answer_only, b.rl_rows)
            counts += torch.stack([m_valid.sum(), m_rl.sum(), (b.answer_mask & m_valid).sum()])
        return counts


def rlrp_loss(nll, targets, answer_mask, kind, weights, *, lambda_rl=0.0, lambda_imp=0.0, rl_answer_only=True,
              margin=0.0, rl_q=1.0, answer_weight=1.0, counts=None, rl_rows=None, draw=None):
    """
    (ii) data-aware routing: the objective for one batch by its kind.
      fluency:   L = L_DS + λ_imp·L_IMP
      reasoning: L = L_DS + λ_rl·L_RL + λ_imp·L_IMP, L_RL on answer spans if rl_answer_only
    with L_RL = Σ_k masked_mean(W_k·(1 − p_k^q) / q, m_RL), p = exp(−ℓ), q = rl_q > 0 (see soft_rl_loss).
    Every term is always computed and switched by its weight, never by a branch on tensor values,
    so every DDP rank builds the same graph. Returns (loss, parts) with parts detached for logging.
    nll: (K, B, T); targets: (B, T) with −1 = ignored; answer_mask: (B, T) bool; kind: str; weights: w (K,)
    or W (K, B, T) (step_supervision); answer_weight: ω, L_DS's weight a_t of answer tokens (others 1).
    counts: the optimizer step's Counts (see masked_mean), None = this batch's.
    rl_rows: (B,) bool, the rows soft RL applies to (a mixed batch's reasoning rows; None = every row).
    draw: a StepDraw (sampled deep supervision): nll is then ℓ at draw.rows() only, (N + 2M,), the terms are
    its unbiased estimates (sampled_terms), and parts["nll_k"] is ℓ_k summed over the tokens that drew step k,
    with parts["drawn_k"] their share (train.py divides the two).
    """
    if kind not in ("fluency", "reasoning"):
        raise ValueError(f"batch kind must be 'fluency' or 'reasoning', got {kind!r}")
    if not answer_weight > 0:
        raise ValueError(f"answer_weight must be > 0, got {answer_weight}")
    m_valid, m_rl = loss_masks(targets, answer_mask, rl_answer_only, rl_rows)
    if counts is None:
        m_answer = answer_mask & m_valid
        counts = Counts(valid=m_valid.sum(), rl=m_rl.sum(), answer=m_answer.sum())
    token_weight = None if answer_weight == 1 else torch.where(answer_mask, answer_weight, 1.0).to(nll)
    n_ds = counts.valid + (answer_weight - 1) * counts.answer           # Σ a_t over m_valid
    if draw is None:
        l_ds = deep_supervision_loss(nll, weights, m_valid, n_ds, token_weight)
        l_rl = soft_rl_loss(nll, weights, m_rl, q=rl_q, count=counts.rl)
        l_imp = improvement_penalty(nll, m_valid, margin, counts.valid)
        logged = {"nll_k": masked_mean(nll.detach(), m_valid, counts.valid)}   # (K,) per-step token NLL
    else:
        l_ds, l_rl, l_imp, nll_k, drawn_k = sampled_terms(nll, draw, (m_valid, m_rl), counts, n_ds=n_ds,
                                                          token_weight=token_weight, q=rl_q, margin=margin)
        logged = {"nll_k": nll_k, "drawn_k": drawn_k}
    lam_rl = lambda_rl if kind == "reasoning" else 0.0
    loss = l_ds + lam_rl * l_rl + lambda_imp * l_imp                   # L = L_DS + λ_rl·L_RL + λ_imp·L_IMP
    return loss, {"ds": l_ds.detach(), "rl": l_rl.detach(), "imp": l_imp.detach(), **logged}


# -----------------------------------------------------------------------------
# one micro-batch's Supervision (train.Objective composes its loss from the model's parts)

class ObjectiveConfig(NamedTuple):
    """The objective's keys (config/defaults.py), by name."""
    weight_schedule: str = "linear"
    weight_gamma: float = 0.5
    weight_skip: int = 0
    beyond_chain: str = "stay"
    level_steps: str = "all"
    lambda_rl: float = 0.0
    lambda_imp: float = 0.0
    rl_answer_only: bool = True
    imp_margin: float = 0.0
    rl_q: float = 1.0
    answer_weight: float = 1.0
    sampled_supervision: bool = False
    imp_fraction: float = 0.125
    progressive_alpha: float = 0.0
    grad_steps: int = 0
    readout_grad: str = "all"

    @classmethod
    def of(cls, c):
        return cls(**{key: c[key] for key in cls._fields})


class Supervision(NamedTuple):
    """
    What each step of one micro-batch is trained on (supervise). The paper's recipe is its plainest case:
    Y_k = y and W_k = w_k, no draw, no second pass.
      targets  Y (K1, B, T), K1 = max(K, 1) rows, one more for the progressive pass: its step n+k's target
      weights  W: w (K1,) or a (K1, B, T) grid (step_supervision)
      n_steps  K, the steps the head runs
      draw     a StepDraw (sampled deep supervision), else None: ℓ at every (k, b, t)
      progressive  (n, k) of the progressive loss's second head pass, else None
      second_weights  its W (1, B, T): 1 where step n+k may be trained (allowed_steps: level_steps...), else 0
    """
    targets: torch.Tensor
    weights: torch.Tensor
    n_steps: int
    draw: StepDraw = None
    progressive: tuple = None
    second_weights: torch.Tensor = None

    def rows(self):
        """Sampled: the (k, b, t) whose ℓ is computed, as indices into ℓ flattened over (K1(+1), B, T): the
        draw's, then every position of the progressive pass's row."""
        N = self.targets[0].numel()
        second = torch.arange(N, device=self.draw.k.device) + (len(self.targets) - 1) * N
        return torch.cat([self.draw.rows(), second]) if self.progressive else self.draw.rows()

    def split(self, nll):
        """ℓ -> (ℓ of the K1 steps or of the draw's rows, ℓ (1, B, T) of the progressive pass or None)."""
        if not self.progressive:
            return nll, None
        second = nll[-self.targets[0].numel():] if self.draw is not None else nll[-1:]
        return nll[:len(nll) - len(second)], second.view(1, *self.targets.shape[1:])

    def to(self, device):
        """On the device. The paper's Y_k = y is a view of y with stride 0 over the steps: one (B, T) copy."""
        Y = self.targets
        Y = Y[0].to(device).expand_as(Y) if Y.stride(0) == 0 else Y.to(device)
        move = lambda t: None if t is None else t.to(device)
        return self._replace(targets=Y, weights=move(self.weights), draw=move(self.draw),
                             second_weights=move(self.second_weights))


def supervise(b, n_steps, cfg, progressive=None, generator=None):
    """The Supervision of Batch b (on the CPU) at K = n_steps under the ObjectiveConfig cfg: Y and W
    (step_supervision with the schedule's w), the sampled draw from `generator`, and the progressive pass
    (n, k), whose target and allowed tokens are step n+k's."""
    w = step_weights(max(n_steps, 1), cfg.weight_schedule, cfg.weight_gamma, cfg.weight_skip)
    Y, W = step_supervision(b.y, n_steps, w, step_y=b.step_y, chain_len=b.chain_len, level=b.level,
                            beyond_chain=cfg.beyond_chain, level_steps=cfg.level_steps)
    draw = draw_steps(W, n_steps, b.y.shape, cfg.imp_fraction, generator) if cfg.sampled_supervision else None
    second = None
    if progressive:   # the second pass's step n + k: its target Y_{n+k}, trained where step n + k may be
        step = sum(progressive)
        Y = torch.cat([Y, Y[step - 1:step]])
        allowed = allowed_steps(n_steps, b.y.shape, chain_len=b.chain_len, level=b.level,
                                beyond_chain=cfg.beyond_chain, level_steps=cfg.level_steps)
        second = allowed[step - 1:step].float()                        # (1, B, T)
    return Supervision(targets=Y, weights=W, n_steps=n_steps, draw=draw, progressive=progressive,
                       second_weights=second)
