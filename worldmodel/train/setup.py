"""What the trainer and the step benchmark (benchmarks/step_speed.py) set up the same way: mixed precision, the
optimizer and the speed options of the `train` section.

    train.compile          torch.compile the encoder, the EMA target encoder and the predictor (default false)
    train.compile_backend  its backend (default inductor; the tests use aot_eager, which needs no C++ compiler)
    train.tf32             CUDA only: TF32 for the fp32 matmuls autocast leaves (default true; cuDNN convolutions use
                           TF32 by default anyway)
    train.fused_adamw      CUDA only: AdamW's fused kernel, one launch for all parameters (default true)
    train.threads          torch intra-op threads per training process (default 0: from the cores, `thread_budget`)

Compilation is in place (`nn.Module.compile` for the encoders, compiled bound methods for the predictor's trunk
and head), so parameter names, state dicts and checkpoints are the same as without it (no `_orig_mod.` prefixes),
and the EMA update moves the very tensors the compiled code reads. Nothing here imports data_pipeline, so the step
benchmark's synthetic mode runs where no video decoder or webdataset is installed.

Mixed precision (bf16 autocast) keeps in fp32 what needs the range: the encoders' token normalisation and its
running statistics (`TokenNorm` works on `.float()`), the Gaussians and KL of AdaSSL-V (`.float()` before softplus),
the loss (its inputs are fp32 tokens), and the weights themselves, so the EMA runs in fp32.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from worldmodel.run.config import OptimConfig, TrainConfig

_NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.Embedding)


def resolve_mixed_precision(name: str) -> str:
    """train.mixed_precision -> accelerate's value: "auto" is bf16 when CUDA is available, else "no"."""
    if name == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return name


def build_optimizer(model: nn.Module, cfg: OptimConfig, fused: bool = False) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on norms, biases, embeddings and position/cls tokens.

    `fused`: PyTorch's fused AdamW kernel (the parameters must already be on the device it runs on).
    """
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            exempt = isinstance(module, _NORM_LAYERS) or param.ndim <= 1 or "embed" in name or "token" in name
            (no_decay if exempt else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), **kwargs)


def use_fused_adamw(cfg: TrainConfig, device: torch.device) -> bool:
    """train.fused_adamw on a CUDA device (elsewhere the default foreach implementation is kept)."""
    return cfg.fused_adamw and torch.device(device).type == "cuda"


def set_tf32(cfg: TrainConfig, device: torch.device) -> bool:
    """TF32 for fp32 matmuls (torch.set_float32_matmul_precision("high")) when train.tf32 is on and `device` is
    CUDA; returns whether it did. Process-wide; never on a CPU, where "high" may mean reduced-precision matmuls too."""
    if not (cfg.tf32 and torch.device(device).type == "cuda"):
        return False
    torch.set_float32_matmul_precision("high")  # TF32 matmuls; cuDNN convolutions use TF32 by default already
    return True


def compile_model(model: nn.Module, backend: str = "inductor") -> None:
    """torch.compile a WorldModel's encoder, EMA target encoder and predictor (trunk and conditioned head), in place.

    Parameter names and objects do not change: checkpoints and `update_target` work as without compilation. The
    latent module, token normalisation, loss and monitors stay eager (small, and some of them data-dependent).
    """
    model.encoder.compile(backend=backend)
    model.target_encoder.compile(backend=backend)
    predictor = model.predictor
    predictor.trunk_features = torch.compile(predictor.trunk_features, backend=backend)
    predictor.from_features = torch.compile(predictor.from_features, backend=backend)


def timm_fused_attention(model: nn.Module) -> bool:
    """Whether every timm attention layer in `model` runs through F.scaled_dot_product_attention (timm's
    `fused_attn`, on unless TIMM_FUSED_ATTN=0); the predictor's blocks always do."""
    flags = [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]
    return bool(flags) and all(flags)


def available_cores() -> int:
    """The CPU cores this process may use: its CPU affinity (what Slurm's cgroup or `taskset` allows), capped by
    SLURM_CPUS_PER_TASK when set; os.cpu_count() where affinity is unknown (macOS)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        cores = min(cores, int(slurm))
    return max(1, cores)


def thread_budget(requested: int, num_workers: int, local_processes: int, cores: int | None = None) -> int:
    """Torch intra-op threads for one training process: `requested` if > 0; otherwise its share of `cores` (default
    `available_cores()`) among the `local_processes` training processes of this machine, minus its `num_workers`
    decode workers (each decodes on one core), at least 1. On 2 cores, 1 process with 1 worker: 1 thread."""
    if requested > 0:
        return requested
    cores = available_cores() if cores is None else cores
    return max(1, cores // max(1, local_processes) - num_workers)


def set_thread_budget(requested: int, num_workers: int, world_size: int) -> str:
    """Set torch's intra-op threads from `thread_budget` (train.threads, data.num_workers; the local process count
    from LOCAL_WORLD_SIZE, as launchers set it, else `world_size`); returns the line to log."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    threads = thread_budget(requested, num_workers, local)
    torch.set_num_threads(threads)
    origin = (
        "train.threads"
        if requested > 0
        else f"{available_cores()} cores / {local} training process(es) - {num_workers} decode worker(s)"
    )
    return (
        f"threads: {threads} torch intra-op thread(s) per training process ({origin}), 1 per decode worker; "
        "override with train.threads"
    )
