"""Shared plumbing of `python -m benchmarks.results` and the research scripts (experiments/): make the data, train a
run, evaluate it, read its metrics.

Every step is a real subprocess of the project's own entry points (`python -m worlds.moving_digits`,
`train.py`, `evaluate.py`), so a benchmark measures exactly what a user runs. A step whose output already exists
is skipped, so an interrupted benchmark resumes where it stopped: a run is trained with `--resume auto` until it
is finished (train.py exits 75 when a signal stopped it, which stops the benchmark) and evaluated only then.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path

from worldmodel.eval.runner import evaluated_final
from worlds.simulated import world_version

ROOT = Path(__file__).resolve().parent.parent
# The built-in worlds: name -> the generator module (its VERSION, its command line).
WORLDS = {
    "digits": "worlds.moving_digits",
    "push": "worlds.push_world",
    "pusht": "worlds.pusht",
}


def run(cmd: list[str]) -> None:
    """Run one command from the repository root, streaming its output; raise if it fails."""
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def new_parser(doc: str | None) -> argparse.ArgumentParser:
    """A benchmark script's argument parser, its module docstring `doc` as the description; config overrides are not
    declared on it but taken out by `parse_with_overrides`."""
    return argparse.ArgumentParser(
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any key=value word, anywhere on the line, is a config override for every run.",
    )


def parse_with_overrides(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse `argv` (default sys.argv[1:]); every `key=value` word that is not an option, anywhere on the line, is a
    config override, returned as `args.overrides` in order.

    Taking them out first lets them follow a multi-value option (`--seeds 0 1 model.loss=smooth_l1`), which argparse
    would otherwise read as more seeds.
    """
    overrides, rest = [], []
    for word in sys.argv[1:] if argv is None else argv:
        (overrides if "=" in word and not word.startswith("-") else rest).append(word)
    args = parser.parse_args(rest)
    args.overrides = overrides
    return args


def ensure_data(
    data_dir: Path, num_videos: int, val_videos: int, seed: int = 0, still: bool = False, world: str = "digits"
) -> None:
    """Generate a built-in world's shards into data_dir/{train,val} unless they exist: `world` "digits" (stochastic
    moving digits; `still`: the diagnostic variant where digits rest and a kick is a one-frame jump), "push" (an
    agent pushing an object, `worlds.push_world`) or "pusht" (gym-pusht's PushT with a scripted policy, `worlds.pusht`;
    needs the pusht extra). Existing data written by another version of the world's rules is refused with a
    message rather than silently measured."""
    if world not in WORLDS:
        raise ValueError(f"unknown world {world!r}; the built-in worlds are {sorted(WORLDS)}")
    if still and world != "digits":
        raise ValueError(f"still is a variant of the moving digits, not of world {world!r}")
    module = WORLDS[world]
    if (data_dir / "val" / "index.json").exists():
        expected, found = importlib.import_module(module).VERSION, world_version(data_dir)
        if found != expected:
            raise SystemExit(
                f"{data_dir} holds version {found} of {module}, but this code writes version {expected} (the world's "
                f"rules changed). Delete {data_dir} to have it regenerated, or pass --data with another folder."
            )
        return
    run([
        sys.executable, "-m", module, "--output", str(data_dir),
        "--num-videos", str(num_videos), "--val-videos", str(val_videos), "--seed", str(seed),
        *(["--still"] if still else []),
    ])  # fmt: skip


def train_and_evaluate(run_dir: Path, config: str, overrides: list[str], data_dir: Path, eval_args: list[str]) -> dict:
    """Train `run_dir` to its end (resuming if it was interrupted), evaluate its final checkpoint on data_dir/val,
    return its metrics.json. Raises CalledProcessError when the training stops unfinished or fails."""
    metrics_path = run_dir / "eval" / "metrics.json"
    if not evaluated_final(run_dir):
        run([
            sys.executable, "train.py", "--config", config, f"run_dir={run_dir}",
            f"data.train_shards={data_dir}/train/shard-*.tar", f"data.val_shards={data_dir}/val/shard-*.tar",
            *overrides, "--resume", "auto",
        ])  # fmt: skip
        run([
            sys.executable, "evaluate.py", "--run", str(run_dir), "--shards", f"{data_dir}/val/shard-*.tar",
            *eval_args,
        ])  # fmt: skip
    return json.loads(metrics_path.read_text())


def metric(tree: dict, *path: str | int) -> float | None:
    """Walk nested dicts/lists; None where any step is missing."""
    node = tree
    for key in path:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            return None
    return node if isinstance(node, int | float) else None


def probe_mean(metrics: dict, kind: str, index: int | None = None) -> float | None:
    """Mean R² of the encoded-frame probes over position (x*, y*) or velocity (vx*, vy*) columns; `index` keeps
    only the columns of one entity (x0/y0: the first digit, or the push world's agent; 1: its object)."""
    encoded = metrics.get("probes", {}).get("encoded", {}) or {}
    prefix = ("x", "y") if kind == "position" else ("vx", "vy")
    vals = [
        v
        for k, v in encoded.items()
        if k.rstrip("0123456789") in prefix and v is not None and (index is None or k.endswith(str(index)))
    ]
    return sum(vals) / len(vals) if vals else None
