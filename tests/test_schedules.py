import math

import pytest

from worldmodel.train.schedules import beta_at, ema_momentum, lr_factor, recon_sigma_at


def test_lr_warms_up_linearly_then_decays_to_min_lr():
    kw = dict(warmup_steps=10, total_steps=110, lr=1e-3, min_lr=1e-5)
    warm = [lr_factor(s, **kw) for s in range(10)]
    assert warm == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lr_factor(10, **kw) == pytest.approx(1.0)
    assert lr_factor(60, **kw) == pytest.approx(0.5 * (1 + 1e-2))  # half-way down the cosine
    assert lr_factor(110, **kw) == pytest.approx(1e-2)
    assert lr_factor(500, **kw) == pytest.approx(1e-2)  # stays at min_lr past the end
    decay = [lr_factor(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))


def test_lr_without_warmup_starts_at_full_lr():
    assert lr_factor(0, warmup_steps=0, total_steps=100, lr=1.0, min_lr=0.0) == pytest.approx(1.0)


def test_ema_momentum_is_a_cosine_from_start_to_end():
    kw = dict(total_steps=100, start=0.996, end=1.0)
    assert ema_momentum(0, **kw) == pytest.approx(0.996)
    assert ema_momentum(50, **kw) == pytest.approx(0.998)
    assert ema_momentum(100, **kw) == pytest.approx(1.0)
    assert ema_momentum(25, **kw) == pytest.approx(1.0 - 0.004 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_beta_warms_up_linearly_then_stays():
    assert beta_at(0, beta=0.01, warmup_steps=100) == 0.0
    assert beta_at(50, beta=0.01, warmup_steps=100) == pytest.approx(0.005)
    assert beta_at(100, beta=0.01, warmup_steps=100) == pytest.approx(0.01)
    assert beta_at(10_000, beta=0.01, warmup_steps=100) == pytest.approx(0.01)
    assert beta_at(0, beta=0.01, warmup_steps=0) == pytest.approx(0.01)


def test_recon_sigma_falls_geometrically_from_the_start_to_the_final_width_then_stays():
    """model.recon_sigma_start -> recon_sigma over recon_sigma_steps (geometric: halfway is the geometric mean),
    the final width after that, and a constant width when the schedule is off (start 0 or steps 0)."""
    assert recon_sigma_at(0, sigma=0.1, start=0.4, steps=100) == pytest.approx(0.4)
    assert recon_sigma_at(50, sigma=0.1, start=0.4, steps=100) == pytest.approx(0.2)
    assert recon_sigma_at(100, sigma=0.1, start=0.4, steps=100) == pytest.approx(0.1)
    assert recon_sigma_at(5000, sigma=0.1, start=0.4, steps=100) == pytest.approx(0.1)
    assert recon_sigma_at(0, sigma=0.1, start=0.0, steps=100) == 0.1
    assert recon_sigma_at(0, sigma=0.1, start=0.4, steps=0) == 0.1
