"""Encode frames to an in-memory H.264 MP4 with PyAV (libx264).

The writer's format: yuv420p, a fixed GOP (`gop` frames between keyframes, no scene-cut keyframes) and no
B-frames, so a reader seeks to any frame by decoding at most `gop` frames. One encoder thread; even so, libx264
through PyAV was seen to give different bytes (same frames, within codec noise) for about 1 call in 10 here.
"""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np


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
