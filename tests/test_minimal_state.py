"""experiments/minimal_state.py: the state-level AdaSSL-V runs on a real (tiny) push world and reports its figures."""

import json

import pytest

from experiments import minimal_state
from worlds.push_world import make_push_world


def test_minimal_state_reports_ratios_and_the_intent_change_detector(tmp_path, capsys):
    make_push_world(tmp_path, 3, seed=0, val_videos=2, num_frames=16, progress=False)
    argv = [
        "--data",
        str(tmp_path),
        "--steps",
        "3",
        "--methods",
        "adassl_v",
        "oracle",
        "--reads",
        "change",
        "--betas",
        "1e-3",
    ]
    assert minimal_state.main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [(row["method"], row["reads"]) for row in lines] == [("adassl_v", "change"), ("oracle", None)]
    for row in lines:
        assert row["prior_mean_unkicked"] > 0 and row["posterior_unkicked"] > 0
    assert lines[0]["kl_intent_change"] >= 0 and lines[0]["kl_other"] >= 0
    assert "kl_other" not in lines[1]


def test_minimal_state_without_shards_says_how_to_write_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m worlds.push_world"):
        minimal_state.main(["--data", str(tmp_path), "--steps", "1"])
