"""What the train loop logs between two log lines: the statistics of the steps since the last one (`Window`:
losses and monitors, data wait, throughput, decode skips) and the alarm on the share of skipped samples (`SkipAlarm`).
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from collections.abc import Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from data_pipeline.samples import FALLBACK_PYAV


class Window:
    """Statistics of the steps since the last log line: means of losses/monitors (each over the steps that computed
    it: the collapse monitors run at log steps only), data wait, throughput.

    Decode skips and PyAV fallbacks are cumulative over the run (this process); the others reset at every log line.
    `recent` holds (samples, skipped samples) of the latest batches, about `skip_window` samples, for the skip alarm.
    """

    def __init__(self, skip_window: int = 1000) -> None:
        self.last_loss = math.nan  # the loss of the latest check step (the progress bar's)
        self.skipped: Counter = Counter()
        self.recent: deque[tuple[int, int]] = deque()
        self.skip_window = skip_window
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: Counter = Counter()
        self.steps, self.wait, self.start = 0, 0.0, time.perf_counter()

    def next_batch(self, batches: Iterator[tuple[int, dict]]) -> tuple[int, dict]:
        """The next (epoch, batch), timing the wait and counting its decode skips."""
        start = time.perf_counter()
        epoch, batch = next(batches)
        self.wait += time.perf_counter() - start
        self.skipped.update(batch["skipped"])
        skips = sum(n for reason, n in batch["skipped"].items() if reason != FALLBACK_PYAV)
        self.recent.append((len(set(batch["key"])) + skips, skips))
        while len(self.recent) > 1 and sum(n for n, _ in self.recent) - self.recent[0][0] >= self.skip_window:
            self.recent.popleft()
        return epoch, batch

    def add(self, values: dict[str, torch.Tensor]) -> None:
        """One optimiser step's values, each already the mean over its micro-batches."""
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
            self.counts[name] += 1
        self.steps += 1

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def scalars(self, accelerator: Accelerator) -> dict[str, float]:
        """Means over the window and over ranks; data-wait share averaged over ranks; skips and fallbacks summed over
        ranks; `skipped/recent_share`: the share of skipped samples among the latest ~skip_window read per rank."""
        names = list(self.sums)
        wait_share = torch.tensor(self.wait / self.elapsed, device=accelerator.device)
        means = [self.sums[n] / self.counts[n] for n in names]
        values = accelerator.reduce(torch.stack([*means, wait_share]), "mean").tolist()
        scalars = dict(zip([*names, "data_wait"], values, strict=True))
        total, read, skipped = Counter(), 0, 0
        recent = (sum(n for n, _ in self.recent), sum(k for _, k in self.recent))
        for rank_skips, (rank_read, rank_skipped) in gather_object([(dict(self.skipped), recent)]):
            total.update(rank_skips)
            read, skipped = read + rank_read, skipped + rank_skipped
        fallbacks = total.pop(FALLBACK_PYAV, 0)
        scalars["skipped/total"] = float(sum(total.values()))
        scalars.update({f"skipped/{reason}": float(n) for reason, n in sorted(total.items())})
        scalars["skipped/recent_share"] = skipped / max(1, read)
        scalars[FALLBACK_PYAV] = float(fallbacks)
        return scalars


class SkipAlarm:
    """Warns when more than `max_share` of the latest ~1000 samples read (per rank, summed over ranks) were skipped;
    once, and again only after the share has fallen back below the bar."""

    def __init__(self, max_share: float) -> None:
        self.max_share, self.raised = max_share, False

    def check(self, step: int, scalars: dict[str, float]) -> str | None:
        """The warning line for the scalars logged at `step`, or None."""
        share = scalars["skipped/recent_share"]
        if share <= self.max_share:
            self.raised = False
            return None
        if self.raised:
            return None
        self.raised = True
        reasons = ", ".join(f"{k.split('/', 1)[1]}={v:g}" for k, v in scalars.items() if k.startswith("skipped/"))
        return (
            f"warning: step {step}: {share:.1%} of the latest samples read were skipped (> data.max_skip_share="
            f"{self.max_share:g}; run totals: {reasons}); check the shards with python -m benchmarks.pipeline, or "
            "set WORLDMODEL_DECODE_DEBUG=1 to log each skipped sample with its reason"
        )
