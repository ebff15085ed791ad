"""Frames that keep their shape: aspect modes in the decoders, the writer (--aspect) and the loader (data.aspect,
data.random_crop), on real encoded videos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from shard_helpers import read_samples
from test_writer_scale import shard_content

from data_pipeline.config import DataConfig
from data_pipeline.decoders import DECODERS, aspect_geometry, get_decoder
from data_pipeline.stream import make_eval_loader, make_train_loader
from data_pipeline.writer import write_shards
from data_pipeline.writer.encode import encode_h264
from worldmodel.run.config import load_config

BACKENDS = sorted(DECODERS)


def test_aspect_geometry():
    assert aspect_geometry(720, 1280, 224, "crop") == (224, 398)  # short side to 224, then the centre 224 x 224
    assert aspect_geometry(720, 1280, 224, "pad") == (126, 224)  # long side to 224, then black bars
    assert aspect_geometry(720, 1280, 224, "squash") == (224, 224)
    assert aspect_geometry(1280, 720, 64, "short") == (114, 64)  # portrait
    assert aspect_geometry(90, 160, 32, "short", even=True) == (32, 56)  # H.264 needs even sides (56.9 -> 56)
    assert aspect_geometry(90, 160, 32, "crop", even=True) == (32, 57)  # cropped to 32 x 32: nearest pixel
    assert aspect_geometry(64, 64, 32, "pad") == (32, 32)
    with pytest.raises(ValueError, match="crop, pad, squash"):
        aspect_geometry(64, 64, 32, "stretch")


@pytest.mark.parametrize("aspect", ["crop", "pad"])
def test_backends_agree_in_every_aspect_mode(carphone_path, aspect):
    data = carphone_path.read_bytes()  # 176 x 144
    a, b = (get_decoder(name).decode(data, [3, 90], size=32, aspect=aspect).astype(np.int16) for name in BACKENDS)
    assert a.shape == b.shape == (2, 32, 32, 3)
    assert np.abs(a - b).mean() < 3.0
    if aspect == "pad":  # 176 x 144 -> 32 x 26: three black rows above, three below
        assert a[:, :3].max() == 0 and a[:, -3:].max() == 0 and a[:, 3:-3].mean() > 20


@pytest.mark.parametrize("backend", BACKENDS)
def test_square_videos_give_the_same_frames_in_every_mode(backend, digits_shards):
    video = next(iter(read_samples(digits_shards, "val").values()))["mp4"]  # 64 x 64
    decoder = get_decoder(backend)
    squash = decoder.decode(video, [0, 5], size=32)
    for aspect in ("crop", "pad"):
        np.testing.assert_array_equal(decoder.decode(video, [0, 5], size=32, aspect=aspect), squash)


def test_videos_stored_at_widths_decord_cannot_copy_are_read_through_pyav():
    """decord2 3.4.0 failed on some machines to copy out frames 32 px wide (and 16, 24, 48, 96, 144; on the machine
    of 2026-12-02 it copies them): `python -m data_pipeline.writer --size 32` writes such videos, so where decord
    raises, the decord backend reads them with pyav. Either way the stored frames come out exactly as pyav decodes
    them. (Compared at the stored size: after a resize the two backends differ by their resampling, which on random
    pixels is large.)"""
    frames = np.random.default_rng(0).integers(0, 255, (6, 32, 32, 3), dtype=np.uint8)
    video = encode_h264(frames, 10.0)
    a, b = (get_decoder(name).decode(video, [1, 4]) for name in BACKENDS)
    assert a.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def circle_video(tmp_path_factory) -> Path:
    """A folder with one 16:9 video (160 x 90, 8 frames): a white disk of radius 40 at the centre, on black."""
    root = tmp_path_factory.mktemp("circle")
    y, x = np.mgrid[:90, :160]
    disk = ((x - 79.5) ** 2 + (y - 44.5) ** 2 <= 40**2).astype(np.uint8) * 255
    frames = np.repeat(disk[None, :, :, None], 3, axis=3).repeat(8, axis=0)
    (root / "circle.mp4").write_bytes(encode_h264(frames, 10.0, gop=4))
    return root


def _loaded_frame(shards: Path, **data) -> np.ndarray:
    cfg = DataConfig(num_context=2, num_target=2, image_size=32, batch_size=1, **data)
    batch = next(iter(make_eval_loader(cfg, str(shards / "shard-*.tar"), num_clips=1)))
    return batch["frames"][0, 0].numpy()


def _extent(frame: np.ndarray) -> tuple[float, float]:
    """(height, width) of the bright shape in pixels, sub-pixel: the mean brightness summed across each axis."""
    bright = frame.mean(axis=2) / 255.0
    return float(bright.max(axis=1).sum()), float(bright.max(axis=0).sum())


@pytest.mark.parametrize("writer_size", [32, None])
def test_a_circle_stays_a_circle_in_the_default_aspect_mode(circle_video, tmp_path, writer_size):
    """Written at 32 px (the writer crops) or as stored (the loader crops): the disk is as high as it is wide.
    With squash it comes out 1.8x narrower than high."""
    write_shards(circle_video, tmp_path, size=writer_size, progress=False)
    height, width = _extent(_loaded_frame(tmp_path))
    assert height == pytest.approx(80 * 32 / 90, abs=1.5)  # short side 90 -> 32
    assert width == pytest.approx(height, abs=1.0)
    if writer_size is None:
        height, width = _extent(_loaded_frame(tmp_path, aspect="squash"))
        assert height / width == pytest.approx(160 / 90, rel=0.1)
        frame = _loaded_frame(tmp_path, aspect="pad")  # the whole frame in 32 x 18, black bars above and below
        height, width = _extent(frame)
        assert width == pytest.approx(height, abs=1.0) and frame[:6].max() < 30 and frame[-6:].max() < 30


def test_writer_pad_and_short_modes(circle_video, tmp_path):
    write_shards(circle_video, tmp_path / "short", size=32, aspect="short", progress=False)
    meta = dict(shard_content(tmp_path / "short"))["circle.json"]
    assert b'"height":32' in meta and b'"width":56' in meta  # the aspect kept, even sides
    height, width = _extent(_loaded_frame(tmp_path / "short"))  # the loader's centre crop
    assert width == pytest.approx(height, abs=1.0)
    write_shards(circle_video, tmp_path / "pad", size=32, aspect="pad", progress=False)
    frame = _loaded_frame(tmp_path / "pad", aspect="squash")  # stored square already: no mode changes it
    height, width = _extent(frame)
    assert width == pytest.approx(height, abs=1.0) and frame[:6].max() < 30


@pytest.fixture(scope="module")
def gradient_shards(tmp_path_factory) -> Path:
    """Shards of one still 16:9 video (160 x 90, 12 frames) whose brightness grows from left to right."""
    root = tmp_path_factory.mktemp("gradient")
    ramp = np.linspace(0, 255, 160).astype(np.uint8)
    frames = np.broadcast_to(ramp[None, None, :, None], (12, 90, 160, 3)).copy()
    (root / "videos").mkdir()
    (root / "videos" / "ramp.mp4").write_bytes(encode_h264(frames, 10.0, gop=4))
    write_shards(root / "videos", root / "shards", progress=False)
    return root / "shards"


def test_random_crop_is_one_window_per_clip_and_evaluation_takes_the_centre(gradient_shards):
    cfg = DataConfig(
        num_context=2, num_target=2, image_size=32, batch_size=8, num_workers=0, shuffle_buffer=1,
        clips_per_video=2, epoch_batches=2, random_crop=True,
    )  # fmt: skip
    loader = make_train_loader(cfg, str(gradient_shards / "shard-*.tar"), seed=0, epoch=0, rank=0, world_size=1)
    lefts = []
    for batch in loader:
        frames = batch["frames"].numpy().astype(np.int16)  # [B, T, 32, 32, 3]
        assert frames.shape[1:] == (4, 32, 32, 3)
        assert np.abs(frames - frames[:, :1]).max() <= 2  # a still video: one window for all frames of a clip
        lefts += frames[:, 0, 16, 0, 0].tolist()  # the brightness at the left edge says where the window lies
    assert len(set(lefts)) >= 4 and max(lefts) - min(lefts) > 60
    centre = _loaded_frame(gradient_shards, random_crop=True).astype(np.int16)  # evaluation ignores random_crop
    np.testing.assert_allclose(centre, _loaded_frame(gradient_shards).astype(np.int16), atol=0)
    assert centre[16, 0, 0] == pytest.approx(255 * 12 / 56, abs=6)  # centre of 57 columns: 12 cut on the left


def test_config_keys_and_their_checks():
    cfg = load_config(None, ["data.aspect=pad"])
    assert cfg.data.aspect == "pad" and cfg.data.random_crop is False
    assert load_config(None, []).data.aspect == "crop"
    with pytest.raises(ValueError, match="data.aspect='stretch' is not one of crop, pad, squash"):
        load_config(None, ["data.aspect=stretch"])
    with pytest.raises(ValueError, match="data.random_crop=true needs data.aspect=crop"):
        DataConfig(aspect="pad", random_crop=True)
    with pytest.raises(ValueError, match="image_size > 0"):
        DataConfig(image_size=0, random_crop=True)
