"""PushT (gym-pusht with a scripted policy that changes its intent): deterministic from the seed, ground truth that
matches the pixels, an action that drives the agent, events where the intent changes."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest

pytest.importorskip("gym_pusht")  # the pusht extra (scripts/test.sh installs it)

from data_pipeline.decoders import get_decoder  # noqa: E402
from worlds.pusht import INTENTS, MIN_CHANGE, SCALE, VERSION, downsample, main, simulate  # noqa: E402

T_CENTROID = 40.71 / SCALE  # canvas px from the T's body origin to its area centroid, along the stem (rotated)


def _agent_centroid(frame: np.ndarray) -> np.ndarray:
    """(x, y) centroid of the blue in a uint8 frame [H, W, 3], weighted by how much bluer than grey it is."""
    f = frame.astype(np.float32)
    weight = np.clip(f[..., 2] - (f[..., 0] + f[..., 1]) / 2 - 35, 0, None)
    ys, xs = np.mgrid[0 : frame.shape[0], 0 : frame.shape[1]] + 0.5
    return np.array([(weight * xs).sum() / weight.sum(), (weight * ys).sum() / weight.sum()])


def _block_centroid(frame: np.ndarray) -> np.ndarray:
    """(x, y) centroid of the slate-grey T (not the white table, the light-grey walls or the green goal)."""
    f = frame.astype(np.float32)
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    weight = np.clip(200 - (r + g + b) / 3, 0, None) * (b - r < 60) * (np.abs(g - (r + b) / 2) < 20)
    weight[:2], weight[-2:], weight[:, :2], weight[:, -2:] = 0, 0, 0, 0  # the walls
    ys, xs = np.mgrid[0 : frame.shape[0], 0 : frame.shape[1]] + 0.5
    return np.array([(weight * xs).sum() / weight.sum(), (weight * ys).sum() / weight.sum()])


@pytest.fixture(scope="module")
def episodes() -> list[tuple[np.ndarray, dict]]:
    """Twelve 32-frame episodes from one generator (about 1.5 s)."""
    rng = np.random.default_rng(0)
    return [simulate(32, rng) for _ in range(12)]


def test_same_seed_same_video_and_metadata_other_seed_differs():
    a_frames, a_meta = simulate(16, np.random.default_rng(3))
    b_frames, b_meta = simulate(16, np.random.default_rng(3))
    c_frames, c_meta = simulate(16, np.random.default_rng(4))
    assert a_frames.tobytes() == b_frames.tobytes() and json.dumps(a_meta) == json.dumps(b_meta)
    assert not np.array_equal(a_frames, c_frames) and a_meta["state"] != c_meta["state"]


def test_frames_and_metadata_shapes(episodes):
    frames, meta = episodes[0]
    assert frames.shape == (32, 64, 64, 3) and frames.dtype == np.uint8
    assert (meta["num_frames"], meta["height"], meta["width"], meta["fps"]) == (32, 64, 64, 10.0)
    assert np.array(meta["state"]).shape == (32, 7) and meta["state_names"][:5] == ["x0", "y0", "x1", "y1", "angle1"]
    assert len(meta["state_names"]) == 7
    assert np.array(meta["action"]).shape == (31, 2) and meta["action_names"] == ["ax", "ay"]
    for key in ("events", "intent_changes", "intent", "contacts"):
        assert len(meta[key]) == 31, key
    assert meta["intent_names"] == list(INTENTS)


def test_downsample_averages_8x8_blocks():
    frame = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    expected = np.floor(frame.reshape(64, 8, 64, 8, 3).astype(np.float64).mean(axis=(1, 3)) + 0.5)
    assert np.array_equal(downsample(frame), expected.astype(np.uint8))


def test_the_agent_and_the_block_are_where_the_state_says(episodes):
    """Canvas px = env px / 8, x = column, y = row: the blue disc's centroid is the agent's state, the grey T's is
    its body origin moved along the rotated stem."""
    for frames, meta in episodes[:4]:
        state = np.array(meta["state"])
        for t in range(len(frames)):
            assert np.abs(_agent_centroid(frames[t]) - state[t, :2]).max() < 0.3, (t, state[t, :2])
            angle = state[t, 4]
            centre = state[t, 2:4] + T_CENTROID * np.array([-np.sin(angle), np.cos(angle)])
            if np.hypot(*(state[t, :2] - centre)) > 10:  # the agent covers none of it
                assert np.abs(_block_centroid(frames[t]) - centre).max() < 0.5, (t, centre)


def test_the_agent_moves_a_lot(episodes):
    for _, meta in episodes:
        agent = np.array(meta["state"])[:, :2]
        steps = np.hypot(*np.diff(agent, axis=0).T)
        assert steps.sum() > 40 and np.ptp(agent, axis=0).max() > 10, steps  # canvas px over 31 transitions
        assert np.mean(steps > 0.5) > 0.5  # it is moving in most frames
        assert steps.max() < 12  # and never jumps across the canvas (MAX_GAP)


def test_the_action_drives_the_agent_to_its_target(episodes):
    """The action is the target the env's controller pulls the agent towards: the gap shrinks at every transition
    that starts away from it, and a target held for four transitions or more is all but reached (the PD controller
    closes ~96% of the gap in four frames)."""
    closer, held = [], []
    for _, meta in episodes:
        state, action = np.array(meta["state"]), np.array(meta["action"])
        before = np.hypot(*(action - state[:-1, :2]).T)  # canvas px from the target, at the start of each transition
        after = np.hypot(*(action - state[1:, :2]).T)  # and at its end
        closer += list(after[before > 2] < before[before > 2])
        runs = np.split(np.arange(31), np.flatnonzero(meta["intent_changes"]))  # transitions with one target
        held += [after[run[-1]] / before[run[0]] for run in runs if len(run) >= 4 and before[run[0]] > 3]
    assert np.mean(closer) > 0.97, np.mean(closer)
    assert len(held) >= 20 and max(held) < 0.25, held


def test_events_are_the_changes_of_intent_and_the_action_changes_only_there(episodes):
    changes_per_video = []
    for _, meta in episodes:
        events, changes = np.array(meta["events"]), np.array(meta["intent_changes"])
        assert np.array_equal(events, changes)
        action = np.array(meta["action"])
        jumps = np.hypot(*(action[1:] - action[:-1]).T)  # the action of transition t against t - 1
        assert np.all(jumps[changes[1:] == 0] == 0), "the action changed without a change of intent"
        assert np.mean(jumps[changes[1:] == 1] >= MIN_CHANGE / SCALE - 1e-3) > 0.95  # each change shows
        intent = np.array(meta["intent"])
        assert np.all(intent[1:][changes[1:] == 0] == intent[:-1][changes[1:] == 0])
        changes_per_video.append(changes.sum())
    assert 3 <= np.mean(changes_per_video) <= 12, changes_per_video


def test_the_block_gets_pushed(episodes):
    moved, touched = 0, 0
    for _, meta in episodes:
        state = np.array(meta["state"])
        moved += np.hypot(*(state[-1, 2:4] - state[0, 2:4])) > 3 or abs(state[-1, 4] - state[0, 4]) > 0.2
        touched += any(meta["contacts"])
        assert np.all((state[:, 2:4] > 0) & (state[:, 2:4] < 64)), "the T left the arena"
    assert moved >= 6 and touched >= 6, (moved, touched)


def test_shards_are_deterministic_decode_to_the_episodes_and_carry_the_version(tmp_path, capsys):
    args = ["--num-videos", "3", "--val-videos", "1", "--seed", "5", "--num-frames", "12"]
    assert main(["--output", str(tmp_path / "a"), *args]) == 0
    assert main(["--output", str(tmp_path / "b"), *args]) == 0
    assert "wrote 3 samples" in capsys.readouterr().out
    stamp = json.loads((tmp_path / "a" / "world.json").read_text())
    assert stamp == {"generator": "worlds.pusht", "version": VERSION, "seed": 5, "stable_patch": 0}
    assert json.loads((tmp_path / "a" / "val" / "index.json").read_text())["total_samples"] == 1
    members = {}
    for run in ("a", "b"):
        with tarfile.open(tmp_path / run / "train" / "shard-000000.tar") as tar:
            members[run] = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert sorted(members["a"]) == sorted(members["b"]) and len(members["a"]) == 6
    rng = np.random.default_rng([5, 0])  # write_world's train generator
    for i in range(3):
        key = f"train_{i:07d}"
        assert members["a"][f"{key}.json"] == members["b"][f"{key}.json"]  # the sidecars, byte for byte
        expected, meta = simulate(12, rng)
        assert json.loads(members["a"][f"{key}.json"])["state"] == meta["state"]
        for run in ("a", "b"):  # libx264 may differ by codec noise from call to call, not more
            decoded = get_decoder("pyav").decode(members[run][f"{key}.mp4"], list(range(12)))
            assert np.abs(decoded.astype(np.int16) - expected).mean() < 1.0
            for t in range(12):  # yuv420p keeps the colour at half resolution: the blue spreads by a pixel
                assert np.abs(_agent_centroid(decoded[t]) - np.array(meta["state"])[t, :2]).max() < 1.0
