"""Honest scores: the energy score of sampled futures, the spread-skill ratio, the noise-matched best-of-K baseline of
a deterministic model and the no-event-so-far split, on hand-made numbers with known answers."""

import math

import pytest
import torch

from worldmodel.eval.collect import Collected, process_batch
from worldmodel.eval.compare import headline, render_headline
from worldmodel.eval.report import render_report
from worldmodel.eval.rollout_metrics import (
    ErrorAccumulator,
    energy_score,
    ensemble_spread,
    forecast_errors,
    loo_error_std,
    no_event_so_far,
    sample_errors,
    step_errors,
    step_events,
)


def test_energy_score_of_a_deterministic_forecast_is_its_rms_error():
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 5, 6, generator=gen), torch.randn(3, 4, 5, 6, generator=gen)
    rms = (pred - target).flatten(-2).norm(dim=-1) / math.sqrt(5 * 6)  # [B, H]
    torch.testing.assert_close(energy_score(pred.unsqueeze(0), target), rms)
    torch.testing.assert_close(energy_score(pred.expand(7, -1, -1, -1, -1), target), rms)  # K equal copies
    torch.testing.assert_close(forecast_errors(pred, target)["energy_score"], step_errors(pred, target)["l2"].sqrt())
    # the same on pixel frames [..., h, w, c]
    frames, truth = torch.rand(2, 3, 8, 8, 3, generator=gen), torch.rand(2, 3, 8, 8, 3, generator=gen)
    mse = (frames - truth).square().mean(dim=(-3, -2, -1))
    torch.testing.assert_close(energy_score(frames.unsqueeze(0), truth, frame_dims=3), mse.sqrt())


def test_the_unbiased_pair_term_is_exact_on_a_hand_computed_example():
    # one clip, one step, a frame of one patch x 2 dims; three futures on a line, truth at the origin
    samples = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]]).reshape(3, 1, 1, 1, 2)
    target = torch.zeros(1, 1, 1, 2)
    # E||X - y|| = (0 + 5 + 10) / 3 = 5; pairs: 5, 10, 5 -> sum over i != j = 40, / (2 K (K-1)) = 40 / 12
    expected = (5.0 - 40.0 / 12.0) / math.sqrt(2)  # the norm divided by sqrt(N D)
    assert energy_score(samples, target).item() == pytest.approx(expected, rel=1e-6)
    # not the biased V-statistic (1 / (2 K^2) over all pairs, i = j included)
    assert energy_score(samples, target).item() != pytest.approx((5.0 - 40.0 / 18.0) / math.sqrt(2), rel=1e-3)
    # scalar futures 0, 1, 3 against 2: (2 + 1 + 1) / 3 - (1 + 3 + 2) * 2 / 12 = 1/3
    scalar = torch.tensor([0.0, 1.0, 3.0]).reshape(3, 1, 1, 1, 1)
    assert energy_score(scalar, torch.full((1, 1, 1, 1), 2.0)).item() == pytest.approx(1.0 / 3.0, rel=1e-6)


def test_energy_score_prefers_the_true_distribution():
    """Truth and futures from N(0, I): the true ensemble scores lower than a biased, an over-dispersed and an
    under-dispersed one (strict propriety, numerically: 20,000 clips, fixed seed, margins far above the noise)."""
    gen = torch.Generator().manual_seed(0)
    clips, k, dims = 20000, 8, 8
    truth = torch.randn(clips, 1, 1, dims, generator=gen)
    draws = torch.randn(k, clips, 1, 1, dims, generator=gen)
    scores = {
        name: energy_score(samples, truth).mean().item()
        for name, samples in (
            ("true", draws),
            ("biased", draws + 0.5),
            ("over-dispersed", 1.5 * draws),
            ("under-dispersed", 0.6 * draws),
            ("point", torch.zeros_like(draws[:1])),  # the mean as a deterministic forecast
        )
    }
    for name, value in scores.items():
        if name != "true":
            assert scores["true"] < value - 0.01, scores
    # best_of_k and mean_of_k carry the whole ensemble's ES; one sampled future alone scores its RMS error, worse
    by_mode, _ = sample_errors(draws, truth)
    for mode in ("best_of_k", "mean_of_k"):
        assert by_mode[mode]["energy_score"].mean().item() == pytest.approx(scores["true"], rel=1e-6)
    assert energy_score(draws[:1], truth).mean().item() > scores["true"] + 0.5


def test_spread_skill_reads_one_for_a_calibrated_ensemble():
    gen = torch.Generator().manual_seed(1)
    truth = torch.randn(4000, 1, 2, 3, generator=gen)
    draws = torch.randn(4, 4000, 1, 2, 3, generator=gen)  # K = 4: the finite-ensemble factor matters
    ratios = {}
    for name, samples in (("true", draws), ("narrow", 0.5 * draws), ("wide", 2.0 * draws)):
        acc = ErrorAccumulator(1)
        acc.add("m", sample_errors(samples, truth)[0]["mean_of_k"], None)
        ratios[name] = acc.result()["m"]["all"]["spread_skill"][0]
        assert "spread_sq" not in acc.result()["m"]["all"]  # the squares are reported as their ratio only
    assert ratios["true"] == pytest.approx(1.0, abs=0.03)
    assert ratios["narrow"] < 0.7 and ratios["wide"] > 1.3
    # without the factor sqrt((K+1)/(K-1)) the true ensemble would read sqrt(3/5) = 0.77
    squares = ensemble_spread(draws, truth)
    assert squares["spread_sq"].shape == (4000, 1)
    with pytest.raises(ValueError, match="K >= 2"):
        ensemble_spread(draws[:1], truth)


def test_no_event_so_far_split_on_a_hand_made_clip():
    # 4 context frames: step h (1-based) is produced by transition 3 + h - 1. Clip 0: an event at transition 5
    # (step 3): per transition only step 3 is an event; so far, steps 3, 4, 5 are out. Clip 1: the event at
    # transition 1 is inside the context and counts for neither. Clip 2: an event at step 1 rules out every step.
    events = torch.zeros(3, 9)
    events[0, 5] = 1.0
    events[1, 1] = 1.0
    events[2, 3] = 1.0
    step_event = step_events(events, num_context=4, horizon=5)
    assert step_event[0].tolist() == [False, False, True, False, False]
    so_far = no_event_so_far(step_event)
    assert so_far.tolist() == [[True, True, False, False, False], [True] * 5, [False] * 5]
    acc = ErrorAccumulator(horizon=5)
    acc.add("m", {name: torch.arange(3.0)[:, None].expand(3, 5) for name in ("l1", "l2", "cos")}, step_event)
    result = acc.result()["m"]
    assert result["no_event_so_far"]["count"] == [2, 2, 1, 1, 1]
    assert result["no_event_so_far"]["l1"] == [0.5, 0.5, 1.0, 1.0, 1.0]  # the clips' values are 0, 1, 2
    assert result["no_event"]["count"] == [2, 3, 2, 3, 3]  # the per-transition split, unchanged
    assert set(result) == {"all", "event", "no_event", "no_event_so_far"}


def test_leave_one_out_std_equals_the_std_of_the_other_clips():
    gen = torch.Generator().manual_seed(2)
    errors, extra = torch.randn(5, 2, 3, 4, generator=gen), torch.randn(3, 2, 3, 4, generator=gen)
    std = loo_error_std(errors)
    for c in range(5):
        others = torch.cat([errors[:c], errors[c + 1 :]])
        torch.testing.assert_close(std[c], others.std(dim=0))
        torch.testing.assert_close(loo_error_std(errors, extra)[c], torch.cat([others, extra]).std(dim=0))
    with pytest.raises(ValueError, match="3 clips"):
        loo_error_std(errors[:2])


class _ZeroForecast(torch.nn.Module):
    """A deterministic `none`-like model on 2x2-pixel, one-channel frames: a frame's latent is its pixels (N = 4
    patches, D = 1), and it always forecasts zeros."""

    class latent:  # noqa: N801 (the model's latent module, as the evaluator reads it)
        eval_modes = (("prediction", "prior_mean"),)
        aliases = {"prior_mean": "prediction"}
        sampled = False
        readouts = None

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        return frames.float()[..., 0].flatten(-2).unsqueeze(-1)  # [B, T, 4, 1]

    encode_target = encode

    def rollout(self, context: torch.Tensor, horizon: int, mode: str, **kwargs) -> torch.Tensor:
        b, _, n, d = context.shape
        return torch.zeros(1, b, horizon, n, d)


def _zero_forecast_metrics() -> tuple[dict, Collected]:
    """Four clips of 6 frames (4 context, horizon 2); only clip 0 changes (its future frames are 10), and only clip
    0 has an event (at its first predicted transition)."""
    frames = torch.zeros(4, 6, 2, 2, 1, dtype=torch.uint8)
    frames[0, 4:] = 10
    events = torch.zeros(4, 5)
    events[0, 3] = 1.0
    out = Collected(errors=ErrorAccumulator(2))
    process_batch(
        _ZeroForecast(),
        {"frames": frames, "events": events},
        out,
        num_context=4,
        horizon=2,
        num_samples=6,
        device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(0),
    )
    return out.errors.result(), out


def test_noisy_best_of_k_fits_its_noise_on_other_clips():
    """Clip 0 is the only one with an error, so its noise, fitted on the three other clips (all exact), is zero:
    its K noisy futures are its forecast, and best-of-K and the ES give exactly the forecast's error (10). A std
    fitted on the scored clips would include clip 0's own error (std 5 per element) and move both."""
    modes, out = _zero_forecast_metrics()
    assert {"copy_last", "prediction", "prior_mean", "noisy_best_of_k"} == set(modes)
    noisy = modes["noisy_best_of_k"]["event"]  # clip 0 alone
    assert noisy["count"] == [1, 0]
    assert noisy["l1"][0] == pytest.approx(10.0) and noisy["energy_score"][0] == pytest.approx(10.0)
    assert modes["prediction"]["event"]["energy_score"][0] == pytest.approx(10.0)
    # the exact clips got clip 0's spread as noise: a nonzero error, and an ES above their forecast's 0
    assert modes["noisy_best_of_k"]["no_event"]["l1"][0] > 1.0
    assert modes["noisy_best_of_k"]["no_event"]["energy_score"][0] > 0.5
    # what a fit on the scored clips would have given clip 0 instead: std 5 per element, not 0
    errors = -out.last_errors  # the forecast's errors, pred - target, of this batch: [4, 2, 4, 1]
    assert errors[1:].abs().max() == 0 and errors.std(dim=0).min().item() == pytest.approx(5.0)
    assert loo_error_std(out.last_errors)[0].abs().max() == 0
    # every mode carries the energy score; the K-future mode also the spread-skill ratio
    for entry in modes.values():
        assert all("energy_score" in entry[split] for split in entry)
    assert "spread_skill" in modes["noisy_best_of_k"]["all"] and "spread_skill" not in modes["prediction"]["all"]
    assert modes["copy_last"]["all"]["energy_score"][0] == pytest.approx(10.0 / 4)  # clip 0's 10, three exact clips


def test_report_and_compare_show_the_energy_score_and_the_new_split():
    modes, _ = _zero_forecast_metrics()
    metrics = {
        "run": "r",
        "checkpoint_step": 1,
        "latent": "none",
        "shards": "s",
        "num_clips": 4,
        "num_context": 4,
        "horizon": 2,
        "num_samples": 6,
        "modes": modes,
        "diversity": None,
    }
    report = render_report(metrics)
    assert "### Energy score, no-event-so-far steps" in report and "### L1, no-event-so-far steps" in report
    assert "`noisy_best_of_k`" in report and "Spread-skill" in report
    head = headline(["r"], [{**metrics, "probes": {}, "latent_action": None}])
    rows = {row["mode"]: row for row in head["rows"]}
    assert set(rows) == {"prior_mean", "noisy_best_of_k"}
    assert rows["prior_mean"]["energy_score"]["event"] == [pytest.approx(10.0)]
    assert "ES kicked (h1)" in render_headline(head)
