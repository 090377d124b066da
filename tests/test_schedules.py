"""schedules.py: the learning rate and the K of every optimizer step, pure functions of (seed, iteration)."""

import math

import pytest

import schedules
import train


def test_lr_schedule_never_divides_by_zero():
    base = dict(train.DEFAULTS, learning_rate=1.0, min_lr=0.1)
    for warmup, decay in [(0, 0), (0, 10), (10, 0), (10, 10), (5, 20)]:
        c = dict(base, warmup_iters=warmup, lr_decay_iters=decay)
        lrs = [schedules.get_lr(it, c) for it in range(30)]
        assert all(math.isfinite(x) and 0 < x <= 1.0 for x in lrs)
        assert lrs[-1] == 0.1
    c = dict(base, warmup_iters=4, lr_decay_iters=12)
    assert [schedules.get_lr(i, c) for i in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert schedules.get_lr(4, c) == 1.0 and schedules.get_lr(8, c) == pytest.approx(0.55)


def test_random_k_is_a_function_of_the_iteration():
    c = dict(train.DEFAULTS, n_steps=4, n_steps_dist="uniform")
    ks = [schedules.n_steps_at(it, c) for it in range(400)]
    assert ks == [schedules.n_steps_at(it, c) for it in range(400)]
    assert set(ks) == set(range(1, 8))                       # U{1..2K−1}
    assert abs(sum(ks) / len(ks) - 4) < 0.3


def test_lognormal_k_is_a_function_of_the_iteration_with_mean_k_a_heavy_tail_and_a_hard_cap():
    for K in (2, 4, 8):
        c = dict(train.DEFAULTS, n_steps=K, n_steps_dist="lognormal")
        its = range(20000)
        ks = [schedules.n_steps_at(it, c) for it in its]
        # in any order: a function of (seed, it)
        assert ks[999::-1] == [schedules.n_steps_at(it, c) for it in reversed(range(1000))]
        assert min(ks) >= 1 and max(ks) <= schedules.max_n_steps(c) == 4 * K  # the default cap, 4K
        # mean K within 3% of K: ~5 standard errors (sd ≈ 0.57·K over 20,000 draws), and the cap lowers it
        # < 0.1%
        assert abs(sum(ks) / len(ks) - K) < 0.03 * K, (K, sum(ks) / len(ks))
        assert sorted(ks)[len(ks) // 2] <= K < 2 * K - 1 < max(ks)       # median <= K; a tail past uniform's
        capped = dict(c, n_steps_max=K + 1)
        kc = [schedules.n_steps_at(it, capped) for it in its]
        assert max(kc) == K + 1 == schedules.max_n_steps(capped)     # the cap holds, and is reached
        assert kc == [min(k, K + 1) for k in ks]                             # clipped, the rest unchanged
    one = dict(train.DEFAULTS, n_steps=1, n_steps_dist="lognormal")
    assert {schedules.n_steps_at(it, one) for it in range(200)} == {1}
    assert schedules.n_steps_at(0, dict(one, n_steps=0)) == 0


def test_max_n_steps_is_the_largest_k_a_step_can_draw():
    base = dict(train.DEFAULTS, n_steps=3)
    for dist, cap, want in [("fixed", 0, 3), ("uniform", 0, 5), ("lognormal", 0, 12), ("lognormal", 4, 4)]:
        c = dict(base, n_steps_dist=dist, n_steps_max=cap)
        drawn = max(schedules.n_steps_at(it, c) for it in range(5000))
        assert schedules.max_n_steps(c) == drawn == want, dist
    for dist in ("fixed", "uniform", "lognormal"):
        assert schedules.max_n_steps(dict(base, n_steps=0, n_steps_dist=dist)) == 0
