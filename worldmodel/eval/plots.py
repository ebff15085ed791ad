"""Figures of an evaluation: error against horizon, probe R² against horizon, where rollouts break (probe-read
position error, norm ratio and rank against horizon), frame strips (PNG) and decoded rollouts (animated GIF).

Predicted latents have no pixels of their own. Decoded strips and GIFs show them through the run's pixel decoder
(worldmodel/eval/pixel_decoder.py). A retrieval strip shows, for each predicted token grid, the real eval-set
frame whose target tokens are nearest by the full token grid (mean squared difference over all N x D elements, the
space the rollout errors are measured in; nearest-neighbour retrieval, no decoder). Pooling over patches first would
let the background decide: on a small object on a plain canvas every frame pools to nearly the same vector.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from einops import rearrange  # noqa: E402

R2_FLOOR = -1.0  # an R² below this (a probe far off on predicted latents) is drawn at the floor
SPLIT_TITLES = {
    "all": "all transitions",
    "event": "event transitions",
    "no_event": "no-event transitions",
    "no_event_so_far": "no event so far",
}


def plot_errors(
    modes: dict[str, dict],
    path: str | Path,
    metric: str = "l1",
    ylabel: str = "{metric} to target latents",
    seconds_per_step: float | None = None,
) -> None:
    """Error against horizon step, one line per mode, one panel per split (all / event / no_event /
    no_event_so_far); with `seconds_per_step`, a second x axis on top in seconds of video.

    modes: the metrics.json "modes" section ({mode: {split: {metric: [H]}}}), or the "decoded" one.
    """
    splits = _splits(modes)
    fig, axes = plt.subplots(1, len(splits), figsize=(4.5 * len(splits), 3.5), squeeze=False, sharey=True)
    _split_panels(axes[0], splits, modes, metric)
    if seconds_per_step:
        for ax in axes[0]:
            top = ax.secondary_xaxis("top", functions=(lambda h: h * seconds_per_step, lambda t: t / seconds_per_step))
            steps = ax.get_xticks()  # one tick per horizon step (_horizon_line), in seconds on top
            top.set_xticks(steps * seconds_per_step, labels=[f"{h * seconds_per_step:.3g}" for h in steps], fontsize=8)
            top.set_xlabel("seconds of video", fontsize=8)
    axes[0][0].set_ylabel(ylabel.format(metric=metric))
    axes[0][-1].legend(fontsize=8)
    _save(fig, path)


def _splits(modes: dict[str, dict]) -> list[str]:
    """The splits of SPLIT_TITLES that some mode has."""
    return [s for s in SPLIT_TITLES if any(s in entry for entry in modes.values())]


BASELINE_STYLES = {  # the copy-last baselines: black, dashed (latent copy) and dotted (its probe reading)
    "copy_last": {"color": "black", "linestyle": "--"},
    "copy_last_read": {"color": "black", "linestyle": ":"},
}


def _horizon_line(ax: plt.Axes, values: list[float | None], label: str, **style) -> None:
    """One line of values [H] against horizon step (None: a gap); the copy-last baselines in BASELINE_STYLES."""
    values = [np.nan if v is None else v for v in values]
    style = {"marker": "o", **style, **BASELINE_STYLES.get(label, {})}
    ax.plot(range(1, len(values) + 1), values, label=label, **style)
    ax.set_xlabel("horizon step")
    ax.set_xticks(range(1, len(values) + 1))
    ax.grid(alpha=0.3)


def _split_panels(axes, splits: list[str], modes: dict[str, dict], metric: str, colors: dict | None = None) -> None:
    """Into one axis per split: `metric` [H] against horizon step, one line per mode that has the split (in
    `colors[mode]` when given)."""
    for ax, split in zip(axes, splits, strict=True):
        for mode, entry in modes.items():
            if split in entry:
                _horizon_line(ax, entry[split][metric], mode, **({"color": colors[mode]} if colors else {}))
        ax.set_title(SPLIT_TITLES[split])


def plot_rollout_health(health: dict, position: dict[str, dict] | None, path: str | Path) -> None:
    """Where rollouts break. Top row (when `position` is given): the state probe's position error against horizon
    step, one panel per split, one line per mode. Bottom row: the predicted latents' RMS over the targets' (1 =
    the scale holds) and the effective rank of their patch-means over the clips, the targets' rank in gray.

    health: metrics["rollout_health"]; position: metrics["probes"]["position_error"]["splits"] ({mode: {split:
    {"rmse": [H]}}}) or None (shards without a position state).
    """
    splits = _splits(position) if position else []
    names = list(dict.fromkeys([*(position or {}), *health["modes"]]))  # one colour per mode in every panel
    colors = {name: f"C{i % 10}" for i, name in enumerate(names)}
    cols = max(2, len(splits))
    rows = 2 if splits else 1
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.5 * rows), squeeze=False)
    if splits:
        _split_panels(axes[0], splits, position, "rmse", colors)
        for ax in axes[0][1 : len(splits)]:
            ax.sharey(axes[0][0])
        axes[0][0].set_ylabel("probe-read position RMSE (state units)")
        axes[0][len(splits) - 1].legend(fontsize=7)
    ratio_ax, rank_ax = axes[-1][0], axes[-1][1]
    for mode, entry in health["modes"].items():
        _horizon_line(ratio_ax, entry["norm_ratio"], mode, color=colors[mode])
        _horizon_line(rank_ax, entry["eff_rank"], mode, color=colors[mode])
    ratio_ax.axhline(1.0, color="gray", linestyle=":")
    _horizon_line(rank_ax, health["target"]["eff_rank"], "target", color="gray", linestyle=":", marker="s")
    ratio_ax.set_title("RMS norm, predicted over target")
    rank_ax.set_title("effective rank over clips (patch means)")
    rank_ax.legend(fontsize=7)
    for ax in [*axes[-1][2:], *(axes[0][len(splits) :] if splits else [])]:
        ax.axis("off")
    _save(fig, path)


def plot_probes(predicted: dict[str, dict[str, list]], encoded: dict[str, float | None], path: str | Path) -> None:
    """Probe R² against horizon step, one panel per state variable, one line per mode; the dotted line is the R²
    on encoded true frames (what a perfect prediction would score). R² below R2_FLOOR is drawn at the floor."""
    names = list(encoded)
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.5 * cols, 3.0 * rows), squeeze=False)
    for ax, name in zip(axes.ravel(), names, strict=False):
        for mode, per_name in predicted.items():
            values = [np.nan if v is None else max(v, R2_FLOOR) for v in per_name[name]]
            style = {"color": "black", "linestyle": "--"} if mode == "copy_last" else {}
            ax.plot(range(1, len(values) + 1), values, marker="o", label=mode, **style)
        if encoded[name] is not None:
            ax.axhline(encoded[name], color="gray", linestyle=":", label="encoded")
        ax.set_title(name)
        ax.set_xlabel("horizon step")
        ax.set_ylim(R2_FLOOR - 0.05, 1.05)
        ax.set_xticks(range(1, len(next(iter(predicted.values()))[name]) + 1))
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(names) :]:
        ax.axis("off")
    axes[0][0].set_ylabel(f"probe R² (shown clipped at {R2_FLOOR})")
    axes[0][0].legend(fontsize=7)
    _save(fig, path)


def nearest_frames(queries: torch.Tensor, bank: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Index of the bank frame nearest to each query by the full token grid (mean squared difference over N x D).

    queries: [M, N, D] predicted token grids; bank: [F, N, D] target tokens of the eval frames (any float dtype,
    e.g. float16) -> int64 [M]. Distances are computed in float32, `chunk` bank frames at a time.
    """
    if queries.shape[1:] != bank.shape[1:]:
        raise ValueError(
            f"queries {tuple(queries.shape)} and bank {tuple(bank.shape)} must share the token grid [N, D]; "
            "pass predicted and target tokens of the same model"
        )
    flat = rearrange(queries.float(), "m n d -> m (n d)")
    best_dist = torch.full((len(flat),), float("inf"), device=flat.device)
    best_index = torch.zeros(len(flat), dtype=torch.int64, device=flat.device)
    for start in range(0, len(bank), chunk):
        block = rearrange(bank[start : start + chunk].to(flat.device, torch.float32), "f n d -> f (n d)")
        dist, index = torch.cdist(flat, block, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1)
        better = dist < best_dist
        best_dist = torch.where(better, dist, best_dist)
        best_index = torch.where(better, index + start, best_index)
    return best_index


def plot_strip(
    context: np.ndarray, truth: np.ndarray, futures: dict[str, np.ndarray], path: str | Path, title: str
) -> None:
    """One example as a grid: row 0 is context frames | true future; each further row one predicted future.

    context: uint8 [Tc, H, W, C]; truth: uint8 [Hz, H, W, C]; futures: {row label: uint8 [Hz, H, W, C]}
    (retrieved frames standing in for predicted latents).
    """
    num_context, horizon = len(context), len(truth)
    rows = 1 + len(futures)
    fig, axes = plt.subplots(rows, num_context + horizon, figsize=(1.2 * (num_context + horizon), 1.3 * rows))
    axes = np.asarray(axes).reshape(rows, num_context + horizon)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    for t, frame in enumerate(context):
        axes[0, t].imshow(frame)
        axes[0, t].set_title(f"ctx {t + 1}", fontsize=7)
    for h, frame in enumerate(truth):
        axes[0, num_context + h].imshow(frame)
        axes[0, num_context + h].set_title(f"true +{h + 1}", fontsize=7)
    axes[0, 0].set_ylabel("truth", fontsize=7)
    for row, (label, frames) in enumerate(futures.items(), start=1):
        for h, frame in enumerate(frames):
            axes[row, num_context + h].imshow(frame)
        axes[row, num_context].set_ylabel(label, fontsize=7)
    fig.suptitle(title, fontsize=8)
    _save(fig, path)


def write_rollout_gif(
    context: np.ndarray, truth: np.ndarray, rows: dict[str, np.ndarray], path: str | Path, scale: int = 4
) -> None:
    """An animated GIF of one decoded rollout: panels side by side (truth, then one per row), one GIF frame per
    clip frame; during the context every panel shows the real context frame, after it each panel its own future.

    context: uint8 [Tc, h, w, c]; truth: uint8 [Hz, h, w, c]; rows: {label: uint8 [Hz, h, w, c]}; `scale`: pixel
    upscaling (nearest) so that small frames stay readable. 400 ms per frame, looping.
    """
    from PIL import Image, ImageDraw  # matplotlib's dependency

    panels = {"truth": truth, **rows}
    h, w = truth.shape[1] * scale, truth.shape[2] * scale
    pad, top = 4, 14
    images = []
    for t in range(len(context) + len(truth)):
        canvas = Image.new("RGB", (len(panels) * (w + pad) + pad, h + top + 12), (255, 255, 255))
        draw = ImageDraw.Draw(canvas)
        for i, (label, frames) in enumerate(panels.items()):
            frame = context[t] if t < len(context) else frames[t - len(context)]
            picture = Image.fromarray(_rgb(frame)).resize((w, h), Image.NEAREST)
            x = pad + i * (w + pad)
            canvas.paste(picture, (x, top))
            draw.text((x, 1), label[: max(4, w // 6)], fill=(0, 0, 0))
        when = f"context {t + 1}" if t < len(context) else f"predicted +{t - len(context) + 1}"
        draw.text((pad, top + h + 1), when, fill=(200, 0, 0) if t >= len(context) else (0, 0, 0))
        images.append(canvas)
    images[0].save(path, save_all=True, append_images=images[1:], duration=400, loop=0)


def _rgb(frame: np.ndarray) -> np.ndarray:
    """uint8 [h, w, c] with c in 1, 3 (or more: the first three) -> uint8 [h, w, 3]."""
    return np.repeat(frame, 3, axis=-1) if frame.shape[-1] == 1 else frame[..., :3]


def _save(fig: plt.Figure, path: str | Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
