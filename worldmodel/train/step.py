"""One optimiser step (`take_step`), as the method reads: the schedules, the loss and its gradients over the
micro-batches, gradient clipping, the divergence and stop decision every rank takes together at check steps, AdamW,
the LR schedule and the EMA update of the target encoder.

Between check steps nothing here waits for the device: a non-finite loss is remembered on the device
(`TrainState.first_bad`) and raised as `TrainingDiverged` by every rank at the next check step (`is_check_step`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from worldmodel.run import checkpoint as ckpt
from worldmodel.run.config import ExperimentConfig
from worldmodel.train.launch import StopRequest
from worldmodel.train.schedules import beta_at, ema_momentum, recon_sigma_at
from worldmodel.train.state import TrainState
from worldmodel.train.window import Window


class TrainingDiverged(RuntimeError):
    """A loss became NaN/inf; the message names the step and every loss term. No checkpoint was written."""


@dataclass
class StepResult:
    """One optimiser step's decisions and schedule values, the same on every rank."""

    epoch: int
    beta: float
    momentum: float
    lr: float
    grad_norm: torch.Tensor  # 0-dim, on the device (read at log steps only)
    loss: float | None  # mean over ranks, at check steps (None between them)
    stop: bool  # a stop signal reached some rank (known at check steps)


def is_check_step(cfg: ExperimentConfig, step: int) -> bool:
    """Whether optimiser step `step` (1-based) waits for the device: the first step (a broken set-up shows at once,
    and the progress bar has a loss), every train.check_every steps, every log step, every checkpoint step and the
    last, so that no checkpoint is written before a divergence is seen."""
    t = cfg.train
    every = (t.check_every, t.log_every, t.checkpoint_every)
    return step in (1, t.steps) or any(step % n == 0 for n in every)


def is_log_step(cfg: ExperimentConfig, step: int) -> bool:
    """Whether optimiser step `step` (1-based) writes a log line (and computes the collapse monitors)."""
    return step % cfg.train.log_every == 0 or step == cfg.train.steps


def take_step(run: TrainState, step: int, window: Window, stop: StopRequest) -> StepResult:
    """Optimiser step `step` + 1, as the method reads: the schedules (beta, EMA momentum, LR) at `step`; the loss
    and its gradients over the micro-batches; gradient clipping; at a check step one all-reduce so that every rank
    agrees on divergence and stop; then AdamW, the LR schedule and the EMA update of the target encoder. Between
    check steps nothing here waits for the device."""
    cfg, accelerator = run.cfg, run.accelerator
    beta = beta_at(step, beta=cfg.model.beta, warmup_steps=cfg.model.beta_warmup_steps)
    momentum = ema_momentum(step, total_steps=cfg.train.steps, start=cfg.model.ema_start, end=cfg.model.ema_end)
    lr = run.scheduler.get_last_lr()[0]
    if run.core.decoder is not None:  # the keypoint maps' width, coarse to fine (every rank sets the same value)
        m = cfg.model
        run.core.decoder.set_sigma(
            recon_sigma_at(step, sigma=m.recon_sigma, start=m.recon_sigma_start, steps=m.recon_sigma_steps)
        )
        run.core.decoder.seed_masks(cfg.seed + 1_000_003 * step + 7_919 * accelerator.process_index)
    run.core.sigreg_seed = 1_000_003 * cfg.seed + step  # the same SIGReg directions on every rank, and on resume
    epoch, sums, term_names = _forward_backward(run, window, beta, monitor=is_log_step(cfg, step + 1))
    grad_norm = _clip_gradients(run)
    nonfinite = ~torch.isfinite(sums["loss"])
    if accelerator.scaler is None:  # with fp16 loss scaling an inf gradient is a skipped step, not a divergence
        nonfinite = nonfinite | ~torch.isfinite(grad_norm)
    run.first_bad = torch.where(nonfinite & (run.first_bad < 0), step + 1, run.first_bad)
    loss, stop_now = None, False
    if is_check_step(cfg, step + 1):
        requested = torch.tensor(float(stop.requested), device=accelerator.device)
        flags = torch.stack([(run.first_bad >= 0).float(), requested, sums["loss"].float()])
        bad, stop_any, loss_sum = accelerator.reduce(flags, "sum").tolist()
        if bad > 0:
            terms = {k: v for k, v in sums.items() if k == "loss" or k in term_names}
            raise _diverged(accelerator, step + 1, run.first_bad, epoch, terms, grad_norm, Path(cfg.run_dir))
        loss, stop_now = loss_sum / accelerator.num_processes, stop_any > 0
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    run.core.update_target(momentum)
    window.add(sums)
    return StepResult(epoch, beta, momentum, lr, grad_norm, loss, stop_now)


def _clip_gradients(run: TrainState) -> torch.Tensor:
    """Clip to `optim.grad_clip`, globally or per group of `run.clip_groups`; returns the global gradient norm before
    clipping (0-dim, on the device: reading it would wait for the device)."""
    accelerator, max_norm = run.accelerator, run.cfg.optim.grad_clip or math.inf
    if run.clip_groups is None:
        return accelerator.clip_grad_norm_(run.model.parameters(), max_norm)
    accelerator.unscale_gradients()  # once; clip_grad_norm_ per group below (DDP: the gradients are all-reduced)
    norms = [torch.nn.utils.clip_grad_norm_(group, max_norm) for group in run.clip_groups]
    return torch.stack(norms).norm()


def _forward_backward(
    run: TrainState, window: Window, beta: float, monitor: bool
) -> tuple[int, dict[str, torch.Tensor], set[str]]:
    """Forward and backward over `optim.grad_accum_steps` micro-batches (DDP all-reduces the gradients on the last);
    `monitor`: compute the collapse monitors too (log steps).

    Returns the epoch of the last batch, the loss, terms and monitors averaged over the micro-batches, and the names
    of the loss terms.
    """
    accum, device = run.cfg.optim.grad_accum_steps, run.accelerator.device
    sums: dict[str, torch.Tensor] = {}
    for _ in range(accum):
        epoch, batch = window.next_batch(run.batches)
        action = batch["action"].to(device) if run.needs_actions else None
        with run.accelerator.accumulate(run.model):
            out = run.model(batch["frames"].to(device, non_blocking=True), action=action, beta=beta, monitor=monitor)
            run.accelerator.backward(out["loss"])
        for name, value in {"loss": out["loss"], **out["terms"], **out["monitors"]}.items():
            sums[name] = sums.get(name, 0.0) + value.detach().float() / accum
    return epoch, sums, set(out["terms"])


def _diverged(
    accelerator: Accelerator,
    step: int,
    first_bad: torch.Tensor,
    epoch: int,
    terms: dict[str, torch.Tensor],
    grad_norm: torch.Tensor,
    run_dir: Path,
) -> TrainingDiverged:
    """The error every rank raises together at check step `step`; `first_bad` (0-dim int64 on the device) is the first
    non-finite step this rank saw since the previous check (-1: none); the terms of step `step` are averaged over
    micro-batches and ranks (NaN propagates)."""
    values = accelerator.reduce(torch.stack(list(terms.values())), "mean").tolist()
    firsts = [int(f) for f in accelerator.gather(first_bad.reshape(1)).tolist() if f >= 0]
    first = min(firsts) if firsts else step
    named = ", ".join(f"{name}={value:.6g}" for name, value in zip(terms, values, strict=True))
    seen = "" if first == step else f"; found at the check of step {step}, with the terms of that step"
    return TrainingDiverged(
        f"non-finite loss at step {first} (epoch {epoch}{seen}): {named}, grad_norm={float(grad_norm):.6g}; stopped "
        f"before the optimiser step of step {step} and wrote no checkpoint (newest good one: "
        f"{ckpt.latest_checkpoint(run_dir)})"
    )
