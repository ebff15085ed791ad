"""End to end: train a tiny run for a few steps on real shards, evaluate it, compare, and the clear errors."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shard_helpers import read_samples

from data_pipeline.writer import Sample, write_samples
from data_pipeline.writer.encode import encode_h264
from worldmodel.eval import EvaluationError
from worldmodel.eval.compare import compare_runs
from worldmodel.eval.runner import evaluate_run
from worldmodel.run.config import load_config, save_config
from worldmodel.train.loop import train
from worlds.moving_digits import simulate

ROOT = Path(__file__).resolve().parents[1]
ADASSL_MODES = {"copy_last", "prior_mean", "posterior", "zero", "best_of_k", "mean_of_k"}


def _train_tiny(run_dir: Path, shards: Path, latent: str) -> Path:
    cfg = load_config(
        ROOT / "configs" / "tiny.yaml",
        [
            f"run_dir={run_dir}",
            f"data.train_shards={shards / 'train' / '*.tar'}",
            f"data.val_shards={shards / 'val' / '*.tar'}",
            f"model.latent={latent}",
        ],
    )
    train(cfg)
    return run_dir


@pytest.fixture(scope="module")
def tiny_run(digits_shards, tmp_path_factory):
    return _train_tiny(tmp_path_factory.mktemp("runs") / "adassl_v", digits_shards, "adassl_v")


@pytest.fixture(scope="module")
def evaluated(tiny_run, digits_shards):
    """The CLI, as a user runs it, on the held-out shards."""
    shards = str(digits_shards / "val" / "*.tar")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), "--run", str(tiny_run), "--shards", shards],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return tiny_run, json.loads((tiny_run / "eval" / "metrics.json").read_text())


def test_evaluate_writes_metrics_report_and_pngs(evaluated, digits_shards):
    run, metrics = evaluated
    out = run / "eval"
    assert metrics["latent"] == "adassl_v" and metrics["checkpoint_step"] == 6
    horizon = metrics["horizon"]
    assert horizon == 2 and metrics["num_clips"] == 8
    # a step in seconds of video: the run's frame_step over the fps the shards' KEY.json give
    (fps,) = {json.loads(sample["json"])["fps"] for sample in read_samples(digits_shards, "val").values()}
    frame_step = load_config(run / "config.yaml").data.frame_step
    assert metrics["fps"] == fps and metrics["frame_step"] == frame_step
    assert metrics["seconds_per_step"] == pytest.approx(frame_step / fps)
    assert metrics["horizon_seconds"] == pytest.approx([h * frame_step / fps for h in range(1, horizon + 1)])
    assert set(metrics["modes"]) == ADASSL_MODES
    for entry in metrics["modes"].values():
        assert set(entry) == {"all", "event", "no_event", "no_event_so_far"}
        assert all(len(entry["all"][m]) == horizon for m in ("l1", "l2", "cos", "energy_score"))
        assert all(v >= 0 for v in entry["all"]["l1"])
        # a step with no event so far has no event on its own transition either; at h=1 the two are the same
        so_far, no_event = entry["no_event_so_far"]["count"], entry["no_event"]["count"]
        assert so_far[0] == no_event[0] and all(a <= b for a, b in zip(so_far, no_event, strict=True))
    best = np.mean(metrics["modes"]["best_of_k"]["all"]["l1"])
    assert best <= np.mean(metrics["modes"]["mean_of_k"]["all"]["l1"]) + 1e-7
    # a deterministic mode's ES is its RMS error per clip: its clip mean is at most the root of the mean l2
    for mode in ("copy_last", "prior_mean", "posterior"):
        entry = metrics["modes"][mode]["all"]
        assert all(e <= np.sqrt(l2) + 1e-6 for e, l2 in zip(entry["energy_score"], entry["l2"], strict=True))
    # best_of_k and mean_of_k carry the one ES and spread-skill of their K futures
    sampled = metrics["modes"]["best_of_k"]["all"], metrics["modes"]["mean_of_k"]["all"]
    assert sampled[0]["energy_score"] == sampled[1]["energy_score"]
    assert sampled[0]["spread_skill"] == sampled[1]["spread_skill"] and min(sampled[0]["spread_skill"]) > 0
    assert len(metrics["diversity"]) == horizon and min(metrics["diversity"]) >= 0
    probes = metrics["probes"]
    assert set(probes["encoded"]) == {"x0", "y0", "vx0", "vy0"}
    assert len(probes["predicted"]["prior_mean"]["x0"]) == horizon
    assert "digit0" in probes["labels"]
    assert metrics["latent_action"]["headline"] == "innovation"
    assert metrics["latent_action"]["detector"]["name"] == "kl"
    assert metrics["collapse"]["online"]["emb_eff_rank"] >= 1.0
    target = metrics["collapse"]["target"]
    assert target["target_var"] > 0 and target["target_eff_rank"] >= 1.0 and target["drift"] >= 0
    history = metrics["training_health"]  # from the run's metrics.jsonl, the same monitors during training
    assert history["step"] and len(history["drift"]) == len(history["step"]) == len(history["target_eff_rank"])
    assert any(n.startswith("latent-action probe: transitions 0..0") for n in metrics["notes"])
    leakage = metrics["leakage"]  # an inferred r: the shuffled-r and transfer checks (leakage.py)
    assert set(leakage["shuffle"]) == {"all", "event", "no_event"} and leakage["unpaired_clips"] == 0
    assert leakage["shuffle"]["all"]["count"] == 8 * (4 + 2 - 1 - leakage["skipped_transitions"])
    assert all(leakage["shuffle"]["all"][k] > 0 for k in ("own", "shuffled", "prior_mean"))
    assert leakage["transfer"]["names"] == ["x0", "y0"] and leakage["transfer"]["num_clips"] == 4
    health = metrics["rollout_health"]  # where rollouts break: all clips, the deterministic modes and one sample
    assert health["num_clips"] == 8 and set(health["modes"]) == {
        *ADASSL_MODES - {"best_of_k", "mean_of_k"},
        "prior_sample",
    }
    assert len(health["target"]["eff_rank"]) == horizon and all(r >= 1.0 for r in health["target"]["eff_rank"])
    assert all(r > 0 for e in health["modes"].values() for r in e["norm_ratio"])
    position = probes["position_error"]["splits"]  # per split, on the probe's 4 test clips
    assert {"prior_mean", "copy_last", "copy_last_read", "best_of_k", "prior_sample"} <= set(position)
    assert set(position["prior_mean"]) == {"all", "event", "no_event", "no_event_so_far"}
    assert position["prior_mean"]["all"]["count"] == [4] * horizon
    assert position["prior_mean"]["all"]["rmse"] == pytest.approx(probes["position_error"]["predicted"]["prior_mean"])
    report = (out / "report.md").read_text()
    assert "copy_last" in report and "nearest-neighbour retrieval" in report
    assert f"One step = {frame_step / fps:.3g} s of video (frame_step {frame_step} at {fps:g} fps)" in report
    assert "## Where rollouts break" in report and "### Probe-read position error, no-event-so-far steps" in report
    assert "### Energy score, no-event-so-far steps" in report
    assert "## Leakage and transfer of the inferred r" in report and "transfer (r_A on B)" in report
    pngs = sorted(out.glob("*.png"))
    assert {p.name for p in pngs} == set(metrics["plots"]) and "errors.png" in metrics["plots"]
    assert "probes.png" in metrics["plots"] and "strip-00.png" in metrics["plots"]
    assert "rollout_health.png" in metrics["plots"]
    for png in pngs:
        with Image.open(png) as image:
            image.verify()
            assert image.format == "PNG"


def test_compare_puts_runs_side_by_side(evaluated, tmp_path):
    run, _ = evaluated
    twin = tmp_path / "twin"
    shutil.copytree(run / "eval", twin / "eval")
    result = compare_runs([run, twin], tmp_path / "compare")
    rows = {row["name"]: row["values"] for row in result["rows"]}
    l1 = rows["L1 best_of_k (event)"]
    assert len(l1) == 2 and l1[0] == l1[1] and len(l1[0]) == 2  # steps 1 and H=2
    assert "KL (detector) event AUC" in rows and "latent headline event AUC" in rows
    assert (tmp_path / "compare" / "compare.md").read_text().count("|") > 20
    assert json.loads((tmp_path / "compare" / "compare.json").read_text())["labels"] == ["adassl_v", "twin"]
    with pytest.raises(EvaluationError, match="evaluate the run first"):
        compare_runs([tmp_path / "never_evaluated"], tmp_path / "compare")


def test_clear_errors_for_missing_checkpoint_and_long_horizon(evaluated, digits_shards, tmp_path):
    run, _ = evaluated
    shards = str(digits_shards / "val" / "*.tar")
    with pytest.raises(EvaluationError, match="exceeds|between 1 and data.num_target=2"):
        evaluate_run(run, shards, horizon=3, progress=False)
    empty = tmp_path / "untrained"
    empty.mkdir()
    save_config(load_config(run / "config.yaml"), empty / "config.yaml")
    with pytest.raises(EvaluationError, match="no complete checkpoint"):
        evaluate_run(empty, shards, progress=False)
    with pytest.raises(EvaluationError, match="config.yaml does not exist"):
        evaluate_run(tmp_path, shards, progress=False)


def test_cli_prints_a_clear_error_and_exits_2(tmp_path, digits_shards, capsys):
    spec = importlib.util.spec_from_file_location("evaluate_cli", ROOT / "evaluate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["--run", str(tmp_path), "--shards", str(digits_shards / "val" / "*.tar")]) == 2
    assert "config.yaml does not exist" in capsys.readouterr().err


def _shards_without_ground_truth(out: Path) -> Path:
    rng = np.random.default_rng(0)
    samples = []
    for i in range(6):
        frames, meta = simulate(10, rng)
        bare = {k: meta[k] for k in ("fps", "num_frames", "height", "width")}
        samples.append(Sample(f"bare_{i}", encode_h264(frames, meta["fps"]), "mp4", bare, f"bare_{i}"))
    write_samples(samples, out, progress=False)
    return out


def test_shards_without_state_skip_probes_with_notes(evaluated, tmp_path):
    run, _ = evaluated
    bare = _shards_without_ground_truth(tmp_path / "bare")
    metrics = evaluate_run(run, str(bare / "*.tar"), num_clips=6, progress=False)
    assert set(metrics["modes"]["copy_last"]) == {"all"}  # no events: no split
    assert "encoded" not in metrics["probes"] and "labels" not in metrics["probes"]
    assert metrics["rollout_health"]["num_clips"] == 6 and "rollout_health.png" in metrics["plots"]
    notes = " ".join(metrics["notes"])
    assert "no `state` field" in notes and "no `events` field" in notes and "no `action` field" in notes
    assert "action_r2" not in metrics["latent_action"]["features"]["innovation"]
    assert metrics["latent_action"]["detector"]["mean"] >= 0
