"""
What optimizer step `it` trains on (step_plan): its kind (routing (ii)), its learning rate, K, the progressive
loss's draw, the curriculum's level; and per micro-batch: dropout's seed, sampled supervision's draw
(StepDraw), this rank's micro-batches. The run's random draws come from named streams (STREAMS).

Pure functions of the seed and the iteration: the same on every rank and on resume, so nothing of them is
saved. The one exception is a threshold curriculum's switches, found while training: the checkpoint holds
them.
"""

import math
from dataclasses import replace
from typing import NamedTuple

import numpy as np
import torch

from configurator import ConfigError
from data import cat_batches
from tasks import answer_step


class Router:
    """Step s is a reasoning step iff floor((s+1) rho) > floor(s rho):
    rho spread evenly, the same on every rank."""

    def __init__(self, reasoning_fraction: float):
        if not 0 <= reasoning_fraction <= 1:
            raise ValueError(f"reasoning_fraction={reasoning_fraction} must be in [0, 1]")
        self.rho = reasoning_fraction

    def kind(self, step: int) -> str:
        return "reasoning" if math.floor((step + 1) * self.rho) > math.floor(step * self.rho) else "fluency"


def get_lr(it, c):
    """Linear warmup, cosine decay to min_lr at lr_decay_iters; no division by zero for any setting."""
    lr, min_lr, warmup, decay_end = c["learning_rate"], c["min_lr"], c["warmup_iters"], c["lr_decay_iters"]
    if not c["decay_lr"]:
        return lr
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it >= decay_end:
        return min_lr
    ratio = (it - warmup) / max(1, decay_end - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def n_steps_at(it, c):
    """
    K for optimizer step `it`, a function of (seed, it) alone: the same on every rank and on resume.
      fixed:     K
      uniform:   K_it ~ U{1..2K−1}                                                    (mean K)
      lognormal: τ ~ N(log(K−1) − σ²/2, σ), K_it = min(Poisson(e^τ) + 1, n_steps_max)  (σ = 1/2)
    'lognormal' is Huginn's log-normal Poisson (Geiping et al. 2025) with r̄ = K − 1: E[e^τ] = r̄, so
    E[K_it] = K before the cap (Huginn's formula with r̄ = K has mean K + 1). Its median is <= K and its right
    tail is heavy. The cap (n_steps_max, 0 = 4K) clips ~0.1% of draws and lowers the mean by <0.1% for
    K = 2..32; a cap of 2K−1, uniform's largest K, would clip 5–10% of them and lower the mean 3–8%.
    K = 1 always draws 1.
    """
    K = c["n_steps"]
    if c["n_steps_dist"] == "fixed" or K == 0:
        return K
    rng = numpy_rng(c, it, "n_steps")
    if c["n_steps_dist"] == "uniform":
        return int(rng.integers(1, 2 * K))
    sigma = 0.5                                                                  # Huginn's
    rate = (K - 1) * math.exp(sigma * rng.standard_normal() - sigma ** 2 / 2)   # e^τ, without log(0) at K = 1
    return min(int(rng.poisson(rate)) + 1, max_n_steps(c))


def max_n_steps(c):
    """The largest K n_steps_at can draw: K, 2K−1 ('uniform') or the cap n_steps_max ('lognormal',
    0 = 4K)."""
    K, dist = c["n_steps"], c["n_steps_dist"]
    if dist == "fixed" or K == 0:
        return K
    return 2 * K - 1 if dist == "uniform" else c["n_steps_max"] or 4 * K


# The run's random draws, each a pure function of (seed, key, stream): key is the optimizer step `it` for a
# step's draws, the global micro-batch index for a micro-batch's, so 1 process and W draw the same and resume
# needs no saved RNG state; a stream keeps one kind of draw apart from another with the same key. The ids are
# those the draws have always had: renumbering one would change every run.
STREAMS = {"n_steps": (), "progressive": (2,), "dropout": (), "sampled": (3,)}


def numpy_rng(c, key, stream):
    """A numpy Generator for (seed, key, stream)."""
    return np.random.default_rng([c["seed"], key, *STREAMS[stream]])


def torch_seed(c, key, stream):
    """A torch seed for (seed, key, stream)."""
    return int(np.random.SeedSequence([c["seed"], key, *STREAMS[stream]]).generate_state(1)[0])


def seed_micro_batch(c, index):
    """Dropout's RNG: the global one, seeded by (seed, global micro-batch index)."""
    torch.manual_seed(torch_seed(c, index, "dropout"))


def sampling_generator(c, index):
    """Sampled deep supervision's CPU generator for one micro-batch."""
    return torch.Generator().manual_seed(torch_seed(c, index, "sampled"))


def progressive_steps(it, c, K):
    """
    (n, k) of the progressive loss (Bansal et al. 2022) at optimizer step `it`, a function of (seed, it):
    n ~ U{0..K−1} steps run without gradient, then k ~ U{1..K−n} with gradient. None when it is off
    (progressive_alpha = 0) or K = 0.
    """
    if not c["progressive_alpha"] or K == 0:
        return None
    rng = numpy_rng(c, it, "progressive")
    n = int(rng.integers(0, K))
    return n, int(rng.integers(1, K - n + 1))


class StepPlan(NamedTuple):
    """What one optimizer step trains with (step_plan)."""
    kind: str            # 'fluency' | 'reasoning' (routing (ii); 'mixed': 'reasoning', rl_rows decide)
    n_steps: int         # K
    lr: float
    progressive: tuple   # (n, k) of the progressive loss, or None
    level: int           # a curriculum's highest level now; 0 = every level


def step_plan(it, c, router, curriculum):
    """The StepPlan of optimizer step `it`: a function of (seed, it) and the curriculum's switches."""
    kind = "reasoning" if c["routing"] == "mixed" else router.kind(it)
    K = n_steps_at(it, c)
    return StepPlan(kind=kind, n_steps=K, lr=get_lr(it, c), progressive=progressive_steps(it, c, K),
                    level=curriculum.level(it))


# -----------------------------------------------------------------------------
# sampled deep supervision's draw: ℓ at one drawn step per token, and at a few (1, j) pairs for L_IMP

def imp_positions(n_steps, n_positions, imp_fraction):
    """M = ⌈f·B·T⌉, the positions L_IMP is estimated on; 0 when K ≤ 1 (no step 2 to compare)."""
    return math.ceil(imp_fraction * n_positions) if n_steps > 1 else 0


class StepDraw(NamedTuple):
    """
    Which ℓ[k, b, t] a sampled step computes. k (B, T): the step drawn at every position, k_t ~ W[:, b, t];
    imp_pos (M,): positions b·T + t drawn uniformly without replacement from all B·T (a fixed M whatever the
    padding: fixed shapes, no boolean indexing); imp_j (M,): their step j ~ U{2..K}.
    """
    k: torch.Tensor
    imp_pos: torch.Tensor
    imp_j: torch.Tensor
    n_steps: int            # K1 = max(K, 1), the steps W spans

    def rows(self):
        """(N + 2M,) indices into ℓ flattened over (K1, B, T), N = B·T: ℓ[k_t, t] at every t, then
        ℓ[j_m, pos_m], then ℓ[1, pos_m]. One token_nll computes them all (train.Objective.step_nll)."""
        N = self.k.numel()
        return torch.cat([(self.k.flatten() - 1) * N + torch.arange(N, device=self.k.device),
                          (self.imp_j - 1) * N + self.imp_pos, self.imp_pos])

    def to(self, device):
        return self._replace(k=self.k.to(device), imp_pos=self.imp_pos.to(device),
                             imp_j=self.imp_j.to(device))


def draw_steps(weights, n_steps, shape, imp_fraction, generator):
    """
    StepDraw for K = n_steps, weights w (K1,) or W (K1, B, T) (step_supervision), shape (B, T), from a CPU
    generator (train.py seeds it by (seed, global micro-batch index): 1 and W processes draw the same).
    k_t is the inverse CDF of one uniform u_t: k_t = 1 + #{k : Σ_{j≤k} W_j ≤ u_t}, so P(k_t = k) = W[k, b, t]
    and a step of weight 0 is never drawn. The penalty's pairs are drawn on their own, not reweighted from
    the k_t draw: that would need weights 1/((K−1)·f·w_k), undefined where w_k = 0 ('last', weight_skip).
    Their ℓ_1 and ℓ_j are computed even where k_t already has one: fixed shapes, for 2f unembeddings instead
    of a bit less.
    """
    B, T = shape
    W = weights.view(-1, 1, 1).expand(-1, B, T) if weights.dim() == 1 else weights    # (K1, B, T)
    cdf = W.float().cumsum(0).movedim(0, -1)                                          # (B, T, K1)
    cdf = (cdf / cdf[..., -1:]).contiguous()        # its last entry exactly 1: u < 1 never passes it
    u = torch.rand(B, T, 1, generator=generator)
    k = torch.searchsorted(cdf, u, right=True).squeeze(-1) + 1                        # k_t, (B, T)
    M = imp_positions(n_steps, B * T, imp_fraction)
    pos = torch.randperm(B * T, generator=generator)[:M]
    j = torch.randint(2, n_steps + 1, (M,), generator=generator) if M else torch.zeros(0, dtype=torch.long)
    return StepDraw(k=k, imp_pos=pos, imp_j=j, n_steps=W.size(0))


# -----------------------------------------------------------------------------
# the curriculum

def curriculum_switches(c):
    """curriculum_iters as ascending ints: the iterations where the next level joins ([] = no curriculum)."""
    return [int(s) for s in c["curriculum_iters"].split(",")] if c["curriculum_iters"] else []


def curriculum_level(it, switches, levels):
    """A curriculum's highest level at optimizer step `it`. levels: the data's distinct levels
    L_1 < ... < L_n; switches: the iterations s_1 < ... where the next level joined (curriculum_iters, or
    those a threshold curriculum found so far): levels <= L_1 before s_1, <= L_2 from s_1, ..."""
    return levels[sum(it >= s for s in switches)]


class Curriculum:
    """A curriculum over the reasoning levels L_1 < ... < L_n (README "Data"): the next level joins at each
    switch, the given curriculum_iters or, with curriculum_threshold, the checks where the highest level so
    far is learned on its training-side slice. The found switches are saved in the checkpoint (saved)."""

    EXAMPLES = 200   # the training-side slice a threshold curriculum scores, per check

    def __init__(self, c, levels, saved=()):
        self.c, self.levels, self.on = c, levels, bool(c["curriculum_iters"] or c["curriculum_threshold"])
        self.switches = curriculum_switches(c) or list(saved)
        key = "curriculum_iters" if c["curriculum_iters"] else "curriculum_threshold"
        if self.on and len(levels) < 2:
            has = (f"only level {levels[0]}" if levels else
                   'no levels: no row has a "level" (or "step_answers", whose length is its level)')
            raise ConfigError(f"{key} steps through the reasoning data's levels, and the data has {has}")
        if c["curriculum_iters"] and len(self.switches) != len(levels) - 1:
            raise ConfigError(f"curriculum_iters={c['curriculum_iters']!r} has {len(self.switches)} "
                              f"iterations; the reasoning data's levels {levels} need {len(levels) - 1}")

    def level(self, it):
        """The highest reasoning level trained at step `it`; 0 = every level (no curriculum)."""
        return curriculum_level(it, self.switches, self.levels) if self.on else 0

    def read_step(self, level):
        """The step an answer of this level is read at: its level (capped at K) with per-step targets or
        level-matched supervision, else step K (1 for the plain GPT's one readout)."""
        c, K = self.c, max(self.c["n_steps"], 1)
        return answer_step(level, K) if c["step_targets"] != "final" or c["level_steps"] != "all" else K

    def check(self, it, exact_match):
        """After iteration `it`: the next level joins from `it` on when the exact match of the highest level
        so far, read at its step, reaches curriculum_threshold; returns what joined, or None.
        exact_match(level): that level's exact match per step on its training-side slice (train.py scores it
        on every rank: all decide alike)."""
        level = self.level(it)
        if level == self.levels[-1]:
            return None
        step = self.read_step(level)
        em = exact_match(level)[step - 1]
        if em < self.c["curriculum_threshold"]:
            return None
        self.switches.append(it)
        joined = self.levels[self.levels.index(level) + 1]
        return (f"curriculum: level {joined} joins at iter {it} (level {level}: exact match "
                f"{em:.2f} at step {step} on its training slice)")


# -----------------------------------------------------------------------------
# the micro-batches

def micro_batch_index(step: int, micro_step: int, rank: int, world_size: int, grad_accum: int) -> int:
    """Global index of a micro-batch; grad_accum = micro-batches per optimizer step over all ranks.
    Rank r of W takes r, r+W, ... within the step, so the examples do not depend on W."""
    if grad_accum % world_size:
        raise ValueError(f"gradient_accumulation_steps={grad_accum} must be divisible by the world size "
                         f"{world_size}")
    return step * grad_accum + micro_step * world_size + rank


def micro_batches(it, c, sources, *, kind, n_steps, level=0, rank=0, world=1):
    """This rank's micro-batches of optimizer step `it` as (global micro-batch index, Batch) pairs. sources:
    (FluencyData, ReasoningData), either None when unused; kind and n_steps (K): the step's; level > 0: a
    curriculum's highest level now. Level-matched supervision: no loss on an answer above K (readable)."""
    fluency, reasoning = sources
    B, G = c["batch_size"], c["gradient_accumulation_steps"]
    indices = [micro_batch_index(it, m, rank, world, G) for m in range(G // world)]
    readable = lambda b: readable_at(b, n_steps) if c["level_steps"] != "all" and n_steps else b
    if c["routing"] == "mixed":
        r = min(B - 1, max(1, round(B * c["reasoning_fraction"])))   # reasoning rows per micro-batch
        mixed = lambda i: cat_batches([fluency.get_batch("train", i, B - r),
                                       readable(reasoning.get_batch(i, r, level))], "reasoning")
        return [(i, mixed(i)) for i in indices]
    if kind == "reasoning":
        return [(i, readable(reasoning.get_batch(i, B, level))) for i in indices]
    return [(i, fluency.get_batch("train", i, B)) for i in indices]


def readable_at(b, n_steps):
    """Batch b without a loss on the answers whose level L is above K = n_steps (y = -1 there: out of every
    mask and count). Level-matched supervision reads an answer at step L; at a drawn K < L no step may, and
    reading it at step K would train a K-step shortcut to an L-step answer."""
    drop = b.level > n_steps if b.level is not None else None
    if drop is None or not drop.any():
        return b
    step_y = None if b.step_y is None else b.step_y.masked_fill(drop, -1)
    return replace(b, y=b.y.masked_fill(drop, -1), answer_mask=b.answer_mask & ~drop,
                   answer_id=b.answer_id.masked_fill(drop, -1), step_y=step_y)
