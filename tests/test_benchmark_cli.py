"""The benchmark scripts' command lines: key=value overrides may stand anywhere, even after a multi-value option."""

from benchmarks import adassl_vs_jepa, beta_sweep
from benchmarks.runs import parse_with_overrides


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
