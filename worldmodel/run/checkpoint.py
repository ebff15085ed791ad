"""Atomic full-state checkpoints, each with a manifest of sha256 digests (the manifest and the verification:
manifest.py).

On-disk layout (see docs/architecture.md, "Checkpoints"):

    RUN_DIR/checkpoints/step-00001000/
      model.safetensors     unwrapped model state_dict (online + EMA target encoder, predictor, latents, buffers)
      optimizer.pt          optimizer.state_dict()
      scheduler.pt          LR scheduler state_dict()
      scaler.pt             AMP grad scaler state_dict() (only when fp16 uses one)
      rng-rank{r}.pt        python / numpy / torch (/ cuda) RNG states of rank r
      state.json            {"step", "epoch", "seed", "world_size", ..., "files": {name: bytes}, "manifest": ...}
      manifest.json         {"format": 1, "algorithm": "sha256", "files": {name: {"bytes", "sha256"}}}, every
                            other file of the directory (state.json included); written last, atomically

RUN_DIR/finished.json, the completion marker, is written (atomically) once the run has reached train.steps and
saved its final checkpoint: {"step", "checkpoint"}. A run without it is unfinished (still training, stopped by a
signal, crashed), whatever its checkpoints hold; scripts and schedulers read this file, not the exit status.

A checkpoint is written into `checkpoints/.tmp-step-XXXXXXXX` and renamed to `step-XXXXXXXX` only once every file
is on disk, with `manifest.json` written last; a `step-*` directory therefore always holds a complete checkpoint.
`verify_checkpoint` (manifest.py) checks every file against the manifest, so a checkpoint truncated or changed behind
our back (a full disk, a lost page cache, a flipped bit) is never loaded: `latest_checkpoint` skips it with a warning
and returns the next older one.

Re-saving a step that exists (a resumed run stopped at once) renames the old directory to `.old-step-X`, the new
one into place, then deletes the old one. A crash between the two renames leaves no `step-X`: the next save and
`--resume auto` (`recover_interrupted_saves`, on the main process only) first rename the newest copy that verifies
(`.tmp-step-X`, complete since its manifest is written last, else `.old-step-X`) back to `step-X`.

No pickled modules: weights are safetensors, everything else is `torch.save` of plain state dicts read back with
`weights_only=True`. Nothing on disk names a Python module or class, so moving the code does not change what loads.
"""

from __future__ import annotations

import io
import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from worldmodel.run.manifest import (
    MANIFEST,
    CheckpointError,
    fsync_dir,
    verify_checkpoint,
    write_manifest,
    write_synced,
)

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
FINISHED = "finished.json"
CORRUPT_PREFIX = ".corrupt-"  # checkpoints moved aside by `quarantine_checkpoint`; never resumed, never pruned
_STEP_DIR = re.compile(r"^step-(\d{8})$")
_INTERRUPTED_DIR = re.compile(r"^\.(tmp|old)-(step-\d{8})$")


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of global step `step` lives: RUN_DIR/checkpoints/step-XXXXXXXX."""
    return Path(run_dir) / CHECKPOINTS / f"step-{step:08d}"


def mark_finished(run_dir: str | Path, step: int, ckpt: str | Path) -> None:
    """Write RUN_DIR/finished.json (the completion marker) atomically: the run reached its planned `step`, saved
    as checkpoint directory `ckpt`."""
    path = Path(run_dir) / FINISHED
    tmp = path.with_name(f".{FINISHED}.tmp")
    write_synced(tmp, lambda p: p.write_text(json.dumps({"step": step, "checkpoint": str(ckpt)}, indent=2)))
    tmp.replace(path)


def read_finished(run_dir: str | Path) -> dict[str, Any] | None:
    """The completion marker {"step", "checkpoint"} of a run, or None if the run is not finished."""
    path = Path(run_dir) / FINISHED
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def clear_finished(run_dir: str | Path) -> None:
    """Remove the completion marker (a finished run is being continued to more steps)."""
    (Path(run_dir) / FINISHED).unlink(missing_ok=True)


def capture_rng_state() -> dict[str, Any]:
    """This process's python / numpy / torch (/ cuda) RNG states, as plain objects `torch.load(weights_only)` reads."""
    # the legacy global numpy RNG is the one third-party code draws from, so it is the state worth saving
    np_name, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state()  # noqa: NPY002
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (np_name, torch.from_numpy(np_key.copy()), int(np_pos), int(np_has_gauss), float(np_gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def rng_state_bytes() -> bytes:
    """`capture_rng_state()` serialised, ready to be gathered from every rank and written by the main process."""
    buffer = io.BytesIO()
    torch.save(capture_rng_state(), buffer)
    return buffer.getvalue()


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`."""
    random.setstate(state["python"])
    np_name, np_key, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_key.numpy(), np_pos, np_has_gauss, np_gauss))  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    rng_states: list[bytes],
    meta: dict[str, Any],
    keep: int,
) -> Path:
    """Write a complete checkpoint of global step `step` atomically, then keep only the newest `keep` of them.

    Called on one process (rank 0). `model` is the unwrapped model; `rng_states[r]` is rank r's
    `rng_state_bytes()`; `meta` is merged into state.json (epoch, seed, ...). Returns the checkpoint directory.
    A save interrupted between the two renames of a re-save is recovered first (`recover_interrupted_saves`).
    """
    final = checkpoint_dir(run_dir, step)
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    recover_interrupted_saves(run_dir)
    for stale in [*root.glob(".tmp-step-*"), *root.glob(".old-step-*")]:  # left by a run that died while writing
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-{final.name}"
    tmp.mkdir()

    write_synced(tmp / "model.safetensors", lambda p: save_model(model, str(p)))
    write_synced(tmp / "optimizer.pt", lambda p: torch.save(optimizer.state_dict(), p))
    write_synced(tmp / "scheduler.pt", lambda p: torch.save(scheduler.state_dict(), p))
    if scaler is not None:
        write_synced(tmp / "scaler.pt", lambda p: torch.save(scaler.state_dict(), p))
    for rank, rng in enumerate(rng_states):
        write_synced(tmp / f"rng-rank{rank}.pt", lambda p, rng=rng: p.write_bytes(rng))
    files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
    state = {**meta, "step": step, "world_size": len(rng_states), "files": files, "manifest": MANIFEST}
    write_synced(tmp / "state.json", lambda p: p.write_text(json.dumps(state, indent=2)))
    write_manifest(tmp)  # last: a directory with a manifest that verifies is complete

    if final.exists():  # the same step saved again (e.g. a resumed run stopped at once): replace it
        # a crash between these two renames leaves .old-step-X and .tmp-step-X (both complete) and no step-X:
        # recover_interrupted_saves puts the newer one back in place
        old = root / f".old-{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        fsync_dir(root)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    fsync_dir(root)
    _prune(root, keep, final)
    return final


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Complete-by-name checkpoint directories under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Every RUN_DIR/checkpoints/step-* directory, oldest first, by name only (nothing verified)."""
    return [path for _, path in _step_dirs(Path(run_dir) / CHECKPOINTS)]


def _prune(root: Path, keep: int, just_saved: Path) -> None:
    for _, path in _step_dirs(root)[:-keep]:
        if path != just_saved:  # never the checkpoint just written, whatever newer step-* directories exist
            shutil.rmtree(path)


def read_state(ckpt_dir: str | Path) -> dict[str, Any]:
    """The checkpoint's state.json (step, epoch, seed, world_size, files, ...)."""
    return json.loads((Path(ckpt_dir) / "state.json").read_text())


def newest_verified(run_dir: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest checkpoint directory of the run that verifies, or None; [(newer directory, what failed), ...],
    newest first). Nothing is logged or moved."""
    failed: list[tuple[Path, str]] = []
    for path in reversed(checkpoint_dirs(run_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path, failed
        failed.append((path, problem))
    return None, failed


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete and intact checkpoint directory of a run (RUN_DIR/checkpoints/step-*), or None.

    Temporary directories of interrupted writes are never considered; a `step-*` directory that fails
    `verify_checkpoint` is skipped with a warning naming what failed, and the next older one is returned.
    Read-only: a checkpoint left only as `.old-step-*` / `.tmp-step-*` by an interrupted re-save is named in a
    warning, and put back by `recover_interrupted_saves` (the next save, or `train.py --resume auto`).
    """
    newest, failed = newest_verified(run_dir)
    for path, problem in failed:
        log.warning("skipping checkpoint %s, which fails verification: %s", path, problem)
    for name in _interrupted_saves(Path(run_dir) / CHECKPOINTS, renames_only=True):
        log.warning(
            "%s exists only as .old-%s (a re-save interrupted between its two renames); `train.py --resume auto` "
            "puts it back in place",
            name,
            name,
        )
    return newest


def _interrupted_saves(root: Path, *, renames_only: bool) -> list[str]:
    """Names `step-X` for which no `step-X` directory exists but `.old-step-X` does (a re-save interrupted between
    its two renames) or, unless `renames_only`, `.tmp-step-X` does (a save interrupted before its rename)."""
    if not root.is_dir():
        return []
    found = set()
    for path in root.iterdir():
        m = _INTERRUPTED_DIR.match(path.name)
        if m and path.is_dir() and not (root / m[2]).exists() and (m[1] == "old" or not renames_only):
            found.add(m[2])
    return sorted(found)


def recover_interrupted_saves(run_dir: str | Path) -> list[Path]:
    """Put back the checkpoints that an interrupted save left only as `.tmp-step-X` / `.old-step-X` (no
    `step-X`): the newer copy (`.tmp`, complete once its manifest exists) if it verifies, else the older one.
    Returns the directories restored. Call it only where no save can be in progress (the writer itself, or the
    main process before training starts): it renames directories."""
    root = Path(run_dir) / CHECKPOINTS
    restored = []
    for name in _interrupted_saves(root, renames_only=False):
        final, problems = root / name, []
        for candidate in (root / f".tmp-{name}", root / f".old-{name}"):
            if not candidate.is_dir():
                continue
            problem = verify_checkpoint(candidate)
            if problem is None:
                candidate.rename(final)
                fsync_dir(root)
                log.warning("recovered %s from %s (a save interrupted between its renames)", final, candidate)
                restored.append(final)
                break
            problems.append(f"{candidate.name}: {problem}")
        else:
            if (root / f".old-{name}").is_dir():  # a lone .tmp is an ordinary interrupted write: nothing was lost
                log.warning("could not recover %s from an interrupted re-save: %s", final, "; ".join(problems))
    return restored


def quarantine_checkpoint(ckpt_dir: str | Path) -> Path:
    """Move a checkpoint that failed verification aside, to `checkpoints/.corrupt-step-X` (`.corrupt-step-X.N` if
    taken), where neither resume nor pruning looks; returns the new path. Kept for inspection, never deleted."""
    ckpt_dir = Path(ckpt_dir)
    target = ckpt_dir.with_name(f"{CORRUPT_PREFIX}{ckpt_dir.name}")
    n = 0
    while target.exists():
        n += 1
        target = ckpt_dir.with_name(f"{CORRUPT_PREFIX}{ckpt_dir.name}.{n}")
    ckpt_dir.rename(target)
    fsync_dir(ckpt_dir.parent)
    return target


def load_model_state(model: torch.nn.Module, ckpt_dir: str | Path) -> None:
    """Load the checkpoint's weights (model.safetensors) into `model` (unwrapped); strict about missing keys."""
    path = Path(ckpt_dir) / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist; pass a checkpoint directory such as RUN_DIR/checkpoints/step-*"
        )
    try:
        load_model(model, str(path), strict=True)
    except RuntimeError as err:
        raise RuntimeError(f"{path} does not match the model built from the config: {err}") from err


def load_checkpoint(
    ckpt_dir: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    rank: int,
) -> dict[str, Any]:
    """Restore the full training state saved by `save_checkpoint`; returns state.json.

    The checkpoint is verified first (`verify_checkpoint`; CheckpointError names what failed). The RNG states of
    `rank` are restored when the checkpoint has them (it was written by at least rank + 1 processes); otherwise the
    caller should reseed, and the returned dict has "rng_restored": False.
    """
    ckpt_dir = Path(ckpt_dir)
    problem = verify_checkpoint(ckpt_dir)
    if problem is not None:
        raise CheckpointError(f"checkpoint {ckpt_dir} is incomplete or corrupt: {problem}")
    state = read_state(ckpt_dir)
    load_model_state(model, ckpt_dir)
    optimizer.load_state_dict(torch.load(ckpt_dir / "optimizer.pt", weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(ckpt_dir / "scheduler.pt", weights_only=True))
    if scaler is not None:
        if not (ckpt_dir / "scaler.pt").is_file():
            raise CheckpointError(f"checkpoint {ckpt_dir} has no scaler.pt but this run uses fp16 loss scaling")
        scaler.load_state_dict(torch.load(ckpt_dir / "scaler.pt", weights_only=True))
    rng_path = ckpt_dir / f"rng-rank{rank}.pt"
    state["rng_restored"] = rng_path.is_file()
    if rng_path.is_file():
        restore_rng_state(torch.load(rng_path, weights_only=True))
    return state
