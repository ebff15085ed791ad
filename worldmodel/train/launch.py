"""Launch, stop and resume: what every rank must agree on around the train loop.

- the process group is the one the launcher announced (`check_world_size`);
- the checkpoint to resume from is decided once, on the main process (`agreed_resume_dir`): `--resume auto` verifies
  the newest checkpoint against its manifest and falls back to the newest one that verifies, with a warning (the
  ones that failed are moved aside to `checkpoints/.corrupt-step-*`); an explicit checkpoint that fails is an error;
- SIGTERM, Ctrl-C and SIGUSR2 are recorded, not fatal (`StopRequest`): the loop checkpoints at the next step
  boundary and train.py exits with EXIT_STOPPED.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from worldmodel.run import checkpoint as ckpt

WORLD_SIZE_ENV = "WORLDMODEL_WORLD_SIZE"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)  # each: checkpoint at the next step, then exit 75
# train.py's exit statuses (documented in its docstring, README.md and docker/README.md)
EXIT_FINISHED = 0  # train.steps reached, RUN_DIR/finished.json written
EXIT_DIVERGED = 1  # a non-finite loss stopped every rank (TrainingDiverged); no checkpoint written
EXIT_USAGE = 2  # bad config, --resume, checkpoint, shard list or process group: fix the command, then rerun
EXIT_SOFTWARE = 70  # an unexpected error (sysexits EX_SOFTWARE): a crash with a traceback, not a diverged loss
EXIT_STOPPED = 75  # stopped by SIGTERM/Ctrl-C/SIGUSR2 after saving a checkpoint (sysexits EX_TEMPFAIL): resume me

log = logging.getLogger(__name__)


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
    list the checkpoints themselves can see different newest ones. Every rank raises the main process's ResumeError
    (and any other error of the main process, as a RuntimeError on the other ranks).
    """
    decision: list[Any] = [None]
    crash: Exception | None = None
    if accelerator.is_main_process:
        try:
            decision = [("ok", resume_dir(resume, run_dir))]
        except ResumeError as err:
            decision = [("error", str(err))]
        except Exception as err:  # sent to every rank, so that none waits on the broadcast forever
            crash, decision = err, [("crash", f"{type(err).__name__}: {err}")]
    if accelerator.num_processes > 1:
        decision = broadcast_object_list(decision)
    kind, value = decision[0]
    if kind == "error":
        raise ResumeError(value)
    if crash is not None:
        raise crash
    if kind == "crash":
        raise RuntimeError(f"the main process failed while choosing the checkpoint to resume from: {value}")
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
    """The checkpoint to resume from: None (fresh run), "auto" (newest one that verifies, if any) or a path.

    Run on the main process only, before training writes anything: it first puts back a checkpoint left only as
    `.old-step-*`/`.tmp-step-*` by an interrupted re-save (`checkpoint.recover_interrupted_saves`). With "auto",
    newer checkpoints that fail verification are moved to `checkpoints/.corrupt-step-*` with a warning naming what
    failed, and the newest one that verifies is returned; when every checkpoint fails, or an explicit checkpoint
    fails, ResumeError says why.
    """
    ckpt.recover_interrupted_saves(run_dir)
    if resume is None:
        existing = ckpt.checkpoint_dirs(run_dir)
        if existing:
            raise ResumeError(
                f"run_dir {run_dir} already holds checkpoints (newest {existing[-1].name}); pass --resume auto to "
                "continue that run, or set run_dir=... to start a new one"
            )
        return None
    if resume == "auto":
        newest, failed = ckpt.newest_verified(run_dir)
        if newest is None and failed:
            listed = "; ".join(f"{path.name}: {problem}" for path, problem in failed)
            raise ResumeError(
                f"--resume auto: no checkpoint of {run_dir} verifies, nothing to resume from ({listed}). Restore "
                "the run directory from a backup, or set run_dir=... to start a new run"
            )
        for path, problem in failed:
            moved = ckpt.quarantine_checkpoint(path)
            log.warning(
                "--resume auto: checkpoint %s fails verification (%s); moved it to %s and falling back to %s",
                path,
                problem,
                moved,
                newest,
            )
        return newest
    problem = ckpt.verify_checkpoint(resume)
    if problem is not None:
        raise ResumeError(f"--resume {resume} is not a complete, intact checkpoint: {problem}")
    return Path(resume)
