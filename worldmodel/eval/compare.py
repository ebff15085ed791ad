"""Side-by-side headline numbers of several evaluated runs: `evaluate.py --compare RUN_A RUN_B ...`.

Reads RUN/eval/metrics.json of every run and writes OUTPUT/compare.md and OUTPUT/compare.json:

    {"runs": [run dir, ...], "labels": [column label, ...],
     "rows": [{"name": str, "values": [value per run]}, ...], "warnings": [str, ...], "notes": [str, ...]}

`warnings` flag what makes the columns not like for like: an unfinished run (evaluated before it reached its
train.steps) and runs evaluated at different training budgets (checkpoint steps). They head compare.md, and
`evaluate.py --compare` prints them.

A value is a number, a list [at h=1, at mid horizon, at h=H] for rollout errors, or null where the run does not
have that number (e.g. no posterior mode for a plain JEPA run).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from worldmodel.eval import EvaluationError
from worldmodel.eval.plots import plot_errors
from worldmodel.eval.report_tables import SPLIT_NAMES, fmt, over_copy_last, table

HEADLINE_STEPS = (1, 4, 8)  # horizon steps of the headline table (those within each run's horizon)
# the forecast, then what applies per latent; a best-of-K is read against the noise-matched `noisy_best_of_k`
HEADLINE_MODES = ("prior_mean", "action", "best_of_k", "noisy_best_of_k", "posterior")
# `prediction` (latent none) is left out: the same numbers are filed as `prior_mean`, which every run can line up on
MODE_ORDER = ("copy_last", "prior_mean", "best_of_k", "mean_of_k", "noisy_best_of_k", "posterior", "zero", "action")
ALL_SPLITS = ("all", "event", "no_event", "no_event_so_far")


def load_metrics(run_dir: str | Path) -> dict:
    """RUN_DIR/eval/metrics.json, or an EvaluationError saying how to make it."""
    path = Path(run_dir) / "eval" / "metrics.json"
    if not path.is_file():
        raise EvaluationError(
            f"{path} does not exist; evaluate the run first: python evaluate.py --run {run_dir} --shards GLOB"
        )
    return json.loads(path.read_text())


def horizon_points(horizon: int) -> list[int]:
    """The horizon steps a comparison shows: 1, the middle and H (deduplicated, in order)."""
    return sorted({1, (horizon + 1) // 2, horizon})


def _at(values: list | None, steps: list[int]) -> list | None:
    return None if values is None else [values[h - 1] for h in steps]


def headline_rows(all_metrics: list[dict]) -> list[dict[str, Any]]:
    """The comparison rows: rollout L1 and energy score (latent) per mode and split, probes, label accuracy,
    latent-action AUCs, collapse."""
    rows: list[dict[str, Any]] = []
    points = [horizon_points(m["horizon"]) for m in all_metrics]

    def add(name: str, get) -> None:
        values = [get(m, p) for m, p in zip(all_metrics, points, strict=True)]
        if any(v is not None for v in values):
            rows.append({"name": name, "values": values})

    present = {mode for m in all_metrics for mode in m["modes"]}
    for mode in [m for m in MODE_ORDER if m in present] + sorted(present - {*MODE_ORDER, "prediction"}):
        for metric, name in (("l1", "L1"), ("energy_score", "ES")):
            for split in ALL_SPLITS:
                add(
                    f"{name} {mode} ({split})",
                    lambda m, p, mode=mode, split=split, metric=metric: _at(
                        m["modes"].get(mode, {}).get(split, {}).get(metric), p
                    ),
                )
    add("diversity of K futures", lambda m, p: _at(m.get("diversity"), p))
    state_names = dict.fromkeys(n for m in all_metrics for n in m["probes"].get("encoded", {}))
    for name in state_names:
        add(f"probe R² {name} (encoded)", lambda m, p, name=name: m["probes"].get("encoded", {}).get(name))
        for mode in ("copy_last", "prior_mean", "posterior"):
            add(
                f"probe R² {name} ({mode})",
                lambda m, p, name=name, mode=mode: _at(m["probes"].get("predicted", {}).get(mode, {}).get(name), p),
            )
    for label in dict.fromkeys(n for m in all_metrics for n in m["probes"].get("labels", {})):
        add(f"label accuracy {label}", lambda m, p, label=label: m["probes"].get("labels", {}).get(label))
    add("KL (detector) event AUC", lambda m, p: ((m.get("latent_action") or {}).get("detector") or {}).get("event_auc"))
    for key, what in (("event_auc", "event AUC"), ("action_r2_mean", "action R² (mean)")):
        add(f"latent headline {what}", lambda m, p, key=key: _headline(m).get(key))
        add(f"latent mu_q {what}", lambda m, p, key=key: _feature(m, "mu_q").get(key))
    for encoder in ("online", "target"):
        add(
            f"effective rank ({encoder} encoder)",
            lambda m, p, e=encoder: (m.get("collapse") or {}).get(e, {}).get("emb_eff_rank"),
        )
    return rows


def headline(labels: list[str], all_metrics: list[dict]) -> dict:
    """The comparison in shared units, one row per run and rollout mode: pixel PSNR (dB), energy score and error over
    copy-last at h = 1, 4, 8, unkicked and kicked, the KL kick AUC and the checkpoint step.

    Error over copy-last is the pixel MSE over copy-last's pixel MSE where the run has pixel metrics (evaluate.py
    --pixels), else its latent L1 over its own copy-last L1 (marked `latent`); the energy score is in the same
    units (pixels, or the run's own latent units). Returns {"splits", "steps", "rows": [{"run", "mode", "step",
    "units", "psnr": {split: [..]}, "energy_score": {split: [..]}, "over_copy_last": {split: [..]},
    "position_error": [..], "kick_auc"}]}; a list holds one value per headline step, None where it does not apply.
    position_error: the RMSE of the position columns of the state (pixels in the built-in worlds) read from the
    predicted latents by a probe fitted on the run's encoded true frames (for decoder_limit: on the true frames).
    """
    splits = ["no_event", "event"] if any("event" in m["modes"].get("copy_last", {}) for m in all_metrics) else ["all"]
    horizon = max(m["horizon"] for m in all_metrics)
    steps = [h for h in HEADLINE_STEPS if h <= horizon] or [horizon]
    rows = []
    if any(m.get("decoded") for m in all_metrics):
        base = next(m for m in all_metrics if m.get("decoded"))
        rows.append(_headline_row("any run", base, "copy_last", splits, steps))
    for label, m in zip(labels, all_metrics, strict=True):
        present = m["decoded"]["modes"] if m.get("decoded") else m["modes"]
        for mode in [x for x in HEADLINE_MODES if x in present]:
            rows.append(_headline_row(label, m, mode, splits, steps))
        if m.get("decoded"):
            rows.append(_headline_row(label, m, "decoder_limit", splits, steps))
    return {"splits": splits, "steps": steps, "rows": rows}


def _headline_row(label: str, m: dict, mode: str, splits: list[str], steps: list[int]) -> dict:
    def pick(values: list | None) -> list | None:
        return None if values is None else [values[h - 1] if h <= len(values) else None for h in steps]

    decoded = (m.get("decoded") or {}).get("modes")
    if decoded:
        psnr = {s: pick(decoded.get(mode, {}).get(s, {}).get("psnr")) for s in splits}
        over = {s: pick(over_copy_last(decoded, mode, s)) for s in splits}
        units = "pixels"
    else:
        psnr = {s: None for s in splits}
        over = {s: pick(over_copy_last(m["modes"], mode, s, metric="l1")) for s in splits}
        units = "latent"
    energy = {s: pick((decoded or m["modes"]).get(mode, {}).get(s, {}).get("energy_score")) for s in splits}
    if mode == "copy_last":
        over = {s: None for s in splits}
    kick_auc = ((m.get("latent_action") or {}).get("detector") or {}).get("event_auc")
    position = (m.get("probes") or {}).get("position_error") or {}
    if mode == "decoder_limit":
        position_error = None if "encoded" not in position else [position["encoded"]] * len(steps)
    else:
        position_error = pick(position.get("predicted", {}).get(mode))
    return {
        "run": label,
        "mode": mode,
        "step": m["checkpoint_step"] if label != "any run" else None,
        "units": units,
        "psnr": psnr,
        "energy_score": energy,
        "over_copy_last": over,
        "position_error": position_error,
        "kick_auc": kick_auc if mode in ("prior_mean", "action") else None,  # one per run: on its forecast row
    }


def render_headline(head: dict) -> str:
    """The headline table as markdown (cells list the values at the headline steps, h1 / h4 / h8)."""
    where = "/".join(f"h{h}" for h in head["steps"])
    header = ["run", "mode", "step"]
    header += [f"PSNR dB {SPLIT_NAMES[s]} ({where})" for s in head["splits"]]
    header += [f"ES {SPLIT_NAMES[s]} ({where})" for s in head["splits"]]
    header += [f"err ÷ copy-last {SPLIT_NAMES[s]} ({where})" for s in head["splits"]]
    header += [f"position error ({where})", "KL kick AUC"]

    def cells(values: list | None, digits: int) -> str:
        return "—" if values is None else " / ".join(fmt(v, digits) for v in values)

    rows = []
    for r in head["rows"]:
        unit = "" if r["units"] == "pixels" else " (latent)"
        rows.append(
            [
                r["run"],
                f"`{r['mode']}`{unit}",
                r["step"],
                *[cells(r["psnr"][s], 1) for s in head["splits"]],
                *[cells(r.get("energy_score", {}).get(s), 3) for s in head["splits"]],
                *[cells(r["over_copy_last"][s], 2) for s in head["splits"]],
                cells(r["position_error"], 2),
                fmt(r["kick_auc"], 3),
            ]
        )
    return table(header, rows)


def plot_psnr(labels: list[str], all_metrics: list[dict], path: Path) -> bool:
    """PSNR against horizon, one line per run and mode, one panel per split; False (nothing written) when no run
    has pixel metrics."""
    lines = {}
    for label, m in zip(labels, all_metrics, strict=True):
        for mode, entry in ((m.get("decoded") or {}).get("modes") or {}).items():
            if mode == "copy_last" and "copy_last" in lines:
                continue
            if mode in ("mean_of_k", "zero"):
                continue
            lines["copy_last" if mode == "copy_last" else f"{label}: {mode}"] = entry
    if not lines:
        return False
    plot_errors(lines, path, metric="psnr", ylabel="PSNR (dB) of decoded frames")
    return True


def _feature(metrics: dict, name: str) -> dict:
    return ((metrics.get("latent_action") or {}).get("features") or {}).get(name) or {}


def _headline(metrics: dict) -> dict:
    """The headline latent-action read-out (the innovation for adassl_v), or {} for runs without one."""
    latent = metrics.get("latent_action") or {}
    return _feature(metrics, latent["headline"]) if latent else {}


def _labels(run_dirs: list[str]) -> list[str]:
    names = [Path(r).name for r in run_dirs]
    return names if len(set(names)) == len(names) else [str(r) for r in run_dirs]


def budget_warnings(labels: list[str], all_metrics: list[dict]) -> list[str]:
    """Warnings for unfinished runs and for runs evaluated at different checkpoint steps (mixed budgets)."""
    warnings = []
    for label, m in zip(labels, all_metrics, strict=True):
        if m.get("finished") is False:
            warnings.append(
                f"{label} is unfinished: evaluated at step {m['checkpoint_step']} of train.steps={m['train_steps']}"
            )
        elif "finished" not in m:
            warnings.append(f"{label}: its metrics.json predates the finished flag; evaluate it again to know")
    steps = {label: m["checkpoint_step"] for label, m in zip(labels, all_metrics, strict=True)}
    if len(set(steps.values())) > 1:
        listed = ", ".join(f"{label} at step {s}" for label, s in steps.items())
        warnings.append(f"mixed budgets: the runs were evaluated at different training steps ({listed})")
    return warnings


def compare_runs(run_dirs: list[str | Path], output: str | Path) -> dict:
    """Write OUTPUT/compare.md and OUTPUT/compare.json for the evaluated runs; returns the JSON dict."""
    if len(run_dirs) < 1:
        raise EvaluationError("--compare needs at least one evaluated run directory")
    run_dirs = [str(r) for r in run_dirs]
    all_metrics = [load_metrics(r) for r in run_dirs]
    notes = []
    shards = {m.get("shards") for m in all_metrics}
    if len(shards) > 1:
        notes.append(f"the runs were evaluated on different shards ({sorted(map(str, shards))}); compare with care")
    horizons = {m["horizon"] for m in all_metrics}
    if len(horizons) > 1:
        notes.append(f"the runs were evaluated at different horizons {sorted(horizons)}; lists are each run's own")
    labels = _labels(run_dirs)
    without = [label for label, m in zip(labels, all_metrics, strict=True) if not m.get("decoded")]
    if without and len(without) < len(all_metrics):
        notes.append(
            f"no pixel metrics for {', '.join(without)}: its headline rows are latent L1 over its own copy-last, "
            "not comparable with the others' pixel figures; evaluate it with `evaluate.py --run RUN --shards GLOB "
            "--pixels`"
        )
    result = {
        "runs": run_dirs,
        "labels": labels,
        "rows": headline_rows(all_metrics),
        "warnings": budget_warnings(labels, all_metrics),
        "notes": notes,
        "headline": headline(labels, all_metrics),
    }

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    if plot_psnr(labels, all_metrics, output / "psnr.png"):
        result["plots"] = ["psnr.png"]
    (output / "compare.json").write_text(json.dumps(result, indent=2))
    (output / "compare.md").write_text(render_compare(result, all_metrics))
    return result


def render_compare(result: dict, all_metrics: list[dict]) -> str:
    """The compare.md text."""
    steps = {m["horizon"]: horizon_points(m["horizon"]) for m in all_metrics}
    where = "; ".join(f"H={h}: steps {'/'.join(map(str, p))}" for h, p in steps.items())
    rows = [
        [row["name"], *[("/".join(fmt(x, 3) for x in v) if isinstance(v, list) else v) for v in row["values"]]]
        for row in result["rows"]
    ]
    info = [
        [label, m["latent"], m["checkpoint_step"], m["num_clips"]]
        for label, m in zip(result["labels"], all_metrics, strict=True)
    ]
    out = ["# Comparison of evaluated runs", ""]
    if result["warnings"]:
        out += ["> **Not like for like:**", *[f"> - {w}" for w in result["warnings"]], ""]
    out += [
        "## Headline (shared units)",
        "",
        render_headline(result["headline"]),
        "",
        "PSNR of the frames decoded by each run's own pixel decoder (`evaluate.py --pixels`) against the true frames; "
        "ES: the energy score of the decoded futures (a proper score, lower is better, in RMS pixel-error units: a "
        "deterministic row scores its RMS error, `best_of_k` and `noisy_best_of_k` the ES of all their K futures, "
        "so read a best-of-K against the ES rows and against `noisy_best_of_k`, the deterministic forecast plus "
        "noise of its own error spread); "
        "err ÷ copy-last: pixel MSE over copy-last's (the last context frame's real pixels), so below 1 beats "
        "copy-last. Rows marked (latent) have no pixel metrics: their ratio is the run's latent L1 over its own "
        "copy-last and their ES in the run's own latent units (not comparable across runs). `decoder_limit`: "
        "the decoder on the true latents (the decoder's share of the error); position error: RMSE of the positions "
        "in the state (pixels) read from the predicted latents by a probe fitted on the run's encoded true frames "
        "(all steps; on `decoder_limit` rows: from the encoded true frames); KL kick AUC: the AdaSSL KL as a "
        "detector of kicked transitions.",
        "",
    ]
    if result.get("plots"):
        out += ["![PSNR against horizon](psnr.png)", ""]
    out += [
        "## All metrics",
        "",
        table(["run", "latent", "checkpoint step", "clips"], info),
        "",
        f"Rollout rows list L1 and the energy score (ES), both latent, at horizon steps ({where}); `—` = not "
        "applicable to that run.",
        "",
        table(["metric", *result["labels"]], rows),
        "",
    ]
    if result["notes"]:
        out += ["## Notes", "", *[f"- {n}" for n in result["notes"]], ""]
    return "\n".join(out)
