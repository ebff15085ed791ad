"""The benchmark runs on real shards and reports the figures it promises."""

from __future__ import annotations

import json

from data_pipeline.bench import main


def test_bench_prints_one_json_line_per_setting(digits_shards, capsys):
    shards = str(digits_shards / "train" / "shard-*.tar")
    assert main(["--shards", shards, "--workers", "0", "1", "--batches", "2", "--batch-size", "4"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["workers"] for r in records] == [0, 1]
    for r in records:
        assert r["decoder_fps"] > 0 and r["pipeline_clips_s"] > 0 and r["batch_size"] == 4
        assert abs(r["pipeline_fps"] - r["pipeline_clips_s"] * r["clip_length"]) < 1
        assert abs(r["ratio"] - r["pipeline_fps"] / r["decoder_fps"]) < 0.01
