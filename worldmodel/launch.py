"""Launch, stop and resume: what every rank must agree on around the train loop.

- the process group is the one the launcher announced (`check_world_size`);
- the checkpoint to resume from is decided once, on the main process (`agreed_resume_dir`);
- SIGTERM, Ctrl-C and SIGUSR2 are recorded, not fatal (`StopRequest`): the loop checkpoints at the next step
  boundary and train.py exits with EXIT_STOPPED.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from worldmodel import checkpoint as ckpt

WORLD_SIZE_ENV = "WORLDMODEL_WORLD_SIZE"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)  # each: checkpoint at the next step, then exit 75
EXIT_STOPPED = 75  # train.py's exit status after a SIGTERM/Ctrl-C checkpoint (sysexits EX_TEMPFAIL); 0 = finished


class LaunchError(RuntimeError):
    """The process group is not the one the launcher announced."""


class ResumeError(ValueError):
    """The run directory and --resume disagree (checkpoints exist but no --resume, or a bad checkpoint path)."""


class StopRequest:
    """Records SIGTERM / SIGINT / SIGUSR2 instead of dying, so the loop can checkpoint at the next step boundary.

    SIGUSR2 is the stop that docker/slurm_train.sbatch sends at the time-limit warning: Slurm follows a SIGTERM
    delivered to a job step with SIGKILL after KillWait (30 s by default), but not a SIGUSR2, so a checkpoint that
    takes longer still completes.

    SIGTERM stays graceful however often it comes: under Slurm every process of a job step gets it, and torch
    elastic's agent sends each trainer another one, so a second TERM must not kill a rank mid-step or mid-save.
    Only a second Ctrl-C (SIGINT) escalates: it interrupts at once with KeyboardInterrupt.
    """

    def __init__(self) -> None:
        self.requested = False
        self._interrupted = False  # a Ctrl-C came already
        self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT:
            if self._interrupted:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            self._interrupted = True
        self.requested = True

    def restore(self) -> None:
        """Put back the handlers that were installed before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def agreed_resume_dir(accelerator: Accelerator, resume: str | None, run_dir: Path) -> Path | None:
    """`resume_dir` decided once, on the main process, and sent to every rank: on a shared filesystem ranks that
    list the checkpoints themselves can see different newest ones. Every rank raises the main process's ResumeError.
    """
    decision: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            decision = [("ok", resume_dir(resume, run_dir))]
        except ResumeError as err:
            decision = [("error", str(err))]
    if accelerator.num_processes > 1:
        decision = broadcast_object_list(decision)
    kind, value = decision[0]
    if kind == "error":
        raise ResumeError(value)
    return value


def check_world_size(num_processes: int) -> None:
    """Fail when the launcher announced a different number of processes (WORLDMODEL_WORLD_SIZE, set by
    docker/launch_multinode.sh) than this process group has: a misconfigured launch would otherwise train N
    separate single-process runs into one run directory."""
    announced = os.environ.get(WORLD_SIZE_ENV)
    if announced and int(announced) != num_processes:
        raise LaunchError(
            f"the launcher announced {announced} processes ({WORLD_SIZE_ENV}) but this process group has "
            f"{num_processes}; check NNODES and GPUS_PER_NODE, and that every node reaches MASTER_ADDR:MASTER_PORT"
        )


def resume_dir(resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint to resume from: None (fresh run), "auto" (newest complete one, if any) or a path."""
    newest = ckpt.latest_checkpoint(run_dir)
    if resume is None:
        if newest is not None:
            raise ResumeError(
                f"run_dir {run_dir} already holds checkpoints (newest {newest.name}); pass --resume auto to continue "
                "that run, or set run_dir=... to start a new one"
            )
        return None
    if resume == "auto":
        return newest
    problem = ckpt.verify_checkpoint(resume)
    if problem is not None:
        raise ResumeError(f"--resume {resume} is not a complete checkpoint: {problem}")
    return Path(resume)
