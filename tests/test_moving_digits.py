"""Moving digits: deterministic from the seed, and the JSON ground truth matches the pixels and the dynamics."""

from __future__ import annotations

import gzip
import json
import struct
import tarfile

import numpy as np
import pytest

from data_pipeline.decoders import get_decoder
from worlds.moving_digits import (
    CANVAS,
    DIGIT_SIZE,
    DigitBank,
    _render,
    main,
    make_moving_digits,
    mnist_digits,
    simulate,
    sklearn_digits,
)


def _centroid(frame: np.ndarray) -> np.ndarray:
    """Intensity-weighted centre (x, y) of a frame [H, W, C]."""
    mass = frame[..., 0].astype(np.float64)
    ys, xs = np.mgrid[: mass.shape[0], : mass.shape[1]]
    return np.array([(mass * xs).sum(), (mass * ys).sum()]) / mass.sum()


def test_simulate_is_deterministic_from_the_seed():
    a_frames, a_meta = simulate(20, np.random.default_rng(11), num_digits=2)
    b_frames, b_meta = simulate(20, np.random.default_rng(11), num_digits=2)
    c_frames, _ = simulate(20, np.random.default_rng(12), num_digits=2)
    np.testing.assert_array_equal(a_frames, b_frames)
    assert a_meta == b_meta
    assert not np.array_equal(a_frames, c_frames)


def test_shapes_names_and_labels():
    frames, meta = simulate(10, np.random.default_rng(0), num_digits=2)
    assert frames.shape == (10, CANVAS, CANVAS, 3) and frames.dtype == np.uint8
    assert (frames[..., 0] == frames[..., 1]).all() and frames.max() > 200
    assert meta["state_names"] == ["x0", "y0", "vx0", "vy0", "x1", "y1", "vx1", "vy1"]
    assert meta["action_names"] == ["dvx0", "dvy0", "dvx1", "dvy1"]
    assert np.shape(meta["state"]) == (10, 8) and np.shape(meta["action"]) == (9, 4) and len(meta["events"]) == 9
    assert set(meta["labels"]) == {"digit0", "digit1"} and all(0 <= v <= 9 for v in meta["labels"].values())
    assert (meta["num_frames"], meta["height"], meta["width"]) == (10, CANVAS, CANVAS)


@pytest.mark.parametrize("seed", range(4))
def test_digit_is_where_the_json_says(seed):
    frames, meta = simulate(40, np.random.default_rng(seed), kick_prob=0.3)
    positions = np.asarray(meta["state"])[:, :2]
    offsets = np.stack([_centroid(f) for f in frames]) - positions
    # the glyph never leaves the canvas and is drawn at its exact (sub-pixel) position, so its mass sits at a fixed
    # offset from the stated centre (up to the uint8 rounding of the intensities)
    assert np.abs(offsets - offsets[0]).max() < 0.05
    assert np.abs(offsets[0]).max() < DIGIT_SIZE / 4
    assert np.ptp(positions, axis=0).max() > 10  # it did move


def test_dynamics_match_state_action_and_events():
    _, meta = simulate(60, np.random.default_rng(5), num_digits=2, kick_prob=0.3)
    state, action, events = np.asarray(meta["state"]), np.asarray(meta["action"]), np.asarray(meta["events"])
    for d in range(2):
        p, v, kick = state[:, 4 * d : 4 * d + 2], state[:, 4 * d + 2 : 4 * d + 4], action[:, 2 * d : 2 * d + 2]
        # v' = v_t + kick_t, reflected per axis at the walls: |v_{t+1}| == |v_t + kick_t| per component
        np.testing.assert_allclose(np.abs(v[1:]), np.abs(v[:-1] + kick), atol=1e-3)
        # away from the walls the position moves by exactly the new velocity
        lo, hi = DIGIT_SIZE / 2, CANVAS - DIGIT_SIZE / 2
        free = ((p[1:] > lo + 4) & (p[1:] < hi - 4) & (p[:-1] > lo + 4) & (p[:-1] < hi - 4)).all(axis=1)
        np.testing.assert_allclose((p[1:] - p[:-1])[free], v[1:][free], atol=1e-3)
        assert ((p >= lo - 1e-6) & (p <= hi + 1e-6)).all()
    kicked = (np.abs(action) > 0).any(axis=1)
    np.testing.assert_array_equal(events, kicked.astype(int))
    assert 0 < events.sum() < len(events)
    # a kick is a substantial change: at least 60 degrees of turn
    for d in range(2):
        v = state[:, 4 * d + 2 : 4 * d + 4]
        rows = np.flatnonzero((np.abs(action[:, 2 * d : 2 * d + 2]) > 0).any(axis=1))
        before, after = v[rows], v[rows] + action[rows, 2 * d : 2 * d + 2]
        cos = (before * after).sum(1) / np.linalg.norm(before, axis=1) / np.linalg.norm(after, axis=1)
        assert (cos <= np.cos(np.pi / 3) + 1e-3).all()


def test_still_digits_move_only_when_kicked():
    frames, meta = simulate(60, np.random.default_rng(3), kick_prob=0.2, still=True)
    state, action, events = np.asarray(meta["state"]), np.asarray(meta["action"]), np.asarray(meta["events"])
    moved = np.linalg.norm(state[1:, :2] - state[:-1, :2], axis=1) > 0
    np.testing.assert_array_equal(moved, events.astype(bool))
    assert 0 < events.sum() < len(events)
    jumps = np.linalg.norm(action[events.astype(bool)], axis=1)
    assert (jumps >= 3.0 - 1e-3).all() and (jumps <= 6.0 + 1e-3).all()
    np.testing.assert_allclose(state[1:, 2:], state[1:, :2] - state[:-1, :2], atol=1e-3)  # velocity = last jump
    unkicked = np.flatnonzero(events == 0)
    np.testing.assert_array_equal(frames[unkicked + 1], frames[unkicked])  # the pixels agree: nothing moves
    offsets = np.stack([_centroid(f) for f in frames]) - state[:, :2]
    assert np.abs(offsets - offsets[0]).max() < 0.05


def test_subpixel_centroid_moves_by_the_fractional_position():
    glyph = sklearn_digits().images[0]
    base = np.array([30.0, 27.0])  # (x, y) at whole pixels
    at_base = _centroid(_render(base[None], [glyph]))
    fractions = (0.0, 0.25, 0.5, 0.75)
    for fx in fractions:
        for fy in fractions:
            shift = np.array([fx, fy])
            frame = _render((base + shift)[None], [glyph])
            np.testing.assert_allclose(_centroid(frame) - at_base, shift, atol=0.05)
    half_a_pixel = _render(np.array([[30.5, 27.0]]), [glyph])
    assert not np.array_equal(_render(base[None], [glyph]), half_a_pixel)  # the pixels see half a pixel
    np.testing.assert_array_equal(  # whole-pixel placement does not: 30.25 rounds to 30
        _render(base[None], [glyph], subpixel=False), _render(np.array([[30.25, 27.0]]), [glyph], subpixel=False)
    )


@pytest.mark.parametrize("seed", range(3))
def test_subpixel_removes_the_placement_jitter(seed):
    offsets = {}
    for subpixel in (True, False):
        frames, meta = simulate(40, np.random.default_rng(seed), kick_prob=0.3, subpixel=subpixel)
        offsets[subpixel] = np.stack([_centroid(f) for f in frames]) - np.asarray(meta["state"])[:, :2]
    # centroid minus stated centre per frame: constant when drawn at the exact position, jittering by the rounding
    # (std ~0.29 px for a uniform fraction) when snapped to whole pixels
    assert offsets[True].std(axis=0).max() < 0.05
    assert offsets[False].std(axis=0).min() > 0.15


def test_whole_pixel_reproduces_integer_placement():
    glyph = sklearn_digits().images[7]
    bank = DigitBank(images=glyph[None], labels=np.array([7]))
    frames, meta = simulate(20, np.random.default_rng(2), kick_prob=0.3, digits=bank, subpixel=False)
    sub_frames, sub_meta = simulate(20, np.random.default_rng(2), kick_prob=0.3, digits=bank)
    assert meta == sub_meta and not np.array_equal(frames, sub_frames)  # same ground truth, different pixels
    pixels = np.round(glyph * 255).astype(np.uint8)
    for frame, (x, y) in zip(frames, np.asarray(meta["state"])[:, :2], strict=True):
        top, left = round(y - DIGIT_SIZE / 2), round(x - DIGIT_SIZE / 2)
        expected = np.zeros((CANVAS, CANVAS), dtype=np.uint8)
        expected[top : top + DIGIT_SIZE, left : left + DIGIT_SIZE] = pixels
        np.testing.assert_array_equal(frame[..., 0], expected)


def test_whole_pixel_flag_changes_only_the_pixels(tmp_path):
    args = ["--num-videos", "1", "--val-videos", "1", "--seed", "3", "--num-frames", "6"]
    assert main(["--output", str(tmp_path / "sub"), *args]) == 0
    assert main(["--output", str(tmp_path / "whole"), *args, "--whole-pixel"]) == 0
    with (
        tarfile.open(tmp_path / "sub" / "train" / "shard-000000.tar") as sub,
        tarfile.open(tmp_path / "whole" / "train" / "shard-000000.tar") as whole,
    ):
        assert sub.extractfile("train_0000000.json").read() == whole.extractfile("train_0000000.json").read()
        assert sub.extractfile("train_0000000.mp4").read() != whole.extractfile("train_0000000.mp4").read()


def test_no_kicks_without_kick_prob():
    _, meta = simulate(30, np.random.default_rng(1), kick_prob=0.0)
    assert not any(meta["events"]) and not np.asarray(meta["action"]).any()


def test_shards_hold_the_simulated_videos(digits_shards):
    index = json.loads((digits_shards / "train" / "index.json").read_text())
    assert index["total_samples"] == 16 and len(index["shards"]) == 4
    assert json.loads((digits_shards / "val" / "index.json").read_text())["total_samples"] == 8
    rng = np.random.default_rng([0, 0])  # the train split's seed
    expected, meta = simulate(24, rng, num_digits=1, kick_prob=0.3, digits=sklearn_digits())
    with tarfile.open(digits_shards / "train" / "shard-000000.tar") as tar:
        video = tar.extractfile("train_0000000.mp4").read()
        stored = json.loads(tar.extractfile("train_0000000.json").read())
    decoded = get_decoder("decord").decode(video, list(range(24)))
    assert np.abs(decoded.astype(np.int16) - expected).mean() < 0.5
    assert stored["state"] == meta["state"] and stored["labels"] == meta["labels"]
    assert (stored["num_frames"], stored["fps"]) == (24, 10.0)


def test_generation_is_byte_identical_and_val_differs(tmp_path, capsys):
    args = ["--num-videos", "3", "--val-videos", "2", "--seed", "4", "--num-frames", "8", "--num-digits", "2"]
    assert main(["--output", str(tmp_path / "a"), *args]) == 0
    assert main(["--output", str(tmp_path / "b"), *args]) == 0
    assert "wrote 3 samples" in capsys.readouterr().out
    for split in ("train", "val"):
        for path in (tmp_path / "a" / split).iterdir():
            assert path.read_bytes() == (tmp_path / "b" / split / path.name).read_bytes()
    with (
        tarfile.open(tmp_path / "a" / "train" / "shard-000000.tar") as t,
        tarfile.open(tmp_path / "a" / "val" / "shard-000000.tar") as v,
    ):
        assert t.extractfile("train_0000000.json").read() != v.extractfile("val_0000000.json").read()


def _write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_mnist_idx_files_are_used_when_given(tmp_path):
    images = np.zeros((3, 28, 28), dtype=np.uint8)
    images[:, 8:20, 12:16] = 255  # a bar, like a "1"
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([1, 1, 1]))
    bank = mnist_digits(tmp_path)
    assert bank.images.shape == (3, DIGIT_SIZE, DIGIT_SIZE) and bank.labels.tolist() == [1, 1, 1]
    summaries = make_moving_digits(tmp_path / "out", 2, 0, num_frames=6, val_videos=1, mnist=tmp_path, progress=False)
    assert summaries["train"].written == 2
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        mnist_digits(tmp_path / "out")
