"""The README's main command, `bash scripts/run_demo.sh`, on the tiny config: a run stopped by Ctrl-C is neither
evaluated nor compared; running the script again resumes it and evaluates it only once it has finished."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from worldmodel.run.checkpoint import latest_checkpoint, read_finished, read_state

pytestmark = pytest.mark.slow  # the whole demo script, twice

ROOT = Path(__file__).resolve().parents[1]


def _demo(digits_shards: Path, runs: Path, *overrides: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DEMO_CONFIG": "configs/tiny.yaml",
        "DEMO_DATA": str(digits_shards),
        "DEMO_RUNS": str(runs),
    }
    return subprocess.Popen(
        ["bash", "scripts/run_demo.sh", *overrides],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


def test_ctrl_c_during_the_demo_stops_it_unevaluated_and_the_next_run_resumes(digits_shards, tmp_path):
    runs = tmp_path / "demo"
    jepa = runs / "none"
    demo = _demo(digits_shards, runs, "train.steps=100000", "train.checkpoint_every=100000")
    try:
        deadline = time.monotonic() + 240
        while _lines(jepa / "metrics.jsonl") < 2:
            assert demo.poll() is None, f"the demo exited early:\n{demo.stdout.read()[-4000:]}"
            assert time.monotonic() < deadline, "the demo did not start training"
            time.sleep(0.1)
        os.killpg(demo.pid, signal.SIGINT)  # Ctrl-C: the whole foreground process group
        out, _ = demo.communicate(timeout=120)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
    assert demo.returncode == 75, out[-4000:]
    assert "none stopped before train.steps" in out and "run this script again to resume" in out
    assert read_finished(jepa) is None
    assert not (jepa / "eval").exists() and not (runs / "adassl_v").exists() and not (runs / "compare").exists()
    step = read_state(latest_checkpoint(jepa))["step"]

    demo = _demo(digits_shards, runs, f"train.steps={step + 3}")
    out, _ = demo.communicate(timeout=600)
    assert demo.returncode == 0, out[-4000:]
    assert f"resumed from {jepa / 'checkpoints'}" in out and f"(step {step}," in out
    for latent in ("none", "adassl_v"):
        metrics = json.loads((runs / latent / "eval" / "metrics.json").read_text())
        assert metrics["finished"] is True and metrics["checkpoint_step"] == step + 3, latent
        assert metrics["decoded"]["decoder"]["checkpoint_step"] == step + 3, latent  # the demo decodes rollouts
        assert (runs / latent / "eval" / "decoded-00.gif").is_file()
    compare = json.loads((runs / "compare" / "compare.json").read_text())
    assert compare["warnings"] == [] and {r["units"] for r in compare["headline"]["rows"]} == {"pixels"}
    assert "PSNR dB unkicked" in out  # the demo's last lines: the headline table

    demo = _demo(digits_shards, runs, f"train.steps={step + 3}")
    out, _ = demo.communicate(timeout=300)
    assert demo.returncode == 0, out[-4000:]
    assert out.count("final checkpoint is evaluated already") == 2, out[-4000:]
