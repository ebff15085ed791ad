"""The benchmark scripts' command lines (key=value overrides may stand anywhere, even after a multi-value option)
and their data (a world written by another version of its rules is refused)."""

import json

import pytest

from benchmarks.runs import ROOT, ensure_data, parse_with_overrides
from experiments import adassl_vs_jepa, beta_sweep
from worldmodel.run.config import load_config
from worlds.push_world import VERSION


def test_overrides_after_a_multi_value_option_are_not_read_as_its_values():
    argv = ["--seeds", "0", "1", "model.loss=smooth_l1", "--still", "--methods", "none", "oracle", "model.beta=2e-4"]
    args = parse_with_overrides(adassl_vs_jepa.build_parser(), argv)
    assert args.seeds == [0, 1]
    assert args.methods == ["none", "oracle"]
    assert args.still
    assert args.overrides == ["model.loss=smooth_l1", "model.beta=2e-4"]


def test_beta_sweep_takes_overrides_after_its_betas_and_options_written_with_equals():
    argv = ["--betas", "0.004", "0.008", "model.beta=1e-4", "--out=runs/x", "model.rollout_steps=2"]
    args = parse_with_overrides(beta_sweep.build_parser(), argv)
    assert args.betas == [0.004, 0.008]
    assert str(args.out) == "runs/x"
    assert args.overrides == ["model.beta=1e-4", "model.rollout_steps=2"]


def test_data_written_by_another_version_of_a_world_is_refused_not_measured(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        (tmp_path / split / "index.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"version 1 of worlds.push_world.*Delete"):
        ensure_data(tmp_path, num_videos=4, val_videos=1, world="push")  # no world.json: written before version 2
    (tmp_path / "world.json").write_text(json.dumps({"generator": "worlds.push_world", "version": VERSION}))
    ensure_data(tmp_path, num_videos=4, val_videos=1, world="push")  # today's version: used as it is
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train", "val", "world.json"]


def test_pusht_is_a_world_of_the_benchmark_and_its_data_is_versioned_too(tmp_path):
    from worlds import pusht

    assert parse_with_overrides(adassl_vs_jepa.build_parser(), ["--world", "pusht"]).world == "pusht"
    assert adassl_vs_jepa.WORLD_RUNS["pusht"] == {"data": "pusht", "config": "configs/pusht.yaml", "runs": "-pusht"}
    cfg = load_config(ROOT / "configs" / "pusht.yaml")
    assert cfg.data.train_shards == "data/pusht/train/shard-*.tar" and cfg.data.val_shards.startswith("data/pusht/val/")
    assert cfg.data.image_size == 64  # the frames as written: the agent is small
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        (tmp_path / split / "index.json").write_text("{}")
    stamp = {"generator": "worlds.pusht", "version": pusht.VERSION + 1}
    (tmp_path / "world.json").write_text(json.dumps(stamp))
    with pytest.raises(SystemExit, match=rf"version {pusht.VERSION + 1} of worlds.pusht.*Delete"):
        ensure_data(tmp_path, num_videos=4, val_videos=1, world="pusht")
    (tmp_path / "world.json").write_text(json.dumps({**stamp, "version": pusht.VERSION}))
    ensure_data(tmp_path, num_videos=4, val_videos=1, world="pusht")  # today's version: used as it is
    with pytest.raises(ValueError, match="unknown world"):
        ensure_data(tmp_path, num_videos=4, val_videos=1, world="pushtt")
