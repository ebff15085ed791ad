"""SIGReg: the anti-collapse term of LeJEPA / LeWM, exact over the global batch.

SIGReg (Balestriero & LeCun 2025) asks the embedding's distribution over the batch to be an isotropic standard
Gaussian. It draws `slices` random unit directions a, projects every sample, p = <z, a>, and compares the
empirical characteristic function (ECF) of p with the standard normal's at `knots` points t in [0, T_MAX]: the
Epps-Pulley statistic

    EP(a) = n * integral_0^T_MAX w(t) [ (mean_i cos(t p_i) - exp(-t^2 / 2))^2 + (mean_i sin(t p_i))^2 ] dt,

with w(t) = exp(-t^2 / 2) and the trapezoid rule over the knots; the term is EP averaged over the slices and over
the time steps of the clip (one batch of n samples per time step, as in LeWM). Since every ECF is a batch *mean*,
per-rank statistics would change the term's strength with the number of GPUs (LeWM's users see it under DDP); here
the sums of cos and sin and the sample count are all-reduced with a differentiable collective
(`torch.distributed.nn.functional.all_reduce`), so the value is that of one process holding the whole batch, and
after DDP averages the gradients over ranks so are the gradients (tests/test_sigreg.py runs two gloo processes).

256 directions by default (LeWM: 1024 for a 192-d embedding; fresh ones every step, four times the 64 dims of the
shipped configs, at a quarter of 1024's cost). The directions come from a generator seeded by `seed` (the trainer
passes the optimiser step), so every rank draws the same ones without communicating, and a resumed run draws what
the uninterrupted one would.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

T_MAX = 3.0  # the knots cover t in [0, T_MAX]


def _global_sum(x: Tensor) -> Tensor:
    """Sum of `x` over the ranks, with gradient (identity when torch.distributed is not initialised)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from torch.distributed.nn.functional import all_reduce

        with warnings.catch_warnings():  # deprecated in torch 2.x, still the documented autograd-aware all-reduce
            warnings.simplefilter("ignore", FutureWarning)
            return all_reduce(x)
    return x


def sigreg(z: Tensor, seed: int, slices: int = 256, knots: int = 17) -> Tensor:
    """The SIGReg statistic of embeddings z [T, n, D] (T groups of n samples each; the local share of the batch
    under DDP) -> scalar, averaged over the T groups and `slices` random directions.

    About 0 (of order 1 / n) for isotropic standard Gaussian samples, large for a collapsed or anisotropic batch.
    """
    if z.ndim != 3:
        raise ValueError(f"sigreg expects embeddings [T, n, D], got shape {tuple(z.shape)}")
    x = z.float()
    gen = torch.Generator().manual_seed(int(seed))
    directions = torch.randn(x.shape[-1], slices, generator=gen).to(x.device)
    directions = directions / directions.norm(dim=0, keepdim=True)  # [D, S] unit columns
    t = torch.linspace(0.0, T_MAX, knots, device=x.device)
    trapezoid = torch.full((knots,), T_MAX / (knots - 1), device=x.device)
    trapezoid[[0, -1]] /= 2
    gauss = torch.exp(-(t**2) / 2)
    weights = trapezoid * gauss  # [K]
    angles = (x @ directions)[..., None] * t  # [T, n, S, K]
    sums = torch.stack([angles.cos().sum(1), angles.sin().sum(1)])  # [2, T, S, K]: local ECF sums
    count = torch.tensor(float(x.shape[1]), device=x.device)
    sums, count = _global_sum(sums), _global_sum(count)
    cos_mean, sin_mean = sums[0] / count, sums[1] / count
    err = (cos_mean - gauss) ** 2 + sin_mean**2  # [T, S, K]
    return (err @ weights).mean() * count


def gaussian_level(knots: int = 17) -> float:
    """The expected statistic for i.i.d. standard Gaussian samples, whatever their number n (what a healthy
    embedding reaches): at each knot E[err] = (1 - exp(-t^2)) / n, so n * E[err] integrates to a constant."""
    t = torch.linspace(0.0, T_MAX, knots)
    trapezoid = torch.full((knots,), T_MAX / (knots - 1))
    trapezoid[[0, -1]] /= 2
    return float((trapezoid * torch.exp(-(t**2) / 2) * (1 - torch.exp(-(t**2)))).sum())
