"""The world model's own configuration: the `model:` section of an experiment config and its choices.

This module is part of the model (encoder, predictor, latents, objectives, WorldModel) and imports nothing from the
data pipeline or the orchestration (pyproject.toml [tool.importlinter] checks it). The experiment config that
reads, overrides and validates the YAML is worldmodel/run/config.py; it re-exports the names defined here, so
`from worldmodel.run.config import ModelConfig` works too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

# Every choice is defined once, as the Literal type of its key: worldmodel/run/config.py validates a value against it,
# and the tuples below are read from it. A latent's behaviour lives in its class (latents.py), registered under the
# same name (a test checks that the registry matches LATENTS).
Latent = Literal["none", "adassl_v", "adassl_s", "oracle"]
Granularity = Literal["frame", "tokens"]  # model.granularity (worldmodel/model/encoder.py FrameEncoder)
FrameHead = Literal["linear", "keypoints"]  # model.frame_head (worldmodel/model/encoder.py FrameEncoder)
Prediction = Literal["absolute", "residual"]  # model.prediction (worldmodel/model/predictor.py Predictor)
Loss = Literal["l1", "smooth_l1"]  # model.loss (worldmodel/model/objectives.py jepa_loss)
Target = Literal["ema", "online"]  # model.target (worldmodel/model/world_model.py)
Scale = Literal["frame", "running"]  # model.target_scale (worldmodel/model/encoder.py TokenNorm)

CHANNELS = 3  # frames are RGB: the decoders and the shard writer always give three channels
LATENTS: tuple[str, ...] = get_args(Latent)
GRANULARITIES: tuple[str, ...] = get_args(Granularity)
PREDICTIONS: tuple[str, ...] = get_args(Prediction)


@dataclass
class ModelConfig:
    """The world model: encoder, predictor, latent module and prediction loss.

    Loss normalisation (read `beta` against it): the JEPA prediction loss is a *mean* over batch, predicted
    frames, patches and embedding dims; the AdaSSL-V regulariser is KL *summed* over the latent dims and averaged
    over batch and transitions; AdaSSL-S's is the expected number of active dims, averaged likewise.
    """

    latent: Latent = "adassl_v"
    # frames are img_size x img_size. Not a config key: the experiment config fills it from data.image_size
    # (worldmodel/run/config.py DERIVED_KEYS); set it directly only where a ModelConfig is built without one
    img_size: int = 64
    patch_size: int = 8
    embed_dim: int = 192  # encoder width
    # What the model predicts and rolls out: "frame" = one embedding per frame, a head on the
    # encoder's token grid (layer norm, flatten, linear to frame_dim); "tokens" = the patch token grid itself (for
    # large images on GPUs). The frame embedding is also what the AdaSSL prior and posterior read.
    granularity: Granularity = "frame"
    frame_dim: int = 64  # width of the frame embedding (granularity frame)
    # The frame head: "linear" (above) or "keypoints", a spatial softmax over the patch grid whose embedding is the
    # expected (x, y) of frame_dim / 2 learned keypoints (positions linear by construction; for scenes where a small
    # agent moves over a large static background, where the linear head keeps the background and loses the agent).
    # A JEPA loss alone leaves the keypoints where initialisation put them: pair it with recon_weight below.
    frame_head: FrameHead = "linear"
    # keypoints: each patch scores keypoint_cells x keypoint_cells sub-cells, so positions move smoothly inside a
    # patch instead of in patch-sized steps (1 = one score per patch)
    keypoint_cells: int = 1
    # Conditional reconstruction through the keypoints (frame_head keypoints only; encoder.KeypointDecoder): frame t
    # is rebuilt from the clip's first frame and Gaussian maps of frame t's keypoints, which points the keypoints at
    # what moves. Its weight in the loss (0 = off) and the maps' width in [-1, 1] image coordinates.
    recon_weight: float = 0.0
    recon_sigma: float = 0.1
    # coarse to fine (0 = off): the maps' width falls geometrically from recon_sigma_start to recon_sigma over the
    # first recon_sigma_steps optimiser steps, so a keypoint far from a moving thing still gets pulled toward it
    recon_sigma_start: float = 0.0
    recon_sigma_steps: int = 0
    # The fraction of the first frame's patch-sized squares blanked before the decoder sees it (a fresh draw for every
    # rebuilt frame): what the reference cannot show, a still object too, the keypoints must place. 0 = none.
    recon_mask: float = 0.0
    # False: the prediction loss trains the predictor (and latent) only, on detached encoder outputs, and the encoder
    # learns from the reconstruction alone, as in world models on a frozen encoder; needs recon_weight > 0. On the
    # push world the prediction loss pulls the keypoints toward what stays still (docs/results.md, "Which disc the
    # keypoints follow depends on the seed").
    pred_trains_encoder: bool = True
    depth: int = 6  # encoder blocks
    num_heads: int = 3
    pred_dim: int = 192  # predictor width
    pred_depth: int = 4
    pred_num_heads: int = 3
    pred_cond_depth: int = 2  # last predictor blocks: frame-local, conditioned on r; the rest is the causal trunk
    max_frames: int = 16  # longest clip the predictor's frame embedding supports
    # absolute: position t outputs frame t+1's target embedding; residual: its input at t plus a predicted change
    prediction: Prediction = "residual"
    pred_motion: bool = True  # the predictor reads [x_t, x_t - x_{t-1}], so velocity is there from the first step
    # The prediction is layer-normed over D, as every (centred, layer-normed) target is: on the targets' own sphere a
    # forecast cannot lower its error by shrinking towards the mean when it is unsure, in one step or in a rollout.
    pred_layernorm: bool = False
    latent_dim: int = 8  # d_r
    summary_dim: int = 128  # width of the pooled summaries s_t and s+_t
    action_dim: int = 0  # oracle only: width of the action rows (0 = take it from the data at start-up)
    beta: float = 0.01  # weight of the latent regulariser (see the normalisation above)
    beta_warmup_steps: int = 500  # beta rises linearly from 0 over these steps
    # Inferred latents only (none and the oracle have no prior and ignore it): the weight of a second prediction
    # term, the same predictor on the same trunk with r set to the prior mean (adassl_v: mu_p; adassl_s: r = 0). The
    # posterior's r is the easy route to any part of the motion; this term makes what the history predicts come
    # through the trunk and the prior, so the rollouts that draw no r from the future keep up with JEPA. 0 = off.
    prior_mean_weight: float = 0.0
    # AdaSSL-V only: the weight of KL(p(r | s) || N(0, 0.1^2 I)) in its regulariser, beside KL(q || p) (both times
    # beta). With a learned prior alone nothing sets r's scale and nothing keeps what the history predicts out of r
    # (it costs no KL once the prior has learned it); anchored, it costs nats, so it moves to the trunk: r = 0 then
    # forecasts like the prior mean and r opens on what the history cannot predict. 0 = off.
    prior_anchor: float = 0.0
    # l1 | smooth_l1 (the prediction loss). L1 learns the conditional median: where most transitions are deterministic,
    # rare events (kicks) are predicted as "no event" and are hard to learn at all (docs/results.md, "What was tried
    # after the benchmark": the still-digits data)
    loss: Loss = "l1"
    rollout_steps: int = 0  # >0 adds a term where the predictor consumes its own predictions this many steps
    rollout_weight: float = 1.0
    # weight of the frame embedding's mean |acceleration| over its mean |velocity| within the clips (before the
    # TokenNorm): asks for motion a constant-velocity guess extrapolates, without rewarding less motion. 0 = off
    smooth_weight: float = 0.0
    # how the centred tokens are scaled: "frame", a layer norm per frame; "running", one running RMS over all dims
    # (a linear map: keypoint coordinates stay linear in the positions they track)
    target_scale: Scale = "frame"
    center_momentum: float = 0.9  # momentum of the running means the TokenNorms subtract (see encoder.TokenNorm)
    # Where the prediction's targets come from: "ema", the EMA target encoder under no gradient (BYOL, V-JEPA);
    # "online", the online encoder itself with gradient (LeWM: no EMA, no stop-gradient; needs sigreg_weight > 0,
    # or the encoder collapses to a constant)
    target: Target = "ema"
    # SIGReg (model/sigreg.py): the weight of the Epps-Pulley statistic that asks the frame embedding (the frame
    # head's output, before normalisation; token grids: their mean) to be an isotropic Gaussian over the global batch,
    # all frames of all clips as one sample set (LeWM: per time step, at batch 128). LeWM's weight is 0.09. 0 = off.
    sigreg_weight: float = 0.0
    # Within-clip contrast: the weight of a cross-entropy that asks each prediction to pick its true next frame's
    # target out of all target frames of the same clip (cosine / 0.1). What every frame of a clip shares (a still
    # background) cannot tell them apart, nor can what is unpredictable: only what moves predictably. 0 = off.
    clip_contrast: float = 0.0
    # The contrast reaches the encoder through the targets only (model.target online), not the predictor: the
    # prediction's own frame t is among the negatives, so through the predictor it pushes forecasts past the truth.
    clip_contrast_detach: bool = False
    # The prediction's input frame (what copy-last predicts) is left out of its negatives, so the contrast does not
    # push forecasts away from "no change"; the next frames stay negatives, so it still penalises overshooting.
    clip_contrast_no_input: bool = False
    ema_start: float = 0.996  # EMA momentum of the target encoder, cosine schedule ema_start -> ema_end
    ema_end: float = 1.0
    init_weights: str = ""  # optional local file with encoder weights (no hub downloads)
