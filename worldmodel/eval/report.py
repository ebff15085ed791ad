"""A readable markdown report from an evaluation's metrics dict (the metrics.json contract)."""

from __future__ import annotations

from typing import Any

from worldmodel.monitors import TARGET_HEALTH_KEYS

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


def fmt(value: Any, digits: int = 4) -> str:
    """A number for a table cell; '—' for a missing value."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _mode_help(modes: dict, meanings: dict[str, str]) -> list[str]:
    """The "| mode | meaning |" table of the modes present, and a blank line."""
    return ["| mode | meaning |", "|---|---|", *[f"| `{m}` | {meanings.get(m, '')} |" for m in modes], ""]


SPLITS = ("all", "event", "no_event", "no_event_so_far")
SPLIT_HELP = (
    "A step counts as `event` when its predicted transition (the one producing that frame) is marked as an event in "
    "the sample metadata, `no_event` when it is not, and `no_event_so_far` when no transition from the end of the "
    "context up to and including its own is an event (what a model can know the future of)."
)
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


def _probe_section(metrics: dict) -> list[str]:
    probes = metrics.get("probes") or {}
    out = ["## Probes", ""]
    if "encoded" in probes:
        out += [
            f"Ridge probes (closed form, standardised features) fitted on {probes['num_fit_clips']} clips and scored "
            f"(R²) on {probes['num_test_clips']} held-out clips, reading the pooled (mean over patches) target "
            "latents. `pair` = consecutive frames concatenated (needed for velocities), `single` = one frame.",
            "",
            table(
                ["state", "R² encoded (pair)", "R² encoded (single frame)"],
                [[n, r, probes["encoded_single_frame"][n]] for n, r in probes["encoded"].items()],
            ),
            "",
            "Pair probe applied to predicted latents ([previous, current] along the rollout), R² per step:",
            "",
        ]
        rows = [
            [f"`{mode}`", name, *values]
            for mode, per_name in probes["predicted"].items()
            for name, values in per_name.items()
        ]
        steps = [f"h={h}" for h in range(1, metrics["horizon"] + 1)]
        out += [table(["mode", "state", *steps], rows), ""]
    if probes.get("labels"):
        out += [
            "Logistic-regression accuracy of discrete labels from single pooled frames (held-out clips):",
            "",
            table(["label", "accuracy"], [[n, a] for n, a in probes["labels"].items()]),
            "",
        ]
    return out


BREAK_STEPS = (1, 2, 4, 8)  # the horizon steps the "Where rollouts break" tables show (all are in metrics.json)


def _rollout_health_section(metrics: dict) -> list[str]:
    """The section "Where rollouts break": the norm ratio and rank of the predicted latents
    (metrics["rollout_health"]) and the probe-read position error per split
    (metrics["probes"]["position_error"]["splits"]), at BREAK_STEPS."""
    health = metrics.get("rollout_health")
    if not health:
        return []
    steps = [h for h in BREAK_STEPS if h <= metrics["horizon"]]
    header = [f"h={h}" for h in steps]

    def at(values: list) -> list:
        return [values[h - 1] for h in steps]

    out = [
        "## Where rollouts break",
        "",
        f"Drift of the predicted embedding, all {health['num_clips']} clips: the predicted latents' RMS over the true "
        "targets' RMS at that step (1: the scale holds; below 1 the rollout shrinks towards a mean, a blur of "
        "futures), and the effective rank of their patch means over the clips against the targets' (a rollout that "
        "forgets what tells clips apart loses rank). Sampled latents: `prior_sample`, the first sampled future. "
        "All steps: metrics.json and rollout_health.png.",
        "",
        "RMS norm, predicted over target:",
        "",
        table(["mode", *header], [[f"`{m}`", *at(e["norm_ratio"])] for m, e in health["modes"].items()]),
        "",
        "Effective rank of the patch means over the clips:",
        "",
        table(
            ["mode", *header],
            [["target", *at(health["target"]["eff_rank"])]]
            + [[f"`{m}`", *at(e["eff_rank"])] for m, e in health["modes"].items()],
        ),
        "",
    ]
    probes = metrics.get("probes") or {}
    position = probes.get("position_error") or {}
    if not position.get("splits"):
        return out
    out += [
        "Positions read along the rollout by the state probe of the Probes section (fitted on the "
        f"{probes['num_fit_clips']} fit clips' true frames, scored on the {probes['num_test_clips']} test clips): "
        f"RMSE over {', '.join(position['names'])} in state units; the probe's own error on true frames is "
        f"{fmt(position['encoded'])}. `copy_last_read`: the probe's reading of the last context frame, "
        f"held (copy-last in state space). {SPLIT_HELP}",
        "",
    ]
    splits = next(iter(position["splits"].values()))
    for split in SPLITS:
        if split not in splits:
            continue
        counts = at(splits[split]["count"])
        if not any(counts):
            continue
        rows = [[f"`{m}`", *at(e[split]["rmse"])] for m, e in position["splits"].items()]
        out += [
            f"### Probe-read position error, {split.replace('_', '-')} steps (test clips per step: {counts})",
            "",
            table(["mode", *header], rows),
            "",
        ]
    return out


def _latent_action_section(metrics: dict) -> list[str]:
    latent = metrics.get("latent_action")
    if not latent:
        return []
    out = [
        "## Latent-action probe",
        "",
        f"Per-transition latents from `model.infer_latents` on true pairs of frames; headline: `{latent['headline']}` "
        "(for adassl_v the innovation z = (mu_q - mu_p) / sigma_p; `mu_q` is the raw posterior mean). "
        "`action R²`: held-out ridge probe to the true action; `event AUC`: held-out logistic detector on [x, x²]; "
        "`||x|| AUC`: the norm itself as a detector.",
        "",
    ]
    rows = [
        [f"`{name}`", e.get("action_r2_mean"), e.get("event_auc"), e.get("event_auc_norm")]
        for name, e in latent["features"].items()
    ]
    out += [table(["feature", "action R² (mean)", "event AUC", "||x|| AUC"], rows), ""]
    det = latent.get("detector")
    if det:
        out += [
            f"Per-transition `{det['name']}` as an event detector (a healthy run is bimodal: low on deterministic "
            "transitions, high on events):",
            "",
            table(
                ["event AUC", "mean", "mean (event)", "mean (no event)"],
                [[det.get("event_auc"), det.get("mean"), det.get("mean_event"), det.get("mean_no_event")]],
            ),
            "",
        ]
        if det.get("mean_action_change") is not None:
            out += [
                "The same where the action differs from the transition before (on the push world: a change of intent) "
                "and where it repeats it:",
                "",
                table(
                    ["action-change AUC", "mean (action changes)", "mean (action repeats)"],
                    [[det.get("action_change_auc"), det.get("mean_action_change"), det.get("mean_action_same")]],
                ),
                "",
            ]
    return out


def _leakage_section(metrics: dict) -> list[str]:
    """The shuffled-r and transfer tables of an inferred latent (metrics["leakage"]), or nothing."""
    leakage = metrics.get("leakage")
    if not leakage:
        return []
    out = [
        "## Leakage and transfer of the inferred r",
        "",
        "One-step predictions of every transition t -> t+1 (teacher forced, as in training; t < "
        f"{leakage['skipped_transitions']} left out: too little context for the velocity) with r = the clip's own "
        "posterior mean (`own`), the "
        "posterior mean of the same transition of another clip of the batch (`shuffled`, a seeded derangement), and "
        "the prior mean; L1 against the target latents (the units of the rollout L1). An r that carries the "
        "transition, not its clip or the future frame, gives `shuffled` >= prior mean (ratio >= 1); below 1, a "
        "foreign r helps.",
        "",
        table(
            ["split", "own r", "shuffled r", "prior-mean r", "shuffled / prior", "transitions"],
            [
                [split, e["own"], e["shuffled"], e["prior_mean"], e["shuffled_over_prior"], e["count"]]
                for split, e in leakage["shuffle"].items()
            ],
        ),
        "",
    ]
    transfer = leakage.get("transfer")
    if transfer:
        disp, surprise = transfer["displacement"], transfer["surprise"]
        rows = [
            [
                n,
                *(disp[k][n] for k in ("transfer", "own", "prior_mean")),
                *(surprise[k][n] for k in ("transfer", "own")),
            ]
            for n in transfer["names"]
        ]
        out += [
            f"Transfer ({transfer['count']} transitions of {transfer['num_clips']} held-out clips B): r of clip A's "
            "transition applied to B's context; correlation, per position, of B's displacement read by the state "
            "probe (predicted next frame minus B's frame) with A's true displacement; `own r`: B's own r against "
            "B's move (upper reference); `prior mean`: against A's move (lower reference). `surprise`: the shift r "
            "gives B's forecast over the prior mean's, against A's (or B's) true position minus its prior forecast.",
            "",
            table(
                ["state", "transfer (r_A on B)", "own r", "prior mean", "surprise: transfer", "surprise: own r"], rows
            ),
            "",
        ]
    return out


def _collapse_section(metrics: dict) -> list[str]:
    collapse = metrics.get("collapse") or {}
    if not collapse:
        return []
    rows = [[name, *[values.get(k) for k in ("emb_std", "emb_eff_rank", "dim")]] for name, values in collapse.items()]
    target = collapse.get("target", {})
    out = [
        "## Collapse and drift",
        "",
        "Pooled normalised encoder outputs of every eval frame: mean per-dimension std and effective rank (exp of the "
        "entropy of the normalised singular values); a collapsed encoder has std near 0 and rank near 1.",
        "",
        table(["encoder", "per-dim std (mean)", "effective rank", "dims"], rows),
        "",
        "Normalised targets (what the predictor regresses): batch variance, effective rank, and the drift ratio, "
        "copy-last squared error over the target variance (0: frames identical; 2: consecutive frames as unrelated "
        "as random pairs; a rising value during training means the target space moves away from the motion).",
        "",
        table(
            ["where", "target variance", "target effective rank", "drift"],
            [["eval set", *[target.get(k) for k in TARGET_HEALTH_KEYS]]],
        ),  # fmt: skip
        "",
    ]
    history = metrics.get("training_health") or {}
    if history.get("step"):
        out += [
            "During training (`metrics.jsonl`, logged batch means at a few steps):",
            "",
            table(
                ["step", *TARGET_HEALTH_KEYS],
                [[history[k][i] for k in ("step", *TARGET_HEALTH_KEYS)] for i in range(len(history["step"]))],
            ),
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
SPLIT_NAMES = {"all": "all", "no_event": "unkicked", "event": "kicked", "no_event_so_far": "unkicked so far"}


def over_copy_last(modes: dict, mode: str, split: str, metric: str = "mse") -> list[float | None] | None:
    """`metric` of `mode` over copy-last's per horizon step (from a metrics.json "modes" or "decoded" modes
    section: pixel "mse", or latent "l1"), or None when either is missing."""
    ours = modes.get(mode, {}).get(split, {}).get(metric)
    base = modes.get("copy_last", {}).get(split, {}).get(metric)
    if ours is None or base is None:
        return None
    return [None if a is None or not b else a / b for a, b in zip(ours, base, strict=True)]


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
    ]
    out += _decoded_section(metrics)
    out += _error_section(metrics)
    out += _probe_section(metrics)
    out += _rollout_health_section(metrics)
    out += _latent_action_section(metrics)
    out += _leakage_section(metrics)
    out += _collapse_section(metrics)
    if metrics.get("plots"):
        out += ["## Figures", "", metrics["pixels"], ""]
        out += [f"![{name}]({name})" for name in metrics["plots"]]
        out.append("")
    if metrics.get("notes"):
        out += ["## Notes", "", *[f"- {note}" for note in metrics["notes"]], ""]
    return "\n".join(out)
