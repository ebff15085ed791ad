"""The terms the one-recipe work measures: SIGReg in the model, targets from the online encoder, the within-clip
contrast and share."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_model import tiny_cfg

from worldmodel.model.encoder import preprocess
from worldmodel.model.sigreg import gaussian_level
from worldmodel.model.world_model import WorldModel, clip_contrast, within_clip_share
from worlds.moving_digits import simulate


@pytest.fixture(scope="module")
def frames():
    """6 real moving-digit clips of 5 frames at 32x32: uint8 [6, 5, 32, 32, 3]."""
    rng = np.random.default_rng(1)
    return torch.from_numpy(np.stack([simulate(5, rng)[0][:, ::2, ::2] for _ in range(6)]))


def test_clip_contrast_rewards_predictions_that_tell_a_clip_s_frames_apart():
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(4, 6, 1, 16, generator=gen)
    good, good_acc = clip_contrast(target, target)
    assert good_acc == 1.0 and good < 0.1
    still = target[:, :1].expand_as(target)  # every prediction the clip's first target: nothing tells them apart
    bad, bad_acc = clip_contrast(still, target)
    assert bad > 1.0 and bad_acc < 0.5
    shared = target + 10 * torch.randn(4, 1, 1, 16, generator=gen)  # a large per-clip constant drowns the changes
    assert clip_contrast(shared, shared)[0] > good


def test_clip_contrast_without_the_input_frame_does_not_punish_a_copy_last_forecast():
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(3, 6, 1, 16, generator=gen)
    copy_last = torch.cat([torch.randn(3, 1, 1, 16, generator=gen), target[:, :-1]], dim=1)  # prediction t = target t-1
    with_input, _ = clip_contrast(copy_last, target)
    without_input, _ = clip_contrast(copy_last, target, exclude_input=True)
    assert with_input > 5.0 and without_input < with_input - 3.0


def test_within_clip_share_is_zero_for_still_clips_and_one_for_clips_that_differ_only_in_time():
    gen = torch.Generator().manual_seed(0)
    still = torch.randn(8, 1, 16, generator=gen).expand(8, 5, 16)
    assert within_clip_share(still) < 1e-6
    moving = torch.randn(1, 5, 16, generator=gen).expand(8, 5, 16)
    assert within_clip_share(moving) == pytest.approx(1.0, abs=1e-5)


def test_online_targets_need_an_anti_collapse_term_and_carry_gradient(frames):
    with pytest.raises(ValueError, match="sigreg_weight > 0"):
        WorldModel(tiny_cfg(latent="none", target="online"))
    torch.manual_seed(0)
    model = WorldModel(tiny_cfg(latent="none", target="online", sigreg_weight=0.09))
    model.train()
    out = model(frames)
    assert {"pred", "sigreg"} <= set(out["terms"]) and out["terms"]["sigreg"] > 0.5 * gaussian_level()
    # the target is the online encoder's own output: the prediction term alone reaches the encoder through it
    target = model.encode_target(frames)
    assert torch.allclose(target, model.encode(frames).detach(), atol=1e-5)
    out["terms"]["pred"].backward()
    assert model.encoder.head[-1].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.target_encoder.parameters())


def test_sigreg_pulls_a_narrow_encoder_wider(frames):
    torch.manual_seed(0)
    model = WorldModel(tiny_cfg(latent="none", sigreg_weight=1.0))
    model.train()
    optimiser = torch.optim.Adam(model.encoder.parameters(), lr=3e-3)
    first = None
    for step in range(30):
        model.sigreg_seed = step
        value = model(frames)["terms"]["sigreg"]
        first = float(value.detach()) if first is None else first
        optimiser.zero_grad()
        value.backward()
        optimiser.step()
    assert float(value.detach()) < 0.5 * first


def test_smooth_term_is_acceleration_over_velocity_and_does_not_reward_stillness(frames):
    """model.smooth_weight: the frame embedding's mean |acceleration| over its mean |velocity| within the clips; a
    trajectory a constant-velocity guess extrapolates scores 0, and shrinking the motion does not lower it."""
    torch.manual_seed(0)
    model = WorldModel(tiny_cfg(latent="none", granularity="frame", smooth_weight=2.0))
    model.train()
    out = model(frames)
    raw = model.encoder(preprocess(frames, model.cfg.img_size))  # [B, T, 1, D], before the TokenNorm
    velocity = raw[:, 1:] - raw[:, :-1]
    expected = (velocity[:, 1:] - velocity[:, :-1]).abs().mean() / (velocity.abs().mean() + 1e-6)
    torch.testing.assert_close(out["terms"]["smooth"], expected)
    torch.testing.assert_close(out["loss"], out["terms"]["pred"] + 2.0 * out["terms"]["smooth"])
    out["terms"]["smooth"].backward()
    assert model.encoder.head[-1].weight.grad.abs().sum() > 0  # it trains the encoder
    # the scale-free ratio: the same trajectory at a tenth of the motion scores the same
    with torch.no_grad():
        model.encoder.head[-1].weight.mul_(0.1)
        model.encoder.head[-1].bias.mul_(0.1)
    torch.testing.assert_close(model(frames)["terms"]["smooth"], expected.detach(), rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="at least 3 frames, got T=2"):
        model(frames[:, :2])
