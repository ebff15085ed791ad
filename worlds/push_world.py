"""Push world: an agent that pushes an object on a cluttered table, with its actions recorded; generated to shards
deterministically from a seed.

A second built-in world, of the kind users train on (robot and game video): an agent's actions drive the change,
and most of each frame is a static, textured background. Per video, on a 64x64 canvas:

- the background: smooth colour noise plus a few static clutter shapes (rectangles and rings), different in every
  video and still within one;
- the agent: a blue disc (radius AGENT_R px) driven by its commanded velocity, the action;
- the object: an orange disc (radius OBJECT_R px) that the agent pushes; it slides with friction and bounces off
  the walls.

Dynamics, per transition t -> t+1 (SUBSTEPS integration steps of 1/SUBSTEPS frame each):

    intent   with probability `intent_prob` the policy picks a new commanded velocity a (else it keeps a_t):
             towards the object (probability TOWARD_OBJECT), in a random direction, or standing still (STOP_PROB),
             at a speed drawn from [MIN_SPEED, MAX_SPEED] px/frame, and at least MIN_CHANGE px/frame from a_t
    agent    v <- v + RESPONSE * (a - v) (RESPONSE = 1: the agent takes its new velocity at once, so a change of
             intent moves it off its straight path by ~1.8 px at the 32-px training resolution in the very next
             frame, like a kick of the moving digits; a slower response spreads it sub-pixel over frames that no
             encoder at 32 px resolves), p <- p + v; it stops at the walls
    object   p <- p + v, v <- FRICTION * v; reflected at the walls with RESTITUTION
    contact  where the discs overlap the object is moved out along the normal and takes the agent's normal
             velocity (the agent is much heavier than the object)

So the future is one-to-many without the action (a change of intent can happen at any transition), and exactly
determined with it (the oracle's job). JSON ground truth per video: `state` row t = [x0, y0, vx0, vy0, x1, y1,
vx1, vy1] (0 = the agent, 1 = the object; centres in pixels, x = column, y = row; velocities in px/frame),
`action` row t = the commanded velocity [ax, ay] of transition t -> t+1, `events` [t] = 1 where that transition
changes the intent or a contact begins, and the same two flags apart as `intent_changes` and `contacts`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

from data_pipeline.writer import WriteSummary
from worlds.simulated import FPS, report, world_parser, write_world

VERSION = 2  # of the world's rules (worlds/simulated.py world.json); 2: RESPONSE 1, faster, MIN_CHANGE
CANVAS = 64
AGENT_R, OBJECT_R = 4.5, 6.0  # px
AGENT_RGB = np.array([0.15, 0.35, 1.0], dtype=np.float32)
OBJECT_RGB = np.array([1.0, 0.55, 0.1], dtype=np.float32)
MIN_SPEED, MAX_SPEED = 2.0, 4.0  # px/frame of a commanded velocity
MIN_CHANGE = 2.0  # px/frame: a new intent's commanded velocity differs from the last one by at least this much
TOWARD_OBJECT, STOP_PROB = 0.6, 0.1  # a new intent heads for the object / stands still with these probabilities
RESPONSE = 1.0  # per frame: the fraction of the gap to its commanded velocity the agent closes (1: at once)
FRICTION = 0.9  # per frame: the object's velocity factor
RESTITUTION = 0.6  # the object's bounce off a wall
SUBSTEPS = 4


def _background(rng: np.random.Generator) -> np.ndarray:
    """A static cluttered table: float32 [CANVAS, CANVAS, 3] in [0, 1], muted so the agent and object stand out."""
    noise = ndimage.gaussian_filter(rng.normal(size=(CANVAS, CANVAS, 3)), sigma=(6, 6, 0))
    noise = noise / (np.abs(noise).max() + 1e-8)
    base = rng.uniform(0.3, 0.55, size=3)
    image = base + 0.12 * noise
    yy, xx = np.mgrid[0:CANVAS, 0:CANVAS] + 0.5
    for _ in range(rng.integers(3, 7)):
        colour = rng.uniform(0.2, 0.7, size=3) * np.array([0.8, 0.8, 0.6])  # no saturated blue or orange
        cx, cy = rng.uniform(0, CANVAS, size=2)
        if rng.random() < 0.5:
            w, h = rng.uniform(4, 14, size=2)
            mask = (np.abs(xx - cx) < w / 2) & (np.abs(yy - cy) < h / 2)
        else:
            r = rng.uniform(3, 8)
            mask = np.abs(np.hypot(xx - cx, yy - cy) - r) < 1.0
        image[mask] = colour
    return np.clip(image, 0, 1).astype(np.float32)


def _disc(image: np.ndarray, x: float, y: float, radius: float, rgb: np.ndarray) -> None:
    """Composite an anti-aliased disc (coverage = 1 inside, falling linearly over the boundary pixel) in place."""
    yy, xx = np.mgrid[0:CANVAS, 0:CANVAS] + 0.5
    cover = np.clip(radius + 0.5 - np.hypot(xx - x, yy - y), 0.0, 1.0)[..., None]
    image *= 1 - cover
    image += cover * rgb


def render(background: np.ndarray, agent: np.ndarray, obj: np.ndarray) -> np.ndarray:
    """The frame uint8 [CANVAS, CANVAS, 3] with the object and the agent (on top) at their centres (x, y)."""
    image = background.copy()
    _disc(image, obj[0], obj[1], OBJECT_R, OBJECT_RGB)
    _disc(image, agent[0], agent[1], AGENT_R, AGENT_RGB)
    return np.round(image * 255).astype(np.uint8)


def _new_intent(
    rng: np.random.Generator, agent: np.ndarray, obj: np.ndarray, last: np.ndarray | None = None
) -> np.ndarray:
    """A commanded velocity [2]: towards the object, in a random direction, or zero; at least MIN_CHANGE px/frame
    away from `last` (the intent it replaces), so that every change of intent shows in the next frame (redrawn up to
    ten times; the tenth draw is kept)."""
    for _ in range(10):
        action = _draw_intent(rng, agent, obj)
        if last is None or float(np.hypot(*(action - last))) >= MIN_CHANGE:
            break
    return action


def _draw_intent(rng: np.random.Generator, agent: np.ndarray, obj: np.ndarray) -> np.ndarray:
    draw = rng.random()
    if draw < STOP_PROB:
        return np.zeros(2)
    if draw < STOP_PROB + TOWARD_OBJECT:
        d = obj - agent
        angle = float(np.arctan2(d[1], d[0])) + rng.normal(0, 0.3)
    else:
        angle = rng.uniform(0, 2 * np.pi)
    speed = rng.uniform(MIN_SPEED, MAX_SPEED)
    return np.array([speed * np.cos(angle), speed * np.sin(angle)])


def _step(
    pa: np.ndarray, va: np.ndarray, po: np.ndarray, vo: np.ndarray, action: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One frame of dynamics for agent (pa, va) and object (po, vo), each [2]; returns the new four."""
    pa, va, po, vo = pa.copy(), va.copy(), po.copy(), vo.copy()
    h = 1.0 / SUBSTEPS
    response = 1 - (1 - RESPONSE) ** h
    friction = FRICTION**h
    lo_a, hi_a = AGENT_R, CANVAS - AGENT_R
    lo_o, hi_o = OBJECT_R, CANVAS - OBJECT_R
    for _ in range(SUBSTEPS):
        va += response * (action - va)
        pa += h * va
        for axis in range(2):
            if not lo_a <= pa[axis] <= hi_a:
                pa[axis] = np.clip(pa[axis], lo_a, hi_a)
                va[axis] = 0.0
        po += h * vo
        for axis in range(2):
            if po[axis] < lo_o:
                po[axis], vo[axis] = 2 * lo_o - po[axis], -RESTITUTION * vo[axis]
            elif po[axis] > hi_o:
                po[axis], vo[axis] = 2 * hi_o - po[axis], -RESTITUTION * vo[axis]
        d = po - pa
        dist = float(np.hypot(*d))
        if dist < AGENT_R + OBJECT_R:
            n = d / dist if dist > 1e-6 else np.array([1.0, 0.0])
            po = np.clip(pa + n * (AGENT_R + OBJECT_R), lo_o, hi_o)
            closing = float((va - vo) @ n)
            if closing > 0:
                vo += closing * n
        vo *= friction
    return pa, va, po, vo


def _touching(pa: np.ndarray, po: np.ndarray) -> bool:
    return float(np.hypot(*(po - pa))) <= AGENT_R + OBJECT_R + 0.25


def simulate(num_frames: int, rng: np.random.Generator, intent_prob: float = 0.15) -> tuple[np.ndarray, dict]:
    """Simulate one push-world video.

    Returns `frames`: uint8 [num_frames, 64, 64, 3] and its JSON metadata (fps, num_frames, height, width,
    state [num_frames][8], state_names, action [num_frames - 1][2], action_names, events, intent_changes and
    contacts [num_frames - 1]). Deterministic given the state of `rng`.
    """
    if num_frames < 2:
        raise ValueError(f"num_frames must be >= 2 to have a transition, got {num_frames}")
    if not 0.0 <= intent_prob <= 1.0:
        raise ValueError(f"intent_prob must be in [0, 1], got {intent_prob}")
    background = _background(rng)
    pa = rng.uniform(AGENT_R + 2, CANVAS - AGENT_R - 2, size=2)
    while True:  # the object starts clear of the agent
        po = rng.uniform(OBJECT_R + 4, CANVAS - OBJECT_R - 4, size=2)
        if np.hypot(*(po - pa)) > AGENT_R + OBJECT_R + 6:
            break
    va, vo = np.zeros(2), np.zeros(2)
    action = _new_intent(rng, pa, po)
    va = action * RESPONSE
    states = [np.concatenate([pa, va, po, vo])]
    frames = [render(background, pa, po)]
    actions, intents, contacts = [], [], []
    for _ in range(num_frames - 1):
        changed = rng.random() < intent_prob
        if changed:
            action = _new_intent(rng, pa, po, action)
        touching = _touching(pa, po)
        pa, va, po, vo = _step(pa, va, po, vo, action)
        states.append(np.concatenate([pa, va, po, vo]))
        actions.append(action.copy())
        intents.append(int(changed))
        contacts.append(int(_touching(pa, po) and not touching))
        frames.append(render(background, pa, po))

    meta = {
        "fps": FPS,
        "num_frames": num_frames,
        "height": CANVAS,
        "width": CANVAS,
        "state": np.round(np.stack(states), 4).tolist(),
        "state_names": ["x0", "y0", "vx0", "vy0", "x1", "y1", "vx1", "vy1"],
        "action": np.round(np.stack(actions), 4).tolist(),
        "action_names": ["ax", "ay"],
        "events": [int(a or b) for a, b in zip(intents, contacts, strict=True)],
        "intent_changes": intents,
        "contacts": contacts,
    }
    return np.stack(frames), meta


def make_push_world(
    output: str | Path,
    num_videos: int,
    seed: int,
    *,
    num_frames: int = 32,
    intent_prob: float = 0.15,
    val_videos: int | None = None,
    samples_per_shard: int = 100,
    progress: bool = True,
    stable_patch: int = 0,
) -> dict[str, WriteSummary]:
    """Generate `num_videos` training and `val_videos` (default num_videos // 10, at least 1) held-out videos into
    OUTPUT/train/ and OUTPUT/val/ shards. Train uses seed [seed, 0], val [seed, 1]: same seed, same frames and
    metadata."""
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
        intent_prob=intent_prob,
        version=VERSION,
    )


def main(argv: list[str] | None = None) -> int:
    parser = world_parser(
        "Generate push-world shards (train/ and val/): an agent pushes an object on a cluttered table; actions, "
        "state and events in the JSON."
    )
    parser.add_argument("--intent-prob", type=float, default=0.15, help="probability of a new intent per transition")
    args = parser.parse_args(argv)
    summaries = make_push_world(
        args.output,
        args.num_videos,
        args.seed,
        num_frames=args.num_frames,
        intent_prob=args.intent_prob,
        val_videos=args.val_videos,
        samples_per_shard=args.samples_per_shard,
        stable_patch=args.stable_patch,
    )
    return report(summaries)


if __name__ == "__main__":
    sys.exit(main())
