"""Rollout metrics, strip retrieval and the step length in seconds on hand-made inputs with known answers."""

import numpy as np
import pytest
import torch

from worldmodel.eval import plots
from worldmodel.eval.collect import grid_pool, pool
from worldmodel.eval.plots import nearest_frames
from worldmodel.eval.rollout_metrics import (
    ErrorAccumulator,
    copy_last,
    pairwise_diversity,
    sample_errors,
    step_errors,
    step_events,
)
from worldmodel.eval.sections import step_length


def test_identical_latents_have_zero_error():
    x = torch.randn(3, 4, 5, 6)
    errors = step_errors(x, x.clone())
    for name in ("l1", "l2", "cos"):
        assert errors[name].shape == (3, 4)
        assert torch.allclose(errors[name], torch.zeros(3, 4), atol=1e-6)


def test_known_errors():
    target = torch.zeros(1, 2, 3, 4)
    pred = torch.full((1, 2, 3, 4), 2.0)
    errors = step_errors(pred, target + torch.tensor([1.0, 0, 0, 0]))
    # |2-1| on one dim and |2-0| on three: mean 1.75; squares: (1 + 3*4)/4 = 3.25
    assert torch.allclose(errors["l1"], torch.full((1, 2), 1.75))
    assert torch.allclose(errors["l2"], torch.full((1, 2), 3.25))
    # pred (2,2,2,2) vs target (1,0,0,0): cos = 2 / (4 * 1) = 0.5
    assert torch.allclose(errors["cos"], torch.full((1, 2), 0.5))
    opposite = step_errors(-pred, pred)["cos"]
    assert torch.allclose(opposite, torch.full((1, 2), 2.0))


def test_copy_last_equals_repeating_the_last_context_frame():
    context = torch.randn(2, 3, 5, 4)
    future = torch.randn(2, 4, 5, 4)
    pred = copy_last(context, 4)
    assert pred.shape == (2, 4, 5, 4)
    expected = (future - context[:, -1:]).abs().mean(dim=(-1, -2))
    assert torch.equal(step_errors(pred, future)["l1"], expected)
    # a static scene: copy-last is exact
    static = context[:, -1:].expand(-1, 4, -1, -1)
    assert step_errors(pred, static)["l1"].abs().max() == 0


def test_best_of_k_beats_mean_of_k_and_finds_the_true_future():
    torch.manual_seed(0)
    target = torch.randn(6, 3, 4, 5)
    samples = target.unsqueeze(0) + torch.randn(5, 6, 3, 4, 5)
    samples[2, 1] = target[1]  # one sample of clip 1 is exact
    by_mode, best = sample_errors(samples, target)
    best_l1 = by_mode["best_of_k"]["l1"].mean(dim=-1)
    mean_l1 = by_mode["mean_of_k"]["l1"].mean(dim=-1)
    assert (best_l1 <= mean_l1 + 1e-7).all()
    assert best[1] == 2
    assert torch.allclose(by_mode["best_of_k"]["l1"][1], torch.zeros(3))
    # mean-of-K is the average error of one sample
    per_sample = torch.stack([step_errors(s, target)["l1"] for s in samples])
    assert torch.allclose(by_mode["mean_of_k"]["l1"], per_sample.mean(0))


def test_diversity_zero_for_identical_samples_and_exact_for_two():
    x = torch.randn(1, 2, 3, 4, 5)
    assert torch.equal(pairwise_diversity(x.expand(4, -1, -1, -1, -1)), torch.zeros(2, 3))
    pair = torch.cat([x, x + 0.5])
    assert torch.allclose(pairwise_diversity(pair), torch.full((2, 3), 0.5))
    three = torch.cat([x, x + 1.0, x + 3.0])  # distances 1, 3, 2 -> mean 2
    assert torch.allclose(pairwise_diversity(three), torch.full((2, 3), 2.0))
    assert torch.equal(pairwise_diversity(x), torch.zeros(2, 3))


def test_step_events_index_the_predicted_transition():
    # 3 context frames (transitions 0, 1 are inside the context), horizon 2 -> transitions 2 and 3
    events = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0]])
    assert step_events(events, num_context=3, horizon=2).tolist() == [[False, True]]
    with pytest.raises(ValueError, match="horizon 4"):
        step_events(events, num_context=3, horizon=4)


def test_accumulator_splits_by_event_and_averages_over_batches():
    acc = ErrorAccumulator(horizon=2)
    ones = {name: torch.ones(2, 2) for name in ("l1", "l2", "cos")}
    threes = {name: torch.full((2, 2), 3.0) for name in ("l1", "l2", "cos")}
    acc.add("m", ones, torch.tensor([[True, False], [False, False]]))
    acc.add("m", threes, torch.tensor([[True, True], [False, False]]))
    res = acc.result()["m"]
    assert res["all"]["l1"] == [2.0, 2.0]
    assert res["event"]["l1"] == [2.0, 3.0]  # step 1: one 1 and one 3; step 2: one 3
    assert res["event"]["count"] == [2, 1]
    assert res["no_event"]["l1"] == [2.0, 5.0 / 3.0]
    acc.add("no_events", ones, None)
    assert set(acc.result()["no_events"]) == {"all"}
    empty = ErrorAccumulator(horizon=1)
    empty.add("m", {name: torch.ones(1, 1) for name in ("l1", "l2", "cos")}, torch.tensor([[False]]))
    assert empty.result()["m"]["event"]["l1"] == [None]


def test_retrieval_uses_the_full_token_grid_not_the_pooled_latent():
    # 4 patches x 2 dims; a bright "object" on one patch of a blank canvas. The query has the object on patch 3.
    # Bank frame 0 has it on patch 0 (same mean over patches as the query: pooled distance 0, wrong place);
    # bank frame 1 has it on patch 3, slightly dimmer (pooled distance > 0, right place).
    query = torch.zeros(1, 4, 2)
    query[0, 3] = 1.0
    bank = torch.zeros(2, 4, 2)
    bank[0, 0] = 1.0
    bank[1, 3] = 0.9
    pooled_pick = torch.cdist(query.mean(dim=1), bank.mean(dim=1)).argmin(dim=1)
    assert pooled_pick.tolist() == [0]  # what retrieval on pooled latents would show
    assert nearest_frames(query, bank).tolist() == [1]
    assert nearest_frames(query, bank.half(), chunk=1).tolist() == [1]  # float16 bank, one frame per chunk


def test_retrieval_matches_brute_force_across_chunks():
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(5, 6, 3, generator=generator)
    bank = torch.randn(11, 6, 3, generator=generator)
    bank[7] = queries[2]  # an exact match must be found
    brute = ((queries[:, None] - bank[None]) ** 2).mean(dim=(2, 3)).argmin(dim=1)
    for chunk in (1, 4, 11, 64):
        assert torch.equal(nearest_frames(queries, bank, chunk=chunk), brute)
    assert nearest_frames(queries, bank)[2] == 7
    with pytest.raises(ValueError, match="token grid"):
        nearest_frames(queries, bank[:, :5])


def test_grid_pool_averages_cells_of_the_patch_grid():
    tokens = torch.arange(16.0).reshape(1, 16, 1)  # a 4x4 grid, one dim: token i holds i (row-major)
    two = grid_pool(tokens, 2)  # [1, 4]: the means of the four 2x2 quadrants
    torch.testing.assert_close(two, torch.tensor([[2.5, 4.5, 10.5, 12.5]]))
    torch.testing.assert_close(grid_pool(tokens, 1), pool(tokens))  # one cell: the plain mean
    torch.testing.assert_close(grid_pool(tokens, 8), tokens.reshape(1, 16))  # more cells than patches: the grid
    with pytest.raises(ValueError, match="square"):
        grid_pool(torch.zeros(1, 12, 2), 2)


def test_step_length_is_frame_step_over_the_median_fps():
    notes = []
    out = step_length(np.array([30.0, 30.0, 30.1]), frame_step=3, horizon=4, num_clips=3, notes=notes)
    assert out["frame_step"] == 3 and out["fps"] == 30.0 and notes == []  # within 1%: no note
    assert out["seconds_per_step"] == pytest.approx(0.1)
    assert out["horizon_seconds"] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    # clips that disagree by more than 1%: still the median, with a note; so are clips without fps
    out = step_length(np.array([25.0, 30.0, 30.0]), frame_step=1, horizon=2, num_clips=5, notes=notes)
    assert out["seconds_per_step"] == pytest.approx(1 / 30) and len(notes) == 2
    assert "disagree (25 to 30)" in notes[0] and "only 3 of 5 clips" in notes[1]
    out = step_length(None, frame_step=2, horizon=2, num_clips=5, notes=notes)
    assert out == {"frame_step": 2, "fps": None, "seconds_per_step": None, "horizon_seconds": None}
    assert "no `fps`" in notes[2]


def test_errors_plot_has_a_seconds_axis_only_when_the_step_length_is_known(monkeypatch, tmp_path):
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    modes = {"copy_last": {"all": {"l1": [0.1, 0.2, 0.3]}, "event": {"l1": [0.2, 0.3, 0.4]}}}
    plots.plot_errors(modes, tmp_path / "errors.png", seconds_per_step=0.5)
    plots.plot_errors(modes, tmp_path / "errors.png")
    with_seconds, without = ([child for ax in fig.axes for child in ax.child_axes] for fig in figures)
    assert len(with_seconds) == 2 and without == []  # one per split panel
    top = with_seconds[0]
    assert top.get_xlabel() == "seconds of video"
    assert [t.get_text() for t in top.get_xticklabels()] == ["0.5", "1", "1.5"]  # steps 1, 2, 3
