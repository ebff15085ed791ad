"""benchmarks.loaders on a real clip: the shards and per-file copies hold the same videos, and both loaders
are measured on them (at 64 px: decord copies frames of some widths wrongly, e.g. 32; see data_pipeline/decoders.py)."""

from __future__ import annotations

import json
import shutil
import tarfile

import torch

from benchmarks.loaders import PerFileClips, main, prepare


def test_per_file_copies_are_the_shards_videos_and_clips_are_consecutive_frames(carphone_path, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(carphone_path, videos / "carphone.mp4")
    shards, files = prepare(videos, tmp_path / "work", 64)
    assert [f.name for f in files] == ["carphone.mp4"]
    with tarfile.open(next((tmp_path / "work" / "shards-64").glob("shard-*.tar"))) as tar:
        assert tar.extractfile("carphone.mp4").read() == files[0].read_bytes()
    torch.manual_seed(0)
    clip = PerFileClips(files, clip_length=5, frame_step=2)[0]
    assert clip.shape == (5, 64, 64, 3) and clip.dtype == torch.uint8


def test_main_prints_both_loaders_and_their_ratio(carphone_path, tmp_path, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(carphone_path, videos / "carphone.mp4")
    args = ["--videos", str(videos), "--work", str(tmp_path / "work"), "--sizes", "64", "--workers", "1"]
    assert main([*args, "--batches", "2", "--batch-size", "2", "--num-context", "2", "--num-target", "2",
                 "--clips-per-video", "2"]) == 0  # fmt: skip
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["kind"], r.get("loader")) for r in records] == [
        ("loader", "per_file"), ("loader", "shards"), ("ratio", None),
    ]  # fmt: skip
    perfile, shards, ratio = records
    assert perfile["fps_per_core"] > 0 and shards["fps_per_core"] > 0 and shards["clips_per_video"] == 2
    assert ratio["fps_per_core_ratio"] == round(shards["fps_per_core"] / perfile["fps_per_core"], 3)
    assert not (videos / "manifest.json").exists()  # a folder of one's own videos is used as it is
