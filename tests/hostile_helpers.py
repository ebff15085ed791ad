"""Helpers the hostile-input tests share: a folder of videos with their sidecars (the writer's input), and a flipped
byte (the damage a bad sector leaves on a checkpoint or a store)."""

from __future__ import annotations

import json
from pathlib import Path


def video_folder(root: Path, clips, names: list[str]) -> Path:
    """`root` holding the videos `names` (NAME.mp4 + NAME.json), one clip each, in order."""
    root.mkdir(parents=True, exist_ok=True)
    for name, (video, sidecar) in zip(names, clips, strict=False):
        (root / f"{name}.mp4").write_bytes(video)
        (root / f"{name}.json").write_text(json.dumps(sidecar))
    return root


def flip_byte(path: Path, offset: int, mask: int = 0x01) -> None:
    """XOR one byte in place: the same size, another content (what a bad sector or a cosmic ray leaves)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ mask]))
