"""The prediction loss: JEPA regression on normalised target tokens, and its copy-last bar.

Normalisation, to read `beta` against: the JEPA loss is a MEAN over batch, predicted frames,
patches and embedding dims, of tokens that are layer-normed (unit variance over D). The latent regulariser is a SUM
over the d_r latent dims averaged over batch and transitions. Changing either normalisation moves the usable beta.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def jepa_loss(pred: Tensor, target: Tensor, kind: str = "l1") -> Tensor:
    """pred, target: [B, T, N, D] -> scalar mean L1 (`kind="l1"`) or smooth-L1 (`"smooth_l1"`) over every element."""
    if kind == "l1":
        return F.l1_loss(pred.float(), target.float())
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred.float(), target.float())
    raise ValueError(f"model.loss={kind!r} is not one of l1, smooth_l1")


@torch.no_grad()
def copy_last_loss(target: Tensor, kind: str = "l1") -> Tensor:
    """The `jepa_loss` of predicting no change on targets [B, T, N, D] (the bar a prediction must get below)."""
    return jepa_loss(target[:, :-1], target[:, 1:], kind)
