"""The image's build context (.dockerignore), its install steps (scripts/install.sh) and its entrypoint's runs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def dockerignore_patterns(path: Path = REPO / ".dockerignore") -> list[tuple[bool, re.Pattern]]:
    """.dockerignore as (is_exception, regex) in file order (Docker's syntax: *, ?, ** and leading !)."""
    patterns = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        for token in re.split(r"(\*\*/|\*\*|\*|\?)", pattern):
            regex += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(token, re.escape(token))
        patterns.append((exception, re.compile(regex + r"\Z")))
    return patterns


def is_ignored(rel_path: str, patterns: list[tuple[bool, re.Pattern]]) -> bool:
    """Whether Docker leaves `rel_path` (posix, relative to the context root) out of the build context.

    The last matching pattern wins; a pattern that matches a directory also covers everything below it.
    """
    parts = rel_path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for exception, regex in patterns:
        if any(regex.match(prefix) for prefix in prefixes):
            ignored = not exception
    return ignored


def build_context(dest: Path) -> list[str]:
    """Copy the repository as `docker build .` would send it (filtered by .dockerignore); returns the files."""
    patterns = dockerignore_patterns()
    copied = []
    for root, dirs, files in os.walk(REPO):
        rel_root = Path(root).relative_to(REPO).as_posix()
        rel = lambda name, r=rel_root: name if r == "." else f"{r}/{name}"  # noqa: E731
        dirs[:] = [d for d in dirs if not is_ignored(rel(d), patterns)]
        for name in files:
            if is_ignored(rel(name), patterns):
                continue
            (dest / rel_root).mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(root) / name, dest / rel(name))
            copied.append(rel(name))
    return copied


def test_dockerignore_keeps_the_source_and_drops_local_state():
    patterns = dockerignore_patterns()
    for path in [
        ".venv/bin/python",
        ".git/HEAD",
        "runs/tiny/metrics.jsonl",
        "data/moving_digits/train/x.tar",
        "worldmodel/__pycache__/model.cpython-311.pyc",
        "adassl_worldmodel.egg-info/PKG-INFO",
        ".pytest_cache/v/x",
        ".ruff_cache/x",
        ".import_linter_cache/x",
    ]:
        assert is_ignored(path, patterns), f".dockerignore should leave out {path}"
    needed = [
        "train.py",
        "evaluate.py",
        "pyproject.toml",
        "constraints.txt",
        "README.md",
        "scripts/install.sh",
        "docker/entrypoint.sh",
        "docker/launch_multinode.sh",
        "configs/tiny.yaml",
        "worldmodel/model/world_model.py",
        "data_pipeline/stream.py",
        "worlds/moving_digits.py",
    ]
    for path in needed:
        assert (REPO / path).exists(), f"{path} is expected in the repository"
        assert not is_ignored(path, patterns), f".dockerignore leaves out {path}, which the image needs"


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep and not line.startswith("#"):
            pins[re.sub(r"[-_.]+", "-", name.strip()).lower()] = version.strip()
    return pins


IMPORT_ALL = """
import importlib, importlib.metadata as md, json, pkgutil, sys
import data_pipeline, worldmodel, worlds
modules = {}
for package in (data_pipeline, worldmodel, worlds):
    modules[package.__name__] = package.__file__
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        modules[info.name] = importlib.import_module(info.name).__file__
versions = {d.metadata["Name"].lower().replace("_", "-"): d.version for d in md.distributions()}
print(json.dumps({"modules": modules, "versions": versions}))
"""


def test_install_script_builds_an_importable_project_in_a_new_venv(tmp_path):
    """The install steps of the image are scripts/install.sh, so this test runs that script the way the
    Dockerfile does: `deps`, then `NO_EDITABLE=1 ... project` on a copy of the build context (the repository filtered
    by .dockerignore) into a new virtual environment, and imports every module of the installed project from outside
    the source tree.

    The dependency layer: a clean `install.sh VENV deps` installs 6.1 GB (torch with its CUDA wheels) and took 75 s
    here from local wheel files, too heavy for every test run. By default the new venv therefore sees the pinned
    packages of the running environment through a .pth file (what Docker's cached dependency layer is to a source
    rebuild); install.sh `deps` still runs and pip must find every pin of constraints.txt satisfied, and the project
    itself is built and installed for real. ADASSL_TEST_CLEAN_INSTALL=1 installs the dependencies from scratch instead.
    """
    context, venv, elsewhere = tmp_path / "context", tmp_path / "venv", tmp_path / "cwd"
    context.mkdir()
    elsewhere.mkdir()
    files = build_context(context)
    assert "scripts/install.sh" in files and not any(f.startswith(".venv/") for f in files)

    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    if os.environ.get("ADASSL_TEST_CLEAN_INSTALL") != "1":
        site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
        assert site.is_dir(), f"unexpected venv layout: {site} missing"
        (site / "_deps_layer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    def install(*args: str, **extra_env: str) -> str:
        result = subprocess.run(
            ["bash", str(context / "scripts" / "install.sh"), str(venv), *args],
            cwd=elsewhere,
            env={**env, **extra_env},
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert result.returncode == 0, f"install.sh {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    install("deps")
    out = install("project", NO_EDITABLE="1")
    assert "project installed" in out

    result = subprocess.run(
        [str(venv / "bin" / "python"), "-c", IMPORT_ALL], cwd=elsewhere, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"the installed project does not import:\n{result.stderr}"
    report = json.loads(result.stdout.strip().splitlines()[-1])
    modules = report["modules"]
    expected = {
        p.relative_to(context).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")
        for pkg in ("worldmodel", "data_pipeline", "worlds")
        for p in (context / pkg).rglob("*.py")
    }
    assert expected <= set(modules), f"modules missing from the installed package: {sorted(expected - set(modules))}"
    for name, file in modules.items():
        assert Path(file).is_relative_to(venv), f"{name} was imported from {file}, not from the installed copy"

    versions = report["versions"]
    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    assert version and versions.get("adassl-worldmodel") == version.group(1)
    wrong = {n: (versions[n], v) for n, v in _pins().items() if n in versions and versions[n] != v}
    assert not wrong, f"installed versions differ from constraints.txt (installed, pinned): {wrong}"
    assert {"torch", "accelerate", "webdataset", "timm"} <= set(versions)


def test_entrypoint_runs_a_command_or_trains(digits_shards, tmp_path):
    entrypoint = REPO / "docker" / "entrypoint.sh"
    env = {**os.environ, "PYTHON": sys.executable, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    command = subprocess.run([str(entrypoint), "python", "-c", "print('as a command')"], env=env, capture_output=True,
                             text=True, timeout=60)  # fmt: skip
    assert command.returncode == 0 and command.stdout.strip() == "as a command", command.stderr

    run_dir = tmp_path / "run"
    shards = f"data.train_shards={digits_shards}/train/shard-*.tar"
    args = ["--config", "configs/tiny.yaml", f"run_dir={run_dir}", shards, "data.num_workers=0", "train.steps=2"]
    train = subprocess.run([str(entrypoint), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, f"{train.stdout[-2000:]}\n{train.stderr[-4000:]}"
    assert "node 0 of 1, 1 process(es) here, 1 in all" in train.stderr
    assert (run_dir / "checkpoints" / "step-00000002" / "state.json").is_file()
