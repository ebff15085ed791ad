"""Real runs of train.py over damaged checkpoints and metrics: fallback, recovery and exit statuses."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hostile_helpers import flip_byte
from test_train import _args as train_args

from worldmodel.run.checkpoint import checkpoint_dir, latest_checkpoint
from worldmodel.run.manifest import verify_checkpoint
from worldmodel.train.launch import EXIT_DIVERGED, EXIT_SOFTWARE, EXIT_STOPPED, EXIT_USAGE

ROOT = Path(__file__).resolve().parents[1]


# ---- real runs of train.py -------------------------------------------------------------------------------------


def _args(run_dir: Path, shards: Path, *overrides: str, resume: str | None = None, script: str = "train.py"):
    """The python command of test_train's train.py arguments."""
    return [sys.executable, *train_args(run_dir, shards, *overrides, resume=resume, script=script)]


def _run(args: list[str], **hooks: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", **hooks}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_run(digits_shards, tmp_path_factory) -> Path:
    """A finished real run: 4 steps, checkpoints at steps 2 and 4, metrics.jsonl with steps 1-4."""
    run = tmp_path_factory.mktemp("hostile") / "run"
    result = _run(_args(run, digits_shards, "train.steps=4", "train.checkpoint_every=2"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert [p.name for p in (run / "checkpoints").iterdir()] in (
        ["step-00000002", "step-00000004"],
        ["step-00000004", "step-00000002"],
    )
    return run


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    return copy


def test_resume_auto_of_a_real_run_with_a_corrupt_newest_checkpoint_falls_back_and_finishes(run_copy, digits_shards):
    newest = checkpoint_dir(run_copy, 4)
    flip_byte(newest / "model.safetensors", newest.joinpath("model.safetensors").stat().st_size // 2)
    result = _run(_args(run_copy, digits_shards, "train.steps=5", "train.checkpoint_every=2", resume="auto"))
    assert result.returncode == 0, result.stderr[-4000:]
    output = result.stdout + result.stderr
    assert f"checkpoint {newest} fails verification (model.safetensors does not match its sha256" in output
    assert f"resumed from {checkpoint_dir(run_copy, 2)}" in output
    assert (run_copy / "checkpoints" / ".corrupt-step-00000004").is_dir()
    assert verify_checkpoint(checkpoint_dir(run_copy, 4)) is None  # step 4 trained and saved again
    assert latest_checkpoint(run_copy) == checkpoint_dir(run_copy, 5)
    assert _steps(run_copy) == [1, 2, 3, 4, 5]  # the records after step 2 were the lost timeline's


def test_an_explicit_resume_of_a_corrupt_checkpoint_or_of_none_intact_exits_2(run_copy, digits_shards):
    bad = checkpoint_dir(run_copy, 4)
    flip_byte(bad / "optimizer.pt", 64)
    result = _run(_args(run_copy, digits_shards, "train.steps=6", resume=str(bad)))
    assert result.returncode == EXIT_USAGE == 2, result.stderr[-4000:]
    assert f"error: --resume {bad} is not a complete, intact checkpoint: optimizer.pt does not match" in result.stderr
    assert "Traceback" not in result.stderr
    flip_byte(checkpoint_dir(run_copy, 2) / "model.safetensors", 300)
    result = _run(_args(run_copy, digits_shards, "train.steps=6", resume="auto"))
    assert result.returncode == 2, result.stderr[-4000:]
    assert "--resume auto: no checkpoint of" in result.stderr and "Traceback" not in result.stderr
    assert checkpoint_dir(run_copy, 2).is_dir() and bad.is_dir()  # nothing moved, nothing trained over them


def test_a_real_run_resumes_over_a_torn_metrics_line_and_a_rename_gap(run_copy, digits_shards):
    metrics = run_copy / "metrics.jsonl"
    metrics.write_bytes(metrics.read_bytes()[:-7])  # killed while writing step 4's record
    step4 = checkpoint_dir(run_copy, 4)
    step4.rename(step4.with_name(f".old-{step4.name}"))  # and a re-save of step 4 killed between its renames
    result = _run(_args(run_copy, digits_shards, "train.steps=5", resume="auto"))
    assert result.returncode == 0, result.stderr[-4000:]
    output = result.stdout + result.stderr
    assert "dropped its torn last line 4" in output
    assert f"recovered {step4} from" in output and f"resumed from {step4}" in output
    assert _steps(run_copy) == [1, 2, 3, 5]  # step 4's record was lost in the kill; nothing else
    assert verify_checkpoint(checkpoint_dir(run_copy, 5)) is None


def test_a_crash_exits_70_a_divergence_1_and_neither_is_taken_for_the_other(digits_shards, tmp_path):
    spec = importlib.util.spec_from_file_location("train_cli", ROOT / "train.py")
    train_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_script)
    assert train_script.EXIT_SOFTWARE == EXIT_SOFTWARE == 70  # train.py's copy, kept before its heavy imports
    assert len({0, EXIT_DIVERGED, EXIT_USAGE, EXIT_SOFTWARE, EXIT_STOPPED}) == 5
    crash = _run(_args(tmp_path / "crash", digits_shards, script="tests/train_hooks.py"), HOOK_RAISE_AT_STEP="2")
    assert crash.returncode == EXIT_SOFTWARE, crash.stderr[-4000:]
    assert "OSError: HOOK_RAISE_AT_STEP: injected failure" in crash.stderr
    assert f"error: unexpected failure (exit status {EXIT_SOFTWARE})" in crash.stderr
    assert "non-finite loss" not in crash.stderr
    nan = _run(_args(tmp_path / "nan", digits_shards, script="tests/train_hooks.py"), HOOK_NAN_AT_STEP="2")
    assert nan.returncode == EXIT_DIVERGED == 1, nan.stderr[-4000:]
    assert "non-finite loss at step 2" in nan.stdout + nan.stderr and "unexpected failure" not in nan.stderr
