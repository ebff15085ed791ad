"""Both decoder backends, one suite: parity on a real clip, requested frames only, clear errors, quiet on bad data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from shard_helpers import read_samples, write_tar

from data_pipeline.decoders import DEBUG_ENV, DECODERS, DecodeError, _fd2, _require, get_decoder
from data_pipeline.writer.encode import encode_h264
from worlds.moving_digits import simulate

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


# Reads a hostile shard through the eval loader (decoding in this process) and the train loader (decoding in a forked
# DataLoader worker), then prints the skip counts of each as one JSON line.
_READ_HOSTILE = """
import json, sys
from data_pipeline.config import DataConfig
from data_pipeline.stream import make_eval_loader, make_train_loader
cfg = DataConfig(num_context=3, num_target=3, batch_size=2, num_workers=1, shuffle_buffer=4, epoch_batches=2,
                 decoder=sys.argv[2])
def totals(batches):
    out = {}
    for batch in batches:
        for reason, count in batch["skipped"].items():
            out[reason] = out.get(reason, 0) + count
    return out
evaluated = totals(make_eval_loader(cfg, sys.argv[1], num_clips=4, batch_size=16))
trained = totals(make_train_loader(cfg, sys.argv[1], seed=0, epoch=0, rank=0, world_size=1))
print(json.dumps({"eval": evaluated, "train": trained}))
"""


@pytest.fixture(scope="module")
def hostile_shard(digits_shards, tmp_path_factory) -> tuple[Path, int]:
    """A shard of two good moving-digits videos among damaged ones, and the number of damaged ones. The damage:
    truncated (no moov atom), garbage, a real header followed by garbage, and frame data scrambled behind an intact
    moov atom (so the decoders open it and fail frame after frame)."""
    samples = read_samples(digits_shards, "val")
    video, meta = samples["val_0000000"]["mp4"], samples["val_0000000"]["json"]
    rng = np.random.default_rng(0)
    moov = video.find(b"moov")
    damaged = {"cut": video[: len(video) // 2], "garbage": rng.bytes(6000), "header": video[:64] + rng.bytes(6000)}
    for i in range(3):
        scrambled = bytearray(video)
        scrambled[200 : moov - 8] = np.random.default_rng(i).bytes(moov - 208)
        damaged[f"scrambled{i}"] = bytes(scrambled)
    entries = []
    for key, data in damaged.items():
        entries += [(f"{key}.mp4", data), (f"{key}.json", meta)]
    for key in ("val_0000001", "val_0000002"):
        entries += [(f"{key}.mp4", samples[key]["mp4"]), (f"{key}.json", samples[key]["json"])]
    return write_tar(tmp_path_factory.mktemp("hostile") / "shard-000000.tar", entries), len(damaged)


def _read_hostile(shard: Path, backend: str, debug: bool) -> tuple[dict, bytes]:
    env = {k: v for k, v in os.environ.items() if k != DEBUG_ENV}
    if debug:
        env[DEBUG_ENV] = "1"
    result = subprocess.run(
        [sys.executable, "-c", _READ_HOSTILE, str(shard), backend],
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:].decode(errors="replace")
    return json.loads(result.stdout.decode().strip().splitlines()[-1]), result.stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_data_is_counted_not_printed(backend, hostile_shard):
    """FFmpeg and decord used to print hundreds of lines, some of them raw video bytes, for a shard like this one."""
    shard, damaged = hostile_shard
    skipped, stderr = _read_hostile(shard, backend, debug=False)
    fallbacks = skipped["eval"].pop("fallback/pyav", 0)  # counted, silently: decord handing a video to PyAV
    assert skipped["eval"] == {"decode_error": damaged}
    assert fallbacks >= (1 if backend == "decord" else 0)
    assert skipped["train"].get("decode_error", 0) >= damaged  # the worker went over the shard at least once
    text = stderr.decode("utf-8")  # no raw bytes
    assert len(text.splitlines()) < 10, text[-3000:]
    assert "skipped sample" not in text


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_debug_switch_restores_the_detail(backend, hostile_shard):
    shard, damaged = hostile_shard
    skipped, stderr = _read_hostile(shard, backend, debug=True)
    skipped["eval"].pop("fallback/pyav", None)
    assert skipped["eval"] == {"decode_error": damaged}
    text = stderr.decode("utf-8", errors="replace")
    reports = [line for line in text.splitlines() if line.startswith("skipped sample")]
    assert len(reports) == damaged + skipped["train"]["decode_error"]  # one per skip, in both processes
    assert "skipped sample 'garbage' (decode_error): pyav cannot open the video (6000 bytes)" in text
    assert "moov atom not found" in text  # FFmpeg's own words
    assert "Error splitting the input into NAL units" in text or "Invalid NAL unit size" in text
    if backend == "decord":
        assert "ERROR opening" in text  # decord's own report


# Holds stderr back as a decoder does, and meanwhile opens a `pipe:` shard whose command writes to stderr.
_PIPE_DURING_CAPTURE = """
import sys, threading, time
from data_pipeline import decoders, stream
entered, release, held = threading.Event(), threading.Event(), bytearray()
def decode():
    with decoders._fd2.held(held):
        entered.set()
        release.wait(10)
decoding = threading.Thread(target=decode)
decoding.start()
entered.wait()
command = "pipe:echo the pipe command speaks >&2; cat " + sys.argv[1]
opening = threading.Thread(target=lambda: print(len(list(stream._tar_samples([{"url": command}], print)))))
opening.start()
time.sleep(0.5)
release.set()
decoding.join()
opening.join()
"""


def test_pipe_shard_commands_keep_the_real_stderr(hostile_shard):
    """The read-ahead thread opens shards while the decode thread decodes: a `pipe:` command started while a decoder
    holds fd 2 back would inherit the capture file, and its error messages would be lost."""
    shard, damaged = hostile_shard
    result = subprocess.run(
        [sys.executable, "-c", _PIPE_DURING_CAPTURE, str(shard)],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [str(damaged + 2)]  # every sample of the shard was read
    assert "the pipe command speaks" in result.stderr


def test_fd2_capture_returns_only_what_each_block_wrote():
    """The capture file is reused without truncation: a short report after a long one must not carry the long one's
    tail, and a block that writes nothing returns nothing."""
    first, second, third = bytearray(), bytearray(), bytearray()
    with _fd2.held(first):
        os.write(2, b"a long native report " * 50)
    with _fd2.held(second):
        os.write(2, b"short")
    with _fd2.held(third):
        pass
    assert bytes(first) == b"a long native report " * 50
    assert bytes(second) == b"short"
    assert bytes(third) == b""
