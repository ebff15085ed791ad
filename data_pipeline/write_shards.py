"""Write a folder of videos (with optional sidecar JSON) into webdataset tar shards.

    python -m data_pipeline.write_shards --input videos/ --output shards/ [--samples-per-shard N | --bytes-per-shard B]
        [--size S --fps F --gop G] [--val-fraction f --seed s] [--action-rows transition|frame]

Input: `NAME.mp4` (or .webm, .avi, .mkv, .mov, ...) with an optional sidecar `NAME.json` holding `state`,
`state_names`, `action`, `action_names`, `events`, `labels` (docs/architecture.md). The shards store one `action` row
per transition t -> t+1 (N-1 rows for N frames), and so must the sidecars by default; sidecars that store one action
per frame (N rows, the action taken at frame t, the last one unused) need `--action-rows frame`, which drops the last
row. A sidecar whose row count fits neither is skipped with the reason (the check is strict: an off-by-one would
otherwise shift every action by a frame without a word). Output layout:

    OUTPUT/shard-000000.tar      KEY.mp4 (or the source extension) + KEY.json per sample, KEY = NAME sanitised
    OUTPUT/index.json            {"shards": [{"name", "samples", "bytes"}], "total_samples"}
    (with --val-fraction: the same under OUTPUT/train/ and OUTPUT/val/)

KEY.json is the sidecar with `fps`, `num_frames`, `height`, `width` filled in from the decoded video. Every video is
decoded once to check it; one that cannot be decoded is reported by name and skipped. With --size/--fps/--gop the
video is re-encoded to H.264 (short GOP, no B-frames) and the sidecar rows follow the kept frames. The output is
deterministic: the same input gives byte-identical shards (fixed order, tar mtimes, owners and JSON layout);
with re-encoding the samples and metadata are the same but libx264 may not give the same bytes every time.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_pipeline.clips import MetadataError, cut_metadata
from data_pipeline.decoders import DecodeError, PyAVDecoder
from data_pipeline.encode import encode_h264

VIDEO_EXTENSIONS = ("mp4", "webm", "avi", "mkv", "mov", "m4v", "mpg", "mpeg", "ogv")
STORED_FIELDS = ("fps", "num_frames", "height", "width")
ACTION_ROWS = ("transition", "frame")  # what a sidecar's `action` rows are: one per transition, or one per frame
DEFAULT_SAMPLES_PER_SHARD = 1000


@dataclass
class Sample:
    """One video to write: `video` bytes in container `ext`, its sidecar metadata, and a name for messages."""

    key: str
    video: bytes
    ext: str
    sidecar: dict
    source: str
    problem: str | None = None  # why the sidecar could not be read, if it could not


@dataclass(frozen=True)
class Reencode:
    """Re-encode to H.264: `size` x `size` pixels (None keeps the size), `fps` (None keeps it), GOP `gop`."""

    size: int | None = None
    fps: float | None = None
    gop: int = 8
    crf: int = 10


@dataclass
class WriteSummary:
    """What a write produced: samples written, shard files, and the skipped inputs with the reason for each."""

    output: Path
    written: int = 0
    shards: list[dict] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def report(self) -> str:
        head = f"{self.output}: wrote {self.written} samples in {len(self.shards)} shards, skipped {len(self.skipped)}"
        lines = [head]
        lines += [f"  skipped {name}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


def sanitise_key(name: str) -> str:
    """A webdataset key from a file stem: dots would split the key, so anything but [A-Za-z0-9_-] becomes '_'."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


def _checked_sidecar(sample: Sample, num_frames: int, action_rows: str = "transition") -> dict:
    """The sample's sidecar in the shard format (one `action` row per transition) after checking it against a video
    of `num_frames` frames; with `action_rows="frame"` the sidecar has one action per frame and the last is dropped.

    Raises MetadataError with the reason, naming --action-rows when the `action` row count fits the other option.
    """
    if sample.problem:
        raise MetadataError(sample.problem)
    if not isinstance(sample.sidecar, dict):
        raise MetadataError(f"the sidecar must be a JSON object, got {type(sample.sidecar).__name__}")
    sidecar = sample.sidecar
    action = sidecar.get("action")
    if isinstance(action, list):
        per_frame = action_rows == "frame"
        expected = num_frames if per_frame else num_frames - 1
        if len(action) != expected:
            if per_frame:
                per = "one per frame, as --action-rows frame says; the last one is dropped"
                other = "if your sidecars store one action per transition t -> t+1, leave out --action-rows frame"
            else:
                per = "one per transition t -> t+1"
                other = "if your sidecars store one action per frame (the last one unused), pass --action-rows frame"
            hint = f"; {other}" if len(action) == (num_frames - 1 if per_frame else num_frames) else ""
            raise MetadataError(
                f"'action' has {len(action)} rows for a video of {num_frames} frames; expected {expected} rows ({per})"
                f"{hint}"
            )
        if per_frame:
            sidecar = {**sidecar, "action": action[:-1]}
    cut_metadata({**sidecar, "num_frames": num_frames}, np.arange(num_frames))
    return sidecar


def _resampled_indices(num_frames: int, src_fps: float, fps: float | None) -> np.ndarray:
    """Source frame for each output frame when changing the frame rate (nearest frame in time): int64 [T_out]."""
    if fps is None or fps == src_fps:
        return np.arange(num_frames)
    if src_fps <= 0:
        raise DecodeError("the video reports no frame rate, so it cannot be resampled to --fps")
    duration = (num_frames - 1) / src_fps
    out = np.arange(int(np.floor(duration * fps + 1e-9)) + 1)
    return np.minimum(np.round(out * src_fps / fps).astype(np.int64), num_frames - 1)


def prepare_sample(
    sample: Sample, reencode: Reencode | None, decoder: PyAVDecoder, *, action_rows: str = "transition"
) -> tuple[bytes, str, dict]:
    """Check (and optionally re-encode) one video -> (video bytes, extension, KEY.json dict).

    `action_rows`: "transition" (the sidecar's `action` has one row per transition, as stored) or "frame" (one row
    per frame; the last is dropped). Raises DecodeError or MetadataError with the reason when the sample must be
    skipped.
    """
    info = decoder.info(sample.video)
    meta = dict(_checked_sidecar(sample, info.num_frames, action_rows))
    if reencode is None:
        video, ext = sample.video, sample.ext
        meta.update(fps=info.fps, num_frames=info.num_frames, height=info.height, width=info.width)
        return video, ext, meta
    indices = _resampled_indices(info.num_frames, info.fps, reencode.fps)
    unique, inverse = np.unique(indices, return_inverse=True)
    frames = decoder.decode(sample.video, unique.tolist(), size=reencode.size or 0)[inverse]
    fps = reencode.fps or info.fps
    try:
        video = encode_h264(frames, fps, gop=reencode.gop, crf=reencode.crf)
    except ValueError as exc:
        raise DecodeError(f"re-encoding failed: {exc}") from exc
    meta.update({k: v.tolist() for k, v in cut_metadata({**meta, "num_frames": info.num_frames}, indices).items()})
    meta.update(fps=float(fps), num_frames=len(indices), height=frames.shape[1], width=frames.shape[2])
    return video, "mp4", meta


def _tar_add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(payload))


class _ShardSink:
    """Appends samples to shard-NNNNNN.tar files, starting a new one at the sample or byte limit."""

    def __init__(self, output: Path, samples_per_shard: int | None, bytes_per_shard: int | None) -> None:
        self.output, self.samples_limit, self.bytes_limit = output, samples_per_shard, bytes_per_shard
        self.shards: list[dict] = []
        self._tar: tarfile.TarFile | None = None

    def _full(self, incoming: int) -> bool:
        current = self.shards[-1]
        if self.samples_limit is not None and current["samples"] >= self.samples_limit:
            return True
        over_bytes = self.bytes_limit is not None and current["bytes"] + incoming > self.bytes_limit
        return over_bytes and current["samples"] > 0

    def add(self, key: str, entries: list[tuple[str, bytes]]) -> None:
        incoming = sum(len(payload) + 1024 for _, payload in entries)  # + tar header and padding, roughly
        if self._tar is None or self._full(incoming):
            self.close()
            self.shards.append({"name": f"shard-{len(self.shards):06d}.tar", "samples": 0, "bytes": 0})
            tmp = self.output / (self.shards[-1]["name"] + ".tmp")
            self._tar = tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT)  # noqa: SIM115 (closed in close())
        for ext, payload in entries:
            _tar_add(self._tar, f"{key}.{ext}", payload)
        self.shards[-1]["samples"] += 1
        self.shards[-1]["bytes"] += incoming

    def close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._tar = None
        final = self.output / self.shards[-1]["name"]
        Path(str(final) + ".tmp").replace(final)
        self.shards[-1]["bytes"] = final.stat().st_size


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
    """Write `samples` in order into OUTPUT/shard-*.tar + OUTPUT/index.json; shards left from an earlier, larger
    run in OUTPUT are removed. Undecodable samples are skipped and listed in the returned summary. `action_rows`
    says what the sidecars' `action` rows are: "transition" (one per transition t -> t+1, N-1 rows for N frames,
    as stored) or "frame" (N rows, one per frame; the last row is dropped)."""
    if action_rows not in ACTION_ROWS:
        raise ValueError(f"action_rows must be one of {ACTION_ROWS}, got {action_rows!r}")
    if samples_per_shard is None and bytes_per_shard is None:
        samples_per_shard = DEFAULT_SAMPLES_PER_SHARD
    for name, limit in (("samples_per_shard", samples_per_shard), ("bytes_per_shard", bytes_per_shard)):
        if limit is not None and limit < 1:
            raise ValueError(f"{name} must be >= 1, got {limit}")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    summary, decoder, seen = WriteSummary(output), PyAVDecoder(), set()
    sink = _ShardSink(output, samples_per_shard, bytes_per_shard)
    for sample in tqdm(samples, total=total, desc=f"writing {output}", unit="video", disable=not progress):
        if sample.key in seen:
            summary.skipped.append((sample.source, f"duplicate key {sample.key!r} (another input has the same stem)"))
            continue
        try:
            video, ext, meta = prepare_sample(sample, reencode, decoder, action_rows=action_rows)
        except (DecodeError, MetadataError) as exc:
            summary.skipped.append((sample.source, f"{type(exc).__name__}: {exc}"))
            continue
        seen.add(sample.key)
        meta_bytes = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
        sink.add(sample.key, [(ext, video), ("json", meta_bytes)])
        summary.written += 1
    sink.close()
    summary.shards = sink.shards
    keep = {s["name"] for s in sink.shards}
    for stale in output.glob("shard-*.tar"):
        if stale.name not in keep:
            stale.unlink()
    index = {"shards": sink.shards, "total_samples": summary.written}
    (output / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return summary


def _read_folder(names: list[Path], root: Path) -> Iterator[Sample]:
    for path in names:
        sidecar_path = path.with_suffix(".json")
        sidecar, problem = {}, None
        if sidecar_path.exists():
            try:
                sidecar = json.loads(sidecar_path.read_text())
            except json.JSONDecodeError as exc:
                problem = f"sidecar {sidecar_path.name} is not valid JSON: {exc}"
        key, ext = sanitise_key(path.stem), path.suffix[1:].lower()
        yield Sample(key, path.read_bytes(), ext, sidecar, str(path.relative_to(root)), problem)


def find_videos(input_dir: str | Path) -> list[Path]:
    """Video files directly in `input_dir`, sorted by name."""
    root = Path(input_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"--input {root} is not a directory")
    return sorted(p for p in root.iterdir() if p.is_file() and p.suffix[1:].lower() in VIDEO_EXTENSIONS)


def write_shards(
    input_dir: str | Path,
    output_dir: str | Path,
    *,
    samples_per_shard: int | None = None,
    bytes_per_shard: int | None = None,
    size: int | None = None,
    fps: float | None = None,
    gop: int | None = None,
    val_fraction: float = 0.0,
    seed: int = 0,
    progress: bool = True,
    action_rows: str = "transition",
) -> dict[str, WriteSummary]:
    """Shard the videos of `input_dir` into `output_dir` (or its train/ and val/ when `val_fraction` > 0).

    Returns the summary per split ("all", or "train" and "val"). The val split is a seeded random
    `round(val_fraction * N)` of the videos; shards keep the videos in name order. `action_rows`: see
    `write_samples`.
    """
    if action_rows not in ACTION_ROWS:
        raise ValueError(f"action_rows must be one of {ACTION_ROWS}, got {action_rows!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    videos = find_videos(input_dir)
    if not videos:
        raise FileNotFoundError(f"--input {input_dir} holds no videos (looked for extensions {VIDEO_EXTENSIONS})")
    reencode = Reencode(size=size, fps=fps, gop=gop or 8) if (size or fps or gop) else None
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
    summaries = {}
    for split, names in splits.items():
        summaries[split] = write_samples(
            _read_folder(names, Path(input_dir)),
            targets[split],
            samples_per_shard=samples_per_shard,
            bytes_per_shard=bytes_per_shard,
            reencode=reencode,
            total=len(names),
            progress=progress,
            action_rows=action_rows,
        )
    return summaries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="folder of videos (+ optional NAME.json sidecars)")
    parser.add_argument("--output", required=True, help="folder for shard-*.tar and index.json")
    limit = parser.add_mutually_exclusive_group()
    limit.add_argument("--samples-per-shard", type=int, help=f"default {DEFAULT_SAMPLES_PER_SHARD}")
    limit.add_argument("--bytes-per-shard", type=int)
    parser.add_argument("--size", type=int, help="re-encode to SIZE x SIZE pixels")
    parser.add_argument("--fps", type=float, help="re-encode at this frame rate (nearest frames kept)")
    parser.add_argument("--gop", type=int, help="re-encode with a keyframe every GOP frames (default 8)")
    parser.add_argument("--val-fraction", type=float, default=0.0, help="write OUTPUT/train and OUTPUT/val")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    parser.add_argument(
        "--action-rows",
        choices=ACTION_ROWS,
        default="transition",
        help="what the sidecars' 'action' rows are: one per transition t -> t+1, N-1 rows for N frames (default), "
        "or one per frame, N rows (the last row, taken at the last frame, is dropped)",
    )
    args = parser.parse_args(argv)
    summaries = write_shards(
        args.input,
        args.output,
        samples_per_shard=args.samples_per_shard,
        bytes_per_shard=args.bytes_per_shard,
        size=args.size,
        fps=args.fps,
        gop=args.gop,
        val_fraction=args.val_fraction,
        seed=args.seed,
        action_rows=args.action_rows,
    )
    for summary in summaries.values():
        print(summary.report())
    return 0 if any(s.written for s in summaries.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
