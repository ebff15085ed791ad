"""Video decoders behind one small interface: decode in-memory bytes, only the requested frames.

Two backends, chosen by name through `get_decoder`:

- `decord` (default): seeks to the requested frames (cheap with the writer's short GOP). Data it rejects falls
  back to `pyav` for that video. It decodes at the stored size and resizes with FFmpeg's swscale (through PyAV),
  because decord2 3.4.0's own resize fails for some target sizes (measured: 16, 32, 48 and 96 px). For the same
  reason it cannot return the frames of a video *stored* at some widths (measured from 16 to 258 px: 16, 24, 32, 48,
  96 and 144; e.g. written with `python -m data_pipeline.writer --size 32`): such a video is decoded with `pyav`.
- `pyav`: decodes forward from the start to the last requested frame; reads anything FFmpeg reads.

Both return `uint8 [T, H, W, 3]` RGB frames, resized on decode to `size x size` when `size > 0` (bicubic in both),
and raise `DecodeError` for data they cannot read (corrupt, truncated, no video stream, index out of range). How a
frame that is not square becomes `size x size` is the `aspect` mode (`ASPECT_MODES`; `aspect_geometry` has the
sizes):

- `crop`: the short side to `size`, the aspect kept, then the centre `size x size` (what the loader does by default);
- `pad`: the long side to `size`, the aspect kept, then black bars around it to `size x size`;
- `squash`: both sides to `size`, the aspect lost (a 16:9 frame is squeezed 1.8x; the decoders' default, and the
  only mode before aspect modes existed);
- `short`: the short side to `size`, the aspect kept, nothing cut: `[T, size, W', 3]` or `[T, H', size, 3]` (for a
  caller that crops itself, e.g. a random crop per clip).

A square frame gives the same pixels in `crop`, `pad` and `squash` (one swscale call to `size x size`).

The native libraries are quiet: on corrupt data FFmpeg and decord print hundreds of lines per shard to stderr, some of
them raw video bytes, and the stream counts every skipped sample by reason anyway (`batch["skipped"]`, logged by the
trainer as `skipped/<reason>`). So each process that makes a decoder (DataLoader workers included) sets PyAV's
FFmpeg log level to none and decord's to quiet, and decord's own report of data it cannot open (written by its C++
code straight to file descriptor 2, whatever the log level) is held back while decord opens a video: text from
anything else in that moment is passed on. Set `WORLDMODEL_DECODE_DEBUG=1` (inherited by the workers) for full
detail: FFmpeg's warnings and errors (decord's to stderr, PyAV's through Python logging, logger `libav`), decord's
own reports, and one `logging` warning per skipped sample with its reason and the error text.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

DEBUG_ENV = "WORLDMODEL_DECODE_DEBUG"

log = logging.getLogger(__name__)


class DecodeError(RuntimeError):
    """The bytes could not be decoded as a video (corrupt, truncated, or a frame index out of range)."""


@dataclass(frozen=True)
class VideoInfo:
    """What a decoder reports about a stored video."""

    num_frames: int
    height: int
    width: int
    fps: float


class Decoder(Protocol):
    name: str

    def info(self, data: bytes) -> VideoInfo:
        """Frame count, size and frame rate of the video in `data`."""
        ...

    def decode(self, data: bytes, indices: Sequence[int], size: int = 0, aspect: str = "squash") -> np.ndarray:
        """Frames `indices` of the video in `data` -> uint8 [len(indices), H, W, 3] (H = W = size if size > 0,
        made square by the `aspect` mode; with `aspect="short"` only the short side is `size`)."""
        ...


def _require(module: str, backend: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"decoder backend {backend!r} needs the Python module {module!r}, which is not installed ({exc}); "
            "install the project with scripts/install.sh or choose another decoder (data.decoder=pyav|decord)"
        ) from exc


def decode_debug() -> bool:
    """True when `WORLDMODEL_DECODE_DEBUG` asks for full decoder detail (set and not one of "", 0, false, no, off)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


_native_logging_set: set[tuple[str, bool]] = set()  # (library, debug) already applied in this process


def _set_native_logging(library: str, module) -> None:
    """Quiet the native logging of `library` ("av" or "decord", imported as `module`), or turn it up to FFmpeg's
    warnings and errors when `decode_debug()`; applied once per process and mode (a spawned DataLoader worker
    imports this module afresh, a forked one inherits the setting)."""
    debug = decode_debug()
    if (library, debug) in _native_logging_set:
        return
    if library == "av":  # None: PyAV drops FFmpeg's messages; a level: PyAV passes them to Python logging
        module.logging.set_level(module.logging.WARNING if debug else None)
    else:  # decord prints FFmpeg's messages of its own FFmpeg copy to stderr, from this level up
        module.logging.set_level(module.logging.WARNING if debug else module.logging.QUIET)
    _native_logging_set.add((library, debug))


class _Fd2Capture:
    """Holds back what native code writes to file descriptor 2 during a `with capture.held(buffer):` block.

    The bytes land in a private temporary file (not a pipe, which a long report would fill and block on) and are
    appended to `buffer` when the block ends; the caller writes back, with `passed_on`, whatever it does not
    recognise. One capture at a time per process, under a lock that is also taken around os.fork (multiprocessing,
    DataLoader workers) and by `stderr_not_held` (for subprocesses: their fork does not run Python's fork hooks), so
    that no child process starts with its stderr redirected.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._file: tuple[int, io.FileIO] | None = None  # (pid, file): a forked child makes its own
        os.register_at_fork(
            before=self._lock.acquire, after_in_parent=self._lock.release, after_in_child=self._lock.release
        )

    @contextlib.contextmanager
    def held(self, buffer: bytearray) -> Iterator[None]:
        with self._lock:
            if self._file is None or self._file[0] != os.getpid():
                file = tempfile.TemporaryFile(buffering=0)  # noqa: SIM115 (kept open for the process's life)
                self._file = (os.getpid(), file)
            file = self._file[1]
            file.seek(0)  # not truncated (a syscall per decoded video): only what this block writes is read back
            if sys.stderr is not None:
                sys.stderr.flush()  # Python's own pending text goes out first, to the real stderr
            try:
                saved = os.dup(2)
            except OSError:  # no fd 2 in this process: nothing to hold back
                yield
                return
            os.dup2(file.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
                os.close(saved)
                written = file.tell()  # fd 2 was a duplicate of the file's descriptor: they share one offset
                if written:
                    file.seek(0)
                    buffer += file.read(written)

    @staticmethod
    def passed_on(text: bytes) -> None:
        """Write `text` to file descriptor 2 (the real stderr once the capture has ended)."""
        with contextlib.suppress(OSError):
            while text:
                text = text[os.write(2, text) :]


_fd2 = _Fd2Capture()


def stderr_not_held() -> threading.Lock:
    """A context manager: in its block no decoder holds file descriptor 2 back. Start subprocesses (the command of a
    `pipe:` shard, curl for an http one) in one when decoding may run in another thread, so that they inherit the
    real stderr, not a decoder's capture file."""
    return _fd2._lock


def _without_open_report(held: bytes, data: bytes) -> bytes:
    """`held` without decord's report of failing to open in-memory `data`: one line
    `[hh:mm:ss] .../video_reader.cc:NN: ERROR opening: <data up to its first NUL byte>, <FFmpeg error>`."""
    marker = b"ERROR opening: " + data.split(b"\0", 1)[0] + b", "
    at = held.find(marker)
    if at < 0:
        return held
    start = held.rfind(b"\n", 0, at) + 1
    end = held.find(b"\n", at + len(marker))
    return held[:start] + (b"" if end < 0 else held[end + 1 :])


def _check_indices(indices: Sequence[int], num_frames: int, backend: str) -> list[int]:
    wanted = [int(i) for i in indices]
    if not wanted:
        raise ValueError("decode() needs at least one frame index")
    bad = [i for i in wanted if not 0 <= i < num_frames]
    if bad:
        raise DecodeError(f"{backend}: frame indices {bad[:5]} out of range for a video of {num_frames} frames")
    return wanted


ASPECT_MODES = ("crop", "pad", "squash")  # how a frame that is not square becomes size x size
_ALL_ASPECTS = (*ASPECT_MODES, "short")  # "short": short side to size, nothing cut (the caller crops)


def check_aspect(aspect: str, allowed: Sequence[str] = _ALL_ASPECTS) -> str:
    """`aspect` if it is one of `allowed`, else a ValueError naming them."""
    if aspect not in allowed:
        raise ValueError(f"aspect mode {aspect!r} is not one of {', '.join(allowed)}")
    return aspect


def aspect_geometry(height: int, width: int, size: int, aspect: str, *, even: bool = False) -> tuple[int, int]:
    """(h, w) a `height x width` frame is resized to before `fit_to_square` makes it `size x size` (`aspect` in
    crop, pad, squash, short; see the module docstring). With `even`, `short` rounds its long side to an even number
    (H.264's yuv420p needs even sizes; the other modes end at size x size, and round to the nearest pixel)."""
    check_aspect(aspect)
    if aspect == "squash" or height == width:
        return size, size
    long_side = size * max(height, width) / min(height, width)  # the long side when the short one is `size`
    if aspect in ("crop", "short"):
        other = 2 * int(long_side / 2 + 0.5) if even and aspect == "short" else int(long_side + 0.5)
        other = max(size, other)
        return (size, other) if width > height else (other, size)
    short_side = max(1, int(size * min(height, width) / max(height, width) + 0.5))  # pad: the long side is `size`
    return (short_side, size) if width > height else (size, short_side)


def fit_to_square(frames: np.ndarray, size: int, aspect: str, offset: int | None = None) -> np.ndarray:
    """Frames resized to `aspect_geometry`: uint8 [..., h, w, C] -> [..., size, size, C] (for `short`: unchanged).

    `crop` takes the centre, or the window starting at `offset` along the long side when given (a random crop);
    `pad` centres the frames on black.
    """
    h, w = frames.shape[-3:-1]
    if aspect in ("squash", "short") or (h, w) == (size, size):
        return frames
    if aspect == "crop":
        long_side = max(h, w)
        start = (long_side - size) // 2 if offset is None else int(offset)
        if not 0 <= start <= long_side - size:
            raise ValueError(f"crop offset {start} is outside 0..{long_side - size} for a side of {long_side}")
        return frames[..., start : start + size, :, :] if h > w else frames[..., :, start : start + size, :]
    out = np.zeros((*frames.shape[:-3], size, size, frames.shape[-1]), dtype=frames.dtype)  # pad
    top, left = (size - h) // 2, (size - w) // 2
    out[..., top : top + h, left : left + w, :] = frames
    return out


def frame_to_rgb(frame, size: int = 0, aspect: str = "squash", *, even: bool = False) -> np.ndarray:
    """One PyAV VideoFrame -> uint8 [H, W, 3] RGB, converted and resized in one swscale call (bicubic) to
    `aspect_geometry` (`even`: see there) and then made square by `fit_to_square` (no resize when `size` is 0)."""
    if size <= 0:
        return frame.to_ndarray(format="rgb24")
    h, w = aspect_geometry(frame.height, frame.width, size, aspect, even=even)
    return fit_to_square(frame.to_ndarray(format="rgb24", width=w, height=h, interpolation="BICUBIC"), size, aspect)


def resize_frames(frames: np.ndarray, size: int, aspect: str = "squash") -> np.ndarray:
    """Resize `frames`: uint8 [T, H, W, 3] to [T, size, size, 3] with swscale's bicubic filter, made square by the
    `aspect` mode (no-op if size is 0 or the frames already have that size; `short`: [T, size, W', 3] or
    [T, H', size, 3])."""
    if size <= 0:
        return frames
    h, w = aspect_geometry(frames.shape[1], frames.shape[2], size, aspect)
    if frames.shape[1:3] == (h, w):
        return fit_to_square(frames, size, aspect)
    av = _require("av", "resize")
    resized = np.stack(
        [
            av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            .reformat(width=w, height=h, interpolation="BICUBIC")
            .to_ndarray()
            for f in frames
        ]
    )
    return fit_to_square(resized, size, aspect)


class PyAVDecoder:
    """Decode with PyAV (FFmpeg's libraries), forward from the first frame."""

    name = "pyav"

    def __init__(self) -> None:
        self._av = _require("av", self.name)
        _set_native_logging("av", self._av)

    def _open(self, data: bytes):
        try:
            container = self._av.open(io.BytesIO(data), mode="r")
        except (self._av.FFmpegError, ValueError, EOFError) as exc:
            raise DecodeError(f"pyav cannot open the video ({len(data)} bytes): {exc}") from exc
        if not container.streams.video:
            container.close()
            raise DecodeError(f"pyav: no video stream in the data ({len(data)} bytes)")
        return container

    def _frames(self, container):
        """Yield decoded VideoFrames in order, turning FFmpeg errors into DecodeError."""
        try:
            yield from container.decode(video=0)
        except (self._av.FFmpegError, ValueError, EOFError) as exc:
            raise DecodeError(f"pyav: decoding failed: {exc}") from exc

    def info(self, data: bytes) -> VideoInfo:
        container = self._open(data)
        with container:
            stream = container.streams.video[0]
            num_frames = sum(1 for _ in self._frames(container))
            if num_frames == 0:
                raise DecodeError(f"pyav: the video has no decodable frames ({len(data)} bytes)")
            rate = stream.average_rate or stream.guessed_rate or 0
            return VideoInfo(num_frames, stream.codec_context.height, stream.codec_context.width, float(rate))

    def decode(self, data: bytes, indices: Sequence[int], size: int = 0, aspect: str = "squash") -> np.ndarray:
        check_aspect(aspect)
        container = self._open(data)
        with container:
            stream = container.streams.video[0]
            declared = stream.frames or np.iinfo(np.int64).max
            wanted = _check_indices(indices, declared, self.name)
            last = max(wanted)
            picked: dict[int, np.ndarray] = {}
            for i, frame in enumerate(self._frames(container)):
                if i in wanted:
                    picked[i] = frame_to_rgb(frame, size, aspect)
                if i >= last:
                    break
        missing = sorted(set(wanted) - picked.keys())
        if missing:
            raise DecodeError(f"pyav: the video ended before frames {missing[:5]} (truncated?)")
        return np.stack([picked[i] for i in wanted])


_UNSUPPORTED_WIDTH = "DECORDArrayCopyFromTo"  # decord's failed size check when it copies out frames of some widths


class DecordDecoder:
    """Decode with decord (seeks to the wanted frames); falls back to PyAV for data decord rejects."""

    name = "decord"

    def __init__(self) -> None:
        self._decord = _require("decord", self.name)
        _set_native_logging("decord", self._decord)
        self._debug = decode_debug()
        self._fallback = PyAVDecoder()
        self.fallbacks = 0  # videos handed to PyAV so far (the stream reports them as fallback/pyav)

    def _reader(self, data: bytes):
        """A decord VideoReader of `data`. Unless in debug mode, decord's report of data it cannot open (printed to
        fd 2 whatever the log level, with the data's bytes as the file name) is dropped: PyAV reads such data next."""
        if self._debug:
            return self._decord.VideoReader(io.BytesIO(data), ctx=self._decord.cpu(0), num_threads=1)
        held = bytearray()
        try:
            with _fd2.held(held):
                return self._decord.VideoReader(io.BytesIO(data), ctx=self._decord.cpu(0), num_threads=1)
        finally:
            if held:
                _fd2.passed_on(_without_open_report(bytes(held), data))

    def _fall_back(self, exc: Exception) -> PyAVDecoder:
        self.fallbacks += 1
        if self._debug:
            log.debug("decord cannot read the video (%s); trying pyav", exc)
        return self._fallback

    def info(self, data: bytes) -> VideoInfo:
        try:
            reader = self._reader(data)
            height, width = reader[0].shape[:2]
            return VideoInfo(len(reader), height, width, float(reader.get_avg_fps()))
        except (self._decord.DECORDError, RuntimeError, IndexError) as exc:
            return self._fall_back(exc).info(data)

    def decode(self, data: bytes, indices: Sequence[int], size: int = 0, aspect: str = "squash") -> np.ndarray:
        check_aspect(aspect)
        try:
            reader = self._reader(data)
        except (self._decord.DECORDError, RuntimeError) as exc:
            return self._fall_back(exc).decode(data, indices, size, aspect)
        wanted = _check_indices(indices, len(reader), self.name)
        try:
            frames = reader.get_batch(wanted).asnumpy()
        except (self._decord.DECORDError, RuntimeError) as exc:
            if _UNSUPPORTED_WIDTH in str(exc):  # a frame width decord copies wrongly (see the module docstring)
                return self._fall_back(exc).decode(data, indices, size, aspect)
            raise DecodeError(f"decord: decoding frames {wanted[:5]}... failed: {exc}") from exc
        return resize_frames(frames, size, aspect)


DECODERS: dict[str, type] = {"decord": DecordDecoder, "pyav": PyAVDecoder}


def get_decoder(name: str) -> Decoder:
    """The decoder registered under `name` ("decord" or "pyav"); fails fast if its package is missing."""
    if name not in DECODERS:
        raise ValueError(f"unknown decoder {name!r}; valid decoders: {sorted(DECODERS)}")
    return DECODERS[name]()
