"""Re-encoding to the writer's H.264: frames to an in-memory MP4 (`encode_h264`), and one input decoded frame by
frame, resized (--size, --aspect), resampled (--fps), cut into segments (--max-frames, --max-seconds) and encoded
(`reencoded`).

The writer's format: yuv420p, a fixed GOP (`gop` frames between keyframes, no scene-cut keyframes) and no
B-frames, so a reader seeks to any frame by decoding at most `gop` frames. One encoder thread; even so, libx264
through PyAV was seen to give different bytes (same frames, within codec noise) for some calls here.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from fractions import Fraction

import av
import numpy as np

from data_pipeline.clips import cut_metadata
from data_pipeline.decoders import DecodeError, frame_to_rgb
from data_pipeline.format import segment_key
from data_pipeline.writer.sample import Options, Sample, checked_sidecar, sidecar_problem


def encode_h264(frames: np.ndarray, fps: float, *, gop: int = 8, crf: int = 10) -> bytes:
    """Encode `frames`: uint8 [T, H, W, 3] (RGB, H and W even) at `fps` into MP4 bytes.

    `crf` is libx264's constant rate factor (0 = lossless in luma, 10 = visually lossless, 23 = libx264 default).
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    num_frames, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"H.264 (yuv420p) needs an even frame size, got {width}x{height}; re-encode with --size")
    if gop < 1:
        raise ValueError(f"gop must be >= 1, got {gop}")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.options = {
            "crf": str(crf),
            "preset": "fast",
            "threads": "1",
            "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes=0",
        }
        for t in range(num_frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frames[t], format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def _resampled_indices(num_frames: int, src_fps: float, fps: float | None) -> np.ndarray:
    """Source frame for each output frame when changing the frame rate (nearest frame in time): int64 [T_out]."""
    if fps is None or fps == src_fps:
        return np.arange(num_frames)
    if src_fps <= 0:
        raise DecodeError("the video reports no frame rate, so it cannot be resampled to --fps")
    duration = (num_frames - 1) / src_fps
    out = np.arange(int(np.floor(duration * fps + 1e-9)) + 1)
    return np.minimum(np.round(out * src_fps / fps).astype(np.int64), num_frames - 1)


def _open_video(video: bytes | str):
    """A PyAV container of in-memory `video` bytes or of a local file path; DecodeError if it has no video stream."""
    what = f"{len(video)} bytes" if isinstance(video, bytes) else video
    try:
        container = av.open(io.BytesIO(video) if isinstance(video, bytes) else video, mode="r")
    except (av.FFmpegError, ValueError, EOFError, OSError) as exc:
        raise DecodeError(f"pyav cannot open the video ({what}): {exc}") from exc
    if not container.streams.video:
        container.close()
        raise DecodeError(f"pyav: no video stream in the data ({what})")
    container.streams.video[0].codec_context.thread_count = 1  # the workers are the parallelism (prepare.py)
    return container


def _decoded(container) -> Iterator:
    """The container's decoded video frames in order, FFmpeg errors as DecodeError."""
    try:
        yield from container.decode(video=0)
    except (av.FFmpegError, ValueError, EOFError) as exc:
        raise DecodeError(f"pyav: decoding failed: {exc}") from exc


def _segment_length(options: Options, fps: float) -> int | None:
    """Output frames per segment (None: the video is one sample)."""
    if not options.segmented:
        return None
    lengths = [options.max_frames] if options.max_frames is not None else []
    if options.max_seconds is not None:
        lengths.append(math.floor(options.max_seconds * fps + 1e-9))
    length = min(lengths)
    if length < 2:
        raise DecodeError(f"--max-seconds {options.max_seconds} at {fps:g} fps is {length} frame(s); a segment needs 2")
    return length


def reencoded(sample: Sample, video: bytes | str, options: Options) -> list[tuple[str, bytes, dict]]:
    """Decode `video` (bytes, or a local path read as a stream) once, frame by frame, resize (and resample to
    `reencode.fps`), and re-encode it to H.264: [(key, mp4 bytes, KEY.json dict)], one entry, or one per segment
    with --max-frames/--max-seconds (only one segment's frames, uint8 [F, S, S, 3], are held at a time).

    The output frames are those of `_resampled_indices` (nearest source frame in time). The sidecar is checked once
    the frame count is known; raises DecodeError or MetadataError with the reason.
    """
    reencode = options.reencode
    assert reencode is not None
    sidecar_problem(sample, options.labels)  # a bad sidecar is skipped before the video is decoded
    size = reencode.size or 0
    with _open_video(video) as container:
        stream = container.streams.video[0]
        src_fps = float(stream.average_rate or stream.guessed_rate or 0)
        resample = reencode.fps is not None and reencode.fps != src_fps
        if resample and src_fps <= 0:
            raise DecodeError("the video reports no frame rate, so it cannot be resampled to --fps")
        fps = float(reencode.fps or src_fps)
        if fps <= 0:
            raise DecodeError("the video reports no frame rate; pass --fps")
        seg = _segment_length(options, fps)
        # frames held back before a full segment is encoded: the last output frames of a resampled video may be
        # dropped once the frame count is known (see below), so a segment is encoded only when frames follow it
        reserve = 1 + (math.ceil(0.5 * fps / src_fps) + 1 if resample else 0)
        pending: list[np.ndarray] = []
        pending_src: list[int] = []
        encoded: list[tuple[bytes, list[int], tuple[int, int]]] = []
        num_frames, out = 0, 0

        def encode(count: int) -> None:
            frames = np.stack(pending[:count])
            try:
                data = encode_h264(frames, fps, gop=reencode.gop, crf=reencode.crf)
            except ValueError as exc:
                raise DecodeError(f"re-encoding failed: {exc}") from exc
            encoded.append((data, pending_src[:count], frames.shape[1:3]))
            del pending[:count], pending_src[:count]

        for i, frame in enumerate(_decoded(container)):
            num_frames = i + 1
            copies = 1
            if resample:  # output frames whose nearest source frame is i (as _resampled_indices computes it)
                copies = 0
                while int(np.round(out * src_fps / fps)) == i:
                    copies, out = copies + 1, out + 1
            if copies:
                rgb = frame_to_rgb(frame, size, reencode.aspect, even=True)
                pending += [rgb] * copies
                pending_src += [i] * copies
            if seg is not None and len(pending) >= seg + reserve:
                encode(seg)
    if num_frames == 0:
        raise DecodeError("pyav: the video has no decodable frames")
    if resample:  # _resampled_indices' count: frames past the last source frame's time are dropped
        total = int(np.floor((num_frames - 1) / src_fps * fps + 1e-9)) + 1
        excess = sum(len(src) for _, src, _ in encoded) + len(pending) - total
        del pending[len(pending) - excess :], pending_src[len(pending_src) - excess :]
    meta = dict(checked_sidecar(sample, num_frames, options.action_rows, options.labels))
    while pending:
        count = len(pending) if seg is None else min(seg, len(pending))
        if seg is not None and count < 2:  # a 1-frame tail has no transition: dropped
            break
        encode(count)
    if not encoded:
        raise DecodeError(f"the video has {num_frames} frame(s): too short for a segment of at least 2 frames")
    full = {**meta, "num_frames": num_frames}
    results, offset = [], 0
    for index, (data, src, (height, width)) in enumerate(encoded):
        sample_meta = dict(meta)
        sample_meta.update({k: v.tolist() for k, v in cut_metadata(full, np.asarray(src, dtype=np.int64)).items()})
        sample_meta.update(fps=fps, num_frames=len(src), height=int(height), width=int(width))
        key = sample.key
        if seg is not None:
            key = segment_key(sample.key, index)
            sample_meta["segment"] = {
                "of": sample.key,
                "index": index,
                "count": len(encoded),
                "frame_offset": offset,
                "source_frame": int(src[0]),
                "time_offset": offset / fps,
            }
        results.append((key, data, sample_meta))
        offset += len(src)
    return results
