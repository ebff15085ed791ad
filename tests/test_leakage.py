"""The leakage and transfer checks of inferred latents (worldmodel/eval/leakage.py), on real tiny models."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from worldmodel.eval.collect import Collected, process_batch
from worldmodel.eval.leakage import (
    SKIP_TRANSITIONS,
    LeakageAccumulator,
    derangement,
    leakage_metrics,
    one_step_predictions,
    ratio,
    shuffle_summary,
    transfer_correlations,
)
from worldmodel.eval.probes import split_clips
from worldmodel.eval.report import render_report
from worldmodel.eval.rollout_metrics import ErrorAccumulator
from worldmodel.model.world_model import WorldModel
from worldmodel.run.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = load_config(ROOT / "configs" / "tiny.yaml").model  # img 64, patch 16, frame granularity
CELLS = 4  # the jump world's square moves on a CELLS x CELLS grid of patch-sized cells


def _model(latent: str, seed: int = 0) -> WorldModel:
    torch.manual_seed(seed)
    return WorldModel(dataclasses.replace(TINY, latent=latent)).eval()


def _jump_clips(num_clips: int, num_frames: int, rng: np.random.Generator) -> tuple[torch.Tensor, np.ndarray]:
    """A white square one cell wide that jumps by a random step in {-1, 0, 1}^2 cells (wrapping) at every
    transition: nothing in the context tells the next step, only r can. Returns frames uint8 [B, T, 64, 64, 3] and
    the cell positions [B, T, 2] (x, y)."""
    size, cell = TINY.img_size, TINY.img_size // CELLS
    pos = np.zeros((num_clips, num_frames, 2), dtype=np.int64)
    pos[:, 0] = rng.integers(0, CELLS, (num_clips, 2))
    steps = rng.integers(-1, 2, (num_clips, num_frames - 1, 2))
    for t in range(1, num_frames):
        pos[:, t] = (pos[:, t - 1] + steps[:, t - 1]) % CELLS
    frames = np.zeros((num_clips, num_frames, size, size, 3), dtype=np.uint8)
    for c in range(num_clips):
        for t in range(num_frames):
            x, y = pos[c, t] * cell
            frames[c, t, y : y + cell, x : x + cell] = 255
    return torch.from_numpy(frames), pos


def test_derangement_moves_every_clip_and_is_seeded():
    for n in (2, 3, 8, 33):
        perm = derangement(n, np.random.default_rng(n))
        assert sorted(perm) == list(range(n)) and not np.any(perm == np.arange(n))
    a, b = derangement(16, np.random.default_rng(7)), derangement(16, np.random.default_rng(7))
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="at least 2 clips"):
        derangement(1, np.random.default_rng(0))


def test_shuffle_summary_and_ratio_on_hand_made_numbers():
    sums = {
        "all": {"own": 2.0, "shuffled": 9.0, "prior_mean": 6.0},
        "event": {"own": 1.0, "shuffled": 4.0, "prior_mean": 5.0},
        "no_event": {"own": 1.0, "shuffled": 5.0, "prior_mean": 1.0},
    }
    out = shuffle_summary(sums, {"all": 4, "event": 2, "no_event": 2})
    assert out["all"] == {"own": 0.5, "shuffled": 2.25, "prior_mean": 1.5, "shuffled_over_prior": 1.5, "count": 4}
    assert out["event"]["shuffled_over_prior"] == pytest.approx(0.8)  # a foreign r beats the prior: below 1
    assert out["no_event"]["shuffled_over_prior"] == pytest.approx(5.0)
    empty = shuffle_summary({"all": {"own": 0.0, "shuffled": 0.0, "prior_mean": 0.0}}, {"all": 0})
    assert empty == {
        "all": {"own": None, "shuffled": None, "prior_mean": None, "shuffled_over_prior": None, "count": 0}
    }
    assert ratio(3.0, 0.0) is None and ratio(None, 1.0) is None and ratio(1.0, 4.0) == 0.25


def test_shuffled_r_hurts_a_model_whose_r_carries_the_step():
    """A tiny AdaSSL-V trained briefly on the jump world, where the predictor can know each transition's random step
    only through r: its own r predicts the next frame better than another clip's r."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two busy cores: one thread is several times faster for a model this small
    try:
        model = _model("adassl_v").train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        rng = np.random.default_rng(0)
        for _ in range(40):
            frames, _ = _jump_clips(16, 4, rng)
            loss = model(frames, beta=0.0, monitor=False)["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        frames, pos = _jump_clips(16, 4, np.random.default_rng(1))
        events = torch.from_numpy((np.abs(np.diff(pos, axis=1)).sum(-1) > 0).astype(np.float32))  # [B, T-1]
        acc = LeakageAccumulator(seed=0)
        with torch.no_grad():
            acc.add(model, model.encode(frames), model.encode_target(frames), events)
    finally:
        torch.set_num_threads(threads)
    result = acc.result()
    assert set(result) == {"all", "event", "no_event"}
    assert result["all"]["count"] == 16 * (3 - SKIP_TRANSITIONS)
    assert result["event"]["count"] + result["no_event"]["count"] == result["all"]["count"]
    everything = result["all"]
    assert everything["shuffled"] > 1.05 * everything["own"]
    assert everything["prior_mean"] > everything["own"]  # r is used at all
    assert everything["shuffled_over_prior"] == pytest.approx(everything["shuffled"] / everything["prior_mean"])


@pytest.mark.parametrize("latent", ["adassl_v", "adassl_s"])
def test_one_step_predictions_match_the_rollout_modes(latent):
    """`own` is rollout mode posterior and `prior_mean` mode prior_mean, one step from the same frames; `shuffled`
    with the identity permutation is `own`."""
    model = _model(latent)
    frames, _ = _jump_clips(3, 4, np.random.default_rng(0))
    with torch.no_grad():
        # make r matter in an untrained model: the output layers start at zero
        torch.nn.init.normal_(model.predictor.out_proj.weight, std=0.5)
        for net in [m for m in model.latent.modules() if isinstance(m, torch.nn.Linear)]:
            torch.nn.init.normal_(net.weight, std=0.5)
        online, target = model.encode(frames), model.encode_target(frames)
        preds = one_step_predictions(model, online, target, torch.arange(3))
        context = 3  # frames 0..2 predict frame 3: the last transition
        for name, mode in (("own", "posterior"), ("prior_mean", "prior_mean")):
            rolled = model.rollout(online[:, :context], 1, mode, future_tokens=target[:, context : context + 1])[0]
            torch.testing.assert_close(preds[name][:, context - 1], rolled[:, 0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(preds["shuffled"], preds["own"])
        assert (preds["own"] - preds["prior_mean"]).abs().max() > 1e-4


def test_one_step_predictions_need_an_inferred_latent():
    model = _model("none")
    frames, _ = _jump_clips(2, 4, np.random.default_rng(0))
    online = model.encode(frames)
    with pytest.raises(ValueError, match="needs an inferred latent"):
        one_step_predictions(model, online, online, torch.tensor([1, 0]))


def _walks(num_clips: int, num_frames: int, rng: np.random.Generator) -> np.ndarray:
    """Random walks of two points: state [C, T, 4] with columns x0, y0, vx0, vy0 (v: the step into the frame)."""
    steps = rng.normal(size=(num_clips, num_frames, 2))
    steps[:, 0] = 0
    pos = rng.normal(scale=3.0, size=(num_clips, 1, 2)) + np.cumsum(steps, axis=1)
    return np.concatenate([pos, steps], axis=-1)


def test_transfer_correlations_on_hand_made_features():
    """Features that are the positions themselves (a probe reads them exactly): r_A applied to B moves B by A's
    step, so the transfer correlation is 1; the prior-mean forecast (no move) tells nothing of A's step."""
    rng = np.random.default_rng(0)
    num_clips, num_frames = 64, 6
    state = _walks(num_clips, num_frames, rng)
    mix = rng.normal(size=(2, 5))  # features: a linear image of the position (5 dims, rank 2)
    features = state[..., :2] @ mix  # [C, T, 5]
    partner = np.concatenate([derangement(8, rng) + 8 * i for i in range(num_clips // 8)])
    step = state[:, 1:, :2] - state[:, :-1, :2]  # [C, T-1, 2] the true step of each transition
    now = state[:, :-1, :2]
    predicted = {
        "own": (now + step) @ mix,
        "shuffled": (now + step[partner]) @ mix,
        "prior_mean": now @ mix,
    }
    fit, test = split_clips(num_clips, 0)
    names = ["x0", "y0", "vx0", "vy0"]
    out = transfer_correlations(features, predicted, partner, state, names, fit, test, ridge=1e-6)
    assert out["names"] == ["x0", "y0"] and out["num_clips"] == len(test)
    assert out["count"] == len(test) * (num_frames - 1 - SKIP_TRANSITIONS)
    for name in ("x0", "y0"):
        assert out["displacement"]["transfer"][name] == pytest.approx(1.0, abs=1e-3)
        assert out["displacement"]["own"][name] == pytest.approx(1.0, abs=1e-3)
        assert out["surprise"]["transfer"][name] == pytest.approx(1.0, abs=1e-3)
        prior = out["displacement"]["prior_mean"][name]
        assert prior is None or abs(prior) < 0.3
    # an r that moves B its own way whatever A did does not transfer
    predicted["shuffled"] = predicted["own"]
    out = transfer_correlations(features, predicted, partner, state, names, fit, test, ridge=1e-6)
    assert all(abs(out["displacement"]["transfer"][n]) < 0.3 for n in ("x0", "y0"))
    assert transfer_correlations(features, predicted, partner, state, ["a", "b", "c", "d"], fit, test, 1e-6) is None


def _batch(frames: torch.Tensor, pos: np.ndarray) -> dict:
    state = torch.from_numpy(pos.astype(np.float32))
    events = torch.from_numpy((np.abs(np.diff(pos, axis=1)).sum(-1) > 0).astype(np.float32))
    return {"frames": frames, "state": state, "state_names": ["x0", "y0"], "events": events}


@pytest.mark.parametrize("latent", ["adassl_v", "adassl_s"])
def test_evaluation_pass_fills_the_leakage_section(latent):
    """process_batch with a LeakageAccumulator (as runner.evaluate_run sets it), then leakage_metrics and the
    report: every field present, one-clip batches left out with a note."""
    model = _model(latent)
    rng = np.random.default_rng(0)
    collected = Collected(errors=ErrorAccumulator(1), leakage=LeakageAccumulator(seed=3, probe_cells=2))
    for size in (4, 1, 3):  # a one-clip batch has nothing to swap with
        frames, pos = _jump_clips(size, 5, rng)
        process_batch(
            model, _batch(frames, pos), collected, num_context=4, horizon=1, num_samples=2, device=torch.device("cpu")
        )
    acc = collected.leakage
    assert acc.num_clips == 8 and acc.unpaired_clips == 1
    partner = acc.partners()
    assert partner[4] == -1 and set(partner[:4]) == {0, 1, 2, 3} and set(partner[5:]) == {5, 6, 7}
    fit, test = split_clips(8, 0)
    section, notes = leakage_metrics(
        acc,
        collected.stacked("target_probe"),
        collected.stacked("state").astype(np.float64),
        collected.names["state_names"],
        fit,
        test,
        ridge=1e-2,
    )
    assert section["num_clips"] == 7 and section["unpaired_clips"] == 1 and section["derangement_seed"] == 3
    assert set(section["shuffle"]) == {"all", "event", "no_event"}
    assert section["shuffle"]["all"]["count"] == 7 * (4 - SKIP_TRANSITIONS)
    assert set(section["shuffle"]["all"]) == {"own", "shuffled", "prior_mean", "shuffled_over_prior", "count"}
    transfer = section["transfer"]
    assert set(transfer["displacement"]) == {"transfer", "own", "prior_mean"}
    assert set(transfer["surprise"]) == {"transfer", "own"} and transfer["names"] == ["x0", "y0"]
    assert any("one-clip batches" in n for n in notes)
    report = render_report(
        {
            "run": "r",
            "checkpoint_step": 0,
            "latent": latent,
            "shards": "s",
            "num_clips": 8,
            "num_context": 4,
            "horizon": 1,
            "num_samples": 2,
            "modes": {},
            "leakage": section,
        }
    )
    assert "## Leakage and transfer of the inferred r" in report and "| shuffled / prior |" in report
    assert "| x0 |" in report
    # without state: the shuffled check alone
    section, notes = leakage_metrics(acc, None, None, None, None, None, ridge=1e-2)
    assert section["transfer"] is None and any("transfer check skipped" in n for n in notes)


def test_latents_without_a_posterior_get_no_leakage_check():
    """none (and the oracle) have no inferred r: the runner builds no accumulator, metrics["leakage"] is null."""
    from worldmodel.eval.sections import run_leakage

    collected = Collected(errors=ErrorAccumulator(1))
    assert run_leakage(collected, None, {"num_clips": 0, "notes": []}, 0) is None
    assert not _model("none").latent.inferred
