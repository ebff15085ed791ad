"""The benchmark runs on real shards and reports the figures it promises."""

from __future__ import annotations

import json

from benchmarks.pipeline import decode_jobs, main
from data_pipeline.config import DataConfig


def test_bench_prints_one_json_line_per_setting(digits_shards, capsys):
    shards = str(digits_shards / "train" / "shard-*.tar")
    args = ["--shards", shards, "--workers", "0", "1", "--batches", "2", "--batch-size", "4", "--ring-slots", "4", "0"]
    assert main(args) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["workers"], r["ring_slots"]) for r in records] == [(0, 4), (0, 0), (1, 4), (1, 0)]
    for r in records:
        assert r["decoder_fps"] > 0 and r["pipeline_clips_s"] > 0 and r["batch_size"] == 4
        assert abs(r["pipeline_fps"] - r["pipeline_clips_s"] * r["clip_length"]) < 1
        assert abs(r["ratio"] - r["pipeline_fps"] / r["decoder_fps"]) < 0.01


def test_the_limit_decodes_the_pipelines_clips_with_its_calls():
    one = DataConfig(num_context=2, num_target=1)
    assert decode_jobs(one, [("a", 0), ("b", 4), ("a", 1)]) == [("a", [0, 1, 2]), ("a", [1, 2, 3]), ("b", [4, 5, 6])]
    two = DataConfig(num_context=2, num_target=1, clips_per_video=2)  # one call per sample: the union of its clips
    assert decode_jobs(two, [("a", 0), ("a", 2), ("b", 5)]) == [("a", [0, 1, 2, 3, 4]), ("b", [5, 6, 7])]


def test_bench_takes_the_image_size_and_clip_length_and_reports_frames_per_core(digits_shards, capsys):
    shards = str(digits_shards / "train" / "shard-*.tar")
    args = ["--shards", shards, "--workers", "0", "--batches", "2", "--batch-size", "2", "--image-size", "32"]
    assert main([*args, "--num-context", "3", "--num-target", "2", "--frame-step", "2"]) == 0
    (record,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (record["image_size"], record["clip_length"], record["frame_step"]) == (32, 5, 2)
    assert record["fps_per_core"] == record["pipeline_fps_per_cpu_s"] > 0
