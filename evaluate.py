"""Rollout evaluation of a trained run, or a side-by-side comparison of evaluated runs.

    python evaluate.py --run RUN_DIR --shards GLOB [--horizon H --num-samples K --num-clips N --batch-size B --seed S]
                       [--pixels] [--skip-evaluated]
    python evaluate.py --compare RUN_A RUN_B ... [--output DIR]

The first writes RUN_DIR/eval/metrics.json (schema: docs/metrics_schema.md), report.md and PNG figures; the second
writes DIR/compare.md and DIR/compare.json (DIR defaults to RUN_A's parent folder /compare). --pixels also
decodes the rollouts through the run's pixel decoder (trained on the run's training shards the first time, then
reused from RUN_DIR/pixel_decoder) and scores them in pixel space: PSNR, SSIM and MSE in the same units for
every model, decoded strips and GIFs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from worldmodel.eval import EvaluationError
from worldmodel.eval.compare import compare_runs, render_headline
from worldmodel.eval.runner import evaluate_run, evaluated_final
from worldmodel.run.config import ConfigError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; exactly one of --run and --compare."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--run", help="run directory written by train.py (config.yaml + checkpoints/)")
    what.add_argument("--compare", nargs="+", metavar="RUN_DIR", help="evaluated run directories to put side by side")
    parser.add_argument("--shards", help="held-out shards: glob, brace pattern, URL or pipe: (required with --run)")
    parser.add_argument("--horizon", type=int, help="steps to predict (default: the run's eval.horizon)")
    parser.add_argument("--num-samples", type=int, help="K sampled futures (default: eval.num_samples)")
    parser.add_argument("--num-clips", type=int, help="held-out clips to evaluate (default: eval.num_clips)")
    parser.add_argument("--batch-size", type=int, help="clips per batch (default: eval.batch_size)")
    parser.add_argument("--seed", type=int, default=0, help="clip selection, probe split and prior samples")
    parser.add_argument("--output", help="--compare: output folder (default: RUN_A/../compare)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--pixels",
        action="store_true",
        help="--run: decode rollouts with the run's pixel decoder (trained first if missing) and add pixel metrics",
    )
    parser.add_argument(
        "--skip-evaluated",
        action="store_true",
        help="--run: do nothing if RUN_DIR/eval/metrics.json already evaluates the finished run's final checkpoint "
        "(with pixel metrics, if --pixels)",
    )
    args = parser.parse_args(argv)
    if args.run and not args.shards:
        parser.error("--run needs --shards (the held-out shards to evaluate on, e.g. 'data/moving_digits/val/*.tar')")
    for name in ("horizon", "num_samples", "num_clips", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (EvaluationError, ConfigError) as err:
        print(f"evaluate.py: error: {err}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    """Evaluate one run or compare several, as the parsed arguments say."""
    if args.compare:
        output = Path(args.output) if args.output else Path(args.compare[0]).parent / "compare"
        result = compare_runs(args.compare, output)
        for warning in result["warnings"]:
            print(f"warning: {warning}", file=sys.stderr)
        print(render_headline(result["headline"]))
        print(f"wrote {output / 'compare.md'} and {output / 'compare.json'}")
        return 0
    if args.skip_evaluated and evaluated_final(args.run, pixels=args.pixels):
        print(f"{args.run}: its final checkpoint is evaluated already ({Path(args.run) / 'eval' / 'metrics.json'})")
        return 0
    evaluate_run(
        args.run,
        args.shards,
        horizon=args.horizon,
        num_samples=args.num_samples,
        num_clips=args.num_clips,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=not args.no_progress,
        pixels=args.pixels,
    )
    print(f"wrote {Path(args.run) / 'eval' / 'metrics.json'}, report.md and figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
