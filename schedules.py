"""
What optimizer step `it` trains on: its kind (routing (ii)), its learning rate, K, the progressive loss's
draw, dropout's seed, the curriculum's level, and this rank's micro-batches.

Pure functions of the seed and the iteration: the same on every rank and on resume, so nothing of them is
saved. The one exception is a threshold curriculum's switches, found while training: the checkpoint holds
them.
"""

import math

import numpy as np
import torch

import data
from configurator import ConfigError
from evaluate import evaluate_reasoning


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
    rng = np.random.default_rng([c["seed"], it])
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


def micro_batch_seed(c, index, *stream):
    """A seed that is a function of (seed, global micro-batch index[, stream]): 1 process and W draw the same
    for the same micro-batch, and resume needs no saved RNG state."""
    return int(np.random.SeedSequence([c["seed"], index, *stream]).generate_state(1)[0])


def seed_micro_batch(c, index):
    """Dropout's RNG: the global one, seeded by (seed, global micro-batch index)."""
    torch.manual_seed(micro_batch_seed(c, index))


SAMPLING_STREAM = 3  # sampled deep supervision's draws: a stream of their own, apart from dropout's


def sampling_generator(c, index):
    """Sampled deep supervision's CPU generator for one micro-batch, seeded by (seed, index, its stream)."""
    return torch.Generator().manual_seed(micro_batch_seed(c, index, SAMPLING_STREAM))


PROGRESSIVE_STREAM = 2  # the progressive loss's draws: a stream of their own, apart from n_steps_at's


def progressive_steps(it, c, K):
    """
    (n, k) of the progressive loss (Bansal et al. 2022) at optimizer step `it`, a function of (seed, it):
    n ~ U{0..K−1} steps run without gradient, then k ~ U{1..K−n} with gradient. None when it is off
    (progressive_alpha = 0) or K = 0.
    """
    if not c["progressive_alpha"] or K == 0:
        return None
    rng = np.random.default_rng([c["seed"], it, PROGRESSIVE_STREAM])
    n = int(rng.integers(0, K))
    return n, int(rng.integers(1, K - n + 1))


def curriculum_switches(c):
    """curriculum_iters as ascending ints: the iterations where the next level joins ([] = no curriculum)."""
    return [int(s) for s in c["curriculum_iters"].split(",")] if c["curriculum_iters"] else []


def curriculum_level(it, switches, levels):
    """A curriculum's highest level at optimizer step `it`. levels: the data's distinct levels
    L_1 < ... < L_n; switches: the iterations s_1 < ... where the next level joined (curriculum_iters, or
    those a threshold curriculum found so far): levels <= L_1 before s_1, <= L_2 from s_1, ..."""
    return levels[sum(it >= s for s in switches)]


def answer_step(c, level):
    """The step an answer of this level is read at: its level with per-step targets or level-matched
    supervision (capped at K), else step K (1 for the plain GPT's one readout)."""
    K = max(c["n_steps"], 1)
    return min(level, K) if c["step_targets"] != "final" or c["level_steps"] != "all" else K


class Curriculum:
    """A curriculum over the reasoning levels L_1 < ... < L_n (README "Data"): the next level joins at each
    switch, the given curriculum_iters or, with curriculum_threshold, the checks where the highest level so
    far is learned on its training-side slice. The found switches are saved in the checkpoint (saved)."""

    EXAMPLES = 200   # the training-side slice a threshold curriculum scores, per check

    def __init__(self, c, levels, saved=()):
        self.c, self.levels, self.on = c, levels, bool(c["curriculum_iters"] or c["curriculum_threshold"])
        self.switches = curriculum_switches(c) or list(saved)
        self.slices = {}   # level -> this rank's share of its slice, built once: the same examples each check
        if c["curriculum_iters"] and len(self.switches) != len(levels) - 1:
            raise ConfigError(f"curriculum_iters={c['curriculum_iters']!r} has {len(self.switches)} "
                              f"iterations; the reasoning data's levels {levels} need {len(levels) - 1}")
        if c["curriculum_threshold"] and len(levels) < 2:
            raise ConfigError(f"curriculum_threshold needs reasoning data of two levels or more, got levels "
                              f"{levels}")

    def level(self, it):
        """The highest reasoning level trained at step `it`; 0 = every level (no curriculum)."""
        return curriculum_level(it, self.switches, self.levels) if self.on else 0

    def check(self, it, model, reasoning, rank, world, device):
        """After iteration `it`: the next level joins from `it` on when the exact match of the highest level
        so far on its slice, read at its answer step, reaches curriculum_threshold; returns what joined, or
        None. Every rank scores its share and all-reduce: all decide alike."""
        c, level = self.c, self.level(it)
        if level == self.levels[-1]:
            return None
        if level not in self.slices:
            batches = reasoning.slice_batches(level, c["batch_size"], self.EXAMPLES)
            self.slices[level] = [b.to(device) for b in batches[rank::world]]
        em = evaluate_reasoning(model, self.slices[level], c["n_steps"], self.EXAMPLES,
                                world)["answer_exact_match"]
        step = answer_step(c, level)
        if em[step - 1] < c["curriculum_threshold"]:
            return None
        self.switches.append(it)
        joined = self.levels[self.levels.index(level) + 1]
        return (f"curriculum: level {joined} joins at iter {it} (level {level}: exact match "
                f"{em[step - 1]:.2f} at step {step} on its training slice)")


# -----------------------------------------------------------------------------
# the micro-batches

def micro_batch_index(step: int, micro_step: int, rank: int, world_size: int, grad_accum: int) -> int:
    """Global index of a micro-batch; grad_accum = micro-batches per optimizer step over all ranks.
    Rank r of W takes r, r+W, ... within the step, so the examples do not depend on W."""
    if grad_accum % world_size:
        raise ValueError(f"gradient_accumulation_steps={grad_accum} must be divisible by the world size "
                         f"{world_size}")
    return step * grad_accum + micro_step * world_size + rank


def cat_batches(batches, kind):
    """Rows of several batches as one (answer ids stay per batch: training does not use them). Batches of
    both kinds: rl_rows marks the reasoning rows, so soft RL stays on reasoning data (routing='mixed').
    Per-step targets: a batch without them has y at every step; a shorter chain keeps its last step's."""
    cat = lambda field: torch.cat([getattr(b, field) for b in batches])
    batch = data.Batch(cat("x"), cat("y"), kind, cat("answer_mask"), cat("answer_id"))
    if len({b.kind for b in batches}) > 1:
        batch.rl_rows = torch.cat([torch.full((len(b.y),), b.kind == "reasoning") for b in batches])
    zeros = lambda b, t: t if t is not None else torch.zeros_like(b.y)
    if any(b.level is not None for b in batches):
        batch.level = torch.cat([zeros(b, b.level) for b in batches])
    if any(b.step_y is not None for b in batches):
        steps = [b.step_y if b.step_y is not None else b.y[None] for b in batches]
        S = max(len(s) for s in steps)
        batch.step_y = torch.cat([s[[min(k, len(s) - 1) for k in range(S)]] for s in steps], dim=1)
        batch.chain_len = torch.cat([zeros(b, b.chain_len) for b in batches])
    return batch


def micro_batches(it, kind, c, fluency, reasoning, rank, world, level=0):
    """This rank's micro-batches of optimizer step `it` as (global micro-batch index, Batch) pairs; level > 0:
    a curriculum's highest level now."""
    B, G = c["batch_size"], c["gradient_accumulation_steps"]
    indices = [micro_batch_index(it, m, rank, world, G) for m in range(G // world)]
    if c["routing"] == "mixed":
        r = min(B - 1, max(1, round(B * c["reasoning_fraction"])))   # reasoning rows per micro-batch
        mixed = lambda i: cat_batches([fluency.get_batch("train", i, B - r),
                                       reasoning.get_batch(i, r, level)], "reasoning")
        return [(i, mixed(i)) for i in indices]
    if kind == "reasoning":
        return [(i, reasoning.get_batch(i, B, level)) for i in indices]
    return [(i, fluency.get_batch("train", i, B)) for i in indices]
