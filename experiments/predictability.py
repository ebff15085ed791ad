"""How much of a trained run's embedding motion can any predictor extrapolate? One run, one table.

    python -m experiments.predictability --run runs/push/default [--shards GLOB] [--num-clips 256]

A world model can only forecast below copy-last if consecutive embeddings move the way the things in the frames
do. This measures it without the run's predictor: on held-out clips, for every transition t -> t+1 with two
frames of history, the L1 of three guesses of frame t+1's target embedding,

- copy-last: z_t;
- constant velocity: z_t + (z_t - z_{t-1});
- linear: a ridge map from [z_t, z_t - z_{t-1}] to z_{t+1} - z_t, fitted on the unkicked transitions of half of the
  clips, scored on the other half,

each over copy-last, on unkicked transitions and on events, and the AUC of the linear guess's error as an event
detector. The same three guesses on the shards' ground-truth positions (the `state` columns x*, y*) say what the
world allows. An embedding that tracks the positions (probe R² near 1) but whose constant-velocity guess is no
better than copying moves in steps, not with the things it tracks: its motion is quantisation noise that no
predictor, and no AdaSSL latent, can tell from a real change (docs/results.md, "The push world").
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from data_pipeline.stream import make_eval_loader
from worldmodel.eval.collect import pool
from worldmodel.eval.probes import auc, fit_ridge, split_clips
from worldmodel.eval.runner import load_run


def guesses(z: np.ndarray, events: np.ndarray | None, seed: int = 0) -> dict[str, float | None]:
    """z: [C, T, D] per-clip sequences; events: [C, T-1] flags of transitions t -> t+1 (or None) -> the ratios.

    Keys: copy_l1 (unkicked), const_vel and linear over copy-last on unkicked transitions and on events (`_event`),
    linear_event_auc (the linear guess's L1 as an event score; None without events or without both kinds).
    """
    if z.shape[1] < 3:
        raise ValueError(f"predictability needs clips of at least 3 frames (two of history), got T={z.shape[1]}")
    prev, now, nxt = z[:, :-2], z[:, 1:-1], z[:, 2:]
    flags = np.zeros(now.shape[:2], bool) if events is None else events[:, 1:].astype(bool)
    copy = np.abs(nxt - now).mean(-1)  # [C, T-2]
    const_vel = np.abs(nxt - (2 * now - prev)).mean(-1)
    fit, test = split_clips(len(z), seed)
    x, y = np.concatenate([now, now - prev], -1), nxt - now
    calm = ~flags[fit]  # fitted on unkicked transitions: an event's new motion is not in [z_t, z_t - z_{t-1}]
    ridge = fit_ridge(x[fit][calm], y[fit][calm], ridge=1e-3)
    linear = np.full_like(copy, np.nan)
    linear[test] = np.abs(y[test] - ridge.predict(x[test].reshape(-1, x.shape[-1])).reshape(y[test].shape)).mean(-1)

    def over_copy(err: np.ndarray, mask: np.ndarray) -> float | None:
        mask = mask & ~np.isnan(err)
        return float(err[mask].mean() / copy[mask].mean()) if mask.any() and copy[mask].mean() > 0 else None

    out = {"copy_l1": float(copy[~flags].mean())}
    for name, err in (("const_vel", const_vel), ("linear", linear)):
        out[name] = over_copy(err, ~flags)
        out[f"{name}_event"] = over_copy(err, flags)
    out["linear_event_auc"] = auc(linear[test].ravel(), flags[test].ravel()) if events is not None else None
    return out


@torch.no_grad()
def collect(run: str, shards: str | None, num_clips: int) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Target embeddings [C, T, D] of held-out clips (pooled over patches) and, when the shards carry them, the
    ground-truth positions [C, T, P] (state columns x*, y*); events [C, T-1] or None."""
    cfg, model, _, _ = load_run(run, torch.device("cpu"))
    loader = make_eval_loader(cfg.data, shards or cfg.data.val_shards, num_clips=num_clips, seed=0)
    target, state, events, names = [], [], [], None
    for batch in loader:
        target.append(pool(model.encode_target(batch["frames"])).numpy())
        if "state" in batch:
            state.append(batch["state"].numpy())
            names = batch.get("state_names") or names
        if "events" in batch:
            events.append(batch["events"].numpy())
    spaces = {"target embedding": np.concatenate(target)}
    if state:
        cols = [i for i, n in enumerate(names or []) if n.rstrip("0123456789") in ("x", "y")]
        if cols:
            spaces["ground-truth positions"] = np.concatenate(state)[..., cols]
    return spaces, np.concatenate(events) if events else None


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def table(spaces: dict[str, np.ndarray], events: np.ndarray | None) -> str:
    """The markdown table of `guesses` for every space."""
    lines = [
        "| space | constant velocity / copy-last, unkicked | events | linear / copy-last, unkicked | events "
        "| linear error as event detector (AUC) |",
        "|---|---|---|---|---|---|",
    ]
    for name, z in spaces.items():
        g = guesses(z, events)
        cells = [g["const_vel"], g["const_vel_event"], g["linear"], g["linear_event"], g["linear_event_auc"]]
        lines.append(f"| {name} | " + " | ".join(_fmt(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a run directory written by train.py")
    parser.add_argument("--shards", default=None, help="held-out shards (default: the run config's data.val_shards)")
    parser.add_argument("--num-clips", type=int, default=256)
    args = parser.parse_args(argv)
    spaces, events = collect(args.run, args.shards, args.num_clips)
    print(f"{args.run}: {len(spaces['target embedding'])} held-out clips")
    print(table(spaces, events))
    return 0


if __name__ == "__main__":
    sys.exit(main())
