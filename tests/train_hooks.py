"""train.py with test hooks: run it as `python tests/train_hooks.py TRAIN_ARGS...` (or as accelerate's script).

The hooks live here, on the test side, not in the user's config. Set by environment variables:

- HOOK_NAN_AT_STEP=N: rank 0's N-th training forward returns a NaN loss (a divergence on one rank only).
- HOOK_RAISE_AT_STEP=N: rank 0's N-th training forward raises OSError (an unexpected failure, e.g. a lost device
  or disk, which is not a divergence).
- HOOK_DUMP_STATE=1: each rank writes RUN_DIR/debug/resumed-rank{r}.pt right after loading a checkpoint, and
  RUN_DIR/debug/final-rank{r}.pt at every checkpoint it saves (so after a run, its last one), each holding
  {"model": state dict, "optimizer": state dict}: what the tests compare across ranks and with the checkpoints.
- HOOK_TRAIN=path: the script to run with the hooks in place (default: the repository's train.py).
"""

import os
import runpy
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import worldmodel.train.loop as loop  # noqa: E402
import worldmodel.train.state as state  # noqa: E402
from worldmodel.model.world_model import WorldModel  # noqa: E402


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _dump(run_dir: Path, tag: str, model, optimizer) -> None:
    (run_dir / "debug").mkdir(parents=True, exist_ok=True)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    torch.save(state, run_dir / "debug" / f"{tag}-rank{_rank()}.pt")


if os.environ.get("HOOK_NAN_AT_STEP"):
    nan_at, calls = int(os.environ["HOOK_NAN_AT_STEP"]), [0]
    real_forward = WorldModel.forward

    def forward_with_nan(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        if self.training:
            calls[0] += 1
            if calls[0] == nan_at and _rank() == 0:
                out["loss"] = out["loss"] * float("nan")
        return out

    WorldModel.forward = forward_with_nan

if os.environ.get("HOOK_RAISE_AT_STEP"):
    raise_at, forwards = int(os.environ["HOOK_RAISE_AT_STEP"]), [0]
    forward_before_raise = WorldModel.forward

    def forward_that_raises(self, *args, **kwargs):
        if self.training:
            forwards[0] += 1
            if forwards[0] == raise_at and _rank() == 0:
                raise OSError(f"HOOK_RAISE_AT_STEP: injected failure in training forward {raise_at}")
        return forward_before_raise(self, *args, **kwargs)

    WorldModel.forward = forward_that_raises

if os.environ.get("HOOK_DUMP_STATE") == "1":
    real_load, real_save = state.ckpt.load_checkpoint, state.save_state

    def load_and_dump(path, *, model, optimizer, **kwargs):
        state = real_load(path, model=model, optimizer=optimizer, **kwargs)
        _dump(Path(path).parent.parent, "resumed", model, optimizer)  # RUN_DIR/checkpoints/step-* -> RUN_DIR
        return state

    def save_and_dump(accelerator, cfg, step, epoch, model, optimizer, scheduler):
        path = real_save(accelerator, cfg, step, epoch, model, optimizer, scheduler)
        _dump(Path(cfg.run_dir), "final", accelerator.unwrap_model(model), optimizer)
        return path

    state.ckpt.load_checkpoint, loop.save_state = load_and_dump, save_and_dump

script = os.environ.get("HOOK_TRAIN", str(REPO / "train.py"))
sys.argv[0] = script
runpy.run_path(script, run_name="__main__")
