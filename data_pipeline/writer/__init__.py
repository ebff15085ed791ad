"""Write videos (with optional sidecar JSON) into webdataset tar shards: in parallel, in jobs, resumably.

    python -m data_pipeline.writer --input videos/|list.txt|list.csv --output shards/
        [--samples-per-shard N | --bytes-per-shard B] [--workers N] [--num-jobs J --job-index I]
        [--size S --aspect crop|pad|squash|short --fps F --gop G] [--max-frames F | --max-seconds S]
        [--val-fraction f --seed s] [--action-rows transition|frame] [--label-map FILE]
        [--max-input-bytes B] [--fetch-deadline S]
    python -m data_pipeline.writer --merge shards/                 # after the J jobs of a --num-jobs J run

**Input** (data_pipeline/writer/inputs.py): a folder of videos, searched recursively (`NAME.mp4`, .webm, .avi, .mkv,
.mov, ... with an optional sidecar `NAME.json` next to it), or a text or CSV list of paths and http(s) URLs, each
with an optional sidecar. The sidecar holds `state`, `state_names`, `action`, `action_names`, `events`, `labels`
(docs/architecture.md). The shards store one `action` row per transition t -> t+1 (N-1 rows for N frames), and so
must the sidecars by default; sidecars that store one action per frame (N rows, the action taken at frame t, the last
one unused) need `--action-rows frame`, which drops the last row. A sidecar whose row count fits neither is skipped
with the reason (the check is strict: an off-by-one would otherwise shift every action by a frame without a word).
Every sidecar is checked against the sidecar schema (data_pipeline/sidecar.py: types, finite numbers, a size and a
depth limit, one width per field across the dataset, integer labels, or strings of a categorical label declared
with `--label-map FILE` ({"activity": ["walking", "running"]}: stored as 0, 1)); one that breaks it is skipped
with the reason. Whatever goes wrong with one input (unreadable, not a regular file, too big, a download that fails
past its retries or its deadline: data_pipeline/writer/inputs.py) is that input's skip, named; the write goes on.

**Output**:

    OUTPUT/shard-000000.tar      KEY.mp4 (or the source extension) + KEY.json per sample, in the sorted input order
    OUTPUT/index.json            {"shards": [{"name", "samples", "bytes", "sha256"}], "total_samples",
                                  "schema": {field: {"width", "names", "samples", ...}}, "num_jobs"}
    (with --val-fraction: the same under OUTPUT/train/ and OUTPUT/val/)

KEY.json is the sidecar with `fps`, `num_frames`, `height`, `width` filled in from the decoded video (standard
JSON: no NaN or Infinity). Every video is decoded once to check it; one that cannot be read or decoded is reported
by name and skipped, and so is a second input with the KEY of an earlier one (KEYs keep Unicode:
inputs.sanitise_key). With --size/--fps/--gop (or --max-frames/--max-seconds) the video is re-encoded to
H.264 (short GOP, no B-frames) and the sidecar rows follow the kept frames; `--size S` makes frames S x S by
`--aspect`: `crop` (default: short side to S, centre crop), `pad` (long side to S, black bars), `squash` (both
sides to S, the aspect lost), or `short` (short side to S, the aspect kept, the long side rounded to even: the
loader crops, e.g. a random crop per clip with data.random_crop).

**Deterministic and parallel**: `--workers N` prepares (reads, decodes, checks, re-encodes) videos in N processes;
the parent takes the results in input order and writes the tars, so the order and the shard boundaries come from
the sorted input and the samples' bytes alone, never from N or timing. Without re-encoding the shards are
byte-identical whatever N (fixed order, tar mtimes, owners and JSON layout). libx264 is not bit-exact from call to
call here (data_pipeline/writer/encode.py), so re-encoded samples have the same keys, order and metadata and frames
equal within codec noise; with `--samples-per-shard` their shard boundaries are fixed too, with `--bytes-per-shard` a
boundary may move by a sample between runs (the sizes vary by a few bytes).

**Jobs** (a SLURM job array, several machines: docker/write_shards_array.sbatch): `--num-jobs J --job-index I`
writes job I's share: the train/val split is drawn on the whole sorted list first, then job I takes the I-th of J
contiguous slices of each split. Job I names its shards `shard-jIIIII-KKKKKK.tar` (no two jobs collide) and
records them in `OUTPUT/job-IIIII-of-JJJJJ.json`; once all J jobs are done, `--merge OUTPUT` checks that every job
finished, renames the shards in job order to `shard-000000.tar, shard-000001.tar, ...` and writes index.json. The
result holds the same samples in the same order with the same bytes as one run over the whole input; only the shard
boundaries differ (each job starts a new shard, so a job's last shard may be short), hence the numbering. The merge
verifies before it moves anything, and refuses naming the job to rerun: each job file's own digest (an edited or
damaged one), the same input fingerprint, --seed, --val-fraction and options in every job (jobs of different runs
would drop or duplicate samples), each shard's sha256, each job's samples plus its skipped inputs being exactly its
share of the input list in order, and no key in two jobs.

**Another run's output is never deleted**: a write refuses (OutputInUse) an output folder holding the job files of
an unmerged run with another --num-jobs, and a finished folder (index.json) unless both it and the write are single
runs (a single run replaces its own earlier output); so a rerun after a merge never deletes index.json. A single
run removes only shard-NNNNNN.tar names and its own job file.

**Resumable**: a shard is written to `NAME.tar.tmp` and renamed when complete, so a partial tar is never visible.
The job file records the settings (the input fingerprint: inputs.input_digest, the sha256 of the whole
input list with the size and mtime of every local video and sidecar; --seed, --val-fraction, the job's share of its
split, the options), each complete shard (size, sha256, sample count, first and last key, where in the input it
ends), every skipped input (position, name, reason, KEY), and its own digest. A rerun with the same input and
options (any --workers) verifies the recorded shards (size, sha256, tar member list), keeps the leading ones that
verify, and writes from there on; the result is the same as that of an uninterrupted run (byte-identical without
re-encoding). Other options, another input list (a video or sidecar added, removed, replaced or touched), or a job
file that was edited, start over (saying which). At its end a job checks that its samples and skips are exactly its
inputs. A single run (J = 1) writes index.json at the end and removes its job file and any shard-NNNNNN.tar not in
the index.

**Long videos**: `--max-frames F` / `--max-seconds S` cut every video into consecutive segments of F frames (S
seconds at the output frame rate), each its own sample `KEY-segNNNNN` (a last segment of fewer than 2 frames is
dropped), re-encoded (at the source size and frame rate unless --size/--fps say otherwise). A segment of F frames
has its F `state` rows and the F-1 `action`/`events` rows of its own transitions: the transition from one segment's
last frame to the next one's first belongs to neither and is dropped. KEY.json has `"segment": {"of": KEY,
"index", "count", "frame_offset" (its first frame in the re-encoded video's frames), "source_frame" (in the input's
frames), "time_offset" (seconds)}`. Videos are decoded and encoded segment by segment, so memory stays bounded.

**The package**, one job per module, in the order a sample passes through them: `inputs` (list and read the
inputs), `sample` (a sample, the options, its sidecar checked), `encode` (re-encode to H.264), `prepare` (prepare
inputs, in worker processes), `sink` (append to the shard tars, verify a written shard), `folder` (claim and finish
the output folder), `jobs` (one job's resumable write and its record), `write` (`write_samples`, `write_shards`),
`merge` (`merge_jobs`), `cli` (`python -m data_pipeline.writer`). The names the reader shares with it (shard and
index names, video extensions) are in data_pipeline/format.py; the reader imports nothing from this package.
"""

from data_pipeline.writer.folder import OutputInUse
from data_pipeline.writer.inputs import sanitise_key
from data_pipeline.writer.merge import merge_jobs
from data_pipeline.writer.prepare import prepare_sample
from data_pipeline.writer.sample import Reencode, Sample
from data_pipeline.writer.sink import WriteSummary
from data_pipeline.writer.write import write_samples, write_shards

__all__ = [
    "OutputInUse",
    "Reencode",
    "Sample",
    "WriteSummary",
    "merge_jobs",
    "prepare_sample",
    "sanitise_key",
    "write_samples",
    "write_shards",
]
