"""`evaluate.py --run RUN_DIR --shards GLOB`: load a trained run, roll it out on held-out shards, write the results.

Writes RUN_DIR/eval/metrics.json, RUN_DIR/eval/report.md and figures beside them (errors.png, probes.png when
the shards carry state, rollout_health.png, strip-XX.png per example; with `pixels` also psnr.png,
decoded-strip-XX.png and decoded-XX.gif). metrics.json, in short (full schema: docs/metrics_schema.md):

    {"run", "checkpoint", "checkpoint_step", "train_steps", "finished", "latent", "shards", "seed",
     "num_context", "horizon", "frame_step", "fps", "seconds_per_step", "horizon_seconds": [H] | null,
     "num_samples", "num_clips",
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

frame_step, fps (the clips' median, KEY.json), seconds_per_step = frame_step / fps and horizon_seconds (h = 1..H
times it): how much video a step spans, null when the shards give no fps.
modes: copy_last always; prediction (+ the same as prior_mean), noisy_best_of_k for none; prior_mean, posterior,
zero, best_of_k, mean_of_k for adassl_v / adassl_s; action, zero, noisy_best_of_k for oracle. l2 is a mean squared
difference; energy_score is in RMS-error units (a deterministic mode's is its RMS error); spread_skill only on the
K-future modes (best_of_k, mean_of_k, noisy_best_of_k: the ensemble's). leakage: the shuffled-r and transfer
checks of an inferred r (adassl_v / adassl_s; null for none and oracle; worldmodel/eval/leakage.py).
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

import torch
from accelerate import PartialState
from tqdm import tqdm

from data_pipeline.stream import make_eval_loader
from worldmodel.eval import EvaluationError
from worldmodel.eval.collect import Collected, process_batch
from worldmodel.eval.figures import write_plots
from worldmodel.eval.leakage import LeakageAccumulator
from worldmodel.eval.pixel_decoder import PIXEL_METRICS, fit_or_load
from worldmodel.eval.report import render_report
from worldmodel.eval.rollout_metrics import ErrorAccumulator
from worldmodel.eval.sections import (
    collapse_stats,
    present_fields,
    rollout_health_section,
    run_leakage,
    run_probes,
    step_length,
    training_health,
)
from worldmodel.model.world_model import WorldModel
from worldmodel.run.checkpoint import latest_checkpoint, load_model_state, read_finished, read_state
from worldmodel.run.config import ExperimentConfig, load_config

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

    num_evaluated = int(sum(len(f) for f in collected.frames))
    notes = [unfinished_note] if unfinished_note else []
    steps = step_length(collected.stacked("fps"), cfg.data.frame_step, horizon, num_evaluated, notes)
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
        **steps,
        "num_samples": num_samples,
        "num_clips": num_evaluated,
        "modes": collected.errors.result(),
        "rollout_health": rollout_health_section(collected),
        "diversity": collected.diversity.result(),
        "decoded": None if decoder is None else {"decoder": decoder_record, "modes": collected.pixels.result()},
        "notes": notes,
    }
    if "events" not in present_fields(collected, metrics["num_clips"]):
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
