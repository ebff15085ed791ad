"""The figures of one evaluation, written into RUN_DIR/eval beside metrics.json: errors.png, probes.png,
rollout_health.png, the retrieval strips (strip-XX.png) and, with pixel metrics, psnr.png and the decoded strips and
GIFs (decoded-strip-XX.png, decoded-XX.gif). What each one draws is in plots.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from worldmodel.eval.collect import STRIP_MODES, Collected
from worldmodel.eval.plots import (
    nearest_frames,
    plot_errors,
    plot_probes,
    plot_rollout_health,
    plot_strip,
    write_rollout_gif,
)


def write_plots(collected: Collected, metrics: dict, out_dir: Path) -> list[str]:
    """Write the PNG figures into out_dir; returns their file names. Strips are drawn for the clips whose predicted
    token grids `collected` kept (its first `num_strips` clips)."""
    written = ["errors.png"]
    plot_errors(metrics["modes"], out_dir / "errors.png", seconds_per_step=metrics.get("seconds_per_step"))
    if metrics["probes"].get("predicted"):
        plot_probes(metrics["probes"]["predicted"], metrics["probes"]["encoded"], out_dir / "probes.png")
        written.append("probes.png")
    position = metrics["probes"].get("position_error", {}).get("splits")
    plot_rollout_health(metrics["rollout_health"], position, out_dir / "rollout_health.png")
    written.append("rollout_health.png")
    frames = collected.stacked("frames")  # uint8 [C, T, H, W, C]
    bank = torch.from_numpy(rearrange(collected.stacked("target_tokens"), "c t n d -> (c t) n d"))  # float16
    flat_frames = rearrange(frames, "c t h w ch -> (c t) h w ch")
    num_context, horizon = metrics["num_context"], metrics["horizon"]
    predicted = {mode: np.concatenate(parts) for mode, parts in collected.strip_tokens.items()}  # [S, H, N, D]
    samples = collected.stacked("strip_samples")  # [S, k, H, N, D] or None
    for clip in range(min(collected.num_strips, len(frames))):
        rows = {}
        for mode in STRIP_MODES:
            if mode in predicted and not (mode == "prior_mean" and "prediction" in rows):
                rows[mode] = predicted[mode][clip]
        if samples is not None:
            rows.update({f"sample {k + 1}": s for k, s in enumerate(samples[clip])})
        futures = {
            label: flat_frames[nearest_frames(torch.from_numpy(tokens), bank).numpy()] for label, tokens in rows.items()
        }
        name = f"strip-{clip:02d}.png"
        plot_strip(
            frames[clip, :num_context],
            frames[clip, num_context : num_context + horizon],
            futures,
            out_dir / name,
            title=f"clip {clip}: context | true future; predicted rows by nearest-neighbour retrieval",
        )
        written.append(name)
    written += write_decoded(collected, metrics, out_dir)
    return written


def write_decoded(collected: Collected, metrics: dict, out_dir: Path) -> list[str]:
    """psnr.png (PSNR against horizon, one line per mode) and, per strip clip, decoded-strip-XX.png and
    decoded-XX.gif (the rollouts through the pixel decoder); nothing without pixel metrics."""
    if not metrics.get("decoded"):
        return []
    plot_errors(
        metrics["decoded"]["modes"],
        out_dir / "psnr.png",
        metric="psnr",
        ylabel="PSNR (dB) of decoded frames",
        seconds_per_step=metrics.get("seconds_per_step"),
    )
    written = ["psnr.png"]
    frames = collected.stacked("frames")  # uint8 [C, T, h, w, c]
    rows = {label: np.concatenate(parts) for label, parts in collected.decoded_strips.items()}  # [S, H, h, w, c]
    num_context, horizon = metrics["num_context"], metrics["horizon"]
    num_clips = min(len(rows["copy_last"]), len(frames)) if rows else 0  # every row holds the same strip clips
    for clip in range(num_clips):
        context, truth = frames[clip, :num_context], frames[clip, num_context : num_context + horizon]
        clip_rows = {label: row[clip] for label, row in rows.items()}
        name = f"decoded-strip-{clip:02d}.png"
        plot_strip(
            context,
            truth,
            clip_rows,
            out_dir / name,
            title=f"clip {clip}: context | true future; every further row decoded by the run's pixel decoder",
        )
        write_rollout_gif(context, truth, clip_rows, out_dir / f"decoded-{clip:02d}.gif")
        written += [name, f"decoded-{clip:02d}.gif"]
    return written
