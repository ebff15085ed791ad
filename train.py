"""Train a latent video world model.

    accelerate launch train.py --config configs/demo.yaml [section.key=value ...] [--resume auto|CHECKPOINT_DIR]
    python train.py --config configs/tiny.yaml run_dir=runs/tiny          # one process, no launcher

Exit status: 0 = finished (train.steps reached, RUN_DIR/finished.json written); 75 = stopped by SIGTERM/Ctrl-C
after saving a checkpoint, continue with --resume auto; 1 = the loss diverged (no checkpoint written); 2 = bad
config, --resume (a checkpoint that fails verification, or none that verifies for --resume auto) or shard list
(missing shards or shard program), or a process group other than the launcher announced; 70 (EX_SOFTWARE) = any
other, unexpected error (its traceback is printed): a crash, never a diverged loss.
Launchers report any non-zero status of a trainer as their own failure (accelerate launch exits 1), so scripts
and schedulers tell a finished run by RUN_DIR/finished.json.

CPU, two gloo processes:
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no train.py --config configs/tiny.yaml
"""

from __future__ import annotations

import argparse
import sys
import traceback

from worldmodel.run.config import ConfigError, load_config

EXIT_SOFTWARE = 70  # = worldmodel.train.launch.EXIT_SOFTWARE (an unexpected error), here before the heavy imports


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, train, and return the exit status (module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/demo.yaml")
    parser.add_argument(
        "--resume", default=None, help="'auto' (newest checkpoint of run_dir that verifies, if any) or a checkpoint dir"
    )
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.latent=adassl_v optim.lr=3e-4")
    args = parser.parse_intermixed_args(argv)
    try:
        return _run(args)
    except Exception:  # not a diverged loss (1) nor a usage error (2): status 70 tells a crash from both
        traceback.print_exc()
        print(f"error: unexpected failure (exit status {EXIT_SOFTWARE}); see the traceback above", file=sys.stderr)
        return EXIT_SOFTWARE


def _run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2

    # heavy imports once the config is valid
    from data_pipeline.shardlist import ShardListError
    from worldmodel.run.manifest import CheckpointError
    from worldmodel.train.launch import EXIT_DIVERGED, EXIT_STOPPED, EXIT_USAGE, LaunchError, ResumeError
    from worldmodel.train.loop import train
    from worldmodel.train.step import TrainingDiverged

    try:
        finished = train(cfg, resume=args.resume)
    except ConfigError as err:  # a combination of keys only the model's constructors check (trainer)
        print(f"config error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (ResumeError, LaunchError, ShardListError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingDiverged:
        return EXIT_DIVERGED  # the trainer has printed the step and the loss terms
    return 0 if finished else EXIT_STOPPED


if __name__ == "__main__":
    sys.exit(main())
