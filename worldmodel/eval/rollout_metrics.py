"""Per-horizon rollout errors against the target encoder's latents, and their accumulation over batches.

Conventions (the metrics.json contract relies on them):

- `l1`:  mean absolute difference over patches and embedding dims.
- `l2`:  mean *squared* difference over patches and embedding dims (an MSE, not its root).
- `cos`: cosine distance 1 - cos(pred, target) per patch token, averaged over patches.

- `energy_score`: the energy score (Gneiting & Raftery 2007) of the forecast's futures X_1..X_K against the truth y,
  ES = 1/K sum_i ||X_i - y|| - 1/(2 K (K-1)) sum_{i != j} ||X_i - X_j|| (the unbiased pair term; 0 for K = 1),
  with ||.|| the Euclidean norm over the whole frame (the flattened [N, D] latent, or a decoded frame's pixels)
  divided by sqrt(number of elements), so that it reads on the scale of an RMS error: a deterministic forecast's
  ES is its RMS error sqrt(l2) (per clip and step, then averaged over clips). Lower is better; a proper scoring
  rule: in expectation no ensemble scores better than samples of the true distribution.
- `spread_skill` (ensembles of K > 1 futures): sqrt(mean over clips of spread^2) / sqrt(mean over clips of the
  ensemble mean's squared error), spread^2 = (K+1) / (K (K-1)) sum_k ||X_k - mean_k X_k||^2 (normalised as above):
  the RMS distance of the samples from their mean with the finite-ensemble correction sqrt((K+1)/(K-1)) (Fortin et
  al. 2014), so that an ensemble drawn from the true distribution reads 1 at any K; below 1 over-confident (too
  little spread for its error), above 1 over-dispersed.

Every metric is computed per clip and per horizon step ([B, H]) and then averaged over clips (spread_skill: the
ratio of the clip means of the squares). Step h (1-based) is the frame num_context + h - 1 of the clip; the
"predicted transition" of step h is the transition from frame num_context + h - 2 into it, so
`events[:, num_context - 1 + (h - 1)]` decides whether step h of a clip counts as `event` or `no_event`.
`no_event_so_far`: step h counts when no transition from the end of the context up to and including its own,
events[:, num_context - 1 : num_context - 1 + h], is an event (the rollout so far is predictable in principle).

Sampled futures (K of them): `mean_of_k` is the average error of one sampled future (the mean over the K samples
of each sample's error). `best_of_k` picks, per clip, the one sample whose L1 averaged over the whole horizon is
lowest (a whole-trajectory choice, so the horizon curve is that of one coherent future, not a per-step envelope)
and reports all three metrics of that sample. Hence best_of_k's horizon-averaged L1 is <= mean_of_k's per clip. A choice
made with the answer has no proper score of its own: the `energy_score` and `spread_skill` of both `best_of_k` and
`mean_of_k` are those of the whole ensemble of K futures (the same numbers in both rows).

`noisy_best_of_k` (deterministic models): K futures = the deterministic forecast plus independent Gaussian noise
whose per-dimension std (per step h, patch n and dim d) is that of the model's own errors on *other* clips
(`loo_error_std`: the other clips of the same eval batch), scored by `sample_errors` exactly as `best_of_k`: the
noise-matched baseline that any best-of-K of a stochastic model is to be read against.

`rollout_health` (not split, all clips): per step, the predicted latents' RMS over the targets' RMS and the effective
rank of their patch-means over the clips against the targets': where a rollout shrinks or loses what tells clips
apart.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from einops import reduce

from worldmodel.model.monitors import effective_rank

METRICS = ("l1", "l2", "cos")
SPLITS = ("all", "event", "no_event", "no_event_so_far")
# per-clip sums an ensemble brings to the accumulator, and the ratio reported from them instead (see the docstring)
SPREAD_SQ, ENSEMBLE_ERROR_SQ = "spread_sq", "ensemble_error_sq"
RATIOS = {"spread_skill": (SPREAD_SQ, ENSEMBLE_ERROR_SQ)}


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


def _frame_norm(x: torch.Tensor, frame_dims: int) -> torch.Tensor:
    """Euclidean norm over the last `frame_dims` dims divided by sqrt(their number of elements): [..., *frame] ->
    [...] (float32)."""
    size = math.prod(x.shape[-frame_dims:])
    return torch.linalg.vector_norm(x.float().flatten(-frame_dims), dim=-1) / math.sqrt(size)


def energy_score(samples: torch.Tensor, target: torch.Tensor, frame_dims: int = 2) -> torch.Tensor:
    """Energy score of K forecast futures against the truth, per clip and step (lower is better).

    samples: [K, ..., *frame] (K >= 1; e.g. [K, B, H, N, D] latents, or [K, B, H, h, w, c] decoded frames with
    frame_dims=3); target: [..., *frame]. Returns float32 [...]:
    ES = 1/K sum_i ||X_i - y|| - 1/(2 K (K-1)) sum_{i != j} ||X_i - X_j||, the pair term unbiased (0 for K = 1),
    ||.|| the norm over the frame's elements / sqrt(their number) (the scale of an RMS error). A deterministic
    forecast (K = 1, or K equal copies) scores its RMS error.
    """
    if samples.shape[1:] != target.shape:
        raise ValueError(f"samples {tuple(samples.shape)} are not [K, *{tuple(target.shape)}]")
    x = samples.float()
    k = x.shape[0]
    skill = _frame_norm(x - target.float(), frame_dims).mean(dim=0)
    if k < 2:
        return skill
    pairs = torch.zeros_like(skill)
    for i in range(k - 1):  # each unordered pair once: sum_{i != j} = 2 sum_{i < j}
        pairs += _frame_norm(x[i + 1 :] - x[i], frame_dims).sum(dim=0)
    return skill - pairs / (k * (k - 1))


def ensemble_spread(samples: torch.Tensor, target: torch.Tensor, frame_dims: int = 2) -> dict[str, torch.Tensor]:
    """The per-clip squares behind the spread-skill ratio of an ensemble of K >= 2 futures.

    samples: [K, ..., *frame]; target: [..., *frame]. Returns {SPREAD_SQ, ENSEMBLE_ERROR_SQ}, each float32 [...]:
    spread^2 = (K+1) / (K (K-1)) sum_k ||X_k - Xbar||^2 and the ensemble mean's squared error ||Xbar - y||^2, both
    per element of the frame (||.||^2 / number of elements). For samples and truth drawn from one distribution both
    have the same expectation, (K+1)/K times its variance per element, so sqrt of their clip means' ratio reads 1.
    """
    k = samples.shape[0]
    if k < 2:
        raise ValueError("the spread of an ensemble needs K >= 2 futures")
    x = samples.float()
    mean = x.mean(dim=0)
    spread_sq = _frame_norm(x - mean, frame_dims).square().sum(dim=0) * (k + 1) / (k * (k - 1))
    return {SPREAD_SQ: spread_sq, ENSEMBLE_ERROR_SQ: _frame_norm(mean - target.float(), frame_dims).square()}


def ensemble_scores(samples: torch.Tensor, target: torch.Tensor, frame_dims: int = 2) -> dict[str, torch.Tensor]:
    """What an ensemble of K futures adds to its modes' rows: {"energy_score"} and, for K >= 2, the spread-skill
    squares (`ensemble_spread`). samples: [K, ..., *frame]; target: [..., *frame]; each value float32 [...]."""
    out = {"energy_score": energy_score(samples, target, frame_dims)}
    if samples.shape[0] >= 2:
        out.update(ensemble_spread(samples, target, frame_dims))
    return out


def sample_errors(
    samples: torch.Tensor, target: torch.Tensor
) -> tuple[dict[str, dict[str, torch.Tensor]], torch.Tensor]:
    """Best-of-K and mean-of-K errors of K sampled futures, with the ensemble's proper scores.

    samples: [K, B, H, N, D]; target: [B, H, N, D].
    Returns ({"best_of_k": {metric: [B, H]}, "mean_of_k": {metric: [B, H]}}, best index int64 [B]); best-of-K is
    chosen per clip by the L1 averaged over the horizon (see the module docstring). Both modes also carry the
    whole ensemble's `ensemble_scores` (energy_score; for K >= 2 the spread-skill squares).
    """
    errors = step_errors(samples, target.unsqueeze(0).expand_as(samples))  # each [K, B, H]
    best = errors["l1"].mean(dim=-1).argmin(dim=0)  # [B]
    batch = torch.arange(best.shape[0], device=best.device)
    ensemble = ensemble_scores(samples, target)
    by_mode = {
        "best_of_k": {**{name: err[best, batch] for name, err in errors.items()}, **ensemble},
        "mean_of_k": {**{name: err.mean(dim=0) for name, err in errors.items()}, **ensemble},
    }
    return by_mode, best


def forecast_errors(pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """`step_errors` of one deterministic forecast plus its energy score (its RMS error, as the one future it
    forecasts). pred, target: [B, H, N, D]. Returns {"l1", "l2", "cos", "energy_score"}, each float32 [B, H]."""
    return {**step_errors(pred, target), "energy_score": energy_score(pred.unsqueeze(0), target)}


MIN_NOISE_FIT_CLIPS = 2  # clips a noise std is fitted on (an unbiased variance needs two)


def loo_error_std(errors: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
    """Per-clip noise std for `noisy_best_of_k`, each fitted without the clip it is for (leave one out).

    errors: [B, ...] a deterministic forecast's errors (pred - target, e.g. [B, H, N, D]) on the clips to be
    scored; extra: [E, ...] errors on further clips that are fitted on but not scored (or None). Returns float32
    [B, ...]: row c is the std (unbiased, about the mean) per element over the clips of errors except c, and extra.
    Raises ValueError when fewer than MIN_NOISE_FIT_CLIPS clips remain to fit on.
    """
    pool = errors.double() if extra is None else torch.cat([errors.double(), extra.double()])
    n = pool.shape[0]
    if n - 1 < MIN_NOISE_FIT_CLIPS:
        raise ValueError(f"a leave-one-out std needs {MIN_NOISE_FIT_CLIPS + 1} clips, got {n}")
    deviation = errors.double() - pool.mean(dim=0)  # [B, ...]
    total = (pool - pool.mean(dim=0)).square().sum(dim=0)
    # removing clip c from n values with mean m: the sum of squares drops by n / (n - 1) (x_c - m)^2
    left = (total - deviation.square() * n / (n - 1)).clamp_min(0.0)
    return (left / (n - 2)).sqrt().float()


def noisy_samples(
    pred: torch.Tensor, std: torch.Tensor, k: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """K futures of a deterministic forecast plus independent Gaussian noise of the given per-element std.

    pred: [B, H, N, D]; std: [B, H, N, D] (from `loo_error_std`); generator: the eval's generator (its device).
    Returns [K, B, H, N, D] float32.
    """
    noise = torch.randn((k, *pred.shape), generator=generator, device=pred.device, dtype=torch.float32)
    return pred.float().unsqueeze(0) + noise * std.to(pred.device).unsqueeze(0)


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


def no_event_so_far(step_event: torch.Tensor) -> torch.Tensor:
    """Which steps have no event in any predicted transition up to and including their own.

    step_event: bool [B, H] (`step_events`: column h-1 is the transition producing step h). Returns bool [B, H]:
    True at step h when step_event[:, :h] is all False, i.e. events[:, num_context - 1 : num_context - 1 + h] all 0.
    """
    return ~(step_event.int().cummax(dim=1).values.bool())


def split_masks(
    shape: tuple[int, ...], step_event: torch.Tensor | None, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Which clip counts at which step in each split of SPLITS: {split: bool [B, H]}.

    shape: (B, H); step_event: bool [B, H] (`step_events`) or None (no event metadata: `all` only).
    """
    masks = {"all": torch.ones(shape, dtype=torch.bool, device=device)}
    if step_event is not None:
        masks["event"] = step_event.bool()
        masks["no_event"] = ~masks["event"]
        masks["no_event_so_far"] = no_event_so_far(masks["event"])
    return masks


def rollout_health(
    pred_sq: dict[str, np.ndarray],
    pred_mean: dict[str, np.ndarray],
    target_sq: np.ndarray,
    target_mean: np.ndarray,
) -> dict:
    """Per-step drift of each mode's predicted latents against the true targets' (all clips, no split).

    pred_sq: {mode: [C, H]} each clip's mean square over patches and dims of the predicted latents at each step;
    pred_mean: {mode: [C, H, D]} their mean over patches; target_sq [C, H], target_mean [C, H, D]: the same of the
    true future frames' target latents. Returns {"target": {"rms": [H], "eff_rank": [H]}, "modes": {mode:
    {"norm_ratio": [H], "eff_rank": [H]}}}: `rms` = sqrt(mean over clips of the mean square); `norm_ratio` = the
    mode's rms over the target's at that step (1 = the scale holds; below 1 the rollout shrinks towards the mean,
    e.g. a blur of possible futures); `eff_rank` = `monitors.effective_rank` of the [C, D] patch-means over the
    clips at that step (against the target's: a rollout that forgets what tells clips apart loses rank). None where
    not computable (a zero target norm, a non-finite value).
    """

    def rms(sq: np.ndarray) -> np.ndarray:
        return np.sqrt(np.asarray(sq, dtype=np.float64).mean(axis=0))  # [H]

    def ranks(mean: np.ndarray) -> list[float | None]:
        values = [
            float(effective_rank(torch.from_numpy(np.ascontiguousarray(mean[:, h])))) for h in range(mean.shape[1])
        ]
        return [v if math.isfinite(v) else None for v in values]

    target_rms = rms(target_sq)
    modes = {}
    for mode, sq in pred_sq.items():
        ratio = rms(sq) / np.where(target_rms > 0, target_rms, np.nan)
        modes[mode] = {
            "norm_ratio": [float(r) if math.isfinite(r) else None for r in ratio],
            "eff_rank": ranks(pred_mean[mode]),
        }
    return {"target": {"rms": [float(r) for r in target_rms], "eff_rank": ranks(target_mean)}, "modes": modes}


class ErrorAccumulator:
    """Sums per-step errors over batches, overall and split by the event flags of the steps' transitions (SPLITS).

    `metrics`: the names every `add` must bring (latent errors: METRICS; pixel errors: pixel_decoder.PIXEL_METRICS);
    any further name an `add` brings (e.g. `energy_score`) is averaged the same way, and the pairs in RATIOS (the
    spread-skill squares) are reported as their ratio instead. A mode must bring the same names at every `add`.
    """

    def __init__(self, horizon: int, metrics: tuple[str, ...] = METRICS):
        self.horizon = horizon
        self.metrics = metrics
        self.sums: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
        self.counts: dict[str, dict[str, torch.Tensor]] = {}

    def add(self, mode: str, errors: dict[str, torch.Tensor], step_event: torch.Tensor | None) -> None:
        """Add one batch. errors: {metric: [B, H]} (at least `metrics`); step_event: bool [B, H] or None (no event
        metadata: the `all` split only)."""
        missing = [name for name in self.metrics if name not in errors]
        if missing:
            raise KeyError(f"errors of mode {mode!r} lack {missing}")
        first = errors[self.metrics[0]]
        masks = split_masks(first.shape, None if step_event is None else step_event.to(first.device), first.device)
        sums = self.sums.setdefault(mode, {})
        counts = self.counts.setdefault(mode, {})
        names = [*self.metrics, *(name for name in errors if name not in self.metrics)]
        known = sums.get("all")
        if known is not None and set(known) != set(names):
            raise ValueError(f"mode {mode!r} brought {sorted(names)}, before {sorted(known)}")
        for split, mask in masks.items():
            weight = mask.float()
            counts[split] = counts.get(split, 0) + weight.sum(dim=0).cpu()
            split_sums = sums.setdefault(split, {})
            for name in names:
                split_sums[name] = split_sums.get(name, 0) + (errors[name].float() * weight).sum(dim=0).cpu()

    def result(self) -> dict[str, dict]:
        """{mode: {split: {metric: [H] for each metric, "count": [H]}}}; a step with no clip in a split is None.
        A mode that brought the spread-skill squares has `spread_skill` [H] in their place."""
        helpers = {name for pair in RATIOS.values() for name in pair}
        out: dict[str, dict] = {}
        for mode, splits in self.sums.items():
            out[mode] = {}
            for split, sums in splits.items():
                count = self.counts[mode][split]
                entry = {name: _mean_or_none(value, count) for name, value in sums.items() if name not in helpers}
                for ratio, (num, den) in RATIOS.items():
                    if num in sums and den in sums:
                        entry[ratio] = _root_ratio_or_none(sums[num], sums[den], count)
                entry["count"] = [int(c) for c in count.tolist()]
                out[mode][split] = entry
        return out


def _mean_or_none(total: torch.Tensor, count: torch.Tensor) -> list[float | None]:
    return [float(s / c) if c > 0 else None for s, c in zip(total.tolist(), count.tolist(), strict=True)]


def _root_ratio_or_none(num: torch.Tensor, den: torch.Tensor, count: torch.Tensor) -> list[float | None]:
    """sqrt(num / den) per step (the clip counts cancel); None where no clip counted or the denominator is 0."""
    return [
        math.sqrt(a / b) if c > 0 and b > 0 else None
        for a, b, c in zip(num.tolist(), den.tolist(), count.tolist(), strict=True)
    ]


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
