"""What report.md's sections and compare.py's tables share: the markdown table and its cells (`table`, `fmt`),
the splits of the rollout steps and their help text, and `over_copy_last` (a mode's error over copy-last's).
"""

from __future__ import annotations

from typing import Any


def fmt(value: Any, digits: int = 4) -> str:
    """A number for a table cell; '—' for a missing value."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


SPLITS = ("all", "event", "no_event", "no_event_so_far")
SPLIT_HELP = (
    "A step counts as `event` when its predicted transition (the one producing that frame) is marked as an event in "
    "the sample metadata, `no_event` when it is not, and `no_event_so_far` when no transition from the end of the "
    "context up to and including its own is an event (what a model can know the future of)."
)
SPLIT_NAMES = {"all": "all", "no_event": "unkicked", "event": "kicked", "no_event_so_far": "unkicked so far"}


def over_copy_last(modes: dict, mode: str, split: str, metric: str = "mse") -> list[float | None] | None:
    """`metric` of `mode` over copy-last's per horizon step (from a metrics.json "modes" or "decoded" modes
    section: pixel "mse", or latent "l1"), or None when either is missing."""
    ours = modes.get(mode, {}).get(split, {}).get(metric)
    base = modes.get("copy_last", {}).get(split, {}).get(metric)
    if ours is None or base is None:
        return None
    return [None if a is None or not b else a / b for a, b in zip(ours, base, strict=True)]
