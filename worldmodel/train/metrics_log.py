"""What a person watches during training: a progress bar, RUN_DIR/metrics.jsonl and TensorBoard scalars.

Only the main process writes; on other ranks every method is a no-op, so the train loop calls them unconditionally.
One JSONL line per logged step, e.g.
`{"step": 100, "epoch": 2, "loss": 0.41, "pred": 0.40, "reg": 1.2, "lr": 4.9e-4, "grad_norm": 0.8, ...}`;
the same scalars go to RUN_DIR/tb under `train/<name>`. On resume, metrics.jsonl loses the records after the
checkpoint and any line that is not a complete record (the last one torn by a kill), with a warning, and is
rewritten atomically.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

log = logging.getLogger(__name__)


def _record_step(line: str) -> int | None:
    """The step of one metrics.jsonl line, or None when the line is not a complete record."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if type(step) is int else None


def _trim_jsonl(path: Path, last_step: int) -> None:
    """Drop records after `last_step` (logged by a run that died after its last checkpoint), so a resumed run
    does not leave two different histories in one file.

    A line that is not a complete record is dropped with a warning: the last one torn by a kill mid-write, or any
    other. The file is rewritten atomically (a temporary file renamed over it), so a kill here loses nothing.
    """
    if not path.is_file():
        return
    lines = [raw.decode("utf-8", errors="replace") for raw in path.read_bytes().splitlines()]
    kept, bad = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        step = _record_step(line)
        if step is None:
            bad.append(number)
        elif step <= last_step:
            kept.append(line)
    if bad == [len(lines)]:
        log.warning("%s: dropped its torn last line %d (a kill while it was written)", path, bad[0])
    elif bad:
        log.warning("%s: dropped %d line(s) that are not complete JSON records: %s", path, len(bad), bad[:20])
    write_atomically(path, "".join(line + "\n" for line in kept))


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text` in one step: written to a temporary file beside it, flushed, then renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class MetricsLog:
    """Progress bar + JSONL + TensorBoard for one run; `start_step` > 0 when resuming."""

    def __init__(self, run_dir: str | Path, *, enabled: bool, total_steps: int, start_step: int = 0) -> None:
        self.enabled = enabled
        if not enabled:
            return
        run_dir = Path(run_dir)
        self.jsonl_path = run_dir / "metrics.jsonl"
        _trim_jsonl(self.jsonl_path, start_step)
        self._jsonl = self.jsonl_path.open("a")
        self._tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1)
        self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True, mininterval=1.0)

    def progress(self, step: int, *, loss: float, clips_per_s: float, data_wait: float) -> None:
        """Advance the bar to `step` with the latest loss, throughput and share of time spent waiting on data."""
        if not self.enabled:
            return
        self._bar.update(step - self._bar.n)
        self._bar.set_postfix(loss=f"{loss:.4f}", clips_s=f"{clips_per_s:.1f}", data_wait=f"{data_wait:.0%}")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """Write one JSONL record and the TensorBoard scalars of global step `step`."""
        if not self.enabled:
            return
        record = {"step": step, **{k: (v if math.isfinite(v) else str(v)) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for name, value in scalars.items():
            self._tb.add_scalar(f"train/{name}", value, step)

    def write(self, message: str) -> None:
        """Print a line without breaking the progress bar."""
        if self.enabled:
            self._bar.write(message)

    def close(self) -> None:
        if not self.enabled:
            return
        self._bar.close()
        self._jsonl.close()
        self._tb.close()
