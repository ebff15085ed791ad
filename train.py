"""Train a latent video world model.

    accelerate launch train.py --config configs/demo.yaml [section.key=value ...] [--resume auto|CHECKPOINT_DIR]
    python train.py --config configs/tiny.yaml run_dir=runs/tiny          # one process, no launcher

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

    from worldmodel.trainer import ResumeError, TrainingDiverged, train  # heavy imports once the config is valid

    try:
        train(cfg, resume=args.resume)
    except ResumeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged:
        return 1  # the trainer has printed the step and the loss terms
    return 0


if __name__ == "__main__":
    sys.exit(main())
