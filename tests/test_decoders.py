"""Both decoder backends, one suite: parity on a real clip, requested frames only, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.decoders import DECODERS, DecodeError, _require, get_decoder
from data_pipeline.encode import encode_h264
from data_pipeline.make_moving_digits import simulate

BACKENDS = sorted(DECODERS)
CARPHONE_INDICES = [0, 1, 37, 64, 65, 119]


@pytest.fixture(scope="module")
def carphone(carphone_path) -> bytes:
    return carphone_path.read_bytes()


@pytest.mark.parametrize("backend", BACKENDS)
def test_info_of_real_clip(backend, carphone):
    info = get_decoder(backend).info(carphone)
    assert (info.num_frames, info.height, info.width) == (120, 144, 176)
    assert info.fps == pytest.approx(29.97, abs=0.01)


def test_backends_agree_on_real_clip(carphone):
    frames = {name: get_decoder(name).decode(carphone, CARPHONE_INDICES).astype(np.int16) for name in BACKENDS}
    a, b = frames["decord"], frames["pyav"]
    assert a.shape == b.shape == (len(CARPHONE_INDICES), 144, 176, 3)
    assert np.abs(a - b).mean() < 0.5
    assert np.abs(a - b).max() <= 8
    # the frames differ from each other, so agreement is not trivial
    assert np.abs(a[0] - a[-1]).mean() > 5


@pytest.mark.parametrize("size", [32, 64, 96])
def test_backends_agree_after_resize(carphone, size):
    a, b = (get_decoder(name).decode(carphone, [3, 90], size=size).astype(np.int16) for name in BACKENDS)
    assert a.shape == b.shape == (2, size, size, 3)
    assert np.abs(a - b).mean() < 3.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_decodes_requested_frames_in_requested_order(backend, carphone):
    decoder = get_decoder(backend)
    forward = decoder.decode(carphone, [10, 50, 51])
    backward = decoder.decode(carphone, [51, 50, 10])
    assert forward.dtype == np.uint8
    np.testing.assert_array_equal(forward, backward[::-1])
    np.testing.assert_array_equal(decoder.decode(carphone, [50]), forward[1:2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_encoded_digits_round_trip(backend):
    frames, _ = simulate(16, np.random.default_rng(3))
    data = encode_h264(frames, 10.0, gop=4)
    decoded = get_decoder(backend).decode(data, list(range(16)))
    assert get_decoder(backend).info(data).num_frames == 16
    diff = np.abs(decoded.astype(np.int16) - frames)
    assert diff.mean() < 0.5 and diff.max() <= 16


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_data_raises_decode_error(backend, carphone, damage):
    data = {"truncated": carphone[: len(carphone) // 2], "garbage": bytes(range(256)) * 64, "empty": b""}[damage]
    with pytest.raises(DecodeError):
        get_decoder(backend).decode(data, [0, 1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_index_out_of_range_raises_decode_error(backend, carphone):
    with pytest.raises(DecodeError, match="out of range"):
        get_decoder(backend).decode(carphone, [5, 120])


def test_unknown_backend_names_the_valid_ones():
    with pytest.raises(ValueError, match="decord.*pyav"):
        get_decoder("opencv")


def test_missing_backend_module_fails_fast_with_advice():
    with pytest.raises(ImportError, match="not installed.*data.decoder"):
        _require("decord_not_a_real_module", "decord")
