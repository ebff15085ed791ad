"""The one-recipe ablation: JEPA (model.latent=none) on a built-in world with one model section and the candidate
terms switched on one at a time, scored by what the recipe must deliver.

    python -m experiments.recipe_ablation [--world push|pusht|digits] [--rows NAME ...] [--seed 0] [key=value ...]

Every row trains `configs/demo.yaml` (`configs/pusht.yaml` on PushT: the same model at 64 px) with its overrides for
the config's 1000 steps and evaluates it (runs/recipe-WORLD/ROW; an existing evaluated run is reused). The table: the
one-step, h=4 and h=8 forecast over copy-last on transitions without an event, the linear probe R² of the first and
second tracked thing's position (push and PushT: the agent and the object; digits: the digit), and the target
encoder's effective rank. docs/results.md ("One recipe") has the measured table and what each row changed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.runs import ROOT, ensure_data, metric, new_parser, parse_with_overrides, train_and_evaluate

ONLINE = ["model.target=online", "model.sigreg_weight=0.09"]
ROWS: dict[str, list[str]] = {
    "ema": [],  # the demo recipe: EMA target, no anti-collapse term
    "ema+sigreg": ["model.sigreg_weight=0.09"],
    "online+sigreg": ONLINE,  # LeWM: no EMA, no stop-gradient
    "ema+contrast": ["model.clip_contrast=1"],
    "online+sigreg+contrast": [*ONLINE, "model.clip_contrast=1"],
    "online+sigreg+contrast3": [*ONLINE, "model.clip_contrast=3"],
    "online+sigreg+contrast0.3": [*ONLINE, "model.clip_contrast=0.3"],
    "online+sigreg+contrast(targets only)": [*ONLINE, "model.clip_contrast=1", "model.clip_contrast_detach=true"],
    "online+sigreg+contrast(no input neg.)": [*ONLINE, "model.clip_contrast=1", "model.clip_contrast_no_input=true"],
    "online+sigreg+contrast+keypoints": [
        *ONLINE,
        "model.clip_contrast=1",
        "model.frame_head=keypoints",
        "model.frame_dim=32",
        "model.keypoint_cells=8",
    ],  # fmt: skip
}
WORLD_DATA = {"push": ("push_world", "configs/demo.yaml"), "pusht": ("pusht", "configs/pusht.yaml")}
WORLD_DATA["digits"] = ("moving_digits", "configs/demo.yaml")


def row_figures(metrics: dict) -> dict[str, float | None]:
    """The table's cells from one run's metrics.json."""

    def ratio(h: int) -> float | None:
        pred = metric(metrics, "modes", "prediction", "no_event", "l1", h - 1)
        base = metric(metrics, "modes", "copy_last", "no_event", "l1", h - 1)
        return None if pred is None or not base else pred / base

    encoded = metrics.get("probes", {}).get("encoded", {}) or {}

    def r2(i: int) -> float | None:
        vals = [encoded.get(f"{axis}{i}") for axis in "xy"]
        return None if None in vals else sum(vals) / 2

    return {
        "h1": ratio(1), "h4": ratio(4), "h8": ratio(8), "r2_0": r2(0), "r2_1": r2(1),
        "rank": metric(metrics, "collapse", "target", "target_eff_rank"),
    }  # fmt: skip


def _cell(key: str, value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}" if key == "rank" else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = new_parser(__doc__)
    parser.add_argument("--world", choices=sorted(WORLD_DATA), default="push")
    parser.add_argument("--rows", nargs="+", choices=sorted(ROWS), default=list(ROWS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="default runs/recipe-WORLD")
    args = parse_with_overrides(parser, argv)
    name, config = WORLD_DATA[args.world]
    data = ROOT / "data" / name
    ensure_data(data, num_videos=1024, val_videos=256, world=args.world)
    out = args.out or ROOT / "runs" / f"recipe-{args.world}"
    lines = [
        f"{args.world}, seed {args.seed}, {config} {' '.join(args.overrides)}",
        "| row | h=1 | h=4 | h=8 (of copy-last, no event) | R² pos. 0 | R² pos. 1 | target eff. rank |",
        "|---|---|---|---|---|---|---|",
    ]
    table = {}
    for row in args.rows:
        overrides = ["model.latent=none", f"seed={args.seed}", *ROWS[row], *args.overrides]
        folder = "".join(c if c.isalnum() or c in ".-" else "_" for c in row)
        table[row] = row_figures(train_and_evaluate(out / folder, config, overrides, data, []))
        cells = " | ".join(_cell(key, value) for key, value in table[row].items())
        lines.append(f"| {row} | {cells} |")
    print("\n".join(lines))
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "table.json").write_text(json.dumps(table, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
