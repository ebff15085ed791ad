"""Atomic full-state checkpoints.

On-disk layout (see docs/architecture.md, "Checkpoints"):

    RUN_DIR/checkpoints/step-00001000/
      model.safetensors     unwrapped model state_dict (online + EMA target encoder, predictor, latents, buffers)
      optimizer.pt          optimizer.state_dict()
      scheduler.pt          LR scheduler state_dict()
      scaler.pt             AMP grad scaler state_dict() (only when fp16 uses one)
      rng-rank{r}.pt        python / numpy / torch (/ cuda) RNG states of rank r
      state.json            {"step", "epoch", "seed", "world_size", ..., "files": {name: bytes}}

RUN_DIR/finished.json, the completion marker, is written (atomically) once the run has reached train.steps and
saved its final checkpoint: {"step", "checkpoint"}. A run without it is unfinished (still training, stopped by a
signal, crashed), whatever its checkpoints hold; scripts and schedulers read this file, not the exit status.

A checkpoint is written into `checkpoints/.tmp-step-XXXXXXXX` and renamed to `step-XXXXXXXX` only once every file
is on disk, with `state.json` written last; a `step-*` directory therefore always holds a complete checkpoint.
`latest_checkpoint` additionally checks every file against the sizes recorded in `state.json`, so a checkpoint
truncated behind our back (a full disk, a lost page cache) is skipped rather than loaded.

No pickled modules: weights are safetensors, everything else is `torch.save` of plain state dicts read back with
`weights_only=True`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
FINISHED = "finished.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of global step `step` lives: RUN_DIR/checkpoints/step-XXXXXXXX."""
    return Path(run_dir) / CHECKPOINTS / f"step-{step:08d}"


def mark_finished(run_dir: str | Path, step: int, ckpt: str | Path) -> None:
    """Write RUN_DIR/finished.json (the completion marker) atomically: the run reached its planned `step`, saved
    as checkpoint directory `ckpt`."""
    path = Path(run_dir) / FINISHED
    tmp = path.with_name(f".{FINISHED}.tmp")
    _write(tmp, lambda p: p.write_text(json.dumps({"step": step, "checkpoint": str(ckpt)}, indent=2)))
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


def _write(path: Path, write_fn) -> None:
    write_fn(path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


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
    """
    final = checkpoint_dir(run_dir, step)
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    for stale in [*root.glob(".tmp-step-*"), *root.glob(".old-step-*")]:  # left by a run that died while writing
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-{final.name}"
    tmp.mkdir()

    _write(tmp / "model.safetensors", lambda p: save_model(model, str(p)))
    _write(tmp / "optimizer.pt", lambda p: torch.save(optimizer.state_dict(), p))
    _write(tmp / "scheduler.pt", lambda p: torch.save(scheduler.state_dict(), p))
    if scaler is not None:
        _write(tmp / "scaler.pt", lambda p: torch.save(scaler.state_dict(), p))
    for rank, rng in enumerate(rng_states):
        _write(tmp / f"rng-rank{rank}.pt", lambda p, rng=rng: p.write_bytes(rng))
    files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
    state = {**meta, "step": step, "world_size": len(rng_states), "files": files}
    _write(tmp / "state.json", lambda p: p.write_text(json.dumps(state, indent=2)))

    if final.exists():  # the same step saved again (e.g. a resumed run stopped at once): replace it atomically
        old = root / f".old-{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    dir_fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    _prune(root, keep)
    return final


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Complete-by-name checkpoint directories under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def _prune(root: Path, keep: int) -> None:
    for _, path in _step_dirs(root)[:-keep]:
        shutil.rmtree(path)


def read_state(ckpt_dir: str | Path) -> dict[str, Any]:
    """The checkpoint's state.json (step, epoch, seed, world_size, files, ...)."""
    return json.loads((Path(ckpt_dir) / "state.json").read_text())


def verify_checkpoint(ckpt_dir: str | Path) -> str | None:
    """None if the checkpoint is complete, else a sentence saying what is wrong with it."""
    ckpt_dir = Path(ckpt_dir)
    try:
        state = read_state(ckpt_dir)
    except (OSError, ValueError) as err:
        return f"state.json is missing or unreadable ({err})"
    for name, size in state.get("files", {}).items():
        path = ckpt_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, state.json recorded {size}"
    if "model.safetensors" not in state.get("files", {}):
        return "state.json lists no model.safetensors"
    return None


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint directory of a run (RUN_DIR/checkpoints/step-*), or None if there is none.

    Temporary directories of interrupted writes are never considered; a `step-*` directory whose files do not
    match its state.json is skipped with a warning and the next older one is returned.
    """
    for _, path in reversed(_step_dirs(Path(run_dir) / CHECKPOINTS)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        log.warning("skipping incomplete checkpoint %s: %s", path, problem)
    return None


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

    The RNG states of `rank` are restored when the checkpoint has them (it was written by at least rank + 1
    processes); otherwise the caller should reseed, and the returned dict has "rng_restored": False.
    """
    ckpt_dir = Path(ckpt_dir)
    problem = verify_checkpoint(ckpt_dir)
    if problem is not None:
        raise ValueError(f"checkpoint {ckpt_dir} is incomplete: {problem}")
    state = read_state(ckpt_dir)
    load_model_state(model, ckpt_dir)
    optimizer.load_state_dict(torch.load(ckpt_dir / "optimizer.pt", weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(ckpt_dir / "scheduler.pt", weights_only=True))
    if scaler is not None:
        if not (ckpt_dir / "scaler.pt").is_file():
            raise ValueError(f"checkpoint {ckpt_dir} has no scaler.pt but this run uses fp16 loss scaling")
        scaler.load_state_dict(torch.load(ckpt_dir / "scaler.pt", weights_only=True))
    rng_path = ckpt_dir / f"rng-rank{rank}.pt"
    state["rng_restored"] = rng_path.is_file()
    if rng_path.is_file():
        restore_rng_state(torch.load(rng_path, weights_only=True))
    return state
