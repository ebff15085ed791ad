"""Prediction losses: JEPA regression on normalised target tokens, or InfoNCE on pooled embeddings.

Normalisation, to read `beta` against: the JEPA loss is a MEAN over batch, predicted frames,
patches and embedding dims, of tokens that are layer-normed (unit variance over D). The latent regulariser is a SUM
over the d_r latent dims averaged over batch and transitions. Changing either normalisation moves the usable beta.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import reduce
from torch import Tensor


def jepa_loss(pred: Tensor, target: Tensor, kind: str = "l1") -> Tensor:
    """pred, target: [B, T, N, D] -> scalar mean L1 (`kind="l1"`) or smooth-L1 (`"smooth_l1"`) over every element."""
    if kind == "l1":
        return F.l1_loss(pred.float(), target.float())
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred.float(), target.float())
    raise ValueError(f"model.loss={kind!r} is not one of l1, smooth_l1")


def infonce_logits(pred: Tensor, target: Tensor, temperature: float) -> Tensor:
    """pred, target: [B, T, N, D] -> logits [T, B, B]: cosine similarity / temperature of pooled prediction b and
    pooled target b' at the same time step (in-batch negatives; the diagonal holds the positives)."""
    p = F.normalize(reduce(pred.float(), "b t n d -> t b d", "mean"), dim=-1)
    z = F.normalize(reduce(target.float(), "b t n d -> t b d", "mean"), dim=-1)
    return torch.einsum("tbd,tcd->tbc", p, z) / temperature


def infonce_loss(pred: Tensor, target: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """pred, target: [B, T, N, D] -> (scalar cross-entropy averaged over batch and time, top-1 accuracy).

    Negatives are the other clips of the local batch at the same time step; with B = 1 the loss is 0.
    """
    logits = infonce_logits(pred, target, temperature)
    t, b, _ = logits.shape
    labels = torch.arange(b, device=logits.device).repeat(t)
    flat = logits.reshape(t * b, b)
    accuracy = (flat.argmax(-1) == labels).float().mean()
    return F.cross_entropy(flat, labels), accuracy


class Objective:
    """What the model asks of a prediction objective (`model.objective`): where its targets come from, its loss, and
    the copy-last monitor. `build_objective` picks the class by name; the model holds no branch on it."""

    name: ClassVar[str]
    ema_target: ClassVar[bool]  # targets from the EMA target encoder; else the online encoder's, under no grad

    def __init__(self, loss: str = "l1", temperature: float = 0.1):
        self.kind = loss
        self.temperature = temperature

    def loss(self, pred: Tensor, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """pred, target: [B, T, N, D] -> (scalar loss, monitors)."""
        raise NotImplementedError

    def copy_last(self, target: Tensor) -> Tensor | None:
        """The loss of predicting no change on targets [B, T, N, D] (the bar `pred` must get below), or None."""
        return None


class JepaObjective(Objective):
    """Regression on the EMA target encoder's normalised tokens (`jepa_loss`)."""

    name = "jepa"
    ema_target = True

    def loss(self, pred: Tensor, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return jepa_loss(pred, target, self.kind), {}

    def copy_last(self, target: Tensor) -> Tensor | None:
        with torch.no_grad():
            return jepa_loss(target[:, :-1], target[:, 1:], self.kind)


class InfoNCEObjective(Objective):
    """InfoNCE on pooled embeddings of the online encoder (`infonce_loss`); reports its top-1 accuracy."""

    name = "infonce"
    ema_target = False

    def loss(self, pred: Tensor, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        loss, accuracy = infonce_loss(pred, target, self.temperature)
        return loss, {"infonce_acc": accuracy.detach()}


OBJECTIVE_CLASSES: dict[str, type[Objective]] = {cls.name: cls for cls in (JepaObjective, InfoNCEObjective)}


def build_objective(name: str, loss: str = "l1", temperature: float = 0.1) -> Objective:
    """The Objective of `model.objective`; ValueError naming the valid ones."""
    if name not in OBJECTIVE_CLASSES:
        raise ValueError(f"model.objective={name!r} is not one of {', '.join(OBJECTIVE_CLASSES)}")
    return OBJECTIVE_CLASSES[name](loss, temperature)
