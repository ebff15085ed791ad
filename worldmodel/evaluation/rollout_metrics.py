"""Per-horizon rollout errors against the target encoder's latents, and their accumulation over batches.

Conventions (the metrics.json contract relies on them):

- `l1`:  mean absolute difference over patches and embedding dims.
- `l2`:  mean *squared* difference over patches and embedding dims (an MSE, not its root).
- `cos`: cosine distance 1 - cos(pred, target) per patch token, averaged over patches.

Every metric is computed per clip and per horizon step ([B, H]) and then averaged over clips. Step h (1-based) is
the frame num_context + h - 1 of the clip; the "predicted transition" of step h is the transition from frame
num_context + h - 2 into it, so `events[:, num_context - 1 + (h - 1)]` decides whether step h of a clip counts
as `event` or `no_event`.

Sampled futures (K of them): `mean_of_k` is the average error of one sampled future (the mean over the K samples
of each sample's error). `best_of_k` picks, per clip, the one sample whose L1 averaged over the whole horizon is
lowest (a whole-trajectory choice, so the horizon curve is that of one coherent future, not a per-step envelope)
and reports all three metrics of that sample. Hence best_of_k's horizon-averaged L1 is <= mean_of_k's per clip.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import reduce

METRICS = ("l1", "l2", "cos")
SPLITS = ("all", "event", "no_event")


def step_errors(pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-clip, per-step errors of predicted latents.

    pred, target: [..., H, N, D] (any leading dims, e.g. [B, H, N, D] or [K, B, H, N, D]).
    Returns {"l1", "l2", "cos"}: each float32 [..., H].
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
    pred, target = pred.float(), target.float()
    diff = pred - target
    cos = 1.0 - F.cosine_similarity(pred, target, dim=-1, eps=1e-8)
    return {
        "l1": reduce(diff.abs(), "... n d -> ...", "mean"),
        "l2": reduce(diff.square(), "... n d -> ...", "mean"),
        "cos": reduce(cos, "... n -> ...", "mean"),
    }


def copy_last(context_target_tokens: torch.Tensor, horizon: int) -> torch.Tensor:
    """The copy-last-frame baseline: the last context frame's target latents repeated.

    context_target_tokens: [B, Tc, N, D] target-encoder latents of the context frames.
    Returns [B, H, N, D].
    """
    last = context_target_tokens[:, -1:]
    return last.expand(-1, horizon, -1, -1)


def sample_errors(
    samples: torch.Tensor, target: torch.Tensor
) -> tuple[dict[str, dict[str, torch.Tensor]], torch.Tensor]:
    """Best-of-K and mean-of-K errors of K sampled futures.

    samples: [K, B, H, N, D]; target: [B, H, N, D].
    Returns ({"best_of_k": {metric: [B, H]}, "mean_of_k": {metric: [B, H]}}, best index int64 [B]); best-of-K is
    chosen per clip by the L1 averaged over the horizon (see the module docstring).
    """
    errors = step_errors(samples, target.unsqueeze(0).expand_as(samples))  # each [K, B, H]
    best = errors["l1"].mean(dim=-1).argmin(dim=0)  # [B]
    batch = torch.arange(best.shape[0], device=best.device)
    by_mode = {
        "best_of_k": {name: err[best, batch] for name, err in errors.items()},
        "mean_of_k": {name: err.mean(dim=0) for name, err in errors.items()},
    }
    return by_mode, best


def pairwise_diversity(samples: torch.Tensor) -> torch.Tensor:
    """Mean pairwise L1 distance among K sampled futures, per clip and step.

    samples: [K, B, H, N, D]. Returns [B, H]; zeros when K == 1 (nothing to compare) or all samples are equal.
    """
    k = samples.shape[0]
    if k < 2:
        return torch.zeros(samples.shape[1:3], device=samples.device)
    x = samples.float()
    total = torch.zeros(samples.shape[1:3], device=samples.device)
    for i in range(k - 1):
        total += reduce((x[i + 1 :] - x[i]).abs().mean(dim=(-1, -2)), "j b h -> b h", "sum")
    return total / (k * (k - 1) / 2)


def step_events(events: torch.Tensor, num_context: int, horizon: int) -> torch.Tensor:
    """Event flag of the transition that produces each predicted step.

    events: [B, T-1] per-transition 0/1 flags of the clip. Returns bool [B, H].
    """
    start = num_context - 1
    if events.shape[1] < start + horizon:
        raise ValueError(
            f"events has {events.shape[1]} transitions; horizon {horizon} after {num_context} context frames "
            f"needs {start + horizon}"
        )
    return events[:, start : start + horizon] > 0.5


class ErrorAccumulator:
    """Sums per-step errors over batches, overall and split by the event flag of each step's transition.

    `metrics`: the names every `add` brings (latent errors: METRICS; pixel errors: pixel_decoder.PIXEL_METRICS).
    """

    def __init__(self, horizon: int, metrics: tuple[str, ...] = METRICS):
        self.horizon = horizon
        self.metrics = metrics
        self.sums: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
        self.counts: dict[str, dict[str, torch.Tensor]] = {}

    def add(self, mode: str, errors: dict[str, torch.Tensor], step_event: torch.Tensor | None) -> None:
        """Add one batch. errors: {metric: [B, H]}; step_event: bool [B, H] or None (no event metadata)."""
        first = errors[self.metrics[0]]
        masks = {"all": torch.ones_like(first, dtype=torch.bool)}
        if step_event is not None:
            masks["event"] = step_event.to(first.device)
            masks["no_event"] = ~masks["event"]
        sums = self.sums.setdefault(mode, {})
        counts = self.counts.setdefault(mode, {})
        for split, mask in masks.items():
            weight = mask.float()
            counts[split] = counts.get(split, 0) + weight.sum(dim=0).cpu()
            split_sums = sums.setdefault(split, {})
            for name in self.metrics:
                split_sums[name] = split_sums.get(name, 0) + (errors[name].float() * weight).sum(dim=0).cpu()

    def result(self) -> dict[str, dict]:
        """{mode: {split: {metric: [H] for each metric, "count": [H]}}}; a step with no clip in a split is None."""
        out: dict[str, dict] = {}
        for mode, splits in self.sums.items():
            out[mode] = {}
            for split, sums in splits.items():
                count = self.counts[mode][split]
                entry = {name: _mean_or_none(value, count) for name, value in sums.items()}
                entry["count"] = [int(c) for c in count.tolist()]
                out[mode][split] = entry
        return out


def _mean_or_none(total: torch.Tensor, count: torch.Tensor) -> list[float | None]:
    return [float(s / c) if c > 0 else None for s, c in zip(total.tolist(), count.tolist(), strict=True)]


class MeanAccumulator:
    """Running mean over clips of a per-step quantity [B, H] (used for the diversity of sampled futures)."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, values: torch.Tensor) -> None:
        """values: [B, H]."""
        batch_sum = values.float().sum(dim=0).cpu()
        self.total = batch_sum if self.total is None else self.total + batch_sum
        self.count += values.shape[0]

    def result(self) -> list[float] | None:
        """The mean per step, or None when nothing was added."""
        if self.total is None:
            return None
        return (self.total / self.count).tolist()
