"""Collapse monitors on embeddings (collapse is real at small scale, and a falling loss hides it).

All functions take embeddings [M, D] (M samples) and return a 0-dim float32 tensor; they run without gradient and
in float32 whatever the autocast state.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def per_dim_std(x: Tensor) -> Tensor:
    """x: [M, D] -> mean over dims of the per-dimension standard deviation across samples (0 when collapsed)."""
    return x.detach().float().std(dim=0, unbiased=False).mean()


@torch.no_grad()
def effective_rank(x: Tensor, eps: float = 1e-12) -> Tensor:
    """x: [M, D] -> exp(entropy of the normalised singular values) (RankMe), in [1, min(M, D)].

    A constant embedding gives 1; isotropic embeddings give about min(M, D); NaN if x holds a non-finite value (the
    SVD would fail, and the trainer finds a divergence only at its next check step; checking here would wait for the
    device).
    """
    x = x.detach().float()
    finite = torch.isfinite(x)
    with torch.autocast(device_type=x.device.type, enabled=False):
        s = torch.linalg.svdvals(torch.where(finite, x, 0.0))
    p = s / (s.sum() + eps) + eps
    return torch.where(finite.all(), torch.exp(-(p * torch.log(p)).sum()), torch.nan)


@torch.no_grad()
def batch_variance(x: Tensor) -> Tensor:
    """x: [..., D] -> variance across all leading positions per dim, averaged over dims (0 when collapsed)."""
    return x.detach().float().reshape(-1, x.shape[-1]).var(dim=0, unbiased=False).mean()


TARGET_HEALTH_KEYS = ("target_var", "target_eff_rank", "drift")  # what `target_health` returns


@torch.no_grad()
def target_health(target: Tensor) -> dict[str, Tensor]:
    """The targets' collapse and drift monitors from a clip batch of targets [B, T, N, D] (T >= 2).

    - `target_var`: batch variance per dim, averaged over dims (0 when collapsed);
    - `target_eff_rank`: effective rank of the targets' rows [B*T*N, D] (1 when collapsed, up to D);
    - `drift`: copy-last squared error over the target variance, mean((z_{t+1} - z_t)^2) / target_var: 0 when
      nothing changes, 2 when consecutive frames are as unrelated as random pairs, above 2 when anti-correlated.
      A target space that drifts away from the motion shows here as a rising ratio.
    """
    x = target.detach().float()
    var = batch_variance(x)
    step_sq = (x[:, 1:] - x[:, :-1]).pow(2).mean()
    return {
        "target_var": var,
        "target_eff_rank": effective_rank(x.reshape(-1, x.shape[-1])),
        "drift": step_sq / var.clamp_min(1e-12),
    }


class HealthWatch:
    """Warns, once each, when the logged target monitors (see `target_health`) show collapse or drift.

    - collapse: `target_eff_rank` below `min_rank_share` of the target width `dim`;
    - drift: `drift` above `max_drift_growth` x its value at the first log at or after step `reference_step`
      (the target space moving away from the motion);
    - static: `drift` below `min_drift` at or after `reference_step`: consecutive frames' targets are nearly equal,
      so copy-last is almost free and the embedding likely holds the static scene (a textured background) but not
      what moves. The rank can look healthy meanwhile (backgrounds differ between videos), and the loss is low.
    `check(step, scalars)` returns the warning lines to print (empty when healthy).
    """

    def __init__(
        self,
        dim: int,
        min_rank_share: float = 0.1,
        max_drift_growth: float = 2.0,
        reference_step: int = 100,
        min_drift: float = 0.02,
    ) -> None:
        self.dim = dim
        self.min_drift = min_drift
        self.min_rank_share = min_rank_share
        self.max_drift_growth = max_drift_growth
        self.reference_step = reference_step
        self.reference_drift: float | None = None
        self.warned: set[str] = set()

    def check(self, step: int, scalars: dict[str, float]) -> list[str]:
        """Warnings for the monitors logged at `step` (keys target_eff_rank, drift; absent keys are skipped)."""
        out = []
        rank, drift = scalars.get("target_eff_rank"), scalars.get("drift")
        if rank is not None and rank < self.min_rank_share * self.dim and "collapse" not in self.warned:
            self.warned.add("collapse")
            out.append(
                f"warning: step {step}: target effective rank {rank:.1f} of {self.dim} dims (< "
                f"{self.min_rank_share:.0%}): the targets are collapsing; check the EMA schedule "
                "(model.ema_start, model.ema_end)"
            )
        if drift is not None and step >= self.reference_step and drift < self.min_drift and "static" not in self.warned:
            self.warned.add("static")
            out.append(
                f"warning: step {step}: drift (copy-last error / target variance) {drift:.4f} < {self.min_drift:g}: "
                "consecutive frames' targets are nearly equal, so the embedding likely ignores what moves (a static "
                "background dominates it) and the model can only copy the last frame; check the state probes and "
                "the rollout error against copy-last in the evaluation"
            )
        if drift is not None and self.reference_drift is None and step >= self.reference_step:
            self.reference_drift = drift
        elif (
            drift is not None
            and self.reference_drift
            and "drift" not in self.warned
            and drift > self.max_drift_growth * self.reference_drift
        ):
            self.warned.add("drift")
            out.append(
                f"warning: step {step}: drift (copy-last error / target variance) {drift:.3f} is more than "
                f"{self.max_drift_growth:g}x its value {self.reference_drift:.3f} at step {self.reference_step}: "
                "consecutive frames' targets are moving apart"
            )
        return out
