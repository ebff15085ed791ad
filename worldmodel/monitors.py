"""Collapse monitors on embeddings (DESIGN.md section 6: collapse is real at small scale and the loss hides it).

All functions take embeddings [M, D] (M samples) and return a 0-dim float32 tensor; they run without gradient and
in float32 whatever the autocast state.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def per_dim_std(x: Tensor) -> Tensor:
    """x: [M, D] -> mean over dims of the per-dimension standard deviation across samples (0 when collapsed)."""
    return x.detach().float().std(dim=0, unbiased=False).mean()


@torch.no_grad()
def effective_rank(x: Tensor, eps: float = 1e-12) -> Tensor:
    """x: [M, D] -> exp(entropy of the normalised singular values) (RankMe), in [1, min(M, D)].

    A constant embedding gives 1; isotropic embeddings give about min(M, D).
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        s = torch.linalg.svdvals(x.detach().float())
    p = s / (s.sum() + eps) + eps
    return torch.exp(-(p * torch.log(p)).sum())


@torch.no_grad()
def batch_variance(x: Tensor) -> Tensor:
    """x: [..., D] -> variance across all leading positions per dim, averaged over dims (0 when collapsed)."""
    return x.detach().float().reshape(-1, x.shape[-1]).var(dim=0, unbiased=False).mean()
