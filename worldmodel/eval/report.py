"""A readable markdown report from an evaluation's metrics dict (the metrics.json contract).

`render_report` assembles report.md: the run, the rollout errors in pixels (decoded) and in latents (the sections
here), then the sections of report_readouts.py (probes, rollout health, latent action, leakage, collapse), the
figures and the notes.
"""

from __future__ import annotations

from worldmodel.eval.report_readouts import (
    collapse_section,
    latent_action_section,
    leakage_section,
    probe_section,
    rollout_health_section,
)
from worldmodel.eval.report_tables import SPLIT_HELP, SPLIT_NAMES, SPLITS, over_copy_last, table

MODE_HELP = {
    "copy_last": "baseline: the last context frame's target latents repeated (predicts that nothing changes)",
    "prediction": "the deterministic prediction of a `none` (plain JEPA) model (also filed as `prior_mean`)",
    "prior_mean": "r set to the prior mean at every step",
    "best_of_k": "K futures with r ~ prior; per clip the one future with the lowest horizon-averaged L1 (chosen with "
    "the answer: a coverage diagnostic, not a forecast; its energy score is that of all K futures)",
    "mean_of_k": "K futures with r ~ prior; the average error of one sampled future (energy score: all K futures)",
    "noisy_best_of_k": "baseline for a deterministic model: K futures = its forecast + Gaussian noise of its own "
    "per-dimension error std (fitted on other clips), the best chosen as for `best_of_k`; energy score of all K",
    "posterior": "r inferred from the true future (an upper bound, not a forecast)",
    "zero": "r = 0 at every step",
    "action": "oracle: the true per-transition actions condition the predictor",
}


def _mode_help(modes: dict, meanings: dict[str, str]) -> list[str]:
    """The "| mode | meaning |" table of the modes present, and a blank line."""
    return ["| mode | meaning |", "|---|---|", *[f"| `{m}` | {meanings.get(m, '')} |" for m in modes], ""]


ES_HELP = (
    "**Energy score** (Gneiting & Raftery 2007), ES = E||X - y|| - 1/2 E||X - X'|| over the K futures of a mode (the "
    "pair term unbiased, over i != j), the norm over the whole frame divided by sqrt(its number of elements): the "
    "scale of an RMS error. A proper scoring rule, lower is better: a deterministic mode scores its RMS error, a "
    "sampled ensemble gains only by spread that matches its error, so every row compares. `best_of_k`, "
    "`mean_of_k` and `noisy_best_of_k` carry the ES of all their K futures."
)
SPREAD_HELP = (
    "Spread-skill ratio of the K-future ensembles: RMS spread of the samples about their mean (with the "
    "finite-ensemble factor sqrt((K+1)/(K-1))) over the RMS error of the ensemble mean, over clips; 1 = calibrated, "
    "below 1 over-confident, above 1 over-dispersed."
)


def _split_tables(modes: dict, metric: str, title: str, steps: list[str], splits=SPLITS) -> list[str]:
    """One table per split present: `metric` [H] per mode (the modes that have it), headed by `title` and the
    split's name and clip counts."""
    out = []
    for split in splits:
        rows = [[f"`{m}`", *e[split][metric]] for m, e in modes.items() if metric in e.get(split, {})]
        if not rows:
            continue
        counts = next(e[split]["count"] for e in modes.values() if split in e)
        out += [
            f"### {title}, {split.replace('_', '-')} steps (clips per step: {counts})",
            "",
            table(["mode", *steps], rows),
            "",
        ]
    return out


def _spread_table(modes: dict, steps: list[str]) -> list[str]:
    """The spread-skill ratio per K-future mode and split, or nothing when no mode has one."""
    rows = [
        [f"`{m}`", split, *e[split]["spread_skill"]]
        for m, e in modes.items()
        for split in SPLITS
        if "spread_skill" in e.get(split, {})
    ]
    return [SPREAD_HELP, "", table(["mode", "split", *steps], rows), ""] if rows else []


def _error_section(metrics: dict) -> list[str]:
    horizon = metrics["horizon"]
    steps = [f"h={h}" for h in range(1, horizon + 1)]
    modes = metrics["modes"]
    out = [
        "## Rollout error against the target encoder's latents",
        "",
        "Open-loop rollouts from the context frames, errors per horizon step against the EMA target encoder's "
        "latents of the true frames: `l1` = mean |pred - target|, `l2` = mean squared difference, `cos` = mean "
        f"cosine distance over patches. {SPLIT_HELP}",
        "",
        *_mode_help(modes, MODE_HELP),
    ]
    out += _split_tables(modes, "l1", "L1", steps)
    if any("energy_score" in e.get("all", {}) for e in modes.values()):
        out += [f"{ES_HELP} In latent units here (the run's own normalised targets; read against `copy_last`).", ""]
        out += _split_tables(modes, "energy_score", "Energy score", steps)
        out += _spread_table(modes, steps)
    for metric in ("l2", "cos"):
        rows = [[f"`{m}`", *e["all"][metric]] for m, e in modes.items()]
        out += [f"### {metric}, all steps", "", table(["mode", *steps], rows), ""]
    if metrics.get("diversity") is not None:
        out += [
            "### Diversity of sampled futures",
            "",
            "Mean pairwise L1 between the K sampled futures (0 for a deterministic model).",
            "",
            table(steps, [metrics["diversity"]]),
            "",
        ]
    return out


DECODED_HELP = {
    "copy_last": "the last context frame's real pixels repeated (the same for every model on the same clips)",
    "decoder_limit": "the pixel decoder applied to the true frames' target latents: the decoder's own error",
    "best_of_k": "K futures with r ~ prior, decoded; per clip the one with the lowest pixel MSE over the horizon",
    "mean_of_k": "K futures with r ~ prior, decoded; the average error of one sampled future",
    "noisy_best_of_k": "baseline for a deterministic model: K futures = its forecast + Gaussian noise of its own "
    "per-dimension latent error std (fitted on other clips), decoded; per clip the one with the lowest pixel MSE over "
    "the horizon; energy score of all K",
}
DECODED_SPLITS = ("all", "no_event", "no_event_so_far", "event")  # the order of the decoded section's tables


def _decoded_section(metrics: dict) -> list[str]:
    decoded = metrics.get("decoded")
    if not decoded:
        return []
    record, modes = decoded["decoder"], decoded["modes"]
    steps = [f"h={h}" for h in range(1, metrics["horizon"] + 1)]
    how = "loaded from RUN_DIR/pixel_decoder" if record.get("reused") else f"trained now in {record['seconds']:.0f} s"
    out = [
        "## Decoded rollouts (pixel space, the same units for every model)",
        "",
        f"Every rollout decoded by the run's pixel decoder ({how}: {record['steps']} steps on {record['num_frames']} "
        f"frames of `{record['shards']}`, encoder frozen, world-model checkpoint step {record['checkpoint_step']}; "
        f"final training MSE {record['train_mse']:.5f}) and compared with the true frames: PSNR in dB (per frame, "
        "averaged; capped at 60), SSIM, and pixel MSE over copy-last's. `decoder_limit` shows what part of the error "
        "is the decoder's.",
        "",
        *_mode_help(modes, {**MODE_HELP, **DECODED_HELP}),
    ]
    for split in DECODED_SPLITS:
        rows = [[f"`{m}`", *e[split]["psnr"]] for m, e in modes.items() if split in e]
        if rows:
            out += [f"### PSNR (dB), {SPLIT_NAMES[split]} steps", "", table(["mode", *steps], rows), ""]
    for split in ("no_event", "no_event_so_far", "event"):
        rows = [[f"`{m}`", *(over_copy_last(modes, m, split) or [])] for m in modes if m != "copy_last"]
        rows = [r for r in rows if len(r) > 1]
        if rows:
            out += [f"### Pixel MSE over copy-last, {SPLIT_NAMES[split]} steps", "", table(["mode", *steps], rows), ""]
    if any("energy_score" in e.get("all", {}) for e in modes.values()):
        out += [f"{ES_HELP} Here of the decoded frames, pixels in [0, 1]: RMS pixel-error units.", ""]
        out += _split_tables(modes, "energy_score", "Energy score (pixels)", steps, DECODED_SPLITS)
        out += _spread_table(modes, steps)
    rows = [[f"`{m}`", *e["all"]["ssim"]] for m, e in modes.items()]
    out += ["### SSIM, all steps", "", table(["mode", *steps], rows), ""]
    return out


def _step_line(metrics: dict) -> list[str]:
    """How much video one step spans, e.g. "One step = 0.1 s of video (frame_step 1 at 10 fps); horizon 8 = 0.8 s.",
    and a blank line; nothing for a metrics dict without the keys (older than them)."""
    if "seconds_per_step" not in metrics:
        return []
    seconds, frame_step = metrics["seconds_per_step"], metrics.get("frame_step")
    if seconds is None:
        return [f"One step = frame_step {frame_step} frame(s) of video; the shards give no fps: no seconds.", ""]
    return [
        f"One step = {seconds:.3g} s of video (frame_step {frame_step} at {metrics['fps']:g} fps); horizon "
        f"{metrics['horizon']} = {metrics['horizon_seconds'][-1]:.3g} s.",
        "",
    ]


def render_report(metrics: dict) -> str:
    """The report.md text for one evaluation's metrics dict."""
    out = [
        f"# Evaluation of `{metrics['run']}`",
        "",
    ]
    if not metrics.get("finished", True):
        out += [
            f"> **Warning: unfinished run**, evaluated at step {metrics['checkpoint_step']} of "
            f"train.steps={metrics['train_steps']}; resume it (`--resume auto`) and evaluate again.",
            "",
        ]
    out += [
        table(
            ["checkpoint step", "latent", "shards", "clips", "context", "horizon", "K samples"],
            [
                [
                    metrics["checkpoint_step"],
                    metrics["latent"],
                    f"`{metrics['shards']}`",
                    metrics["num_clips"],
                    metrics["num_context"],
                    metrics["horizon"],
                    metrics["num_samples"],
                ]
            ],
        ),
        "",
        *_step_line(metrics),
    ]
    out += _decoded_section(metrics)
    out += _error_section(metrics)
    out += probe_section(metrics)
    out += rollout_health_section(metrics)
    out += latent_action_section(metrics)
    out += leakage_section(metrics)
    out += collapse_section(metrics)
    if metrics.get("plots"):
        out += ["## Figures", "", metrics["pixels"], ""]
        out += [f"![{name}]({name})" for name in metrics["plots"]]
        out.append("")
    if metrics.get("notes"):
        out += ["## Notes", "", *[f"- {note}" for note in metrics["notes"]], ""]
    return "\n".join(out)
