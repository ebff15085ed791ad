"""Frame-causal predictor: tokens of frames 0..T-1 -> predicted tokens of frames 1..T.

Output position t predicts frame t+1 from frames <= t and the transition's conditioning vector c_t (the latent r_t
or action_t of transition t -> t+1).

Two stages:

- the **trunk**: `depth - cond_depth` transformer blocks over all tokens with a frame-causal attention mask
  (`frame_causal_mask`): frame t's tokens see frames <= t, so history (velocity) reaches position t;
- the **head**: `cond_depth` blocks that attend within one frame only and are conditioned on c_t by adaptive
  layer norm (DiT-style shift/scale/gate; the map's bias starts at zero, so with c_t = 0 the conditioned predictor
  computes exactly what the unconditioned one does).

What the predictor reads and outputs: one space. Its input at t is the encoder output of frame t (with
`motion`, also the difference to frame t-1, so velocity is in the input from the first training step instead of
having to be found through attention over absolute embeddings); its output at t is frame t+1's embedding in the
target space, absolutely (`residual=False`) or as the input at t plus a predicted change (`residual=True`; the base
is the input itself, so it carries gradient). A rollout appends each prediction to the inputs, and nothing else.

Why the conditioning stays out of the causal trunk: if c_t modulated tokens that later frames attend to, the
prediction of frame t+2 would depend on c_t as well as c_{t+1}, and a rollout would need a latent (or an action)
for every context transition. With the split, predicting frame t+1 needs c_t alone, so a rollout of H steps needs
exactly H conditioning vectors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn


def frame_causal_mask(num_frames: int, tokens_per_frame: int, device: torch.device | None = None) -> Tensor:
    """bool [T*N, T*N] attention mask, True where query token i may attend to key token j: frame(i) >= frame(j).

    Tokens are laid out frame-major (token i belongs to frame i // N).
    """
    frame = torch.arange(num_frames, device=device).repeat_interleave(tokens_per_frame)
    return frame[:, None] >= frame[None, :]


class Block(nn.Module):
    """Pre-norm transformer block; after `add_conditioning(cond_dim)` its norms are modulated by a per-sample vector
    (AdaLN).

    Modulation is `norm(x) * (1 + scale) + shift` and the residual branch is multiplied by `1 + gate`. The linear
    map from SiLU(conditioning) to (shift, scale, gate) x 2 starts with a zero bias, so a zero vector gives the
    plain block, and a random weight (PyTorch's default init), so r reaches the prediction from the first step.
    A zero weight as well (DiT's init) starves AdaSSL-V: with the posterior's mean also starting at zero (KL 0 at
    init), neither gets a gradient but noise, and r stays off (docs/results.md, "AdaSSL-V: the conditioning's
    initialisation and beta").
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"predictor width {dim} is not divisible by its number of heads {num_heads}")
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.modulation = None  # see add_conditioning

    def add_conditioning(self, cond_dim: int) -> None:
        """Build the map SiLU(c) [B, cond_dim] -> (shift, scale, gate) x 2 [B, 6 * dim] (its bias at zero)."""
        dim = self.proj.out_features
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * dim))
        nn.init.zeros_(self.modulation[1].bias)

    def attention(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """x: [B, L, P] -> [B, L, P]; `mask` bool [L, L] (True = attend) or None for full attention."""
        q, k, v = rearrange(self.qkv(x), "b l (three h e) -> three b h l e", three=3, h=self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(rearrange(out, "b h l e -> b l (h e)"))

    def forward(self, x: Tensor, mask: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        """x: [B, L, P]; mask: bool [L, L] or None; cond: [B, cond_dim] (one vector per sequence) or None."""
        if self.modulation is None or cond is None:
            x = x + self.attention(self.norm1(x), mask)
            return x + self.mlp(self.norm2(x))
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(cond)[:, None].chunk(6, dim=-1)
        x = x + (1 + gate1) * self.attention(self.norm1(x) * (1 + scale1) + shift1, mask)
        return x + (1 + gate2) * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class Predictor(nn.Module):
    """tokens [B, T, N, D] (+ conditioning [B, T, cond_dim]) -> predictions [B, T, N, D] of frames 1..T.

    `cond_dim = 0` builds the unconditioned predictor (latent `none`); otherwise the head's blocks are conditioned by
    AdaLN (`Block.add_conditioning`). `motion` adds x_t - x_{t-1} to the input; `residual` adds the input at t to the
    output at t (module docstring).
    """

    def __init__(
        self,
        embed_dim: int,
        num_patches: int,
        max_frames: int,
        dim: int,
        depth: int,
        cond_depth: int,
        num_heads: int,
        cond_dim: int = 0,
        motion: bool = True,
        residual: bool = False,
        out_layernorm: bool = False,
    ):
        super().__init__()
        if not 1 <= cond_depth < depth:
            raise ValueError(
                f"model.pred_cond_depth={cond_depth} must be in [1, model.pred_depth - 1] (pred_depth={depth}): "
                "the predictor needs at least one frame-causal block and one conditioned block"
            )
        self.max_frames = max_frames
        self.cond_dim = cond_dim
        self.motion = motion
        self.residual = residual
        self.out_layernorm = out_layernorm
        self.in_proj = nn.Linear(2 * embed_dim if motion else embed_dim, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, 1, num_patches, dim))
        self.frame_embed = nn.Parameter(torch.zeros(1, max_frames, 1, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.frame_embed, std=0.02)
        self.trunk = nn.ModuleList(Block(dim, num_heads) for _ in range(depth - cond_depth))
        self.head = nn.ModuleList(Block(dim, num_heads) for _ in range(cond_depth))
        self.norm = nn.LayerNorm(dim)
        self.out_proj = nn.Linear(dim, embed_dim)
        # Zero output at initialisation: residual starts as copy-last, absolute at the targets' centre (0).
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)
        # The conditioning is drawn last, so every other weight is the unconditioned predictor's at the same seed:
        # JEPA, the oracle and AdaSSL-V start from one predictor and differ only by what r adds.
        if cond_dim:
            for block in self.head:
                block.add_conditioning(cond_dim)

    def forward(self, tokens: Tensor, cond: Tensor | None = None) -> Tensor:
        """tokens: [B, T, N, D]; cond: [B, T, cond_dim] (row t conditions transition t -> t+1) or None.

        Returns [B, T, N, D]: position t is the prediction of frame t+1's (normalised target) tokens.
        """
        return self.from_features(self.trunk_features(tokens), cond, tokens)

    def trunk_features(self, tokens: Tensor) -> Tensor:
        """tokens: [B, T, N, D] -> the frame-causal trunk's output [B, T, N, P] (position t has seen frames <= t)."""
        b, t, n, _ = tokens.shape
        if t > self.max_frames:
            raise ValueError(f"{t} input frames exceed model.max_frames={self.max_frames}; raise model.max_frames")
        if self.motion:  # frame 0 has no predecessor: its difference is 0
            previous = torch.cat([tokens[:, :1], tokens[:, :-1]], dim=1)
            tokens = torch.cat([tokens, tokens - previous], dim=-1)
        x = self.in_proj(tokens) + self.pos_embed + self.frame_embed[:, :t]
        x = rearrange(x, "b t n p -> b (t n) p")
        mask = frame_causal_mask(t, n, device=x.device)
        for block in self.trunk:
            x = block(x, mask)
        return rearrange(x, "b (t n) p -> b t n p", t=t)

    def from_features(self, features: Tensor, cond: Tensor | None, tokens: Tensor) -> Tensor:
        """features: [B, T, N, P] from `trunk_features(tokens)`; cond: [B, T, cond_dim] or None; tokens: the
        predictor's inputs [B, T, N, D] (the base of a residual prediction) -> predictions [B, T, N, D]."""
        b, t = features.shape[:2]
        if cond is not None and cond.shape[:2] != (b, t):
            raise ValueError(f"conditioning must be [B, T, d] = [{b}, {t}, d], got {tuple(cond.shape)}")
        x = rearrange(features, "b t n p -> (b t) n p")
        flat_cond = None if cond is None or self.cond_dim == 0 else rearrange(cond, "b t c -> (b t) c")
        for block in self.head:
            x = block(x, cond=flat_cond)
        out = rearrange(self.out_proj(self.norm(x)), "(b t) n d -> b t n d", b=b)
        out = tokens + out if self.residual else out
        return F.layer_norm(out, out.shape[-1:]) if self.out_layernorm else out


def expand_cond(r: Tensor, num_frames: int) -> Tensor:
    """Conditioning for a rollout step: r [B, d] at the last of `num_frames` positions, zeros before -> [B, T, d].

    Only the last position's vector affects the last position's prediction (the head is frame-local).
    """
    zeros = repeat(torch.zeros_like(r), "b d -> b t d", t=num_frames - 1)
    return torch.cat([zeros, r[:, None]], dim=1)
