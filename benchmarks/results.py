"""Every published figure from one command: the result tables' runs, results/*.json, and the marked tables.

    python -m benchmarks.results                  # every table: train and evaluate what is missing or stale, reuse
                                                  # the rest, write results/TABLE.json, rewrite the marked blocks
    python -m benchmarks.results --table digits   # one table's runs (every marked block is still rewritten)
    python -m benchmarks.results --no-run         # rewrite the marked blocks from results/*.json; train nothing
    python -m benchmarks.results --check          # exit 1 when a marked block differs from results/*.json

A table (TABLES) is a world, a config, the methods and the seeds; its runs live in runs/results/TABLE/METHOD-seedSEED
and are trained and evaluated with `benchmarks.runs.train_and_evaluate`. Each run carries a stamp.json: the commit,
whether the tree was dirty, the code hash (the contents of the files that can change a result, CODE_PATHS) and the
config hash (the config file, the overrides, the evaluation arguments and the data). A run is reused only when both
hashes equal today's; otherwise its folder is moved aside (.stale-METHOD-seedSEED-N) and it is trained again, so a
table never mixes code versions. results/TABLE.json holds the figures the views need; a view is a markdown table
written between the lines `<!-- results:TABLE:VIEW -->` and `<!-- /results:TABLE:VIEW -->` of README.md,
docs/results.md or any file given with --files. Views: headline (energy score over copy-last), l1 (L1 over
copy-last), latent (kick detection, leakage, transfer, position probes).

--check and --no-run read results/*.json only: no torch, no runs/ needed (a clean clone checks in a second).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import json
import math
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The tracked (and untracked, not ignored) files whose contents can change a result. docs/, tests/, README.md and the
# other benchmark scripts are left out, so a commit that touches only them keeps every run valid.
CODE_PATHS = (
    "worldmodel",
    "data_pipeline",
    "train.py",
    "evaluate.py",
    "benchmarks/runs.py",
    "pyproject.toml",
    "constraints.txt",
)
DEFAULT_FILES = ("README.md", "docs/results.md")
SCHEMA = 1
SPLITS = ("no_event", "event", "no_event_so_far")
SPLIT_LABELS = {"no_event": "no event", "event": "event", "no_event_so_far": "no event so far", "all": "all"}
# The modes of metrics.json that a view reads (energy_score, l1 and count per split are kept for each).
MODES = ("copy_last", "prior_mean", "noisy_best_of_k", "best_of_k", "mean_of_k", "posterior", "action")
METHOD_LABELS = {"none": "JEPA (`none`)", "adassl_v": "AdaSSL-V", "adassl_s": "AdaSSL-S", "oracle": "oracle"}


@dataclasses.dataclass(frozen=True)
class Table:
    """One published table: which runs it needs and how they are trained and evaluated."""

    name: str
    world: str  # a key of benchmarks.runs.WORLDS
    data: str  # the data folder, relative to the repository root
    config: str  # the config file, relative to the repository root
    methods: tuple[str, ...]
    seeds: tuple[int, ...] = (0, 1, 2)
    # what benchmarks.adassl_vs_jepa adds to every run: horizon-long targets, a frame embedding covering the clip
    overrides: tuple[str, ...] = ("data.num_target=8", "eval.horizon=8", "model.max_frames=16")
    eval_args: tuple[str, ...] = ("--horizon", "8", "--num-samples", "8")
    horizons: tuple[int, ...] = (1, 4, 8)  # the steps the views show
    entities: tuple[str, ...] = ()  # names of the probed position columns x0/y0, x1/y1, ... in the latent view
    num_videos: int = 1024  # the data, as benchmarks.adassl_vs_jepa generates it
    val_videos: int = 256


TABLES = {
    "digits": Table(
        name="digits",
        world="digits",
        data="data/moving_digits",
        config="configs/demo.yaml",
        methods=("none", "adassl_v", "oracle"),
        entities=("digit",),
    ),
    "push": Table(
        name="push",
        world="push",
        data="data/push_world",
        config="configs/demo.yaml",  # the one recipe under test
        methods=("none", "adassl_v"),
        entities=("agent", "object"),
    ),
}


class ResultsError(Exception):
    """A results file, a stamp or the git checkout is not what the command needs; the message says what to do."""


# ---------------------------------------------------------------------------------------------------------------
# Hashes and git


def _git(root: Path, *args: str) -> str:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or str(err)
        raise ResultsError(
            f"`git {' '.join(args)}` failed in {root}: {detail.strip()}. The results stamps need a git checkout."
        ) from err
    return out.stdout


def code_files(root: Path) -> list[str]:
    """The files under `root` (a git checkout) whose contents make the code hash, sorted: every tracked file under
    CODE_PATHS plus the untracked ones git does not ignore (a new module counts before it is committed)."""
    out = _git(root, "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *CODE_PATHS)
    return sorted({name for name in out.split("\0") if name})


def code_hash(root: Path) -> str:
    """sha256 over the paths and working-tree contents of `code_files(root)`: equal hashes, equal code. A tracked
    file deleted from the working tree counts as deleted."""
    digest = hashlib.sha256()
    for name in code_files(root):
        path = root / name
        content = path.read_bytes() if path.is_file() else b"<deleted>"
        digest.update(f"{name}\0{len(content)}\0".encode())
        digest.update(content)
    return digest.hexdigest()


def git_state(root: Path) -> dict:
    """The checkout's HEAD commit, whether any tracked file differs from it (`dirty`) and whether the code of
    CODE_PATHS does, untracked files included (`code_dirty`: then the commit alone does not give the code)."""
    return {
        "commit": _git(root, "rev-parse", "HEAD").strip(),
        "dirty": bool(_git(root, "status", "--porcelain", "--untracked-files=no").strip()),
        "code_dirty": bool(_git(root, "status", "--porcelain", "--", *CODE_PATHS).strip()),
    }


def config_hash(table: Table, root: Path, data_dir: Path | None = None) -> str:
    """sha256 of what a table's runs are trained and evaluated with: the config file's content, the overrides, the
    evaluation arguments, the world and data settings, and (when `data_dir` is given) the data's world.json and
    shard indexes, so data regenerated with other settings invalidates the runs. Methods and seeds are left out:
    they name the run folders, and adding a seed keeps the other runs."""
    data = {}
    if data_dir is not None:
        for name in ("world.json", "train/index.json", "val/index.json"):
            path = data_dir / name
            data[name] = path.read_text() if path.is_file() else None
    payload = {
        "config": (root / table.config).read_text(),
        "overrides": list(table.overrides),
        "eval_args": list(table.eval_args),
        "world": table.world,
        "data_settings": [table.data, table.num_videos, table.val_videos],
        "data": data,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Stamps: which run folders may be reused


def read_stamp(run_dir: Path) -> dict | None:
    """RUN_DIR/stamp.json, or None when it is missing or unreadable."""
    try:
        return json.loads((run_dir / "stamp.json").read_text())
    except (OSError, ValueError):
        return None


def write_stamp(run_dir: Path, stamp: dict) -> None:
    """Write RUN_DIR/stamp.json atomically."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "stamp.json.tmp"
    tmp.write_text(json.dumps(stamp, indent=1) + "\n")
    tmp.replace(run_dir / "stamp.json")


def stale_reason(stamp: dict | None, expected: dict) -> str | None:
    """Why an existing run folder with this stamp must not be used for the run `expected` describes (its table,
    method, seed, code_hash and config_hash), or None when it may: reused if its stamp says it was evaluated,
    resumed if it says it was training."""
    if stamp is None:
        return "it has no readable stamp.json (made by something else, or before stamps)"
    for key in ("table", "method", "seed", "code_hash", "config_hash"):
        if stamp.get(key) != expected[key]:
            found, wanted = stamp.get(key), expected[key]
            if key.endswith("_hash"):
                found, wanted = str(found)[:8], str(wanted)[:8]
            return f"its {key} is {found}, today's is {wanted}"
    if stamp.get("status") not in ("training", "evaluated"):
        return f"its status is {stamp.get('status')!r}"
    return None


def move_aside(run_dir: Path) -> Path:
    """Rename a stale run folder to .stale-NAME-N beside it (the lowest free N from 1) and return the new path."""
    n = 1
    while (target := run_dir.parent / f".stale-{run_dir.name}-{n}").exists():
        n += 1
    run_dir.rename(target)
    return target


# ---------------------------------------------------------------------------------------------------------------
# results/TABLE.json


def _finite(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return value


def _series(node: object) -> list[float | None] | None:
    """A per-step list of metrics.json, its floats to 6 significant digits (None where not finite)."""
    if not isinstance(node, list):
        return None
    return [v if isinstance(v, int) or v is None else float(f"{v:.6g}") for v in map(_finite, node)]


def _get(tree: object, *path: str) -> object:
    for key in path:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(key)
    return tree


def _mean(values: list[float | None] | None) -> float | None:
    vals = [v for v in values or [] if v is not None]
    return sum(vals) / len(vals) if vals else None


def run_record(metrics: dict, stamp: dict, run: str, position_r2: dict[str, float | None]) -> dict:
    """One run's entry of results/TABLE.json: its stamp and the figures the views need, from its eval/metrics.json
    (`metrics`). `position_r2`: {entity index as a string: benchmarks.runs.probe_mean(metrics, "position", index)},
    computed by the caller so that this module never imports the model. Raises ResultsError when the metrics are
    another method's than the stamp says (metrics.json's `seed` is the evaluation's, not the training's)."""
    if "latent" in metrics and metrics["latent"] != stamp["method"]:
        raise ResultsError(
            f"{run}: eval/metrics.json has latent {metrics['latent']!r} but stamp.json says {stamp['method']!r}; "
            "delete the run folder and run `python -m benchmarks.results` again"
        )
    modes = {}
    for mode in MODES:
        node = _get(metrics, "modes", mode)
        if isinstance(node, dict):
            modes[mode] = {
                split: {key: _series(node[split].get(key)) for key in ("energy_score", "l1", "count")}
                for split in SPLITS
                if isinstance(node.get(split), dict)
            }
    shuffle = _get(metrics, "leakage", "shuffle") or {}
    displacement = _get(metrics, "leakage", "transfer", "displacement") or {}
    latent = {
        "kl_event_auc": _finite(_get(metrics, "latent_action", "detector", "event_auc")),
        "shuffled_over_prior": {
            split: _finite(_get(shuffle, split, "shuffled_over_prior")) for split in ("all", "event", "no_event")
        },
        "transfer_displacement": _mean([_finite(v) for v in (displacement.get("transfer") or {}).values()]),
        "own_displacement": _mean([_finite(v) for v in (displacement.get("own") or {}).values()]),
        "position_r2": {k: _finite(v) for k, v in position_r2.items()},
    }
    return {
        "method": stamp["method"],
        "seed": stamp["seed"],
        "run": run,
        **{key: stamp.get(key) for key in ("commit", "dirty", "code_dirty", "code_hash", "config_hash")},
        **{key: metrics.get(key) for key in ("checkpoint_step", "horizon", "num_samples", "num_clips")},
        "modes": modes,
        "latent": latent,
    }


def build_results(table: Table, records: list[dict], head: dict) -> dict:
    """results/TABLE.json from its runs' records (`run_record`). Raises ResultsError when the runs carry more than
    one code hash or config hash (a table never mixes code versions) or do not cover the table's methods x seeds.
    Its commit is the commit most of its runs were trained at with clean code (any such commit reproduces them:
    the code hash is the same); when every run was trained on uncommitted code, `head` (git_state now, whose code
    hashes the same, as `run_table` checks) with its `code_dirty` flag."""
    clean = Counter(r["commit"] for r in records if r.get("code_dirty") is False and r.get("commit"))
    commit, code_dirty = (clean.most_common(1)[0][0], False) if clean else (head["commit"], bool(head["code_dirty"]))
    results = {
        "schema": SCHEMA,
        "table": table.name,
        "world": table.world,
        "data": table.data,
        "config": table.config,
        "methods": list(table.methods),
        "seeds": list(table.seeds),
        "overrides": list(table.overrides),
        "eval_args": list(table.eval_args),
        "horizons": list(table.horizons),
        "entities": list(table.entities),
        "commit": commit,
        "code_dirty": code_dirty,
        "code_hash": records[0]["code_hash"] if records else None,
        "config_hash": records[0]["config_hash"] if records else None,
        "runs": records,
    }
    validate_results(results, f"results/{table.name}.json")
    return results


def validate_results(results: dict, source: str) -> None:
    """Raise ResultsError unless `results` is a whole table: the known schema, one run per method and seed, and one
    code hash and one config hash over all its runs."""
    again = f"run `python -m benchmarks.results --table {results.get('table')}` to rebuild it"
    missing = [
        key
        for key in ("schema", "table", "commit", "code_hash", "config_hash", "methods", "seeds", "runs")
        if key not in results
    ]
    if missing:
        raise ResultsError(f"{source} lacks {', '.join(missing)}; {again}")
    if results["schema"] != SCHEMA:
        raise ResultsError(f"{source} has schema {results['schema']}, this code reads {SCHEMA}; {again}")
    for key in ("code_hash", "config_hash"):
        found = sorted({str(r.get(key)) for r in results["runs"]} | {str(results[key])})
        if len(found) > 1:
            raise ResultsError(
                f"{source} mixes {len(found)} {key.replace('_', ' ')}es ({', '.join(h[:8] for h in found)}): a table "
                f"never mixes code or config versions; {again}"
            )
    wanted = Counter((m, s) for m in results["methods"] for s in results["seeds"])
    found_runs = Counter((r.get("method"), r.get("seed")) for r in results["runs"])
    if found_runs != wanted:
        raise ResultsError(
            f"{source} holds runs {sorted(found_runs.elements())} for methods {results['methods']} x seeds "
            f"{results['seeds']}; {again}"
        )


def dumps_results(results: dict) -> str:
    """results/TABLE.json's text: indented, each list of numbers on one line, a newline at the end."""
    text = json.dumps(results, indent=1)
    number_list = re.compile(r"\[\s*(?:-?[\w.+-]+)(?:,\s*-?[\w.+-]+)*\s*\]")
    return number_list.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(0)[1:-1].split(",")) + "]", text) + "\n"


def load_results(path: Path) -> dict:
    """Read and validate one results/TABLE.json (its name must be its table's)."""
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ResultsError(f"{path} cannot be read as JSON ({err}); restore it from git or rebuild it") from err
    if not isinstance(results, dict):
        raise ResultsError(f"{path} holds no table; restore it from git or rebuild it")
    validate_results(results, str(path))
    if results["table"] != path.stem:
        raise ResultsError(f"{path} holds table {results['table']!r}; rename it to {results['table']}.json")
    return results


def load_all_results(results_dir: Path) -> tuple[dict[str, dict], list[str]]:
    """Every results_dir/*.json that validates, by table name, and one error message per file that does not."""
    tables, errors = {}, []
    for path in sorted(results_dir.glob("*.json")):
        try:
            tables[path.stem] = load_results(path)
        except ResultsError as err:
            errors.append(str(err))
    return tables, errors


# ---------------------------------------------------------------------------------------------------------------
# Views: markdown rendered from results/TABLE.json alone


def mean_std(values: Sequence[float | None], expected: int) -> tuple[str, float | None]:
    """'mean ± std' (sample std) over the finite values, with '(n=K)' when fewer than `expected` seeds gave one;
    'n/a' when none did. Also returns the mean, for ranking."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return "n/a", None
    mean = sum(vals) / len(vals)
    text = f"{mean:.3f}"
    if len(vals) > 1:
        text += f" ± {math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)):.3f}"
    if len(vals) < expected:
        text += f" (n={len(vals)})"
    return text, mean


def _runs_of(results: dict, method: str) -> list[dict]:
    return sorted((r for r in results["runs"] if r.get("method") == method), key=lambda r: r.get("seed"))


def _at(run: dict, mode: str, split: str, key: str, h: int) -> float | None:
    series = _get(run, "modes", mode, split, key)
    return _finite(series[h - 1]) if isinstance(series, list) and 0 < h <= len(series) else None


def _ratio(run: dict, mode: str, split: str, key: str, h: int) -> float | None:
    value, base = _at(run, mode, split, key, h), _at(run, "copy_last", split, key, h)
    return None if value is None or not base else value / base


def _footer(results: dict) -> str:
    commit = results["commit"][:7] + ("+dirty" if results.get("code_dirty") else "")
    seeds = " ".join(str(s) for s in results["seeds"])
    return (
        f"`python -m benchmarks.results --table {results['table']}` at commit {commit} "
        f"(code hash {results['code_hash'][:8]}), seeds {seeds}"
    )


def _markdown(head: Sequence[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


# (row label, method, mode, ranked: compared for the bold best cell; never a row that sees the true future)
HEADLINE_ROWS = (
    ("JEPA", "none", "prior_mean", True),
    ("JEPA + matched noise, K futures", "none", "noisy_best_of_k", True),
    ("AdaSSL-V prior mean", "adassl_v", "prior_mean", True),
    ("AdaSSL-V sampled, K futures", "adassl_v", "best_of_k", True),
    ("oracle (true actions)", "oracle", "action", False),
    ("AdaSSL-V posterior (upper bound: reads the future)", "adassl_v", "posterior", False),
)
L1_ROWS = (
    ("JEPA", "none", "prior_mean", True),
    ("JEPA + matched noise, best of K (chosen with the truth)", "none", "noisy_best_of_k", False),
    ("AdaSSL-V prior mean", "adassl_v", "prior_mean", True),
    ("AdaSSL-V one sample (mean over K)", "adassl_v", "mean_of_k", True),
    ("AdaSSL-V best of K (chosen with the truth)", "adassl_v", "best_of_k", False),
    ("oracle (true actions)", "oracle", "action", False),
    ("AdaSSL-V posterior (upper bound: reads the future)", "adassl_v", "posterior", False),
)


def _ratio_view(results: dict, rows: Sequence[tuple[str, str, str, bool]], key: str, corner: str) -> list[str]:
    columns = [(split, h) for split in SPLITS for h in results["horizons"]]
    n = len(results["seeds"])
    table = []  # (label, ranked, [(text, mean)])
    for label, method, mode, ranked in rows:
        runs = _runs_of(results, method)
        if not runs:
            continue
        cells = [mean_std([_ratio(r, mode, split, key, h) for r in runs], n) for split, h in columns]
        table.append((label, ranked, cells))
    for col in range(len(columns)):
        ranked_cells = [cells[col] for _, ranked, cells in table if ranked and cells[col][1] is not None]
        if len(ranked_cells) < 2:
            continue
        best = min(f"{mean:.3f}" for _, mean in ranked_cells)
        for _, ranked, cells in table:
            text, mean = cells[col]
            if ranked and mean is not None and f"{mean:.3f}" == best:
                cells[col] = (f"**{text}**", mean)
    head = [corner, *(f"h={h} {SPLIT_LABELS[split]}" for split, h in columns)]
    return _markdown(head, [[label, *(text for text, _ in cells)] for label, _, cells in table])


def view_headline(results: dict) -> list[str]:
    """Energy score over the same run's copy-last energy score, per split and horizon (lower is better; ES is a
    proper score, so sampled and deterministic forecasts compare on it)."""
    return _ratio_view(results, HEADLINE_ROWS, "energy_score", "energy score / copy-last (lower is better)")


def view_l1(results: dict) -> list[str]:
    """L1 over the same run's copy-last L1, per split and horizon; best-of-K rows are chosen with the truth."""
    return _ratio_view(results, L1_ROWS, "l1", "L1 / copy-last (lower is better)")


def view_latent(results: dict) -> list[str]:
    """Per method: the KL as an event detector (AUC), the shuffled-r leakage check (shuffled over prior-mean error;
    at 1 or above r carries no more of the future than the prior), the transfer of r across clips (correlation of
    the probed displacement; own r beside it) and the encoded position probes' R² per entity."""
    n = len(results["seeds"])
    entities = results.get("entities") or []
    head = [
        "model",
        "KL event AUC",
        "shuffled / prior (all)",
        "shuffled / prior (event)",
        "transfer corr.",
        "own r corr.",
        *(f"position R² {name}" for name in entities),
    ]
    rows = []
    for method in results["methods"]:
        runs = _runs_of(results, method)
        paths = [
            ("kl_event_auc",),
            ("shuffled_over_prior", "all"),
            ("shuffled_over_prior", "event"),
            ("transfer_displacement",),
            ("own_displacement",),
            *(("position_r2", str(i)) for i in range(len(entities))),
        ]
        figures = [[_finite(_get(r, "latent", *path)) for r in runs] for path in paths]
        rows.append([METHOD_LABELS.get(method, method), *(mean_std(vals, n)[0] for vals in figures)])
    return _markdown(head, rows)


VIEWS: dict[str, Callable[[dict], list[str]]] = {"headline": view_headline, "l1": view_l1, "latent": view_latent}


def render_view(results: dict, view: str) -> str:
    """A view of one table: its markdown table, a blank line and the line that says how to reproduce it."""
    if view not in VIEWS:
        raise ResultsError(f"unknown view {view!r}; the views are {', '.join(VIEWS)}")
    return "\n".join([*VIEWS[view](results), "", _footer(results)])


# ---------------------------------------------------------------------------------------------------------------
# Marked blocks in markdown files

MARKER = re.compile(r"<!-- (/?)results:([A-Za-z0-9_.-]+):([A-Za-z0-9_.-]+) -->")
MARKER_LIKE = re.compile(r"<!--\s*/?\s*results\s*:")


@dataclasses.dataclass(frozen=True)
class Block:
    """A marked block: the line indices of its opening and closing markers."""

    table: str
    view: str
    start: int
    end: int

    @property
    def name(self) -> str:
        """results:TABLE:VIEW, as in its markers."""
        return f"results:{self.table}:{self.view}"


def parse_blocks(text: str, source: str) -> tuple[list[Block], list[str]]:
    """The marked blocks of a markdown text and one error per malformed, unbalanced or nested marker (`source` names
    the file in them). Lines inside fenced code blocks are not markers."""
    blocks, errors = [], []
    fence, open_at = None, None  # the fence that opened a code block; (table, view, line) of an open marker
    for i, line in enumerate(text.split("\n")):
        stripped = line.strip()
        if fence is not None:
            fence = None if stripped.startswith(fence) else fence
            continue
        if stripped.startswith(("```", "~~~")):
            fence = stripped[:3]
            continue
        if not MARKER_LIKE.match(stripped):
            continue
        where = f"{source}:{i + 1}"
        match = MARKER.fullmatch(stripped)
        if match is None:
            errors.append(f"{where}: malformed marker {stripped!r}; write <!-- results:TABLE:VIEW --> on its own line")
            continue
        closing, table, view = match.group(1) == "/", match.group(2), match.group(3)
        if not closing:
            if open_at is not None:
                errors.append(f"{where}: results:{table}:{view} opens inside results:{open_at[0]}:{open_at[1]} "
                              f"(line {open_at[2] + 1}), which is not closed before it")  # fmt: skip
            open_at = (table, view, i)
        elif open_at is None:
            errors.append(f"{where}: /results:{table}:{view} closes a block that was never opened")
        elif (table, view) != open_at[:2]:
            errors.append(f"{where}: /results:{table}:{view} closes results:{open_at[0]}:{open_at[1]} "
                          f"(line {open_at[2] + 1}); the names must match")  # fmt: skip
            open_at = None
        else:
            blocks.append(Block(table, view, open_at[2], i))
            open_at = None
    if open_at is not None:
        errors.append(f"{source}:{open_at[2] + 1}: results:{open_at[0]}:{open_at[1]} is never closed; add the line "
                      f"<!-- /results:{open_at[0]}:{open_at[1]} --> after it")  # fmt: skip
    if fence is not None:
        errors.append(f"{source}: a fenced code block is never closed; the markers after it cannot be read")
    return blocks, errors


def block_body(results: dict, view: str) -> list[str]:
    """The lines a block holds between its markers: a blank line, the view, a blank line."""
    return ["", *render_view(results, view).split("\n"), ""]


def _display(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def process_file(path: Path, tables: dict[str, dict], root: Path, write: bool) -> tuple[int, list[str], bool]:
    """Check (write=False) or rewrite (write=True) every marked block of one markdown file against `tables`
    ({name: results}). Returns the number of blocks, one message per problem (a block that differs, with a short
    unified diff, when checking; a block naming a table with no results; a marker error) and whether the file was
    rewritten. A file with marker errors is left as it is."""
    source = _display(path, root)
    text = path.read_text()
    blocks, errors = parse_blocks(text, source)
    if errors:
        return len(blocks), errors, False
    lines = text.split("\n")
    problems, new_lines = [], list(lines)
    for block in reversed(blocks):
        results = tables.get(block.table)
        if results is None:
            problems.append(
                f"{source}:{block.start + 1}: {block.name} names table {block.table!r}, but results/{block.table}.json "
                f"does not exist; run `python -m benchmarks.results --table {block.table}` (the tables: "
                f"{', '.join(TABLES)})"
            )
            continue
        if block.view not in VIEWS:
            problems.append(f"{source}:{block.start + 1}: {block.name}: unknown view; the views are {', '.join(VIEWS)}")
            continue
        try:
            wanted = block_body(results, block.view)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            problems.append(
                f"{source}:{block.start + 1}: {block.name} cannot be rendered from results/{block.table}.json "
                f"({type(err).__name__}: {err}); rebuild it with `python -m benchmarks.results --table {block.table}`"
            )
            continue
        found = lines[block.start + 1 : block.end]
        if wanted == found:
            continue
        if write:
            new_lines[block.start + 1 : block.end] = wanted
        else:
            diff = list(
                difflib.unified_diff(
                    found, wanted, f"{source} (as written)", f"results/{block.table}.json", n=0, lineterm=""
                )
            )
            shown = diff[:30] + ([f"... {len(diff) - 30} more diff lines"] if len(diff) > 30 else [])
            problems.append(
                f"{source}:{block.start + 1}: {block.name} differs from results/{block.table}.json; run "
                "`python -m benchmarks.results --no-run` to rewrite it\n" + "\n".join(shown)
            )
    changed = write and new_lines != lines
    if changed:
        path.write_text("\n".join(new_lines))
    return len(blocks), list(reversed(problems)), changed


# ---------------------------------------------------------------------------------------------------------------
# Running a table


def run_table(table: Table, root: Path = ROOT) -> dict:
    """Train and evaluate (or reuse, or resume) every run of `table` under root/runs/results/TABLE, stamp each, and
    return results/TABLE.json's content. Stale run folders are moved aside; raises SystemExit when the code changes
    while the table runs (its runs would mix code versions)."""
    from benchmarks.runs import ensure_data, probe_mean, train_and_evaluate  # imports torch: only when runs are made

    data_dir = root / table.data
    ensure_data(data_dir, num_videos=table.num_videos, val_videos=table.val_videos, world=table.world)
    code, config = code_hash(ROOT), config_hash(table, ROOT, data_dir)
    print(f"table {table.name}: code hash {code[:8]}, config hash {config[:8]}", flush=True)
    records = []
    for method in table.methods:
        for seed in table.seeds:
            run_dir = root / "runs" / "results" / table.name / f"{method}-seed{seed}"
            expected = {"table": table.name, "method": method, "seed": seed, "code_hash": code, "config_hash": config}
            overrides = [f"model.latent={method}", f"seed={seed}", *table.overrides]
            stamp = read_stamp(run_dir)
            if run_dir.exists() and (reason := stale_reason(stamp, expected)):
                print(f"{run_dir} is stale ({reason}): moved to {move_aside(run_dir)}", flush=True)
                stamp = None
            info = {**expected, "config": table.config, "overrides": overrides, "eval_args": list(table.eval_args)}
            made = stamp is None or stamp.get("status") != "evaluated"  # else: reused as it is
            if made:  # a provisional stamp: an interrupted run with the same hashes is resumed, not moved aside
                write_stamp(run_dir, {**info, **git_state(ROOT), "status": "training"})
            else:
                print(f"{run_dir}: reused (trained at commit {str(stamp.get('commit'))[:7]})", flush=True)
            metrics = train_and_evaluate(run_dir, table.config, overrides, data_dir, list(table.eval_args))
            if code_hash(ROOT) != code:
                raise SystemExit(
                    f"the code ({', '.join(CODE_PATHS)}) changed while {run_dir} trained, so {table.name}'s runs "
                    "would mix code versions; run `python -m benchmarks.results` again (stale runs are redone)"
                )
            if made:  # the stamp proper, written after the evaluation: the commit the run was finished at
                stamp = {**info, **git_state(ROOT), "status": "evaluated"}
                write_stamp(run_dir, stamp)
            entities = {str(i): probe_mean(metrics, "position", i) for i in range(len(table.entities))}
            records.append(run_record(metrics, stamp, _display(run_dir, root), entities))
    return build_results(table, records, git_state(ROOT))


# ---------------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--table", action="extend", nargs="+", default=None, choices=sorted(TABLES),
        help="the tables whose runs are made or reused (default: every table); every marked block is rewritten",
    )  # fmt: skip
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--check", action="store_true",
        help="exit 1, naming each block, when a marked block differs from results/*.json; no runs, no torch",
    )  # fmt: skip
    mode.add_argument(
        "--no-run", action="store_true", help="rewrite the marked blocks from results/*.json without making any run"
    )
    parser.add_argument(
        "--files", nargs="+", type=Path, default=[],
        help=f"markdown files with marked blocks, besides {' and '.join(DEFAULT_FILES)}",
    )  # fmt: skip
    parser.add_argument(
        "--root", type=Path, default=ROOT,
        help="the folder whose results/, runs/, data/ and default files are used (default: this checkout; tests)",
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0: every block matches or was written; 1: a problem)."""
    args = build_parser().parse_args(argv)
    root = args.root
    results_dir = root / "results"
    if args.table and (args.check or args.no_run):
        print("--check and --no-run read every results/*.json and run nothing; they take no --table", file=sys.stderr)
        return 2
    missing_files = [str(p) for p in args.files if not p.is_file()]
    if missing_files:
        print(f"no such file: {', '.join(missing_files)}", file=sys.stderr)
        return 2
    if not (args.check or args.no_run):
        results_dir.mkdir(exist_ok=True)
        for name in args.table or list(TABLES):
            results = run_table(TABLES[name], root)
            (results_dir / f"{name}.json").write_text(dumps_results(results))
            print(f"written: {_display(results_dir / f'{name}.json', root)}", flush=True)

    tables, problems = load_all_results(results_dir)
    files = [root / name for name in DEFAULT_FILES if (root / name).is_file()]
    files += [p for p in args.files if p.resolve() not in {f.resolve() for f in files}]
    count = 0
    for path in files:
        n, file_problems, changed = process_file(path, tables, root, write=not args.check)
        count += n
        problems += file_problems
        if changed:
            print(f"rewritten: {_display(path, root)}")
    for problem in problems:
        print(problem, file=sys.stderr)
    verb = "checked" if args.check else "rendered"
    status = f"{len(problems)} problem(s)" if problems else "all match" if args.check else "all written"
    print(f"{verb} {count} marked block(s) in {len(files)} file(s) against {len(tables)} table(s): {status}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
