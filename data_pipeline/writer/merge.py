"""Merging the jobs of a `--num-jobs J` run, once every job is done (`merge_jobs`; `python -m data_pipeline.writer
--merge OUTPUT`).

The merge verifies before it moves anything, and refuses naming the job to rerun: each job file's own digest (an
edited or damaged one), the same input fingerprint, --seed, --val-fraction and options in every job (jobs of
different runs would drop or duplicate samples), each shard's sha256, each job's samples plus its skipped inputs
being exactly its share of the input list in order, and no key in two jobs. Then it renames the shards in job order
to shard-000000.tar, shard-000001.tar, ... and writes index.json. The result holds the same samples in the same
order with the same bytes as one run over the whole input; only the shard boundaries differ.
"""

from __future__ import annotations

from pathlib import Path

from data_pipeline.clips import MetadataError
from data_pipeline.format import JOB_FILE, JOB_GLOB, shard_name
from data_pipeline.sidecar import DatasetSchema
from data_pipeline.writer.folder import finish_folder
from data_pipeline.writer.jobs import differences, load_record, union_problem
from data_pipeline.writer.sink import WriteSummary, index_entry, scan_shard


def _rerun(index: int, num_jobs: int) -> str:
    return f"rerun job {index} (--num-jobs {num_jobs} --job-index {index}), then merge"


def _merge_folder(folder: Path) -> WriteSummary:
    """Merge the job files of one folder (see `merge_jobs`)."""
    found: dict[int, dict] = {}
    counts = set()
    for path in sorted(folder.glob(JOB_GLOB)):
        match = JOB_FILE.match(path.name)
        if match is None:
            continue
        index, count = int(match.group(1)), int(match.group(2))
        record, why = load_record(path)
        if record is None:
            raise RuntimeError(f"cannot merge {folder}: {path.name} (job {index}) {why}: {_rerun(index, count)}")
        found[index] = record
        counts.add(count)
    if len(counts) > 1:
        raise RuntimeError(
            f"{folder} holds job files of runs with different --num-jobs ({sorted(counts)}): delete the job files "
            "(job-*-of-*.json) of the run you do not want, then merge"
        )
    (num_jobs,) = counts
    missing = [i for i in range(num_jobs) if i not in found]
    unfinished = [i for i, record in sorted(found.items()) if not record.get("complete")]
    if missing or unfinished:
        raise RuntimeError(
            f"cannot merge {folder}: of {num_jobs} jobs, "
            + "; ".join(
                part
                for part in (
                    f"job(s) {missing} have not started" if missing else "",
                    f"job(s) {unfinished} have not finished" if unfinished else "",
                )
                if part
            )
            + f". Run them (again: a job resumes where it stopped) with --num-jobs {num_jobs} --job-index I, then merge"
        )
    first = found[0]["settings"]
    for index, record in sorted(found.items()):
        settings = record["settings"]
        if settings.get("job") != [index, num_jobs]:
            raise RuntimeError(
                f"cannot merge {folder}: job {index}'s file records job {settings.get('job')}: "
                + _rerun(index, num_jobs)
            )
        names = ("inputs", "seed", "val_fraction", "options", "split")
        differ = differences(first, settings, names, values="{new} (job 0: {old})")
        if differ:
            raise RuntimeError(
                f"cannot merge {folder}: job {index} was written with another {' and another '.join(differ)} than "
                f"job 0, so their shares of the input list do not add up (samples would be missing or there twice): "
                f"rerun job {index} (or every job) with the same --input and options as the others, then merge"
            )
    options = first["options"]
    segmented = options.get("max_frames") is not None or options.get("max_seconds") is not None
    schema = DatasetSchema(categories=options.get("label_map"))
    moves, number, owner = [], 0, {}
    for index in range(num_jobs):
        record = found[index]
        job_schema, job_keys = DatasetSchema(categories=options.get("label_map")), []
        for shard in record["shards"]:
            source, target = folder / shard["name"], folder / shard_name(number)
            number += 1
            picked = None
            for candidate in (source, target):  # the target: moved by an interrupted merge
                if candidate.is_file() and candidate.stat().st_size == shard["bytes"]:
                    scanned = scan_shard(candidate)
                    if scanned is not None and scanned[0] == shard["sha256"]:
                        picked = candidate, scanned
                        break
            if picked is None:
                raise RuntimeError(
                    f"cannot merge {folder}: {shard['name']} of job {index} is missing, or its content is not what "
                    f"job {index} recorded (size, sha256): {_rerun(index, num_jobs)} (it rewrites what does not "
                    "verify)"
                )
            path, (_, keys, signatures) = picked
            moves.append((path, target, shard))
            job_keys += keys
            for sig, key in signatures:
                job_schema.add(sig, key)
        problem = union_problem(record["settings"], record["skipped"], job_keys, segmented)
        if problem is not None:
            raise RuntimeError(f"cannot merge {folder}: job {index}: {problem}: {_rerun(index, num_jobs)}")
        for key in job_keys:
            if key in owner:
                raise RuntimeError(
                    f"cannot merge {folder}: the sample {key!r} is in job {owner[key]} and in job {index}: "
                    f"{_rerun(index, num_jobs)}"
                )
            owner[key] = index
        try:
            schema = schema.merged(job_schema)
        except MetadataError as exc:
            raise RuntimeError(
                f"cannot merge {folder}: the sidecars of job {index} disagree with those of the jobs before it: {exc}. "
                "Every sample of a dataset needs the same widths and label names: fix or remove the odd sidecars, "
                "then rerun the jobs and merge"
            ) from exc
    shards = []
    for source, target, shard in moves:
        if source != target:
            source.replace(target)
        shards.append({**shard, "name": target.name})
    finish_folder(folder, shards, schema, num_jobs)
    summary = WriteSummary(folder, written=sum(s["samples"] for s in shards))
    summary.shards = [index_entry(s) for s in shards]
    summary.skipped = [(s[1], s[2]) for index in range(num_jobs) for s in found[index]["skipped"]]
    return summary


def merge_jobs(output: str | Path) -> dict[str, WriteSummary]:
    """Finish a --num-jobs run in `output` (and its train/ and val/, where they hold job files) once every job is
    done: verify the jobs (each job file's digest; the same input list, --seed, --val-fraction and options; each
    shard's sha256; each job's samples and skips exactly its share of the input list; no key twice), rename the
    shards in job order to shard-000000.tar, ... and write index.json. Returns the summary per split ("all", or
    "train" and "val"). Raises RuntimeError naming the job to (re)run when one has not finished or does not verify,
    and FileNotFoundError when there is nothing to merge."""
    output = Path(output)
    folders = {"all": output, "train": output / "train", "val": output / "val"}
    with_jobs = {split: f for split, f in folders.items() if f.is_dir() and any(f.glob(JOB_GLOB))}
    if not with_jobs:
        raise FileNotFoundError(
            f"{output} holds no job files (job-IIIII-of-JJJJJ.json) to merge: run the jobs first (--num-jobs J "
            f"--job-index I); a folder with index.json and no job files is merged already"
        )
    return {split: _merge_folder(folder) for split, folder in with_jobs.items()}
