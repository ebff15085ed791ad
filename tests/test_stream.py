"""The streaming pipeline on real shards: rank/worker splits, seeding, HTTP, skips, start-up errors, clips."""

from __future__ import annotations

import functools
import http.server
import json
import pickle
import re
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from shard_helpers import read_samples, train_glob, write_tar

from data_pipeline.batching import read_ahead
from data_pipeline.clips import clip_indices, clip_starts, cut_metadata
from data_pipeline.config import DataConfig
from data_pipeline.decoders import get_decoder
from data_pipeline.shardlist import ShardListError, expand_shards, pipe_program
from data_pipeline.stream import NoDecodableDataError, make_eval_loader, make_train_loader
from data_pipeline.writer.encode import encode_h264
from worlds.moving_digits import simulate

CFG = DataConfig(num_context=3, num_target=3, batch_size=2, num_workers=0, shuffle_buffer=4, epoch_batches=4)


def _keys(loader) -> list[str]:
    return [key for batch in loader for key in batch["key"]]


def test_batches_follow_the_contract(digits_shards):
    batch = next(iter(make_train_loader(CFG, train_glob(digits_shards), seed=0, epoch=0, rank=0, world_size=1)))
    assert batch["frames"].shape == (2, 6, 64, 64, 3) and str(batch["frames"].dtype) == "torch.uint8"
    assert batch["state"].shape == (2, 6, 4) and batch["action"].shape == (2, 5, 2) and batch["events"].shape == (2, 5)
    assert batch["labels"].shape == (2, 1) and str(batch["labels"].dtype) == "torch.int64"
    assert batch["state_names"] == ["x0", "y0", "vx0", "vy0"] and batch["action_names"] == ["dvx0", "dvy0"]
    assert batch["label_names"] == ["digit0"] and batch["skipped"] == {}
    # the ground truth travels with its frames
    sample = read_samples(digits_shards)[batch["key"][0]]
    meta = json.loads(sample["json"])
    indices = clip_indices(int(batch["start"][0]), 6, 1)
    np.testing.assert_allclose(batch["state"][0].numpy(), np.asarray(meta["state"])[indices], atol=1e-4)
    np.testing.assert_array_equal(batch["frames"][0].numpy(), get_decoder("pyav").decode(sample["mp4"], indices))
    assert batch["labels"][0, 0] == meta["labels"]["digit0"]
    # each clip's frame rate, as its KEY.json says (the evaluator's seconds per step come from it)
    samples = read_samples(digits_shards)
    assert str(batch["fps"].dtype) == "torch.float64" and batch["fps"].shape == (2,)
    assert batch["fps"].tolist() == [json.loads(samples[key]["json"])["fps"] for key in batch["key"]]


def test_worker_batches_are_tensors_of_the_contract(digits_shards):
    """From a worker (frames in shared memory, small arrays sent by value) and with several clips per video."""
    cfg = replace(CFG, num_workers=1, clips_per_video=2, epoch_batches=3)
    batches = list(make_train_loader(cfg, train_glob(digits_shards), seed=0, epoch=0, rank=0, world_size=1))
    assert len(batches) == 3
    dtypes = {
        "frames": "uint8",
        "state": "float32",
        "action": "float32",
        "events": "float32",
        "labels": "int64",
        "fps": "float64",
    }
    for batch in batches:
        assert {name: str(batch[name].dtype) for name in dtypes} == {k: f"torch.{v}" for k, v in dtypes.items()}
        assert str(batch["start"].dtype) == "torch.int64" and batch["start"].shape == (2,)
        assert batch["frames"].shape == (2, 6, 64, 64, 3) and batch["state"].shape == (2, 6, 4)
    batch = batches[0]
    sample = read_samples(digits_shards)[batch["key"][0]]
    indices = clip_indices(int(batch["start"][0]), 6, 1)
    np.testing.assert_array_equal(batch["frames"][0].numpy(), get_decoder("pyav").decode(sample["mp4"], indices))
    np.testing.assert_allclose(
        batch["action"][0].numpy(), np.asarray(json.loads(sample["json"])["action"])[indices[:-1]], atol=1e-6
    )


def test_read_ahead_keeps_order_raises_in_place_and_stops():
    def items():
        yield from range(5)
        raise ValueError("bad shard")

    got = []
    with pytest.raises(ValueError, match="bad shard"):
        for item in read_ahead(items(), depth=2):
            got.append(item)
    assert got == [0, 1, 2, 3, 4]

    reader = read_ahead(iter(range(10**6)), depth=2)
    assert next(reader) == 0
    before = threading.active_count()
    reader.close()  # the consumer stops: so does the thread
    deadline = time.monotonic() + 5
    while threading.active_count() >= before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() < before


def test_two_ranks_two_workers_read_disjoint_samples_and_equal_batches(digits_shards):
    cfg = replace(CFG, num_workers=2, epoch_batches=2)  # 4 shards of 4 videos = one shard per (rank, worker)
    per_rank = []
    for rank in range(2):
        loader = make_train_loader(cfg, train_glob(digits_shards), seed=5, epoch=1, rank=rank, world_size=2)
        batches = list(loader)
        assert len(batches) == len(loader) == 2
        assert all(len(b["key"]) == 2 for b in batches)
        per_rank.append({key for b in batches for key in b["key"]})
    assert per_rank[0] and per_rank[1] and not per_rank[0] & per_rank[1]


def test_fewer_shards_than_slots_still_splits_samples(digits_shards):
    val = str(digits_shards / "val" / "shard-*.tar")  # 2 shards for 2 ranks x 2 workers
    cfg = replace(CFG, num_workers=2, epoch_batches=2)
    with pytest.warns(UserWarning, match="2 shard\\(s\\) for 4 reader slots"):
        loaders = [make_train_loader(cfg, val, seed=0, epoch=0, rank=r, world_size=2) for r in range(2)]
    keys = [set(_keys(loader)) for loader in loaders]
    assert all(len(list(loader)) == 2 for loader in loaders)
    assert not keys[0] & keys[1]


def test_epoch_length_holds_when_it_exceeds_the_data(digits_shards):
    cfg = replace(CFG, batch_size=4, epoch_batches=9)  # 36 clips from 16 videos: the share is cycled
    batches = list(make_train_loader(cfg, train_glob(digits_shards), seed=0, epoch=0, rank=0, world_size=1))
    assert len(batches) == 9
    assert len(set(_keys(batches))) == 16


def test_same_seed_epoch_rank_gives_the_same_stream(digits_shards):
    def stream(epoch):
        loader = make_train_loader(
            replace(CFG, num_workers=2), train_glob(digits_shards), seed=3, epoch=epoch, rank=0, world_size=1
        )
        batches = list(loader)
        return [b["key"] for b in batches], [b["start"].tolist() for b in batches], batches[0]["frames"]

    first, again, other = stream(0), stream(0), stream(1)
    assert first[:2] == again[:2]
    assert (first[2] == again[2]).all()
    assert first[:2] != other[:2]


def test_eval_loader_is_finite_ordered_and_deterministic(digits_shards):
    val = str(digits_shards / "val" / "shard-{000000..000001}.tar")
    batches = list(make_eval_loader(CFG, val, num_clips=5, seed=1, batch_size=2))
    assert [len(b["key"]) for b in batches] == [2, 2, 1]
    assert _keys(batches) == [f"val_{i:07d}" for i in range(5)]
    again = list(make_eval_loader(CFG, val, num_clips=5, seed=1, batch_size=2))
    assert [b["start"].tolist() for b in batches] == [b["start"].tolist() for b in again]
    assert len(_keys(make_eval_loader(CFG, val, num_clips=100))) == 8  # the shards run out first


@pytest.fixture
def http_root(digits_shards):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(digits_shards))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_shards_stream_like_local_ones(digits_shards, http_root):
    url = f"{http_root}/train/shard-{{000000..000003}}.tar"
    local = list(make_eval_loader(CFG, train_glob(digits_shards), num_clips=16, batch_size=4))
    remote = list(make_eval_loader(CFG, url, num_clips=16, batch_size=4))
    assert _keys(remote) == _keys(local) and len(_keys(remote)) == 16
    assert all((a["frames"] == b["frames"]).all() for a, b in zip(local, remote, strict=True))
    train = make_train_loader(CFG, url, seed=0, epoch=0, rank=0, world_size=1)
    assert _keys(train) == _keys(
        make_train_loader(CFG, train_glob(digits_shards), seed=0, epoch=0, rank=0, world_size=1)
    )


def test_pipe_shards_stream_like_local_ones(digits_shards):
    pipe = f"pipe:cat {digits_shards}/val/shard-000000.tar :: pipe:cat {digits_shards}/val/shard-000001.tar"
    assert _keys(make_eval_loader(CFG, pipe, num_clips=8)) == [f"val_{i:07d}" for i in range(8)]


def test_a_pipe_command_that_is_not_installed_fails_at_start_up(digits_shards, tmp_path, monkeypatch):
    """Not one `shard_error` skip per shard: the loader refuses to start, naming the program and the fix."""
    missing = "pipe:no-such-command-xyz cat s3://bucket/train/shard-{000000..000003}.tar"
    with pytest.raises(ShardListError, match=r"'no-such-command-xyz', which runs the shard command .* is not on PATH"):
        make_train_loader(CFG, missing, seed=0, epoch=0, rank=0, world_size=1)
    with pytest.raises(ShardListError, match=r"install it on every machine .*WITH_S5CMD=1"):
        make_eval_loader(CFG, f"pipe:cat {digits_shards}/val/shard-000000.tar :: {missing}", num_clips=1)
    for spec in [
        "pipe:AWS_PROFILE=x LC_ALL=C no-such-command-xyz cat s3://b/s.tar",
        "pipe:env -i -u HOME FOO=1 no-such-command-xyz cat s3://b/s.tar",
        "pipe:exec no-such-command-xyz cat s3://b/s.tar | head",
    ]:
        with pytest.raises(ShardListError, match="'no-such-command-xyz'"):
            expand_shards(spec)
    with pytest.raises(ShardListError, match=re.escape(f"'{tmp_path}/s5cmd', which") + ".* does not exist"):
        expand_shards(f"pipe:{tmp_path}/s5cmd cat s3://b/s.tar")

    cat = shutil.which("cat")
    assert pipe_program("pipe:FOO=1 env -i s5cmd cat s3://b/s.tar") == "s5cmd"
    assert pipe_program("pipe:~/bin/s5cmd cat s3://b/s.tar") == str(Path.home() / "bin" / "s5cmd")
    assert pipe_program("pipe:cd /tmp && no-such-command-xyz x") is None  # the shell runs it; nothing to look up
    assert pipe_program("pipe:$UNSET_VARIABLE_XYZ/s5cmd x") is None
    works = f"pipe:LC_ALL=C {cat} {digits_shards}/val/shard-{{000000..000001}}.tar"
    assert _keys(make_eval_loader(CFG, works, num_clips=8)) == [f"val_{i:07d}" for i in range(8)]

    monkeypatch.setenv("PATH", str(tmp_path))  # a machine without curl: http(s) shards cannot be read either
    with pytest.raises(ShardListError, match="'curl', which reads http"):
        expand_shards("https://host/train/shard-{000000..000003}.tar", check_urls=False)


def test_missing_shards_are_a_clear_error_at_start_up(digits_shards, http_root, tmp_path):
    with pytest.raises(ShardListError, match="matches no files"):
        make_train_loader(CFG, str(tmp_path / "shard-*.tar"), seed=0, epoch=0, rank=0, world_size=1)
    with pytest.raises(ShardListError, match="does not exist"):
        make_eval_loader(CFG, f"{train_glob(digits_shards)} {tmp_path}/shard-000009.tar", num_clips=1)
    with pytest.raises(ShardListError, match="empty"):
        make_train_loader(CFG, "  ", seed=0, epoch=0, rank=0, world_size=1)
    with pytest.raises(ShardListError, match="HTTP 404"):
        make_eval_loader(CFG, f"{http_root}/train/shard-000099.tar", num_clips=1)


def test_truncated_and_short_videos_are_skipped_and_counted(digits_shards, tmp_path):
    samples = read_samples(digits_shards, "val")
    good = [(f"{k}.{ext}", samples[k][ext]) for k in ("val_0000000", "val_0000001") for ext in ("mp4", "json")]
    cut = samples["val_0000002"]["mp4"]
    frames, meta = simulate(4, np.random.default_rng(0))
    meta["num_frames"] = 4
    shard = write_tar(
        tmp_path / "shard-000000.tar",
        [
            *good[:2],
            ("cut.mp4", cut[: len(cut) // 2]),
            ("cut.json", samples["val_0000002"]["json"]),
            ("short.mp4", encode_h264(frames, 10.0)),
            ("short.json", json.dumps(meta).encode()),
            ("nojson.mp4", cut),
            *good[2:],
        ],
    )
    batches = list(make_eval_loader(CFG, str(shard), num_clips=10, batch_size=8))
    assert _keys(batches) == ["val_0000000", "val_0000001"]
    # the truncated video: decord cannot open it, PyAV is tried (counted, not a skip) and fails too
    assert batches[0]["skipped"] == {"decode_error": 1, "too_short": 1, "bad_metadata": 1, "fallback/pyav": 1}

    train = list(make_train_loader(replace(CFG, epoch_batches=3), str(shard), seed=0, epoch=0, rank=0, world_size=1))
    assert len(train) == 3 and set(_keys(train)) == {"val_0000000", "val_0000001"}
    totals = {reason: sum(b["skipped"].get(reason, 0) for b in train) for reason in ("decode_error", "too_short")}
    assert totals["decode_error"] >= 1 and totals["too_short"] >= 1


def test_a_missing_or_invalid_fps_leaves_it_out_of_the_batch_and_skips_nothing(digits_shards, tmp_path):
    samples = read_samples(digits_shards, "val")
    sources = [samples[key] for key in sorted(samples)]
    # KEY.json's fps in user data: missing (None), or not a finite positive number, as raw JSON text (1e400 parses
    # as inf, 10**400 is beyond float64)
    bad = [None, '"10"', "0", "-10", "1e400", "1" + "0" * 400, "true", "null", "[10]"]
    order = ["good_a", *[f"bad_{i}" for i in range(len(bad))], "good_b"]
    entries, good_fps = [], {}
    for i, key in enumerate(order):
        source = sources[i % len(sources)]
        meta = json.loads(source["json"])
        text = source["json"].decode()
        if key.startswith("good"):
            good_fps[key] = meta["fps"]
        elif (literal := bad[int(key.removeprefix("bad_"))]) is None:
            del meta["fps"]
            text = json.dumps(meta)
        else:
            meta["fps"] = "@FPS@"
            text = json.dumps(meta).replace('"@FPS@"', literal)
        entries += [(f"{key}.mp4", source["mp4"]), (f"{key}.json", text.encode())]
    shard = str(write_tar(tmp_path / "shard-000000.tar", entries))
    singles = list(make_eval_loader(CFG, shard, num_clips=20, batch_size=1))
    assert _keys(singles) == order and all(batch["skipped"] == {} for batch in singles)
    for batch in singles:
        key = batch["key"][0]
        assert ("fps" in batch) == key.startswith("good"), key
        if "fps" in batch:
            assert batch["fps"].tolist() == [good_fps[key]]
        assert batch["state"].shape == (1, 6, 4)  # the rest of the batch is whole
    # a batch has fps only when every clip has one, never for some clips only: here the last, good_b alone
    pairs = list(make_eval_loader(CFG, shard, num_clips=20, batch_size=2))
    assert _keys(pairs) == order and ["fps" in batch for batch in pairs] == [False] * 5 + [True]


def test_nothing_usable_is_an_error_not_an_endless_loop(digits_shards):
    long_clip = replace(CFG, num_context=20, num_target=20)  # 40 frames from 24-frame videos
    loader = make_train_loader(long_clip, train_glob(digits_shards), seed=0, epoch=0, rank=0, world_size=1)
    with pytest.raises(NoDecodableDataError, match="no usable clip of 40 frames"):
        list(loader)
    with pytest.raises(NoDecodableDataError, match="no usable clip"):
        list(make_eval_loader(long_clip, train_glob(digits_shards), num_clips=4))


class _Exploit:
    """Unpickling this touches `marker`: proof that something in the shard was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_shards_never_unpickle_or_keep_foreign_entries(digits_shards, tmp_path):
    marker = tmp_path / "pwned"
    sample = read_samples(digits_shards, "val")["val_0000000"]
    payload = pickle.dumps(_Exploit(marker))
    shard = write_tar(
        tmp_path / "evil.tar",
        [("val_0000000.mp4", sample["mp4"]), ("val_0000000.json", sample["json"]), ("val_0000000.pyd", payload)],
    )
    batches = list(make_eval_loader(CFG, str(shard), num_clips=1))
    assert _keys(batches) == ["val_0000000"]
    assert not marker.exists()
    assert "pyd" not in batches[0]


def test_clip_metadata_merges_skipped_transitions():
    meta = {
        "num_frames": 7,
        "state": [[t, 10 * t] for t in range(7)],
        "action": [[1.0, t] for t in range(6)],
        "events": [0, 0, 1, 0, 0, 0],
    }
    cut = cut_metadata(meta, clip_indices(1, 3, 2))  # frames 1, 3, 5
    np.testing.assert_array_equal(cut["state"], [[1, 10], [3, 30], [5, 50]])
    np.testing.assert_array_equal(cut["action"], [[2, 1 + 2], [2, 3 + 4]])
    np.testing.assert_array_equal(cut["events"], [1, 0])


def test_consecutive_clip_metadata_is_the_rows_themselves():
    meta = {
        "num_frames": 6,
        "state": [[t, -t] for t in range(6)],
        "action": [[0.1 * t, 1.0] for t in range(5)],
        "events": [0, 1, 0, 0, 1],
    }
    cut = cut_metadata(meta, clip_indices(2, 3, 1))  # frames 2, 3, 4
    assert {k: v.dtype for k, v in cut.items()} == dict.fromkeys(("state", "action", "events"), np.float32)
    np.testing.assert_array_equal(cut["state"], np.float32([[2, -2], [3, -3], [4, -4]]))
    np.testing.assert_array_equal(cut["action"], np.float32([[0.2, 1.0], [0.3, 1.0]]))
    np.testing.assert_array_equal(cut["events"], [0, 0])
    with pytest.raises(ValueError, match="'action' has 4 rows"):
        cut_metadata({**meta, "action": meta["action"][:4]}, clip_indices(0, 3, 1))


def test_clip_starts_respect_the_span():
    rng = np.random.default_rng(0)
    starts = clip_starts(10, 4, 3, rng, count=200)  # span 10: only start 0 fits
    assert set(starts.tolist()) == {0}
    assert clip_starts(9, 4, 3, rng) is None
