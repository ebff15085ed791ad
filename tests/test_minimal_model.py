"""experiments/minimal_model.py: its figures are measured against the right frames, and every switch reaches the
model it trains."""

import json

import pytest

from experiments import minimal_model

KEYPOINTS = ["--encoder", "keypoints", "--prediction", "residual"]


def _run(digits_shards, capsys, *flags: str) -> dict:
    argv = [
        "--train-shards", f"{digits_shards}/train/shard-*.tar",
        "--val-shards", f"{digits_shards}/val/shard-*.tar",
        "--batch", "4", *flags,
    ]  # fmt: skip
    assert minimal_model.main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    del out["args"], out["seconds"]
    return out


def test_an_untrained_residual_predictor_scores_exactly_copy_last(digits_shards, capsys):
    """Before any step the online and the target encoder are one network and the project's residual predictor
    outputs its input (zero output layer): its forecast of frame t+1 is frame t, so every ratio to copy-last is 1,
    on kicked and unkicked clips. AdaSSL-V's prior and posterior start equal: KL 0 everywhere, an AUC of 0.5."""
    flags = ("--steps", "0", "--predictor", "project", "--prediction", "residual")
    out = _run(digits_shards, capsys, *flags)
    assert out["ratio_unkicked_kicked"] == [1.0, 1.0]
    assert out["online_probe_r2_per_state_column"] == out["probe_r2_per_state_column"]
    out = _run(digits_shards, capsys, *flags, "--latent", "adassl_v")
    for key in ("prior_mean_ratio", "posterior_ratio", "best_of_8_ratio"):
        assert out[key] == [1.0, 1.0], key
    assert out["kl_kicked_unkicked"] == [0.0, 0.0] and out["kl_auc"] == 0.5


@pytest.mark.parametrize(
    ("base", "switch"),
    [
        (["--predictor", "project"], ["--latent", "adassl_v"]),
        (["--encoder", "cnn", "--prediction", "residual"], ["--target", "self"]),
        (KEYPOINTS, ["--tvc-weight", "1"]),
        (KEYPOINTS, ["--recon-weight", "1", "--recon-target", "foreground"]),
    ],  # fmt: skip
)
def test_each_switch_changes_the_trained_model(base, switch, digits_shards, capsys):
    """Three steps from one seed with and without the switch: the trained encoders differ (a switch that is parsed
    but never reaches the loss would leave them bit-identical)."""
    without = _run(digits_shards, capsys, "--steps", "3", *base)
    with_switch = _run(digits_shards, capsys, "--steps", "3", *base, *switch)
    assert with_switch["target_eff_rank"] != without["target_eff_rank"]
    assert with_switch["online_probe_r2_per_state_column"] != without["online_probe_r2_per_state_column"]
