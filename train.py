"""Train a latent video world model.

    accelerate launch train.py --config configs/demo.yaml [section.key=value ...] [--resume auto|CHECKPOINT_DIR]
    python train.py --config configs/tiny.yaml run_dir=runs/tiny          # one process, no launcher

Exit status: 0 = finished (train.steps reached, RUN_DIR/finished.json written); 75 = stopped by SIGTERM/Ctrl-C
after saving a checkpoint, continue with --resume auto; 1 = the loss diverged; 2 = bad config, --resume or shard list
(missing shards or shard program), or a process group other than the launcher announced.
Launchers report any non-zero status of a trainer as their own failure (accelerate launch exits 1), so scripts
and schedulers tell a finished run by RUN_DIR/finished.json.

CPU, two gloo processes:
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no train.py --config configs/tiny.yaml
"""

from __future__ import annotations

import argparse
import sys

from worldmodel.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/demo.yaml")
    parser.add_argument(
        "--resume", default=None, help="'auto' (newest complete checkpoint of run_dir, if any) or a checkpoint dir"
    )
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.latent=adassl_v optim.lr=3e-4")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2

    # heavy imports once the config is valid
    from data_pipeline.shardlist import ShardListError
    from worldmodel.launch import EXIT_STOPPED, LaunchError, ResumeError
    from worldmodel.trainer import TrainingDiverged, train

    try:
        finished = train(cfg, resume=args.resume)
    except (ResumeError, LaunchError, ShardListError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged:
        return 1  # the trainer has printed the step and the loss terms
    return 0 if finished else EXIT_STOPPED


if __name__ == "__main__":
    sys.exit(main())
