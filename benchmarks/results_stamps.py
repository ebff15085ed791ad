"""The stamps of benchmarks.results: which code and config a run was made with (hashes over file contents, the git
state), and whether an existing run folder may be reused."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from benchmarks.results import Table


# The tracked (and untracked, not ignored) files whose contents can change a result. docs/, tests/, README.md, the
# other benchmark scripts and the research scripts (experiments/) are left out, so a commit that touches only them
# keeps every run valid.
CODE_PATHS = (
    "worldmodel",
    "data_pipeline",
    "worlds",
    "train.py",
    "evaluate.py",
    "benchmarks/runs.py",
    "pyproject.toml",
    "constraints.txt",
)


class ResultsError(Exception):
    """A results file, a stamp or the git checkout is not what the command needs; the message says what to do."""


# ---------------------------------------------------------------------------------------------------------------
# Hashes and git


def _git(root: Path, *args: str) -> str:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or str(err)
        raise ResultsError(
            f"`git {' '.join(args)}` failed in {root}: {detail.strip()}. The results stamps need a git checkout."
        ) from err
    return out.stdout


def code_files(root: Path) -> list[str]:
    """The files under `root` (a git checkout) whose contents make the code hash, sorted: every tracked file under
    CODE_PATHS plus the untracked ones git does not ignore (a new module counts before it is committed)."""
    out = _git(root, "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *CODE_PATHS)
    return sorted({name for name in out.split("\0") if name})


def code_hash(root: Path) -> str:
    """sha256 over the paths and working-tree contents of `code_files(root)`: equal hashes, equal code. A tracked
    file deleted from the working tree counts as deleted."""
    digest = hashlib.sha256()
    for name in code_files(root):
        path = root / name
        content = path.read_bytes() if path.is_file() else b"<deleted>"
        digest.update(f"{name}\0{len(content)}\0".encode())
        digest.update(content)
    return digest.hexdigest()


def git_state(root: Path) -> dict:
    """The checkout's HEAD commit, whether any tracked file differs from it (`dirty`) and whether the code of
    CODE_PATHS does, untracked files included (`code_dirty`: then the commit alone does not give the code)."""
    return {
        "commit": _git(root, "rev-parse", "HEAD").strip(),
        "dirty": bool(_git(root, "status", "--porcelain", "--untracked-files=no").strip()),
        "code_dirty": bool(_git(root, "status", "--porcelain", "--", *CODE_PATHS).strip()),
    }


def config_hash(table: Table, root: Path, data_dir: Path | None = None) -> str:
    """sha256 of what a table's runs are trained and evaluated with: the config file's content, the overrides, the
    evaluation arguments, the world and data settings, and (when `data_dir` is given) the data's world.json and
    shard indexes, so data regenerated with other settings invalidates the runs. Methods and seeds are left out:
    they name the run folders, and adding a seed keeps the other runs."""
    data = {}
    if data_dir is not None:
        for name in ("world.json", "train/index.json", "val/index.json"):
            path = data_dir / name
            data[name] = path.read_text() if path.is_file() else None
    payload = {
        "config": (root / table.config).read_text(),
        "overrides": list(table.overrides),
        "eval_args": list(table.eval_args),
        "world": table.world,
        "data_settings": [table.data, table.num_videos, table.val_videos],
        "data": data,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Stamps: which run folders may be reused


def read_stamp(run_dir: Path) -> dict | None:
    """RUN_DIR/stamp.json, or None when it is missing or unreadable."""
    try:
        return json.loads((run_dir / "stamp.json").read_text())
    except (OSError, ValueError):
        return None


def write_stamp(run_dir: Path, stamp: dict) -> None:
    """Write RUN_DIR/stamp.json atomically."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "stamp.json.tmp"
    tmp.write_text(json.dumps(stamp, indent=1) + "\n")
    tmp.replace(run_dir / "stamp.json")


def stale_reason(stamp: dict | None, expected: dict) -> str | None:
    """Why an existing run folder with this stamp must not be used for the run `expected` describes (its table,
    method, seed, code_hash and config_hash), or None when it may: reused if its stamp says it was evaluated,
    resumed if it says it was training."""
    if stamp is None:
        return "it has no readable stamp.json (made by something else, or before stamps)"
    for key in ("table", "method", "seed", "code_hash", "config_hash"):
        if stamp.get(key) != expected[key]:
            found, wanted = stamp.get(key), expected[key]
            if key.endswith("_hash"):
                found, wanted = str(found)[:8], str(wanted)[:8]
            return f"its {key} is {found}, today's is {wanted}"
    if stamp.get("status") not in ("training", "evaluated"):
        return f"its status is {stamp.get('status')!r}"
    return None


def move_aside(run_dir: Path) -> Path:
    """Rename a stale run folder to .stale-NAME-N beside it (the lowest free N from 1) and return the new path."""
    n = 1
    while (target := run_dir.parent / f".stale-{run_dir.name}-{n}").exists():
        n += 1
    run_dir.rename(target)
    return target
