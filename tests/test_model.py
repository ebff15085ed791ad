"""WorldModel: the training forward, EMA target, latent inference, the one rollout function, collapse monitors,
and a short training run on real moving-digit clips for every latent kind and both objectives."""

import time

import numpy as np
import pytest
import torch
from torch import nn

from data_pipeline.make_moving_digits import simulate
from worldmodel.config import ModelConfig
from worldmodel.model import WorldModel
from worldmodel.monitors import batch_variance, effective_rank, per_dim_std

LATENT_KINDS = ["none", "adassl_v", "adassl_s", "oracle"]


def tiny_cfg(**overrides) -> ModelConfig:
    values = dict(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=1,
        num_heads=2,
        pred_dim=32,
        pred_depth=2,
        pred_cond_depth=1,
        pred_num_heads=2,
        latent_dim=4,
        summary_dim=16,
        action_dim=2,
    )
    values.update(overrides)
    return ModelConfig(**values)


def make_model(seed: int = 0, **overrides) -> WorldModel:
    torch.manual_seed(seed)
    return WorldModel(tiny_cfg(**overrides))


@pytest.fixture(scope="module")
def digits():
    """8 real moving-digit clips of 4 frames, subsampled to 32x32: frames uint8 [8, 4, 32, 32, 3], action [8, 3, 2]."""
    rng = np.random.default_rng(0)
    videos = [simulate(4, rng, kick_prob=0.3) for _ in range(8)]
    frames = torch.from_numpy(np.stack([v[::, ::2, ::2] for v, _ in videos]))
    action = torch.tensor(np.stack([meta["action"] for _, meta in videos]), dtype=torch.float32)
    return frames, action


def perturb_conditioning(model: WorldModel) -> None:
    """Random weights for the zero-initialised conditioning and output change, so r visibly changes predictions."""
    for name, param in model.predictor.named_parameters():
        if "modulation" in name or "out_proj" in name:
            nn.init.normal_(param, std=0.5)


# ---- monitors ----------------------------------------------------------------------------------------------------


def test_monitors_detect_collapse():
    torch.manual_seed(0)
    collapsed = torch.ones(64, 16) * torch.randn(16)
    spread = torch.randn(4096, 16)
    assert per_dim_std(collapsed) < 1e-6 and abs(per_dim_std(spread) - 1.0) < 0.05
    assert abs(effective_rank(collapsed) - 1.0) < 1e-3
    assert effective_rank(spread) > 15.0
    assert abs(effective_rank(torch.randn(4096, 2) @ torch.randn(2, 16)) - 2.0) < 0.5
    assert batch_variance(collapsed[:, None].expand(64, 3, 16)) < 1e-6
    assert abs(batch_variance(spread) - 1.0) < 0.05


# ---- forward, EMA --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("latent", LATENT_KINDS)
@pytest.mark.parametrize("objective", ["jepa", "infonce"])
def test_loss_goes_down_on_moving_digits(latent, objective, digits):
    """jepa: with the encoders held fixed (so the targets do not move), the predictor and the latent modules learn to
    beat copy-last on real moving-digit clips; it starts as copy-last (the change is zero-initialised). infonce:
    the whole model trains and its loss falls."""
    frames, action = digits
    model = make_model(latent=latent, objective=objective)
    if objective == "jepa":
        model.encoder.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses, copy_last = [], []
    for _ in range(300 if objective == "jepa" else 200):
        out = model(frames, action=action, beta=0.01)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        model.update_target(0.99)
        losses.append(out["terms"]["pred"].item())
        copy_last.append(out["monitors"].get("copy_last", torch.zeros(())).item())
    assert np.isfinite(losses).all()
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    if objective == "infonce":
        assert last < 0.6 * first, f"{latent}/{objective}: loss {first:.3f} -> {last:.3f}"
        return
    assert losses[0] == pytest.approx(copy_last[0], abs=1e-6), "the jepa predictor must start as copy-last"
    baseline = np.mean(copy_last[-10:])
    assert last < 0.8 * baseline, f"{latent}/{objective}: pred {last:.3f} vs copy-last {baseline:.3f}"


def test_default_config_forward_backward_on_cpu():
    """Default ModelConfig, batch 16 x 8 frames of 64x64: prints the parameter count and the time (not asserted)."""
    torch.manual_seed(0)
    model = WorldModel(ModelConfig())
    frames = torch.randint(0, 256, (16, 8, 64, 64, 3), dtype=torch.uint8)
    start = time.perf_counter()
    out = model(frames, beta=0.01)
    out["loss"].backward()
    seconds = time.perf_counter() - start
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"default WorldModel: {trainable:,} trainable / {total:,} total params; fwd+bwd {seconds:.2f} s on CPU")
    assert torch.isfinite(out["loss"])
