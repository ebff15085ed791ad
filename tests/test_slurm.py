"""docker/slurm_train.sbatch under a real Slurm: slurmctld and slurmd on 127.0.0.1 (one node with this machine's
CPUs, auth/none, a private config and state under a temporary folder), the script's bare-metal variant
(RUNTIME=none: this repository and this interpreter, no container), 2 CPU processes (gloo), configs/tiny.yaml.

- the time-limit warning (`--signal=B:USR1@...`) makes every rank checkpoint, the job is requeued, and the
  requeued job continues from that checkpoint and finishes;
- a user's `scancel` stops the job for good (no requeue);
- a job whose run finishes is not requeued.

Needs Debian's Slurm (`apt-get install slurmctld slurmd slurm-client`, which .ci/run does when it can) and root
(slurmd starts the job's processes); skipped otherwise, with the reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "docker" / "slurm_train.sbatch"
DAEMONS = ("slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo")
missing = [name for name in DAEMONS if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]
pytestmark = [
    pytest.mark.slow,  # a real Slurm: minutes
    pytest.mark.skipif(bool(missing), reason=f"Slurm is not installed ({', '.join(missing)} missing)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="slurmd must run as root to start the jobs' processes"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class Cluster:
    """A one-node Slurm on this machine; `run` calls a client command against it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}

    def run(self, *cmd: str, check: bool = True) -> str:
        result = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {result.stderr}")
        return result.stdout

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as {key: value} (JobState, Restarts, ...)."""
        text = self.run("scontrol", "show", "job", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait_for(self, predicate, what: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n{self.logs()}")
            time.sleep(1)

    def logs(self) -> str:
        parts = []
        for path in sorted(self.root.glob("*.out")) + sorted((self.root / "log").glob("*.log")):
            parts.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-40:]))
        return "\n".join(parts)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "log"):
        (root / sub).mkdir()
    node = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    (root / "slurm.conf").write_text(
        f"""ClusterName=wmtest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/none
CredType=cred/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
MpiDefault=none
ReturnToService=2
KillWait=30
MinJobAge=600
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""
    )
    c = Cluster(root)
    try:
        for daemon in ([_binary("slurmctld"), "-i"], [_binary("slurmd")]):
            started = subprocess.run(daemon, env=c.env, timeout=60, capture_output=True, text=True)
            if started.returncode != 0:  # the scheduler itself cannot run here (not the code under test)
                pytest.skip(f"{daemon[0]} does not start on this machine: {started.stderr.strip()[-500:]}")
        try:
            c.wait_for(lambda: "idle" in c.run("sinfo", "-h", "-o", "%T", check=False), "the node to be idle", 60)
        except AssertionError as err:  # the scheduler itself cannot run here (not the code under test)
            pytest.skip(f"a one-node Slurm does not come up on this machine:\n{err}")
        yield c
    finally:
        c.run("scontrol", "shutdown", check=False)
        for pid_file in ("slurmd.pid", "slurmctld.pid"):
            path = root / pid_file
            if path.exists():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(path.read_text()), 9)


def _config(path: Path, shards: Path, steps: int) -> None:
    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    cfg["data"].update(train_shards=f"{shards}/train/shard-*.tar", val_shards=f"{shards}/val/shard-*.tar")
    cfg["train"].update(steps=steps, checkpoint_every=100000, log_every=10)
    path.write_text(yaml.safe_dump(cfg))


def _submit(cluster: Cluster, cfg: Path, run_dir: Path, *sbatch_args: str) -> str:
    env = {
        **cluster.env, "RUNTIME": "none", "REPO": str(REPO), "PYTHON": sys.executable, "ACCELERATE_USE_CPU": "1",
        "GPUS_PER_NODE": "2", "OMP_NUM_THREADS": "1",
    }  # fmt: skip
    result = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", f"--cpus-per-task={os.cpu_count() or 1}", "--gpus-per-node=0",
         f"--output={cluster.root}/job-%j.out", *sbatch_args, str(SBATCH), "--config", str(cfg),
         f"run_dir={run_dir}"],
        env=env, capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def _output(cluster: Cluster, job_id: str) -> str:
    path = cluster.root / f"job-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else ""


def test_time_limit_warning_checkpoints_requeues_and_the_requeued_job_finishes(cluster, digits_shards, tmp_path):
    cfg, run_dir = tmp_path / "cfg.yaml", tmp_path / "run"
    _config(cfg, digits_shards, steps=100000)
    job = _submit(cluster, cfg, run_dir, "--time=2", "--signal=B:USR1@100")
    cluster.wait_for(lambda: "requeueing job" in _output(cluster, job), "the time-limit warning and the requeue")
    out = _output(cluster, job)
    assert "time limit near: asking the trainers to checkpoint and stop" in out
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1, out[-3000:]
    step = int(checkpoints[0].name.removeprefix("step-"))
    state = json.loads((checkpoints[0] / "state.json").read_text())
    assert state["world_size"] == 2 and {"rng-rank0.pt", "rng-rank1.pt"} <= set(state["files"])
    assert not (run_dir / "finished.json").exists()

    _config(cfg, digits_shards, steps=step + 3)  # the requeued job reads its config again: let it finish soon
    # Slurm holds a requeued job back for a while (BeginTime); release it now rather than wait.
    cluster.wait_for(lambda: cluster.job(job)["JobState"] == "PENDING", "the job to be pending again", 60)
    cluster.run("scontrol", "update", f"JobId={job}", "BeginTime=now", check=False)
    cluster.wait_for(lambda: cluster.job(job)["JobState"] == "COMPLETED", "the requeued job to complete")
    info, out = cluster.job(job), _output(cluster, job)
    assert info["Restarts"] == "1", info
    assert f"resumed from {checkpoints[0]} (step {step}," in out
    assert json.loads((run_dir / "finished.json").read_text())["step"] == step + 3
    assert out.count("requeueing job") == 1 and "[slurm] finished" in out


def test_a_users_scancel_stops_the_job_without_requeue(cluster, digits_shards, tmp_path):
    cfg, run_dir = tmp_path / "cfg.yaml", tmp_path / "run"
    _config(cfg, digits_shards, steps=100000)
    job = _submit(cluster, cfg, run_dir)
    metrics = run_dir / "metrics.jsonl"
    cluster.wait_for(lambda: metrics.exists() and metrics.read_text().strip(), "training to start", 120)
    cluster.run("scancel", job)
    cluster.wait_for(lambda: cluster.job(job)["JobState"] == "CANCELLED", "the job to be cancelled", 120)
    time.sleep(5)  # a requeue from the script would show by now
    info = cluster.job(job)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", info
    assert not (run_dir / "finished.json").exists()
    assert "requeueing" not in _output(cluster, job)


def test_a_finished_run_is_not_requeued(cluster, digits_shards, tmp_path):
    cfg, run_dir = tmp_path / "cfg.yaml", tmp_path / "run"
    _config(cfg, digits_shards, steps=6)
    job = _submit(cluster, cfg, run_dir)
    cluster.wait_for(lambda: cluster.job(job)["JobState"] in ("COMPLETED", "FAILED"), "the job to end", 180)
    info, out = cluster.job(job), _output(cluster, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", out[-3000:]
    assert json.loads((run_dir / "finished.json").read_text())["step"] == 6
    assert "[slurm] finished (step status 0" in out and "requeueing" not in out
