"""The dataset-scale writer on real videos and real tars: workers, jobs + merge, resume after SIGKILL, lists and
URLs, long videos cut into segments."""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.decoders import get_decoder
from data_pipeline.writer import merge_jobs, write_shards
from data_pipeline.writer.cli import main
from data_pipeline.writer.encode import encode_h264
from data_pipeline.writer.inputs import list_inputs
from worlds.moving_digits import simulate

REPO = Path(__file__).resolve().parents[1]


def shard_content(folder: Path) -> list[tuple[str, bytes]]:
    """(member name, payload) of every sample entry, in index.json's shard order and tar order."""
    index = json.loads((folder / "index.json").read_text())
    out = []
    for shard in index["shards"]:
        with tarfile.open(folder / shard["name"]) as tar:
            out += [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    return out


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def videos(tmp_path_factory, carphone_path) -> Path:
    """Eleven real videos in two subfolders: nine moving-digits clips with sidecars (state, action, events), the
    real carphone clip (camera footage, 176x144), and a corrupt one."""
    root = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(5)
    for i in range(9):
        frames, meta = simulate(10, rng, num_digits=1)
        folder = root / ("indoor" if i % 3 else "outdoor")
        folder.mkdir(exist_ok=True)
        (folder / f"clip{i}.mp4").write_bytes(encode_h264(frames, 10.0, gop=4))
        (folder / f"clip{i}.json").write_text(json.dumps({k: meta[k] for k in ("state", "action", "events")}))
    (root / "carphone.mp4").write_bytes(carphone_path.read_bytes())
    (root / "outdoor" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(2000))
    return root


def test_folder_input_is_recursive_and_sorted(videos):
    listed = list_inputs(videos)
    assert [v.source for v in listed][:3] == ["carphone.mp4", "indoor/clip1.mp4", "indoor/clip2.mp4"]
    assert [v.key for v in listed][:2] == ["carphone", "indoor_clip1"]
    assert len(listed) == 11


@pytest.mark.parametrize("limit", [{"samples_per_shard": 3}, {"bytes_per_shard": 40_000}])
def test_workers_give_byte_identical_shards(videos, tmp_path, limit):
    one = write_shards(videos, tmp_path / "one", progress=False, **limit)["all"]
    two = write_shards(videos, tmp_path / "two", progress=False, workers=2, **limit)["all"]
    assert one.written == two.written == 10 and len(one.shards) > 2
    assert one.skipped == two.skipped and one.skipped[0][0] == "outdoor/broken.mp4"
    assert folder_bytes(tmp_path / "one") == folder_bytes(tmp_path / "two")


def test_workers_with_reencoding_give_the_same_samples(videos, tmp_path):
    """libx264 is not bit-exact from call to call here: same keys, order and metadata, frames within codec noise."""
    for name, workers in (("one", 1), ("two", 2)):
        write_shards(videos, tmp_path / name, samples_per_shard=4, size=32, progress=False, workers=workers)
    one, two = shard_content(tmp_path / "one"), shard_content(tmp_path / "two")
    assert [n for n, _ in one] == [n for n, _ in two]
    decoder = get_decoder("pyav")
    for (name, a), (_, b) in zip(one, two, strict=True):
        if name.endswith(".json"):
            assert a == b, name
            continue
        indices = list(range(decoder.info(a).num_frames))
        fa, fb = decoder.decode(a, indices), decoder.decode(b, indices)
        # codec noise: up to 1.27 levels seen on a loaded machine (carphone.mp4); another video's frames differ by tens
        assert fa.shape[1:] == (32, 32, 3) and np.abs(fa.astype(int) - fb).mean() < 2.0, name


def test_two_jobs_and_the_merge_equal_a_single_run(videos, tmp_path, capsys):
    options = {"samples_per_shard": 2, "val_fraction": 0.3, "seed": 1, "progress": False}
    single = write_shards(videos, tmp_path / "single", **options)
    write_shards(videos, tmp_path / "jobs", num_jobs=2, job_index=1, workers=2, **options)
    with pytest.raises(RuntimeError, match=r"job\(s\) \[0\] have not started.*--job-index I"):
        merge_jobs(tmp_path / "jobs")
    write_shards(videos, tmp_path / "jobs", num_jobs=2, job_index=0, **options)
    names = sorted(p.name for p in (tmp_path / "jobs" / "train").iterdir())
    assert "job-00000-of-00002.json" in names and any(n.startswith("shard-j00001-") for n in names)
    assert main(["--merge", str(tmp_path / "jobs")]) == 0
    assert "jobs/train: wrote" in capsys.readouterr().out
    for split in ("train", "val"):
        merged, alone = tmp_path / "jobs" / split, tmp_path / "single" / split
        assert shard_content(merged) == shard_content(alone), split  # same samples, same order, same bytes
        index = json.loads((merged / "index.json").read_text())
        assert index["total_samples"] == single[split].written
        assert [s["name"] for s in index["shards"]] == [f"shard-{i:06d}.tar" for i in range(len(index["shards"]))]
        assert sorted(p.name for p in merged.iterdir()) == ["index.json", *(s["name"] for s in index["shards"])]
    assert main(["--merge", str(tmp_path / "jobs")]) == 2  # merged already: nothing left to merge


def test_a_rerun_keeps_verified_shards_and_rewrites_a_damaged_one(videos, tmp_path):
    options = {"samples_per_shard": 2, "progress": False, "num_jobs": 2, "job_index": 1}  # 6 videos, 1 corrupt
    first = write_shards(videos, tmp_path, **options)["all"]
    assert first.skipped and first.skipped[0][0] == "outdoor/broken.mp4"  # between the first shard and the second
    before = folder_bytes(tmp_path)
    again = write_shards(videos, tmp_path, **options)["all"]  # finished: everything verifies, nothing is written
    assert again.kept == len(first.shards) == 3 and folder_bytes(tmp_path) == before
    damaged = tmp_path / "shard-j00001-000001.tar"
    damaged.write_bytes(damaged.read_bytes()[:-3000])
    (tmp_path / "shard-j00001-000002.tar").unlink()
    resumed = write_shards(videos, tmp_path, **options)["all"]
    assert resumed.kept == 1 and resumed.written == first.written and resumed.skipped == first.skipped
    assert folder_bytes(tmp_path) == before
    other = write_shards(videos, tmp_path, **{**options, "samples_per_shard": 3})["all"]  # other options: start over
    assert other.kept == 0 and sorted(p.name for p in tmp_path.glob("shard-*.tar"))[-1] == "shard-j00001-000001.tar"


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:  # a client killed mid-transfer is expected here
        pass


@contextlib.contextmanager
def serve(folder: Path, stall: str, release: threading.Event):
    """An HTTP server of `folder` on 127.0.0.1 that holds back any path containing `stall` until `release`."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            if stall in self.path:
                release.wait(120)
            super().do_GET()

        def log_message(self, *args) -> None:
            pass

    server = _Server(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        release.set()
        server.shutdown()
        server.server_close()


def test_a_writer_killed_mid_run_resumes_to_the_same_shards(videos, tmp_path):
    """The writer (2 workers) reads URLs from a server that holds back the 6th video: while it waits, the first two
    shards are complete and the third is open. SIGKILL, then a rerun, gives the bytes of an uninterrupted run."""
    release = threading.Event()
    with serve(videos, stall="clip8", release=release) as url:  # the 6th in sorted order
        listed = tmp_path / "list.txt"
        rows = [f"{url}/{v.source}\t{url}/{v.source[:-4]}.json" for v in list_inputs(videos) if "clip" in v.source]
        listed.write_text("# videos and their sidecars\n" + "\n".join(rows) + "\n")
        out, job_file = tmp_path / "out", tmp_path / "out" / "job-00000-of-00001.json"
        command = [sys.executable, "-m", "data_pipeline.writer", "--input", str(listed), "--output", str(out),
                   "--samples-per-shard", "2", "--workers", "2", "--no-progress"]  # fmt: skip
        writer = subprocess.Popen(command, cwd=REPO, start_new_session=True, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while not (job_file.exists() and len(json.loads(job_file.read_text())["shards"]) == 2):
            assert writer.poll() is None, writer.stderr.read().decode()
            assert time.monotonic() < deadline, "the writer did not write its first two shards"
            time.sleep(0.1)
        os.killpg(writer.pid, signal.SIGKILL)  # the writer and its worker processes
        writer.wait(30)
        writer.stderr.close()
        assert (out / "shard-000002.tar.tmp").exists() and not (out / "shard-000002.tar").exists()
        assert not (out / "index.json").exists()
        release.set()
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert "wrote 9 samples in 5 shards, skipped 0 (kept 2 complete shards from an earlier run)" in result.stdout
        write_shards(listed, tmp_path / "uninterrupted", samples_per_shard=2, progress=False)
    assert folder_bytes(out) == folder_bytes(tmp_path / "uninterrupted")
    assert sorted(folder_bytes(out)) == ["index.json", *(f"shard-{i:06d}.tar" for i in range(5))]


def test_csv_and_text_lists(videos, tmp_path):
    listed = tmp_path / "lists" / "videos.csv"
    listed.parent.mkdir()
    rel = os.path.relpath(videos, listed.parent)
    listed.write_text(
        "path,sidecar,key\n"
        f"{rel}/indoor/clip2.mp4,{rel}/indoor/clip2.json,second\n"
        f"{rel}/indoor/clip1.mp4,,\n"  # no sidecar column value: NAME.json next to the video
        f"{rel}/outdoor/clip3.mp4,{rel}/indoor/missing.json,\n"
        f"{rel}/indoor/clip4.mp4,,clip1\n"  # the key of another entry
    )
    summary = write_shards(listed, tmp_path / "out", progress=False)["all"]
    entries = dict(shard_content(tmp_path / "out"))
    assert [name for name in entries if name.endswith(".json")] == ["clip1.json", "second.json"]
    source = json.loads((videos / "indoor" / "clip2.json").read_text())
    assert json.loads(entries["second.json"])["state"] == source["state"]
    assert "state" in json.loads(entries["clip1.json"])
    skipped = dict(summary.skipped)
    assert "missing.json cannot be read" in skipped[f"{rel}/outdoor/clip3.mp4"]
    assert "duplicate key 'clip1'" in skipped[f"{rel}/indoor/clip4.mp4"]
    text = tmp_path / "lists" / "videos.txt"
    text.write_text("s3://bucket/a.mp4\n")
    with pytest.raises(ValueError, match=r"scheme s3://.*presigned https://"):
        write_shards(text, tmp_path / "out2")
    bad = tmp_path / "lists" / "bad.csv"
    bad.write_text("file,label\na.mp4,1\n")
    with pytest.raises(ValueError, match="column named path or url or video"):
        write_shards(bad, tmp_path / "out3")


@pytest.fixture(scope="module")
def long_video(tmp_path_factory) -> Path:
    """One 23-frame video at 10 fps whose frame t is uniformly grey at level 8 t, with state row t = [t, -t],
    action row t = [t, 2t] and event t = (t % 3 == 0) for transition t -> t+1."""
    root = tmp_path_factory.mktemp("long")
    frames = np.repeat((8 * np.arange(23, dtype=np.uint8))[:, None, None, None], 32 * 32 * 3, axis=1)
    (root / "long.mp4").write_bytes(encode_h264(frames.reshape(23, 32, 32, 3), 10.0, gop=4, crf=0))
    t = np.arange(23)
    sidecar = {
        "state": np.stack([t, -t], 1).tolist(),
        "action": np.stack([t[:-1], 2 * t[:-1]], 1).tolist(),
        "events": (t[:-1] % 3 == 0).astype(int).tolist(),
    }
    (root / "long.json").write_text(json.dumps(sidecar))
    return root


def _segments(folder: Path) -> list[tuple[dict, np.ndarray]]:
    entries = dict(shard_content(folder))
    decoder = get_decoder("pyav")
    out = []
    for name in sorted(n for n in entries if n.endswith(".json")):
        meta = json.loads(entries[name])
        video = entries[name.replace(".json", ".mp4")]
        out.append((meta, decoder.decode(video, list(range(meta["num_frames"])))))
    return out


@pytest.mark.parametrize("workers", [1, 2])
def test_a_long_video_cut_into_segments_keeps_its_rows_aligned(long_video, tmp_path, workers):
    write_shards(long_video, tmp_path, max_frames=8, progress=False, workers=workers)
    segments = _segments(tmp_path)
    assert [m["num_frames"] for m, _ in segments] == [8, 8, 7]
    for index, (meta, frames) in enumerate(segments):
        offset, count = 8 * index, meta["num_frames"]
        t = offset + np.arange(count)
        assert meta["segment"] == {
            "of": "long", "index": index, "count": 3, "frame_offset": offset, "source_frame": offset,
            "time_offset": offset / 10.0,
        }  # fmt: skip
        assert meta["state"] == np.stack([t, -t], 1).tolist()
        assert meta["action"] == np.stack([t[:-1], 2 * t[:-1]], 1).tolist()  # its own F-1 transitions only
        assert meta["events"] == (t[:-1] % 3 == 0).astype(float).tolist()
        np.testing.assert_allclose(frames.reshape(count, -1).mean(axis=1), 8 * t, atol=2.0)  # the frames match


def test_segments_follow_a_new_frame_rate(long_video, tmp_path):
    """At 5 fps (every 2nd frame) in segments of 1 s: 12 output frames = source 0, 2, ..., 22 in 5 + 5 + 2."""
    write_shards(long_video, tmp_path, fps=5.0, max_seconds=1.0, progress=False)
    segments = _segments(tmp_path)
    assert [m["num_frames"] for m, _ in segments] == [5, 5, 2]
    for index, (meta, frames) in enumerate(segments):
        src = 2 * (5 * index + np.arange(meta["num_frames"]))
        assert meta["segment"]["frame_offset"] == 5 * index and meta["segment"]["source_frame"] == src[0]
        assert meta["state"] == np.stack([src, -src], 1).tolist()
        assert meta["action"] == [[2 * a + 1, 2 * (2 * a + 1)] for a in src[:-1]]  # rows a and a+1 summed
        np.testing.assert_allclose(frames.reshape(len(src), -1).mean(axis=1), 8 * src, atol=2.0)
