"""The train section's speed options (worldmodel/train/setup.py) change nothing but speed: compiled and eager
training agree, checkpoints are interchangeable, and bf16 autocast leaves the KL, the norms' statistics and the EMA
in fp32. torch.compile runs with the aot_eager backend here (no C++ compiler, seconds); inductor is the default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from worldmodel.model.world_model import WorldModel
from worldmodel.run.checkpoint import latest_checkpoint, load_model_state
from worldmodel.run.config import ConfigError, load_config
from worldmodel.train.loop import train
from worldmodel.train.setup import (
    build_optimizer,
    compile_model,
    set_tf32,
    timm_fused_attention,
    use_fused_adamw,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def _frames(seed: int = 0, batch: int = 4, frames: int = 6, size: int = 64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, frames, size, size, 3), dtype=torch.uint8, generator=generator)


def _train_steps(model: WorldModel, optimizer, steps: int) -> list[float]:
    """`steps` trainer-like steps (forward, backward, clip, AdamW, EMA) on fixed clips with seeded latent noise."""
    losses = []
    for i in range(steps):
        torch.manual_seed(100 + i)  # the same reparameterisation noise in both runs
        out = model(_frames(i), beta=0.01)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_target(0.9)
        losses.append(out["loss"].item())
    return losses


def _model(compiled: bool, latent: str = "adassl_v") -> tuple[WorldModel, torch.optim.Optimizer]:
    cfg = load_config(TINY, [f"model.latent={latent}"])
    torch.manual_seed(0)
    model = WorldModel(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    if compiled:
        compile_model(model, "aot_eager")
    return model, optimizer


def test_speed_keys_default_to_the_eager_cpu_behaviour_and_are_typed():
    train_cfg = load_config(TINY).train
    assert (train_cfg.compile, train_cfg.compile_backend, train_cfg.tf32, train_cfg.fused_adamw) == (
        False, "inductor", True, True,
    )  # fmt: skip
    with pytest.raises(ConfigError, match="train.compile must be true or false"):
        load_config(TINY, ["train.compile=1"])
    cfg = load_config(TINY, ["train.compile=true", "train.compile_backend=aot_eager", "train.tf32=false"])
    assert cfg.train.compile and cfg.train.compile_backend == "aot_eager" and not cfg.train.tf32
    # the CUDA-only options leave a CPU run as it was
    assert not set_tf32(cfg.train, torch.device("cpu"))
    assert not use_fused_adamw(cfg.train, torch.device("cpu"))
    assert use_fused_adamw(cfg.train, torch.device("cuda")) and not use_fused_adamw(
        load_config(TINY, ["train.fused_adamw=false"]).train, torch.device("cuda")
    )


def test_attention_runs_through_scaled_dot_product_kernels():
    model = WorldModel(load_config(TINY).model)
    attention = [m for m in model.modules() if hasattr(m, "fused_attn")]
    assert len(attention) == 2  # the online and the target encoder's one block each
    assert timm_fused_attention(model)


@pytest.mark.parametrize("latent", ["adassl_v", "none"])
def test_compiled_training_equals_eager(latent):
    eager, eager_opt = _model(False, latent)
    compiled, compiled_opt = _model(True, latent)
    eager_losses = _train_steps(eager, eager_opt, 3)
    compiled_losses = _train_steps(compiled, compiled_opt, 3)
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5, abs=1e-6)
    compiled_state = compiled.state_dict()
    for name, value in eager.state_dict().items():  # online, EMA target, predictor, norm statistics
        torch.testing.assert_close(compiled_state[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_compiled_state_dict_has_plain_names_and_loads_both_ways():
    eager, _ = _model(False)
    compiled, _ = _model(True)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert not [name for name in compiled.state_dict() if "_orig_mod" in name]
    with torch.no_grad():
        for p in compiled.parameters():
            p.add_(0.01)
    eager.load_state_dict(compiled.state_dict(), strict=True)
    frames = _frames(7)
    eager.eval(), compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled.encode_target(frames), eager.encode_target(frames))
    fresh, _ = _model(True)
    fresh.load_state_dict(eager.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh.encode(frames), eager.encode(frames))


def test_bf16_autocast_keeps_kl_norm_statistics_and_ema_in_fp32():
    model, optimizer = _model(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = torch.rand(2, 6, 3, 64, 64)
        assert model.encoder(x).dtype == torch.bfloat16  # autocast is on: the ViT computes in bf16
        out = model(_frames(), beta=0.01)
        tokens = model.encode(_frames())
    assert tokens.dtype == torch.float32  # normalised tokens (what the predictor and the loss read)
    assert out["loss"].dtype == torch.float32
    for name in ("pred", "kl", "reg"):
        assert out["terms"][name].dtype == torch.float32, name
    for norm in (model.norm, model.online_norm):
        assert norm.center.dtype == torch.float32
        assert norm.center.abs().sum() > 0  # updated in this step
    out["loss"].backward()
    optimizer.step()
    model.update_target(0.9)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.dtype for p in model.target_encoder.parameters()} == {torch.float32}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stats = model.infer_latents(model.encode(_frames()), model.encode_target(_frames()))
    assert {stats[k].dtype for k in ("mu_q", "sigma_q", "mu_p", "sigma_p", "kl")} == {torch.float32}


def _train_tiny(run_dir: Path, shards: Path, *overrides: str) -> list[dict]:
    cfg = load_config(
        TINY,
        [
            f"run_dir={run_dir}",
            f"data.train_shards={shards / 'train' / '*.tar'}",
            f"data.val_shards={shards / 'val' / '*.tar'}",
            "train.steps=3",
            *overrides,
        ],
    )
    assert train(cfg)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_trainer_with_train_compile_matches_eager_and_its_checkpoint_loads_uncompiled(digits_shards, tmp_path):
    eager = _train_tiny(tmp_path / "eager", digits_shards)
    compile_options = ("train.compile=true", "train.compile_backend=aot_eager")
    compiled = _train_tiny(tmp_path / "compiled", digits_shards, *compile_options)
    eager_losses = [r["loss"] for r in eager if "loss" in r]
    compiled_losses = [r["loss"] for r in compiled if "loss" in r]
    assert len(eager_losses) == 3
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    model = WorldModel(load_config(tmp_path / "compiled" / "config.yaml").model)
    load_model_state(model, latest_checkpoint(tmp_path / "compiled"))  # strict: the same names as an eager model
