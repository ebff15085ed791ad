"""Frame encoder: a timm ViT applied per frame, its EMA target copy, and the target token normalisation.

Frames reach the model as uint8 [B, T, H, W, C]; `preprocess` turns them into floats in [-1, 1] so the data
pipeline never has to. The online encoder returns patch tokens [B, T, N, D] (N = (img_size / patch_size)^2, no
class token). The EMA target encoder is a deep copy that never receives gradients; `ema_update` moves it toward
the online weights with fused foreach ops.

With `model.granularity=frame` (the default) the encoder ends in a frame head: the token grid is layer-normed,
flattened (so where things are survives) and mapped linearly to one `frame_dim` embedding per frame, returned as a
grid of one token, [B, T, 1, frame_dim]. Everything downstream (predictor, latents, rollouts, metrics) reads
[B, T, N, D] and works on either granularity. Why frame is the default: per-patch targets of 8-px patches change
far more between frames than the motion does; a frame embedding learns the motion at CPU budget.

`TokenNorm` is the single definition of "normalised tokens": a parameter-free layer norm over D after subtracting a
running mean of the tokens (DINO-style centring): with a plain layer-normed EMA target a small model collapses
early in training, and centring prevents it.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from worldmodel.model.config import CHANNELS, GRANULARITIES, ModelConfig


def preprocess(frames: Tensor, img_size: int) -> Tensor:
    """Frames uint8 [B, T, H, W, C] (or float in [0, 1]) -> float [B, T, C, H, W] in [-1, 1].

    Raises ValueError when the frames are not [B, T, img_size, img_size, C].
    """
    if frames.ndim != 5 or frames.shape[2] != img_size or frames.shape[3] != img_size:
        raise ValueError(
            f"frames must be [B, T, {img_size}, {img_size}, C] (the model's img_size={img_size}, data.image_size in "
            f"an experiment config), got {tuple(frames.shape)}; decode the frames at the model's size"
        )
    x = frames.float() / 255.0 if frames.dtype == torch.uint8 else frames.float()
    return rearrange(x * 2.0 - 1.0, "b t h w c -> b t c h w")


def build_vit(cfg: ModelConfig, in_chans: int = CHANNELS) -> VisionTransformer:
    """A timm ViT from the config (no class token, no head, no hub download); `cfg.init_weights` loads a local
    state dict of the same architecture. `in_chans`: input channels (RGB frames: 3; experiments/minimal_model.py
    feeds frame differences beside the frame, 6)."""
    vit = VisionTransformer(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        in_chans=in_chans,
        num_classes=0,
        global_pool="",
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        class_token=False,
    )
    if cfg.init_weights:
        path = Path(cfg.init_weights)
        if not path.is_file():
            raise FileNotFoundError(f"model.init_weights={cfg.init_weights!r} does not exist; give a local .pt file")
        state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            vit.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(
                f"model.init_weights={cfg.init_weights!r} does not match the configured ViT (embed_dim="
                f"{cfg.embed_dim}, depth={cfg.depth}, patch_size={cfg.patch_size}): {err}"
            ) from err
    return vit


def output_shape(cfg: ModelConfig) -> tuple[int, int]:
    """(N, D) of what the encoder returns per frame: (1, frame_dim) for granularity frame, else (patches, embed_dim)."""
    if cfg.granularity not in GRANULARITIES:
        raise ValueError(f"model.granularity={cfg.granularity!r} is not one of {', '.join(GRANULARITIES)}")
    if cfg.granularity == "frame":
        return 1, cfg.frame_dim
    return (cfg.img_size // cfg.patch_size) ** 2, cfg.embed_dim


class SpatialSoftmaxHead(nn.Module):
    """Keypoints from a patch grid (the spatial softmax of deep spatial autoencoders, Finn et al. 2016): tokens
    [M, side * side, D] (row-major patch grid) -> [M, dim], the expected (x, y) in [-1, 1] of dim / 2 keypoints,
    each a softmax over the grid of a learned score (x = column, y = row; pairs x0, y0, x1, y1, ...).

    `cells` > 1 adds where inside its patch each keypoint lies: every token also scores cells x cells sub-cells of
    its own patch, and a softmax over them gives an offset from the patch centre (up to half the patch spacing), so
    keypoint = sum over patches of p_patch * (centre + offset). The offsets start at zero (uniform sub-cell scores),
    so at initialisation the head is the one-score-per-patch head. Without them an expected position moves in steps
    as a disc crosses a patch: on the push world it tracked the agent, but its frame-to-frame change was noise (a
    constant-velocity guess no better than copying), so no predictor could extrapolate the motion (docs/results.md,
    "Keypoints that move in steps"). One softmax over the whole fine grid instead stays diffuse long into training
    (keypoints at the centre, tracking nothing).
    """

    def __init__(self, embed_dim: int, side: int, dim: int, cells: int = 1):
        super().__init__()
        if dim % 2:
            raise ValueError(f"model.frame_head=keypoints needs an even model.frame_dim (x, y per keypoint), got {dim}")
        if cells < 1:
            raise ValueError(f"model.keypoint_cells must be >= 1 (sub-cells per patch side), got {cells}")
        self.keypoints = dim // 2
        self.score = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, self.keypoints))
        axis = torch.linspace(-1.0, 1.0, side)
        ys, xs = torch.meshgrid(axis, axis, indexing="ij")
        self.register_buffer("grid", torch.stack([xs, ys], -1).reshape(-1, 2), persistent=False)  # [side * side, 2]
        self.sub_score = None
        if cells > 1:
            self.sub_score = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, self.keypoints * cells**2))
            nn.init.zeros_(self.sub_score[1].weight)
            nn.init.zeros_(self.sub_score[1].bias)
            spacing = 2.0 / max(side - 1, 1)  # between neighbouring patch centres
            sub = (torch.arange(cells) + 0.5) / cells - 0.5  # sub-cell centres in (-1/2, 1/2)
            sy, sx = torch.meshgrid(sub, sub, indexing="ij")
            self.register_buffer("sub_grid", torch.stack([sx, sy], -1).reshape(-1, 2) * spacing, persistent=False)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens [M, N, D] -> keypoint coordinates [M, dim]."""
        attention = self.score(tokens).float().softmax(dim=1)  # [M, N, K], a distribution over the grid per keypoint
        where = self.grid[None, :, None, :]  # [1, N, 1, 2]: the patch centres
        if self.sub_score is not None:  # [M, N, K, cells^2] -> offsets [M, N, K, 2]
            inside = self.sub_score(tokens).float().unflatten(-1, (self.keypoints, -1)).softmax(dim=-1)
            where = where + inside @ self.sub_grid
        return (
            torch.einsum("mnk,mnkc->mkc", attention, where.expand(len(tokens), -1, self.keypoints, -1))
            .flatten(1)
            .to(tokens.dtype)
        )


class KeypointDecoder(nn.Module):
    """Conditional reconstruction through the keypoints (Jakab et al. 2018, "Unsupervised learning of object
    landmarks through conditional image generation"): frame t is rebuilt from a reference frame of the same clip and
    frame t's keypoints, rendered as Gaussian maps; a small conv net draws on the reference.

    The reference holds the static background, so the only thing the keypoints must carry is where the moving things
    are now: a training signal that points the keypoints at the agent, which a JEPA loss alone does not (on the push
    world its keypoints track no better after training than at initialisation; docs/results.md, "Version 1 of the
    world").
    """

    def __init__(
        self,
        keypoints: int,
        size: int,
        sigma: float = 0.1,
        width: int = 32,
        in_chans: int = CHANNELS,
        mask: float = 0.0,
        block: int = 8,
    ):
        super().__init__()
        if sigma <= 0:
            raise ValueError(f"model.recon_sigma must be > 0 (a Gaussian's width in [-1, 1] coordinates), got {sigma}")
        if not 0.0 <= mask < 1.0:
            raise ValueError(f"model.recon_mask must be in [0, 1) (fraction of squares blanked), got {mask}")
        self.mask, self.block = mask, block
        # the blanked squares come from the decoder's own generator, not the global one, so the draws do not depend on
        # what else a method samples (AdaSSL's r): the trainer reseeds it every step (`seed_masks`)
        self.masks = torch.Generator().manual_seed(0)
        self.register_buffer("axis", torch.linspace(-1.0, 1.0, size), persistent=False)  # pixel centres, [size]
        # the maps' width now (`set_sigma`; a tensor, so a compiled model reads the new value without recompiling)
        self.register_buffer("sigma_now", torch.tensor(float(sigma)), persistent=False)
        layers, channels = [], keypoints + in_chans
        for _ in range(3):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.GELU()]
            channels = width
        self.net = nn.Sequential(*layers, nn.Conv2d(width, in_chans, 3, padding=1))

    def set_sigma(self, sigma: float) -> None:
        """Set the maps' width for the next forward passes (the trainer's coarse-to-fine schedule,
        `schedules.recon_sigma_at`); it starts at the constructor's `sigma`, the final width a loaded model uses."""
        if sigma <= 0:
            raise ValueError(f"the keypoint maps' width must be > 0, got {sigma}")
        self.sigma_now.fill_(sigma)

    def seed_masks(self, seed: int) -> None:
        """Reseed the generator of the blanked squares (`blank`); the trainer calls it every step with a seed made
        of the run's seed, the step and the rank, so a resumed run draws the masks the uninterrupted one would."""
        self.masks.manual_seed(seed)

    def maps(self, keypoints: Tensor) -> Tensor:
        """keypoints [M, K, 2] (x, y in [-1, 1]) -> Gaussian maps [M, K, size, size] (row = y, column = x)."""
        var2 = 2 * self.sigma_now**2
        gx = torch.exp(-((self.axis - keypoints[..., 0, None]) ** 2) / var2)  # [M, K, size]
        gy = torch.exp(-((self.axis - keypoints[..., 1, None]) ** 2) / var2)
        return gy[..., :, None] * gx[..., None, :]

    def forward(self, keypoints: Tensor, reference: Tensor) -> Tensor:
        """keypoints [M, K, 2], reference frames float [M, C, size, size] -> rebuilt frames [M, C, size, size]."""
        return reference + self.net(torch.cat([self.maps(keypoints.float()), reference.float()], dim=1))

    def blank(self, reference: Tensor) -> Tensor:
        """Reference frames [M, C, H, W] with a random `mask` fraction of their block x block squares set to 0 (grey),
        each frame its own draw: what the reference cannot show, the keypoints must place (a still object too)."""
        if self.mask == 0.0:
            return reference
        m, _, h, w = reference.shape
        rows, cols = -(-h // self.block), -(-w // self.block)
        keep = (torch.rand(m, 1, rows, cols, generator=self.masks) >= self.mask).to(reference.device)  # [M, 1, r, c]
        keep = keep.repeat_interleave(self.block, 2).repeat_interleave(self.block, 3)[..., :h, :w]
        return reference * keep

    def loss(self, embedding: Tensor, x: Tensor) -> Tensor:
        """Mean squared error of rebuilding frames 1..T-1 of each clip from its frame 0 (the reference), blanked in
        part when `mask` > 0.

        embedding: the keypoint head's output [B, T, 1, 2K] (x0, y0, x1, y1, ...); x: frames float [B, T, C, H, W]
        (`preprocess`) -> scalar.
        """
        frames = x[:, 1:].float()  # [B, T-1, C, H, W]
        reference = x[:, :1].float().expand_as(frames)
        keypoints = embedding[:, 1:, 0].unflatten(-1, (-1, 2))  # [B, T-1, K, 2]
        rebuilt = self(keypoints.flatten(0, 1), self.blank(reference.flatten(0, 1)))
        return F.mse_loss(rebuilt, frames.flatten(0, 1))


class FrameEncoder(nn.Module):
    """A ViT applied to every frame independently: float [B, T, C, H, W] -> [B, T, N, D].

    granularity tokens: the patch tokens (N patches, D = embed_dim); frame: the frame head's embedding (N = 1,
    D = frame_dim): layer norm -> flatten the token grid -> linear, or with frame_head keypoints a
    `SpatialSoftmaxHead`.
    """

    def __init__(self, cfg: ModelConfig, in_chans: int = CHANNELS):
        super().__init__()
        self.vit = build_vit(cfg, in_chans)
        self.head = None
        output_shape(cfg)  # validates model.granularity
        if cfg.granularity == "tokens" and cfg.frame_head != "linear":
            raise ValueError(
                f"model.frame_head={cfg.frame_head} is a head for model.granularity=frame; with granularity tokens "
                "the patch tokens are the latents (set model.granularity=frame or drop model.frame_head)"
            )
        if cfg.keypoint_cells != 1 and (cfg.granularity != "frame" or cfg.frame_head != "keypoints"):
            raise ValueError(
                f"model.keypoint_cells={cfg.keypoint_cells} splits the keypoint head's patches; it needs "
                f"model.frame_head=keypoints and model.granularity=frame (got {cfg.frame_head}, {cfg.granularity}): "
                "set them or drop model.keypoint_cells"
            )
        if cfg.granularity == "frame" and cfg.frame_head == "keypoints":
            self.head = SpatialSoftmaxHead(
                cfg.embed_dim, cfg.img_size // cfg.patch_size, cfg.frame_dim, cells=cfg.keypoint_cells
            )
        elif cfg.granularity == "frame":
            patches = (cfg.img_size // cfg.patch_size) ** 2
            self.head = nn.Sequential(
                nn.LayerNorm(cfg.embed_dim), nn.Flatten(1), nn.Linear(patches * cfg.embed_dim, cfg.frame_dim)
            )

    def forward(self, x: Tensor) -> Tensor:
        """x: float [B, T, C, H, W] (see `preprocess`) -> tokens [B, T, N, D] (see the class docstring)."""
        b = x.shape[0]
        tokens = self.vit.forward_features(rearrange(x, "b t c h w -> (b t) c h w"))  # [(B T), patches, embed_dim]
        if self.head is not None:
            tokens = self.head(tokens)[:, None]  # [(B T), 1, frame_dim]
        return rearrange(tokens, "(b t) n d -> b t n d", b=b)


def make_target(encoder: FrameEncoder) -> FrameEncoder:
    """A frozen deep copy of `encoder` to be moved by `ema_update`."""
    target = copy.deepcopy(encoder)
    target.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online, for every parameter, with fused foreach ops."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
    target_params = list(target.parameters())
    online_params = [p.detach() for p in online.parameters()]
    torch._foreach_mul_(target_params, momentum)
    torch._foreach_add_(target_params, online_params, alpha=1.0 - momentum)


class TokenNorm(nn.Module):
    """Normalised tokens: subtract a running mean [D], then layer norm over D (DINO-style centring; no learned
    parameters). Centred, because a plain layer norm without centring loses most dims (its effective rank falls to a
    small fraction of the width; docs/results.md, "The project model, one switch at a time").

    scale="running" (model.target_scale) divides the centred tokens by one running RMS over all dims instead (a
    buffer `mean_square`, updated like the centre): a linear map, so keypoint coordinates stay linear in the positions
    they track (per frame, the layer norm divides them by a spread that depends on where the keypoints are).

    The running mean (`center`, a buffer [D]) is updated by `update` (momentum `momentum`, averaged over processes
    when torch.distributed is initialised). The model keeps one TokenNorm per token space (online and target), each
    with its own statistics: the two encoders' raw means differ.
    """

    def __init__(self, dim: int, momentum: float, scale: str = "frame"):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(dim))
        self.per_frame = scale == "frame"
        if not self.per_frame:  # one running mean square of the centred tokens, over all dims: a linear map
            self.register_buffer("mean_square", torch.ones(()))

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens: [..., D] -> normalised [..., D] (float32)."""
        x = tokens.float() - self.center
        if self.per_frame:
            return F.layer_norm(x, x.shape[-1:])
        return x * self.mean_square.clamp_min(1e-8).rsqrt()

    @torch.no_grad()
    def update(self, tokens: Tensor) -> None:
        """Move the running mean (and, scale="running", the mean square around the current centre) toward those of
        `tokens` [..., D], averaged over processes in one all-reduce."""
        flat = tokens.detach().float().reshape(-1, tokens.shape[-1])  # [M, D]
        stats = flat.mean(0)  # [D]
        if not self.per_frame:
            stats = torch.cat([stats, (flat - self.center).square().mean()[None]])  # [D + 1]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(stats)
            stats /= torch.distributed.get_world_size()
        if not self.per_frame:
            self.mean_square.mul_(self.momentum).add_(stats[-1], alpha=1.0 - self.momentum)
        self.center.mul_(self.momentum).add_(stats[: len(self.center)], alpha=1.0 - self.momentum)
