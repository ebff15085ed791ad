"""experiments/predictability.py: how much of an embedding's motion a constant-velocity or linear guess extrapolates."""

import numpy as np

from experiments.predictability import guesses


def _tracks(num_clips: int = 64, num_frames: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Positions [C, T, 2] of points moving at constant velocity, but for a new velocity at flagged transitions."""
    rng = np.random.default_rng(seed)
    events = rng.random((num_clips, num_frames - 1)) < 0.15
    pos = np.zeros((num_clips, num_frames, 2))
    pos[:, 0] = rng.uniform(0, 32, (num_clips, 2))
    vel = rng.uniform(-2, 2, (num_clips, 2))
    for t in range(num_frames - 1):
        vel = np.where(events[:, t, None], rng.uniform(-2, 2, (num_clips, 2)), vel)
        pos[:, t + 1] = pos[:, t] + vel
    return pos, events.astype(np.int64)


def test_smooth_motion_is_extrapolated_and_its_changes_detected():
    """Constant-velocity tracks: both guesses are exact on unkicked transitions, and the linear guess's error flags
    the changes of velocity."""
    pos, events = _tracks()
    g = guesses(pos, events)
    assert g["const_vel"] < 1e-6 and g["linear"] < 0.05
    assert g["const_vel_event"] > 0.3 and g["linear_event_auc"] > 0.95


def test_an_embedding_that_moves_in_steps_cannot_be_extrapolated():
    """The same tracks read through 8-px steps (a keypoint that only knows which patch the point is in) follow the
    positions but not the motion: neither guess beats copying, and the changes of velocity hide in the steps."""
    pos, events = _tracks()
    steps = np.floor(pos / 8.0)
    assert np.corrcoef(steps[..., 0].ravel(), pos[..., 0].ravel())[0, 1] > 0.95  # it tracks where the point is
    g = guesses(steps, events)
    assert g["const_vel"] > 1.0 and g["linear"] > 0.8
    assert g["linear_event_auc"] < 0.7
    assert guesses(pos, None)["linear_event_auc"] is None
