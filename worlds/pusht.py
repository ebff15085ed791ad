"""PushT: the benchmark of the world-model anchors (gym-pusht's `gym_pusht/PushT-v0`), played by a scripted policy
that changes its intent; generated to shards deterministically from a seed.

A third built-in world, the standard one of the action-conditioned world-model papers: a blue disc (the agent, the
small thing that moves) pushes a grey T-shaped block on a white table towards a fixed green T (the goal). Needs the
`pusht` extra (`bash scripts/install.sh .venv all pusht`: gym-pusht, which brings gymnasium, pymunk, pygame, shapely
and opencv-python); rendering is headless (SDL_VIDEODRIVER=dummy unless it is set).

Each video is one episode of the environment at its control rate (10 Hz, one frame per env step, no frames
skipped: a config's `data.frame_step` chooses), reset with a seed drawn from the video's generator. The env renders
its 512x512 arena; each frame is averaged over 8x8 blocks to the 64x64 canvas (square to square, anti-aliased), so
a position p in the env's units is at p / 8 on the canvas (x = column, y = row, pixel i covering [i, i + 1)).

The scripted policy holds an intent, whose target position is the action sent to the env at every step until the
intent changes (the env's PD controller pulls the agent towards it, faster the further it is):

    approach  a point APPROACH_GAP env px behind the block's centre of gravity, on the side away from the goal
    push      a point PUSH_PAST env px (drawn per intent) past the block's centre, towards the goal: from behind the
              block the agent runs through it and pushes it goalwards
    random    a point drawn uniformly in the arena
    stay      where the agent is when the intent begins (it brakes to a stop)

A target further than MAX_GAP from the agent is cut short to the point MAX_GAP along the way (so the agent moves at
most ~7 canvas px per frame). At each transition a new intent is drawn with probability `intent_prob` (STAY_END
while it stays), and always once the agent is within REACHED env px of its target: after a reached intent that was
cut short the same kind goes on with probability CONTINUE, after a whole approach the push follows with
probability PUSH_AFTER_APPROACH, otherwise the kind is drawn with INTENT_PROBS (an episode never starts with a
stay). A new target is at least MIN_CHANGE env px from the one it replaces (redrawn up to ten times), so every
change of intent shows in the agent's path in the next frame, and the action changes only with the intent. Targets
are kept MARGIN env px inside the walls: the agent, a kinematic body, would cross them and could squeeze the T
through. The episode is not stopped at the env's success (coverage of the goal over 95%): every video has
`num_frames` frames.

JSON ground truth per video, in canvas pixels: `state` row t = [x0, y0, x1, y1, angle1, vx0, vy0] (0 = the agent's
centre; 1 = the block's position as the env reports it, the origin of the T's body at the middle of its bar's top
edge, and its angle in radians in [0, 2 pi); vx0, vy0 the agent's velocity in px/frame), `action` row t = the
target [ax, ay] the env received at transition t -> t+1, `events` [t] = `intent_changes` [t] = 1 where that
transition begins a new intent, `intent` [t] = the index in `intent_names` of the intent it acts on, `contacts`
[t] = 1 where the agent touches the block at the end of the transition, and `goal` = the goal's [x, y, angle].
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from data_pipeline.writer import WriteSummary
from worlds.simulated import FPS, report, world_parser, write_world

VERSION = 1  # of the world's rules (worlds/simulated.py world.json)
ENV_ID = "gym_pusht/PushT-v0"
ARENA = 512  # env px: the env's square arena, rendered at this size
CANVAS = 64
SCALE = ARENA // CANVAS  # env px per canvas px
INTENTS = ("approach", "push", "random", "stay")
INTENT_PROBS = (0.4, 0.2, 0.3, 0.1)  # a new intent's kind, unless a reached approach is followed by its push
PUSH_AFTER_APPROACH = 0.8  # a reached approach (not cut short) is followed by the push with this probability
APPROACH_GAP = 100.0  # env px from the block's centre of gravity: its reach (~75) + the agent's radius (15) + 10
PUSH_PAST = (40.0, 140.0)  # env px past the block's centre of gravity, drawn per push
MARGIN = 60.0  # env px: targets stay this far inside the arena's edge (walls at 5 and 506), so the agent rarely
# squeezes the T against a wall (a kinematic body, it would push it through)
MAX_GAP = 160.0  # env px (20 canvas px): a target at most this far from the agent, so the env's PD controller
# moves it at most ~0.33 * MAX_GAP per frame (6.6 canvas px)
CONTINUE = 0.8  # a reached intent whose target was cut short by MAX_GAP goes on (same kind) with this probability
REACHED = 8.0  # env px from its target: the intent is done
STAY_END = 0.3  # per transition: a stay ends with this probability (or intent_prob, if that is larger)
MIN_CHANGE = 40.0  # env px (5 canvas px) between a new target and the one it replaces


def _make_env():
    """The gym-pusht env rendering 512x512 pixels, headless; a clear ImportError where the extra is missing."""
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # read when pygame starts: no window, no display needed
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    try:
        import gym_pusht  # noqa: F401  (registers gym_pusht/PushT-v0)
        import gymnasium
    except ImportError as error:
        raise ImportError(
            "the PushT world needs the pusht extra: bash scripts/install.sh .venv all pusht (gym-pusht and what it "
            f"pulls in, pinned in constraints.txt); {error}"
        ) from error
    return gymnasium.make(ENV_ID, obs_type="pixels", observation_width=ARENA, observation_height=ARENA)


def downsample(frame: np.ndarray) -> np.ndarray:
    """The env's uint8 [512, 512, 3] frame averaged over 8x8 blocks (rounded half up): uint8 [64, 64, 3]."""
    wide = frame.astype(np.uint16)  # 64 * 255 fits; strided sums are faster than a reshape's mean
    columns = sum(wide[:, i::SCALE] for i in range(SCALE))
    blocks = sum(columns[i::SCALE] for i in range(SCALE))
    return ((blocks + SCALE * SCALE // 2) // (SCALE * SCALE)).astype(np.uint8)


def _inside(point: np.ndarray) -> np.ndarray:
    return np.clip(point, MARGIN, ARENA - MARGIN)


def _unit(vector: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`vector` normalised; a random direction where it is (nearly) zero."""
    norm = float(np.hypot(*vector))
    if norm < 1e-6:
        angle = rng.uniform(0, 2 * np.pi)
        return np.array([np.cos(angle), np.sin(angle)])
    return vector / norm


def _draw_target(
    kind: int, rng: np.random.Generator, agent: np.ndarray, block: np.ndarray, goal: np.ndarray
) -> tuple[np.ndarray, bool]:
    """The target (env px) of a new intent of kind INTENTS[kind], given the agent's position and the block's centre
    of gravity, and whether it was cut short: a point further than MAX_GAP from the agent is replaced by the point
    MAX_GAP along the way."""
    name = INTENTS[kind]
    if name == "approach":
        point = block - APPROACH_GAP * _unit(goal - block, rng)
    elif name == "push":
        point = block + rng.uniform(*PUSH_PAST) * _unit(goal - block, rng)
    elif name == "random":
        point = rng.uniform(MARGIN, ARENA - MARGIN, size=2)
    else:  # stay
        return agent.copy(), False
    point = _inside(point)
    gap = float(np.hypot(*(point - agent)))
    if gap <= MAX_GAP:
        return point, False
    return agent + (point - agent) * (MAX_GAP / gap), True


def _new_intent(
    rng: np.random.Generator,
    agent: np.ndarray,
    block: np.ndarray,
    goal: np.ndarray,
    last: tuple[int, np.ndarray, bool] | None = None,
    reached: bool = False,
) -> tuple[int, np.ndarray, bool]:
    """A new intent (kind, target in env px, cut short). After a reached one: the same kind again with probability
    CONTINUE where it was cut short, the push with probability PUSH_AFTER_APPROACH after a whole approach; else a
    kind drawn with INTENT_PROBS (never "stay" first). The target is at least MIN_CHANGE env px from the last one
    (redrawn up to ten times; the tenth draw is kept)."""
    follow = None
    if reached and last is not None:
        if last[2] and rng.random() < CONTINUE:
            follow = last[0]
        elif not last[2] and INTENTS[last[0]] == "approach" and rng.random() < PUSH_AFTER_APPROACH:
            follow = INTENTS.index("push")
    probs = np.array(INTENT_PROBS)
    if last is None:  # an episode starts moving
        probs[INTENTS.index("stay")] = 0.0
    for _ in range(10):
        kind = int(rng.choice(len(INTENTS), p=probs / probs.sum())) if follow is None else follow
        target, cut = _draw_target(kind, rng, agent, block, goal)
        if last is None or float(np.hypot(*(target - last[1]))) >= MIN_CHANGE:
            break
        follow = None  # the follow-up lands too near the last target: draw a kind instead
    return kind, target, cut


def _touching(env) -> bool:
    """Whether the agent's disc touches the T (pymunk's contact test of the two shapes)."""
    (disc,) = env.agent.shapes
    return any(disc.shapes_collide(shape).points for shape in env.block.shapes)


def _state(env) -> np.ndarray:
    """[x0, y0, x1, y1, angle1, vx0, vy0] in canvas px (velocity in px/frame) and radians."""
    agent, block = np.array(env.agent.position), np.array(env.block.position)
    velocity = np.array(env.agent.velocity) / SCALE / env.metadata["render_fps"]
    return np.array([*agent / SCALE, *block / SCALE, env.block.angle % (2 * np.pi), *velocity])


def simulate(num_frames: int, rng: np.random.Generator, intent_prob: float = 0.1) -> tuple[np.ndarray, dict]:
    """Play one PushT episode of `num_frames` frames with the scripted policy.

    Returns `frames`: uint8 [num_frames, 64, 64, 3] and its JSON metadata (fps, num_frames, height, width,
    state [num_frames][7], state_names, action [num_frames - 1][2], action_names, events, intent_changes, intent,
    contacts [num_frames - 1], intent_names, goal). Deterministic given the state of `rng` (which also seeds the
    env's reset).
    """
    if num_frames < 2:
        raise ValueError(f"num_frames must be >= 2 to have a transition, got {num_frames}")
    if not 0.0 <= intent_prob <= 1.0:
        raise ValueError(f"intent_prob must be in [0, 1], got {intent_prob}")
    env = _make_env()
    try:
        pixels, _ = env.reset(seed=int(rng.integers(2**31)))
        sim = env.unwrapped
        goal = np.array(sim.goal_pose, dtype=float)

        def positions() -> tuple[np.ndarray, np.ndarray]:
            return np.array(sim.agent.position), np.array(sim.block.local_to_world(sim.block.center_of_gravity))

        agent, block = positions()
        intent = _new_intent(rng, agent, block, goal[:2])
        frames, states = [downsample(pixels)], [_state(sim)]
        actions, changes, kinds, contacts = [], [], [], []
        for _ in range(num_frames - 1):
            staying = INTENTS[intent[0]] == "stay"
            reached = not staying and float(np.hypot(*(agent - intent[1]))) < REACHED
            changed = reached or rng.random() < (max(intent_prob, STAY_END) if staying else intent_prob)
            if changed:
                intent = _new_intent(rng, agent, block, goal[:2], intent, reached)
            pixels, *_ = env.step(intent[1].copy())
            agent, block = positions()
            frames.append(downsample(pixels))
            states.append(_state(sim))
            actions.append(intent[1] / SCALE)
            changes.append(int(changed))
            kinds.append(intent[0])
            contacts.append(int(_touching(sim)))
    finally:
        env.close()

    meta = {
        "fps": FPS,
        "num_frames": num_frames,
        "height": CANVAS,
        "width": CANVAS,
        "state": np.round(np.stack(states), 4).tolist(),
        "state_names": ["x0", "y0", "x1", "y1", "angle1", "vx0", "vy0"],
        "action": np.round(np.stack(actions), 4).tolist(),
        "action_names": ["ax", "ay"],
        "events": changes,
        "intent_changes": changes,
        "intent": kinds,
        "intent_names": list(INTENTS),
        "contacts": contacts,
        "goal": [round(goal[0] / SCALE, 4), round(goal[1] / SCALE, 4), round(float(goal[2]), 4)],
    }
    return np.stack(frames), meta


def make_pusht(
    output: str | Path,
    num_videos: int,
    seed: int,
    *,
    num_frames: int = 32,
    intent_prob: float = 0.1,
    val_videos: int | None = None,
    samples_per_shard: int = 100,
    progress: bool = True,
    stable_patch: int = 0,
) -> dict[str, WriteSummary]:
    """Generate `num_videos` training and `val_videos` (default num_videos // 10, at least 1) held-out PushT
    episodes into OUTPUT/train/ and OUTPUT/val/ shards, and OUTPUT/world.json with VERSION. Train uses seed
    [seed, 0], val [seed, 1]: same seed, same frames and metadata."""
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
    """The command line: `python -m worlds.pusht --output DIR --num-videos N --seed S ...`."""
    parser = world_parser(
        "Generate PushT shards (train/ and val/) with gym-pusht: a scripted policy that changes its intent pushes "
        "the T; actions (target positions), state and events in the JSON."
    )
    parser.add_argument("--intent-prob", type=float, default=0.1, help="probability of a new intent per transition")
    args = parser.parse_args(argv)
    summaries = make_pusht(
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
