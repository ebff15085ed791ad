"""WorldModel: the one interface train.py and evaluate.py share (docs/architecture.md, "WorldModel").

Spaces. `encode` returns the online encoder's output (the predictor's inputs) and `encode_target` the training
targets: the EMA target encoder's output (`model.target=ema`, the default), or the online encoder's
(`model.target=online`; the target encoder still exists and `update_target` still moves it, unused). With
`model.granularity=frame` (default) each frame is one embedding, [B, T, 1, frame_dim]; with `tokens` the patch grid,
[B, T, N, embed_dim]. Each space is normalised by its own `TokenNorm` (centred, then layer-normed; a running mean,
no parameters): the two encoders' raw means differ.

Prediction. The predictor's output at t is frame t+1's target embedding (absolute, or its input at t plus a change
with `model.prediction=residual`). The residual's base is the predictor's own input, with gradient, never a
detached target: a change added to a detached target lets the target space drift away from the motion until
consecutive frames are anti-correlated (docs/results.md, "Ablations"). A rollout feeds each prediction back as
the next input and nothing else, so a k-step rollout is computed exactly as the training rollout term
(`model.rollout_steps`) computes it: one function, `rollout`, for both.

Indexing. For frames 0..T-1 the predictor's output at position t predicts frame t+1, conditioned on the latent
(or action) of transition t -> t+1; latents, actions and regularisers are per transition, [B, T-1, ...].

Monitors (logged by the trainer; the loss hides collapse and drift, these show them): `target_var` (batch
variance of the targets), `target_eff_rank` (effective rank of the per-frame targets), `drift` (copy-last squared
error over the target variance: consecutive targets should stay closer than random pairs, so well below 2),
`copy_last` (the loss of predicting no change).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, reduce, repeat
from torch import Tensor, nn

from worldmodel.model.config import ModelConfig
from worldmodel.model.encoder import (
    FrameEncoder,
    KeypointDecoder,
    TokenNorm,
    ema_update,
    make_target,
    output_shape,
    preprocess,
)
from worldmodel.model.latents import ROLLOUT_MODES, build_latent, latent_class
from worldmodel.model.monitors import effective_rank, per_dim_std, target_health
from worldmodel.model.objectives import copy_last_loss, jepa_loss
from worldmodel.model.predictor import Predictor, expand_cond
from worldmodel.model.sigreg import sigreg
from worldmodel.model.summaries import Summaries, summaries_of

__all__ = ["ROLLOUT_MODES", "WorldModel"]


def clip_contrast(
    pred: Tensor, target: Tensor, temperature: float = 0.1, exclude_input: bool = False
) -> tuple[Tensor, Tensor]:
    """Within-clip InfoNCE: predictions [B, T, N, D] against the targets [B, T, N, D] they predict; each prediction
    must pick its own target among the T targets of its clip (cosine of the flattened token grids / temperature).
    `exclude_input`: prediction t's input frame (target t-1, what copy-last predicts) is not among its negatives.
    Returns (scalar cross-entropy, top-1 accuracy, detached); chance is 1 / T."""
    p = F.normalize(pred.float().flatten(2), dim=-1)  # [B, T, N*D]
    z = F.normalize(target.float().flatten(2), dim=-1)
    logits = torch.einsum("btk,bsk->bts", p, z) / temperature  # [B, T, T]
    if exclude_input:  # target s-1 is frame s, the input of prediction s: what copy-last predicts is no negative
        rows = torch.arange(1, logits.shape[1], device=logits.device)
        logits = logits.clone()
        logits[:, rows, rows - 1] = -1e4
    labels = torch.arange(logits.shape[1], device=logits.device).expand(logits.shape[0], -1)
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    return loss, (logits.argmax(-1) == labels).float().mean().detach()


def within_clip_share(frame_emb: Tensor) -> Tensor:
    """The share of the embedding's variance over a batch that lies within clips: frame embeddings [B, T, D] ->
    scalar in [0, 1], the mean over clips of the summed variance over each clip's frames, over the summed variance
    over all frames (0: every clip's frames embed alike; near 1: clips differ only by what changes in them)."""
    emb = frame_emb.float()
    within = emb.var(dim=1, unbiased=False).sum(-1).mean()
    total = emb.flatten(0, 1).var(dim=0, unbiased=False).sum()
    return within / total.clamp_min(1e-8)


class WorldModel(nn.Module):
    """ViT encoder + EMA target encoder + latent module + frame-causal predictor + JEPA loss, from a ModelConfig."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        kind = latent_class(cfg.latent)  # ValueError for an unknown name
        self.cfg = cfg
        # targets from the EMA target encoder (no grad), or from the online encoder with gradient (model.target online)
        self.ema_target = cfg.target == "ema"
        if cfg.target == "online" and cfg.sigreg_weight <= 0:
            raise ValueError(
                "model.target=online regresses the online encoder on itself, which collapses to a constant without "
                "an anti-collapse term: set model.sigreg_weight > 0 (LeWM: 0.09) or model.target=ema"
            )
        if cfg.clip_contrast_detach and self.ema_target:
            raise ValueError(
                "model.clip_contrast_detach leaves the contrast only the targets to train, which the EMA target "
                "encoder does not pass on: set model.target=online"
            )
        for key in ("sigreg_weight", "clip_contrast"):
            if getattr(cfg, key) < 0:
                raise ValueError(f"model.{key} must be >= 0 (0 = off), got {getattr(cfg, key)}")
        self.sigreg_seed = 0  # the SIGReg directions' seed; the trainer sets it every step (same on every rank)
        self.encoder = FrameEncoder(cfg)
        self.target_encoder = make_target(self.encoder)
        # the reconstruction decoder (below) starts from this state of the generator, whatever the method builds in
        # between: with model.pred_trains_encoder=false every method at a seed then trains the same encoder, bit for
        # bit, and their rollouts are compared in one latent space
        decoder_rng = torch.get_rng_state()
        num_tokens, width = output_shape(cfg)  # per frame: (1, frame_dim) or (patches, embed_dim)
        self.norm = TokenNorm(width, cfg.center_momentum, cfg.target_scale)  # target tokens
        self.online_norm = TokenNorm(width, cfg.center_momentum, cfg.target_scale)
        self.predictor = Predictor(
            embed_dim=width,
            num_patches=num_tokens,
            max_frames=cfg.max_frames,
            dim=cfg.pred_dim,
            depth=cfg.pred_depth,
            cond_depth=cfg.pred_cond_depth,
            num_heads=cfg.pred_num_heads,
            cond_dim=cfg.latent_dim if kind.conditions else 0,
            motion=cfg.pred_motion,
            residual=cfg.prediction == "residual",
            out_layernorm=cfg.pred_layernorm,
        )
        # the summaries s, s+ (inferred latents only), then r's own module: the order fixes the initial weights
        self.summaries = Summaries(width, cfg.summary_dim, context_dim=cfg.pred_dim) if kind.inferred else None
        self.latent = build_latent(cfg)
        self.decoder = None  # built last, so a model without it starts from the same weights as before it existed
        if cfg.recon_weight > 0:
            if cfg.granularity != "frame" or cfg.frame_head != "keypoints":
                raise ValueError(
                    f"model.recon_weight={cfg.recon_weight} rebuilds frames from keypoints; it needs "
                    f"model.frame_head=keypoints and model.granularity=frame (got {cfg.frame_head}, {cfg.granularity})"
                )
            with torch.random.fork_rng(devices=[]):  # the global generator is left as it was
                torch.set_rng_state(decoder_rng)
                self.decoder = KeypointDecoder(
                    cfg.frame_dim // 2, cfg.img_size, cfg.recon_sigma, mask=cfg.recon_mask, block=cfg.patch_size
                )
            if cfg.recon_sigma_start < 0 or cfg.recon_sigma_steps < 0:
                raise ValueError(
                    f"model.recon_sigma_start ({cfg.recon_sigma_start}) and model.recon_sigma_steps "
                    f"({cfg.recon_sigma_steps}) must be >= 0 (0 = a constant model.recon_sigma)"
                )
        elif cfg.recon_weight < 0:
            raise ValueError(f"model.recon_weight must be >= 0, got {cfg.recon_weight}")
        elif cfg.recon_mask != 0 or cfg.recon_sigma_start != 0:
            raise ValueError(
                f"model.recon_mask={cfg.recon_mask} and model.recon_sigma_start={cfg.recon_sigma_start} shape the "
                "reconstruction, which is off: set model.recon_weight > 0 (with model.frame_head=keypoints) or drop "
                "them"
            )
        if not cfg.pred_trains_encoder and self.decoder is None:
            raise ValueError(
                "model.pred_trains_encoder=false leaves the encoder only the reconstruction to learn from, which is "
                "off: set model.recon_weight > 0 (with model.frame_head=keypoints) or drop model.pred_trains_encoder"
            )

    # ---- encoders -------------------------------------------------------------------------------------------

    def encode(self, frames: Tensor) -> Tensor:
        """frames: uint8 [B, T, H, W, C] -> normalised online tokens [B, T, N, D] (the predictor's inputs)."""
        return self.online_norm(self.encoder(preprocess(frames, self.cfg.img_size)))

    @torch.no_grad()
    def encode_target(self, frames: Tensor) -> Tensor:
        """frames: uint8 [B, T, H, W, C] -> normalised training targets [B, T, N, D] (no grad)."""
        x = preprocess(frames, self.cfg.img_size)
        if self.ema_target:
            return self.norm(self.target_encoder(x))
        return self.online_norm(self.encoder(x))

    def update_target(self, momentum: float) -> None:
        """EMA step of the target encoder: target <- momentum * target + (1 - momentum) * online (fused, no grad)."""
        ema_update(self.target_encoder, self.encoder, momentum)

    # ---- latents and one-step prediction ----------------------------------------------------------------------

    def summaries_of(
        self, tokens: Tensor, target_tokens: Tensor, features: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Per-transition summaries: s_t [B, T-1, S] from `tokens`, s+_{t+1} [B, T-1, S] from `target_tokens` and
        how they differ from `tokens` (summaries.Summaries.target).

        Only for adassl_v / adassl_s; `target_tokens` are detached here. s_t pools the predictor trunk's output at
        t: pass `features` = predictor.trunk_features(tokens[:, :-1]) if you have them, else they are computed.
        """
        self._require_inferred_latent("summaries_of")
        if features is None:
            features = self.predictor.trunk_features(tokens[:, :-1])
        return summaries_of(self.summaries, features, tokens[:, :-1], target_tokens)

    def infer_latents(self, tokens: Tensor, target_tokens: Tensor) -> dict[str, Tensor]:
        """Posterior statistics per transition for tokens [B, T, N, D] and target tokens [B, T, N, D].

        adassl_v: mu_q, sigma_q, mu_p, sigma_p, innovation ((mu_q - mu_p) / sigma_p), all [B, T-1, d_r], and
        kl [B, T-1]. adassl_s: mask_prob (sigmoid of the logits), values, mask (hard; sampled in train mode,
        sigmoid > 0.5 in eval mode), r = mask * values, all [B, T-1, d_r], and expected_active [B, T-1].
        """
        return self.latent.posterior_stats(*self.summaries_of(tokens, target_tokens))

    # ---- training forward -------------------------------------------------------------------------------------

    def forward(self, frames: Tensor, action: Tensor | None = None, beta: float = 0.0, monitor: bool = True) -> dict:
        """Training step. frames: uint8 [B, T, H, W, C]; action: float [B, T-1, A] (oracle); beta: regulariser weight;
        monitor: compute the collapse monitors (within_clip_share, emb_std, emb_eff_rank, target_var,
        target_eff_rank, drift; SVDs), which the trainer does at log steps only.

        Returns {"loss": scalar, "terms": {name: scalar}, "monitors": {name: scalar}}; loss = pred + beta * reg
        (+ prior_mean_weight * pred_prior, the prediction with r at the prior mean, for inferred latents when
        model.prior_mean_weight > 0; + recon_weight * recon when model.recon_weight > 0; + sigreg_weight * sigreg
        and clip_contrast * clip_contrast when those are > 0; + smooth_weight * smooth when model.smooth_weight > 0;
        + rollout_weight * rollout when model.rollout_steps > 0).
        """
        cfg = self.cfg
        x = preprocess(frames, cfg.img_size)
        if x.shape[1] < 2:
            raise ValueError(f"a training clip needs at least 2 frames, got T={x.shape[1]}")
        raw = self.encoder(x)
        tokens = self.online_norm(raw)
        if not cfg.pred_trains_encoder:  # the encoder learns from the reconstruction alone (on `raw`, below)
            tokens = tokens.detach()
        if self.ema_target:
            with torch.no_grad():
                raw_target = self.target_encoder(x)
                target = self.norm(raw_target)
        else:
            raw_target, target = raw, tokens

        features = self.predictor.trunk_features(tokens[:, :-1])  # [B, T-1, N, P]
        if self.latent.needs_actions:
            self._check_actions(action, tokens.shape[0], tokens.shape[1] - 1, "action")
        seq = tokens[:, :-1]
        r, latent_terms, latent_monitors = self.latent.train_r(features, seq, target, action, self.summaries)
        pred = self.predictor.from_features(features, r, seq)
        terms: dict[str, Tensor] = {}
        terms["pred"] = jepa_loss(pred, target[:, 1:], cfg.loss)
        terms.update(latent_terms)
        monitors = {"copy_last": copy_last_loss(target, cfg.loss)}  # the bar `pred` must get below to be useful
        loss = terms["pred"] + beta * terms["reg"]
        if cfg.clip_contrast > 0:
            scored = pred.detach() if cfg.clip_contrast_detach else pred
            terms["clip_contrast"], monitors["clip_contrast_acc"] = clip_contrast(
                scored, target[:, 1:], exclude_input=cfg.clip_contrast_no_input
            )
            loss = loss + cfg.clip_contrast * terms["clip_contrast"]
        if cfg.prior_mean_weight > 0 and self.latent.inferred:
            pred_prior = self.predictor.from_features(features, self.latent.prior_mean_r(features, self.summaries), seq)
            terms["pred_prior"] = jepa_loss(pred_prior, target[:, 1:], cfg.loss)
            loss = loss + cfg.prior_mean_weight * terms["pred_prior"]
        if self.decoder is not None:
            terms["recon"] = self.decoder.loss(raw, x)  # the raw keypoints, before the online TokenNorm
            loss = loss + cfg.recon_weight * terms["recon"]
        frame_emb = reduce(raw, "b t n d -> b t d", "mean")  # the frame embedding (token grids: their mean)
        if cfg.sigreg_weight > 0:
            # one sample set of every frame of every clip: the clips of one time step are too few samples for the
            # statistic to see a low-rank embedding (docs/results.md, "One recipe")
            terms["sigreg"] = sigreg(rearrange(frame_emb, "b t d -> 1 (b t) d"), seed=self.sigreg_seed)
            loss = loss + cfg.sigreg_weight * terms["sigreg"]
        if cfg.smooth_weight > 0:
            if x.shape[1] < 3:
                raise ValueError(
                    f"model.smooth_weight={cfg.smooth_weight} weighs an acceleration, which needs clips of at least 3 "
                    f"frames, got T={x.shape[1]}; lengthen the clips or set it to 0"
                )
            velocity = raw[:, 1:].float() - raw[:, :-1].float()
            terms["smooth"] = (velocity[:, 1:] - velocity[:, :-1]).abs().mean() / (velocity.abs().mean() + 1e-6)
            loss = loss + cfg.smooth_weight * terms["smooth"]
        if cfg.rollout_steps > 0:
            terms["rollout"] = self._rollout_term(tokens, target, action)
            loss = loss + cfg.rollout_weight * terms["rollout"]

        if monitor:
            monitors["within_clip_share"] = within_clip_share(frame_emb.detach())  # a still embedding: near 0
            pooled = rearrange(frame_emb.detach(), "b t d -> (b t) d")
            monitors.update(emb_std=per_dim_std(pooled), emb_eff_rank=effective_rank(pooled))
            monitors.update(target_health(target))
        monitors.update(latent_monitors)
        if self.training:
            self.norm.update(raw_target)
            self.online_norm.update(raw)
        return {"loss": loss, "terms": terms, "monitors": monitors}

    def _rollout_term(self, tokens: Tensor, target: Tensor, action: Tensor | None) -> Tensor:
        """Loss of a rollout_steps-step rollout from the clip's first T - rollout_steps frames (same `rollout`)."""
        steps, num_frames = self.cfg.rollout_steps, tokens.shape[1]
        if steps > num_frames - 1:
            raise ValueError(
                f"model.rollout_steps={steps} needs clips of more than {steps} frames, got T={num_frames}; "
                "lower it or lengthen the clip"
            )
        context = num_frames - steps
        future_actions = None if action is None else action[:, context - 1 :]
        pred = self.rollout(
            tokens[:, :context],
            steps,
            self.latent.train_rollout_mode,
            future_tokens=target[:, context:],
            actions=future_actions,
        )[0]
        return jepa_loss(pred, target[:, context:], self.cfg.loss)

    # ---- rollout -----------------------------------------------------------------------------------------------

    def rollout(
        self,
        context_tokens: Tensor,
        horizon: int,
        mode: str,
        k: int = 1,
        future_tokens: Tensor | None = None,
        actions: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Autoregressive open-loop prediction in latent space.

        context_tokens: [B, Tc, N, D] (from `encode`); horizon: H >= 1 steps; mode: prior_mean | prior_sample |
        posterior | zero | action; k: number of futures K; future_tokens: [B, H, N, D] target tokens of frames
        Tc..Tc+H-1 (mode posterior); actions: [B, H, A], row h the action of transition Tc-1+h -> Tc+h (mode
        action, oracle only); generator: for prior_sample noise.

        Step h predicts frame Tc+h from frames 0..Tc+h-1 (true context, then earlier predictions: the predictor reads
        its own outputs, as in the training rollout term, and nothing else) and r_h, the
        latent of transition Tc+h-1 -> Tc+h: prior_mean / prior_sample from the prior given s of the last two
        frames of the sequence so far, posterior from q given that s and s+ of future_tokens[:, h] (posterior
        mean; for adassl_s the noise-free mask), zero (r = 0), action (the embedded actions[:, h]). adassl_s has no
        learned prior: prior_mean is r = 0, prior_sample draws from its running marginal (see latents.py).
        Latent none is deterministic and ignores the mode (the K futures are copies).

        Returns predicted tokens [K, B, H, N, D].
        """
        if mode not in self.latent.modes:
            raise ValueError(
                f"rollout mode {mode!r} is not available for latent={self.cfg.latent}; use one of "
                f"{', '.join(self.latent.modes)}"
            )
        b, num_context, n, d = context_tokens.shape
        if horizon < 1 or k < 1:
            raise ValueError(f"rollout needs horizon >= 1 and k >= 1, got horizon={horizon}, k={k}")
        if num_context + horizon - 1 > self.cfg.max_frames:
            raise ValueError(
                f"a rollout of {horizon} steps from {num_context} context frames feeds {num_context + horizon - 1} "
                f"frames to the predictor, more than model.max_frames={self.cfg.max_frames}"
            )
        sampled = self.latent.sampled  # else r does not depend on noise: the K futures are copies of one
        if not self.latent.conditions:
            mode = "zero"
        if mode == "posterior" and (future_tokens is None or future_tokens.shape != (b, horizon, n, d)):
            shape = None if future_tokens is None else tuple(future_tokens.shape)
            raise ValueError(f"mode posterior needs future_tokens [B, H, N, D] = {(b, horizon, n, d)}, got {shape}")
        if mode == "action":
            self._check_actions(actions, b, horizon, "actions")

        copies = k if sampled else 1
        seq = repeat(context_tokens, "b t n d -> (k b) t n d", k=copies)
        future = None if future_tokens is None else repeat(future_tokens, "b h n d -> (k b) h n d", k=copies)
        acts = None if actions is None else repeat(actions, "b h a -> (k b) h a", k=copies)
        predictions = []
        for h in range(horizon):
            features = self.predictor.trunk_features(seq)  # the predictor's and the AdaSSL prior's reading of seq
            r = self.latent.step_r(
                mode,
                features,
                seq,
                None if future is None else future[:, h : h + 1],
                None if acts is None else acts[:, h],
                self.summaries,
                generator,
            )
            cond = None if r is None else expand_cond(r.to(seq.dtype), seq.shape[1])
            next_tokens = self.predictor.from_features(features, cond, seq)[:, -1].to(seq.dtype)
            predictions.append(next_tokens)
            seq = torch.cat([seq, next_tokens[:, None]], dim=1)
        out = rearrange(torch.stack(predictions, dim=1), "(k b) h n d -> k b h n d", k=copies)
        return out.expand(k, -1, -1, -1, -1) if copies != k else out

    # ---- checks ------------------------------------------------------------------------------------------------

    def _require_inferred_latent(self, what: str) -> None:
        if not self.latent.inferred:
            raise ValueError(
                f"{what} needs an inferred latent (model.latent adassl_v or adassl_s); this model has "
                f"latent={self.cfg.latent}, whose r is {self.latent.r_is}"
            )

    def _check_actions(self, actions: Tensor | None, b: int, steps: int, name: str) -> None:
        if actions is None or actions.ndim != 3 or actions.shape[:2] != (b, steps):
            shape = None if actions is None else tuple(actions.shape)
            raise ValueError(
                f"latent={self.cfg.latent} needs {name} [B, {steps}, A] with B={b} (one row per transition), "
                f"got {shape}"
            )
