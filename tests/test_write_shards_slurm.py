"""docker/write_shards_array.sbatch under a real one-node Slurm (the cluster of tests/test_slurm.py): a 2-task job
array writes the two jobs' shards, a merge job that depends on it (afterok) finishes the folder, and the result holds
the samples of a single run in the same order. Skipped where Slurm is not installed or not root, saying why."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from test_slurm import Cluster, cluster, pytestmark  # noqa: F401 (the fixture and the skip marks are used here)
from test_writer_scale import shard_content

from data_pipeline.writer import write_shards
from data_pipeline.writer.encode import encode_h264
from worlds.moving_digits import simulate

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "docker" / "write_shards_array.sbatch"


def _sbatch(slurm: Cluster, *args: str) -> str:
    env = {"RUNTIME": "none", "REPO": str(REPO), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    out = slurm.run(
        "env", *(f"{k}={v}" for k, v in env.items()), "sbatch", "--parsable", "--cpus-per-task=1",
        f"--output={slurm.root}/write-%A_%a.out", *args,
    )  # fmt: skip
    return out.strip().split(";")[0]


def test_job_array_and_dependent_merge_equal_a_single_run(cluster, tmp_path):  # noqa: F811 (the fixture)
    videos = tmp_path / "videos"
    videos.mkdir()
    rng = np.random.default_rng(2)
    for i in range(7):
        (videos / f"clip{i}.mp4").write_bytes(encode_h264(simulate(8, rng)[0], 10.0))
    args = ["--input", str(videos), "--output", str(tmp_path / "out"), "--samples-per-shard", "2", "--val-fraction",
            "0.3"]  # fmt: skip
    array = _sbatch(cluster, "--array=0-1", str(SBATCH), *args)
    merge = _sbatch(cluster, f"--dependency=afterok:{array}", str(SBATCH), "--merge", str(tmp_path / "out"))
    cluster.wait_for(lambda: cluster.job(merge)["JobState"] in ("COMPLETED", "FAILED", "CANCELLED"), "the merge", 180)
    logs = "\n".join(p.read_text() for p in sorted(cluster.root.glob("write-*.out")))
    assert cluster.job(merge)["JobState"] == "COMPLETED", logs
    assert "task 1: job 1 of 2, 1 worker(s)" in logs
    write_shards(videos, tmp_path / "single", samples_per_shard=2, val_fraction=0.3, progress=False)
    for split in ("train", "val"):
        assert shard_content(tmp_path / "out" / split) == shard_content(tmp_path / "single" / split)
        assert not list((tmp_path / "out" / split).glob("job-*"))
