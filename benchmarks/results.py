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
copy-last), latent (kick detection, leakage, transfer, position probes), holds (per step, where no
event has happened yet, and the step at which a rollout reaches 0.8 of copy-last).

--check and --no-run read results/*.json only: no torch, no runs/ needed (a clean clone checks in a second).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections import Counter
from pathlib import Path

from benchmarks.results_stamps import (
    CODE_PATHS,
    ResultsError,
    code_hash,
    config_hash,
    git_state,
    move_aside,
    read_stamp,
    stale_reason,
    write_stamp,
)
from benchmarks.results_views import (
    SPLITS,
    _display,
    _finite,
    _get,
    process_file,
)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FILES = ("README.md", "docs/results.md")
SCHEMA = 1
# The modes of metrics.json that a view reads (energy_score, l1 and count per split are kept for each).
MODES = ("copy_last", "prior_mean", "noisy_best_of_k", "best_of_k", "mean_of_k", "posterior", "action")


@dataclasses.dataclass(frozen=True)
class Table:
    """One published table: which runs it needs and how they are trained and evaluated."""

    name: str
    world: str  # a key of benchmarks.runs.WORLDS
    data: str  # the data folder, relative to the repository root
    config: str  # the config file, relative to the repository root
    methods: tuple[str, ...]
    seeds: tuple[int, ...] = (0, 1, 2)
    # what experiments.adassl_vs_jepa adds to every run: horizon-long targets, a frame embedding covering the clip
    overrides: tuple[str, ...] = ("data.num_target=8", "eval.horizon=8", "model.max_frames=16")
    eval_args: tuple[str, ...] = ("--horizon", "8", "--num-samples", "8")
    horizons: tuple[int, ...] = (1, 4, 8)  # the steps the views show
    entities: tuple[str, ...] = ()  # names of the probed position columns x0/y0, x1/y1, ... in the latent view
    num_videos: int = 1024  # the data, as experiments.adassl_vs_jepa generates it
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


# ---------------------------------------------------------------------------------------------------------------
# results/TABLE.json


def _series(node: object) -> list[float | None] | None:
    """A per-step list of metrics.json, its floats to 6 significant digits (None where not finite)."""
    if not isinstance(node, list):
        return None
    return [v if isinstance(v, int) or v is None else float(f"{v:.6g}") for v in map(_finite, node)]


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
