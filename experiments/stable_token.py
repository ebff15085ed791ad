"""The stable-token regression check of the recipe: does an episode-constant patch take the embedding off what moves?

    python -m experiments.stable_token [--world push] [--config CONFIG] [--seed 0] [--patch 16] [key=value ...]

A JEPA (model.latent=none) is trained with the same config and seed on a built-in world twice: as generated, and
with an episode-constant square of `--patch` px pasted into a corner of every frame (`--stable-patch` of the
world generators: a random colour per video, the world otherwise identical). LeWM with SIGReg loses nearly all of
its PushT planning success to one such token; Sobal et al. 2022's JEPA encodes a still dot and ignores the moving
ones. A recipe passes when, with the patch, the probe R² of the agent's position (x0, y0)
falls by at most 0.1 and the one-step forecast stays at or below 0.9 of copy-last (transitions without an event).
Prints the table, writes OUT/stable_token.json, exits 1 when the recipe fails.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.runs import (
    ROOT,
    WORLDS,
    ensure_data,
    metric,
    new_parser,
    parse_with_overrides,
    probe_mean,
    run,
    train_and_evaluate,
)

MAX_R2_DROP = 0.1  # the agent's position R² may fall by this much with the patch
MAX_FORECAST = 0.9  # of copy-last, h = 1, transitions without an event


def forecast_ratio(metrics: dict) -> float | None:
    """The one-step L1 of the deterministic forecast over copy-last's, on transitions without an event."""
    mode = "prediction" if "prediction" in metrics.get("modes", {}) else "prior_mean"
    pred = metric(metrics, "modes", mode, "no_event", "l1", 0)
    base = metric(metrics, "modes", "copy_last", "no_event", "l1", 0)
    return None if pred is None or not base else pred / base


def summary(metrics: dict) -> dict[str, float | None]:
    """What the check reads from a run's metrics.json."""
    return {
        "agent_r2": probe_mean(metrics, "position", 0),
        "object_r2": probe_mean(metrics, "position", 1),
        "forecast_h1": forecast_ratio(metrics),
        "target_eff_rank": metric(metrics, "collapse", "target", "target_eff_rank"),
    }


def verdict(plain: dict, patched: dict) -> list[str]:
    """The failed criteria (empty: the recipe passes)."""
    failures = []
    if plain["agent_r2"] is None or patched["agent_r2"] is None:
        return ["no agent position probe in the metrics (does the world record state x0, y0?)"]
    if plain["agent_r2"] - patched["agent_r2"] > MAX_R2_DROP:
        failures.append(f"agent R² fell {plain['agent_r2']:.3f} -> {patched['agent_r2']:.3f} (> {MAX_R2_DROP})")
    if patched["forecast_h1"] is None or patched["forecast_h1"] > MAX_FORECAST:
        failures.append(f"forecast with the patch {patched['forecast_h1']} of copy-last (> {MAX_FORECAST})")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = new_parser(__doc__)
    parser.add_argument("--world", choices=sorted(set(WORLDS) - {"digits"}), default="push")
    parser.add_argument("--config", default=None, help="default configs/push.yaml (push) or configs/pusht.yaml")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--patch", type=int, default=16, help="side of the pasted square, px of the 64-px canvas")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    parser.add_argument("--out", type=Path, default=None, help="default runs/stable-token-WORLD")
    args = parse_with_overrides(parser, argv)
    names = {"push": "push_world", "pusht": "pusht"}
    config = args.config or f"configs/{args.world}.yaml"
    plain_data = ROOT / "data" / names[args.world]
    patch_data = ROOT / "data" / f"{names[args.world]}-stable{args.patch}"
    ensure_data(plain_data, num_videos=1024, val_videos=256, world=args.world)
    stamp = patch_data / "world.json"
    if not stamp.exists() or json.loads(stamp.read_text()).get("stable_patch") != args.patch:
        run([
            sys.executable, "-m", WORLDS[args.world], "--output", str(patch_data), "--num-videos", "1024",
            "--val-videos", "256", "--seed", "0", "--stable-patch", str(args.patch),
        ])  # fmt: skip
    out = args.out or ROOT / "runs" / f"stable-token-{args.world}"
    overrides = ["model.latent=none", f"seed={args.seed}", *args.overrides]
    if args.steps:
        overrides.append(f"train.steps={args.steps}")
    results = {
        name: summary(train_and_evaluate(out / name, config, overrides, data, []))
        for name, data in (("plain", plain_data), ("patch", patch_data))
    }
    failures = verdict(results["plain"], results["patch"])
    print(f"\nstable-token check, {args.world}, {config} {' '.join(args.overrides)}, seed {args.seed}")
    print("| data | agent R² | object R² | forecast h=1 / copy-last | target eff. rank |\n|---|---|---|---|---|")
    for name, row in results.items():
        cells = " | ".join("-" if row[k] is None else f"{row[k]:.3f}" for k in row)
        print(f"| {name} | {cells} |")
    print("PASS" if not failures else "FAIL: " + "; ".join(failures))
    out.mkdir(parents=True, exist_ok=True)
    (out / "stable_token.json").write_text(json.dumps({"results": results, "failures": failures}, indent=1) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
