"""
The schedules: the learning rate, K, dropout's seed and the curriculum's level of every optimizer step, from
(seed, iteration).

Pure functions of the seed and the iteration: the same on every rank and on resume, so nothing of them is
saved. The one exception is a threshold curriculum's switches, found while training: the checkpoint holds them.
"""

import math

import numpy as np
import torch


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


def train_steps(it, c):
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
    return min(int(rng.poisson(rate)) + 1, max_train_steps(c))


def max_train_steps(c):
    """The largest K train_steps can draw: K, 2K−1 ('uniform') or the cap n_steps_max ('lognormal',
    0 = 4K)."""
    K, dist = c["n_steps"], c["n_steps_dist"]
    if dist == "fixed" or K == 0:
        return K
    return 2 * K - 1 if dist == "uniform" else c["n_steps_max"] or 4 * K


def seed_micro_batch(c, index):
    """Dropout's RNG, a function of (seed, global micro-batch index): 1 process and W draw the same masks for
    the same micro-batch, and resume needs no saved RNG state."""
    torch.manual_seed(int(np.random.SeedSequence([c["seed"], index]).generate_state(1)[0]))


PROGRESSIVE_STREAM = 2  # the progressive loss's draws: a stream of their own, apart from train_steps'


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
    """A curriculum's highest level at optimizer step `it`. levels: the data's distinct levels L_1 < ... < L_n;
    switches: the iterations s_1 < ... where the next level joined (curriculum_iters, or those a threshold
    curriculum found so far): levels <= L_1 before s_1, <= L_2 from s_1, ..."""
    return levels[sum(it >= s for s in switches)]
