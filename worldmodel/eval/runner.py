"""`evaluate.py --run RUN_DIR --shards GLOB`: load a trained run, roll it out on held-out shards, write the results.

Writes RUN_DIR/eval/metrics.json, RUN_DIR/eval/report.md and figures beside them (errors.png, probes.png when
the shards carry state, rollout_health.png, strip-XX.png per example; with `pixels` also psnr.png,
decoded-strip-XX.png and decoded-XX.gif). metrics.json, in short (full schema: docs/metrics_schema.md):

    {"run", "checkpoint", "checkpoint_step", "train_steps", "finished", "latent", "shards", "seed",
     "num_context", "horizon", "num_samples", "num_clips",
     "modes": {mode: {"all" | "event" | "no_event" | "no_event_so_far":
                      {"l1": [H], "l2": [H], "cos": [H], "energy_score": [H], "spread_skill": [H], "count": [H]}}},
     "decoded": {"decoder": {...}, "modes": {mode: {split: {"mse", "psnr", "ssim", "energy_score", "spread_skill",
                                                            "count": [H]}}}} | null,
     "diversity": [H] | null,
     "probes": {"num_fit_clips", "num_test_clips", "encoded": {state: r2}, "encoded_single_frame": {state: r2},
                "predicted": {mode: {state: [H]}}, "labels": {label: accuracy},
                "position_error": {"names", "encoded", "predicted": {mode: [H]},
                                   "splits": {mode | "copy_last_read": {split: {"rmse": [H], "count": [H]}}}}},
     "rollout_health": {"num_clips", "target": {"rms": [H], "eff_rank": [H]},
                        "modes": {mode | "prior_sample": {"norm_ratio": [H], "eff_rank": [H]}}},
     "latent_action": {"headline", "features": {name: {...}}, "detector": {...}} | null,
     "leakage": {"derangement_seed", "skipped_transitions", "num_clips", "unpaired_clips",
                 "shuffle": {"all" | "event" | "no_event": {"own", "shuffled", "prior_mean", "shuffled_over_prior",
                                                           "count"}},
                 "transfer": {"names", "num_clips", "count", "displacement": {"transfer" | "own" | "prior_mean":
                              {state: corr}}, "surprise": {"transfer" | "own": {state: corr}}} | null} | null,
     "collapse": {"online" | "target": {"emb_std", "emb_eff_rank", "dim", "num_frames"}},
     "pixels", "plots", "notes"}

modes: copy_last always; prediction (+ the same as prior_mean), noisy_best_of_k for none; prior_mean, posterior,
zero, best_of_k, mean_of_k for adassl_v / adassl_s; action, zero, noisy_best_of_k for oracle. l2 is a mean squared
difference; energy_score is in RMS-error units (a deterministic mode's is its RMS error); spread_skill only on the
K-future modes (best_of_k, mean_of_k, noisy_best_of_k: the ensemble's). leakage: the shuffled-r and transfer
checks of an inferred r (adassl_v / adassl_s; null for none and oracle; worldmodel/evaluation/leakage.py).
rollout_health (where a rollout breaks; all clips, no split): per step, each mode's predicted latents' RMS over the
true targets' and the effective rank of their patch-means over the clips (rollout_metrics.rollout_health; sampled
latents: `prior_sample`, the first sampled future). probes.position_error.splits: the state probe's position RMSE
along each rollout per split, on the probe's test clips, with `copy_last_read` (the last context frame's reading).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from einops import rearrange
from tqdm import tqdm

from data_pipeline.stream import make_eval_loader
from worldmodel.checkpoint import latest_checkpoint, load_model_state, read_finished, read_state
from worldmodel.config import ExperimentConfig, load_config
from worldmodel.evaluation import EvaluationError
from worldmodel.evaluation.collect import (
    HEALTH_TARGET,
    MIN_CONTEXT_FRAMES,
    STRIP_MODES,
    Collected,
    process_batch,
)
from worldmodel.evaluation.leakage import LeakageAccumulator, leakage_metrics
from worldmodel.evaluation.pixel_decoder import PIXEL_METRICS, fit_or_load
from worldmodel.evaluation.plots import (
    nearest_frames,
    plot_errors,
    plot_probes,
    plot_rollout_health,
    plot_strip,
    write_rollout_gif,
)
from worldmodel.evaluation.probe_suite import label_probes, latent_action_probes, state_probes
from worldmodel.evaluation.probes import split_clips
from worldmodel.evaluation.report import render_report
from worldmodel.evaluation.rollout_metrics import ErrorAccumulator, rollout_health
from worldmodel.model import WorldModel
from worldmodel.monitors import TARGET_HEALTH_KEYS, effective_rank, per_dim_std, target_health

PIXELS_NOTE = (
    "Retrieval strips (strip-XX.png): row 0 shows the context frames and the true future; every further row is one "
    "predicted future, each predicted latent shown as the real eval-set frame whose target latent (the frame "
    "embedding, or with granularity tokens the full token grid, not pooled) is nearest by mean squared difference, "
    "the space of the rollout errors (nearest-neighbour retrieval over all eval frames, the clip's own frames "
    "included). Decoded strips and GIFs (decoded-strip-XX.png, decoded-XX.gif, with --pixels) show the same "
    "rollouts through the run's pixel decoder instead."
)


def load_run(run_dir: str | Path, device: torch.device) -> tuple[ExperimentConfig, WorldModel, Path, int]:
    """The run's config, its model with the newest checkpoint's weights (eval mode, on `device`), the checkpoint
    directory and its step. Raises EvaluationError when the config or a complete checkpoint is missing."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise EvaluationError(f"{config_path} does not exist; --run must be a run directory written by train.py")
    cfg = load_config(config_path)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise EvaluationError(
            f"no complete checkpoint under {run_dir / 'checkpoints'}; train the run first (or wait for its first "
            f"checkpoint, written every train.checkpoint_every={cfg.train.checkpoint_every} steps)"
        )
    model = WorldModel(cfg.model)
    load_model_state(model, ckpt)
    return cfg, model.to(device).eval(), ckpt, int(read_state(ckpt)["step"])


def evaluated_final(run_dir: str | Path, pixels: bool = False) -> bool:
    """True when the run is finished (RUN_DIR/finished.json) and RUN_DIR/eval/metrics.json evaluates its final
    checkpoint (with pixel metrics, when `pixels`); False when it is unfinished, not evaluated, evaluated at another
    step, or without the pixel metrics asked for."""
    marker = read_finished(run_dir)
    path = Path(run_dir) / "eval" / "metrics.json"
    if marker is None or not path.is_file():
        return False
    metrics = json.loads(path.read_text())
    if pixels and not metrics.get("decoded"):
        return False
    return bool(metrics.get("finished")) and metrics.get("checkpoint_step") == marker["step"]


def evaluate_run(
    run_dir: str | Path,
    shards: str,
    *,
    horizon: int | None = None,
    num_samples: int | None = None,
    num_clips: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    progress: bool = True,
    pixels: bool = False,
) -> dict:
    """Evaluate the newest checkpoint of `run_dir` on `shards`; write RUN_DIR/eval/*; return the metrics dict.

    Unset options take the run config's `eval:` section. `pixels`: also decode every rollout through the run's
    pixel decoder (trained first on the run's training shards if RUN_DIR/pixel_decoder has none for this
    checkpoint) and score it in pixel space (metrics["decoded"]), with decoded strips and GIFs. Raises
    EvaluationError for a horizon longer than the clips' num_target frames, a run without config or checkpoint, or
    shards that give no clip.
    """
    run_dir = Path(run_dir)
    device = PartialState().device
    cfg, model, ckpt, step = load_run(run_dir, device)
    finished = step >= cfg.train.steps
    unfinished_note = None
    if not finished:
        unfinished_note = (
            f"unfinished run: its newest checkpoint is at step {step} of train.steps={cfg.train.steps}; these "
            f"numbers are not the trained model's. Continue it with `python train.py --config {run_dir}/config.yaml "
            f"run_dir={run_dir} --resume auto`, then evaluate again"
        )
        print(f"warning: {unfinished_note}", file=sys.stderr)
    horizon = horizon or cfg.eval.horizon
    num_samples = num_samples or cfg.eval.num_samples
    num_clips = num_clips or cfg.eval.num_clips
    batch_size = batch_size or cfg.eval.batch_size
    num_context = cfg.data.num_context
    if not 1 <= horizon <= cfg.data.num_target:
        raise EvaluationError(
            f"horizon {horizon} must be between 1 and data.num_target={cfg.data.num_target} (the frames after the "
            f"context in the run's clips); pass --horizon {cfg.data.num_target} or less"
        )
    decoder, decoder_record = None, None
    if pixels:
        decoder, decoder_record = fit_or_load(run_dir, model, cfg, step, device, progress=progress)
    generator = torch.Generator(device=device).manual_seed(seed)
    loader = make_eval_loader(cfg.data, shards, num_clips=num_clips, seed=seed, batch_size=batch_size)
    collected = Collected(
        errors=ErrorAccumulator(horizon),
        num_strips=cfg.eval.num_strips,
        probe_cells=cfg.eval.probe_grid,
        decoder=decoder,
        pixels=ErrorAccumulator(horizon, PIXEL_METRICS) if pixels else None,
        leakage=LeakageAccumulator(seed=seed, probe_cells=cfg.eval.probe_grid) if model.latent.inferred else None,
    )
    for batch in tqdm(loader, total=math.ceil(num_clips / batch_size), desc="evaluate", disable=not progress):
        process_batch(
            model,
            batch,
            collected,
            num_context=num_context,
            horizon=horizon,
            num_samples=num_samples,
            device=device,
            generator=generator,
        )
    if not collected.frames:
        raise EvaluationError(f"the shards {shards!r} gave no clips of {cfg.data.clip_length} frames; check the glob")

    metrics = {
        "run": str(run_dir),
        "checkpoint": str(ckpt),
        "checkpoint_step": step,
        "train_steps": cfg.train.steps,
        "finished": finished,
        "latent": cfg.model.latent,
        "shards": shards,
        "seed": seed,
        "num_context": num_context,
        "horizon": horizon,
        "num_samples": num_samples,
        "num_clips": int(sum(len(f) for f in collected.frames)),
        "modes": collected.errors.result(),
        "rollout_health": rollout_health_section(collected),
        "diversity": collected.diversity.result(),
        "decoded": None if decoder is None else {"decoder": decoder_record, "modes": collected.pixels.result()},
        "notes": [unfinished_note] if unfinished_note else [],
    }
    if "events" not in _present(collected, metrics["num_clips"]):
        metrics["notes"].append("the shards have no `events` field: errors are reported for all steps only")
    if metrics["diversity"] is None:
        metrics["notes"].append(
            f"latent={cfg.model.latent} has no sampled futures: diversity and best/mean-of-K n/a; noisy_best_of_k is "
            "its forecast plus Gaussian noise of its own per-dimension error std, fitted on the other clips of each "
            "batch (the baseline a stochastic model's best-of-K is to be read against)"
        )
    noisy = metrics["modes"].get("noisy_best_of_k", {}).get("all", {}).get("count")
    if noisy is not None and min(noisy) < metrics["num_clips"]:
        metrics["notes"].append(
            f"noisy_best_of_k scores {min(noisy)} of {metrics['num_clips']} clips: a first batch of fewer than 3 "
            "clips has no other clip to fit its noise on"
        )
    metrics["probes"], metrics["latent_action"] = run_probes(collected, cfg, metrics, seed, model.latent.readouts)
    metrics["leakage"] = run_leakage(collected, cfg, metrics, seed)
    metrics["collapse"] = collapse_stats(collected)
    metrics["training_health"] = training_health(run_dir / "metrics.jsonl")
    out_dir = run_dir / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics["pixels"] = PIXELS_NOTE
    metrics["plots"] = write_plots(collected, metrics, out_dir)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out_dir / "report.md").write_text(render_report(metrics))
    return metrics


def _present(collected: Collected, num_clips: int) -> set[str]:
    """The optional fields every evaluated clip carries."""
    return {
        key
        for key in ("state", "labels", "action", "events")
        if sum(len(x) for x in getattr(collected, key)) == num_clips
    }


def run_probes(
    collected: Collected, cfg: ExperimentConfig, metrics: dict, seed: int, readout: dict | None
) -> tuple[dict, dict | None]:
    """State, label and latent-action probes; fields the shards lack are skipped with a note in metrics["notes"].

    readout: what the latent-action probe reads (the model's `latent.readouts`), or None for latents without one.
    """
    notes = metrics["notes"]
    present = _present(collected, metrics["num_clips"])
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


def rollout_health_section(collected: Collected) -> dict:
    """metrics["rollout_health"]: `rollout_metrics.rollout_health` of every kept rollout (collect.Collected.health_*)
    over all eval clips, with their number."""
    sq = {name: np.concatenate(parts) for name, parts in collected.health_sq.items()}  # [C, H]
    mean = {name: np.concatenate(parts) for name, parts in collected.health_mean.items()}  # [C, H, D]
    target_sq, target_mean = sq.pop(HEALTH_TARGET), mean.pop(HEALTH_TARGET)
    return {"num_clips": len(target_sq), **rollout_health(sq, mean, target_sq, target_mean)}


def run_leakage(collected: Collected, cfg: ExperimentConfig, metrics: dict, seed: int) -> dict | None:
    """The leakage section (leakage.leakage_metrics): the shuffled-r check, and the transfer check on the probe's
    held-out clips when every clip has a state; None for a latent without a posterior (none, oracle). Notes go to
    metrics["notes"]."""
    if collected.leakage is None:
        return None
    present = _present(collected, metrics["num_clips"])
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


def write_plots(collected: Collected, metrics: dict, out_dir: Path) -> list[str]:
    """Write the PNG figures into out_dir; returns their file names. Strips are drawn for the clips whose predicted
    token grids `collected` kept (its first `num_strips` clips)."""
    written = ["errors.png"]
    plot_errors(metrics["modes"], out_dir / "errors.png")
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
    plot_errors(metrics["decoded"]["modes"], out_dir / "psnr.png", metric="psnr", ylabel="PSNR (dB) of decoded frames")
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
