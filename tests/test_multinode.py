"""Two "nodes" on this machine: docker/launch_multinode.sh started twice (NODE_RANK 0 and 1, one CPU process
each, gloo, rendezvous on 127.0.0.1), training configs/tiny.yaml on the digits_shards fixture.

Which samples each rank consumed is observed by running train.py through a small tap (TRAIN_SCRIPT): it wraps the
trainer's real `make_train_loader` and appends every batch's sample keys, with the rank and node it came from, to
a JSONL file, then runs train.py unchanged.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # two-node launches of real processes

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "docker" / "launch_multinode.sh"

TAP = """
import json, os, runpy, sys
from pathlib import Path

sys.path.insert(0, {repo!r})
import worldmodel.train.state as state

real_loader = state.make_train_loader


def recording_loader(cfg, shards, *, seed, epoch, rank, world_size, epochs=1):
    log = Path(os.environ["KEYS_DIR"]) / f"keys-rank{{rank}}.jsonl"
    for batch in real_loader(cfg, shards, seed=seed, epoch=epoch, rank=rank, world_size=world_size, epochs=epochs):
        record = dict(epoch=batch["epoch"], rank=rank, world_size=world_size, node=int(os.environ["GROUP_RANK"]),
                      keys=list(batch["key"]))
        with log.open("a") as f:
            f.write(json.dumps(record) + "\\n")
        yield batch


state.make_train_loader = recording_loader
sys.argv[0] = {train!r}
runpy.run_path({train!r}, run_name="__main__")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK", "LOCAL_RANK", "WORLD_SIZE"))}
    return {**env, "PYTHON": sys.executable, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", **extra}


def _tiny_args(run_dir: Path, shards: Path, *extra: str) -> list[str]:
    return [
        "--config", str(REPO / "configs" / "tiny.yaml"),
        f"run_dir={run_dir}",
        f"data.train_shards={shards}/train/shard-*.tar",
        f"data.val_shards={shards}/val/shard-*.tar",
        "data.num_workers=0",
        *extra,
    ]  # fmt: skip


def _start_two_nodes(args: list[str], cwd: Path, **env: str) -> list[subprocess.Popen]:
    """docker/launch_multinode.sh as node 0 and node 1 of a 2-node job on 127.0.0.1, one CPU process each."""
    common = _launch_env(NNODES="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), GPUS_PER_NODE="1",
                         **env)  # fmt: skip
    return [
        subprocess.Popen(
            ["bash", str(LAUNCHER), *args],
            env={**common, "NODE_RANK": str(rank)},
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]


def _wait(nodes: list[subprocess.Popen], timeout: float = 300) -> list[str]:
    """Both nodes' output once they have exited; kills what is left (their process groups) on a timeout."""
    try:
        return [node.communicate(timeout=timeout)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)


def test_two_nodes_split_the_shards_and_agree_on_the_parameters(digits_shards, tmp_path):
    """The one full 2-rank training run of the suite that ends normally (test_train's 2-rank runs are stopped by a
    NaN or a SIGTERM through `accelerate launch`): the shard split, identical ranks, and what rank 0 writes."""
    run_dir, keys_dir = tmp_path / "run", tmp_path / "keys"
    keys_dir.mkdir()
    tap = tmp_path / "train_tap.py"
    tap.write_text(TAP.format(repo=str(REPO), train=str(REPO / "tests" / "train_hooks.py")))  # train.py + hooks
    # 16 training videos in 4 shards, 8 per rank. A rank's stream cycles over its shards to fill a fixed-length
    # epoch, and its shuffle buffer reads ahead, so an epoch of 2 batches x 2 clips with a buffer of 2 reads at most
    # 6 of the rank's 8 samples: any key seen twice in one epoch would be a broken split.
    args = _tiny_args(
        run_dir, digits_shards, "data.batch_size=2", "data.epoch_batches=2", "data.shuffle_buffer=2",
        "data.clips_per_video=1", "train.steps=4", "train.checkpoint_every=2",
    )  # fmt: skip
    nodes = _start_two_nodes(args, tmp_path, TRAIN_SCRIPT=str(tap), KEYS_DIR=str(keys_dir), HOOK_DUMP_STATE="1")
    logs = _wait(nodes)
    for rank, (node, log) in enumerate(zip(nodes, logs, strict=True)):
        assert node.returncode == 0, f"node {rank} exited with {node.returncode}:\n{log[-4000:]}"
        assert f"node {rank} of 2" in log

    records = [json.loads(line) for rank in (0, 1) for line in (keys_dir / f"keys-rank{rank}.jsonl").open()]
    assert {(r["node"], r["rank"], r["world_size"]) for r in records} == {(0, 0, 2), (1, 1, 2)}
    for epoch in (0, 1):
        per_rank = [[k for r in records if r["rank"] == rank and r["epoch"] == epoch for k in r["keys"]]
                    for rank in (0, 1)]  # fmt: skip
        assert [len(keys) for keys in per_rank] == [4, 4], f"epoch {epoch}: clips per rank {per_rank}"
        every = per_rank[0] + per_rank[1]
        assert len(set(every)) == 8, f"epoch {epoch}: a sample was read twice (rank 0, rank 1): {per_rank}"

    # Parameters, the EMA target encoder and buffers (the target centring) must be identical on both nodes, and so
    # must the optimiser state: every rank applied the same all-reduced gradients.
    states = [torch.load(run_dir / "debug" / f"final-rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    models = [s["model"] for s in states]
    params = {name for name, _ in _world_model(run_dir).named_parameters()}
    assert params and params <= set(models[0]) and models[0].keys() == models[1].keys()
    differ = [n for n in models[0] if not torch.equal(models[0][n], models[1][n])]
    assert not differ, f"model state differs between the nodes: {differ}"
    moments = [[t for p in s["optimizer"]["state"].values() for t in (p["exp_avg"], p["exp_avg_sq"])] for s in states]
    assert moments[0] and all(torch.equal(a, b) for a, b in zip(*moments, strict=True))
    state = json.loads((run_dir / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert state["step"] == 4 and state["world_size"] == 2
    _assert_run_written_once(run_dir, models[0], args)


def _assert_run_written_once(run_dir: Path, rank0_model: dict, args: list[str]) -> None:
    """What rank 0 alone writes for a 2-rank run of 4 steps with a checkpoint every 2: the final checkpoint equals
    the model it trained (with every rank's RNG state and one scheduler step per optimiser step, not per rank), one
    metrics record per step with the monitors, TensorBoard events and the resolved config."""
    from safetensors.torch import load_file

    from worldmodel.run.checkpoint import checkpoint_dir, latest_checkpoint, read_state
    from worldmodel.run.config import load_config

    final = latest_checkpoint(run_dir)
    assert final == checkpoint_dir(run_dir, 4)
    saved = load_file(final / "model.safetensors")
    assert saved.keys() == rank0_model.keys() and all(torch.equal(saved[k], rank0_model[k]) for k in saved)
    assert read_state(final)["epoch"] == 1  # 4 steps of 2-batch epochs: epochs 0 and 1
    assert (final / "rng-rank0.pt").is_file() and (final / "rng-rank1.pt").is_file()
    assert torch.load(final / "scheduler.pt", weights_only=True)["last_epoch"] == 4

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    monitors = ("loss", "pred", "reg", "kl", "beta", "ema_momentum", "lr", "grad_norm", "emb_std", "emb_eff_rank",
                "target_var", "target_eff_rank", "drift", "data_wait", "clips_per_s", "skipped/total")  # fmt: skip
    assert [key for key in monitors if key not in records[-1]] == []
    assert records[0]["beta"] == 0.0 and records[-1]["beta"] > 0.0
    config, overrides = Path(args[1]), args[2:]
    assert load_config(run_dir / "config.yaml") == load_config(config, overrides)
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))


def _world_model(run_dir: Path):
    """A WorldModel built from the run's resolved config (for its parameter names)."""
    from worldmodel.model.world_model import WorldModel
    from worldmodel.run.config import load_config

    return WorldModel(load_config(run_dir / "config.yaml").model)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"NNODES": "2", "NODE_RANK": "2"}, "0 <= NODE_RANK < NNODES"),
        ({"NNODES": "two"}, "nnodes must be a non-negative integer, got 'two'"),
        ({"GPUS_PER_NODE": "0"}, "GPUS_PER_NODE >= 1"),
        ({"TRAIN_SCRIPT": "/nonexistent/train.py"}, "training script not found: /nonexistent/train.py"),
        pytest.param(
            {"ACCELERATE_USE_CPU": "0"},
            "no GPU visible",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible here"),
        ),
        pytest.param(
            {"ACCELERATE_USE_CPU": "0", "GPUS_PER_NODE": "1"},
            "no GPU visible",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible here"),
        ),
    ],
)
def test_launcher_rejects_bad_settings_with_a_clear_message(env, message):
    result = subprocess.run(
        ["bash", str(LAUNCHER), "--config", "configs/tiny.yaml"],
        env=_launch_env(**{"GPUS_PER_NODE": "1", **env}), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_sigterm_to_the_launchers_checkpoints_and_resume_auto_continues(digits_shards, tmp_path):
    """What the SLURM script does on pre-emption: SIGTERM to each node's launcher (not to the trainers), which
    torch.distributed.run forwards; the trainers save a checkpoint and stop; `--resume auto` continues from it.
    The shards are read the way object storage is, through a `pipe:` command (brace-expanded by the pipeline)."""
    run_dir = tmp_path / "run"
    pipe = f"data.train_shards=pipe:cat {digits_shards}/train/shard-{{000000..000003}}.tar"
    args = _tiny_args(run_dir, digits_shards, pipe, "train.steps=100000", "train.checkpoint_every=100000")
    nodes = _start_two_nodes(args, tmp_path)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().strip()) and time.monotonic() < deadline:
        assert all(node.poll() is None for node in nodes), "a node exited before training started"
        time.sleep(0.2)
    for node in nodes:
        node.send_signal(signal.SIGTERM)
    logs = _wait(nodes, timeout=120)
    # torch.distributed.run re-raises the signal after its workers exit, so the launchers' status is not 0.
    saved = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    assert len(saved) == 1, f"expected one checkpoint written on SIGTERM, found {saved}:\n{logs[0][-3000:]}"
    step = int(saved[0].removeprefix("step-"))
    assert 0 < step < 100000
    assert f"stop requested (SIGTERM/Ctrl-C): saved {run_dir / 'checkpoints' / saved[0]}" in logs[0]

    nodes = _start_two_nodes([*args, f"train.steps={step + 2}", "--resume", "auto"], tmp_path)
    logs = _wait(nodes)
    for rank, (node, log) in enumerate(zip(nodes, logs, strict=True)):
        assert node.returncode == 0, f"node {rank} exited with {node.returncode} on resume:\n{log[-4000:]}"
    assert "train_shards: pipe:cat " in (run_dir / "config.yaml").read_text()
    assert f"resumed from {run_dir / 'checkpoints' / saved[0]} (step {step}" in logs[0]
    final = json.loads((run_dir / "checkpoints" / f"step-{step + 2:08d}" / "state.json").read_text())
    assert final["step"] == step + 2 and final["world_size"] == 2
