"""The accelerate train loop: one process per device, the same code on 1 CPU, N GPUs or several machines.

Per optimiser step: `grad_accum_steps` micro-batches (forward, backward; DDP syncs gradients on the last one),
gradient clipping, AdamW, the LR scheduler (stepped here, once per optimiser step), then the EMA update of the target
encoder on the unwrapped model. The host waits for the device only at check steps (every `train.check_every` steps,
every log step, every checkpoint step and the last): there one all-reduce of [non-finite steps seen, stop requests,
loss] makes every rank take the same decision. Between checks a non-finite loss is remembered on the device (the
first step it happened), and the collapse monitors (SVDs) run only at log steps.

Data: one loader per run (`_batches`), its workers, open shards and shuffle buffers kept across epochs. It is *not*
passed through `accelerator.prepare`: the pipeline splits shards by rank and worker itself and yields exactly
`data.epoch_batches` batches per epoch on every rank, each tagged with its epoch, so all ranks run the same number
of steps and no rank decodes for another. Torch's intra-op threads are set from the cores the process may use minus
its decode workers (`train_setup.thread_budget`, `train.threads` overrides), and logged at the start.

Ending: a run that reaches train.steps saves its final checkpoint and writes the completion marker
RUN_DIR/finished.json (`checkpoint.mark_finished`); `train` returns True. SIGTERM, Ctrl-C or SIGUSR2 (the Slurm
script's stop) makes every rank save a checkpoint at the next step boundary; `train` returns False and train.py
exits with EXIT_STOPPED (75, EX_TEMPFAIL: "resume me"), so that neither a script nor a scheduler takes a stopped
run for a finished one. A non-finite loss (or, without fp16 loss scaling, a non-finite gradient norm) stops every
rank at the next check step, before its optimiser step and before any checkpoint (checkpoint steps are check steps),
with a message naming the first non-finite step and each loss term, and writes no checkpoint.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from torch import nn

from data_pipeline.stream import FALLBACK_PYAV, make_train_loader
from worldmodel import checkpoint as ckpt
from worldmodel.config import ConfigError, ExperimentConfig, save_config
from worldmodel.latents import latent_class
from worldmodel.launch import EXIT_STOPPED, StopRequest, agreed_resume_dir, check_world_size
from worldmodel.metrics_log import MetricsLog
from worldmodel.model import WorldModel
from worldmodel.monitors import HealthWatch
from worldmodel.schedules import beta_at, ema_momentum, lr_factor, recon_sigma_at
from worldmodel.train_setup import (
    build_optimizer,
    compile_model,
    resolve_mixed_precision,
    set_tf32,
    set_thread_budget,
    use_fused_adamw,
)


class TrainingDiverged(RuntimeError):
    """A loss became NaN/inf; the message names the step and every loss term. No checkpoint was written."""


def _batches(cfg: ExperimentConfig, start_epoch: int, rank: int, world_size: int) -> Iterator[tuple[int, dict]]:
    """(epoch, batch) for ever from one loader per run: exactly data.epoch_batches batches of each epoch on this rank,
    from epoch `start_epoch` on. Its workers start once and keep their open shards and shuffle buffers."""
    loader = make_train_loader(
        cfg.data, cfg.data.train_shards, seed=cfg.seed, epoch=start_epoch, rank=rank, world_size=world_size, epochs=None
    )
    for batch in loader:
        yield batch["epoch"], batch


def _infer_action_dim(cfg: ExperimentConfig, batch: dict) -> None:
    """Latents that need actions (oracle) with model.action_dim=0 take the action width from the data."""
    if not latent_class(cfg.model.latent).needs_actions or cfg.model.action_dim:
        return
    if "action" not in batch:
        raise ValueError(
            f"model.latent={cfg.model.latent} needs per-transition actions, but the shards {cfg.data.train_shards} "
            "have no 'action' in their JSON; use another latent or data with actions"
        )
    cfg.model.action_dim = int(batch["action"].shape[-1])


def _save(accelerator, cfg, step: int, epoch: int, model, optimizer, scheduler) -> Path:
    """Full-state checkpoint on the main process (RNG states gathered from every rank); all ranks wait for it.

    Resuming on several machines needs run_dir on a filesystem they share (each rank reads its own RNG file).
    """
    rng_states = gather_object([ckpt.rng_state_bytes()])
    path = ckpt.checkpoint_dir(cfg.run_dir, step)
    if accelerator.is_main_process:
        path = ckpt.save_checkpoint(
            cfg.run_dir,
            step,
            model=accelerator.unwrap_model(model),
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=accelerator.scaler,
            rng_states=rng_states,
            meta={"epoch": epoch, "seed": cfg.seed, "mixed_precision": accelerator.mixed_precision},
            keep=cfg.train.keep_checkpoints,
        )
    accelerator.wait_for_everyone()
    return path


class _Window:
    """Statistics of the steps since the last log line: means of losses/monitors (each over the steps that computed
    it: the collapse monitors run at log steps only), data wait, throughput.

    Decode skips and PyAV fallbacks are cumulative over the run (this process); the others reset at every log line.
    `recent` holds (samples, skipped samples) of the latest batches, about `skip_window` samples, for the skip alarm.
    """

    def __init__(self, skip_window: int = 1000) -> None:
        self.last_loss = math.nan  # the loss of the latest check step (the progress bar's)
        self.skipped: Counter = Counter()
        self.recent: deque[tuple[int, int]] = deque()
        self.skip_window = skip_window
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: Counter = Counter()
        self.steps, self.wait, self.start = 0, 0.0, time.perf_counter()

    def next_batch(self, batches: Iterator[tuple[int, dict]]) -> tuple[int, dict]:
        """The next (epoch, batch), timing the wait and counting its decode skips."""
        start = time.perf_counter()
        epoch, batch = next(batches)
        self.wait += time.perf_counter() - start
        self.skipped.update(batch["skipped"])
        skips = sum(n for reason, n in batch["skipped"].items() if reason != FALLBACK_PYAV)
        self.recent.append((len(set(batch["key"])) + skips, skips))
        while len(self.recent) > 1 and sum(n for n, _ in self.recent) - self.recent[0][0] >= self.skip_window:
            self.recent.popleft()
        return epoch, batch

    def add(self, values: dict[str, torch.Tensor]) -> None:
        """One optimiser step's values, each already the mean over its micro-batches."""
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
            self.counts[name] += 1
        self.steps += 1

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def scalars(self, accelerator: Accelerator) -> dict[str, float]:
        """Means over the window and over ranks; data-wait share averaged over ranks; skips and fallbacks summed over
        ranks; `skipped/recent_share`: the share of skipped samples among the latest ~skip_window read per rank."""
        names = list(self.sums)
        wait_share = torch.tensor(self.wait / self.elapsed, device=accelerator.device)
        means = [self.sums[n] / self.counts[n] for n in names]
        values = accelerator.reduce(torch.stack([*means, wait_share]), "mean").tolist()
        scalars = dict(zip([*names, "data_wait"], values, strict=True))
        total, read, skipped = Counter(), 0, 0
        recent = (sum(n for n, _ in self.recent), sum(k for _, k in self.recent))
        for rank_skips, (rank_read, rank_skipped) in gather_object([(dict(self.skipped), recent)]):
            total.update(rank_skips)
            read, skipped = read + rank_read, skipped + rank_skipped
        fallbacks = total.pop(FALLBACK_PYAV, 0)
        scalars["skipped/total"] = float(sum(total.values()))
        scalars.update({f"skipped/{reason}": float(n) for reason, n in sorted(total.items())})
        scalars["skipped/recent_share"] = skipped / max(1, read)
        scalars[FALLBACK_PYAV] = float(fallbacks)
        return scalars


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


@dataclass
class _Run:
    """What a training run holds between steps (built by `_setup`)."""

    cfg: ExperimentConfig
    accelerator: Accelerator
    model: nn.Module  # as prepared by accelerate (DDP-wrapped with several processes)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    epochs: Iterator[tuple[int, dict]]  # the run's loader, as (epoch, batch) (closed at the end)
    batches: Iterator[tuple[int, dict]]  # (epoch, batch), the first batch put back in front
    start_step: int
    needs_actions: bool  # the latent embeds the batch's actions (oracle)
    # parameter groups clipped apart (`_clip_gradients`): the detached encoder with its decoder, and the rest; None =
    # one global clip
    clip_groups: list[list[nn.Parameter]] | None
    # the first step since the previous check whose loss (or, without loss scaling, gradient norm) was not finite;
    # -1: none. A 0-dim int64 on the device, so that steps between checks never wait for the device.
    first_bad: torch.Tensor

    @property
    def core(self) -> nn.Module:
        """The unwrapped WorldModel."""
        return self.accelerator.unwrap_model(self.model)


@dataclass
class _StepResult:
    """One optimiser step's decisions and schedule values, the same on every rank."""

    epoch: int
    beta: float
    momentum: float
    lr: float
    grad_norm: torch.Tensor  # 0-dim, on the device (read at log steps only)
    loss: float | None  # mean over ranks, at check steps (None between them)
    stop: bool  # a stop signal reached some rank (known at check steps)


def _train(cfg: ExperimentConfig, resume: str | None, stop: StopRequest) -> bool:
    run = _setup(cfg, resume)
    if run is None:  # already at train.steps
        return True
    accelerator, run_dir = run.accelerator, Path(cfg.run_dir)
    log = MetricsLog(
        run_dir, enabled=accelerator.is_main_process, total_steps=cfg.train.steps, start_step=run.start_step
    )
    window = _Window()
    health = HealthWatch(dim=run.core.norm.center.numel())
    skip_alarm = _SkipAlarm(cfg.data.max_skip_share)
    step = run.start_step
    try:
        while step < cfg.train.steps:
            result = _step(run, step, window, stop)
            step += 1
            if _after_step(run, step, result, window, log, health, skip_alarm):
                break  # stopped by a signal, checkpoint saved
    except TrainingDiverged as err:
        log.write(str(err))
        _finish(accelerator, log, run.epochs)
        raise
    finished = step >= cfg.train.steps
    if finished and accelerator.is_main_process:  # the final checkpoint is on disk: every rank waited in _save
        ckpt.mark_finished(run_dir, step, ckpt.checkpoint_dir(run_dir, step))
        log.write(f"finished: step {step} of train.steps={cfg.train.steps}; marked in {run_dir / ckpt.FINISHED}")
    epochs = run.epochs
    del run
    accelerator.free_memory()
    _finish(accelerator, log, epochs)
    return finished


def _setup(cfg: ExperimentConfig, resume: str | None) -> _Run | None:
    """Process group, resume decision, data, model, optimizer, schedule, checkpoint state and the run directory;
    None (after marking the run finished) when the checkpoint to resume is already at train.steps."""
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision),
        gradient_accumulation_steps=cfg.optim.grad_accum_steps,
        step_scheduler_with_optimizer=False,  # we step it once per optimiser step, not once per rank
    )
    rank, world_size, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    check_world_size(world_size)
    run_dir = Path(cfg.run_dir)
    resume_from = agreed_resume_dir(accelerator, resume, run_dir)
    resumed = ckpt.read_state(resume_from) if resume_from is not None else None
    start_step = resumed["step"] if resumed else 0
    if start_step >= cfg.train.steps:
        accelerator.print(f"{resume_from} is at step {start_step} >= train.steps={cfg.train.steps}; nothing to do")
        if main and ckpt.read_finished(run_dir) is None:
            ckpt.mark_finished(run_dir, start_step, resume_from)
        accelerator.end_training()
        return None
    if main:
        ckpt.clear_finished(run_dir)  # continued to more steps: finished again only when it gets there

    accelerator.print(set_thread_budget(cfg.train.threads, cfg.data.num_workers, accelerator.num_processes))
    set_seed(cfg.seed)
    epochs = _batches(cfg, resumed["epoch"] + 1 if resumed else 0, rank, world_size)  # resume: fresh samples
    first = next(epochs)
    _infer_action_dim(cfg, first[1])
    set_seed(cfg.seed)  # identical initial weights on every rank, however the loader used the global RNG
    model = WorldModel(cfg.model).to(accelerator.device)  # on its device first: fused AdamW checks where params are
    set_tf32(cfg.train, accelerator.device)
    optimizer = build_optimizer(model, cfg.optim, fused=use_fused_adamw(cfg.train, accelerator.device))
    lr_kw = dict(
        warmup_steps=cfg.optim.warmup_steps, total_steps=cfg.train.steps, lr=cfg.optim.lr, min_lr=cfg.optim.min_lr
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, **lr_kw))
    model, optimizer = accelerator.prepare(model, optimizer)
    if resumed:
        state = ckpt.load_checkpoint(
            resume_from,
            model=accelerator.unwrap_model(model),
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=accelerator.scaler,
            rank=rank,
        )
        if not state["rng_restored"]:  # the checkpoint was written by fewer processes
            set_seed(cfg.seed + 1_000_003 * rank + start_step)
        accelerator.print(f"resumed from {resume_from} (step {start_step}, epoch {state['epoch']})")
    else:
        set_seed(cfg.seed + rank)  # per-rank noise (latent samples, dropout) from here on
    if cfg.train.compile:  # in place, after loading: parameter names and checkpoints stay as without it
        compile_model(accelerator.unwrap_model(model), cfg.train.compile_backend)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    accelerator.wait_for_everyone()
    return _Run(
        cfg=cfg,
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        epochs=epochs,
        batches=itertools.chain([first], epochs),
        start_step=start_step,
        needs_actions=latent_class(cfg.model.latent).needs_actions,
        clip_groups=_clip_groups(accelerator.unwrap_model(model)),
        first_bad=torch.tensor(-1, device=accelerator.device),
    )


def _clip_groups(model: nn.Module) -> list[list[nn.Parameter]] | None:
    """With model.pred_trains_encoder=false: [encoder and decoder parameters, the rest], clipped apart, since one
    global norm would scale the encoder's step by the predictor's gradients and the encoder would depend on the
    method. Otherwise None (one global clip)."""
    if model.cfg.pred_trains_encoder:
        return None
    own = {id(p) for module in (model.encoder, model.decoder) for p in module.parameters()}
    return [[p for p in model.parameters() if (id(p) in own) == side] for side in (True, False)]


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


def _step(run: _Run, step: int, window: _Window, stop: StopRequest) -> _StepResult:
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
    return _StepResult(epoch, beta, momentum, lr, grad_norm, loss, stop_now)


def _clip_gradients(run: _Run) -> torch.Tensor:
    """Clip to `optim.grad_clip`, globally or per group of `run.clip_groups`; returns the global gradient norm before
    clipping (0-dim, on the device: reading it would wait for the device)."""
    accelerator, max_norm = run.accelerator, run.cfg.optim.grad_clip or math.inf
    if run.clip_groups is None:
        return accelerator.clip_grad_norm_(run.model.parameters(), max_norm)
    accelerator.unscale_gradients()  # once; clip_grad_norm_ per group below (DDP: the gradients are all-reduced)
    norms = [torch.nn.utils.clip_grad_norm_(group, max_norm) for group in run.clip_groups]
    return torch.stack(norms).norm()


def _forward_backward(
    run: _Run, window: _Window, beta: float, monitor: bool
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


class _SkipAlarm:
    """Warns when more than `max_share` of the latest ~1000 samples read (per rank, summed over ranks) were skipped;
    once, and again only after the share has fallen back below the bar."""

    def __init__(self, max_share: float) -> None:
        self.max_share, self.raised = max_share, False

    def check(self, step: int, scalars: dict[str, float]) -> str | None:
        """The warning line for the scalars logged at `step`, or None."""
        share = scalars["skipped/recent_share"]
        if share <= self.max_share:
            self.raised = False
            return None
        if self.raised:
            return None
        self.raised = True
        reasons = ", ".join(f"{k.split('/', 1)[1]}={v:g}" for k, v in scalars.items() if k.startswith("skipped/"))
        return (
            f"warning: step {step}: {share:.1%} of the latest samples read were skipped (> data.max_skip_share="
            f"{self.max_share:g}; run totals: {reasons}); check the shards with python -m benchmarks.pipeline, or "
            "set WORLDMODEL_DECODE_DEBUG=1 to log each skipped sample with its reason"
        )


def _after_step(
    run: _Run,
    step: int,
    result: _StepResult,
    window: _Window,
    log: MetricsLog,
    health: HealthWatch,
    skip_alarm: _SkipAlarm,
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
        path = _save(accelerator, cfg, step, result.epoch, *save)
        log.write(
            f"stop requested (SIGTERM/Ctrl-C): saved {path} at step {step} of {cfg.train.steps}; exiting "
            f"unfinished (status {EXIT_STOPPED}); continue with --resume auto"
        )
        return True
    if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
        _save(accelerator, cfg, step, result.epoch, *save)
    return False


def _finish(accelerator: Accelerator, log: MetricsLog, epochs: Iterator) -> None:
    """Close the logs and the loader, then leave the process group together (gloo aborts at exit otherwise)."""
    log.close()
    epochs.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
