"""The shard format's names: what both sides of the format, the reader (data_pipeline/) and the writer
(data_pipeline/writer/), must agree on. Both import them from here; the reader never imports the writer.

What a sample's KEY.json may hold is the sidecar schema (data_pipeline/sidecar.py), shared the same way;
docs/architecture.md ("Shard format") describes both. A shard folder (one split of a dataset; a write with a
validation split makes OUTPUT/train/ and OUTPUT/val/):

    shard-000000.tar, shard-000001.tar, ...   `shard_name(n)`: a single run's shards, or a merged run's
    index.json                                `INDEX_NAME`: written last; a folder without it is not finished
    shard-jIIIII-NNNNNN.tar                   `shard_name(n, (I, J))`: job I of a `--num-jobs J` run's shards,
                                              until the merge renames them
    job-IIIII-of-JJJJJ.json                   `job_file_name((I, J))`: job I's record (`JOB_GLOB` matches every
                                              job's), until the merge removes it

A shard holds, per sample and in order, `KEY.EXT` (EXT one of `VIDEO_EXTENSIONS`) and `KEY.json`. A video cut into
segments (the writer's --max-frames/--max-seconds) gives one sample per segment, keyed `segment_key(KEY, index)`.
"""

from __future__ import annotations

import re

VIDEO_EXTENSIONS = ("mp4", "webm", "avi", "mkv", "mov", "m4v", "mpg", "mpeg", "ogv")  # the loader reads these
STORED_FIELDS = ("fps", "num_frames", "height", "width")  # KEY.json fields the writer fills in from the decoded video
INDEX_NAME = "index.json"
JOB_GLOB = "job-*-of-*.json"
JOB_FILE = re.compile(r"^job-(\d{5,})-of-(\d{5,})\.json$")
SINGLE_SHARD = re.compile(r"^shard-\d{6}\.tar(\.tmp)?$")  # a single run's (and a merge's) shard names
SEGMENT_KEY = re.compile(r"^(.*)-seg(\d{5,})$")


def shard_name(number: int, job: tuple[int, int] = (0, 1)) -> str:
    """Shard `number` of job (index, count): shard-NNNNNN.tar in a single run, shard-jIIIII-NNNNNN.tar in a job."""
    index, count = job
    return f"shard-{number:06d}.tar" if count == 1 else f"shard-j{index:05d}-{number:06d}.tar"


def job_file_name(job: tuple[int, int]) -> str:
    """The record of job (index, count): job-IIIII-of-JJJJJ.json."""
    return f"job-{job[0]:05d}-of-{job[1]:05d}.json"


def segment_key(key: str, index: int) -> str:
    """The sample key of segment `index` of the video `key`: KEY-segNNNNN."""
    return f"{key}-seg{index:05d}"
