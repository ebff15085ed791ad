"""Predictor: the frame-causal mask, causality of predictions, zero-initialised conditioning."""

import pytest
import torch
from torch import nn

from worldmodel.model.predictor import Predictor, frame_causal_mask

D, N, T = 8, 4, 5


def make_predictor(cond_dim: int = 0, seed: int = 0) -> Predictor:
    torch.manual_seed(seed)
    return Predictor(
        embed_dim=D,
        num_patches=N,
        max_frames=8,
        dim=16,
        depth=3,
        cond_depth=1,
        num_heads=2,
        cond_dim=cond_dim,
    ).eval()


def perturb_conditioning(predictor: Predictor) -> None:
    """Give the zero-initialised maps (conditioning, output change) random weights, as training would."""
    for name, param in predictor.named_parameters():
        if "modulation" in name or "out_proj" in name:
            nn.init.normal_(param, std=0.5)


def test_frame_causal_mask_small_case():
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(frame_causal_mask(3, 2), expected)


def test_changing_a_future_frame_or_its_latent_never_changes_a_past_prediction():
    predictor = make_predictor(cond_dim=3)
    perturb_conditioning(predictor)
    tokens, cond = torch.randn(2, T, N, D), torch.randn(2, T, 3)
    out = predictor(tokens, cond)
    assert out.shape == (2, T, N, D)
    for t in range(T):
        changed_tokens, changed_cond = tokens.clone(), cond.clone()
        changed_tokens[:, t] += torch.randn(2, N, D)
        changed_cond[:, t] += 1.0
        for new in (predictor(changed_tokens, cond), predictor(tokens, changed_cond)):
            torch.testing.assert_close(new[:, :t], out[:, :t])
            assert not torch.allclose(new[:, t], out[:, t])


def test_prediction_uses_earlier_frames():
    predictor = make_predictor()
    perturb_conditioning(predictor)
    tokens = torch.randn(1, T, N, D)
    changed = tokens.clone()
    changed[:, 0] += 1.0
    assert not torch.allclose(predictor(changed)[:, -1], predictor(tokens)[:, -1])


def test_conditioning_is_inert_at_zero_and_reaches_the_prediction_from_init():
    """A zero conditioning vector gives the unconditioned predictor (zero modulation bias); a nonzero one changes
    the prediction at initialisation already (random modulation weight), so r gets a gradient from step 1."""
    plain = make_predictor(cond_dim=0)
    nn.init.normal_(plain.out_proj.weight, std=0.5)  # as after training: the output layer starts at zero
    conditioned = make_predictor(cond_dim=3)
    result = conditioned.load_state_dict(plain.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all("modulation" in key for key in result.missing_keys)
    tokens, cond = torch.randn(2, T, N, D), torch.randn(2, T, 3)
    torch.testing.assert_close(conditioned(tokens, torch.zeros_like(cond)), plain(tokens))
    assert not torch.allclose(conditioned(tokens, cond), plain(tokens))


def test_invalid_depths_and_inputs_are_rejected():
    with pytest.raises(ValueError, match="pred_cond_depth"):
        Predictor(embed_dim=D, num_patches=N, max_frames=4, dim=16, depth=2, cond_depth=2, num_heads=2)
    predictor = make_predictor(cond_dim=3)
    with pytest.raises(ValueError, match="max_frames"):
        predictor(torch.randn(1, 9, N, D))
    with pytest.raises(ValueError, match="conditioning must be"):
        predictor(torch.randn(1, 3, N, D), torch.randn(1, 2, 3))


def test_residual_predictor_starts_as_copy_last_and_absolute_at_zero():
    """At initialisation (zero output layer) a residual predictor predicts frame t+1 as its input at t (copy-last);
    an absolute one predicts 0, the centre of the normalised targets."""
    tokens = torch.randn(2, T, N, D)
    torch.manual_seed(0)
    residual = Predictor(D, N, 8, 16, 3, 1, 2, cond_dim=3, residual=True)
    torch.testing.assert_close(residual(tokens, torch.randn(2, T, 3)), tokens)
    absolute = make_predictor(cond_dim=3)
    assert torch.equal(absolute(tokens, torch.randn(2, T, 3)), torch.zeros_like(tokens))


def test_motion_input_gives_position_t_the_difference_to_frame_t_minus_1():
    """With `motion` the input at t is [x_t, x_t - x_{t-1}]: with attention switched off (its output projection
    zeroed, so no position reads another) the features at t still depend on frame t-1; without `motion` not."""
    for motion in (True, False):
        torch.manual_seed(0)
        predictor = Predictor(D, N, 8, 16, 2, 1, 2, motion=motion).eval()
        assert predictor.in_proj.in_features == (2 * D if motion else D)
        for block in predictor.trunk:
            nn.init.zeros_(block.proj.weight)
            nn.init.zeros_(block.proj.bias)
        tokens = torch.randn(2, T, N, D)
        moved = tokens.clone()
        moved[:, 1] += 1.0  # frame 1 changes, frame 2 does not
        same = torch.allclose(predictor.trunk_features(tokens)[:, 2], predictor.trunk_features(moved)[:, 2])
        assert same != motion


def test_a_layer_normed_prediction_sits_on_the_targets_sphere_and_cannot_shrink():
    """With `out_layernorm` every predicted token has mean 0 and unit variance over D, as a centred, layer-normed
    target does, whatever the weights: scaling the output layer down (a forecast shrinking towards the mean) does not
    change it. Without it the same scaling shrinks the prediction."""
    tokens = torch.nn.functional.layer_norm(torch.randn(2, T, N, D), (D,))
    for out_layernorm in (True, False):
        torch.manual_seed(0)
        predictor = Predictor(D, N, 8, 16, 3, 1, 2, residual=False, out_layernorm=out_layernorm).eval()
        nn.init.normal_(predictor.out_proj.weight, std=0.5)
        full = predictor(tokens)
        with torch.no_grad():
            predictor.out_proj.weight.mul_(0.1)
            predictor.out_proj.bias.mul_(0.1)
        shrunk = predictor(tokens)
        if out_layernorm:
            torch.testing.assert_close(full.mean(-1), torch.zeros(2, T, N), atol=1e-5, rtol=0)
            torch.testing.assert_close(full.var(-1, unbiased=False), torch.ones(2, T, N), atol=1e-3, rtol=0)
            torch.testing.assert_close(shrunk, full, atol=5e-3, rtol=0)  # up to layer_norm's eps
        else:
            assert shrunk.norm() < 0.2 * full.norm()
