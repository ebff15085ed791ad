"""experiments/minimal_model.py: the ablation loop runs end to end on real shards and reports what the table needs."""

import json
import math

import pytest

from experiments import minimal_model


@pytest.mark.parametrize(
    "flags",
    [
        ["--latent", "adassl_v", "--predictor", "project"],
        ["--encoder", "cnn", "--target", "self", "--prediction", "residual"],
        ["--encoder", "keypoints", "--prediction", "residual", "--tvc-weight", "1", "--recon-weight", "1",
         "--recon-target", "foreground"],  # fmt: skip
    ],
)
def test_minimal_model_reports_ratios_drift_and_rank(flags, digits_shards, capsys):
    argv = [
        "--train-shards", f"{digits_shards}/train/shard-*.tar",
        "--val-shards", f"{digits_shards}/val/shard-*.tar",
        "--steps", "3", "--batch", "4", *flags,
    ]  # fmt: skip
    assert minimal_model.main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["target_eff_rank"] >= 1.0 and out["drift"] >= 0.0
    if "adassl_v" in flags:
        for key in ("prior_mean_ratio", "posterior_ratio", "best_of_8_ratio"):
            assert math.isfinite(out[key][0])
        assert 0.0 <= out["kl_auc"] <= 1.0
        assert out["kl_kicked_unkicked"][0] >= 0.0
    else:
        assert math.isfinite(out["ratio_unkicked_kicked"][0])
