"""Video decoders behind one small interface: decode in-memory bytes, only the requested frames.

Two backends, chosen by name through `get_decoder`:

- `decord` (default): seeks to the requested frames (cheap with the writer's short GOP). Data it rejects falls
  back to `pyav` for that video. It decodes at the stored size and resizes with FFmpeg's swscale (through PyAV),
  because decord2 3.4.0's own resize fails for some target sizes (measured: 16, 32, 48 and 96 px).
- `pyav`: decodes forward from the start to the last requested frame; reads anything FFmpeg reads.

Both return `uint8 [T, H, W, 3]` RGB frames, resized on decode to `size x size` when `size > 0` (bicubic in both),
and raise `DecodeError` for data they cannot read (corrupt, truncated, no video stream, index out of range).
"""

from __future__ import annotations

import importlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


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

    def decode(self, data: bytes, indices: Sequence[int], size: int = 0) -> np.ndarray:
        """Frames `indices` of the video in `data` -> uint8 [len(indices), H, W, 3] (H = W = size if size > 0)."""
        ...


def _require(module: str, backend: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"decoder backend {backend!r} needs the Python module {module!r}, which is not installed ({exc}); "
            "install the project with scripts/install.sh or choose another decoder (data.decoder=pyav|decord)"
        ) from exc


def _check_indices(indices: Sequence[int], num_frames: int, backend: str) -> list[int]:
    wanted = [int(i) for i in indices]
    if not wanted:
        raise ValueError("decode() needs at least one frame index")
    bad = [i for i in wanted if not 0 <= i < num_frames]
    if bad:
        raise DecodeError(f"{backend}: frame indices {bad[:5]} out of range for a video of {num_frames} frames")
    return wanted


def resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """Resize `frames`: uint8 [T, H, W, 3] to [T, size, size, 3] with swscale's bicubic filter (no-op if size is 0
    or the frames already have that size)."""
    if size <= 0 or frames.shape[1:3] == (size, size):
        return frames
    av = _require("av", "resize")
    return np.stack(
        [
            av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            .reformat(width=size, height=size, interpolation="BICUBIC")
            .to_ndarray()
            for f in frames
        ]
    )


class PyAVDecoder:
    """Decode with PyAV (FFmpeg's libraries), forward from the first frame."""

    name = "pyav"

    def __init__(self) -> None:
        self._av = _require("av", self.name)

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

    def decode(self, data: bytes, indices: Sequence[int], size: int = 0) -> np.ndarray:
        container = self._open(data)
        with container:
            stream = container.streams.video[0]
            declared = stream.frames or np.iinfo(np.int64).max
            wanted = _check_indices(indices, declared, self.name)
            last = max(wanted)
            picked: dict[int, np.ndarray] = {}
            resize = {"width": size, "height": size, "interpolation": "BICUBIC"} if size > 0 else {}
            for i, frame in enumerate(self._frames(container)):
                if i in wanted:
                    picked[i] = frame.to_ndarray(format="rgb24", **resize)
                if i >= last:
                    break
        missing = sorted(set(wanted) - picked.keys())
        if missing:
            raise DecodeError(f"pyav: the video ended before frames {missing[:5]} (truncated?)")
        return np.stack([picked[i] for i in wanted])


class DecordDecoder:
    """Decode with decord (seeks to the wanted frames); falls back to PyAV for data decord rejects."""

    name = "decord"

    def __init__(self) -> None:
        self._decord = _require("decord", self.name)
        self._fallback = PyAVDecoder()

    def _reader(self, data: bytes):
        return self._decord.VideoReader(io.BytesIO(data), ctx=self._decord.cpu(0), num_threads=1)

    def info(self, data: bytes) -> VideoInfo:
        try:
            reader = self._reader(data)
            height, width = reader[0].shape[:2]
            return VideoInfo(len(reader), height, width, float(reader.get_avg_fps()))
        except (self._decord.DECORDError, RuntimeError, IndexError):
            return self._fallback.info(data)

    def decode(self, data: bytes, indices: Sequence[int], size: int = 0) -> np.ndarray:
        try:
            reader = self._reader(data)
        except (self._decord.DECORDError, RuntimeError):
            return self._fallback.decode(data, indices, size)
        wanted = _check_indices(indices, len(reader), self.name)
        try:
            frames = reader.get_batch(wanted).asnumpy()
        except (self._decord.DECORDError, RuntimeError) as exc:
            raise DecodeError(f"decord: decoding frames {wanted[:5]}... failed: {exc}") from exc
        return resize_frames(frames, size)


DECODERS: dict[str, type] = {"decord": DecordDecoder, "pyav": PyAVDecoder}


def get_decoder(name: str) -> Decoder:
    """The decoder registered under `name` ("decord" or "pyav"); fails fast if its package is missing."""
    if name not in DECODERS:
        raise ValueError(f"unknown decoder {name!r}; valid decoders: {sorted(DECODERS)}")
    return DECODERS[name]()
