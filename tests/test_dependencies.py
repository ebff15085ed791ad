"""The dependency list of pyproject.toml is what the code imports, and constraints.txt pins all of it.

Imports are read with `ast` (top-level and function-local `import`/`from ... import`, and
`importlib.import_module("name")` with a literal name, also through a helper that passes its argument on, like
data_pipeline.decoders._require). An import module is mapped to the distribution that provides it with
importlib.metadata.packages_distributions() (decord -> decord2, yaml -> PyYAML, PIL -> pillow, ...), so every
imported package must be installed in the environment that runs the tests (scripts/install.sh VENV all dev,pusht).

Optional backends: an import inside `try:` whose `except ImportError` (or ModuleNotFoundError) handler falls back
instead of raising again is optional and need not be a hard dependency. None of the shipped code has one today:
the decoders "decord" (the default of data.decoder) and "pyav" are loaded on demand by `_require`, which raises a
clear ImportError when the package is missing, so decord2 and av are hard dependencies.

Shipped modules that need an extra (EXTRA_MODULES: the PushT world needs gym-pusht) may import it, but only inside
the functions that use it, so the module itself (its VERSION, its command line's help) imports without the extra.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What ships with the project (the packages of [tool.setuptools.packages.find] and the two entry scripts) must have
# its imports in [project].dependencies; tests, benchmarks and the research scripts (experiments/) may use the extras
# too. The pipeline benchmark ships: scripts/run_demo.sh runs it, and the trainer's warning about skipped samples
# names it.
SHIPPED = ["worldmodel", "data_pipeline", "worlds", "benchmarks/pipeline.py", "train.py", "evaluate.py"]
TESTS_AND_TOOLS = ["tests", "benchmarks", "experiments"]
# Declared dependencies that no module imports by name, each with the reason it is declared.
INDIRECT = {
    "tensorboard": (
        "worldmodel/train/metrics_log.py uses torch.utils.tensorboard, which needs it; torch does not declare it"
    ),
}
IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError"}
# Shipped modules whose imports may come from an extra too (imported where used, with an ImportError naming it).
EXTRA_MODULES = {"worlds/pusht.py": "pusht"}


def normalize(name: str) -> str:
    """A distribution name in PEP 503 form (PyYAML -> pyyaml, typing_extensions -> typing-extensions)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(spec: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec)
    assert match, f"cannot read a package name from the requirement {spec!r}"
    return normalize(match.group(1))


def pyproject() -> dict:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def dependencies() -> set[str]:
    return {requirement_name(s) for s in pyproject()["project"]["dependencies"]}


def extras() -> dict[str, set[str]]:
    optional = pyproject()["project"].get("optional-dependencies", {})
    return {extra: {requirement_name(s) for s in specs} for extra, specs in optional.items()}


def pins() -> dict[str, str]:
    """constraints.txt as {normalized name: version}; every line that is not a comment is `name==version`."""
    pinned = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and version.strip(), f"constraints.txt: {line!r} is not an exact pin (name==version)"
        pinned[normalize(name.strip())] = version.strip()
    return pinned


def _is_fallback(handler: ast.ExceptHandler) -> bool:
    """Whether `handler` catches ImportError and carries on (rather than raising again)."""
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    names = {t.id if isinstance(t, ast.Name) else getattr(t, "attr", None) for t in types if t is not None}
    catches = handler.type is None or bool(names & (IMPORT_ERRORS | {"Exception", "BaseException"}))
    return catches and not any(isinstance(node, ast.Raise) for node in ast.walk(handler))


def _import_module_arg(call: ast.Call) -> ast.expr | None:
    """The first argument of `importlib.import_module(...)` / `import_module(...)`, else None."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    return call.args[0] if name == "import_module" and call.args else None


def module_imports(path: Path) -> dict[str, bool]:
    """{top-level module: optional} for every absolute import in `path`; optional only if every import of it
    is guarded by a try/except ImportError that falls back."""
    tree = ast.parse(path.read_text(), str(path))
    guarded: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(_is_fallback(h) for h in node.handlers):
            guarded.update(id(inner) for stmt in node.body for inner in ast.walk(stmt))
    # Helpers that import the module named by one of their parameters, e.g. `def _require(module, ...)`.
    loaders: dict[str, int] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            params = [a.arg for a in node.args.posonlyargs + node.args.args]
            for call in ast.walk(node):
                arg = _import_module_arg(call) if isinstance(call, ast.Call) else None
                if isinstance(arg, ast.Name) and arg.id in params:
                    loaders[node.name] = params.index(arg.id)

    found: dict[str, bool] = {}

    def add(module: str, node: ast.AST) -> None:
        top = module.split(".")[0]
        found[top] = found.get(top, True) and id(node) in guarded

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            add(node.module, node)
        elif isinstance(node, ast.Call):
            arg = _import_module_arg(node)
            func = node.func
            helper = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
            if arg is None and helper in loaders and len(node.args) > loaders[helper]:
                arg = node.args[loaders[helper]]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and not arg.value.startswith("."):
                add(arg.value, node)
    return found


def third_party_imports(roots: list[str]) -> dict[str, dict[str, bool]]:
    """{top-level module: {file: optional}} for the modules imported under `roots` that are neither in the
    standard library nor part of this repository (its packages, root scripts, and test helpers)."""
    result: dict[str, dict[str, bool]] = {}
    for root in roots:
        path = REPO / root
        for file in [path] if path.is_file() else sorted(path.rglob("*.py")):
            for module, optional in module_imports(file).items():
                local = (REPO / module / "__init__.py").is_file() or (REPO / f"{module}.py").is_file()
                local = local or (file.parent / f"{module}.py").is_file() or module == "conftest"
                if module in sys.stdlib_module_names or module == "__future__" or local:
                    continue
                result.setdefault(module, {})[file.relative_to(REPO).as_posix()] = optional
    return result


@functools.cache
def _packages_distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()  # scans every installed distribution: once per session


def distributions_of(module: str) -> set[str]:
    return {normalize(d) for d in _packages_distributions().get(module, [])}


def undeclared(imports: dict[str, dict[str, bool]], declared: set[str]) -> list[str]:
    problems = []
    for module, files in sorted(imports.items()):
        required = sorted(f for f, optional in files.items() if not optional)
        if not required:
            continue
        provided_by = distributions_of(module)
        if not provided_by:
            problems.append(f"{module} (imported by {', '.join(required)}) is not installed, so its distribution is "
                            "unknown: install it and declare it")  # fmt: skip
        elif not provided_by & declared:
            problems.append(f"{module} (imported by {', '.join(required)}) comes from {sorted(provided_by)}")
    return problems


def test_imports_of_the_shipped_code_are_declared_dependencies():
    imports = third_party_imports(SHIPPED)
    core = {module: {f: o for f, o in files.items() if f not in EXTRA_MODULES} for module, files in imports.items()}
    problems = undeclared(core, dependencies())
    for file, extra in EXTRA_MODULES.items():
        found = undeclared(third_party_imports([file]), dependencies() | extras()[extra])
        problems += [f"{problem} (extra {extra})" for problem in found]
    assert not problems, "imported but not in [project].dependencies of pyproject.toml:\n  " + "\n  ".join(problems)


def test_modules_that_need_an_extra_import_it_only_where_it_is_used():
    """A module of EXTRA_MODULES imports its extra inside functions, never at module level: the benchmarks read its
    VERSION, and its --help works, where the extra is not installed."""
    for file, extra in EXTRA_MODULES.items():
        tree = ast.parse((REPO / file).read_text(), file)
        top = set()
        for node in tree.body:  # module-level statements only
            if isinstance(node, ast.Import):
                top |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                top.add(node.module.split(".")[0])
        from_extra = sorted(m for m in top if distributions_of(m) & extras()[extra] - dependencies())
        assert not from_extra, f"{file} imports {from_extra} (extra {extra}) at module level"


def test_imports_of_tests_and_benchmarks_are_declared_dependencies_or_extras():
    declared = dependencies().union(*extras().values())
    problems = undeclared(third_party_imports(TESTS_AND_TOOLS), declared)
    assert not problems, "imported but neither a dependency nor in an extra:\n  " + "\n  ".join(problems)


def test_declared_dependencies_are_imported():
    imported = set()
    for module in third_party_imports(SHIPPED):
        imported |= distributions_of(module)
    unused = sorted(dependencies() - imported - set(INDIRECT))
    assert not unused, (
        f"[project].dependencies lists {unused}, which the shipped code does not import; drop them (what another "
        "package needs, it declares itself) or add them to INDIRECT here with the reason"
    )


def test_every_declared_package_is_pinned():
    data = pyproject()
    wanted = {"dependencies": dependencies(), "build-system.requires": set(), "torch/torchvision (install.sh)": set()}
    wanted["build-system.requires"] = {requirement_name(s) for s in data["build-system"]["requires"]}
    wanted["torch/torchvision (install.sh)"] = {"torch", "torchvision"}
    wanted.update({f"extra {extra}": names for extra, names in extras().items()})
    pinned = pins()
    missing = {where: sorted(names - set(pinned)) for where, names in wanted.items() if names - set(pinned)}
    assert not missing, f"not pinned in constraints.txt: {missing}"
    all_specs = [*data["project"]["dependencies"], *data["build-system"]["requires"]]
    all_specs += [s for specs in data["project"].get("optional-dependencies", {}).values() for s in specs]
    for spec in all_specs:
        exact = re.search(r"==\s*([^\s,;]+)", spec)
        if exact:
            name = requirement_name(spec)
            assert pinned[name] == exact.group(1), f"pyproject.toml says {spec}, constraints.txt {pinned[name]}"


def test_install_script_does_not_repeat_the_dependency_list():
    """scripts/install.sh reads the list from pyproject.toml; only the torch/torchvision pair is named there."""
    code = "\n".join(line.split("#", 1)[0] for line in (REPO / "scripts" / "install.sh").read_text().splitlines())
    names = dependencies().union(*extras().values()) - {"torch", "torchvision"}
    repeated = sorted(n for n in names if re.search(rf"(?<![\w./-]){re.escape(n)}(?![\w/-])", code))
    assert not repeated, f"scripts/install.sh names {repeated}: read them from pyproject.toml instead"


LINUX_X86_64 = {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"}


def linux_closure(root: str) -> dict[str, list[str]]:
    """{distribution: [requirements naming it]} for everything `root` needs on Linux x86_64, followed through the
    installed distributions' metadata (with the extras asked for, e.g. cuda-toolkit[cublas,...])."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    environment = {**default_environment(), **LINUX_X86_64}
    found: dict[str, list[str]] = {}
    todo = [(root, frozenset())]
    done = set()
    while todo:
        name, wanted = todo.pop()
        if (name, wanted) in done:
            continue
        done.add((name, wanted))
        try:
            requires = importlib.metadata.distribution(name).requires or []
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed here (another platform): its own requirements cannot be read
        for spec in requires:
            req = Requirement(spec)
            extras = [""] + sorted(wanted)
            if req.marker and not any(req.marker.evaluate({**environment, "extra": e}) for e in extras):
                continue
            dep = normalize(req.name)
            found.setdefault(dep, []).append(spec)
            todo.append((dep, frozenset(req.extras)))
    return found


def test_torchs_linux_requirements_are_locked_too():
    """torch pins some CUDA wheels exactly and lets others float (triton ~=, cuda-bindings, nvidia-nvjitlink and
    cuda-pathfinder by range): constraints.txt must lock all of them, at versions torch's metadata accepts."""
    from packaging.requirements import Requirement

    pinned = pins()
    closure = linux_closure("torch")
    cuda_side = {n for n in closure if n.startswith(("nvidia-", "cuda-")) or n == "triton"}
    if importlib.metadata.version("torch").split("+")[0] == pinned["torch"] and sys.platform == "linux":
        assert {"triton", "cuda-bindings", "nvidia-nccl-cu13", "nvidia-cudnn-cu13"} <= cuda_side, sorted(closure)
    missing = sorted(n for n in closure if n not in pinned)
    assert not missing, f"torch needs {missing} on Linux, which constraints.txt does not pin: {closure}"
    for name, specs in closure.items():
        for spec in specs:
            assert Requirement(spec).specifier.contains(pinned[name], prereleases=True), (
                f"constraints.txt pins {name}=={pinned[name]}, which the requirement {spec!r} excludes"
            )
