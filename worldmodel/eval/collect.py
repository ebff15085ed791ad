"""One pass over the eval batches: rollouts in every mode, per-step errors, the pooled latents the probes need, and
the token grids the frame strips retrieve pixels with.

All predictions come from `model.rollout` (the function training uses); nothing here predicts on its own. The
copy-last baseline is the one exception by design: it is the last context frame's target latents repeated; and so
is `noisy_best_of_k` of a deterministic model (its own forecast plus noise of its own error spread, measured on the
other clips of the batch: `rollout_metrics.loo_error_std`). The leakage check's one-step predictions
(`Collected.leakage`, inferred latents) are teacher forced, as in training: the predictor's `from_features` on the
trunk features of the true frames (leakage.one_step_predictions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange, reduce

from worldmodel.eval.pixel_decoder import PixelDecoder, pixel_errors, to_unit
from worldmodel.eval.rollout_metrics import (
    ErrorAccumulator,
    MeanAccumulator,
    copy_last,
    energy_score,
    ensemble_scores,
    forecast_errors,
    loo_error_std,
    noisy_samples,
    pairwise_diversity,
    sample_errors,
    step_events,
)

if TYPE_CHECKING:
    from worldmodel.eval.leakage import LeakageAccumulator

# Which rollouts a model gets, whether it draws K futures, and what the latent-action probe reads all come from its
# latent module (worldmodel/model/latents.py: `eval_modes`, `aliases`, `sampled`, `readouts`).
# transitions t -> t+1 with t < MIN_CONTEXT_FRAMES - 1 are left out of the latent-action statistics: from frame 0
# alone neither the predictor nor the prior can know the velocity, so r carries it whether or not there was a kick
MIN_CONTEXT_FRAMES = 2
MAX_STRIP_SAMPLES = 4  # sampled futures drawn per frame strip
STRIP_MODES = ("prediction", "prior_mean", "posterior", "action")  # deterministic rows a frame strip may draw
NOISE_FIT_CLIPS = 8  # noisy_best_of_k: a batch of fewer clips also fits its noise std on the batch before it
HEALTH_TARGET = "target"  # Collected.health_* key of the true future's target latents
HEALTH_SAMPLE = "prior_sample"  # ... and of one sampled future (the first), as the probes read it


def pool(tokens: torch.Tensor) -> torch.Tensor:
    """Mean over patches: [..., N, D] -> [..., D] (float32)."""
    return reduce(tokens.float(), "... n d -> ... d", "mean")


def grid_pool(tokens: torch.Tensor, cells: int) -> torch.Tensor:
    """The probes' features: the square patch grid average-pooled to at most `cells` x `cells` cells, flattened:
    [..., N, D] -> [..., c*c*D] (float32), c = min(cells, sqrt(N)).

    A mean over all patches keeps what is in the frame but hardly where: on moving digits a ridge probe reads the
    positions from a coarse token grid but not from the mean (docs/results.md, "History: the first version").
    `cells` = 1 is the plain mean.
    """
    *lead, n, d = tokens.shape
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"grid_pool needs a square patch grid, got N={n} patches")
    c = min(cells, side)
    grid = rearrange(tokens.float().reshape(-1, n, d), "m (h w) d -> m d h w", h=side)
    pooled = F.adaptive_avg_pool2d(grid, c)  # [M, D, c, c] (cells of unequal size when c does not divide side)
    return rearrange(pooled, "m d h w -> m (h w d)").reshape(*lead, c * c * d)


@dataclass
class Collected:
    """Everything gathered over the eval set (C clips, T frames, H horizon steps, N patches, D latent width).

    Full token grids are kept for retrieval only: every frame's target tokens (the bank, float16, as large as the
    uint8 frames kept beside it) and the predicted tokens of the first `num_strips` clips (the strip examples).
    """

    errors: ErrorAccumulator
    num_strips: int = 0  # clips (the first ones) whose predicted token grids are kept for frame strips
    diversity: MeanAccumulator = field(default_factory=MeanAccumulator)
    probe_cells: int = 4  # eval.probe_grid: the probes read the token grid pooled to this many cells per side
    target_pooled: list[np.ndarray] = field(default_factory=list)  # [B, T, D] per batch (mean over patches)
    online_pooled: list[np.ndarray] = field(default_factory=list)  # [B, T, D]
    target_probe: list[np.ndarray] = field(default_factory=list)  # [B, T, F] probe features (grid_pool)
    predicted_pooled: dict[str, list[np.ndarray]] = field(default_factory=dict)  # mode -> [B, H, F] (grid_pool)
    # rollout health (rollout_metrics.rollout_health): per mode (HEALTH_SAMPLE: the first sampled future) and for the
    # true future (HEALTH_TARGET) the mean square over patches and dims [B, H] and the mean over patches [B, H, D]
    health_sq: dict[str, list[np.ndarray]] = field(default_factory=dict)
    health_mean: dict[str, list[np.ndarray]] = field(default_factory=dict)
    frames: list[np.ndarray] = field(default_factory=list)  # uint8 [B, T, H, W, C]
    target_tokens: list[np.ndarray] = field(default_factory=list)  # float16 [B, T, N, D], the retrieval bank
    strip_tokens: dict[str, list[np.ndarray]] = field(default_factory=dict)  # STRIP_MODES -> float16 [b, H, N, D]
    strip_samples: list[np.ndarray] = field(default_factory=list)  # float16 [b, k, H, N, D] sampled futures, k <= 4
    state: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    action: list[np.ndarray] = field(default_factory=list)
    events: list[np.ndarray] = field(default_factory=list)
    fps: list[np.ndarray] = field(default_factory=list)  # float64 [B] of the batches that carry `fps`
    latents: dict[str, list[np.ndarray]] = field(default_factory=dict)  # the latent's `readouts` keys, per transition
    names: dict[str, list[str]] = field(default_factory=dict)  # state_names, label_names, action_names
    decoder: PixelDecoder | None = None  # when set, rollouts are also decoded and scored in pixel space
    pixels: ErrorAccumulator | None = None  # pixel errors (PIXEL_METRICS) per mode, when `decoder` is set
    decoded_strips: dict[str, list[np.ndarray]] = field(default_factory=dict)  # row label -> uint8 [b, H, h, w, c]
    # noisy_best_of_k: the deterministic forecast's errors [B, H, N, D] of the last batch (fitted on, never re-scored,
    # by a next batch of fewer than NOISE_FIT_CLIPS clips)
    last_errors: torch.Tensor | None = None
    # the shuffled-r leakage check and the transfer check's predictions (inferred latents only; leakage.py)
    leakage: LeakageAccumulator | None = None

    def stacked(self, name: str) -> np.ndarray | None:
        """The per-batch list `name` concatenated over clips, or None if never filled."""
        parts = getattr(self, name)
        return np.concatenate(parts) if parts else None


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().cpu().numpy()


def _np16(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(torch.float16).cpu().numpy()


@torch.no_grad()
def process_batch(
    model: torch.nn.Module,
    batch: dict,
    out: Collected,
    *,
    num_context: int,
    horizon: int,
    num_samples: int,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> None:
    """Roll out one batch in every evaluated mode of the model's latent and add errors, pooled latents and token
    grids to `out`.

    batch: the pipeline's dict (frames uint8 [B, T, H, W, C], optional state [B, T, S], action [B, T-1, A],
    events [B, T-1], labels [B, L], fps [B]). Errors are against model.encode_target of the true future frames;
    `generator` draws the prior samples (and the noise of `noisy_best_of_k`, the K-future baseline of a deterministic
    latent).
    Predicted token grids are kept only for clips among the first `out.num_strips`. With `out.leakage` set, the
    batch also goes through the shuffled-r check (leakage.LeakageAccumulator.add).
    """
    frames = batch["frames"].to(device)
    online = model.encode(frames)  # [B, T, N, D]
    target = model.encode_target(frames)  # [B, T, N, D]
    context = online[:, :num_context]
    future = target[:, num_context : num_context + horizon]  # [B, H, N, D]
    events = batch.get("events")
    num_strip = max(0, min(len(frames), out.num_strips - sum(len(f) for f in out.frames)))  # strip clips here
    step_event = step_events(events, num_context, horizon) if events is not None else None

    latent = model.latent
    preds = {"copy_last": copy_last(target[:, :num_context], horizon)}
    for name, mode in latent.eval_modes:
        kwargs = {}
        if mode == "posterior":
            kwargs["future_tokens"] = future
        if mode == "action":
            kwargs["actions"] = batch["action"][:, num_context - 1 : num_context - 1 + horizon].to(device)
        preds[name] = model.rollout(context, horizon, mode, **kwargs)[0]
    for alias, name in latent.aliases.items():
        preds[alias] = preds[name]  # the same numbers under the name other runs use
    _keep_health(out, HEALTH_TARGET, future)
    for name, pred in preds.items():
        out.errors.add(name, forecast_errors(pred, future), step_event)
        out.predicted_pooled.setdefault(name, []).append(_np(grid_pool(pred, out.probe_cells)))
        _keep_health(out, name, pred)
        if name in STRIP_MODES and num_strip:
            out.strip_tokens.setdefault(name, []).append(_np16(pred[:num_strip]))

    samples = None
    if latent.sampled:
        samples = model.rollout(context, horizon, "prior_sample", k=num_samples, generator=generator)  # [K, B, H, N, D]
        by_mode, best = sample_errors(samples, future)
        for name, errors in by_mode.items():
            out.errors.add(name, errors, step_event)
        out.diversity.add(pairwise_diversity(samples))
        pooled = grid_pool(samples, out.probe_cells)  # [K, B, H, F]
        batch_index = torch.arange(pooled.shape[1], device=pooled.device)
        out.predicted_pooled.setdefault("best_of_k", []).append(_np(pooled[best, batch_index]))
        out.predicted_pooled.setdefault(HEALTH_SAMPLE, []).append(_np(pooled[0]))
        _keep_health(out, HEALTH_SAMPLE, samples[0])
        if num_strip:
            out.strip_samples.append(_np16(samples[:MAX_STRIP_SAMPLES, :num_strip].transpose(0, 1)))

    noisy = None
    if not latent.sampled:
        forecast = preds[latent.eval_modes[0][0]]  # prediction (none), action (oracle)
        noisy = _noisy_baseline(out, forecast, future, num_samples, step_event, generator)

    if out.decoder is not None:
        _score_pixels(out, preds, samples, noisy, future, frames, num_context, step_event, num_strip)

    if out.leakage is not None:
        out.leakage.add(model, online, target, events, keep_features=batch.get("state") is not None)

    if latent.readouts:
        inferred = model.infer_latents(online, target)
        readout = latent.readouts
        for key in (*readout["features"], readout["detector"]):
            out.latents.setdefault(key, []).append(_np(inferred[key]))

    out.target_pooled.append(_np(pool(target)))
    out.target_probe.append(_np(grid_pool(target, out.probe_cells)))
    out.target_tokens.append(_np16(target))
    out.online_pooled.append(_np(pool(online)))
    out.frames.append(batch["frames"].cpu().numpy())
    for key in ("state", "labels", "action", "events", "fps"):
        if batch.get(key) is not None:
            getattr(out, key).append(batch[key].cpu().numpy())
    for key in ("state_names", "label_names", "action_names"):
        if batch.get(key) is not None:
            out.names.setdefault(key, list(batch[key]))


def _keep_health(out: Collected, name: str, tokens: torch.Tensor) -> None:
    """Keep what `rollout_metrics.rollout_health` needs of latents [B, H, N, D]: their mean square over patches and
    dims [B, H] and their mean over patches [B, H, D]."""
    out.health_sq.setdefault(name, []).append(_np(tokens.float().square().mean(dim=(-2, -1))))
    out.health_mean.setdefault(name, []).append(_np(pool(tokens)))


def _noisy_baseline(
    out: Collected,
    forecast: torch.Tensor,
    future: torch.Tensor,
    k: int,
    step_event: torch.Tensor | None,
    generator: torch.Generator | None,
) -> torch.Tensor | None:
    """Score `noisy_best_of_k` of a deterministic forecast; returns its K futures [K, B, H, N, D], or None when no
    other clip was there to fit the noise on (a first batch of fewer than 3 clips).

    forecast, future: [B, H, N, D]. The noise std per clip, step and element is fitted on the forecast's errors on
    the other clips of the batch (leave one out), and, for a batch of fewer than NOISE_FIT_CLIPS clips, on those of
    the batch before it too. The best future is chosen, and all modes scored, by `sample_errors`, as `best_of_k`.
    """
    errors = forecast.float() - future.float()
    extra = out.last_errors if len(errors) < NOISE_FIT_CLIPS else None
    out.last_errors = errors
    try:
        std = loo_error_std(errors, extra)
    except ValueError:
        return None
    samples = noisy_samples(forecast, std, k, generator)
    by_mode, best = sample_errors(samples, future)
    out.errors.add("noisy_best_of_k", by_mode["best_of_k"], step_event)
    pooled = grid_pool(samples, out.probe_cells)  # [K, B, H, F]
    index = torch.arange(len(best), device=best.device)
    out.predicted_pooled.setdefault("noisy_best_of_k", []).append(_np(pooled[best, index]))
    return samples


def _deterministic_pixel_errors(pixels: torch.Tensor, truth: torch.Tensor) -> dict[str, torch.Tensor]:
    """pixel_errors of one decoded forecast plus its energy score (its RMS pixel error). pixels, truth: float
    [B, H, h, w, c] in [0, 1]. Returns {"mse", "psnr", "ssim", "energy_score"}, each [B, H]."""
    return {**pixel_errors(pixels, truth), "energy_score": energy_score(pixels.unsqueeze(0), truth, frame_dims=3)}


def _pixel_ensemble(pictures: torch.Tensor, truth: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """Best-of-K (per clip the future with the lowest pixel MSE over the horizon) and mean-of-K pixel errors of K
    decoded futures, each with the ensemble's energy score and spread-skill squares in pixels.

    pictures: [K, B, H, h, w, c]; truth: [B, H, h, w, c]. Returns {"best_of_k": {name: [B, H]}, "mean_of_k": ...}.
    """
    errors = pixel_errors(pictures, truth.unsqueeze(0).expand_as(pictures))  # each [K, B, H]
    best = errors["mse"].mean(dim=-1).argmin(dim=0)  # [B]
    index = torch.arange(best.shape[0], device=best.device)
    ensemble = ensemble_scores(pictures, truth, frame_dims=3)
    return {
        "best_of_k": {**{k: v[best, index] for k, v in errors.items()}, **ensemble},
        "mean_of_k": {**{k: v.mean(dim=0) for k, v in errors.items()}, **ensemble},
    }


def _score_pixels(
    out: Collected,
    preds: dict[str, torch.Tensor],
    samples: torch.Tensor | None,
    noisy: torch.Tensor | None,
    future: torch.Tensor,
    frames: torch.Tensor,
    num_context: int,
    step_event: torch.Tensor | None,
    num_strip: int,
) -> None:
    """Decode every mode's predicted latents with `out.decoder` and add their pixel errors against the true future
    frames to `out.pixels`; keep the decoded rows of the strip clips.

    preds: mode -> [B, H, N, D]; samples: [K, B, H, N, D] or None; noisy: the K noisy futures of a deterministic
    forecast [K, B, H, N, D] or None; future: the true frames' target latents [B, H, N, D]; frames: uint8
    [B, T, h, w, c]. Rows: `decoder_limit` (the decoder on the true target latents: the decoder's own share of every
    decoded error), `copy_last` (the last context frame's real pixels, the same for every model), each rollout
    mode, and best-of-K / mean-of-K of the decoded samples (best chosen per clip by its pixel MSE over the horizon),
    and `noisy_best_of_k` of the decoded noisy futures, chosen the same way. Every row has its energy score in
    pixels; the K-future rows that of all K decoded futures, and their spread-skill squares.
    """
    decoder, horizon = out.decoder, future.shape[1]
    truth = to_unit(frames[:, num_context : num_context + horizon])  # [B, H, h, w, c]
    decoded = {
        "copy_last": to_unit(frames[:, num_context - 1 : num_context]).expand_as(truth),
        "decoder_limit": decoder(future),
    }
    by_tensor: dict[int, torch.Tensor] = {}  # an alias (prior_mean of a `none` run) is the same tensor: decode once
    for name, pred in preds.items():
        if name != "copy_last":
            if id(pred) not in by_tensor:
                by_tensor[id(pred)] = decoder(pred)
            decoded[name] = by_tensor[id(pred)]
    for name, pixels in decoded.items():
        out.pixels.add(name, _deterministic_pixel_errors(pixels, truth), step_event)
    # strip rows, in reading order: decoded truth, the deterministic rollout, K samples, posterior, copy-last
    rows = {"decoded truth": decoded["decoder_limit"]}
    main = next(name for name in ("prediction", "prior_mean", "action") if name in decoded)
    rows[main] = decoded[main]
    if samples is not None:
        pictures = decoder(samples)  # [K, B, H, h, w, c]
        for name, errors in _pixel_ensemble(pictures, truth).items():
            out.pixels.add(name, errors, step_event)
        rows.update({f"sample {k + 1}": pictures[k] for k in range(min(MAX_STRIP_SAMPLES, len(pictures)))})
    if noisy is not None:
        out.pixels.add("noisy_best_of_k", _pixel_ensemble(decoder(noisy), truth)["best_of_k"], step_event)
    if "posterior" in decoded:
        rows["posterior"] = decoded["posterior"]
    rows["copy_last"] = decoded["copy_last"]
    if num_strip:
        for label, pixels in rows.items():
            out.decoded_strips.setdefault(label, []).append(_uint8(pixels[:num_strip]))


def _uint8(pixels: torch.Tensor) -> np.ndarray:
    """float [..., h, w, c] in [0, 1] -> uint8 numpy."""
    return (pixels.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
