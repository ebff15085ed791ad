"""The pixel decoder: a small convolutional decoder from a frame's target latents to its pixels, trained after the
fact on the frozen world model, so that rollouts can be looked at and every model scored in the same units.

It never changes the world model: the target encoder's outputs (`WorldModel.encode_target`, [B, T, N, D]) are
computed under no grad and the decoder learns pixels from them on the run's training shards. Its checkpoint lives in
RUN_DIR/pixel_decoder/ (decoder.safetensors + decoder.json with the weights' sha256, written into a temporary folder
and renamed), tied to the world-model checkpoint step it was trained on; the next evaluation of the same checkpoint
reuses it, and trains it again (with a warning) when the store is corrupt on disk.

Architecture. The latent grid of one frame, [N, D], becomes a small feature map: with model.granularity=frame
(N = 1) a linear layer to width x base x base (base = img_size / 8, at least 1), with granularity tokens the patch
grid (side = sqrt(N)) through a 1x1 conv. Then upsampling stages (nearest x2, 3x3 conv, GroupNorm, SiLU, with a
residual 3x3 conv) halve the width (down to 16) until the map is half of img_size wide, and the last x2 is a
sub-pixel convolution (a 3x3 conv to 4C channels, then pixel shuffle: no convolution at full resolution, where it
would cost the most), through a sigmoid: pixels in [0, 1]. Loss: mean squared error on [0, 1] pixels (what PSNR
measures).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import load_model, save_model
from torch import Tensor, nn
from tqdm import tqdm

from worldmodel.eval import EvaluationError

DECODER_DIR = "pixel_decoder"
ARCHITECTURE = 2  # stored in decoder.json; a decoder of another architecture version is trained again, not loaded


@dataclass
class PixelDecoderSpec:
    """Shape of the decoder (saved beside its weights so that it can be rebuilt)."""

    num_tokens: int  # N latent tokens per frame
    dim: int  # D
    img_size: int
    channels: int
    width: int = 128  # channels of the first feature map; halved (down to 16) at every upsampling stage


class _Up(nn.Module):
    """x2 nearest upsampling, then conv-norm-SiLU and a residual conv-norm-SiLU: [B, Ci, s, s] -> [B, Co, 2s, 2s]."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        groups = 8 if cout % 8 == 0 else 1
        self.conv = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(groups, cout), nn.SiLU())
        self.res = nn.Sequential(nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(groups, cout), nn.SiLU())

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))
        return x + self.res(x)


class PixelDecoder(nn.Module):
    """Target latents [..., N, D] -> pixels [..., img_size, img_size, C] in [0, 1] (see the module docstring)."""

    def __init__(self, spec: PixelDecoderSpec):
        super().__init__()
        self.spec = spec
        side = math.isqrt(spec.num_tokens)
        if spec.num_tokens == 1:
            side = max(1, spec.img_size // 8)
            self.stem: nn.Module = nn.Linear(spec.dim, spec.width * side * side)
        elif side * side == spec.num_tokens:
            self.stem = nn.Conv2d(spec.dim, spec.width, 1)
        else:
            raise ValueError(
                f"the pixel decoder needs one token or a square token grid per frame, got N={spec.num_tokens}"
            )
        self.side = side
        stages, width, size = [], spec.width, side
        while size * 2 < spec.img_size:
            out = max(16, width // 2)
            stages.append(_Up(width, out))
            width, size = out, size * 2
        self.stages = nn.Sequential(*stages)
        # the last x2 as a sub-pixel convolution: no conv at full resolution, where it would cost the most
        self.shuffle = 2 if size * 2 <= spec.img_size else 1
        self.out = nn.Conv2d(width, spec.channels * self.shuffle**2, 3, padding=1)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens: [..., N, D] -> pixels float [..., img_size, img_size, C] in [0, 1]."""
        *lead, n, d = tokens.shape
        x = tokens.float().reshape(-1, n, d)
        if n == 1:
            x = self.stem(x[:, 0]).reshape(-1, self.spec.width, self.side, self.side)
        else:
            x = self.stem(rearrange(x, "m (h w) d -> m d h w", h=self.side))
        x = F.pixel_shuffle(self.out(self.stages(x)), self.shuffle)
        if x.shape[-1] != self.spec.img_size:
            x = F.interpolate(x, size=self.spec.img_size, mode="bilinear", align_corners=False)
        x = torch.sigmoid(x)
        return rearrange(x, "m c h w -> m h w c").reshape(*lead, *x.shape[-2:], x.shape[1])


def to_unit(frames: Tensor) -> Tensor:
    """uint8 frames [..., H, W, C] -> float [..., H, W, C] in [0, 1]."""
    return frames.float() / 255.0


def mse_per_frame(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over each frame's pixels and channels: [..., H, W, C] (both in [0, 1]) -> [...]."""
    return (pred.float() - target.float()).square().mean(dim=(-3, -2, -1))


PSNR_CAP = 60.0  # dB: a frame predicted exactly (MSE below 1e-6, e.g. copy-last of a still frame) counts as 60


def psnr(mse: Tensor) -> Tensor:
    """Peak signal-to-noise ratio in dB of per-frame MSEs of [0, 1] pixels: 10 log10(1 / mse), elementwise, capped
    at PSNR_CAP so that an exact frame cannot dominate a mean over frames."""
    return 10.0 * torch.log10(1.0 / mse.float().clamp_min(10 ** (-PSNR_CAP / 10)))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(pred: Tensor, target: Tensor, window: int = 11, sigma: float = 1.5) -> Tensor:
    """Structural similarity per frame (Wang et al. 2004: Gaussian window 11, sigma 1.5, C1 = 0.01^2, C2 = 0.03^2,
    over the valid region, averaged over channels): pred, target float [..., H, W, C] in [0, 1] -> [...].

    Frames smaller than the window use a window as wide as the frame.
    """
    *lead, h, w, c = pred.shape
    size = min(window, h, w)
    kernel = _gaussian_window(size, sigma).to(pred.device)[None, None].expand(c, 1, size, size)
    x = rearrange(pred.float().reshape(-1, h, w, c), "m h w c -> m c h w")
    y = rearrange(target.float().reshape(-1, h, w, c), "m h w c -> m c h w")

    def blur(z: Tensor) -> Tensor:
        return F.conv2d(z, kernel, groups=c)

    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    value = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return value.mean(dim=(1, 2, 3)).reshape(lead)


# ---- training and storage --------------------------------------------------------------------------------------


def decoder_dir(run_dir: str | Path) -> Path:
    """Where a run's pixel decoder is stored: RUN_DIR/pixel_decoder."""
    return Path(run_dir) / DECODER_DIR


def load_decoder(run_dir: str | Path, checkpoint_step: int, device: torch.device) -> tuple[PixelDecoder, dict] | None:
    """The run's pixel decoder and its record (decoder.json) if one was trained on the world model's checkpoint at
    `checkpoint_step`; None otherwise (never trained, trained on another checkpoint or with another ARCHITECTURE).

    A store that is corrupt on disk (decoder.json unreadable or malformed, decoder.safetensors unreadable or not the
    bytes whose sha256 decoder.json records) is also None, with a warning: the decoder is derived data, so the
    caller trains it again. A store written before the digest was recorded is loaded if it loads.
    """
    folder = decoder_dir(run_dir)
    meta_path, weights = folder / "decoder.json", folder / "decoder.safetensors"
    if not meta_path.is_file() or not weights.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_bytes())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        return _corrupt_store(folder, f"decoder.json is unreadable ({err})")
    if meta.get("checkpoint_step") != checkpoint_step or meta.get("architecture") != ARCHITECTURE:
        return None
    digest = meta.pop("sha256", None)
    if digest is not None:
        try:
            actual = _sha256(weights)
        except OSError as err:
            return _corrupt_store(folder, f"decoder.safetensors is unreadable ({err})")
        if actual != digest:
            return _corrupt_store(folder, "decoder.safetensors does not match the sha256 decoder.json records")
    try:
        decoder = PixelDecoder(PixelDecoderSpec(**meta["spec"]))
        load_model(decoder, str(weights), device=str(device))
    except Exception as err:  # a malformed spec or weights file: safetensors and torch raise several kinds
        return _corrupt_store(folder, f"it does not load ({type(err).__name__}: {err})")
    return decoder.to(device).eval(), meta


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _corrupt_store(folder: Path, problem: str) -> None:
    print(f"warning: the pixel decoder in {folder} is corrupt: {problem}; training it again", file=sys.stderr)
    return None


def save_decoder(run_dir: str | Path, decoder: PixelDecoder, meta: dict) -> Path:
    """Write decoder.safetensors + decoder.json (with the weights' sha256) into RUN_DIR/pixel_decoder atomically (a
    temporary folder renamed over the old one); returns the folder."""
    folder = decoder_dir(run_dir)
    tmp = folder.with_name(f".{DECODER_DIR}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(decoder, str(tmp / "decoder.safetensors"))
    record = {**meta, "spec": asdict(decoder.spec), "sha256": _sha256(tmp / "decoder.safetensors")}
    (tmp / "decoder.json").write_text(json.dumps(record, indent=2))
    old = folder.with_name(f".{DECODER_DIR}.old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def training_frames(
    model: nn.Module, data_cfg, shards: str, *, max_frames: int, batch_size: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Frames of the training shards and their target latents, held in memory for the decoder's training.

    One clip per video, in shard order (the deterministic eval stream), until `max_frames` frames: returns uint8
    frames [F, H, W, C] (on the CPU) and float32 latents [F, N, D] (on the CPU) from `model.encode_target`.
    """
    from data_pipeline.stream import make_eval_loader  # the model's side of this module needs no pipeline

    num_clips = max(1, math.ceil(max_frames / data_cfg.clip_length))
    frames, latents = [], []
    with torch.no_grad():
        for batch in make_eval_loader(data_cfg, shards, num_clips=num_clips, batch_size=batch_size):
            clip = batch["frames"]  # uint8 [B, T, H, W, C]
            frames.append(rearrange(clip, "b t h w c -> (b t) h w c"))
            latents.append(rearrange(model.encode_target(clip.to(device)).float().cpu(), "b t n d -> (b t) n d"))
    if not frames:
        raise ValueError(f"the training shards {shards!r} gave no clip to train the pixel decoder on")
    return torch.cat(frames)[:max_frames], torch.cat(latents)[:max_frames]


def train_decoder(
    latents: Tensor,
    frames: Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    width: int,
    device: torch.device,
    seed: int = 0,
    progress: bool = True,
) -> tuple[PixelDecoder, dict]:
    """Fit a pixel decoder to (latents [F, N, D], uint8 frames [F, H, W, C]) pairs: `steps` AdamW steps on random
    batches of `batch_size` frames, learning rate `lr` with a 5% linear warm-up and a cosine decay.

    Returns the decoder (eval mode, on `device`) and {"steps", "train_mse" (mean over the last 10% of steps),
    "seconds"}.
    """
    n, d = latents.shape[1:]
    size, channels = frames.shape[1], frames.shape[-1]
    torch.manual_seed(seed)
    decoder = PixelDecoder(PixelDecoderSpec(n, d, size, channels, width)).to(device)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=lr, weight_decay=1e-4)
    warmup = max(1, steps // 20)
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="pixel decoder", disable=not progress, unit="step")
    for step in bar:
        scale = (
            (step + 1) / warmup
            if step < warmup
            else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        )
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        pick = torch.randint(0, len(frames), (batch_size,), generator=generator)
        loss = mse_per_frame(decoder(latents[pick].to(device)), to_unit(frames[pick].to(device))).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"the pixel decoder's loss is {loss.item()} at step {step}; lower pixel_decoder.lr"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 25 == 0 or step == steps - 1:
            bar.set_postfix(mse=f"{losses[-1]:.4f}", psnr=f"{float(psnr(torch.tensor(losses[-1]))):.1f} dB")
    tail = losses[-max(1, steps // 10) :]
    return decoder.eval(), {"steps": steps, "train_mse": sum(tail) / len(tail), "seconds": time.perf_counter() - start}


def fit_or_load(
    run_dir: str | Path,
    model: nn.Module,
    cfg,
    checkpoint_step: int,
    device: torch.device,
    *,
    progress: bool = True,
) -> tuple[PixelDecoder, dict]:
    """The run's pixel decoder for the world model's checkpoint at `checkpoint_step`: loaded from
    RUN_DIR/pixel_decoder when it was trained on that checkpoint with the same settings, otherwise trained now on
    `cfg.data.train_shards` (settings: the config's `pixel_decoder` section) and saved there.

    cfg: the run's ExperimentConfig. Returns (decoder in eval mode, its record: the decoder.json fields plus
    "reused": bool).
    """
    settings = asdict(cfg.pixel_decoder)
    loaded = load_decoder(run_dir, checkpoint_step, device)
    if loaded is not None and loaded[1].get("settings") == settings:
        return loaded[0], {**loaded[1], "reused": True}
    try:
        frames, latents = training_frames(
            model,
            cfg.data,
            cfg.data.train_shards,
            max_frames=settings["train_frames"],
            batch_size=cfg.eval.batch_size,
            device=device,
        )
    except ValueError as err:  # ShardListError, or shards without a clip
        raise EvaluationError(
            f"the pixel decoder trains on the run's data.train_shards={cfg.data.train_shards!r}, which cannot be "
            f"read here: {err}. Point data.train_shards in {Path(run_dir) / 'config.yaml'} at the training shards"
        ) from err
    decoder, record = train_decoder(
        latents,
        frames,
        steps=settings["steps"],
        batch_size=settings["batch_size"],
        lr=settings["lr"],
        width=settings["width"],
        device=device,
        seed=cfg.seed,
        progress=progress,
    )
    meta = {
        "checkpoint_step": checkpoint_step,
        "architecture": ARCHITECTURE,
        "settings": settings,
        "shards": cfg.data.train_shards,
        "num_frames": len(frames),
        **record,
    }
    save_decoder(run_dir, decoder, meta)
    return decoder, {**meta, "spec": asdict(decoder.spec), "reused": False}


# ---- pixel-space errors ----------------------------------------------------------------------------------------

PIXEL_METRICS = ("mse", "psnr", "ssim")


def pixel_errors(pred: Tensor, truth: Tensor) -> dict[str, Tensor]:
    """Per-frame pixel errors of predicted frames: pred, truth float [..., H, W, C] in [0, 1] ->
    {"mse", "psnr" (dB, of that frame's MSE), "ssim"}, each float32 [...]."""
    mse = mse_per_frame(pred, truth)
    return {"mse": mse, "psnr": psnr(mse), "ssim": ssim(pred, truth)}
