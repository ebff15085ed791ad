"""Leakage and transfer checks for inferred latents (model.latent adassl_v / adassl_s): does r carry the transition,
or the clip it came from, or the future frame itself?

The posterior reads the next frame, so a large-capacity r could simply hand the predictor that frame. Two checks
("Latent Action World Models in the Wild", Garrido et al. 2026, test that latent actions transfer and do not leak):

(a) **Shuffled r** (`LeakageAccumulator`, `shuffle_summary`). Every transition t -> t+1 of every clip is predicted one
    step ahead (teacher forced: the predictor reads the clip's true frames 0..t, as in training) with three r's:
    `own` (the posterior mean inferred from this clip's transition t, what rollout mode `posterior` uses),
    `shuffled` (the posterior mean of transition t of another clip of the batch, by a seeded derangement: no clip
    keeps its own) and `prior_mean` (what rollout mode `prior_mean` uses: adassl_v's mu_p, adassl_s's r = 0). Each
    is scored by the L1 against the target encoder's latents of frame t+1 (mean |pred - target| over patches and
    dims: the units of the `l1` of metrics.json's `modes`, the run's normalised targets), per split: all
    transitions, and `event` / `no_event` where the shards flag events. A latent that carries the transition (and
    not what identifies its clip, nor the future frame itself) gives `shuffled` >= `prior_mean`: another clip's
    step is wrong for this clip, while the prior mean is this clip's best guess. `shuffled_over_prior` < 1 says a
    foreign r helps: r carries something common to clips (or the prior mean sits off the posterior's distribution).
(b) **Transfer** (`transfer_correlations`). r inferred on clip A's transition t, applied to clip B's context (B's
    frames up to t: the `shuffled` predictions of (a), A = the clip B's r came from), should move B the way A moved.
    Read with the evaluation's state probe (the ridge pair probe of probe_suite, fitted on encoded true frames of the
    probe's fit clips), per position column of the state (x0, y0, ...): the correlation over B's transitions (B a
    held-out clip) of B's probed displacement, probe(pred_B with r_A) - probe(B's frame t), with A's true
    displacement state_A[t+1] - state_A[t]; beside it the same with B's own r against B's own displacement (upper
    reference) and with the prior mean r against A's displacement (lower reference: what B's forecast shares with
    A's move without A's r). Where the context predicts most of the move (a velocity), the displacement is mostly
    the context's and not r's, so `surprise` also reads the part r adds: the correlation of the shift r_A gives B's
    forecast, probe(pred_B with r_A) - probe(pred_B with prior mean), with A's own surprise, state_A[t+1] -
    probe(pred_A with prior mean) (the prior forecast's error); `own` the same for B's own r against B's surprise.

Transitions 0..MIN_CONTEXT_FRAMES-2 of each clip are left out of both (from frame 0 alone no one knows the velocity,
so r carries it whether or not there was an event: collect.MIN_CONTEXT_FRAMES), as in the latent-action probe.
Shapes: B clips in a batch, C clips in all, T frames per clip, N patches, D latent width, F probe features
(`collect.grid_pool`), S state columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from worldmodel.eval.collect import MIN_CONTEXT_FRAMES, grid_pool
from worldmodel.eval.probe_suite import POSITION_NAME, pair_features, pair_probe

VARIANTS = ("own", "shuffled", "prior_mean")  # the r's of the shuffled-r check (module docstring)
SPLITS = ("all", "event", "no_event")
SKIP_TRANSITIONS = MIN_CONTEXT_FRAMES - 1  # leading transitions of each clip left out (module docstring)
MIN_CORRELATION_ROWS = 3
# a side whose RMS spread is below this fraction of the other's is numerical noise (an r the predictor ignores moves
# its forecast by float rounding), and a correlation with it is not reported
NEGLIGIBLE_SPREAD = 1e-4


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A random permutation of 0..n-1 without fixed points: int64 [n], entry i the clip whose r clip i gets.

    Drawn as one random cycle through all n clips (a shuffled order, each clip taking its successor's r), so every
    clip gets another clip's r and each r is used once. Raises ValueError for n < 2 (nothing to swap with).
    """
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 clips, got {n}")
    order = rng.permutation(n)
    out = np.empty(n, dtype=np.int64)
    out[order] = np.roll(order, -1)
    return out


@torch.no_grad()
def one_step_predictions(model: torch.nn.Module, online: Tensor, target: Tensor, partner: Tensor) -> dict[str, Tensor]:
    """Teacher-forced one-step predictions of every transition of a batch with the three r's of the shuffled check.

    model: a WorldModel with an inferred latent (adassl_v / adassl_s); online: the predictor's inputs
    (`model.encode`) [B, T, N, D]; target: the target latents (`model.encode_target`) [B, T, N, D]; partner: int64
    [B], the clip whose r each clip gets for `shuffled` (`derangement`). Returns {"own", "shuffled", "prior_mean"},
    each the predictions of frames 1..T-1 [B, T-1, N, D]: r = the posterior mean of the clip's own transition t
    (as rollout mode `posterior`), of transition t of clip partner[b], and the prior mean (as mode `prior_mean`).
    """
    if not model.latent.inferred:
        raise ValueError(f"the shuffled-r check needs an inferred latent; latent={model.cfg.latent} has none")
    inputs = online[:, :-1]
    features = model.predictor.trunk_features(inputs)  # [B, T-1, N, P]
    s, s_plus = model.summaries_of(online, target, features)  # [B, T-1, S] each
    b, steps = s.shape[:2]
    own = model.latent.rollout_r("posterior", s.flatten(0, 1), s_plus.flatten(0, 1), None).view(b, steps, -1)
    r = {
        "own": own,
        "shuffled": own[partner.to(own.device)],
        "prior_mean": model.latent.prior_mean_r(features, model.summaries),
    }
    return {name: model.predictor.from_features(features, value.to(inputs.dtype), inputs) for name, value in r.items()}


def transition_l1(pred: Tensor, target: Tensor) -> Tensor:
    """Per-transition L1: mean |pred - target| over patches and dims, [B, T', N, D] -> float32 [B, T']."""
    return (pred.float() - target.float()).abs().mean(dim=(-2, -1))


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return float(numerator / denominator)


@dataclass
class LeakageAccumulator:
    """The shuffled-r check summed over the eval batches, and what the transfer check needs from them.

    Call `add` once per batch, in the order the evaluation collects its clips (so that clip c here is clip c of
    `Collected`). `seed` seeds the derangements; `probe_cells` is eval.probe_grid (the probes' pooling).
    """

    seed: int = 0
    probe_cells: int = 4
    sums: dict[str, dict[str, float]] = field(default_factory=dict)  # split -> variant -> summed L1
    counts: dict[str, int] = field(default_factory=dict)  # split -> transitions
    # variant -> [B, T-1, F] per batch: probe features (grid_pool) of the one-step predictions, kept when the batch
    # has a state (the transfer check reads them)
    pooled: dict[str, list[np.ndarray]] = field(default_factory=dict)
    partner: list[np.ndarray] = field(default_factory=list)  # [B] per batch: global clip index of r's clip, -1 none
    num_clips: int = 0
    unpaired_clips: int = 0  # clips of one-clip batches: no other clip to take r from, left out
    rng: np.random.Generator | None = None

    def add(
        self,
        model: torch.nn.Module,
        online: Tensor,
        target: Tensor,
        events: Tensor | None = None,
        keep_features: bool = False,
    ) -> None:
        """Add one batch: online, target [B, T, N, D] (as in `one_step_predictions`); events [B, T-1] 0/1 per
        transition or None; keep_features: keep the probe features of the predictions for the transfer check."""
        if self.rng is None:
            self.rng = np.random.default_rng(self.seed)
        b = online.shape[0]
        start = self.num_clips
        self.num_clips += b
        if b < 2:  # nothing to swap with: the clip is left out of both checks
            self.unpaired_clips += b
            self.partner.append(np.full(b, -1, dtype=np.int64))
            if keep_features:  # placeholders that keep clip c at row c (never read: partner -1)
                for name in VARIANTS:
                    shape = (b, online.shape[1] - 1, self._num_features(online))
                    self.pooled.setdefault(name, []).append(np.zeros(shape, dtype=np.float32))
            return
        local = derangement(b, self.rng)
        self.partner.append(local + start)
        preds = one_step_predictions(model, online, target, torch.from_numpy(local))
        truth = target[:, 1:]
        skip = SKIP_TRANSITIONS
        masks = {"all": torch.ones(b, truth.shape[1] - skip, dtype=torch.bool)}
        if events is not None:
            flags = events[:, skip:].cpu() > 0.5
            masks.update(event=flags, no_event=~flags)
        for name, pred in preds.items():
            errors = transition_l1(pred[:, skip:], truth[:, skip:]).cpu()
            for split, mask in masks.items():
                self.sums.setdefault(split, {}).setdefault(name, 0.0)
                self.sums[split][name] += float(errors[mask].double().sum())
            if keep_features:
                self.pooled.setdefault(name, []).append(grid_pool(pred, self.probe_cells).cpu().numpy())
        for split, mask in masks.items():
            self.counts[split] = self.counts.get(split, 0) + int(mask.sum())

    def _num_features(self, tokens: Tensor) -> int:
        return grid_pool(tokens[:1, :1], self.probe_cells).shape[-1]

    def stacked(self, name: str) -> np.ndarray | None:
        """The probe features of one variant's predictions over all clips, [C, T-1, F], or None if not kept for
        every clip."""
        parts = self.pooled.get(name, [])
        if sum(len(p) for p in parts) != self.num_clips:
            return None
        return np.concatenate(parts)

    def partners(self) -> np.ndarray:
        """int64 [C]: for each clip the (global) clip whose r it got in `shuffled`, -1 for an unpaired clip."""
        return np.concatenate(self.partner) if self.partner else np.zeros(0, dtype=np.int64)

    def result(self) -> dict:
        """`shuffle_summary` of the sums so far: {split: {"own", "shuffled", "prior_mean", "shuffled_over_prior",
        "count"}}."""
        return shuffle_summary(self.sums, self.counts)


def shuffle_summary(sums: dict[str, dict[str, float]], counts: dict[str, int]) -> dict[str, dict]:
    """The shuffled-r table from summed per-transition L1s: sums {split: {variant: total}}, counts {split: n}.

    Returns {split: {"own": L1, "shuffled": L1, "prior_mean": L1, "shuffled_over_prior": ratio, "count": n}} for
    the splits in SPLITS that were added; a split without transitions has None in place of each number.
    """
    out = {}
    for split in SPLITS:
        if split not in counts:
            continue
        n = counts[split]
        entry: dict = {name: (sums[split][name] / n if n else None) for name in VARIANTS}
        entry["shuffled_over_prior"] = ratio(entry["shuffled"], entry["prior_mean"])
        entry["count"] = n
        out[split] = entry
    return out


def _correlation(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson correlation of x and y [n]; None for fewer than MIN_CORRELATION_ROWS rows, or a side that is
    constant or negligible against the other (spread below NEGLIGIBLE_SPREAD times the other's; same units)."""
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < MIN_CORRELATION_ROWS:
        return None
    x, y = x - x.mean(), y - y.mean()
    sx, sy = np.sqrt((x * x).sum()), np.sqrt((y * y).sum())
    if min(sx, sy) <= NEGLIGIBLE_SPREAD * max(sx, sy) or max(sx, sy) <= 1e-12:
        return None
    return float((x * y).sum() / (sx * sy))


def transfer_correlations(
    target_probe: np.ndarray,
    predicted: dict[str, np.ndarray],
    partner: np.ndarray,
    state: np.ndarray,
    state_names: list[str],
    fit: np.ndarray,
    test: np.ndarray,
    ridge: float,
    skip: int = SKIP_TRANSITIONS,
) -> dict | None:
    """The transfer check (module docstring, (b)): correlations per position column of the probed displacement.

    target_probe: probe features of the true frames' target latents [C, T, F]; predicted: {"own", "shuffled",
    "prior_mean"} probe features of the one-step predictions of frames 1..T-1 [C, T-1, F] (`shuffled` of clip B
    made with the r of clip partner[B]); partner: int64 [C] (-1: clip left out); state: [C, T, S]; fit, test: clip
    indices of the probe split (the probe is fitted on the fit clips' true frames; B runs over the test clips);
    skip: leading transitions left out (at least 1: the pair probe reads frame t-1).

    Returns None when no state column is a position (POSITION_NAME), else {"names": [...], "num_clips": clips B,
    "count": transitions, "displacement": {"transfer" | "own" | "prior_mean": {name: corr}}, "surprise":
    {"transfer" | "own": {name: corr}}} with a correlation None where it cannot be computed (fewer than 3
    transitions, or a side constant or negligible against the other: an r the predictor ignores).
    """
    positions = [i for i, name in enumerate(state_names) if POSITION_NAME.match(name)]
    if not positions:
        return None
    skip = max(skip, 1)
    probe = pair_probe(target_probe, state, fit, ridge)
    clips = np.array([c for c in np.asarray(test) if partner[c] >= 0], dtype=np.int64)
    num_frames = target_probe.shape[1]

    def read(features: np.ndarray) -> np.ndarray:  # [..., 2F] -> [..., S]
        return probe.predict(features.reshape(-1, features.shape[-1])).reshape(*features.shape[:-1], -1)

    # transitions t = skip..T-2 of every clip: the probe's state at t (frames t-1, t) and at t+1 per prediction
    steps = np.arange(skip, num_frames - 1)
    now = read(pair_features(target_probe)[:, steps - 1])  # [C, T', S]
    nxt = {
        name: read(np.concatenate([target_probe[:, steps], feats[:, steps]], axis=-1))  # [C, T', S]
        for name, feats in predicted.items()
    }
    moved = state[:, steps + 1] - state[:, steps]  # true displacement [C, T', S]
    surprise = state[:, steps + 1] - nxt["prior_mean"]  # what the prior forecast misses [C, T', S]
    a = partner[clips]

    def corr(x: np.ndarray, y: np.ndarray) -> dict[str, float | None]:
        return {state_names[i]: _correlation(x[..., i].ravel(), y[..., i].ravel()) for i in positions}

    def shift(name: str) -> np.ndarray:
        return nxt[name][clips] - now[clips]

    return {
        "names": [state_names[i] for i in positions],
        "num_clips": len(clips),
        "count": len(clips) * len(steps),
        "displacement": {
            "transfer": corr(shift("shuffled"), moved[a]),
            "own": corr(shift("own"), moved[clips]),
            "prior_mean": corr(shift("prior_mean"), moved[a]),
        },
        "surprise": {
            "transfer": corr(nxt["shuffled"][clips] - nxt["prior_mean"][clips], surprise[a]),
            "own": corr(nxt["own"][clips] - nxt["prior_mean"][clips], surprise[clips]),
        },
    }


def leakage_metrics(
    acc: LeakageAccumulator,
    target_probe: np.ndarray | None,
    state: np.ndarray | None,
    state_names: list[str] | None,
    fit: np.ndarray | None,
    test: np.ndarray | None,
    ridge: float,
) -> tuple[dict, list[str]]:
    """metrics.json's `leakage` section and notes: {"derangement_seed", "skipped_transitions", "num_clips",
    "unpaired_clips", "shuffle": `shuffle_summary`, "transfer": `transfer_correlations` or None}.

    target_probe [C, T, F], state [C, T, S] and the probe split (fit, test) come from the evaluation; transfer is
    None (with a note) without state, without position columns, or without a probe split (too few clips).
    """
    notes = []
    transfer = None
    predicted = {name: acc.stacked(name) for name in VARIANTS}
    if state is None or fit is None or any(p is None for p in predicted.values()):
        notes.append("leakage: no state for every clip (or too few clips to fit the probe): transfer check skipped")
    else:
        names = state_names or [f"state{i}" for i in range(state.shape[-1])]
        transfer = transfer_correlations(target_probe, predicted, acc.partners(), state, names, fit, test, ridge)
        if transfer is None:
            notes.append("leakage: no state column is a position (x, y, x0, y0, ...): transfer check skipped")
    if acc.unpaired_clips:
        notes.append(
            f"leakage: {acc.unpaired_clips} clip(s) of one-clip batches have no other clip to take r from and are "
            "left out of the shuffled-r and transfer checks"
        )
    out = {
        "derangement_seed": acc.seed,
        "skipped_transitions": SKIP_TRANSITIONS,
        "num_clips": acc.num_clips - acc.unpaired_clips,
        "unpaired_clips": acc.unpaired_clips,
        "shuffle": acc.result(),
        "transfer": transfer,
    }
    return out, notes
