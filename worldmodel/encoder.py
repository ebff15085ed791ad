"""Frame encoder: a timm ViT applied per frame, its EMA target copy, and the target token normalisation.

Frames reach the model as uint8 [B, T, H, W, C]; `preprocess` turns them into floats in [-1, 1] so the data
pipeline never has to. The online encoder returns patch tokens [B, T, N, D] (N = (img_size / patch_size)^2, no
class token). The EMA target encoder is a deep copy that never receives gradients; `ema_update` moves it toward
the online weights with fused foreach ops.

`TokenNorm` is the single definition of "normalised tokens": a parameter-free layer norm over D, optionally after
subtracting a running mean of the target tokens (DINO-style centring). DESIGN.md section 6: with a plain layer-normed
EMA target a small model collapsed within 100 steps; centring fixed every run.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from worldmodel.config import ModelConfig


def preprocess(frames: Tensor, img_size: int) -> Tensor:
    """Frames uint8 [B, T, H, W, C] (or float in [0, 1]) -> float [B, T, C, H, W] in [-1, 1].

    Raises ValueError when the frames are not [B, T, img_size, img_size, C].
    """
    if frames.ndim != 5 or frames.shape[2] != img_size or frames.shape[3] != img_size:
        raise ValueError(
            f"frames must be [B, T, {img_size}, {img_size}, C] (model.img_size={img_size}), got "
            f"{tuple(frames.shape)}; set data.image_size and model.img_size to the same value"
        )
    x = frames.float() / 255.0 if frames.dtype == torch.uint8 else frames.float()
    return rearrange(x * 2.0 - 1.0, "b t h w c -> b t c h w")


def build_vit(cfg: ModelConfig) -> VisionTransformer:
    """A timm ViT from the config (no class token, no head, no hub download); `cfg.init_weights` loads a local
    state dict of the same architecture."""
    vit = VisionTransformer(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
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


class FrameEncoder(nn.Module):
    """A ViT applied to every frame independently: float [B, T, C, H, W] -> patch tokens [B, T, N, D]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.vit = build_vit(cfg)

    def forward(self, x: Tensor) -> Tensor:
        """x: float [B, T, C, H, W] (see `preprocess`) -> tokens [B, T, N, D]."""
        b = x.shape[0]
        tokens = self.vit.forward_features(rearrange(x, "b t c h w -> (b t) c h w"))
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
    """Normalised tokens: layer norm over D (no affine), after subtracting a running mean when `center` is set.

    The running mean `center` [D] is a buffer updated from target tokens by `update` (momentum `momentum`,
    averaged over processes when torch.distributed is initialised). Online tokens are normalised with the same
    centre so that the predictor's inputs and its targets live in one space, which lets a rollout feed predictions
    back in.
    """

    def __init__(self, dim: int, center: bool, momentum: float):
        super().__init__()
        self.use_center = center
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(dim))

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens: [..., D] -> layer-normed [..., D] (float32 statistics)."""
        x = tokens.float()
        if self.use_center:
            x = x - self.center
        return F.layer_norm(x, x.shape[-1:])

    @torch.no_grad()
    def update(self, tokens: Tensor) -> None:
        """Move the centre toward the mean of `tokens` [..., D] (no-op without centring)."""
        if not self.use_center:
            return
        mean = tokens.detach().float().reshape(-1, tokens.shape[-1]).mean(0)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(mean)
            mean /= torch.distributed.get_world_size()
        self.center.mul_(self.momentum).add_(mean, alpha=1.0 - self.momentum)
