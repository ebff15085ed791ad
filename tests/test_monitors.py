"""Collapse and drift monitors: the functions the trainer logs and the warnings it prints."""

import torch

from worldmodel.model.monitors import HealthWatch, batch_variance, effective_rank, per_dim_std, target_health


def test_monitors_detect_collapse():
    torch.manual_seed(0)
    collapsed = torch.ones(64, 16) * torch.randn(16)
    spread = torch.randn(4096, 16)
    assert per_dim_std(collapsed) < 1e-6 and abs(per_dim_std(spread) - 1.0) < 0.05
    assert abs(effective_rank(collapsed) - 1.0) < 1e-3
    assert effective_rank(spread) > 15.0
    assert abs(effective_rank(torch.randn(4096, 2) @ torch.randn(2, 16)) - 2.0) < 0.5
    assert batch_variance(collapsed[:, None].expand(64, 3, 16)) < 1e-6
    assert abs(batch_variance(spread) - 1.0) < 0.05


def test_target_health_reads_drift_and_collapse():
    torch.manual_seed(0)
    still = torch.randn(64, 1, 1, 16).expand(64, 5, 1, 16)  # every clip constant in time: no drift
    assert target_health(still)["drift"] < 1e-6
    unrelated = torch.randn(64, 5, 1, 16)  # consecutive frames as unrelated as random pairs: drift about 2
    health = target_health(unrelated)
    assert abs(health["drift"] - 2.0) < 0.15 and health["target_eff_rank"] > 14
    smooth = torch.cumsum(0.1 * torch.randn(64, 5, 1, 16), dim=1) + torch.randn(64, 1, 1, 16)
    assert target_health(smooth)["drift"] < 0.1
    collapsed = torch.randn(64, 5, 1, 1) * torch.randn(16)  # one direction
    assert target_health(collapsed)["target_eff_rank"] < 1.5


def test_health_watch_warns_once_on_collapse_and_on_drift_growth():
    watch = HealthWatch(dim=64)
    assert watch.check(50, {"target_eff_rank": 30.0, "drift": 0.05}) == []
    assert watch.check(100, {"target_eff_rank": 30.0, "drift": 0.10}) == []  # the reference
    assert watch.check(200, {"target_eff_rank": 30.0, "drift": 0.19}) == []
    (drift,) = watch.check(300, {"target_eff_rank": 30.0, "drift": 0.25})
    assert "drift" in drift and "0.100" in drift
    (collapse,) = watch.check(400, {"target_eff_rank": 3.0, "drift": 0.3})
    assert "effective rank 3.0 of 64" in collapse
    assert watch.check(500, {"target_eff_rank": 2.0, "drift": 0.9}) == []  # each warning once


def test_health_watch_warns_once_when_the_targets_hardly_change():
    watch = HealthWatch(dim=64)
    assert watch.check(50, {"target_eff_rank": 40.0, "drift": 0.005}) == []  # before the reference step
    (static,) = watch.check(100, {"target_eff_rank": 40.0, "drift": 0.013})
    assert "0.0130 < 0.02" in static and "ignores what moves" in static
    assert watch.check(200, {"target_eff_rank": 40.0, "drift": 0.01}) == []
