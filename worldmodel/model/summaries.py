"""The summaries AdaSSL's latents read (worldmodel/model/latents.py), per transition t -> t+1: the context summary s_t
from the predictor trunk's output at t, and the target summary s+_{t+1} from the target tokens of frame t+1 and the
predictor's inputs at t and t-1.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn


class AttentivePool(nn.Module):
    """tokens [B, T, N, D] -> [B, T, heads * D]: per head, a softmax-weighted mean of the frame's patch tokens.

    A plain mean over patches is dominated by the background (in the default data a digit covers a few of 64
    patches), which leaves the summaries nearly constant and the latent nothing to read; learned weights can attend
    to the patches that move.
    """

    def __init__(self, embed_dim: int, heads: int = 4):
        super().__init__()
        self.score = nn.Linear(embed_dim, heads)

    def forward(self, tokens: Tensor) -> Tensor:
        weights = self.score(tokens).softmax(dim=2)  # [B, T, N, heads]
        pooled = torch.einsum("btnh,btnd->bthd", weights, tokens)
        return rearrange(pooled, "b t h d -> b t (h d)")


class Summaries(nn.Module):
    """Context summaries s_t [B, T, S] from the predictor trunk's output, target summaries s+_t [B, T, S] from
    target tokens.

    s_t pools the trunk's output at position t, which has seen every frame <= t, so the prior reads the same history
    the predictor does (`context_dim` = the predictor width). Pooling the online tokens of frames t-1 and t instead
    leaves the KL blind to the kicks and the prior mean a far worse forecast (docs/results.md, "AdaSSL-V: the
    conditioning's initialisation and beta"). The trunk's output is its residual stream, whose norm grows as the
    predictor learns, so it is layer-normed first: read raw, the summary's norm grew many times over early in
    training on the push world, that growth carried AdaSSL-V's sigma far above its start, and r was ignored until
    it came back down (docs/results.md, "The posterior is handed the change of motion").
    """

    def __init__(self, embed_dim: int, summary_dim: int, heads: int = 4, context_dim: int = 0):
        super().__init__()
        context_dim = context_dim or embed_dim
        self.context_norm = nn.LayerNorm(context_dim)
        self.context_pool = AttentivePool(context_dim, heads)
        self.target_pool = AttentivePool(3 * embed_dim, heads)
        self.context_proj = nn.Linear(heads * context_dim, summary_dim)
        self.target_proj = nn.Linear(heads * 3 * embed_dim, summary_dim)

    def context(self, features: Tensor) -> Tensor:
        """features: the predictor trunk's output [B, T, N, P] -> s [B, T, S] (s_t pools position t)."""
        return self.context_proj(self.context_pool(self.context_norm(features)))

    def target(self, next_tokens: Tensor, current: Tensor, previous: Tensor) -> Tensor:
        """s+ [B, T, S] of the transitions t -> t+1 from the target tokens of frame t+1, next_tokens [B, T, N, D], and
        the predictor's inputs at t and t-1, current and previous [B, T, N, D] (all detached here: the posterior's
        view of x+ is no-grad).

        Each token reads [x+, x+ - x_t, x+ - 2 x_t + x_{t-1}]: the change of motion is what the context cannot
        predict, and the posterior gets it as a difference rather than having to find it. Read from x+ alone, a
        change of intent hardly reached r on the push world; in the smallest model on its true positions
        (experiments/minimal_state.py) r then carried next to nothing, and handed the step its KL found the changes
        of intent (docs/results.md, "The posterior is handed the change of motion").
        """
        x_plus, x_t, x_prev = next_tokens.detach(), current.detach(), previous.detach()
        step = x_plus - x_t
        return self.target_proj(self.target_pool(torch.cat([x_plus, step, step - (x_t - x_prev)], dim=-1)))


def summaries_of(summaries: Summaries, features: Tensor, inputs: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """s_t [B, T-1, S] from the trunk features of frames 0..T-2 [B, T-1, N, P], and s+_{t+1} [B, T-1, S] from the
    target tokens of frames 0..T-1 [B, T, N, D] and the predictor's inputs of frames 0..T-2 [B, T-1, N, D] (frame 0
    has no predecessor: it stands in for its own, as in the predictor's motion input)."""
    previous = torch.cat([inputs[:, :1], inputs[:, :-1]], dim=1)
    return summaries.context(features), summaries.target(target[:, 1:], inputs, previous)
