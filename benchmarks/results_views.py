"""The views of benchmarks.results: markdown tables rendered from results/TABLE.json alone (no torch), and the marked
blocks of markdown files they are written into and checked against."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from benchmarks.results_stamps import ResultsError


def _finite(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return value


def _get(tree: object, *path: str) -> object:
    for key in path:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(key)
    return tree


SPLITS = ("no_event", "event", "no_event_so_far")
SPLIT_LABELS = {"no_event": "no event", "event": "event", "no_event_so_far": "no event so far", "all": "all"}

METHOD_LABELS = {"none": "JEPA (`none`)", "adassl_v": "AdaSSL-V", "adassl_s": "AdaSSL-S", "oracle": "oracle"}


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


HOLD = 0.8  # a rollout "holds" while its energy score stays below this share of copy-last's
# the headline's rows less the posterior, which reads the future: (row label, method, mode)
HOLDS_ROWS = tuple((label, method, mode) for label, method, mode, _ in HEADLINE_ROWS if mode != "posterior")


def view_holds(results: dict) -> list[str]:
    """How far a rollout holds: per step h, the energy score over copy-last's in the no-event-so-far split (the one
    where a model can know the future; mean over seeds), and the first step at which that mean reaches HOLD."""
    horizon = max((r.get("horizon") or 0 for r in results["runs"]), default=0)
    n = len(results["seeds"])
    rows = []
    for label, method, mode in HOLDS_ROWS:
        runs = _runs_of(results, method)
        if not runs:
            continue
        means = [mean_std([_ratio(r, mode, "no_event_so_far", "energy_score", h) for r in runs], n)[1]
                 for h in range(1, horizon + 1)]  # fmt: skip
        reached = next((h for h, m in enumerate(means, 1) if m is not None and m >= HOLD), None)
        cells = ["n/a" if m is None else f"{m:.2f}" for m in means]
        rows.append([label, *cells, f"h={reached}" if reached else f"not by h={horizon}"])
    head = ["ES / copy-last, no event so far", *(f"h={h}" for h in range(1, horizon + 1)), f"reaches {HOLD}"]
    return _markdown(head, rows)


VIEWS: dict[str, Callable[[dict], list[str]]] = {
    "headline": view_headline,
    "l1": view_l1,
    "latent": view_latent,
    "holds": view_holds,
}


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
                f"{', '.join(_table_names())})"
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


def _table_names() -> list[str]:
    from benchmarks.results import TABLES  # the registry lives with the run path; imported when a message needs it

    return list(TABLES)
