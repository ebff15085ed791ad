"""The output folder: who may write into it, and what a finished one holds.

**Another run's output is never deleted** (`claim_folder`): a write refuses (OutputInUse) an output folder holding
the job files of an unmerged run with another --num-jobs, and a finished folder (index.json) unless both it and the
write are single runs (a single run replaces its own earlier output); so a rerun after a merge never deletes
index.json. **A finished folder** (`finish_folder`) holds index.json, written last, and the shards it lists: the
run's other shard tars, temporary files and job files are removed then (a single run removes only
shard-NNNNNN.tar names and its own job file).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from data_pipeline.format import INDEX_NAME, JOB_FILE, JOB_GLOB, SINGLE_SHARD, job_file_name
from data_pipeline.sidecar import DatasetSchema
from data_pipeline.writer.sink import index_entry


class OutputInUse(ValueError):
    """The output folder holds another run's output, which this write would delete; the message says what to do."""


def write_json(path: Path, data: dict, **dump) -> None:
    """Write `data` to `path` atomically (a temporary file renamed over it)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, **dump) + "\n")
    tmp.replace(path)


def finish_folder(output: Path, shards: list[dict], schema: DatasetSchema, num_jobs: int = 1) -> None:
    """Write OUTPUT/index.json for `shards` (renamed already), with the dataset's sidecar schema and the --num-jobs
    of the run that made it, then remove what is not part of it: this run's other shard tars, its temporary files
    and its job files. A single run (num_jobs 1) removes only shard-NNNNNN.tar names and its own job file."""
    names = {s["name"] for s in shards}
    index = {
        "shards": [index_entry(s) for s in shards],
        "total_samples": sum(s["samples"] for s in shards),
        "schema": schema.to_json(),
        "num_jobs": num_jobs,
    }
    write_json(output / INDEX_NAME, index, indent=1)
    for stale in [*output.glob("shard-*.tar"), *output.glob("shard-*.tar.tmp")]:
        if stale.name not in names and (num_jobs > 1 or SINGLE_SHARD.match(stale.name)):
            stale.unlink(missing_ok=True)
    jobs = JOB_GLOB if num_jobs > 1 else job_file_name((0, 1))
    for pattern in (jobs, jobs + ".tmp"):
        for stale in output.glob(pattern):
            stale.unlink(missing_ok=True)


def _index_num_jobs(index: Path) -> int:
    """The --num-jobs of the run that wrote `index` (1 when it does not say or cannot be read)."""
    try:
        made = json.loads(index.read_text()).get("num_jobs", 1)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, AttributeError):
        return 1
    return made if isinstance(made, int) and not isinstance(made, bool) else 1


def claim_folder(output: Path, num_jobs: int) -> None:
    """Refuse (OutputInUse) to write into a folder holding another run's output, which the write would delete or
    mix with its own: job files of an unmerged run with another --num-jobs; a finished dataset (index.json) where a
    job of a --num-jobs run would write (its samples would be there twice); the merged output of a --num-jobs run
    where a single run would write. A single run may replace a single run's output (the same folder, written again).
    """
    if not output.is_dir():
        return
    counts = sorted({int(m.group(2)) for p in output.iterdir() if (m := JOB_FILE.match(p.name))} - {num_jobs})
    if counts:
        merge = output.parent if output.name in ("train", "val") else output
        raise OutputInUse(
            f"{output} holds the job files of an unmerged {counts[0]}-job run (job-*-of-{counts[0]:05d}.json), and "
            f"this write (--num-jobs {num_jobs}) would delete them with their shards: merge that run first "
            f"(python -m data_pipeline.writer --merge {merge}), write to another --output, or delete its "
            "job-*.json and shard-j*.tar files yourself"
        )
    index = output / INDEX_NAME
    if not os.path.lexists(index):
        return
    made = _index_num_jobs(index)
    if num_jobs > 1:
        raise OutputInUse(
            f"{output} holds a finished dataset (index.json, written by a {made}-job run); a job of a --num-jobs "
            "run writes into a new folder, or one holding only its own run's job files (rerunning a job after the "
            f"merge would leave its samples there twice): write to another --output, or delete {output}'s "
            "index.json and shards first"
        )
    if made > 1:
        raise OutputInUse(
            f"{output} holds the merged output of a {made}-job run (index.json), which a single run would delete: "
            f"write to another --output, or delete {output}'s index.json and shards first"
        )
