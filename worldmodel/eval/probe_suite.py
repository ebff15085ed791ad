"""The evaluator's probes over a whole eval set: state, labels and latent actions.

Inputs are numpy arrays gathered over all clips (C clips of T frames; pooled latents are the token grid pooled to
eval.probe_grid cells per side, `collect.grid_pool`):
all probes read the *target encoder's* space, because that is where the predictor's outputs live, so one probe
fitted on encoded true frames can be applied unchanged to predicted latents.

State probes use two feature sets:
- single frame: z_t (pooled latent of frame t), for every frame;
- pair: [z_{t-1}, z_t] (consecutive frames concatenated), for frames t >= 1. Velocities need two frames, and the
  pair also holds z_t, so the pair probe is the headline (`encoded`); `encoded_single_frame` shows what one frame
  alone keeps (positions should survive, velocities should not).
Predicted latents at step h are scored with the pair probe on [z_{h-1}, z_h], where z_0 is the true last context
frame and z_{h-1} for h > 1 is the model's own previous prediction.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from einops import rearrange
from sklearn.pipeline import Pipeline

from worldmodel.eval.probes import (
    auc,
    fit_ridge,
    logistic_accuracy,
    logistic_auc,
    nan_to_none,
    r2_score,
    ridge_r2,
)
from worldmodel.eval.rollout_metrics import split_masks, step_events

POSITION_NAME = re.compile(r"^[xy]\d*$")  # state columns that are positions (x0, y0, x1, ...: pixels in both worlds)


def pair_features(pooled: np.ndarray) -> np.ndarray:
    """pooled [C, T, D] -> pair features [C, T-1, 2D] for frames 1..T-1 (row t-1 is [z_{t-1}, z_t])."""
    return np.concatenate([pooled[:, :-1], pooled[:, 1:]], axis=-1)


def pair_probe(target_pooled: np.ndarray, state: np.ndarray, fit: np.ndarray, ridge: float) -> Pipeline:
    """The state probe: a ridge probe (`probes.fit_ridge`) from pair features [z_{t-1}, z_t] of the fit clips'
    true frames to their state at t. target_pooled: [C, T, F]; state: [C, T, S]; fit: clip indices. Returns the
    fitted pipeline (`.predict([m, 2F]) -> [m, S]`); `state_probes` reports it as `encoded` and reads the
    rollouts with it."""
    return fit_ridge(_rows(pair_features(target_pooled[fit])), _rows(state[fit, 1:]), ridge)


def _rows(x: np.ndarray) -> np.ndarray:
    return rearrange(x, "c t f -> (c t) f")


COPY_LAST_READ = "copy_last_read"  # position_error.splits row: the probe's reading of the last context frame, held


def state_probes(
    target_pooled: np.ndarray,
    predicted_pooled: dict[str, np.ndarray],
    state: np.ndarray,
    state_names: list[str],
    num_context: int,
    fit: np.ndarray,
    test: np.ndarray,
    ridge: float,
    events: np.ndarray | None = None,
) -> dict:
    """R² of ridge probes from pooled latents to ground-truth state, on held-out clips, and the position error.

    target_pooled: [C, T, D] target latents of the true frames; predicted_pooled: {mode: [C, H, D]};
    state: [C, T, S]; fit, test: clip indices; events: [C, T-1] per-transition 0/1 flags, or None. Returns
    {"encoded": {name: r2}, "encoded_single_frame": {name: r2}, "predicted": {mode: {name: [H]}},
    "position_error": {...} or absent}; an R² is None where the test state is constant. position_error (state
    columns named x, y, x0, y0, ...: positions, in pixels for the built-in worlds): {"names": [...], "encoded":
    RMSE of the pair probe on true frames, "predicted": {mode: [H]}, "splits": {mode: {split: {"rmse": [H],
    "count": [H]}}}}, the root mean squared error over those columns and the test clips, in state units: a
    yardstick every model shares, since each is read by a probe fitted on its own encoded true frames. `splits`
    has the same per split of `rollout_metrics.SPLITS` (only `all` without events; its `all` is `predicted`), and
    the row COPY_LAST_READ: the probe's reading of the last context frame (on its true pair, num_context >= 2)
    held for every step, copy-last in state space.
    """
    single = ridge_r2(
        _rows(target_pooled[fit]), _rows(state[fit]), _rows(target_pooled[test]), _rows(state[test]), ridge
    )
    pairs = pair_features(target_pooled)
    probe = pair_probe(target_pooled, state, fit, ridge)
    test_true = _rows(state[test, 1:])
    encoded_pred = probe.predict(_rows(pairs[test]))
    encoded = r2_score(test_true, encoded_pred)
    positions = [i for i, name in enumerate(state_names) if POSITION_NAME.match(name)]

    readings = {}  # mode -> the probe's reading of each test clip at each step [n, H, S]
    for mode, pred in predicted_pooled.items():
        seq = np.concatenate([target_pooled[:, num_context - 1 : num_context], pred], axis=1)  # [C, 1 + H, D]
        pair = pair_features(seq[test])  # [n, H, 2D]
        readings[mode] = probe.predict(_rows(pair)).reshape(*pair.shape[:2], -1)
    horizon = next(iter(readings.values())).shape[1] if readings else 0
    truth = state[test, num_context : num_context + horizon]  # [n, H, S]
    predicted = {}
    for mode, reading in readings.items():
        per_step = np.stack([r2_score(truth[:, h], reading[:, h]) for h in range(horizon)])  # [H, S]
        predicted[mode] = {name: nan_to_none(per_step[:, i]) for i, name in enumerate(state_names)}
    out = {
        "encoded": dict(zip(state_names, nan_to_none(encoded), strict=True)),
        "encoded_single_frame": dict(zip(state_names, nan_to_none(single), strict=True)),
        "predicted": predicted,
    }
    if not positions:
        return out
    if readings and num_context >= 2:  # row num_context - 2 of the pairs is [z_{Tc-2}, z_{Tc-1}]
        last = probe.predict(pairs[test, num_context - 2])  # [n, S]
        readings[COPY_LAST_READ] = np.repeat(last[:, None], horizon, axis=1)
    sq = {mode: ((r - truth)[..., positions] ** 2).mean(axis=-1) for mode, r in readings.items()}  # [n, H]
    step_event = None if events is None else step_events(torch.from_numpy(events[test]), num_context, horizon)
    masks = {split: m.numpy() for split, m in split_masks((len(test), horizon), step_event).items()}
    out["position_error"] = {
        "names": [state_names[i] for i in positions],
        "encoded": float(np.sqrt(((test_true - encoded_pred)[:, positions] ** 2).mean())),
        "predicted": {mode: np.sqrt(e.mean(axis=0)).tolist() for mode, e in sq.items() if mode in predicted},
        "splits": {mode: {split: _masked_rmse(e, m) for split, m in masks.items()} for mode, e in sq.items()},
    }
    return out


def _masked_rmse(sq: np.ndarray, mask: np.ndarray) -> dict[str, list]:
    """sq: per-clip squared errors [n, H]; mask: bool [n, H] -> {"rmse": [H] (None where no clip counts), "count":
    [H]}."""
    count = mask.sum(axis=0)
    total = np.where(mask, sq, 0.0).sum(axis=0)
    return {
        "rmse": [float(np.sqrt(t / c)) if c else None for t, c in zip(total, count, strict=True)],
        "count": [int(c) for c in count],
    }


def label_probes(
    target_pooled: np.ndarray, labels: np.ndarray, label_names: list[str], fit: np.ndarray, test: np.ndarray
) -> tuple[dict[str, float | None], list[str]]:
    """Held-out accuracy of logistic probes from single pooled frames to per-clip labels.

    target_pooled: [C, T, D] (the runner passes the mean over patches: identity is what, not where); labels: int
    [C, L]. Every frame of a clip is one sample carrying the clip's labels.
    Returns ({name: accuracy or None}, notes) with a note for each label that could not be probed.
    """
    frames = target_pooled.shape[1]
    out: dict[str, float | None] = {}
    notes = []
    for i, name in enumerate(label_names):
        y_fit = np.repeat(labels[fit, i], frames)
        y_test = np.repeat(labels[test, i], frames)
        out[name] = logistic_accuracy(_rows(target_pooled[fit]), y_fit, _rows(target_pooled[test]), y_test)
        if out[name] is None:
            notes.append(f"label probe {name}: the fit split holds a single class; accuracy not computed")
    return out, notes


def _action_change_split(scores: np.ndarray, action: np.ndarray) -> dict[str, float | None]:
    """The detector's mean on transitions whose action differs from the one before (on the push world: a change of
    intent, whatever the contacts) and on those whose action repeats it, and its AUC as a detector of the change.
    scores: [C, T-1]; action: [C, T-1, A]. The first transition of each clip has no previous action and is left out.
    """
    changed = np.abs(np.diff(action, axis=1)).sum(-1) > 1e-6  # [C, T-2]
    s = scores[:, 1:]
    return {
        "action_change_auc": auc(s.reshape(-1), changed.reshape(-1)),
        "mean_action_change": float(s[changed].mean()) if changed.any() else None,
        "mean_action_same": float(s[~changed].mean()) if (~changed).any() else None,
    }


def latent_action_probes(
    features: dict[str, np.ndarray],
    detector: tuple[str, np.ndarray] | None,
    action: np.ndarray | None,
    action_names: list[str] | None,
    events: np.ndarray | None,
    fit: np.ndarray,
    test: np.ndarray,
    ridge: float,
) -> tuple[dict, list[str]]:
    """How well the inferred per-transition latent reads out the ground-truth transition signal.

    features: {name: [C, T-1, F]} per-transition read-outs of model.infer_latents, the headline first (adassl_v:
    the innovation (mu_q - mu_p) / sigma_p, then the raw posterior mean mu_q); detector: (name, scores [C, T-1])
    scored directly as an event detector (adassl_v: the per-transition KL), or None; action: [C, T-1, A] or None;
    events: [C, T-1] or None.

    Per feature: `action_r2` (ridge R² per action column, held out) and its mean; `event_auc`, the held-out AUC of
    a logistic detector of the event flag on [x, x²] (a kick of random direction shows in the magnitude, which a
    linear read-out of x cannot see); `event_auc_norm`, the AUC of ||x|| itself (nothing fitted, all
    transitions). The detector gets its AUC over all transitions (nothing fitted) and its mean on event and
    no-event transitions (a health check: a latent that carries the events has a bimodal KL, high on events); with
    actions, also its mean where the action changes and where it repeats, and its AUC for the change.

    Returns ({"headline": name, "features": {name: {...}}, "detector": {"name": ..., ...} or None}, notes).
    """
    out: dict = {"headline": next(iter(features)), "features": {}, "detector": None}
    notes = []
    for name, x in features.items():
        entry: dict = {}
        if action is not None:
            r2 = ridge_r2(_rows(x[fit]), _rows(action[fit]), _rows(x[test]), _rows(action[test]), ridge)
            names = action_names or [f"action{i}" for i in range(action.shape[-1])]
            entry["action_r2"] = dict(zip(names, nan_to_none(r2), strict=True))
            entry["action_r2_mean"] = None if np.isnan(r2).all() else float(np.nanmean(r2))
        if events is not None:
            quad = np.concatenate([x, x**2], axis=-1)
            entry["event_auc"] = logistic_auc(
                _rows(quad[fit]), events[fit].reshape(-1), _rows(quad[test]), events[test].reshape(-1)
            )
            entry["event_auc_norm"] = auc(np.linalg.norm(x, axis=-1).reshape(-1), events.reshape(-1))
        out["features"][name] = entry
    if action is None:
        notes.append("latent-action probe: the shards have no `action` field; action R² skipped")
    if events is None:
        notes.append("latent-action probe: the shards have no `events` field; event AUCs skipped")
    if detector is not None:
        name, scores = detector
        entry = {"name": name, "mean": float(scores.mean())}
        if events is not None:
            flags = events > 0.5
            entry["event_auc"] = auc(scores.reshape(-1), flags.reshape(-1))
            entry["mean_event"] = float(scores[flags].mean()) if flags.any() else None
            entry["mean_no_event"] = float(scores[~flags].mean()) if (~flags).any() else None
        if action is not None and action.shape[1] >= 2:
            entry.update(_action_change_split(scores, action))
        out["detector"] = entry
    return out, notes
