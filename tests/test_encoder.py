"""Encoder: preprocessing, per-frame ViT tokens, local weight init, EMA update, target normalisation."""

import pytest
import torch
import torch.nn.functional as F

from worldmodel.model.config import ModelConfig
from worldmodel.model.encoder import (
    FrameEncoder,
    KeypointDecoder,
    SpatialSoftmaxHead,
    TokenNorm,
    ema_update,
    make_target,
    preprocess,
)


def tiny_cfg(**overrides) -> ModelConfig:
    values = dict(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, granularity="tokens")
    values.update(overrides)
    return ModelConfig(**values)


def test_preprocess_maps_uint8_to_minus_one_one_channels_first():
    frames = torch.zeros(2, 3, 16, 16, 3, dtype=torch.uint8)
    frames[0, 1, :, :, 2] = 255
    x = preprocess(frames, img_size=16)
    assert x.shape == (2, 3, 3, 16, 16)
    assert x[0, 1, 2].eq(1.0).all() and x[0, 1, 0].eq(-1.0).all()


def test_preprocess_rejects_wrong_size():
    with pytest.raises(ValueError, match=r"the model.s img_size=32"):
        preprocess(torch.zeros(1, 2, 16, 16, 3, dtype=torch.uint8), img_size=32)


def test_encoder_returns_patch_tokens_per_frame_independently():
    torch.manual_seed(0)
    encoder = FrameEncoder(tiny_cfg()).eval()
    x = torch.randn(2, 3, 3, 16, 16)
    tokens = encoder(x)
    assert tokens.shape == (2, 3, 4, 16)  # N = (16 / 8)^2 patches, no class token
    x2 = x.clone()
    x2[:, 2] = torch.randn(2, 3, 16, 16)
    tokens2 = encoder(x2)
    torch.testing.assert_close(tokens2[:, :2], tokens[:, :2])
    assert not torch.allclose(tokens2[:, 2], tokens[:, 2])


def test_frame_granularity_gives_one_embedding_per_frame_that_sees_where_things_are():
    """granularity frame: [B, T, 1, frame_dim]; the head flattens the token grid, so moving content from one patch
    to another (same content, other place) changes the embedding, which a mean over patches would not."""
    torch.manual_seed(0)
    encoder = FrameEncoder(tiny_cfg(granularity="frame", frame_dim=12)).eval()
    x = torch.zeros(1, 2, 3, 16, 16)
    x[0, 0, :, :8, :8] = 1.0  # a bright square in the top-left patch
    x[0, 1, :, 8:, 8:] = 1.0  # the same square in the bottom-right patch
    out = encoder(x)
    assert out.shape == (1, 2, 1, 12)
    assert not torch.allclose(out[0, 0], out[0, 1], atol=1e-3)


def test_init_weights_loads_a_local_state_dict(tmp_path):
    torch.manual_seed(0)
    source = FrameEncoder(tiny_cfg())
    path = tmp_path / "vit.pt"
    torch.save(source.vit.state_dict(), path)
    torch.manual_seed(1)
    loaded = FrameEncoder(tiny_cfg(init_weights=str(path)))
    x = torch.randn(1, 2, 3, 16, 16)
    torch.testing.assert_close(loaded(x), source(x))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FrameEncoder(tiny_cfg(init_weights=str(tmp_path / "missing.pt")))
    with pytest.raises(ValueError, match="does not match"):
        FrameEncoder(tiny_cfg(init_weights=str(path), embed_dim=32))


def test_ema_update_moves_target_toward_online_by_the_momentum():
    torch.manual_seed(0)
    online = FrameEncoder(tiny_cfg())
    target = make_target(online)
    assert all(not p.requires_grad for p in target.parameters())
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    before = [(t - o).detach().clone() for t, o in zip(target.parameters(), online.parameters(), strict=True)]
    ema_update(target, online, momentum=0.9)
    for gap, t, o in zip(before, target.parameters(), online.parameters(), strict=True):
        torch.testing.assert_close(t - o, 0.9 * gap)
    ema_update(target, online, momentum=0.0)
    for t, o in zip(target.parameters(), online.parameters(), strict=True):
        torch.testing.assert_close(t, o)
    with pytest.raises(ValueError, match="momentum"):
        ema_update(target, online, momentum=1.5)


def test_token_norm_layer_norms_after_subtracting_the_running_center():
    norm = TokenNorm(4, momentum=0.5)
    tokens = torch.tensor([[1.0, 2.0, 3.0, 6.0], [3.0, 2.0, 1.0, 2.0]])
    out = norm(tokens)
    torch.testing.assert_close(out.mean(-1), torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.var(-1, unbiased=False), torch.ones(2), atol=1e-4, rtol=0)
    norm.update(tokens)
    torch.testing.assert_close(norm.center, 0.5 * tokens.mean(0))
    # The centre is subtracted before the layer norm: a token equal to the centre direction plus c normalises
    # like c alone.
    c = torch.tensor([0.0, 1.0, 0.0, -1.0])
    torch.testing.assert_close(norm(norm.center + c), F.layer_norm(c, (4,)))


def test_running_token_scale_is_one_linear_map_for_every_frame():
    """model.target_scale=running: centred tokens divided by one running RMS (over all dims and tokens), so the
    normalised embedding is a linear map of the raw one (a linear probe of the raw coordinates stays linear) and,
    unlike the per-frame layer norm, a frame whose tokens are all equal to the centre stays zero."""
    norm = TokenNorm(4, momentum=0.5, scale="running")
    tokens = torch.tensor([[1.0, 2.0, 3.0, 6.0], [3.0, 2.0, 1.0, 2.0]])
    torch.testing.assert_close(norm(tokens), tokens)  # centre 0, mean square 1 before any update
    norm.update(tokens)
    centre = 0.5 * tokens.mean(0)
    square = 0.5 + 0.5 * tokens.square().mean()  # around the centre before the update (0)
    torch.testing.assert_close(norm.center, centre)
    torch.testing.assert_close(norm.mean_square, square)
    a, b = torch.tensor([0.5, -1.0, 2.0, 0.0]), torch.tensor([1.5, 0.0, -2.0, 4.0])
    torch.testing.assert_close(norm(0.3 * a + 0.7 * b), 0.3 * norm(a) + 0.7 * norm(b))  # affine in the tokens
    torch.testing.assert_close(norm(centre), torch.zeros(4))
    assert "mean_square" not in dict(TokenNorm(4, 0.5).named_buffers())  # per-frame checkpoints keep their keys


def test_keypoint_head_returns_the_expected_grid_position_of_each_keypoint():
    """model.frame_head=keypoints: one patch that dominates a keypoint's score puts that keypoint at the patch's
    (x = column, y = row) in [-1, 1]; a flat score puts it at the grid's centre; the encoder gives [B, T, 1, dim]."""
    head = SpatialSoftmaxHead(embed_dim=8, side=4, dim=4)
    with torch.no_grad():  # after the layer norm, keypoint 0 scores feature 0, keypoint 1 nothing (uniform)
        head.score[1].weight.zero_()
        head.score[1].bias.zero_()
        head.score[1].weight[0, 0] = 60.0
    tokens = torch.zeros(1, 16, 8)
    tokens[0, :, 1] = 1.0  # every token alike but for feature 0 of the patch at row 1, column 3
    tokens[0, 1 * 4 + 3, 0] = 5.0
    coords = head(tokens)[0]
    third = 1.0 / 3.0
    assert torch.allclose(coords[:2], torch.tensor([1.0, -third]), atol=1e-3)  # column 3 -> x = 1, row 1 -> y = -1/3
    assert torch.allclose(coords[2:], torch.zeros(2), atol=1e-6)

    cfg = ModelConfig(img_size=32, patch_size=8, embed_dim=96, depth=1, num_heads=3, frame_head="keypoints")
    out = FrameEncoder(cfg)(torch.rand(2, 3, 3, 32, 32) * 2 - 1)
    assert out.shape == (2, 3, 1, cfg.frame_dim) and out.abs().max() <= 1.0
    with pytest.raises(ValueError, match="even model.frame_dim"):
        SpatialSoftmaxHead(embed_dim=8, side=4, dim=5)
    with pytest.raises(ValueError, match="head for model.granularity=frame"):
        FrameEncoder(ModelConfig(img_size=32, patch_size=8, granularity="tokens", frame_head="keypoints"))


def test_keypoint_sub_cells_place_a_keypoint_inside_its_patch():
    """model.keypoint_cells: the patch's softmax picks the patch, a softmax over its cells x cells sub-cells the
    offset from the patch centre: sub-cell (row 3, column 5) of 8 in the patch at row 1, column 2 lies (0.1875,
    -0.0625) patch spacings from its centre. Untrained sub-cell scores give no offset (the one-score head)."""
    head = SpatialSoftmaxHead(embed_dim=8, side=4, dim=4, cells=8)
    tokens = torch.zeros(1, 16, 8)
    tokens[0, :, 1] = 1.0
    tokens[0, 1 * 4 + 2, 0] = 5.0  # every token alike but for feature 0 of the patch at row 1, column 2
    with torch.no_grad():  # after the layer norm, keypoint 0 scores feature 0, keypoint 1 nothing (uniform)
        head.score[1].weight.zero_()
        head.score[1].bias.zero_()
        head.score[1].weight[0, 0] = 60.0
    centre = torch.tensor([1.0 / 3.0, -1.0 / 3.0])
    assert torch.allclose(head(tokens)[0, :2], centre, atol=1e-3)  # sub-cells untrained: the patch centre
    with torch.no_grad():
        head.sub_score[1].weight[0 * 64 + 3 * 8 + 5, 0] = 60.0
    coords = head(tokens)[0]
    spacing = 2.0 / 3.0
    assert torch.allclose(coords[:2], centre + torch.tensor([0.1875, -0.0625]) * spacing, atol=1e-3)
    assert torch.allclose(coords[2:], torch.zeros(2), atol=1e-6)  # a flat score: the grid's centre

    cfg = ModelConfig(
        img_size=32, patch_size=8, embed_dim=96, depth=1, num_heads=3, frame_head="keypoints", keypoint_cells=4
    )
    out = FrameEncoder(cfg)(torch.rand(2, 3, 3, 32, 32) * 2 - 1)
    assert out.shape == (2, 3, 1, cfg.frame_dim) and out.abs().max() <= 1.0
    with pytest.raises(ValueError, match="keypoint_cells must be >= 1"):
        SpatialSoftmaxHead(embed_dim=8, side=4, dim=4, cells=0)
    with pytest.raises(ValueError, match="keypoint_cells=4 splits the keypoint head"):  # no silent no-op
        FrameEncoder(ModelConfig(img_size=32, patch_size=8, embed_dim=96, depth=1, num_heads=3, keypoint_cells=4))


def test_keypoint_decoder_draws_each_keypoint_where_it_is_and_its_loss_reaches_the_keypoint_scores():
    """model.recon_weight: a keypoint's Gaussian map peaks at its (x = column, y = row) pixel; an untrained decoder
    returns the reference plus a small change; the loss of rebuilding frames 1.. from frame 0 is finite and its
    gradient reaches the encoder's keypoint scores (the signal that points the keypoints at what moves)."""
    decoder = KeypointDecoder(keypoints=2, size=16, sigma=0.1)
    axis = torch.linspace(-1, 1, 16)
    keypoints = torch.stack([axis[[12, 3]], axis[[5, 9]]], dim=-1)[None]  # [1, 2, 2]: (x, y) = (12, 5), (3, 9)
    maps = decoder.maps(keypoints)
    assert maps.shape == (1, 2, 16, 16)
    peaks = [divmod(int(m.argmax()), 16) for m in maps[0]]  # (row, column)
    assert peaks == [(5, 12), (9, 3)]

    cfg = ModelConfig(img_size=32, patch_size=8, embed_dim=96, depth=1, num_heads=3, frame_head="keypoints")
    torch.manual_seed(0)
    encoder = FrameEncoder(cfg)
    decoder = KeypointDecoder(cfg.frame_dim // 2, 32)
    x = torch.rand(2, 4, 3, 32, 32) * 2 - 1
    rebuilt = decoder(encoder(x)[:, 1, 0].unflatten(-1, (-1, 2)), x[:, 0])
    assert rebuilt.shape == (2, 3, 32, 32) and (rebuilt - x[:, 0]).abs().mean() < 0.5
    loss = decoder.loss(encoder(x), x)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert encoder.head.score[1].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="recon_sigma must be > 0"):
        KeypointDecoder(keypoints=2, size=16, sigma=0.0)


def test_keypoint_decoder_blanks_whole_blocks_of_the_reference_at_the_asked_rate():
    """model.recon_mask: each reference loses about that fraction of its block x block squares (set to 0, grey in
    [-1, 1]), whole squares only, a different draw per frame; the rest of the reference is untouched; 0 blanks
    nothing and a fraction outside [0, 1) is refused."""
    torch.manual_seed(0)
    reference = torch.rand(64, 3, 32, 32) + 0.5  # no pixel is 0 before blanking
    blanked = KeypointDecoder(keypoints=2, size=32, mask=0.5, block=8).blank(reference)
    zero = blanked == 0  # [64, 3, 32, 32]
    squares = zero[:, 0].unflatten(1, (4, 8)).unflatten(3, (4, 8))  # [64, 4, 8, 4, 8]
    per_square = squares.float().mean((2, 4))  # [64, 4, 4]: each square is all blanked or none of it
    assert set(per_square.unique().tolist()) == {0.0, 1.0}
    assert 0.4 < per_square.mean() < 0.6  # about half of 64 * 16 squares
    assert (zero.all(1) == zero.any(1)).all()  # every channel of a pixel alike
    assert not torch.equal(per_square[0], per_square[1])  # each frame its own draw
    assert torch.equal(blanked[~zero], reference[~zero])
    assert torch.equal(KeypointDecoder(keypoints=2, size=32).blank(reference), reference)
    with pytest.raises(ValueError, match="recon_mask must be in"):
        KeypointDecoder(keypoints=2, size=32, mask=1.0)


def test_a_wide_keypoint_map_reaches_a_thing_far_from_the_keypoint_and_the_narrow_one_does_not():
    """model.recon_sigma_start: the gradient on a keypoint's position says something about a moving thing only
    where the keypoint's Gaussian map overlaps it. A blob appears in the far corner of the rebuilt frame: with the
    final width (0.1, 1.6 px at 32 px) the keypoint's gradient is the same with and without it; with the wide
    start (0.5, 8 px) it differs, so a keypoint can be pulled toward a thing from across the frame."""
    torch.manual_seed(0)
    decoder = KeypointDecoder(keypoints=1, size=32, sigma=0.1)
    reference = torch.zeros(1, 3, 32, 32)
    with_blob = reference.clone()
    with_blob[..., 24:28, 24:28] = 1.0  # bottom right; the keypoint sits top left at (-0.6, -0.6)

    def grad(sigma: float, frame: torch.Tensor) -> torch.Tensor:
        decoder.set_sigma(sigma)
        keypoint = torch.full((1, 1, 2), -0.6, requires_grad=True)
        torch.nn.functional.mse_loss(decoder(keypoint, reference), frame).backward()
        return keypoint.grad

    assert torch.equal(grad(0.1, with_blob), grad(0.1, reference))
    assert (grad(0.5, with_blob) - grad(0.5, reference)).abs().max() > 1e-6
    assert decoder.sigma_now.item() == 0.5
    with pytest.raises(ValueError, match="width must be > 0"):
        decoder.set_sigma(0.0)
