"""Stochastic Moving digits: the default dataset, generated to shards deterministically from a seed.

Real handwritten digits (scikit-learn's bundled 8x8 digits upscaled to 20x20, or MNIST IDX files) move on a 64x64
canvas, bounce off the walls, and get random velocity kicks, so the future is one-to-many.

Dynamics, for every digit i and transition t -> t+1:

    v' = v_t + kick_t                      (kick_t = 0 unless the transition is kicked)
    p_{t+1} = p_t + v'                     (reflected at the walls; the reflected axis of v' flips sign)
    v_{t+1} = v'                           (the velocity that moved the digit into p_{t+1})

JSON ground truth per video: `state` row t = [x0, y0, vx0, vy0, x1, ...] (digit centre in pixels, x = column,
y = row; velocity in px/frame), `action` row t = the kick applied at transition t -> t+1 ([dvx0, dvy0, ...], zeros
without a kick), `events` [t] = 1 if any digit was kicked in transition t -> t+1, `labels` = {"digit0": 7, ...}.

`--still` writes the diagnostic variant: digits rest and a kick is a one-frame jump (see `simulate`), so the kicks
are all that cannot be predicted.

Each glyph is drawn at its exact, fractional position (a bilinear shift of the glyph by the fractional part of its
top-left corner), so the pixels agree with the float ground truth: the glyph's intensity-weighted centroid sits at a
fixed offset from the stated centre in every frame. `--whole-pixel` writes the old data, for comparison: each glyph
snapped to the nearest whole pixel, so pixels and ground truth disagree by up to 0.5 px per axis.
"""

from __future__ import annotations

import gzip
import struct
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from einops import repeat
from scipy import ndimage

from data_pipeline.writer import WriteSummary
from worlds.simulated import FPS, report, world_parser, write_world

CANVAS = 64
DIGIT_SIZE = 20
VERSION = 1  # of the world's rules (worlds/simulated.py world.json)
MIN_SPEED, MAX_SPEED = 1.5, 3.5  # px/frame
MIN_TURN = np.pi / 3  # a kick turns the velocity by at least 60 degrees
MIN_JUMP, MAX_JUMP = 3.0, 6.0  # px: a kick's displacement in `still` videos


@dataclass(frozen=True)
class DigitBank:
    """Digit images to draw from: `images` float32 [N, DIGIT_SIZE, DIGIT_SIZE] in [0, 1], `labels` int64 [N]."""

    images: np.ndarray
    labels: np.ndarray


def _to_bank(images: np.ndarray, labels: np.ndarray) -> DigitBank:
    """Rescale `images` [N, h, w] to DIGIT_SIZE x DIGIT_SIZE with a smooth (cubic) zoom, normalised to [0, 1]."""
    zoom = (1.0, DIGIT_SIZE / images.shape[1], DIGIT_SIZE / images.shape[2])
    scaled = ndimage.zoom(images.astype(np.float32), zoom, order=3)
    scaled = np.clip(scaled / scaled.max(axis=(1, 2), keepdims=True), 0.0, 1.0)
    return DigitBank(images=scaled.astype(np.float32), labels=labels.astype(np.int64))


@lru_cache(maxsize=1)
def sklearn_digits() -> DigitBank:
    """The 1,797 8x8 handwritten digits shipped inside scikit-learn, upscaled to DIGIT_SIZE (no download)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return _to_bank(digits.images, digits.target)


def _read_idx(path: Path) -> np.ndarray:
    """Read one MNIST IDX file (optionally gzipped) into a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not a uint8 MNIST IDX file (header {data[:4]!r}); pass the raw IDX files")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def mnist_digits(root: str | Path) -> DigitBank:
    """MNIST training digits from IDX files in `root` (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz])."""
    root = Path(root)
    found = {}
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        candidates = [root / stem, root / f"{stem}.gz", root / stem.replace("-idx", ".idx")]
        existing = [c for c in candidates if c.exists()]
        if not existing:
            raise FileNotFoundError(f"--mnist {root}: none of {[c.name for c in candidates]} found there")
        found[stem] = existing[0]
    images = _read_idx(found["train-images-idx3-ubyte"])
    labels = _read_idx(found["train-labels-idx1-ubyte"])
    return _to_bank(images.astype(np.float32) / 255.0, labels)


def _random_velocity(
    rng: np.random.Generator, direction: float, low: float = MIN_SPEED, high: float = MAX_SPEED
) -> np.ndarray:
    """A vector [2] in `direction` (radians) with a length drawn uniformly from [low, high]."""
    speed = rng.uniform(low, high)
    return np.array([speed * np.cos(direction), speed * np.sin(direction)])


def _kicked_velocity(rng: np.random.Generator, v: np.ndarray) -> np.ndarray:
    """A new velocity whose direction differs from `v`'s by at least MIN_TURN and whose speed is redrawn."""
    turn = rng.uniform(MIN_TURN, 2 * np.pi - MIN_TURN)
    return _random_velocity(rng, float(np.arctan2(v[1], v[0]) + turn))


def _reflect(p: np.ndarray, v: np.ndarray, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    """Bounce position `p` [2] (already moved by `v` [2]) back into [lo, hi]; flip `v` on the axes that hit a wall."""
    p, v = p.copy(), v.copy()
    for axis in range(2):
        if p[axis] < lo:
            p[axis], v[axis] = 2 * lo - p[axis], -v[axis]
        elif p[axis] > hi:
            p[axis], v[axis] = 2 * hi - p[axis], -v[axis]
    return p, v


def _place(canvas: np.ndarray, glyph: np.ndarray, x: float, y: float, subpixel: bool) -> None:
    """Composite `glyph` [DIGIT_SIZE, DIGIT_SIZE] centred at (x, y) into `canvas` [H, W] in place (np.maximum).

    `subpixel` shifts the glyph by the fractional part of its top-left corner with a 4-tap bilinear splat onto a
    (DIGIT_SIZE + 1)^2 patch: mass is kept and the intensity-weighted centroid moves by exactly the fraction.
    Otherwise the corner is rounded to the nearest whole pixel (the old placement)."""
    top_f, left_f = y - DIGIT_SIZE / 2, x - DIGIT_SIZE / 2
    if not subpixel:
        top, left = int(round(top_f)), int(round(left_f))
        region = canvas[top : top + DIGIT_SIZE, left : left + DIGIT_SIZE]
        np.maximum(region, glyph, out=region)
        return
    top, left = int(np.floor(top_f)), int(np.floor(left_f))
    fy, fx = float(top_f - top), float(left_f - left)
    patch = np.zeros((DIGIT_SIZE + 1, DIGIT_SIZE + 1), dtype=np.float32)
    patch[:-1, :-1] += (1 - fy) * (1 - fx) * glyph
    patch[:-1, 1:] += (1 - fy) * fx * glyph
    patch[1:, :-1] += fy * (1 - fx) * glyph
    patch[1:, 1:] += fy * fx * glyph
    # at the far wall (corner exactly CANVAS - DIGIT_SIZE) the fraction is 0 and the patch's last row/column is empty
    region = canvas[top : top + DIGIT_SIZE + 1, left : left + DIGIT_SIZE + 1]
    np.maximum(region, patch[: region.shape[0], : region.shape[1]], out=region)


def _render(positions: np.ndarray, glyphs: list[np.ndarray], subpixel: bool = True) -> np.ndarray:
    """Draw the glyphs centred at `positions` [D, 2] (x, y) on a black canvas -> uint8 [CANVAS, CANVAS, 3];
    `subpixel=False` snaps each glyph to the nearest whole pixel (see `_place`)."""
    canvas = np.zeros((CANVAS, CANVAS), dtype=np.float32)
    for (x, y), glyph in zip(positions, glyphs, strict=True):
        _place(canvas, glyph, x, y, subpixel)
    return repeat(np.round(canvas * 255).astype(np.uint8), "h w -> h w c", c=3)


def simulate(
    num_frames: int,
    rng: np.random.Generator,
    num_digits: int = 1,
    kick_prob: float = 0.2,
    digits: DigitBank | None = None,
    still: bool = False,
    subpixel: bool = True,
) -> tuple[np.ndarray, dict]:
    """Simulate one moving-digits video.

    Returns `frames`: uint8 [num_frames, 64, 64, 3] and its JSON metadata (fps, num_frames, height, width,
    state [num_frames][4 * num_digits], state_names, action [num_frames - 1][2 * num_digits], action_names,
    events [num_frames - 1], labels). Deterministic given the state of `rng`.

    `still=True` is the diagnostic variant: digits rest, and a kick is a one-frame jump of MIN_JUMP..MAX_JUMP px
    in a random direction (the action row holds the displacement; the state's velocity is the last displacement).
    Every unkicked transition is then exactly predictable (copy the last frame), so all that cannot be predicted is
    the kicks: the setting AdaSSL's latent is built for, without the deterministic motion a small predictor must
    learn first.

    `subpixel=False` draws each glyph at the nearest whole pixel instead of its exact position (the old data, for
    comparison); the metadata and the random draws are the same either way.
    """
    if num_frames < 2:
        raise ValueError(f"num_frames must be >= 2 to have a transition, got {num_frames}")
    if num_digits not in (1, 2):
        raise ValueError(f"num_digits must be 1 or 2, got {num_digits}")
    if not 0.0 <= kick_prob <= 1.0:
        raise ValueError(f"kick_prob must be in [0, 1], got {kick_prob}")
    bank = digits if digits is not None else sklearn_digits()
    picks = rng.integers(0, len(bank.labels), size=num_digits)
    glyphs = [bank.images[i] for i in picks]
    lo, hi = DIGIT_SIZE / 2, CANVAS - DIGIT_SIZE / 2

    p = rng.uniform(lo, hi, size=(num_digits, 2))
    if still:
        v = np.zeros((num_digits, 2))
    else:
        v = np.stack([_random_velocity(rng, rng.uniform(0, 2 * np.pi)) for _ in range(num_digits)])
    states, actions, events = [np.concatenate([p, v], axis=1).reshape(-1)], [], []
    frames = [_render(p, glyphs, subpixel)]
    for _ in range(num_frames - 1):
        kicked = rng.random(num_digits) < kick_prob
        kick = np.zeros((num_digits, 2))
        for i in np.flatnonzero(kicked):
            if still:
                kick[i] = _random_velocity(rng, rng.uniform(0, 2 * np.pi), MIN_JUMP, MAX_JUMP)
            else:
                kick[i] = _kicked_velocity(rng, v[i]) - v[i]
        if still:  # a jump lasts one frame; the state's velocity is the displacement just made
            moved = [_reflect(p[i] + kick[i], kick[i], lo, hi) for i in range(num_digits)]
            moved = [(q, q - p[i]) for i, (q, _) in enumerate(moved)]
        else:
            moved = [_reflect(p[i] + v[i] + kick[i], v[i] + kick[i], lo, hi) for i in range(num_digits)]
        p = np.stack([m[0] for m in moved])
        v = np.stack([m[1] for m in moved])
        states.append(np.concatenate([p, v], axis=1).reshape(-1))
        actions.append(kick.reshape(-1))
        events.append(int(kicked.any()))
        frames.append(_render(p, glyphs, subpixel))

    meta = {
        "fps": FPS,
        "num_frames": num_frames,
        "height": CANVAS,
        "width": CANVAS,
        "state": np.round(np.stack(states), 4).tolist(),
        "state_names": [f"{n}{i}" for i in range(num_digits) for n in ("x", "y", "vx", "vy")],
        "action": np.round(np.stack(actions), 4).tolist(),
        "action_names": [f"{n}{i}" for i in range(num_digits) for n in ("dvx", "dvy")],
        "events": events,
        "labels": {f"digit{i}": int(bank.labels[j]) for i, j in enumerate(picks)},
    }
    return np.stack(frames), meta


def make_moving_digits(
    output: str | Path,
    num_videos: int,
    seed: int,
    *,
    num_frames: int = 32,
    num_digits: int = 1,
    kick_prob: float = 0.2,
    still: bool = False,
    subpixel: bool = True,
    val_videos: int | None = None,
    mnist: str | Path | None = None,
    samples_per_shard: int = 100,
    progress: bool = True,
    stable_patch: int = 0,
) -> dict[str, WriteSummary]:
    """Generate `num_videos` training and `val_videos` (default num_videos // 10, at least 1) held-out videos into
    OUTPUT/train/ and OUTPUT/val/ shards. Train uses seed [seed, 0], val [seed, 1]: same seed, same frames and
    metadata."""
    bank = mnist_digits(mnist) if mnist else sklearn_digits()
    return write_world(
        output,
        simulate,
        num_videos,
        seed,
        val_videos=val_videos,
        samples_per_shard=samples_per_shard,
        progress=progress,
        stable_patch=stable_patch,
        num_frames=num_frames,
        num_digits=num_digits,
        kick_prob=kick_prob,
        digits=bank,
        still=still,
        version=VERSION,
        subpixel=subpixel,
    )


def main(argv: list[str] | None = None) -> int:
    parser = world_parser("Generate stochastic Moving digits shards (train/ and val/).")
    parser.add_argument("--num-digits", type=int, default=1, choices=(1, 2))
    parser.add_argument("--kick-prob", type=float, default=0.2, help="probability that a transition kicks a digit")
    parser.add_argument(
        "--still", action="store_true",
        help="diagnostic variant: digits rest and a kick is a one-frame jump (see simulate)",
    )  # fmt: skip
    parser.add_argument(
        "--whole-pixel", action="store_true",
        help="draw each digit at the nearest whole pixel, not its exact position (the old data, for comparison)",
    )  # fmt: skip
    parser.add_argument("--mnist", help="folder with MNIST IDX files (default: scikit-learn's bundled 8x8 digits)")
    args = parser.parse_args(argv)
    summaries = make_moving_digits(
        args.output,
        args.num_videos,
        args.seed,
        num_frames=args.num_frames,
        num_digits=args.num_digits,
        kick_prob=args.kick_prob,
        still=args.still,
        subpixel=not args.whole_pixel,
        val_videos=args.val_videos,
        mnist=args.mnist,
        samples_per_shard=args.samples_per_shard,
        stable_patch=args.stable_patch,
    )
    return report(summaries)


if __name__ == "__main__":
    sys.exit(main())
