"""Schedules advanced by the global optimiser step: learning rate, EMA momentum, beta, the keypoint maps' width.

`step` is always the number of optimiser steps already taken (0 before the first one), so a run resumed at step s
continues every schedule exactly where the interrupted run left it.
"""

from __future__ import annotations

import math


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, lr: float, min_lr: float) -> float:
    """Multiplier of the base LR (for `torch.optim.lr_scheduler.LambdaLR`): linear warm-up, then cosine decay.

    Warm-up rises from lr/warmup_steps to lr over the first `warmup_steps` steps; the cosine then falls from lr
    to `min_lr` at `total_steps` and stays there.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    floor = min_lr / lr if lr > 0 else 0.0
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def ema_momentum(step: int, *, total_steps: int, start: float, end: float) -> float:
    """EMA momentum of the target encoder: cosine from `start` (step 0) to `end` (step `total_steps`)."""
    progress = min(1.0, step / max(1, total_steps))
    return end - (end - start) * 0.5 * (1.0 + math.cos(math.pi * progress))


def beta_at(step: int, *, beta: float, warmup_steps: int) -> float:
    """Weight of the latent regulariser: linear from 0 (step 0) to `beta` over `warmup_steps`, then constant."""
    if warmup_steps <= 0:
        return beta
    return beta * min(1.0, step / warmup_steps)


def recon_sigma_at(step: int, *, sigma: float, start: float, steps: int) -> float:
    """Width of the reconstruction's keypoint maps: geometric from `start` (step 0) to `sigma` (step `steps`), then
    `sigma`; constant `sigma` when `start` is 0 or `steps` is 0.

    Why coarse to fine: a keypoint gets a gradient toward a thing only where its Gaussian map overlaps it, so with a
    narrow map the things a keypoint can find are those near where initialisation put it, and which disc gets
    keypoints is decided by the seed (docs/results.md, "AdaSSL-V on the detached config, fewer keypoints, and
    coarse-to-fine maps"). A wide map early reaches across the frame; the narrow one later places the keypoints
    precisely.
    """
    if start <= 0 or steps <= 0 or step >= steps:
        return sigma
    return start * (sigma / start) ** (step / steps)
