"""The accelerate train loop: one process per device, the same code on 1 CPU, N GPUs or several machines.

This module runs a run from start to end (`train`): the set-up (state.py, `build_state`), the steps (step.py,
`take_step`), and after each step the progress bar, the log line (window.py) and the checkpoints.

Per optimiser step: `grad_accum_steps` micro-batches (forward, backward; DDP syncs gradients on the last one),
gradient clipping, AdamW, the LR scheduler (stepped here, once per optimiser step), then the EMA update of the target
encoder on the unwrapped model. The host waits for the device only at check steps (every `train.check_every` steps,
every log step, every checkpoint step and the last): there one all-reduce of [non-finite steps seen, stop requests,
loss] makes every rank take the same decision. Between checks a non-finite loss is remembered on the device (the
first step it happened), and the collapse monitors (SVDs) run only at log steps.

Data: one loader per run (`state._batches`), its workers, open shards and shuffle buffers kept across epochs. It is
*not* passed through `accelerator.prepare`: the pipeline splits shards by rank and worker itself and yields exactly
`data.epoch_batches` batches per epoch on every rank, each tagged with its epoch, so all ranks run the same number
of steps and no rank decodes for another. Torch's intra-op threads are set from the cores the process may use minus
its decode workers (`setup.thread_budget`, `train.threads` overrides), and logged at the start.

Ending: a run that reaches train.steps saves its final checkpoint and writes the completion marker
RUN_DIR/finished.json (`checkpoint.mark_finished`); `train` returns True. SIGTERM, Ctrl-C or SIGUSR2 (the Slurm
script's stop) makes every rank save a checkpoint at the next step boundary; `train` returns False and train.py
exits with EXIT_STOPPED (75, EX_TEMPFAIL: "resume me"), so that neither a script nor a scheduler takes a stopped
run for a finished one. A non-finite loss (or, without fp16 loss scaling, a non-finite gradient norm) stops every
rank at the next check step, before its optimiser step and before any checkpoint (checkpoint steps are check steps),
with a message naming the first non-finite step and each loss term, and writes no checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
from accelerate import Accelerator

from worldmodel.model.monitors import HealthWatch
from worldmodel.model.world_model import WorldModel
from worldmodel.run import checkpoint as ckpt
from worldmodel.run.config import ConfigError, ExperimentConfig
from worldmodel.train.launch import EXIT_STOPPED, StopRequest
from worldmodel.train.metrics_log import MetricsLog
from worldmodel.train.state import TrainState, build_state, save_state
from worldmodel.train.step import StepResult, TrainingDiverged, is_log_step, take_step
from worldmodel.train.window import SkipAlarm, Window


def check_model_config(cfg: ExperimentConfig) -> None:
    """Build the model once on torch's meta device (no memory, no data; well under a second) so that every check
    its constructors make on combinations of model keys runs before a process group, a loader or a worker starts:
    ConfigError (train.py: exit 2, one line) instead of a traceback after start-up. An action width the data will
    give (model.action_dim=0 with the oracle) is taken as 1 for the check."""
    model_cfg = replace(cfg.model, action_dim=cfg.model.action_dim or 1)
    try:
        with torch.device("meta"):
            WorldModel(model_cfg)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def train(cfg: ExperimentConfig, resume: str | None = None) -> bool:
    """Train `cfg` from scratch, or continue from a checkpoint (`resume`: "auto" or a checkpoint directory).

    Returns True when the run has reached cfg.train.steps (and RUN_DIR/finished.json exists), False after a
    SIGTERM/Ctrl-C checkpoint; raises TrainingDiverged on a non-finite loss. Every rank returns or raises together.
    """
    check_model_config(cfg)  # a bad combination of model keys stops here, before any process group or worker
    stop = StopRequest()  # first: a signal during setup (process group, data, model) must not kill the rank
    try:
        return _train(cfg, resume, stop)
    finally:
        stop.restore()


def _train(cfg: ExperimentConfig, resume: str | None, stop: StopRequest) -> bool:
    run = build_state(cfg, resume)
    if run is None:  # already at train.steps
        return True
    accelerator, run_dir = run.accelerator, Path(cfg.run_dir)
    log = MetricsLog(
        run_dir, enabled=accelerator.is_main_process, total_steps=cfg.train.steps, start_step=run.start_step
    )
    window = Window()
    health = HealthWatch(dim=run.core.norm.center.numel())
    skip_alarm = SkipAlarm(cfg.data.max_skip_share)
    step = run.start_step
    try:
        while step < cfg.train.steps:
            result = take_step(run, step, window, stop)
            step += 1
            if _after_step(run, step, result, window, log, health, skip_alarm):
                break  # stopped by a signal, checkpoint saved
    except TrainingDiverged as err:
        log.write(str(err))
        _finish(accelerator, log, run.epochs)
        raise
    finished = step >= cfg.train.steps
    if finished and accelerator.is_main_process:  # the final checkpoint is on disk: every rank waited in save_state
        ckpt.mark_finished(run_dir, step, ckpt.checkpoint_dir(run_dir, step))
        log.write(f"finished: step {step} of train.steps={cfg.train.steps}; marked in {run_dir / ckpt.FINISHED}")
    epochs = run.epochs
    del run
    accelerator.free_memory()
    _finish(accelerator, log, epochs)
    return finished


def _after_step(
    run: TrainState,
    step: int,
    result: StepResult,
    window: Window,
    log: MetricsLog,
    health: HealthWatch,
    skip_alarm: SkipAlarm,
) -> bool:
    """Progress bar, the log line every train.log_every steps (with the health and skip warnings), and checkpoints:
    every train.checkpoint_every steps, at the end, and when a stop was requested. Returns True when the run stops
    here."""
    cfg, accelerator = run.cfg, run.accelerator
    clips_per_s = cfg.data.batch_size * cfg.optim.grad_accum_steps * accelerator.num_processes * window.steps
    clips_per_s /= window.elapsed
    if result.loss is not None:
        window.last_loss = result.loss
    log.progress(step, loss=window.last_loss, clips_per_s=clips_per_s, data_wait=window.wait / window.elapsed)
    if is_log_step(cfg, step):
        scalars = window.scalars(accelerator)
        scalars.update(
            epoch=result.epoch,
            beta=result.beta,
            ema_momentum=result.momentum,
            lr=result.lr,
            grad_norm=float(result.grad_norm),
            clips_per_s=clips_per_s,
        )
        if run.core.decoder is not None:
            scalars["recon_sigma"] = float(run.core.decoder.sigma_now)
        log.log(step, scalars)
        for warning in [*health.check(step, scalars), skip_alarm.check(step, scalars)]:
            if warning:
                log.write(warning)
        window.reset()
    save = (run.model, run.optimizer, run.scheduler)
    if result.stop and step < cfg.train.steps:  # at the last step the final save below serves
        path = save_state(accelerator, cfg, step, result.epoch, *save)
        log.write(
            f"stop requested (SIGTERM/Ctrl-C): saved {path} at step {step} of {cfg.train.steps}; exiting "
            f"unfinished (status {EXIT_STOPPED}); continue with --resume auto"
        )
        return True
    if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
        save_state(accelerator, cfg, step, result.epoch, *save)
    return False


def _finish(accelerator: Accelerator, log: MetricsLog, epochs: Iterator) -> None:
    """Close the logs and the loader, then leave the process group together (gloo aborts at exit otherwise)."""
    log.close()
    epochs.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
