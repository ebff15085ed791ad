"""Probes recover linear structure exactly and find nothing in noise."""

import numpy as np
import pytest

from worldmodel.eval.probe_suite import label_probes, latent_action_probes, state_probes
from worldmodel.eval.probes import auc, fit_ridge, r2_score, ridge_r2, split_clips


def test_split_is_deterministic_disjoint_and_complete():
    fit, test = split_clips(10, seed=3)
    again = split_clips(10, seed=3)
    assert np.array_equal(fit, again[0]) and np.array_equal(test, again[1])
    assert set(fit).isdisjoint(test) and sorted([*fit, *test]) == list(range(10))
    with pytest.raises(ValueError, match="at least 2 clips"):
        split_clips(1, seed=0)


def test_ridge_recovers_a_linear_state():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 16)) * rng.uniform(0.1, 10, size=16) + 5.0  # unequal scales, offset
    w = rng.normal(size=(16, 3))
    y = x @ w + np.array([1.0, -2.0, 3.0])
    r2 = ridge_r2(x[:200], y[:200], x[200:], y[200:], ridge=1e-6)
    assert r2.shape == (3,)
    assert np.all(r2 > 0.9999)
    probe = fit_ridge(x[:200], y[:200], ridge=1e-6)
    assert np.allclose(probe.predict(x[200:]), y[200:], atol=1e-3)


def test_ridge_scores_about_zero_on_noise():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(600, 8))
    y = rng.normal(size=(600, 2))
    r2 = ridge_r2(x[:300], y[:300], x[300:], y[300:], ridge=1e-2)
    assert np.all(np.abs(r2) < 0.1)


def test_r2_of_constant_target_is_nan():
    assert np.isnan(r2_score(np.ones((5, 1)), np.zeros((5, 1))))[0]


def test_auc_of_perfect_and_uninformative_scores():
    flags = np.array([0, 0, 1, 1])
    assert auc(np.array([0.1, 0.2, 0.8, 0.9]), flags) == 1.0
    assert auc(np.array([0.5, 0.5, 0.5, 0.5]), flags) == 0.5
    assert auc(np.array([0.1, 0.2]), np.array([1, 1])) is None


def _moving_points(num_clips=60, frames=6, dim=12, seed=0):
    """Latents that are a random linear embedding of (x, y); velocity = x_t - x_{t-1}."""
    rng = np.random.default_rng(seed)
    pos = np.cumsum(rng.normal(size=(num_clips, frames, 2)), axis=1)
    vel = np.concatenate([np.zeros((num_clips, 1, 2)), np.diff(pos, axis=1)], axis=1)
    state = np.concatenate([pos, vel], axis=-1)
    latents = pos @ rng.normal(size=(2, dim))
    return latents, state


def test_state_probes_read_positions_from_one_frame_and_velocity_from_pairs():
    latents, state = _moving_points()
    names = ["x", "y", "vx", "vy"]
    fit, test = split_clips(len(latents), seed=0)
    num_context = 3
    truth = latents[:, num_context:]
    noise = np.random.default_rng(5).normal(size=truth.shape)
    out = state_probes(latents, {"perfect": truth, "noise": noise}, state, names, num_context, fit, test, 1e-6)
    assert out["encoded"]["x"] > 0.999 and out["encoded"]["vx"] > 0.999
    assert out["encoded_single_frame"]["y"] > 0.999
    assert out["encoded_single_frame"]["vx"] < 0.9  # one frame cannot tell the velocity
    assert all(r > 0.999 for r in out["predicted"]["perfect"]["x"])
    assert len(out["predicted"]["noise"]["x"]) == 3
    assert all(r < 0.2 for r in out["predicted"]["noise"]["x"])


def test_label_probe_separates_classes():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=(40, 1))
    centres = rng.normal(size=(3, 5)) * 5
    pooled = centres[labels[:, 0]][:, None, :] + 0.1 * rng.normal(size=(40, 4, 5))
    fit, test = split_clips(40, seed=0)
    acc, notes = label_probes(pooled, labels, ["digit0"], fit, test)
    assert acc["digit0"] == 1.0 and notes == []
    acc, notes = label_probes(pooled, np.zeros_like(labels), ["digit0"], fit, test)
    assert acc["digit0"] is None and "single class" in notes[0]


def test_latent_action_probe_finds_events_in_the_innovation():
    rng = np.random.default_rng(0)
    clips, steps = 50, 5
    events = (rng.random((clips, steps)) < 0.3).astype(np.float32)
    action = events[..., None] * rng.normal(size=(clips, steps, 2))
    innovation = np.concatenate([action, 0.01 * rng.normal(size=(clips, steps, 2))], axis=-1)
    features = {
        "innovation": innovation,
        "mu_q": rng.normal(size=(clips, steps, 4)),  # carries nothing
    }
    kl = events * 3.0 + 0.5 + 0.1 * rng.random((clips, steps))
    fit, test = split_clips(clips, seed=0)
    out, notes = latent_action_probes(features, ("kl", kl), action, ["dvx0", "dvy0"], events, fit, test, 1e-3)
    assert notes == [] and out["headline"] == "innovation"
    inno, mu_q = out["features"]["innovation"], out["features"]["mu_q"]
    assert inno["action_r2_mean"] > 0.99
    assert mu_q["action_r2_mean"] < 0.2
    assert out["detector"]["name"] == "kl" and out["detector"]["event_auc"] == 1.0
    assert out["detector"]["mean_event"] > out["detector"]["mean_no_event"]
    assert inno["event_auc"] > 0.95 and inno["event_auc_norm"] > 0.95
    assert mu_q["event_auc"] < 0.75
    out, notes = latent_action_probes(features, ("kl", kl), None, None, None, fit, test, 1e-3)
    assert len(notes) == 2 and "action_r2" not in out["features"]["innovation"]
    assert "event_auc" not in out["detector"]


def test_kl_detector_is_split_where_the_commanded_action_changes():
    """Push-world actions are held commands: the KL's mean where the action changes from the transition before (a
    change of intent) and where it repeats, and its AUC for the change; the first transition has no 'before'."""
    rng = np.random.default_rng(0)
    clips, steps = 40, 6
    action = np.zeros((clips, steps, 2))
    for c in range(clips):
        for t in range(steps):
            action[c, t] = rng.normal(size=2) if t == 0 or rng.random() < 0.3 else action[c, t - 1]
    changed = np.zeros((clips, steps), bool)
    changed[:, 1:] = np.abs(np.diff(action, axis=1)).sum(-1) > 0
    kl = np.where(changed, 4.0, 1.0) + 0.1 * rng.random((clips, steps))
    kl[:, 0] = 100.0  # no previous action: must not count anywhere
    features = {"innovation": rng.normal(size=(clips, steps, 2))}
    fit, test = split_clips(clips, seed=0)
    events = changed.astype(np.float32)
    out, _ = latent_action_probes(features, ("kl", kl), action, ["ax", "ay"], events, fit, test, 1e-3)
    det = out["detector"]
    assert det["action_change_auc"] == 1.0
    assert 4.0 <= det["mean_action_change"] <= 4.1 and 1.0 <= det["mean_action_same"] <= 1.1
    out, _ = latent_action_probes(features, ("kl", kl), None, None, events, fit, test, 1e-3)
    assert "mean_action_change" not in out["detector"]
