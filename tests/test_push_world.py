"""The push world: deterministic from the seed, ground truth that matches the pixels, one action per transition."""

from __future__ import annotations

import json
import tarfile

import numpy as np

from data_pipeline.decoders import get_decoder
from worlds.push_world import (
    AGENT_RGB,
    MIN_CHANGE,
    OBJECT_R,
    OBJECT_RGB,
    VERSION,
    make_push_world,
    simulate,
)


def _centroid(frame: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    """(x, y) centroid of the pixels closest to colour `rgb` (uint8 frame [H, W, 3])."""
    distance = np.abs(frame.astype(np.float32) / 255.0 - rgb).sum(-1)
    ys, xs = np.nonzero(distance < 0.25)
    return np.array([xs.mean() + 0.5, ys.mean() + 0.5])


def test_same_seed_same_video_and_metadata_other_seed_differs():
    a_frames, a_meta = simulate(24, np.random.default_rng(3))
    b_frames, b_meta = simulate(24, np.random.default_rng(3))
    c_frames, _ = simulate(24, np.random.default_rng(4))
    assert np.array_equal(a_frames, b_frames) and a_meta == b_meta
    assert not np.array_equal(a_frames, c_frames)


def test_metadata_shapes_and_events():
    frames, meta = simulate(32, np.random.default_rng(0), intent_prob=0.3)
    assert frames.shape == (32, 64, 64, 3) and frames.dtype == np.uint8
    assert np.array(meta["state"]).shape == (32, 8) and len(meta["state_names"]) == 8
    assert np.array(meta["action"]).shape == (31, 2)  # one row per transition t -> t+1
    assert len(meta["events"]) == len(meta["intent_changes"]) == len(meta["contacts"]) == 31
    assert meta["events"] == [int(a or b) for a, b in zip(meta["intent_changes"], meta["contacts"], strict=True)]
    actions = np.array(meta["action"])
    changes = np.flatnonzero(np.any(actions[1:] != actions[:-1], axis=1)) + 1
    assert set(changes) <= set(np.flatnonzero(meta["intent_changes"]))  # the action only changes with the intent


def test_the_agent_and_the_object_are_where_the_state_says():
    rng = np.random.default_rng(1)
    for _ in range(3):
        frames, meta = simulate(16, rng)
        state = np.array(meta["state"])
        for t in range(16):
            agent = _centroid(frames[t], AGENT_RGB)
            assert np.abs(agent - state[t, 0:2]).max() < 0.3, (t, agent, state[t, :2])
            obj = _centroid(frames[t], OBJECT_RGB)
            if np.hypot(*(state[t, 4:6] - state[t, 0:2])) > OBJECT_R + 6:  # not covered by the agent
                assert np.abs(obj - state[t, 4:6]).max() < 0.3, (t, obj, state[t, 4:6])


def test_a_change_of_intent_shows_in_the_next_frame():
    """The agent leaves its straight path right after a change of intent (the event AdaSSL's latent must explain),
    and hardly otherwise: the commanded velocity jumps by at least MIN_CHANGE and the agent follows at once."""
    rng = np.random.default_rng(2)
    jumps, off_path = [], {0: [], 1: []}
    for _ in range(20):
        _, meta = simulate(32, rng)
        actions, changed = np.array(meta["action"]), np.array(meta["intent_changes"])
        jumps += list(np.hypot(*(actions[1:] - actions[:-1]).T)[changed[1:] == 1])
        pos = np.array(meta["state"])[:, :2]
        deviation = np.hypot(*(pos[2:] - 2 * pos[1:-1] + pos[:-2]).T)  # from constant velocity, t -> t+1
        for flag, d in zip(changed[1:], deviation, strict=True):
            off_path[int(flag)].append(d)
    assert len(jumps) > 20 and np.mean(np.array(jumps) >= MIN_CHANGE) > 0.95
    assert np.mean(off_path[1]) > 2.0 and np.mean(off_path[0]) < 0.3, {k: np.mean(v) for k, v in off_path.items()}


def test_the_agent_pushes_the_object():
    rng = np.random.default_rng(0)
    moved = 0
    for _ in range(20):
        _, meta = simulate(32, rng)
        state = np.array(meta["state"])
        moved += np.hypot(*(state[-1, 4:6] - state[0, 4:6])) > 2.0
    assert moved >= 5, "the object is hardly ever pushed"


def test_shards_decode_to_the_simulated_positions(tmp_path):
    make_push_world(tmp_path, 2, seed=0, val_videos=1, num_frames=12, progress=False)
    index = json.loads((tmp_path / "train" / "index.json").read_text())
    assert index["total_samples"] == 2
    stamp = json.loads((tmp_path / "world.json").read_text())
    assert stamp == {"generator": "worlds.push_world", "version": VERSION, "seed": 0, "stable_patch": 0}
    with tarfile.open(tmp_path / "train" / "shard-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    meta = json.loads(members["train_0000000.json"])
    frames = get_decoder("pyav").decode(members["train_0000000.mp4"], list(range(12)))
    state = np.array(meta["state"])
    for t in range(12):
        assert np.abs(_centroid(frames[t], AGENT_RGB) - state[t, :2]).max() < 0.5


def test_a_stable_patch_is_pasted_into_every_frame_and_leaves_the_world_as_it_was(tmp_path):
    make_push_world(tmp_path / "plain", 2, seed=0, val_videos=1, num_frames=8, progress=False)
    make_push_world(tmp_path / "patch", 2, seed=0, val_videos=1, num_frames=8, progress=False, stable_patch=16)
    assert json.loads((tmp_path / "patch" / "world.json").read_text())["stable_patch"] == 16
    corners = set()
    for i in range(2):
        decoded = {}
        for name in ("plain", "patch"):
            with tarfile.open(tmp_path / name / "train" / "shard-000000.tar") as tar:
                members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
            decoded[name] = (
                get_decoder("pyav").decode(members[f"train_{i:07d}.mp4"], list(range(8))).astype(np.int16),
                json.loads(members[f"train_{i:07d}.json"]),
            )
        (plain, plain_meta), (patched, meta) = decoded["plain"], decoded["patch"]
        assert meta["state"] == plain_meta["state"] and meta["action"] == plain_meta["action"]  # the same world
        x, y, size, *colour = meta["stable_patch"]
        assert size == 16 and x in (0, 48) and y in (0, 48)
        corners.add((x, y))
        inside = np.zeros(plain.shape[1:3], dtype=bool)
        inside[y : y + size, x : x + size] = True
        square = patched[:, y + 4 : y + size - 4, x + 4 : x + size - 4]  # away from the edge (chroma subsampling)
        assert np.abs(square - np.array(colour)).max() <= 12  # the same colour in every frame
        assert np.abs(patched[:, ~inside] - plain[:, ~inside]).mean() < 2.0  # elsewhere the same frames
