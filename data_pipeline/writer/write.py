"""The two ways to write a dataset: `write_samples`, for samples made in memory (e.g. by a simulator, worlds/), in this
process; and `write_shards`, for a folder or list of videos (data_pipeline/writer/inputs.py), in parallel, in jobs
and resumably (data_pipeline/writer/jobs.py). The module docstring of data_pipeline/writer/__init__.py describes
every option.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_pipeline.format import INDEX_NAME
from data_pipeline.sidecar import DatasetSchema
from data_pipeline.writer.folder import claim_folder, finish_folder
from data_pipeline.writer.inputs import FETCH_DEADLINE_S, MAX_INPUT_BYTES, InputVideo, input_digest, list_inputs
from data_pipeline.writer.jobs import write_job
from data_pipeline.writer.prepare import prepare, process_decoder
from data_pipeline.writer.sample import ACTION_ROWS, WRITER_ASPECTS, Options, Prepared, Reencode, Sample, read_label_map
from data_pipeline.writer.sink import ShardSink, WriteSummary, check_limits, index_entry, write_prepared


def write_samples(
    samples: Iterable[Sample],
    output: str | Path,
    *,
    samples_per_shard: int | None = None,
    bytes_per_shard: int | None = None,
    reencode: Reencode | None = None,
    total: int | None = None,
    progress: bool = True,
    action_rows: str = "transition",
) -> WriteSummary:
    """Write `samples` in order into OUTPUT/shard-*.tar + OUTPUT/index.json, in this process (for samples made in
    memory, e.g. by a simulator; `write_shards` reads inputs in parallel and resumes). Shards left from an earlier,
    larger run in OUTPUT are removed; a folder holding another kind of run's output is refused (OutputInUse).
    Undecodable samples, and sidecars that break the schema (data_pipeline/sidecar.py), are skipped and listed in
    the returned summary. `action_rows` says what the sidecars' `action` rows are: "transition" (one per transition
    t -> t+1, N-1 rows for N frames, as stored) or "frame" (N rows, one per frame; the last row is dropped)."""
    if action_rows not in ACTION_ROWS:
        raise ValueError(f"action_rows must be one of {ACTION_ROWS}, got {action_rows!r}")
    samples_per_shard = check_limits(samples_per_shard, bytes_per_shard)
    output = Path(output)
    claim_folder(output, 1)
    output.mkdir(parents=True, exist_ok=True)
    (output / INDEX_NAME).unlink(missing_ok=True)  # the folder is complete again when a new one is written
    summary, seen, options = WriteSummary(output), set(), Options(reencode, action_rows)
    schema = DatasetSchema()
    sink = ShardSink(output, samples_per_shard, bytes_per_shard)

    def prepared() -> Iterator[Prepared]:
        for sample in samples:
            if sample.key in seen:  # found before the work (the writer checks again, for the message)
                yield Prepared(sample.source, [(sample.key, [])], key=sample.key)
            else:
                yield prepare(sample, options, process_decoder())

    with tqdm(total=total, desc=f"writing {output}", unit=" videos", disable=not progress) as bar:
        write_prepared(prepared(), sink, summary, seen, schema, bar=bar)
    sink.close()
    summary.shards = [index_entry(s) for s in sink.shards]
    finish_folder(output, sink.shards, schema)
    return summary


def _duplicates(videos: list[InputVideo]) -> dict[int, str]:
    """{position: reason} for every video whose key an earlier video of the list has."""
    first: dict[str, int] = {}
    out = {}
    for i, video in enumerate(videos):
        if video.key in first:
            out[i] = f"duplicate key {video.key!r} (as {videos[first[video.key]].source}; rename one, or set the key)"
        else:
            first[video.key] = i
    return out


def write_shards(
    input_dir: str | Path,
    output_dir: str | Path,
    *,
    samples_per_shard: int | None = None,
    bytes_per_shard: int | None = None,
    size: int | None = None,
    fps: float | None = None,
    gop: int | None = None,
    aspect: str = "crop",
    max_frames: int | None = None,
    max_seconds: float | None = None,
    val_fraction: float = 0.0,
    seed: int = 0,
    progress: bool = True,
    action_rows: str = "transition",
    workers: int = 1,
    num_jobs: int = 1,
    job_index: int = 0,
    label_map: str | Path | Mapping | None = None,
    max_input_bytes: int = MAX_INPUT_BYTES,
    fetch_deadline_s: float = FETCH_DEADLINE_S,
) -> dict[str, WriteSummary]:
    """Shard the videos of `input_dir` (a folder, searched recursively, or a text/CSV list of paths and URLs) into
    `output_dir` (or its train/ and val/ when `val_fraction` > 0); data_pipeline/writer/__init__.py describes every
    option.

    Returns the summary per split ("all", or "train" and "val"). The val split is a seeded random
    `round(val_fraction * N)` of the N listed videos; shards keep the videos in sorted order. With `num_jobs` > 1
    this writes job `job_index`'s share of each split; `merge_jobs` finishes the folder once every job is done.
    `action_rows`: see `write_samples`. `label_map`: declared categorical labels, a JSON file (or a mapping)
    {label: [category, ...]} (data_pipeline/sidecar.py). `max_input_bytes`, `fetch_deadline_s`: the size cap and the
    download deadline per input (data_pipeline/writer/inputs.py). Raises OutputInUse when `output_dir` holds another
    run's output (see `folder.claim_folder`), ValueError for a bad option, FileNotFoundError for a missing input.
    """
    if action_rows not in ACTION_ROWS:
        raise ValueError(f"action_rows must be one of {ACTION_ROWS}, got {action_rows!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if aspect not in WRITER_ASPECTS:
        raise ValueError(f"aspect must be one of {', '.join(WRITER_ASPECTS)}, got {aspect!r}")
    if size is not None and (size < 2 or size % 2):
        raise ValueError(f"size must be an even number >= 2 (H.264 stores even frame sizes), got {size}")
    if max_frames is not None and max_frames < 2:
        raise ValueError(f"max_frames must be >= 2 (a segment needs a transition), got {max_frames}")
    if max_seconds is not None and max_seconds <= 0:
        raise ValueError(f"max_seconds must be > 0, got {max_seconds}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if num_jobs < 1 or not 0 <= job_index < num_jobs:
        raise ValueError(f"job_index must be in [0, num_jobs) and num_jobs >= 1, got {job_index} and {num_jobs}")
    if max_input_bytes < 1 or not fetch_deadline_s > 0:
        raise ValueError(f"max_input_bytes and fetch_deadline_s must be > 0, got {max_input_bytes}, {fetch_deadline_s}")
    limits = (check_limits(samples_per_shard, bytes_per_shard), bytes_per_shard)
    labels = read_label_map(label_map)
    videos = list_inputs(input_dir)
    segmented = max_frames is not None or max_seconds is not None
    reencode = Reencode(size, fps, gop or 8, aspect=aspect) if (size or fps or gop or segmented) else None
    options = Options(reencode, action_rows, max_frames, max_seconds, labels, max_input_bytes, fetch_deadline_s)
    output = Path(output_dir)
    if val_fraction > 0:
        val_ids = set(np.random.default_rng(seed).permutation(len(videos))[: round(val_fraction * len(videos))])
        splits = {
            "train": [v for i, v in enumerate(videos) if i not in val_ids],
            "val": [v for i, v in enumerate(videos) if i in val_ids],
        }
        targets = {"train": output / "train", "val": output / "val"}
    else:
        splits, targets = {"all": videos}, {"all": output}
    for target in targets.values():  # every folder before any is written
        claim_folder(target, num_jobs)
    digest = input_digest(videos)
    summaries = {}
    for split, listed in splits.items():
        problems = _duplicates(listed)
        lo, hi = len(listed) * job_index // num_jobs, len(listed) * (job_index + 1) // num_jobs
        summaries[split] = write_job(
            listed[lo:hi],
            {i - lo: reason for i, reason in problems.items() if lo <= i < hi},
            targets[split],
            split=split,
            digest=digest,
            seed=seed,
            val_fraction=val_fraction,
            options=options,
            limits=limits,
            job=(job_index, num_jobs),
            workers=workers,
            progress=progress,
        )
    return summaries
