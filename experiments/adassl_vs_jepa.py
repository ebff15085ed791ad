"""AdaSSL vs JEPA on a built-in world: same budget, same seeds, same held-out shards.

    python -m experiments.adassl_vs_jepa                # moving digits: 4 methods x 3 seeds (an hour or two on 2 cores)
    python -m experiments.adassl_vs_jepa --quick        # 1 seed, shorter training: a smoke run of the whole table
    python -m experiments.adassl_vs_jepa --still        # the still-digits diagnostic (digits rest, kicks are jumps)
    python -m experiments.adassl_vs_jepa --world push   # the push world: none, adassl_v, oracle (configs/push.yaml)
    python -m experiments.adassl_vs_jepa --world pusht  # PushT (gym-pusht, the pusht extra): configs/pusht.yaml

Trains `none` (plain JEPA), `adassl_v`, `adassl_s` and `oracle` (the velocity kicks as the action) with
`train.py`, evaluates each with `evaluate.py` on the same held-out shards, and prints one table (mean ± std over
seeds): rollout L1 at horizons 1, 4 and 8 on kicked and unkicked transitions; position, velocity and digit-identity
probes on encoded frames; the per-transition KL as a kick detector (AUC); the latent-action probe on the innovation.
The table is also written to OUT/table.md and OUT/table.json. "Kicked" transitions are the ones the data flags as
events: a velocity kick (moving digits), a change of the agent's intent or a contact beginning (push world), a change
of the scripted policy's intent (PushT); the oracle conditions on the data's actions (the kicks; the agent's
commanded velocity; the target position PushT's controller pulls the agent to).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from benchmarks.runs import ROOT, ensure_data, metric, new_parser, parse_with_overrides, probe_mean, train_and_evaluate

METHODS = ("none", "adassl_v", "adassl_s", "oracle")
# The worlds of agents with actions: their data folder under data/, config, and suffix of runs/bench.
WORLD_RUNS = {
    "push": {"data": "push_world", "config": "configs/push.yaml", "runs": "-push"},
    "pusht": {"data": "pusht", "config": "configs/pusht.yaml", "runs": "-pusht"},
}
HORIZONS = (1, 4, 8)

# (row label, method, mode in metrics.json)
ROLLOUT_ROWS = (
    ("copy-last", "none", "copy_last"),
    ("JEPA", "none", "prior_mean"),
    ("AdaSSL-V prior mean", "adassl_v", "prior_mean"),
    ("AdaSSL-V best-of-K", "adassl_v", "best_of_k"),
    ("AdaSSL-V posterior", "adassl_v", "posterior"),
    ("AdaSSL-S r=0", "adassl_s", "prior_mean"),
    ("AdaSSL-S best-of-K", "adassl_s", "best_of_k"),
    ("AdaSSL-S posterior", "adassl_s", "posterior"),
    ("oracle (true actions)", "oracle", "action"),
)


def _mean_std(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return "n/a"
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return f"{mean:.3f}"
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
    return f"{mean:.3f} ± {std:.3f}"


def build_table(results: dict[str, list[dict]], horizon: int) -> tuple[str, dict]:
    """Markdown table and its JSON twin from {method: [metrics.json per seed]}."""
    horizons = [h for h in HORIZONS if h <= horizon]
    table: dict = {"rollout_l1": {}, "rollout_l1_over_copy_last": {}, "representation": {}}
    head = " | ".join(f"h={h} {split}" for split in ("kicked", "unkicked") for h in horizons)
    lines: list[str] = []
    for key, title in (
        ("rollout_l1", "Rollout L1 (lower is better)"),
        (
            "rollout_l1_over_copy_last",
            "Rollout L1 over the same run's copy-last L1 (lower is better; each model has its own latent space, so "
            "this ratio is the comparable one; with model.pred_trains_encoder=false the methods share one encoder "
            "per seed and the plain L1 compares too)",
        ),
    ):
        lines += [f"### {title}", "", f"| model / mode | {head} |", "|---" * (1 + 2 * len(horizons)) + "|"]
        for label, method, mode in ROLLOUT_ROWS:
            if method not in results:
                continue
            cells, row = [], {}
            for split in ("event", "no_event"):
                for h in horizons:
                    vals = [metric(m, "modes", mode, split, "l1", h - 1) for m in results[method]]
                    if key == "rollout_l1_over_copy_last":
                        bases = [metric(m, "modes", "copy_last", split, "l1", h - 1) for m in results[method]]
                        vals = [None if v is None or not b else v / b for v, b in zip(vals, bases, strict=True)]
                    cells.append(_mean_std(vals))
                    row[f"{split}_h{h}"] = vals
            table[key][label] = row
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "### Representation and latent actions",
        "",
        "| model | position R² | x0/y0 R² | x1/y1 R² | velocity R² | digit accuracy | target eff. rank | reg. kicked "
        "| reg. unkicked | KL kick AUC | reg. action changes | reg. action repeats | innovation kick AUC "
        "| innovation action R² |",
        "|---" * 14 + "|",
    ]
    for method, runs in results.items():
        cols = {
            "position_r2": [probe_mean(m, "position") for m in runs],
            "position_r2_0": [probe_mean(m, "position", 0) for m in runs],
            "position_r2_1": [probe_mean(m, "position", 1) for m in runs],
            "velocity_r2": [probe_mean(m, "velocity") for m in runs],
            "digit_acc": [metric(m, "probes", "labels", "digit0") for m in runs],
            "target_eff_rank": [metric(m, "collapse", "target", "emb_eff_rank") for m in runs],
            "reg_kicked": [metric(m, "latent_action", "detector", "mean_event") for m in runs],
            "reg_unkicked": [metric(m, "latent_action", "detector", "mean_no_event") for m in runs],
            "kl_kick_auc": [metric(m, "latent_action", "detector", "event_auc") for m in runs],
            "reg_action_change": [metric(m, "latent_action", "detector", "mean_action_change") for m in runs],
            "reg_action_same": [metric(m, "latent_action", "detector", "mean_action_same") for m in runs],
            "innovation_kick_auc": [metric(m, "latent_action", "features", "innovation", "event_auc") for m in runs],
            "innovation_action_r2": [
                metric(m, "latent_action", "features", "innovation", "action_r2_mean") for m in runs
            ],
        }
        table["representation"][method] = cols
        lines.append(f"| {method} | " + " | ".join(_mean_std(v) for v in cols.values()) + " |")
    lines += [
        "",
        "reg. = the per-transition regulariser, mean over held-out kicked / unkicked transitions: KL(q || p) in nats "
        "for adassl_v, the expected number of active dims for adassl_s. KL kick AUC scores it as a kick detector. "
        "reg. action changes / repeats: the same where the action differs from the transition before (the push world: "
        "a change of intent, contact or not) and where it repeats it. x0/y0 and x1/y1: the first and second entity "
        "(the push world's agent and object). target eff. rank: of the target encoder's frame embeddings on the "
        "held-out clips.",
    ]
    return "\n".join(lines) + "\n", table


def build_parser() -> argparse.ArgumentParser:
    """The command line (config overrides are taken out first by `parse_with_overrides`)."""
    parser = new_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="1 seed and a short schedule (smoke run)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2; --quick: 0)")
    parser.add_argument(
        "--world", choices=("digits", "push", "pusht"), default="digits",
        help="moving digits (default), the push world (data/push_world, configs/push.yaml, runs/bench-push) or PushT "
        "(data/pusht, configs/pusht.yaml, runs/bench-pusht; needs the pusht extra)",
    )  # fmt: skip
    parser.add_argument("--methods", nargs="+", default=None, choices=METHODS,
                        help="default: all four on digits; none, adassl_v and oracle on push and pusht")  # fmt: skip
    parser.add_argument(
        "--config", default=None, help="default configs/demo.yaml (configs/push.yaml for push, pusht.yaml for pusht)"
    )
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default: the config's)")
    parser.add_argument(
        "--still",
        action="store_true",
        help="the diagnostic data where digits rest and a kick is a one-frame jump (copy-last is exact on every "
        "unkicked transition): data/still_digits, runs/bench-still[-quick]",
    )
    parser.add_argument(
        "--data", type=Path, default=None,
        help="data dir (default data/moving_digits, still_digits, push_world or pusht)",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path, default=None,
        help="runs and table (default runs/bench[-still|-push|-pusht][-quick])",
    )  # fmt: skip
    parser.add_argument("--horizon", type=int, default=8)
    parser.add_argument("--num-samples", type=int, default=8, help="K sampled futures for best-of-K")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = parse_with_overrides(build_parser(), argv)  # any key=value word: a config override for every run

    world = WORLD_RUNS.get(args.world)  # None: the moving digits
    if world and args.still:
        raise SystemExit(f"--still is a variant of the moving digits; it does not apply to --world {args.world}")
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    methods = args.methods or (["none", "adassl_v", "oracle"] if world else list(METHODS))
    config = args.config or (world["config"] if world else "configs/demo.yaml")
    name = world["data"] if world else "still_digits" if args.still else "moving_digits"
    data = args.data or ROOT / "data" / name
    variant = world["runs"] if world else "-still" if args.still else ""
    out = args.out or ROOT / "runs" / ("bench" + variant + ("-quick" if args.quick else ""))
    steps = args.steps or (300 if args.quick else None)
    ensure_data(data, num_videos=1024, val_videos=256, still=args.still, world=args.world)
    # horizon-long targets after the context; the predictor's frame embedding must cover the whole clip
    common = [f"data.num_target={args.horizon}", f"eval.horizon={args.horizon}", "model.max_frames=16", *args.overrides]
    if steps:
        common.append(f"train.steps={steps}")
    eval_args = ["--horizon", str(args.horizon), "--num-samples", str(args.num_samples)]

    results: dict[str, list[dict]] = {}
    for method in methods:
        for seed in seeds:
            run_dir = out / f"{method}-seed{seed}"
            overrides = [f"model.latent={method}", f"seed={seed}", *common]
            results.setdefault(method, []).append(train_and_evaluate(run_dir, config, overrides, data, eval_args))
    markdown, table = build_table(results, args.horizon)
    header = (
        f"Data {data.name}; methods {', '.join(methods)}; seeds {seeds}; config {config}"
        f"{f' with train.steps={steps}' if steps else ''}; horizon {args.horizon}; K={args.num_samples}.\n\n"
    )
    (out / "table.md").write_text(header + markdown)
    (out / "table.json").write_text(json.dumps({"seeds": seeds, "steps": steps, "table": table}, indent=1))
    print(header + markdown)
    print(f"written: {out / 'table.md'}")


if __name__ == "__main__":
    main()
