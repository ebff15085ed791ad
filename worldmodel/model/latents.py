"""The latent variable r of AdaSSL: where it is inferred from, how it is regularised, how it is drawn in rollouts.

Per transition t -> t+1 (the two summaries are built in worldmodel/model/summaries.py):

- the context summary s_t comes from the predictor trunk's output at t, which has seen all frames <= t, layer-normed
  per token, attention-pooled over patches and projected;
- the target summary s+_{t+1} comes from the EMA target encoder's normalised tokens x+ of frame t+1 and from how
  they differ from the predictor's inputs x_t and x_{t-1} (per token [x+, x+ - x_t, x+ - 2 x_t + x_{t-1}]: where
  the frame is, how far it moved, how much that move differs from the last one), pooled and projected (all without
  gradient);
- `adassl_v`: posterior q(r | s, s+) and conditional prior p(r | s), diagonal Gaussians, sigma = softplus + 1e-6,
  reparameterised sample, regulariser KL(q || p) summed over the d_r dims (+ model.prior_anchor times
  KL(p || N(0, SIGMA_INIT^2)), which anchors the prior);
- `adassl_s`: one MLP on [s, s+] gives mask logits l and values v; m ~ Bernoulli(sigmoid(l)) by logistic noise and
  a hard threshold with straight-through gradients; r = m * v; regulariser sum_i sigmoid(l_i). There is no learned
  prior: `prior_mean` gives r = 0 (no dimension active), `prior_sample` draws the mask from the running marginal
  activation rate of each dimension and the values from a running Gaussian fit of v (both updated in training);
- `oracle`: r is a linear embedding of the transition's action.

Regularisers are returned per transition, [B, T-1]; the model averages them over batch and transitions.

One interface. Every kind of latent (`NoLatent` for `none`, `VariationalLatent`, `SparseLatent`, `OracleLatent`) is a
`Latent`: it says which rollout modes it offers and which ones the evaluator reports, gives r for a training step
(`train_r`) and for one rollout step (`step_r`), its regulariser, and its read-outs for the latent-action probe.
`build_latent` picks the class by `model.latent`; WorldModel, the trainer and the evaluator hold no branch on the
name, so a fifth latent is one more class here (and its name in config.Latent).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from worldmodel.model.config import ModelConfig
from worldmodel.model.distributions import gaussian_kl, straight_through_bernoulli
from worldmodel.model.summaries import Summaries, summaries_of

SIGMA_MIN = 1e-6
# Initial sigma of posterior and prior. With sigma ~0.7 (softplus of a fresh layer's output) the sample r is mostly
# noise, the zero-initialised conditioning learns to ignore it and r is never used; a small start lets the
# posterior mean's information through from the first steps.
SIGMA_INIT = 0.1
STATS_MOMENTUM = 0.99  # running marginal statistics of adassl_s (rate and values), used by its prior_sample


def mlp(dim_in: int, hidden: int, dim_out: int) -> nn.Sequential:
    """Linear -> GELU -> Linear."""
    return nn.Sequential(nn.Linear(dim_in, hidden), nn.GELU(), nn.Linear(hidden, dim_out))


ROLLOUT_MODES = ("prior_mean", "prior_sample", "posterior", "zero", "action")


class Latent(nn.Module):
    """What the model, the trainer and the evaluator ask of a kind of latent r (see the module docstring).

    Class attributes: `name` (model.latent); `modes`, the rollout modes `WorldModel.rollout` accepts; `eval_modes`,
    (name in metrics.json, rollout mode) of the deterministic rollouts the evaluator reports; `aliases`, extra
    metrics names filed with the numbers of another (so every run has a `prior_mean` row); `train_rollout_mode`,
    the mode of the training rollout term; `conditions`, whether the predictor is conditioned on r; `inferred`,
    whether r is inferred from the frames (needs the summaries); `sampled`, whether rollouts can draw K different
    futures; `needs_actions`, whether training and rollouts need the batch's actions; `readouts`, what the
    latent-action probe reads from `posterior_stats` ({"features": (headline, ...), "detector": name}) or None.
    """

    name: ClassVar[str]
    modes: ClassVar[tuple[str, ...]]
    eval_modes: ClassVar[tuple[tuple[str, str], ...]]
    aliases: ClassVar[dict[str, str]] = {}
    train_rollout_mode: ClassVar[str]
    conditions: ClassVar[bool] = True
    inferred: ClassVar[bool] = False
    sampled: ClassVar[bool] = False
    needs_actions: ClassVar[bool] = False
    readouts: ClassVar[dict | None] = None
    r_is: ClassVar[str] = "inferred from the transition"

    @classmethod
    def build(cls, cfg: ModelConfig) -> Latent:
        """The module from the model config (its widths)."""
        return cls(cfg.summary_dim, cfg.latent_dim)

    def train_r(
        self, features: Tensor, inputs: Tensor, target: Tensor, action: Tensor | None, summaries: Summaries | None
    ) -> tuple[Tensor | None, dict[str, Tensor], dict[str, Tensor]]:
        """r [B, T-1, d_r] (or None) for a training step, its loss terms ({"reg": scalar, ...}) and monitors.

        features: the predictor trunk's output for frames 0..T-2 [B, T-1, N, P]; inputs: the predictor's inputs, the
        tokens of frames 0..T-2 [B, T-1, N, D]; target: target tokens [B, T, N, D]; action: [B, T-1, A] or None;
        summaries: the model's Summaries (inferred latents) or None.
        """
        raise NotImplementedError

    def step_r(
        self,
        mode: str,
        features: Tensor,
        inputs: Tensor,
        future: Tensor | None,
        action: Tensor | None,
        summaries: Summaries | None,
        generator: torch.Generator | None,
    ) -> Tensor | None:
        """r [B', d_r] (or None) for the next rollout step, given the trunk features of the sequence so far
        [B', L, N, P], that sequence (the predictor's inputs) [B', L, N, D], the true next target tokens future
        [B', 1, N, D] (mode posterior) and the transition's action [B', A] (mode action)."""
        raise NotImplementedError

    def posterior_stats(self, s: Tensor, s_plus: Tensor) -> dict[str, Tensor]:
        """Per-transition statistics of the inferred r from summaries s, s+ [B, T-1, S] (inferred latents only)."""
        raise ValueError(f"latent={self.name} has no inferred r; its r is {self.r_is}")


class NoLatent(Latent):
    """Plain JEPA (`none`): no r; the predictor is deterministic and every rollout mode gives the same future."""

    name = "none"
    modes = ROLLOUT_MODES  # accepted and ignored
    eval_modes = (("prediction", "prior_mean"),)
    aliases = {"prior_mean": "prediction"}
    train_rollout_mode = "zero"
    conditions = False
    r_is = "absent"

    @classmethod
    def build(cls, cfg: ModelConfig) -> Latent:
        return cls()

    def train_r(self, features, inputs, target, action, summaries):
        return None, {"reg": target.new_zeros(())}, {}

    def step_r(self, mode, features, inputs, future, action, summaries, generator):
        return None


class _InferredLatent(Latent):
    """Shared by AdaSSL-V and -S: r inferred from the summaries s (context) and s+ (target) of each transition."""

    modes = ("prior_mean", "prior_sample", "posterior", "zero")
    eval_modes = (("prior_mean", "prior_mean"), ("posterior", "posterior"), ("zero", "zero"))
    train_rollout_mode = "posterior"
    inferred = True
    sampled = True

    def train_r(self, features, inputs, target, action, summaries):
        out = self(*summaries_of(summaries, features, inputs, target))
        terms = {"reg": out["reg"].mean(), **self._terms(out)}
        return out["r"], terms, self._monitors(out)

    def prior_mean_r(self, features: Tensor, summaries: Summaries) -> Tensor:
        """r [B, T-1, d_r]: each transition's prior mean (what rollout mode prior_mean draws), from the trunk
        features of frames 0..T-2 [B, T-1, N, P]; trained through (model.prior_mean_weight)."""
        s = summaries.context(features)
        return self.rollout_r("prior_mean", s.flatten(0, 1), None, None).view(*s.shape[:2], -1)

    def step_r(self, mode, features, inputs, future, action, summaries, generator):
        if mode == "zero":
            return features.new_zeros(features.shape[0], self.latent_dim)
        s = summaries.context(features[:, -1:])[:, -1]
        s_plus = None
        if mode == "posterior":
            s_plus = summaries.target(future, inputs[:, -1:], inputs[:, -2:-1] if inputs.shape[1] > 1 else inputs)[:, 0]
        return self.rollout_r(mode, s, s_plus, generator)

    def _terms(self, out: dict[str, Tensor]) -> dict[str, Tensor]:
        return {}

    def _monitors(self, out: dict[str, Tensor]) -> dict[str, Tensor]:
        return {}


class VariationalLatent(_InferredLatent):
    """AdaSSL-V: posterior q(r | s, s+) and learned conditional prior p(r | s), diagonal Gaussians.

    Both heads' output layers start at zero weight, mean bias 0 and the same sigma bias (SIGMA_INIT), so q = p and
    the KL is exactly 0 at initialisation (two randomly initialised means would start many nats apart per transition,
    a strong early push to collapse r).
    """

    name = "adassl_v"
    readouts = {"features": ("innovation", "mu_q"), "detector": "kl"}

    def __init__(self, summary_dim: int, latent_dim: int, prior_anchor: float = 0.0):
        super().__init__()
        self.latent_dim = latent_dim
        self.prior_anchor = prior_anchor
        self.posterior_net = mlp(2 * summary_dim, summary_dim, 2 * latent_dim)
        self.prior_net = mlp(summary_dim, summary_dim, 2 * latent_dim)
        raw_sigma_init = math.log(math.expm1(SIGMA_INIT))  # softplus^-1
        for net in (self.posterior_net, self.prior_net):
            nn.init.zeros_(net[-1].weight)
            nn.init.zeros_(net[-1].bias[:latent_dim])
            nn.init.constant_(net[-1].bias[latent_dim:], raw_sigma_init)

    @classmethod
    def build(cls, cfg: ModelConfig) -> Latent:
        return cls(cfg.summary_dim, cfg.latent_dim, cfg.prior_anchor)

    def _gaussian(self, raw: Tensor) -> tuple[Tensor, Tensor]:
        mu, raw_sigma = raw.float().chunk(2, dim=-1)
        return mu, F.softplus(raw_sigma) + SIGMA_MIN

    def posterior(self, s: Tensor, s_plus: Tensor) -> tuple[Tensor, Tensor]:
        """s, s_plus: [..., S] -> (mu_q, sigma_q) [..., d_r]."""
        return self._gaussian(self.posterior_net(torch.cat([s, s_plus], dim=-1)))

    def prior(self, s: Tensor) -> tuple[Tensor, Tensor]:
        """s: [..., S] -> (mu_p, sigma_p) [..., d_r]."""
        return self._gaussian(self.prior_net(s))

    def forward(self, s: Tensor, s_plus: Tensor) -> dict[str, Tensor]:
        """s, s_plus: [B, T', S] -> r (reparameterised sample of q), reg = kl [B, T'], and the Gaussians' stats."""
        mu_q, sigma_q = self.posterior(s, s_plus)
        mu_p, sigma_p = self.prior(s)
        kl = gaussian_kl(mu_q, sigma_q, mu_p, sigma_p)
        r = mu_q + sigma_q * torch.randn_like(mu_q)
        reg = kl
        if self.prior_anchor > 0:
            anchor = gaussian_kl(mu_p, sigma_p, torch.zeros_like(mu_p), torch.full_like(sigma_p, SIGMA_INIT))
            reg = kl + self.prior_anchor * anchor
        return {
            "r": r,
            "reg": reg,
            "kl": kl,
            "mu_q": mu_q,
            "sigma_q": sigma_q,
            "mu_p": mu_p,
            "sigma_p": sigma_p,
            "innovation": (mu_q - mu_p) / sigma_p,
        }

    def posterior_stats(self, s: Tensor, s_plus: Tensor) -> dict[str, Tensor]:
        """mu_q, sigma_q, mu_p, sigma_p, innovation [B, T-1, d_r] and kl [B, T-1]."""
        out = self(s, s_plus)
        del out["r"], out["reg"]
        return out

    def _terms(self, out: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"kl": out["kl"].mean()}

    def _monitors(self, out: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"sigma_q": out["sigma_q"].detach().mean(), "sigma_p": out["sigma_p"].detach().mean()}

    def rollout_r(self, mode: str, s: Tensor, s_plus: Tensor | None, generator: torch.Generator | None) -> Tensor:
        """r [B, d_r] for one rollout step: prior mean, prior sample, or posterior mean (needs s_plus)."""
        if mode == "posterior":
            return self.posterior(s, s_plus)[0]
        mu_p, sigma_p = self.prior(s)
        if mode == "prior_mean":
            return mu_p
        return mu_p + sigma_p * torch.randn(mu_p.shape, device=mu_p.device, generator=generator)


class SparseLatent(_InferredLatent):
    """AdaSSL-S: r = m * v with a straight-through Bernoulli mask m and values v from one MLP on [s, s+]."""

    name = "adassl_s"
    readouts = {"features": ("r", "mask_prob"), "detector": "expected_active"}

    def __init__(self, summary_dim: int, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim
        self.net = mlp(2 * summary_dim, summary_dim, 2 * latent_dim)
        self.register_buffer("rate", torch.full((latent_dim,), 0.5))
        self.register_buffer("value_mean", torch.zeros(latent_dim))
        self.register_buffer("value_var", torch.ones(latent_dim))

    def mask_and_values(self, s: Tensor, s_plus: Tensor) -> tuple[Tensor, Tensor]:
        """s, s_plus: [..., S] -> (logits, values) [..., d_r]."""
        logits, values = self.net(torch.cat([s, s_plus], dim=-1)).float().chunk(2, dim=-1)
        return logits, values

    def forward(self, s: Tensor, s_plus: Tensor) -> dict[str, Tensor]:
        """s, s_plus: [B, T', S] -> r = m * v (sampled mask), reg = expected active dims [B, T'], mask stats."""
        logits, values = self.mask_and_values(s, s_plus)
        mask = straight_through_bernoulli(logits, sample=self.training)
        prob = torch.sigmoid(logits)
        if self.training:
            self._update_stats(prob, values)
        return {
            "r": mask * values,
            "reg": prob.sum(-1),
            "mask_prob": prob,
            "mask": mask.detach(),
            "values": values,
            "expected_active": prob.sum(-1),
        }

    def posterior_stats(self, s: Tensor, s_plus: Tensor) -> dict[str, Tensor]:
        """mask_prob, values, mask (sampled in train mode, sigmoid > 0.5 in eval mode), r = mask * values, all
        [B, T-1, d_r], and expected_active [B, T-1]."""
        out = self(s, s_plus)
        del out["reg"]
        return out

    def _monitors(self, out: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"active_rate": out["mask"].mean()}

    @torch.no_grad()
    def _update_stats(self, prob: Tensor, values: Tensor) -> None:
        flat_prob = rearrange(prob, "... d -> (...) d")
        flat_values = rearrange(values, "... d -> (...) d")
        for buffer, batch_value in (
            (self.rate, flat_prob.mean(0)),
            (self.value_mean, flat_values.mean(0)),
            (self.value_var, flat_values.var(0, unbiased=False)),
        ):
            buffer.mul_(STATS_MOMENTUM).add_(batch_value, alpha=1.0 - STATS_MOMENTUM)

    def rollout_r(self, mode: str, s: Tensor, s_plus: Tensor | None, generator: torch.Generator | None) -> Tensor:
        """r [B, d_r] for one rollout step: posterior (deterministic mask), 0 (prior_mean) or a marginal sample."""
        if mode == "posterior":
            logits, values = self.mask_and_values(s, s_plus)
            return (logits > 0).to(values.dtype) * values
        shape = (s.shape[0], self.rate.shape[0])
        if mode == "prior_mean":
            return torch.zeros(shape, device=s.device)
        mask = torch.rand(shape, device=s.device, generator=generator) < self.rate
        noise = torch.randn(shape, device=s.device, generator=generator)
        return mask * (self.value_mean + self.value_var.sqrt() * noise)


class OracleLatent(Latent):
    """Oracle baseline: r = W a + b, a linear embedding of the transition's action a [..., A]."""

    name = "oracle"
    modes = ("action", "zero")
    eval_modes = (("action", "action"), ("zero", "zero"))
    train_rollout_mode = "action"
    needs_actions = True
    r_is = "the action"

    @classmethod
    def build(cls, cfg: ModelConfig) -> Latent:
        return cls(cfg.action_dim, cfg.latent_dim)

    def __init__(self, action_dim: int, latent_dim: int):
        super().__init__()
        if action_dim < 1:
            raise ValueError(
                f"latent=oracle needs model.action_dim >= 1 (got {action_dim}); set it to the width of the batch's "
                "'action' rows (the trainer takes it from the data)"
            )
        self.action_dim = action_dim
        self.latent_dim = latent_dim
        self.embed = nn.Linear(action_dim, latent_dim)

    def forward(self, action: Tensor | None) -> Tensor:
        """action: float [..., A] -> r [..., d_r]."""
        if action is None:
            raise ValueError("latent=oracle needs the batch's 'action' [B, T-1, A]; this batch has none")
        if action.shape[-1] != self.action_dim:
            raise ValueError(f"action rows have width {action.shape[-1]}, but model.action_dim={self.action_dim}")
        return self.embed(action.float())

    def train_r(self, features, inputs, target, action, summaries):
        return self(action), {"reg": target.new_zeros(())}, {}

    def step_r(self, mode, features, inputs, future, action, summaries, generator):
        if mode == "zero":
            return features.new_zeros(features.shape[0], self.latent_dim)
        return self(action)


LATENT_CLASSES: dict[str, type[Latent]] = {
    cls.name: cls for cls in (NoLatent, VariationalLatent, SparseLatent, OracleLatent)
}


def latent_class(name: str) -> type[Latent]:
    """The Latent class of `model.latent`; ValueError naming the valid ones."""
    if name not in LATENT_CLASSES:
        raise ValueError(f"model.latent={name!r} is not one of {', '.join(LATENT_CLASSES)}")
    return LATENT_CLASSES[name]


def build_latent(cfg: ModelConfig) -> Latent:
    """The latent module of `cfg.latent` (NoLatent holds no parameters)."""
    return latent_class(cfg.latent).build(cfg)
