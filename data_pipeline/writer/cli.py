"""The writer's command line: `python -m data_pipeline.writer --input ... --output ...` writes (a job of) a dataset,
`python -m data_pipeline.writer --merge OUTPUT` merges the jobs of a `--num-jobs` run. Exit status 0 when samples
were written (or a job finished), 1 when none were, 2 for an error (a bad option, another run's output in the
folder, a merge that does not verify), with one line saying what to do.
"""

from __future__ import annotations

import argparse
import sys

import data_pipeline.writer
from data_pipeline.writer.inputs import FETCH_DEADLINE_S, MAX_INPUT_BYTES
from data_pipeline.writer.merge import merge_jobs
from data_pipeline.writer.sample import ACTION_ROWS, WRITER_ASPECTS
from data_pipeline.writer.sink import DEFAULT_SAMPLES_PER_SHARD
from data_pipeline.writer.write import write_shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_pipeline.writer", description=data_pipeline.writer.__doc__.split("\n\n")[0]
    )
    parser.add_argument("--input", help="folder of videos (recursive; NAME.json sidecars), or a text/CSV list")
    parser.add_argument("--output", help="folder for shard-*.tar and index.json")
    parser.add_argument("--merge", metavar="OUTPUT", help="merge the job files of a --num-jobs run in OUTPUT")
    limit = parser.add_mutually_exclusive_group()
    limit.add_argument("--samples-per-shard", type=int, help=f"default {DEFAULT_SAMPLES_PER_SHARD}")
    limit.add_argument("--bytes-per-shard", type=int)
    parser.add_argument("--workers", type=int, default=1, help="processes preparing videos (default 1)")
    parser.add_argument("--num-jobs", type=int, default=1, help="split the input into this many jobs")
    parser.add_argument("--job-index", type=int, default=0, help="the job to write, 0..NUM_JOBS-1")
    parser.add_argument("--size", type=int, help="re-encode to SIZE x SIZE pixels (see --aspect)")
    parser.add_argument(
        "--aspect",
        choices=WRITER_ASPECTS,
        default="crop",
        help="with --size: crop (short side to SIZE, centre crop; default), pad (long side to SIZE, black bars), "
        "squash (both sides to SIZE), short (short side to SIZE, the aspect kept)",
    )
    parser.add_argument("--fps", type=float, help="re-encode at this frame rate (nearest frames kept)")
    parser.add_argument("--gop", type=int, help="re-encode with a keyframe every GOP frames (default 8)")
    parser.add_argument("--max-frames", type=int, help="cut videos into segments of at most this many frames")
    parser.add_argument("--max-seconds", type=float, help="cut videos into segments of at most this many seconds")
    parser.add_argument("--val-fraction", type=float, default=0.0, help="write OUTPUT/train and OUTPUT/val")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    parser.add_argument(
        "--action-rows",
        choices=ACTION_ROWS,
        default="transition",
        help="what the sidecars' 'action' rows are: one per transition t -> t+1, N-1 rows for N frames (default), "
        "or one per frame, N rows (the last row, taken at the last frame, is dropped)",
    )
    parser.add_argument(
        "--label-map",
        metavar="FILE",
        help='declared categorical labels: a JSON file {"label": ["category", ...]}; a category is stored as its '
        "index (a string label without one is skipped with the reason)",
    )
    parser.add_argument(
        "--max-input-bytes",
        type=int,
        default=MAX_INPUT_BYTES,
        help=f"skip an input (video) larger than this (default {MAX_INPUT_BYTES})",
    )
    parser.add_argument(
        "--fetch-deadline",
        type=float,
        default=FETCH_DEADLINE_S,
        help=f"seconds for downloading one input, all tries together (default {FETCH_DEADLINE_S:g})",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in batch job logs)")
    args = parser.parse_args(argv)
    if args.merge:
        try:
            summaries = merge_jobs(args.merge)
        except (FileNotFoundError, RuntimeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        for summary in summaries.values():
            print(summary.report())
        return 0 if any(s.written for s in summaries.values()) else 1
    if not args.input or not args.output:
        parser.error("--input and --output are required (or --merge OUTPUT)")
    try:
        summaries = write_shards(
            args.input,
            args.output,
            samples_per_shard=args.samples_per_shard,
            bytes_per_shard=args.bytes_per_shard,
            size=args.size,
            fps=args.fps,
            gop=args.gop,
            aspect=args.aspect,
            max_frames=args.max_frames,
            max_seconds=args.max_seconds,
            val_fraction=args.val_fraction,
            seed=args.seed,
            action_rows=args.action_rows,
            workers=args.workers,
            num_jobs=args.num_jobs,
            job_index=args.job_index,
            label_map=args.label_map,
            max_input_bytes=args.max_input_bytes,
            fetch_deadline_s=args.fetch_deadline,
            progress=not args.no_progress,
        )
    except (FileNotFoundError, ValueError, RuntimeError) as exc:  # OutputInUse is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for summary in summaries.values():
        print(summary.report())
    if args.num_jobs > 1:
        print(
            f"job {args.job_index} of {args.num_jobs} done; once all are: python -m data_pipeline.writer "
            f"--merge {args.output}"
        )
        return 0
    return 0 if any(s.written for s in summaries.values()) else 1
