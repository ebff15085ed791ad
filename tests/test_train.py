"""train.py end to end on real shards: gloo ranks through `accelerate launch`, kills, resumes, NaN, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from worldmodel.eval.runner import evaluate_run, evaluated_final
from worldmodel.model.world_model import WorldModel
from worldmodel.run.checkpoint import checkpoint_dir, latest_checkpoint, load_model_state, read_finished, read_state
from worldmodel.run.config import load_config
from worldmodel.train.launch import EXIT_STOPPED, StopRequest
from worldmodel.train.setup import build_optimizer

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).parent / "accelerate"
TWO_GLOO_RANKS = [
    str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
    "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
]  # fmt: skip


def _args(
    run_dir: Path, shards: Path, *overrides: str, resume: str | None = None, script: str = "train.py"
) -> list[str]:
    """train.py's arguments (`script`: tests/train_hooks.py for train.py with the test hooks of HOOK_* variables)."""
    args = [
        script,
        "--config",
        "configs/tiny.yaml",
        f"run_dir={run_dir}",
        f"data.train_shards={shards}/train/shard-*.tar",
        f"data.val_shards={shards}/val/shard-*.tar",
        *overrides,
    ]
    return args + (["--resume", resume] if resume else [])


HOOKS = "tests/train_hooks.py"


def _env(**hooks: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", **hooks}


def _run(cmd: list[str], timeout: float = 120, **hooks: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=_env(**hooks), capture_output=True, text=True, timeout=timeout)


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_states_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"training exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "timed out waiting for the training run"
        time.sleep(0.05)


def test_sigkill_then_resume_auto_restores_the_checkpoint_and_finishes(digits_shards, tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(
        _python(*_args(run, digits_shards, "train.steps=400", "train.checkpoint_every=2")),
        cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_for(lambda: (c := latest_checkpoint(run)) is not None and read_state(c)["step"] >= 4, first)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    saved = latest_checkpoint(run)
    saved_step, saved_epoch = read_state(saved)["step"], read_state(saved)["epoch"]
    saved_model = load_file(saved / "model.safetensors")
    saved_opt = torch.load(saved / "optimizer.pt", weights_only=True)

    target = saved_step + 2
    result = _run(
        _python(*_args(run, digits_shards, f"train.steps={target}", resume="auto", script=HOOKS)), HOOK_DUMP_STATE="1"
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"resumed from {saved}" in result.stdout + result.stderr

    restored = torch.load(run / "debug" / "resumed-rank0.pt", weights_only=True)
    _assert_states_equal(restored["model"], saved_model)
    assert restored["optimizer"]["param_groups"] == saved_opt["param_groups"]
    for pid, state in saved_opt["state"].items():
        _assert_states_equal(restored["optimizer"]["state"][pid], state)

    assert read_state(latest_checkpoint(run))["step"] == target
    steps = [r["step"] for r in _metrics(run)]
    assert steps == list(range(1, target + 1))  # records logged after the checkpoint by the killed run are gone
    resumed_record = next(r for r in _metrics(run) if r["step"] == saved_step + 1)
    assert resumed_record["epoch"] == saved_epoch + 1  # fresh samples: the stream continues with the next epoch


def test_unknown_config_key_fails_fast_listing_valid_keys(tmp_path):
    result = _run(_python("train.py", "--config", "configs/tiny.yaml", f"run_dir={tmp_path}", "train.stepz=3"))
    assert result.returncode == 2
    assert "unknown config key(s) train.stepz" in result.stderr
    assert "valid keys: train.steps, train.checkpoint_every" in result.stderr
    assert not (tmp_path / "config.yaml").exists()


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("model.pred_cond_depth=99", "model.pred_cond_depth=99 must be in [1, model.pred_depth - 1]"),
        ("model.recon_mask=0.1", "model.recon_mask=0.1 and model.recon_sigma_start=0.0 shape the reconstruction"),
        ("model.frame_dim=33 model.frame_head=keypoints", "needs an even model.frame_dim"),
        ("model.rollout_steps=6", "model.rollout_steps=6 needs clips of more frames than that"),
    ],
)
def test_a_bad_combination_of_keys_exits_2_with_one_line_before_start_up(tmp_path, override, says):
    """Combinations only the model's constructors check stop before the process group, the data and the run folder
    (checked on the meta device): exit 2, one line, no traceback; the shards named do not even exist."""
    missing = tmp_path / "no-shards"
    result = _run(_python(*_args(tmp_path / "run", missing, *override.split())))
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("config error: ") and says in lines[0], result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # two gloo processes
def test_nan_on_one_rank_stops_both_and_keeps_the_last_good_checkpoint(digits_shards, tmp_path):
    run = tmp_path / "run"
    # checks at the log and checkpoint steps 2 and 4 only: the NaN of step 3 is found at step 4, before its checkpoint
    overrides = ("train.checkpoint_every=2", "train.log_every=2", "train.check_every=10")
    result = _run(TWO_GLOO_RANKS + _args(run, digits_shards, *overrides, script=HOOKS), HOOK_NAN_AT_STEP="3")
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "non-finite loss at step 3 (epoch 0; found at the check of step 4" in output
    for term in ("loss=nan", "pred=", "reg=", "kl=", "grad_norm="):
        assert term in output, term
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000002"]
    assert latest_checkpoint(run) == checkpoint_dir(run, 2)
    model = WorldModel(load_config(run / "config.yaml").model)
    load_model_state(model, checkpoint_dir(run, 2))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert [r["step"] for r in _metrics(run)] == [2]

    again = _run(_python(*_args(run, digits_shards)))  # a fresh start must not mix with the existing run
    assert again.returncode == 2
    assert "already holds checkpoints (newest step-00000002); pass --resume auto" in again.stderr


@pytest.mark.slow  # two gloo processes
def test_sigterm_to_one_rank_checkpoints_both_at_the_step_boundary_and_exits_cleanly(digits_shards, tmp_path):
    run = tmp_path / "run"
    launcher = subprocess.Popen(
        TWO_GLOO_RANKS
        + _args(run, digits_shards, "train.steps=400", "train.checkpoint_every=1000", "data.num_workers=1"),
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_for(lambda: (run / "metrics.jsonl").is_file() and len(_metrics(run)) >= 2, launcher)
        ranks = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
        assert len(ranks) == 2, ranks
        # pre-emption as launchers deliver it: to one rank's process group (the trainer and its DataLoader
        # worker); the other rank must follow at the same step boundary
        os.killpg(int(ranks[-1]), signal.SIGTERM)
        out, err = launcher.communicate(timeout=90)
    finally:
        launcher.kill()
    # the trainers exit with EXIT_STOPPED, which torch.distributed.run reports as a failure of its own (status 1)
    assert launcher.returncode != 0, err[-4000:]
    assert "stop requested" in out + err and "exiting unfinished" in out + err
    saved = latest_checkpoint(run)
    assert saved is not None and read_state(saved)["world_size"] == 2
    assert read_state(saved)["step"] == _metrics(run)[-1]["step"] < 400
    assert read_finished(run) is None


def _stopped_run(run: Path, shards: Path, signals: int = 1) -> tuple[int, str, str]:
    """Start a long single-process run, send it SIGTERM `signals` times once it has logged two steps, and return
    its (exit status, stdout, stderr)."""
    proc = subprocess.Popen(
        _python(*_args(run, shards, "train.steps=100000", "train.checkpoint_every=100000")),
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_for(lambda: (run / "metrics.jsonl").is_file() and len(_metrics(run)) >= 2, proc)
        for _ in range(signals):
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.02)
        out, err = proc.communicate(timeout=90)
    finally:
        proc.kill()
    return proc.returncode, out, err


def test_sigterm_exits_75_unfinished_evaluate_warns_and_resume_finishes(digits_shards, tmp_path, capsys):
    """A stopped run is never taken for a finished one: train.py exits 75 without the completion marker, an
    evaluation of it says "unfinished" and records finished=false, and --resume auto finishes it (exit 0, marker)."""
    run = tmp_path / "run"
    status, out, err = _stopped_run(run, digits_shards)
    assert status == EXIT_STOPPED == 75, err[-4000:]
    assert read_finished(run) is None
    step = read_state(latest_checkpoint(run))["step"]
    assert f"saved {checkpoint_dir(run, step)} at step {step} of 100000; exiting unfinished" in out + err

    metrics = evaluate_run(run, str(digits_shards / "val" / "*.tar"), num_clips=4, progress=False)
    assert metrics["finished"] is False and metrics["checkpoint_step"] == step and metrics["train_steps"] == 100000
    assert f"unfinished run: its newest checkpoint is at step {step} of train.steps=100000" in capsys.readouterr().err
    assert "Warning: unfinished run" in (run / "eval" / "report.md").read_text()
    assert not evaluated_final(run)

    result = _run(_python(*_args(run, digits_shards, f"train.steps={step + 2}", resume="auto")))
    assert result.returncode == 0, result.stderr[-4000:]
    assert read_finished(run) == {"step": step + 2, "checkpoint": str(checkpoint_dir(run, step + 2))}
    again = _run(_python(*_args(run, digits_shards, f"train.steps={step + 2}", resume="auto")))
    assert again.returncode == 0 and "nothing to do" in again.stdout + again.stderr
    assert evaluate_run(run, str(digits_shards / "val" / "*.tar"), num_clips=4, progress=False)["finished"] is True
    assert evaluated_final(run)
    # continued to more steps: unfinished again until it gets there
    more = subprocess.Popen(
        _python(*_args(run, digits_shards, "train.steps=100000", "train.checkpoint_every=100000", resume="auto")),
        cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_for(lambda: len(_metrics(run)) >= step + 4, more)
        assert read_finished(run) is None and not evaluated_final(run)
        more.send_signal(signal.SIGTERM)
        more.communicate(timeout=90)
    finally:
        more.kill()
    assert more.returncode == 75


def test_logged_values_are_means_over_micro_batches_with_grad_accumulation(digits_shards, tmp_path):
    """optim.grad_accum_steps=2 logs the mean over its micro-batches, not half of it: at step 1 (same initial
    weights, the first micro-batch equal to the k=1 run's batch) the logged loss matches the k=1 run's."""
    logged = {}
    for k in (1, 2):
        run = tmp_path / f"k{k}"
        result = _run(_python(*_args(run, digits_shards, "train.steps=1", f"optim.grad_accum_steps={k}")))
        assert result.returncode == 0, result.stderr[-4000:]
        logged[k] = _metrics(run)[0]
    for key in ("loss", "pred", "target_var", "emb_std"):
        ratio = logged[2][key] / logged[1][key]
        assert 0.8 < ratio < 1.25, (key, logged[1][key], logged[2][key])


def test_weight_decay_skips_norms_biases_and_position_embeddings():
    model = WorldModel(load_config(ROOT / "configs/tiny.yaml").model)
    decay, no_decay = build_optimizer(model, load_config(ROOT / "configs/tiny.yaml").optim).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] > 0 and no_decay["weight_decay"] == 0
    assert decayed | exempt == {n for n, p in model.named_parameters() if p.requires_grad}  # no EMA target params
    assert {"encoder.vit.pos_embed", "predictor.pos_embed", "predictor.frame_embed"} <= exempt
    assert "encoder.vit.patch_embed.proj.weight" in decayed and "encoder.vit.patch_embed.proj.bias" in exempt
    assert all("norm" not in n for n in decayed) and all(not n.endswith(".bias") for n in decayed)


def test_repeated_sigterm_still_ends_in_a_checkpoint(digits_shards, tmp_path):
    """Under Slurm every process of a step gets SIGTERM and torch elastic's agent sends another: the trainer must
    still finish its checkpoint."""
    run = tmp_path / "run"
    status, _, err = _stopped_run(run, digits_shards, signals=3)
    assert status == EXIT_STOPPED, err[-4000:]
    saved = latest_checkpoint(run)
    assert saved is not None and read_state(saved)["step"] == _metrics(run)[-1]["step"]


def test_stop_request_keeps_sigterm_graceful_and_escalates_a_second_ctrl_c():
    stop = StopRequest()
    try:
        for _ in range(3):
            os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
        os.kill(os.getpid(), signal.SIGINT)  # after a TERM: the second stop signal, but a first Ctrl-C
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_a_process_group_other_than_the_launcher_announced_is_refused(digits_shards, tmp_path):
    """A launch that fell apart into single-process runs (WORLDMODEL_WORLD_SIZE=2, a group of 1) stops before
    training anything into the shared run directory."""
    env = {**_env(), "WORLDMODEL_WORLD_SIZE": "2"}
    result = subprocess.run(
        _python(*_args(tmp_path / "run", digits_shards)), cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stderr[-4000:]
    assert "the launcher announced 2 processes (WORLDMODEL_WORLD_SIZE) but this process group has 1" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_detached_encoder_is_the_same_for_every_method_at_a_seed(digits_shards, tmp_path):
    """model.pred_trains_encoder=false: the encoder learns from the reconstruction alone, so JEPA, AdaSSL-V (which
    also samples r) and the oracle train the same encoder, bit for bit, and their rollouts compare in one latent
    space: the decoder's initial weights, the blanked squares and the encoder's gradient clipping do not depend on
    the method. The predictors do differ."""
    detached = ["model.frame_head=keypoints", "model.recon_weight=300", "model.recon_mask=0.25",
                "model.pred_trains_encoder=false", "train.steps=4", "train.checkpoint_every=4"]  # fmt: skip
    states = {}
    for latent in ("none", "adassl_v", "oracle"):
        run = tmp_path / latent
        result = _run(_python(*_args(run, digits_shards, *detached, f"model.latent={latent}")))
        assert result.returncode == 0, result.stderr[-4000:]
        states[latent] = load_file(latest_checkpoint(run) / "model.safetensors")
    start = WorldModel(load_config(ROOT / "configs/tiny.yaml").model).state_dict()
    for latent in ("adassl_v", "oracle"):
        for name, value in states["none"].items():
            if name.startswith(("encoder.", "target_encoder.", "decoder.")):
                assert torch.equal(states[latent][name], value), (latent, name)
        assert not torch.equal(states[latent]["predictor.pos_embed"], states["none"]["predictor.pos_embed"])
    assert not torch.equal(states["none"]["encoder.vit.pos_embed"], start["encoder.vit.pos_embed"])  # it trained
