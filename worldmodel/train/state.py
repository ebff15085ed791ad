"""What a training run holds between steps (`TrainState`): built once by `build_state` from the config (and, on
resume, a checkpoint), and saved as a checkpoint by `save_state`.

`build_state` sets up, in this order: the process group (accelerate), the resume decision
(`launch.agreed_resume_dir`), the run's one data loader (`_batches`: its workers, open shards and shuffle buffers last
for the whole run), the model (the oracle's action width taken from the first batch), the optimizer and LR schedule,
the state of the checkpoint resumed from, compilation, and the run directory with its config.yaml.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from torch import nn

from data_pipeline.stream import make_train_loader
from worldmodel.model.latents import latent_class
from worldmodel.model.world_model import WorldModel
from worldmodel.run import checkpoint as ckpt
from worldmodel.run.config import ExperimentConfig, save_config
from worldmodel.train.launch import agreed_resume_dir, check_world_size
from worldmodel.train.schedules import lr_factor
from worldmodel.train.setup import (
    build_optimizer,
    compile_model,
    resolve_mixed_precision,
    set_tf32,
    set_thread_budget,
    use_fused_adamw,
)


@dataclass
class TrainState:
    """What a training run holds between steps (built by `build_state`)."""

    cfg: ExperimentConfig
    accelerator: Accelerator
    model: nn.Module  # as prepared by accelerate (DDP-wrapped with several processes)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    epochs: Iterator[tuple[int, dict]]  # the run's loader, as (epoch, batch) (closed at the end)
    batches: Iterator[tuple[int, dict]]  # (epoch, batch), the first batch put back in front
    start_step: int
    needs_actions: bool  # the latent embeds the batch's actions (oracle)
    # parameter groups clipped apart (`step._clip_gradients`): the detached encoder with its decoder, and the rest;
    # None = one global clip
    clip_groups: list[list[nn.Parameter]] | None
    # the first step since the previous check whose loss (or, without loss scaling, gradient norm) was not finite;
    # -1: none. A 0-dim int64 on the device, so that steps between checks never wait for the device.
    first_bad: torch.Tensor

    @property
    def core(self) -> nn.Module:
        """The unwrapped WorldModel."""
        return self.accelerator.unwrap_model(self.model)


def build_state(cfg: ExperimentConfig, resume: str | None) -> TrainState | None:
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
    return TrainState(
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


def _clip_groups(model: nn.Module) -> list[list[nn.Parameter]] | None:
    """With model.pred_trains_encoder=false: [encoder and decoder parameters, the rest], clipped apart, since one
    global norm would scale the encoder's step by the predictor's gradients and the encoder would depend on the
    method. Otherwise None (one global clip)."""
    if model.cfg.pred_trains_encoder:
        return None
    own = {id(p) for module in (model.encoder, model.decoder) for p in module.parameters()}
    return [[p for p in model.parameters() if (id(p) in own) == side] for side in (True, False)]


def save_state(accelerator, cfg, step: int, epoch: int, model, optimizer, scheduler) -> Path:
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
