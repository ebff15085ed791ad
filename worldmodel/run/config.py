"""Typed, validated experiment configuration.

A config is a YAML file whose sections map onto the dataclasses below; `load_config` reads it, applies dotted
command-line overrides (`model.latent=adassl_v optim.lr=3e-4`) and validates every key and type. An unknown key
or a value of the wrong type is a `ConfigError` that names the valid keys, so a typo never passes silently.

The sections' dataclasses: `data` is data_pipeline/config.py's DataConfig, `model` is worldmodel/model/config.py's
ModelConfig (the model imports only that module, never this one; its names are re-exported here), the others are
below. This module is the one place that puts the data pipeline's and the model's sections together; training writes
the resolved config to RUN_DIR/config.yaml (`save_config`) and evaluation reads it back (`load_config`).

One image size: the model's `img_size` is no config key. It is filled from `data.image_size` (the size frames are
decoded at) when the config is built (DERIVED_KEYS); a config or override that sets `model.img_size` is an error
that says to set `data.image_size` instead, and RUN_DIR/config.yaml is written without it.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from data_pipeline.config import DataConfig
from worldmodel.model.config import (  # the model's own section, re-exported here
    GRANULARITIES,
    LATENTS,
    PREDICTIONS,
    ModelConfig,
)

__all__ = [  # the model's names, re-exported so that `from worldmodel.run.config import ...` keeps working
    "DERIVED_KEYS",
    "GRANULARITIES",
    "LATENTS",
    "PREDICTIONS",
    "ConfigError",
    "ExperimentConfig",
    "ModelConfig",
    "load_config",
]


class ConfigError(ValueError):
    """A config file or override is invalid; the message says which key and what is allowed."""


# Fields of a section that are not config keys: the experiment config fills each from the key named here, so the
# two can never disagree. A config that sets one is a ConfigError naming the key to set instead.
DERIVED_KEYS: dict[str, str] = {"model.img_size": "data.image_size"}


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay; no weight decay on norms and biases."""

    lr: float = 5e-4
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 100
    grad_clip: float = 1.0  # max global grad norm (0 disables clipping)
    grad_accum_steps: int = 1


@dataclass
class TrainConfig:
    """Length of the run, checkpoints and logging."""

    steps: int = 1000  # optimiser steps
    checkpoint_every: int = 250
    keep_checkpoints: int = 3  # newest K complete checkpoints are kept
    log_every: int = 10
    # steps between the host's waits for the device (non-finite loss and stop checks); log and checkpoint steps are
    # checks too. A non-finite loss stops the run at the next check, before any checkpoint.
    check_every: int = 10
    # torch intra-op threads per training process; 0: the cores this process may use (CPU affinity, Slurm's
    # SLURM_CPUS_PER_TASK) shared among the machine's training processes, minus each one's decode workers (at least 1)
    threads: int = 0
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU, no on CPU
    # speed options (worldmodel/train/setup.py; measured with benchmarks/step_speed.py, docs/architecture.md "GPU
    # path"); none of them changes what is computed beyond floating-point rounding
    compile: bool = False  # torch.compile the encoder, the EMA target encoder and the predictor, in place
    compile_backend: str = "inductor"  # torch.compile backend (aot_eager: no C++ compiler needed, what tests use)
    tf32: bool = True  # CUDA only: TF32 for the fp32 matmuls autocast leaves (set_float32_matmul_precision high)
    fused_adamw: bool = True  # CUDA only: PyTorch's fused AdamW kernel

    def __post_init__(self) -> None:
        for name in ("steps", "checkpoint_every", "log_every", "check_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.threads < 0:
            raise ValueError(f"train.threads must be >= 0 (0: from the cores available), got {self.threads}")


@dataclass
class EvalConfig:
    """Rollout evaluation defaults (evaluate.py flags override them)."""

    horizon: int = 4  # steps predicted after num_context frames (<= num_target)
    num_samples: int = 8  # K sampled futures for prior_sample / best-of-K
    num_clips: int = 256  # held-out clips evaluated
    batch_size: int = 32
    probe_ridge: float = 1e-2  # ridge penalty of the state probes
    probe_grid: int = 4  # probes read the token grid average-pooled to this many cells per side (1 = mean)
    num_strips: int = 4  # examples drawn as frame strips


@dataclass
class PixelDecoderConfig:
    """The pixel decoder trained after the fact on the frozen target latents (evaluate.py --pixels;
    worldmodel/eval/pixel_decoder.py)."""

    steps: int = 800  # AdamW steps
    batch_size: int = 128  # frames per step
    lr: float = 2.5e-3  # peak learning rate (5% warm-up, cosine decay)
    width: int = 128  # channels of the first feature map, halved at every x2 upsampling stage (down to 16)
    train_frames: int = 12288  # training-shard frames held in memory with their latents (one clip per video)


@dataclass
class ExperimentConfig:
    """The whole experiment: one YAML file, sections as below (model.img_size is data.image_size: DERIVED_KEYS)."""

    run_dir: str = "runs/default"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pixel_decoder: PixelDecoderConfig = field(default_factory=PixelDecoderConfig)


def _check_choices(cfg: ExperimentConfig) -> None:
    # the model's and train's choices are Literal types, checked by _coerce; the data section's own
    if cfg.data.decoder not in ("decord", "pyav"):
        raise ConfigError(f"data.decoder={cfg.data.decoder!r} is not one of decord, pyav")
    positive = {
        "data.batch_size": cfg.data.batch_size,
        "data.num_context": cfg.data.num_context,
        "data.num_target": cfg.data.num_target,
        "data.frame_step": cfg.data.frame_step,
        "data.epoch_batches": cfg.data.epoch_batches,
        "data.clips_per_video": cfg.data.clips_per_video,
        "train.steps": cfg.train.steps,
        "train.checkpoint_every": cfg.train.checkpoint_every,
        "train.keep_checkpoints": cfg.train.keep_checkpoints,
        "optim.grad_accum_steps": cfg.optim.grad_accum_steps,
        "model.latent_dim": cfg.model.latent_dim,
        "model.frame_dim": cfg.model.frame_dim,
        "eval.probe_grid": cfg.eval.probe_grid,
        "pixel_decoder.steps": cfg.pixel_decoder.steps,
        "pixel_decoder.batch_size": cfg.pixel_decoder.batch_size,
        "pixel_decoder.width": cfg.pixel_decoder.width,
        "pixel_decoder.train_frames": cfg.pixel_decoder.train_frames,
    }
    non_negative = {
        "model.beta": cfg.model.beta,
        "model.beta_warmup_steps": cfg.model.beta_warmup_steps,
        "model.prior_mean_weight": cfg.model.prior_mean_weight,
        "model.prior_anchor": cfg.model.prior_anchor,
        "model.smooth_weight": cfg.model.smooth_weight,
    }
    for minimum, values in ((1, positive), (0, non_negative)):
        for key, value in values.items():
            if value < minimum:
                raise ConfigError(f"{key}={value} must be >= {minimum}")
    if cfg.data.clip_length > cfg.model.max_frames:
        raise ConfigError(
            f"data.num_context + data.num_target = {cfg.data.clip_length} exceeds model.max_frames="
            f"{cfg.model.max_frames}; raise model.max_frames"
        )
    if cfg.data.image_size <= 0:
        raise ConfigError(
            f"data.image_size={cfg.data.image_size}: the model is built for one frame size, which is data.image_size; "
            "set it to the size to decode frames at (the stored size, to keep the frames as written)"
        )
    if cfg.data.image_size % cfg.model.patch_size:
        raise ConfigError(
            f"data.image_size={cfg.data.image_size} is not a multiple of model.patch_size={cfg.model.patch_size}"
        )
    if cfg.eval.horizon > cfg.data.num_target:
        raise ConfigError(f"eval.horizon={cfg.eval.horizon} exceeds data.num_target={cfg.data.num_target}")
    if cfg.model.smooth_weight > 0 and cfg.data.clip_length < 3:
        raise ConfigError(
            f"model.smooth_weight={cfg.model.smooth_weight} weighs an acceleration, which needs clips of at least 3 "
            f"frames; data.num_context + data.num_target = {cfg.data.clip_length}: lengthen the clips or set it to 0"
        )
    if cfg.model.rollout_steps >= cfg.data.clip_length:
        raise ConfigError(
            f"model.rollout_steps={cfg.model.rollout_steps} needs clips of more frames than that; data.num_context + "
            f"data.num_target = {cfg.data.clip_length}"
        )


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert `value` to the annotated type `tp`, or raise a ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, allowed))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if prefix + f.name not in DERIVED_KEYS}
    for key, source in DERIVED_KEYS.items():
        if key.startswith(prefix) and key[len(prefix) :] in values:
            raise ConfigError(
                f"{key} is not a config key: it is {source}, which sets both the decoded frame size and the model's; "
                f"set {source} instead and remove {key} (from a run's config.yaml written before, too)"
            )
    unknown = sorted(set(values) - set(fields))
    if unknown:
        where = f"section '{prefix}'" if prefix else "the top level"
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)} in {where}; "
            f"valid keys: {', '.join(prefix + k for k in fields)}"
        )
    kwargs = {}
    for name, value in values.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, prefix + name)
    try:
        return cls(**kwargs)
    except ValueError as err:  # a section's own check (e.g. DataConfig.__post_init__)
        raise ConfigError(str(err)) from err


def _set_dotted(tree: dict[str, Any], key: str, raw: str) -> None:
    """Set `a.b.c=raw` in a nested dict; the value is parsed as YAML (so 3e-4, true, [1, 2] work)."""
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
    value = yaml.safe_load(raw) if raw != "" else ""
    node[parts[-1]] = value


def config_from_dict(tree: dict[str, Any]) -> ExperimentConfig:
    """Build and validate an ExperimentConfig from a nested dict (as read from YAML); the fields in DERIVED_KEYS are
    filled from their source keys."""
    cfg = _build(ExperimentConfig, tree, "")
    for key, source in DERIVED_KEYS.items():
        *sections, name = key.split(".")
        setattr(functools.reduce(getattr, sections, cfg), name, functools.reduce(getattr, source.split("."), cfg))
    _check_choices(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read a YAML config (or the defaults when `path` is None) and apply `key=value` overrides.

    Raises ConfigError for a missing file, an unknown key, a wrong type or a value outside its choices.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; the shipped configs are in configs/")
        tree = yaml.safe_load(path.read_text()) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(tree).__name__}")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. optim.lr=3e-4)")
        _set_dotted(tree, key.strip(), raw.strip())
    return config_from_dict(tree)


def config_to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """The resolved config as a plain nested dict (what is written to RUN_DIR/config.yaml): its config keys, so
    without the fields in DERIVED_KEYS, which loading it fills again."""
    tree = dataclasses.asdict(cfg)
    for key in DERIVED_KEYS:
        *sections, name = key.split(".")
        node = tree
        for section in sections:
            node = node[section]
        del node[name]
    return tree


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    """Write the resolved config as YAML; loading it back gives an equal config."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
