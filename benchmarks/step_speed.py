"""How fast a training step is on this machine's device, and where its time goes.

    python -m benchmarks.step_speed --config configs/gpu_vits224.yaml [--synthetic] [--steps 20] [--warmup 5]
        [--peak-tflops X] [--decode-fps-per-core X] [--cpu] [section.key=value ...]

Builds the model, optimizer and speed options exactly as the trainer does (worldmodel/train/setup.py, accelerate
with `train.mixed_precision`; `train.compile=true` compiles in place), runs `--warmup` steps (compilation happens
there), then times `--steps` real training steps and prints one JSON line:

    step_s, data_wait_s, fwd_bwd_s, optimizer_s, ema_s   mean seconds per optimiser step, split by phase: waiting for
                        the batch and copying it to the device; forward + backward over the micro-batches; gradient
                        clipping, AdamW, zero_grad and the LR scheduler; the EMA update of the target encoder. The
                        device is synchronised at each phase boundary, so the phases add up to the step (the
                        trainer waits for the device only at its check steps, every train.check_every steps, so the
                        benchmark's per-phase syncs cost it a little on a GPU). The steps run as the trainer's steps
                        between log steps: no collapse monitors.
    data_wait_share     data_wait_s / step_s
    flops_per_step      model FLOPs of one optimiser step (online encoder forward + backward, target encoder forward,
                        predictor, latents, loss), counted by torch.utils.flop_counter.FlopCounterMode on one eager
                        step (PyTorch's own formulas; attention counted as full, masks ignored)
    attention_flop_share, conv_flop_share   the shares of scaled-dot-product attention and of convolution (the ViT's
                        patch embedding: what a channels-last layout could speed up)
    tflops_s            flops_per_step / step_s / 1e12
    peak_tflops, mfu    the device's dense bf16 peak from its specification (PEAK_TFLOPS; --peak-tflops overrides;
                        null for a device not in the table) and model-FLOPs utilisation tflops_s / peak_tflops
    clips_s, frames_s   clips and frames trained per second (batch_size x grad_accum_steps per step)
    peak_memory_gb      peak_memory_kind cuda_max_allocated (torch.cuda.max_memory_allocated over the timed steps)
                        or cpu_max_rss (the process's peak resident set)
    decode_fps_per_core, decode_workers_needed   frames/s one CPU core decodes through the shard pipeline at this
                        image size (DECODE_FPS_PER_CORE, measured with benchmarks.loaders;
                        --decode-fps-per-core overrides) and the decode workers (cores) one device needs to keep up:
                        ceil(frames_s / decode_fps_per_core)

`--synthetic` feeds random uint8 clips of the configured shape (a pool of two batches in pinned host memory,
copied to the device each step like a real batch): the model's speed without any decoder. It imports nothing
from the data pipeline's readers, so it runs where decord, PyAV, webdataset and braceexpand are not installed.
Without it the batches come from `data.train_shards` through the real pipeline (`data.num_workers` workers).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import resource
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from worldmodel.model.config import CHANNELS
from worldmodel.model.latents import latent_class
from worldmodel.run.config import ConfigError, ExperimentConfig, load_config

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's specification sheets, TFLOP/s; first match wins.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"\bH100\b.*\bPCIe\b", 756.0),
    (r"\bH100\b.*\bNVL\b", 835.0),
    (r"\bG?H[12]00\b|\bH800\b", 989.0),  # H100 SXM, H200, GH200, H800
    (r"\bB200\b", 2250.0),
    (r"\bA100\b|\bA800\b", 312.0),
    (r"\bL40S\b", 362.0),
    (r"\bL40\b", 181.0),
    (r"\bL4\b", 121.0),
    (r"\bA10\b", 125.0),
)
# Frames/s one CPU core delivers through the shard pipeline, by image size: decord, real videos re-encoded to that
# size by the writer (H.264, GOP 8), 16-frame clips, 2 clips per video as the GPU configs read them; the mean of
# `benchmarks.loaders` and `benchmarks.pipeline` with 1 and 2 workers on a 2-vCPU AMD EPYC VM, rounded down
# (docs/architecture.md, "GPU path"). Another CPU, codec or bitrate differs: pass --decode-fps-per-core.
DECODE_FPS_PER_CORE: dict[int, float] = {64: 4700.0, 224: 1100.0}


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak TFLOP/s of a CUDA device by its name (torch.cuda.get_device_name), or None if unknown."""
    for pattern, value in PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return value
    return None


def _flop_formulas() -> dict[Any, Callable]:
    """FLOP formulas for the CPU's fused attention kernels, which FlopCounterMode does not map (it maps the CUDA
    ones): torch's own formulas for the CUDA flash-attention kernels, whose arguments start the same way."""
    from torch.utils.flop_counter import flop_registry  # noqa: PLC0415

    aten = torch.ops.aten
    mapping: dict[Any, Callable] = {}
    for cpu_name, cuda_name in (
        ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention"),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", "_scaled_dot_product_flash_attention_backward"),
    ):
        cpu_op, cuda_op = getattr(aten, cpu_name, None), getattr(aten, cuda_name, None)
        if cpu_op is None or cpu_op in flop_registry or cuda_op not in flop_registry:
            continue
        formula = flop_registry[cuda_op]

        def raw(*args, _formula=formula, **kwargs):  # already takes the arguments, not their shapes
            return _formula(*args, **kwargs)

        raw._get_raw = True
        mapping[cpu_op] = raw
    return mapping


def _op_share(counts: dict[Any, int], total: int, words: tuple[str, ...]) -> float:
    """The share of `total` FLOPs in ops whose name contains one of `words`."""
    part = sum(n for op, n in counts.items() if any(w in str(op) for w in words))
    return round(part / total, 4) if total else 0.0


def _synthetic_batches(cfg: ExperimentConfig, pin: bool) -> Iterator[dict]:
    """Random uint8 clips [B, T, H, W, C] of the configured shape (and random actions for the oracle), from a pool
    of two batches in host memory (pinned for a CUDA device)."""
    d, m = cfg.data, cfg.model
    generator = torch.Generator().manual_seed(cfg.seed)
    pool = []
    for _ in range(2):
        frames = torch.randint(
            0, 256, (d.batch_size, d.clip_length, m.img_size, m.img_size, CHANNELS), dtype=torch.uint8,
            generator=generator,
        )  # fmt: skip
        batch = {"frames": frames.pin_memory() if pin else frames}
        if latent_class(m.latent).needs_actions:
            batch["action"] = torch.randn(d.batch_size, d.clip_length - 1, m.action_dim, generator=generator)
        pool.append(batch)
    i = 0
    while True:
        yield pool[i % len(pool)]
        i += 1


def _pipeline_batches(cfg: ExperimentConfig) -> Iterator[dict]:
    """Batches from data.train_shards through the training pipeline, one loader for every epoch as in the trainer
    (one process, rank 0)."""
    from data_pipeline.stream import make_train_loader  # noqa: PLC0415  (not on the synthetic path)

    d = cfg.data
    yield from make_train_loader(d, d.train_shards, seed=cfg.seed, epoch=0, rank=0, world_size=1, epochs=None)


def _check_synthetic_oracle(cfg: ExperimentConfig) -> None:
    if latent_class(cfg.model.latent).needs_actions and not cfg.model.action_dim:
        raise ConfigError(
            f"--synthetic with model.latent={cfg.model.latent} needs model.action_dim (the data cannot tell it)"
        )


def _significant(value: float, digits: int = 4) -> float:
    """`value` rounded to `digits` significant figures (a CPU's 0.004 TFLOP/s and a GPU's 250 keep their precision)."""
    return float(f"{value:.{digits}g}")


def measure(
    cfg: ExperimentConfig,
    *,
    synthetic: bool,
    steps: int,
    warmup: int,
    cpu: bool = False,
    peak: float | None = None,
    decode_fps_per_core: float | None = None,
) -> dict[str, Any]:
    """Time `steps` training steps of `cfg` after `warmup` steps; returns the record main() prints."""
    from accelerate import Accelerator  # noqa: PLC0415
    from accelerate.utils import set_seed  # noqa: PLC0415

    from worldmodel.model.world_model import WorldModel  # noqa: PLC0415
    from worldmodel.train.schedules import lr_factor  # noqa: PLC0415
    from worldmodel.train.setup import (  # noqa: PLC0415
        build_optimizer,
        compile_model,
        resolve_mixed_precision,
        set_tf32,
        set_thread_budget,
        timm_fused_attention,
        use_fused_adamw,
    )

    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision),
        gradient_accumulation_steps=cfg.optim.grad_accum_steps,
        step_scheduler_with_optimizer=False,
        cpu=cpu,
    )
    device = accelerator.device
    cuda = device.type == "cuda"
    threads_line = set_thread_budget(cfg.train.threads, 0 if synthetic else cfg.data.num_workers, 1)
    if synthetic:
        _check_synthetic_oracle(cfg)
        batches = _synthetic_batches(cfg, pin=cuda)
    else:
        batches = _pipeline_batches(cfg)
        first = next(batches)
        if latent_class(cfg.model.latent).needs_actions and not cfg.model.action_dim:
            cfg.model.action_dim = int(first["action"].shape[-1])
        batches = _chain(first, batches)

    set_seed(cfg.seed)
    model = WorldModel(cfg.model).to(device)
    tf32 = set_tf32(cfg.train, device)
    fused = use_fused_adamw(cfg.train, device)
    optimizer = build_optimizer(model, cfg.optim, fused=fused)
    lr_kw = dict(
        warmup_steps=cfg.optim.warmup_steps, total_steps=cfg.train.steps, lr=cfg.optim.lr, min_lr=cfg.optim.min_lr
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, **lr_kw))
    model, optimizer = accelerator.prepare(model, optimizer)
    core = accelerator.unwrap_model(model)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    accum = cfg.optim.grad_accum_steps
    beta, momentum = cfg.model.beta, cfg.model.ema_start
    needs_actions = latent_class(cfg.model.latent).needs_actions

    def forward_backward(batch: dict) -> None:
        action = batch["action"].to(device, non_blocking=True) if needs_actions else None
        with accelerator.accumulate(model):
            # as the trainer's steps between log steps: no collapse monitors
            out = model(batch["frames"].to(device, non_blocking=True), action=action, beta=beta, monitor=False)
            accelerator.backward(out["loss"])

    # FLOPs of one optimiser step, counted eagerly (before any compilation), then its gradients dropped
    counter = FlopCounterMode(display=False, custom_mapping=_flop_formulas())
    with counter:
        for _ in range(accum):
            forward_backward(next(batches))
    optimizer.zero_grad(set_to_none=True)
    flops = counter.get_total_flops()
    by_op = counter.get_flop_counts().get("Global", {})
    if cfg.train.compile:
        compile_model(core, cfg.train.compile_backend)

    phases = {"data_wait": 0.0, "fwd_bwd": 0.0, "optimizer": 0.0, "ema": 0.0}

    def step(timed: bool) -> None:
        for _ in range(accum):
            start = time.perf_counter()
            batch = next(batches)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k in ("frames", "action")}
            sync()
            loaded = time.perf_counter()
            forward_backward(batch)
            sync()
            if timed:
                phases["data_wait"] += loaded - start
                phases["fwd_bwd"] += time.perf_counter() - loaded
        start = time.perf_counter()
        accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or math.inf)  # read at log steps only
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        sync()
        stepped = time.perf_counter()
        core.update_target(momentum)
        sync()
        if timed:
            phases["optimizer"] += stepped - start
            phases["ema"] += time.perf_counter() - stepped

    begin = time.perf_counter()
    for _ in range(warmup):
        step(timed=False)
    warmup_s = time.perf_counter() - begin
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):
        step(timed=True)

    per_step = {name: total / steps for name, total in phases.items()}
    step_s = sum(per_step.values())
    clips_s = cfg.data.batch_size * accum / step_s
    frames_s = clips_s * cfg.data.clip_length
    tflops_s = flops / step_s / 1e12
    device_name = torch.cuda.get_device_name(device) if cuda else _cpu_name()
    if peak is None and cuda:
        peak = peak_tflops(device_name)
    if cuda:
        memory_gb, memory_kind = torch.cuda.max_memory_allocated(device) / 2**30, "cuda_max_allocated"
    else:
        memory_gb, memory_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "cpu_max_rss"
    if decode_fps_per_core is None:
        decode_fps_per_core = DECODE_FPS_PER_CORE.get(cfg.data.image_size)
    accelerator.end_training()
    return {
        "device": device.type,
        "device_name": device_name,
        "torch": torch.__version__,
        "mixed_precision": accelerator.mixed_precision,
        "compile": cfg.train.compile,
        "compile_backend": cfg.train.compile_backend if cfg.train.compile else None,
        "tf32": tf32,
        "fused_adamw": fused,
        "timm_fused_attn": timm_fused_attention(core),
        "synthetic": synthetic,
        "latent": cfg.model.latent,
        "params_m": round(sum(p.numel() for p in core.parameters() if p.requires_grad) / 1e6, 2),
        "batch_size": cfg.data.batch_size,
        "grad_accum_steps": accum,
        "clip_length": cfg.data.clip_length,
        "image_size": cfg.model.img_size,
        "patch_size": cfg.model.patch_size,
        "num_workers": None if synthetic else cfg.data.num_workers,
        "torch_threads": torch.get_num_threads(),
        "threads_rule": threads_line,
        "warmup_steps": warmup,
        "warmup_s": round(warmup_s, 3),
        "steps": steps,
        "step_s": round(step_s, 5),
        "data_wait_s": round(per_step["data_wait"], 5),
        "fwd_bwd_s": round(per_step["fwd_bwd"], 5),
        "optimizer_s": round(per_step["optimizer"], 5),
        "ema_s": round(per_step["ema"], 5),
        "data_wait_share": round(per_step["data_wait"] / step_s, 4),
        "flops_per_step": flops,
        "attention_flop_share": _op_share(by_op, flops, ("scaled_dot_product", "attention")),
        "conv_flop_share": _op_share(by_op, flops, ("convolution",)),
        "tflops_s": _significant(tflops_s),
        "peak_tflops": peak,
        "mfu": _significant(tflops_s / peak) if peak else None,
        "clips_s": round(clips_s, 2),
        "frames_s": round(frames_s, 1),
        "peak_memory_gb": round(memory_gb, 3),
        "peak_memory_kind": memory_kind,
        "decode_fps_per_core": decode_fps_per_core,
        "decode_workers_needed": math.ceil(round(frames_s, 1) / decode_fps_per_core) if decode_fps_per_core else None,
    }


def _cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), and the cores torch uses."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def _chain(first: dict, rest: Iterator[dict]) -> Iterator[dict]:
    yield first
    yield from rest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any section.key=value word is a config override (as for train.py).",
    )
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/gpu_vits224.yaml")
    parser.add_argument("--synthetic", action="store_true", help="random uint8 clips instead of the shards")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first, compilation included (default 5)")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak for mfu (default: PEAK_TFLOPS)")
    parser.add_argument("--decode-fps-per-core", type=float, help="default: DECODE_FPS_PER_CORE at data.image_size")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is there")
    words = sys.argv[1:] if argv is None else argv
    overrides = [w for w in words if "=" in w and not w.startswith("-")]
    args = parser.parse_args([w for w in words if w not in overrides])
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    try:
        cfg = load_config(args.config, overrides)
        record = measure(
            cfg,
            synthetic=args.synthetic,
            steps=args.steps,
            warmup=args.warmup,
            cpu=args.cpu,
            peak=args.peak_tflops,
            decode_fps_per_core=args.decode_fps_per_core,
        )
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"config": args.config, "overrides": overrides, **record}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
