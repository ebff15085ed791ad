"""The sections of report.md that follow the rollout errors (report.py assembles the report): the probes, where
rollouts break (norm, rank and probe-read positions along the rollout), the latent-action probe, leakage and transfer
of an inferred r, collapse and drift.
"""

from __future__ import annotations

from worldmodel.eval.report_tables import SPLIT_HELP, SPLITS, fmt, table
from worldmodel.model.monitors import TARGET_HEALTH_KEYS


def probe_section(metrics: dict) -> list[str]:
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


def rollout_health_section(metrics: dict) -> list[str]:
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


def latent_action_section(metrics: dict) -> list[str]:
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


def leakage_section(metrics: dict) -> list[str]:
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


def collapse_section(metrics: dict) -> list[str]:
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
