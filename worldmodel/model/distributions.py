"""The two distributions the inferred latents are built from: the KL divergence of diagonal Gaussians (AdaSSL-V's
posterior against its prior) and the straight-through Bernoulli mask (AdaSSL-S). Plain tensor functions, no
parameters; latents.py uses them.
"""

from __future__ import annotations

import torch
from torch import Tensor


def gaussian_kl(mu_q: Tensor, sigma_q: Tensor, mu_p: Tensor, sigma_p: Tensor) -> Tensor:
    """KL(N(mu_q, sigma_q^2) || N(mu_p, sigma_p^2)), diagonal, summed over the last dim: [..., d] -> [...]."""
    var_ratio = (sigma_q / sigma_p) ** 2
    mean_term = ((mu_q - mu_p) / sigma_p) ** 2
    return 0.5 * (var_ratio + mean_term - 1.0 - torch.log(var_ratio)).sum(-1)


def straight_through_bernoulli(logits: Tensor, sample: bool = True, generator: torch.Generator | None = None) -> Tensor:
    """Hard 0/1 mask with straight-through gradients: forward 1[l + logistic noise > 0], backward d sigmoid(l + noise).

    With `sample=False` the noise is left out (the mask is 1 where sigmoid(l) > 0.5).
    """
    noisy = logits
    if sample:
        u = torch.rand(logits.shape, device=logits.device, generator=generator).clamp(1e-6, 1 - 1e-6)
        noisy = logits + torch.log(u) - torch.log1p(-u)
    soft = torch.sigmoid(noisy)
    hard = (noisy > 0).to(soft.dtype)
    return hard + (soft - soft.detach())  # exactly 0/1 forward: soft - soft.detach() is exactly 0
