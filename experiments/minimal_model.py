"""The smallest frame-level JEPA that should forecast the default data, with the project's choices as switches.

    python -m experiments.minimal_model [--steps 1000] [--predictor mlp|project] [--latent ...]

Clips are decoded once by the project's pipeline (`make_eval_loader`) and held in memory; the encoder is the
project's `FrameEncoder` (timm ViT + frame head), the target its EMA copy normalised by `TokenNorm`. The predictor is
an MLP on [z_{t-1}, z_t] (`mlp`) or the project's `Predictor` (`project`). One process, one thread. Prints one JSON
line: the one-step L1 of the prediction over the copy-last L1 on held-out clips, unkicked / kicked, the drift ratio
and the target effective rank; with --latent adassl_v also the KL kick AUC and best-of-K / posterior ratios.

It exists to find design causes fast (DEVELOPERS.md: build the smallest model that should work, then switch the
project's choices on one at a time until the gap appears); the ablation table is in docs/results.md.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

from data_pipeline.config import DataConfig
from data_pipeline.stream import make_eval_loader
from worldmodel.eval.probes import auc, ridge_r2
from worldmodel.model.config import ModelConfig
from worldmodel.model.encoder import FrameEncoder, KeypointDecoder, TokenNorm, ema_update, preprocess
from worldmodel.model.latents import VariationalLatent, gaussian_kl, mlp
from worldmodel.model.monitors import target_health
from worldmodel.model.predictor import Predictor


def load_clips(shards: str, num_clips: int, clip_length: int, image_size: int) -> dict[str, torch.Tensor]:
    """Decode `num_clips` clips of `clip_length` frames: frames uint8 [C, T, H, W, 3], events [C, T-1]."""
    cfg = DataConfig(num_context=2, num_target=clip_length - 2, image_size=image_size, clips_per_video=4)
    frames, events, states = [], [], []
    for batch in make_eval_loader(cfg, shards, num_clips=num_clips, seed=0, batch_size=64):
        frames.append(batch["frames"])
        events.append(batch["events"])
        if "state" in batch:
            states.append(batch["state"])
    out = {"frames": torch.cat(frames), "events": torch.cat(events).float()}
    if states:
        out["state"] = torch.cat(states).float()
    return out


def temporal_variance_penalty(z: torch.Tensor, floor: float) -> torch.Tensor:
    """z [B, T, N, D] -> mean over dims of relu(floor - std over the batch of z_{t+1} - z_t): a price on embeddings
    that do not change from frame to frame (a static background pays nothing in the prediction loss)."""
    diff = (z[:, 1:] - z[:, :-1]).flatten(0, 2)
    return F.relu(floor - (diff.var(0) + 1e-4).sqrt()).mean()


def time_contrastive_loss(pred: torch.Tensor, tgt: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """pred, tgt [B, T, N, D] -> InfoNCE over the time steps of the same clip: the prediction for frame t must match
    frame t's target better than the clip's other frames, which share its background."""
    p = F.normalize(pred.mean(2).float(), dim=-1)
    z = F.normalize(tgt.mean(2).float(), dim=-1)
    logits = torch.einsum("btd,bsd->bts", p, z) / temperature
    labels = torch.arange(logits.shape[1], device=logits.device).expand(logits.shape[0], -1)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def temporal_vc_penalty(z: torch.Tensor, floor: float = 1.0) -> torch.Tensor:
    """z [B, T, N, D] -> VICReg's variance hinge and covariance penalty on the clip-centred embeddings
    z_t - mean_t(z): what is constant within a clip (a static background) is removed before the statistics, so only
    what changes from frame to frame can satisfy them, in as many decorrelated dims as it takes."""
    c = (z - z.mean(1, keepdim=True)).flatten(0, 2)
    c = c - c.mean(0)
    std = (c.var(0) + 1e-4).sqrt()
    cov = c.T @ c / (len(c) - 1)
    off = cov - torch.diag(torch.diag(cov))
    return F.relu(floor - std).mean() + off.pow(2).sum() / c.shape[-1]


def foreground(x: torch.Tensor) -> torch.Tensor:
    """x [B, T, C, H, W] -> x minus the clip's per-pixel median frame: zero on the static background, the moving
    things where they are now (and their negative where they usually are)."""
    return x - x.median(dim=1, keepdim=True).values


class SmallCNN(nn.Module):
    """Two strided convolutions and a linear map: float [B, T, 3, 32, 32] -> [B, T, 1, dim] (the no-ViT control)."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 4, 2, 1), nn.GELU(), nn.Conv2d(32, 64, 4, 2, 1), nn.GELU(), nn.Flatten(1),
            nn.Linear(64 * 8 * 8, dim),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(0, 1)).unflatten(0, x.shape[:2])[:, :, None]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-shards", default="data/moving_digits/train/shard-*.tar")
    p.add_argument("--val-shards", default="data/moving_digits/val/shard-*.tar")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--predictor", choices=("mlp", "project"), default="mlp")
    p.add_argument("--granularity", choices=("frame", "tokens"), default="frame")
    p.add_argument("--prediction", choices=("absolute", "residual", "residual_detached_target"), default="absolute")
    p.add_argument("--loss", choices=("l1", "mse"), default="l1")
    p.add_argument("--latent", choices=("none", "adassl_v"), default="none")
    p.add_argument("--beta", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--encoder", choices=("vit", "cnn", "keypoints"), default="vit")
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=32, help="frames decoded at this size (ViT encoder only)")
    p.add_argument("--ema", type=float, default=0.996)
    p.add_argument(
        "--target",
        choices=("ema", "self"),
        default="ema",
        help="ema: the EMA encoder's normalised output; self: the online output itself (stop-grad), "
        "one space for input and target, with a variance-covariance regulariser against collapse",
    )
    p.add_argument("--vc-weight", type=float, default=1.0)
    p.add_argument("--tvar-weight", type=float, default=0.0, help="weight of temporal_variance_penalty")
    p.add_argument("--tvar-floor", type=float, default=0.1)
    p.add_argument("--tnce-weight", type=float, default=0.0, help="weight of time_contrastive_loss (in-clip)")
    p.add_argument("--input-diff", action="store_true", help="encoder input [x_t, x_t - x_{t-1}] (6 channels)")
    p.add_argument(
        "--recon-weight", type=float, default=0.0,
        help="weight of an auxiliary MLP decoder loss: decode(z_t) - decode(z_{t-1}) must match the pixel change "
        "x_t - x_{t-1} (the static background cancels; only what moves is reconstructed)",
    )  # fmt: skip
    p.add_argument(
        "--recon-target", choices=("change", "frame", "foreground", "keyframe"), default="change",
        help="what --recon-weight decodes: the pixel change between frames (from the change of z), the whole frame, "
        "or the frame minus the clip's median frame (the moving things only); keyframe: frame t from frame 0 and "
        "Gaussian maps of frame t's keypoints (--encoder keypoints; the project's KeypointDecoder, model.recon_weight)",
    )  # fmt: skip
    p.add_argument(
        "--kp-sigma", type=float, default=0.1, help="keyframe: width of the Gaussian maps (model.recon_sigma)"
    )
    p.add_argument(
        "--kp-mask",
        type=float,
        default=0.0,
        help="keyframe: fraction of the reference's patch-sized blocks blanked (model.recon_mask)",
    )
    p.add_argument("--tvc-weight", type=float, default=0.0, help="weight of temporal_vc_penalty (online z)")
    p.add_argument("--tvc-floor", type=float, default=1.0)
    p.add_argument("--pred-weight", type=float, default=1.0, help="weight of the prediction loss (0: the extras alone)")
    p.add_argument(
        "--state-weight", type=float, default=0.0,
        help="control, not a method: weight of a linear head regressing the true positions (standardised state "
        "columns x0, y0, x1, y1) from the online frame embedding; with --pred-weight 0 it is the supervised upper "
        "bound of the probes",
    )  # fmt: skip
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)

    size = args.image_size
    train = load_clips(args.train_shards, 2048, 8, size)
    val = load_clips(args.val_shards, 256, 8, size)
    cfg = ModelConfig(
        img_size=size, patch_size=args.patch, embed_dim=96, depth=4, num_heads=3, granularity=args.granularity,
    )  # fmt: skip

    def inputs(frames: torch.Tensor) -> torch.Tensor:
        """uint8 [B, T, H, W, 3] -> float [B, T, C, H, W]; with --input-diff the frame difference is appended."""
        x = preprocess(frames, size)
        if not args.input_diff:
            return x
        diff = torch.cat([torch.zeros_like(x[:, :1]), x[:, 1:] - x[:, :-1]], dim=1)
        return torch.cat([x, diff], dim=2)

    channels = 6 if args.input_diff else 3
    if args.encoder == "keypoints":  # the project's spatial-softmax frame head (model.frame_head=keypoints)
        encoder = FrameEncoder(dataclasses.replace(cfg, frame_head="keypoints"), in_chans=channels)
    else:
        encoder = FrameEncoder(cfg, in_chans=channels) if args.encoder == "vit" else SmallCNN(cfg.frame_dim)
    target_encoder = copy.deepcopy(encoder).requires_grad_(False)
    width = cfg.frame_dim if args.granularity == "frame" else cfg.embed_dim
    n = 1 if args.granularity == "frame" else (size // args.patch) ** 2
    norm, online_norm = TokenNorm(width, 0.9), TokenNorm(width, 0.9)
    d_r = 4 if args.latent == "adassl_v" else 0
    if args.predictor == "mlp":  # [z_{t-1}, z_t, r] -> z_{t+1}, per token
        predictor = mlp(2 * width + d_r, 256, width)
    else:
        predictor = Predictor(width, n, 16, 96, 4, 2, 3, cond_dim=d_r, residual=args.prediction == "residual")
    latent = VariationalLatent(width, d_r) if d_r else None
    pixel_decoder = nn.Sequential(nn.Linear(width, 512), nn.GELU(), nn.Linear(512, 3 * size * size))
    state_head = nn.Linear(width, 4)
    if args.recon_target == "keyframe":
        if args.encoder != "keypoints":
            raise SystemExit("--recon-target keyframe needs --encoder keypoints")
        pixel_decoder = KeypointDecoder(width // 2, size, sigma=args.kp_sigma, mask=args.kp_mask, block=args.patch)
    if args.state_weight:
        if "state" not in train:
            raise SystemExit("--state-weight needs shards with a `state` (the push world has one)")
        positions = train["state"][..., [0, 1, 4, 5]]
        pos_mean, pos_std = positions.flatten(0, 1).mean(0), positions.flatten(0, 1).std(0)
    modules = nn.ModuleList([encoder, predictor, pixel_decoder, state_head] + ([latent] if latent else []))
    optim = torch.optim.AdamW(modules.parameters(), lr=args.lr, weight_decay=0.0)

    def predict(z: torch.Tensor, r: torch.Tensor | None) -> torch.Tensor:
        """z [B, T, N, D] online, r [B, T-1, d_r] -> predictions of frames 1..T-1 [B, T-1, N, D]."""
        if args.predictor == "project":
            return predictor(z[:, :-1], r)
        prev = torch.cat([z[:, :1], z[:, :-2]], dim=1)
        x = torch.cat([prev, z[:, :-1]], dim=-1)
        if r is not None:
            x = torch.cat([x, r[:, :, None].expand(-1, -1, n, -1)], dim=-1)
        out = predictor(x)
        return out + z[:, :-1] if args.prediction == "residual" else out

    def latents(s: torch.Tensor, s_plus: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled, pooled_plus = s.mean(2), s_plus.mean(2)
        mu_q, sig_q = latent.posterior(pooled, pooled_plus)
        mu_p, sig_p = latent.prior(pooled)
        return {"mu_q": mu_q, "sig_q": sig_q, "mu_p": mu_p, "sig_p": sig_p, "kl": gaussian_kl(mu_q, sig_q, mu_p, sig_p)}

    start = time.perf_counter()
    drift_trace = []
    for step in range(args.steps):
        idx = torch.randint(0, len(train["frames"]), (args.batch,))
        x = inputs(train["frames"][idx])
        raw = encoder(x)
        z = online_norm(raw)
        with torch.no_grad():
            raw_t = target_encoder(x)
            tgt = norm(raw_t)
        vc = torch.zeros(())
        if args.target == "self":
            z = raw
            tgt = raw.detach()
            flat = raw.reshape(-1, raw.shape[-1])
            flat = flat - flat.mean(0)
            std = (flat.var(0) + 1e-4).sqrt()
            cov = flat.T @ flat / (len(flat) - 1)
            off = cov - torch.diag(torch.diag(cov))
            vc = F.relu(1 - std).mean() + off.pow(2).sum() / raw.shape[-1]
        r, kl = None, torch.zeros(())
        if latent is not None:
            lat = latents(z[:, :-1], tgt[:, 1:])
            r = lat["mu_q"] + lat["sig_q"] * torch.randn_like(lat["mu_q"])
            kl = lat["kl"].mean()
        pred = predict(z, r)
        if args.prediction == "residual_detached_target":
            pred = pred + tgt[:, :-1]
        err = pred - tgt[:, 1:]
        loss = err.abs().mean() if args.loss == "l1" else err.pow(2).mean()
        beta = args.beta * min(1.0, step / (0.2 * args.steps))
        extra = torch.zeros(())
        if args.tvar_weight:
            extra = extra + args.tvar_weight * temporal_variance_penalty(z, args.tvar_floor)
        if args.tnce_weight:
            extra = extra + args.tnce_weight * time_contrastive_loss(pred, tgt[:, 1:])
        if args.state_weight:
            goal = (positions[idx] - pos_mean) / pos_std
            extra = extra + args.state_weight * (state_head(z.mean(2)) - goal).pow(2).mean()
        if args.tvc_weight:
            extra = extra + args.tvc_weight * temporal_vc_penalty(z, args.tvc_floor)
        if args.recon_weight:
            if args.recon_target == "keyframe":  # the project's model.recon_weight term
                recon = pixel_decoder.loss(raw, x[:, :, :3])
            elif args.recon_target == "change":
                decoded = pixel_decoder(z.mean(2)).unflatten(-1, (3, size, size))  # [B, T, 3, size, size]
                change = (x[:, 1:, :3] - x[:, :-1, :3]).float()
                recon = (decoded[:, 1:] - decoded[:, :-1] - change).pow(2).mean()
            else:
                decoded = pixel_decoder(z.mean(2)).unflatten(-1, (3, size, size))
                goal = x[:, :, :3] if args.recon_target == "frame" else foreground(x[:, :, :3])
                recon = (decoded - goal.float()).pow(2).mean()
            extra = extra + args.recon_weight * recon
        optim.zero_grad()
        (args.pred_weight * loss + beta * kl + args.vc_weight * vc + extra).backward()
        optim.step()
        ema_update(target_encoder, encoder, args.ema + (1 - args.ema) * step / args.steps)
        norm.update(raw_t)
        online_norm.update(raw)
        if step % 100 == 99:
            drift_trace.append(round(float(target_health(tgt)["drift"]), 3))

    encoder.eval()
    with torch.no_grad():
        x = inputs(val["frames"])
        z, tgt = online_norm(encoder(x)), norm(target_encoder(x))
        if args.target == "self":
            z = tgt = encoder(x)
        t = 3  # predict frame 4 from frames <= 3 (transition 3 -> 4), context of 4 frames like the project's eval
        kicked = val["events"][:, t] > 0.5
        copy_l1 = (tgt[:, t] - tgt[:, t + 1]).abs().mean((1, 2))
        out = {"args": vars(args), "seconds": round(time.perf_counter() - start, 1), "drift_every_100": drift_trace}
        health = target_health(tgt)
        out.update(drift=float(health["drift"]), target_eff_rank=float(health["target_eff_rank"]))
        if "state" in val:  # ridge probes of the state's positions from the target embedding, half/half clips
            feats = tgt.flatten(2).flatten(0, 1).numpy()  # a token grid: every token in its place, not their mean
            state = val["state"].flatten(0, 1).numpy()
            half = len(val["frames"]) // 2 * tgt.shape[1]
            r2 = ridge_r2(feats[:half], state[:half], feats[half:], state[half:], 1.0)
            out["probe_r2_per_state_column"] = [round(float(v), 3) for v in r2]
            feats = z.flatten(2).flatten(0, 1).numpy()  # the online encoder's (what the predictor reads)
            r2 = ridge_r2(feats[:half], state[:half], feats[half:], state[half:], 1.0)
            out["online_probe_r2_per_state_column"] = [round(float(v), 3) for v in r2]

        def ratio(pred: torch.Tensor) -> list[float]:
            l1 = (pred - tgt[:, t + 1]).abs().mean((1, 2))
            return [round(float(l1[~kicked].mean() / copy_l1[~kicked].mean()), 3),
                    round(float(l1[kicked].mean() / copy_l1[kicked].mean()), 3)]  # fmt: skip

        if latent is None:
            out["ratio_unkicked_kicked"] = ratio(predict(z[:, : t + 2], None)[:, t])
        else:
            lat = latents(z[:, :-1], tgt[:, 1:])
            mean_pred = predict(z[:, : t + 2], lat["mu_p"][:, : t + 1])[:, t]
            post_pred = predict(z[:, : t + 2], lat["mu_q"][:, : t + 1])[:, t]
            samples = []
            for _ in range(8):
                r = lat["mu_p"] + lat["sig_p"] * torch.randn_like(lat["mu_p"])
                samples.append(predict(z[:, : t + 2], r[:, : t + 1])[:, t])
            errs = torch.stack([(s - tgt[:, t + 1]).abs().mean((1, 2)) for s in samples])
            best = errs.min(0).values
            out["prior_mean_ratio"] = ratio(mean_pred)
            out["posterior_ratio"] = ratio(post_pred)
            out["best_of_8_ratio"] = [round(float(best[~kicked].mean() / copy_l1[~kicked].mean()), 3),
                                      round(float(best[kicked].mean() / copy_l1[kicked].mean()), 3)]  # fmt: skip
            kl = lat["kl"][:, 1:].flatten().numpy()  # transition 0 has no velocity in its context
            ev = val["events"][:, 1:].flatten().numpy()
            out["kl_kicked_unkicked"] = [round(float(kl[ev > 0.5].mean()), 3), round(float(kl[ev < 0.5].mean()), 3)]
            score = auc(kl, ev)  # None when the held-out transitions hold one class only
            out["kl_auc"] = None if score is None else round(score, 3)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
