"""The sections of metrics.json that `runner.evaluate_run` computes from the collected rollouts once the pass over
the clips is done: the step length in seconds of video (`step_length`), the probes and the latent-action probe
(`run_probes`), leakage and transfer (`run_leakage`), where rollouts break (`rollout_health_section`), collapse
(`collapse_stats`), and the target monitors during training, read from the run's metrics.jsonl (`training_health`).
Schema: docs/metrics_schema.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from worldmodel.eval.collect import HEALTH_TARGET, MIN_CONTEXT_FRAMES, Collected
from worldmodel.eval.leakage import leakage_metrics
from worldmodel.eval.probe_suite import label_probes, latent_action_probes, state_probes
from worldmodel.eval.probes import split_clips
from worldmodel.eval.rollout_metrics import rollout_health
from worldmodel.model.monitors import TARGET_HEALTH_KEYS, effective_rank, per_dim_std, target_health
from worldmodel.run.config import ExperimentConfig


def present_fields(collected: Collected, num_clips: int) -> set[str]:
    """The optional fields every evaluated clip carries."""
    return {
        key
        for key in ("state", "labels", "action", "events")
        if sum(len(x) for x in getattr(collected, key)) == num_clips
    }


FPS_TOLERANCE = 0.01  # clips whose fps differ from the median by more than this share get a note


def step_length(fps: np.ndarray | None, frame_step: int, horizon: int, num_clips: int, notes: list[str]) -> dict:
    """How much video one model step spans: {"frame_step", "fps": the median of the clips' fps, "seconds_per_step":
    frame_step / fps, "horizon_seconds": [h * seconds_per_step for h = 1..horizon]}; fps and the seconds are None
    when no clip had an fps.

    fps: float64 [C'] the fps of the evaluated clips that carried one (batch["fps"]), or None. Notes go to `notes`:
    no fps at all; clips whose fps differ from the median by more than FPS_TOLERANCE (the median is used all the
    same); clips without an fps when others had one.
    """
    out = {"frame_step": frame_step, "fps": None, "seconds_per_step": None, "horizon_seconds": None}
    if fps is None or not len(fps):
        notes.append("the shards give no `fps` in KEY.json: the horizon is reported in steps only, not in seconds")
        return out
    median = float(np.median(fps))
    if np.abs(fps - median).max() > FPS_TOLERANCE * median:
        notes.append(
            f"the clips' fps disagree ({fps.min():g} to {fps.max():g}): one step is taken as data.frame_step / the "
            f"median fps {median:g}, which is off for some clips"
        )
    if len(fps) < num_clips:
        notes.append(f"only {len(fps)} of {num_clips} clips came in batches with an `fps`; the step length is theirs")
    seconds = frame_step / median
    out.update(fps=median, seconds_per_step=seconds, horizon_seconds=[h * seconds for h in range(1, horizon + 1)])
    return out


def run_probes(
    collected: Collected, cfg: ExperimentConfig, metrics: dict, seed: int, readout: dict | None
) -> tuple[dict, dict | None]:
    """State, label and latent-action probes; fields the shards lack are skipped with a note in metrics["notes"].

    readout: what the latent-action probe reads (the model's `latent.readouts`), or None for latents without one.
    """
    notes = metrics["notes"]
    present = present_fields(collected, metrics["num_clips"])
    if metrics["num_clips"] < 4:
        notes.append(f"only {metrics['num_clips']} clips: too few to fit and test probes; probes skipped")
        return {}, None
    fit, test = split_clips(metrics["num_clips"], seed)
    probes: dict = {"num_fit_clips": len(fit), "num_test_clips": len(test)}
    target_features = collected.stacked("target_probe")  # [C, T, F]: the token grid pooled to eval.probe_grid cells
    names = collected.names
    if "state" in present:
        predicted = {mode: np.concatenate(parts) for mode, parts in collected.predicted_pooled.items()}
        # a mode missing on some clips (noisy_best_of_k of a first batch with no other clip to fit on) is not probed
        predicted = {mode: x for mode, x in predicted.items() if len(x) == metrics["num_clips"]}
        probes.update(
            state_probes(
                target_features,
                predicted,
                collected.stacked("state"),
                names.get("state_names") or [f"state{i}" for i in range(collected.state[0].shape[-1])],
                metrics["num_context"],
                fit,
                test,
                cfg.eval.probe_ridge,
                collected.stacked("events") if "events" in present else None,
            )
        )
    else:
        notes.append("the shards have no `state` field (or not for every clip): state probes skipped")
    if "labels" in present:
        labels = collected.stacked("labels")
        label_names = names.get("label_names") or [f"label{i}" for i in range(labels.shape[-1])]
        probes["labels"], label_notes = label_probes(collected.stacked("target_pooled"), labels, label_names, fit, test)
        notes.extend(label_notes)
    else:
        notes.append("the shards have no `labels` field: label probes skipped")

    if not collected.latents or readout is None:
        return probes, None
    skip = MIN_CONTEXT_FRAMES - 1  # transitions without enough context to know the velocity (collect.py)
    latents = {key: np.concatenate(parts)[:, skip:] for key, parts in collected.latents.items()}
    latent_action, la_notes = latent_action_probes(
        {name: latents[name] for name in readout["features"]},
        (readout["detector"], latents[readout["detector"]]),
        collected.stacked("action")[:, skip:] if "action" in present else None,
        names.get("action_names"),
        collected.stacked("events")[:, skip:] if "events" in present else None,
        fit,
        test,
        cfg.eval.probe_ridge,
    )
    notes.extend(la_notes)
    notes.append(
        f"latent-action probe: transitions 0..{skip - 1} of each clip are left out (their context has fewer than "
        f"{MIN_CONTEXT_FRAMES} frames, so r must carry the velocity whether or not there was a kick)"
    )
    return probes, latent_action


def run_leakage(collected: Collected, cfg: ExperimentConfig, metrics: dict, seed: int) -> dict | None:
    """The leakage section (leakage.leakage_metrics): the shuffled-r check, and the transfer check on the probe's
    held-out clips when every clip has a state; None for a latent without a posterior (none, oracle). Notes go to
    metrics["notes"]."""
    if collected.leakage is None:
        return None
    present = present_fields(collected, metrics["num_clips"])
    fit = test = state = None
    if "state" in present and metrics["num_clips"] >= 4:
        fit, test = split_clips(metrics["num_clips"], seed)  # the state probes' split (run_probes)
        state = collected.stacked("state")
    out, notes = leakage_metrics(
        collected.leakage,
        collected.stacked("target_probe"),
        state,
        collected.names.get("state_names"),
        fit,
        test,
        cfg.eval.probe_ridge,
    )
    metrics["notes"].extend(notes)
    return out


def rollout_health_section(collected: Collected) -> dict:
    """metrics["rollout_health"]: `rollout_metrics.rollout_health` of every kept rollout (collect.Collected.health_*)
    over all eval clips, with their number."""
    sq = {name: np.concatenate(parts) for name, parts in collected.health_sq.items()}  # [C, H]
    mean = {name: np.concatenate(parts) for name, parts in collected.health_mean.items()}  # [C, H, D]
    target_sq, target_mean = sq.pop(HEALTH_TARGET), mean.pop(HEALTH_TARGET)
    return {"num_clips": len(target_sq), **rollout_health(sq, mean, target_sq, target_mean)}


def collapse_stats(collected: Collected) -> dict:
    """Per-dim std and effective rank of the pooled embeddings of every eval frame, online and target encoders;
    for the targets also their batch variance, the effective rank of the unpooled rows and the drift ratio
    (monitors.target_health: copy-last squared error over the target variance)."""
    out = {}
    for name, parts in (("online", collected.online_pooled), ("target", collected.target_pooled)):
        x = torch.from_numpy(np.concatenate(parts).reshape(-1, parts[0].shape[-1]))
        out[name] = {
            "emb_std": float(per_dim_std(x)),
            "emb_eff_rank": float(effective_rank(x)),
            "dim": int(x.shape[1]),
            "num_frames": int(x.shape[0]),
        }
    health = target_health(torch.from_numpy(collected.stacked("target_tokens")).float())
    out["target"].update({name: float(value) for name, value in health.items()})
    return out


def training_health(jsonl: Path, rows: int = 8) -> dict:
    """The target monitors (target_var, target_eff_rank, drift) at up to `rows` logged steps of the run's
    metrics.jsonl, evenly spaced, the first at or after step 100 and the last one included: {"step": [...],
    name: [...]}; empty when the log or the monitors are missing (runs older than the monitors)."""
    if not jsonl.is_file():
        return {}
    records = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    records = [r for r in records if all(k in r for k in TARGET_HEALTH_KEYS)]
    if not records:
        return {}
    late = [r for r in records if r["step"] >= 100] or records
    picks = sorted({round(i * (len(late) - 1) / max(1, rows - 1)) for i in range(rows)})
    chosen = [late[i] for i in picks]
    return {key: [r[key] for r in chosen] for key in ("step", *TARGET_HEALTH_KEYS)}
