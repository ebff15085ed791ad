"""Where rollouts break: the norm ratio and rank of predicted latents, and probe-read positions per split."""

import numpy as np
import pytest
import torch
from PIL import Image

from worldmodel.eval.collect import pool
from worldmodel.eval.plots import plot_rollout_health
from worldmodel.eval.probe_suite import COPY_LAST_READ, pair_features, pair_probe, state_probes
from worldmodel.eval.probes import split_clips
from worldmodel.eval.report import render_report
from worldmodel.eval.rollout_metrics import SPLITS, ErrorAccumulator, rollout_health, step_events


def _health(preds: dict[str, torch.Tensor], target: torch.Tensor) -> dict:
    """rollout_health of token grids [C, H, N, D], with the mean squares and patch means collect.py keeps."""
    sq = {mode: x.square().mean(dim=(-2, -1)).numpy() for mode, x in preds.items()}
    mean = {mode: pool(x).numpy() for mode, x in preds.items()}
    return rollout_health(sq, mean, target.square().mean(dim=(-2, -1)).numpy(), pool(target).numpy())


def test_a_perfect_rollout_keeps_norm_and_rank_and_a_shrinking_one_loses_norm():
    target = torch.randn(32, 4, 9, 16, generator=torch.Generator().manual_seed(0))  # [C, H, N, D]
    shrink = torch.tensor([1.0, 0.8, 0.5, 0.2]).view(1, 4, 1, 1)
    out = _health({"perfect": target, "shrinking": target * shrink}, target)
    assert out["modes"]["perfect"]["norm_ratio"] == pytest.approx([1.0] * 4, abs=1e-12)
    assert out["modes"]["perfect"]["eff_rank"] == out["target"]["eff_rank"]
    assert all(1.0 < r <= 16.0 for r in out["target"]["eff_rank"])
    assert out["modes"]["shrinking"]["norm_ratio"] == pytest.approx([1.0, 0.8, 0.5, 0.2], rel=1e-6)
    # a scale does not change the rank (RankMe normalises the singular values)
    assert out["modes"]["shrinking"]["eff_rank"] == pytest.approx(out["target"]["eff_rank"], rel=1e-4)
    assert out["target"]["rms"] == pytest.approx(target.square().mean(dim=(0, 2, 3)).sqrt().tolist(), rel=1e-6)


def test_a_rollout_that_converges_to_one_future_loses_rank_and_a_non_finite_one_gives_none():
    target = torch.randn(32, 3, 4, 8, generator=torch.Generator().manual_seed(1))
    blend = torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1)  # towards one clip's future, the same for every clip
    converging = (1 - blend) * target + blend * target[:1]
    broken = target.clone()
    broken[0, 2, 0, 0] = float("nan")
    out = _health({"converging": converging, "broken": broken}, target)
    rank, reference = out["modes"]["converging"]["eff_rank"], out["target"]["eff_rank"]
    assert rank[0] == pytest.approx(reference[0]) and rank[1] < reference[1] and rank[2] == pytest.approx(1.0, abs=1e-3)
    assert out["modes"]["broken"]["norm_ratio"][2] is None and out["modes"]["broken"]["eff_rank"][2] is None
    assert out["modes"]["broken"]["norm_ratio"][0] == pytest.approx(1.0)


def _moving_squares(num_clips: int = 200, frames: int = 7, side: int = 16, seed: int = 0):
    """A 2x2 square moving at constant velocity (-1, 0 or 1 px per frame in x and y) on a side x side canvas, from a
    start far enough from the walls for 7 frames: features [C, T, side*side] (the flattened picture, standing in
    for a probe's pooled latents) and state [C, T, 4] = (x, y, vx, vy), (x, y) the square's top-left corner."""
    rng = np.random.default_rng(seed)
    start = rng.integers(6, side - 7, size=(num_clips, 1, 2))
    velocity = rng.integers(-1, 2, size=(num_clips, 1, 2))
    pos = start + velocity * np.arange(frames)[None, :, None]  # [C, T, 2]
    pictures = np.zeros((num_clips, frames, side, side))
    for c in range(num_clips):
        for t in range(frames):
            x, y = pos[c, t]
            pictures[c, t, y : y + 2, x : x + 2] = 1.0
    state = np.concatenate([pos, np.broadcast_to(velocity, pos.shape)], axis=-1).astype(np.float64)
    return pictures.reshape(num_clips, frames, -1), state


def test_probe_reads_a_perfect_forecast_as_well_as_true_frames_and_better_than_copy_last():
    features, state = _moving_squares()
    num_context, horizon, ridge = 3, 4, 1e-3
    fit, test = split_clips(len(features), seed=0)
    perfect = features[:, num_context : num_context + horizon]
    out = state_probes(features, {"perfect": perfect}, state, ["x", "y", "vx", "vy"], num_context, fit, test, ridge)[
        "position_error"
    ]
    assert out["names"] == ["x", "y"] and set(out["splits"]) == {"perfect", COPY_LAST_READ}
    assert set(out["splits"]["perfect"]) == {"all"}  # no events: no split
    error = out["splits"]["perfect"]["all"]["rmse"]
    assert error == pytest.approx(out["predicted"]["perfect"])
    # the probe's own error on the true frames of those steps (the pair [z_{t-1}, z_t] ending at frame Tc + h - 1)
    probe = pair_probe(features, state, fit, ridge)
    pairs = pair_features(features[test])
    for h in range(1, horizon + 1):
        frame = num_context + h - 1
        own = probe.predict(pairs[:, frame - 1])[:, :2] - state[test, frame, :2]
        assert error[h - 1] == pytest.approx(np.sqrt((own**2).mean()), rel=1e-9)
    # copy-last in state space: the last context frame's reading, wrong by |v| h per axis on moving squares
    copy = out["splits"][COPY_LAST_READ]["all"]["rmse"]
    assert all(e < c for e, c in zip(error, copy, strict=True)) and copy == sorted(copy)
    assert copy[-1] > 3.0  # E|v| h with v uniform on {-1, 0, 1}: sqrt(2/3) 4 = 3.27 px at h = 4


def test_position_error_splits_count_steps_as_the_rollout_errors_do():
    features, state = _moving_squares(num_clips=40, frames=6)
    num_context, horizon = 2, 3  # step h is produced by transition num_context - 2 + h: columns 1..3 of events
    fit, test = split_clips(len(features), seed=1)
    events = np.zeros((len(features), 5))
    hand = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]])  # transitions 1..3 of 5 test clips
    events[test[: len(hand)], 1:4] = hand
    events[test[: len(hand)], 0] = 1  # a kick inside the context counts for no step
    preds = {"perfect": features[:, num_context : num_context + horizon]}
    out = state_probes(features, preds, state[..., :2], ["x0", "y0"], num_context, fit, test, 1e-3, events)
    splits = out["position_error"]["splits"]["perfect"]
    n = len(test)
    assert splits["event"]["count"] == [2, 2, 2]
    assert splits["no_event"]["count"] == [n - 2, n - 2, n - 2]
    assert splits["no_event_so_far"]["count"] == [n - 2, n - 3, n - 4]
    assert splits["all"]["count"] == [n] * 3 and set(splits) == set(SPLITS)
    accumulator = ErrorAccumulator(horizon)
    zeros = {name: torch.zeros(n, horizon) for name in ("l1", "l2", "cos")}
    accumulator.add("m", zeros, step_events(torch.from_numpy(events[test]), num_context, horizon))
    for split, entry in accumulator.result()["m"].items():
        assert splits[split]["count"] == entry["count"]
        assert out["position_error"]["splits"][COPY_LAST_READ][split]["count"] == entry["count"]


def test_report_section_and_plot(tmp_path):
    horizon = 8
    steps = [float(h) for h in range(1, horizon + 1)]
    health = {
        "num_clips": 16,
        "target": {"rms": [1.0] * horizon, "eff_rank": [5.0] * horizon},
        "modes": {"copy_last": {"norm_ratio": [1.0] * horizon, "eff_rank": [5.0] * horizon},
                  "prediction": {"norm_ratio": [1 - h / 10 for h in steps], "eff_rank": [None, *steps[1:]]}},
    }  # fmt: skip
    cell = {"rmse": steps, "count": [4] * horizon}
    position = {mode: {"all": cell, "no_event_so_far": cell} for mode in ("copy_last", COPY_LAST_READ, "prediction")}
    plot_rollout_health(health, position, tmp_path / "with_positions.png")
    plot_rollout_health(health, None, tmp_path / "without.png")
    for name in ("with_positions.png", "without.png"):
        with Image.open(tmp_path / name) as image:
            image.verify()
    metrics = {
        "run": "r", "finished": True, "checkpoint_step": 1, "latent": "none", "shards": "s",
        "num_clips": 16, "num_context": 2, "horizon": horizon, "num_samples": 1, "modes": {}, "rollout_health": health,
        "probes": {"num_fit_clips": 8, "num_test_clips": 8,
                   "position_error": {"names": ["x0", "y0"], "encoded": 0.5, "splits": position}},
    }  # fmt: skip
    report = render_report(metrics)
    section = report[report.index("## Where rollouts break") :]
    assert "| mode | h=1 | h=2 | h=4 | h=8 |" in section and "h=3" not in section
    assert "| `prediction` | 0.9000 | 0.8000 | 0.6000 | 0.2000 |" in section
    assert "### Probe-read position error, no-event-so-far steps" in section and "`copy_last_read`" in section
