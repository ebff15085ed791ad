"""One job's write, resumable: its record (the job file), the settings a rerun must match, and what a rerun keeps.

A job is the whole input of a single run, or job I's share of a `--num-jobs J` run (data_pipeline/writer/__init__.py,
"Jobs"). Its record, OUTPUT/job-IIIII-of-JJJJJ.json, holds the settings (`_settings`: the input fingerprint, --seed,
--val-fraction, the job's share of its split, the options), each complete shard (size, sha256, sample count, first
and last key, where in the input it ends), every skipped input (position, name, reason, KEY), and its own digest
(`record_digest`), and is rewritten atomically after each shard. A rerun with the same settings keeps the leading
recorded shards that verify (`_verified`) and writes from there on; other settings, or a record that does not
verify, start over (saying why). At its end a job checks that its samples and skips are exactly its share of the
input (`union_problem`, which the merge checks again).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict
from functools import partial
from pathlib import Path

from tqdm import tqdm

from data_pipeline.format import INDEX_NAME, SEGMENT_KEY, SINGLE_SHARD, job_file_name, shard_name
from data_pipeline.sidecar import DatasetSchema
from data_pipeline.writer.folder import finish_folder, write_json
from data_pipeline.writer.inputs import InputVideo
from data_pipeline.writer.prepare import ordered_map, prepare_input
from data_pipeline.writer.sample import Options
from data_pipeline.writer.sink import ShardSink, WriteSummary, index_entry, scan_shard, write_prepared

JOB_FORMAT = 2  # 2: seed, val fraction, input fingerprint, sha256 per shard, skipped keys, the record's own digest


def record_digest(record: dict) -> str:
    """sha256 of a job record's canonical JSON, without its own `digest` field."""
    body = {k: v for k, v in record.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _save_record(path: Path, record: dict) -> None:
    """Write a job file atomically, with the digest of its content (so an edited or damaged one is seen as such)."""
    record["digest"] = record_digest(record)
    write_json(path, record, indent=1)


def load_record(path: Path) -> tuple[dict | None, str]:
    """(the job record, ""), or (None, why it cannot be trusted)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        return None, f"cannot be read ({exc})"
    if not isinstance(record, dict) or record.get("format") != JOB_FORMAT:
        return None, f"is not a job file of this writer's format ({JOB_FORMAT})"
    if record.get("digest") != record_digest(record):
        return None, "was edited or damaged after the writer wrote it (its digest does not match its content)"
    return record, ""


def _keys_digest(keys: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode("utf-8", "surrogateescape")).hexdigest()


def _settings(
    split: str,
    digest: str,
    videos: list[InputVideo],
    job: tuple[int, int],
    options: Options,
    limits: tuple,
    seed: int,
    val_fraction: float,
) -> dict:
    """What a job's output depends on (any --workers gives the same): the whole input list (`digest`, see
    inputs.input_digest), the options that decide the split (seed, fraction), this job's share of its split
    (its inputs' keys), and the options."""
    return {
        "inputs": digest,
        "split": split,
        "seed": seed,
        "val_fraction": val_fraction,
        "job": list(job),
        "count": len(videos),
        "slice": _keys_digest(v.key for v in videos),
        "options": _options_record(options, limits),
    }


def _options_record(options: Options, limits: tuple) -> dict:
    return {
        "samples_per_shard": limits[0],
        "bytes_per_shard": limits[1],
        "reencode": asdict(options.reencode) if options.reencode else None,
        "action_rows": options.action_rows,
        "max_frames": options.max_frames,
        "max_seconds": options.max_seconds,
        "label_map": options.labels,
        "max_input_bytes": options.max_input_bytes,
        "fetch_deadline_s": options.fetch_deadline_s,
    }


_SETTING_NAMES = {
    "inputs": "input list (a video or sidecar added, removed, replaced or touched since)",
    "seed": "--seed",
    "val_fraction": "--val-fraction",
    "options": "options (shard size, re-encoding, --action-rows, --label-map, input limits)",
    "job": "--num-jobs / --job-index",
    "split": "split",
    "count": "share of the inputs",
    "slice": "share of the inputs",
}


def differences(
    old: object, new: dict, names: Iterable[str] = _SETTING_NAMES, values: str = "{old} (now {new})"
) -> list[str]:
    """The settings (of `_settings`) in which `old` differs from `new`, described, with the values of small ones
    (formatted by `values`)."""
    if not isinstance(old, dict):
        return ["settings (it records none)"]
    out = []
    for name in names:
        if old.get(name) != new.get(name):
            text = _SETTING_NAMES[name]
            if name in ("seed", "val_fraction", "job"):
                text += " " + values.format(old=old.get(name), new=new.get(name))
            if text not in out:
                out.append(text)
    return out


def _verified(output: Path, shards: list[dict], schema: DatasetSchema) -> tuple[list[dict], list[str]]:
    """The leading shards of `shards` whose content is as recorded (size, sha256, sample count, first and last
    key), and their sample keys in order; their samples are added to `schema`."""
    kept: list[dict] = []
    keys: list[str] = []
    for shard in shards:
        path = output / shard["name"]
        if not path.is_file() or path.stat().st_size != shard.get("bytes"):
            break
        scanned = scan_shard(path)
        if scanned is None:
            break
        sha, found, signatures = scanned
        ends = (shard.get("first_key"), shard.get("last_key"))
        if sha != shard.get("sha256") or not found or len(found) != shard["samples"] or (found[0], found[-1]) != ends:
            break
        kept.append(shard)
        keys += found
        for sig, key in signatures:
            schema.add(sig, key)
    return kept, keys


def _input_keys(keys: list[str], segmented: bool) -> list[str]:
    """The KEY of each input whose samples `keys` are, in order (with segments: a run of KEY-segNNNNN is one input)."""
    if not segmented:
        return list(keys)
    out: list[str] = []
    previous = None
    for key in keys:
        match = SEGMENT_KEY.match(key)
        base, index = (match.group(1), int(match.group(2))) if match else (key, 0)
        if index == 0 or base != previous:
            out.append(base)
        previous = base
    return out


def union_problem(settings: dict, skipped: list, keys: list[str], segmented: bool) -> str | None:
    """Why a job's samples (`keys`, in shard order) and its skipped inputs are not exactly its share of the inputs
    (in order, no key twice), or None."""
    repeated = next((k for k, n in Counter(keys).items() if n > 1), None)
    if repeated is not None:
        return f"its shards hold the sample {repeated!r} twice"
    written = _input_keys(keys, segmented)
    skips = {s[0]: s[3] for s in skipped if isinstance(s, list) and len(s) == 4}
    count = settings["count"]
    if len(skips) != len(skipped) or len(written) + len(skips) != count or any(not 0 <= p < count for p in skips):
        return (
            f"its shards hold {len(written)} inputs and it skipped {len(skipped)}, but its share of the input list "
            f"has {count}: samples are missing or extra"
        )
    rest = iter(written)
    ordered = [skips[p] if p in skips else next(rest) for p in range(count)]
    if _keys_digest(ordered) != settings["slice"]:
        return "its shards and skipped inputs are not its share of the input list (other inputs, or out of order)"
    return None


def write_job(
    videos: list[InputVideo],
    problems: dict[int, str],
    output: Path,
    *,
    split: str,
    digest: str,
    seed: int,
    val_fraction: float,
    options: Options,
    limits: tuple[int | None, int | None],
    job: tuple[int, int],
    workers: int,
    progress: bool,
) -> WriteSummary:
    """Write one job's share `videos` (positions in `problems` are skipped with that reason) into `output`,
    resuming from its job file when it verifies (its digest) and its settings match."""
    output.mkdir(parents=True, exist_ok=True)
    if job[1] == 1:
        (output / INDEX_NAME).unlink(missing_ok=True)  # a single run replaces its folder: rewritten when complete
    job_file = output / job_file_name(job)
    settings = _settings(split, digest, videos, job, options, limits, seed, val_fraction)
    state = None
    if job_file.exists():
        state, why = load_record(job_file)
        if state is not None and state.get("settings") != settings:
            why = f"is from another run: other {', '.join(differences(state.get('settings'), settings))}"
            state = None
        if state is None:
            print(f"{output}: {job_file.name} {why}; starting over", file=sys.stderr)
    schema = DatasetSchema(categories=options.labels)
    kept, written = _verified(output, state["shards"], schema) if state else ([], [])
    start = tuple(kept[-1]["next"]) if kept else (0, 0)
    skipped_at = [s for s in state["skipped"] if s[0] < start[0]] if state else []
    keep = {s["name"] for s in kept}
    prefix = shard_name(0, job).rsplit("-", 1)[0] + "-"  # this job's shard names: shard- or shard-jIIIII-
    for stale in [*output.glob(f"{prefix}*.tar"), *output.glob(f"{prefix}*.tar.tmp")]:
        own = job[1] > 1 or SINGLE_SHARD.match(stale.name)
        if own and stale.name not in keep:
            stale.unlink(missing_ok=True)
    record = {
        "format": JOB_FORMAT,
        "settings": settings,
        "job_index": job[0],
        "num_jobs": job[1],
        "inputs": len(videos),
        "complete": False,
        "shards": kept,
        "skipped": skipped_at,
    }
    _save_record(job_file, record)
    summary = WriteSummary(output, skipped=[(s[1], s[2]) for s in skipped_at], kept=len(kept))
    summary.written = len(written)
    summary.job = job if job[1] > 1 else None

    def save(_shard: dict | None = None) -> None:
        record["shards"] = sink.shards
        _save_record(job_file, record)

    sink = ShardSink(output, *limits, job=job, shards=kept, keys=written, on_close=save)
    tasks = ((videos[i], problems.get(i)) for i in range(start[0], len(videos)))
    desc = f"writing {output}" + (f" (job {job[0]} of {job[1]})" if job[1] > 1 else "")
    with tqdm(total=len(videos), initial=start[0], desc=desc, unit=" videos", disable=not progress) as bar:
        items = ordered_map(partial(prepare_input, options=options), tasks, workers)
        write_prepared(items, sink, summary, set(written), schema, start=start, skipped_at=skipped_at, bar=bar)
    sink.close((len(videos), 0))
    problem = union_problem(settings, skipped_at, sink.keys, options.segmented)
    if problem is not None:
        raise RuntimeError(
            f"{output} (job {job[0]} of {job[1]}): {problem}. Did its shards or {job_file.name} change while it ran? "
            "Run it again"
        )
    record["complete"] = True
    save()
    summary.shards = [index_entry(s) for s in sink.shards]
    if job[1] == 1:
        finish_folder(output, sink.shards, schema)
    return summary
