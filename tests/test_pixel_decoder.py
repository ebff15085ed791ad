"""The pixel decoder: it learns real frames from frozen latents, its metrics are what they say, and a comparison of
runs in different latent spaces is in one set of units."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.stream import make_eval_loader
from worldmodel.eval.collect import Collected, process_batch
from worldmodel.eval.compare import compare_runs
from worldmodel.eval.pixel_decoder import (
    PIXEL_METRICS,
    PixelDecoder,
    PixelDecoderSpec,
    load_decoder,
    mse_per_frame,
    pixel_errors,
    psnr,
    ssim,
    to_unit,
    train_decoder,
    training_frames,
)
from worldmodel.eval.rollout_metrics import ErrorAccumulator
from worldmodel.eval.runner import evaluate_run, evaluated_final, load_run
from worldmodel.model.world_model import WorldModel
from worldmodel.run.config import load_config
from worldmodel.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def _cfg(shards: Path, run_dir: Path | None = None, latent: str = "adassl_v"):
    return load_config(
        ROOT / "configs" / "tiny.yaml",
        [
            f"run_dir={run_dir or 'unused'}",
            f"data.train_shards={shards / 'train' / '*.tar'}",
            f"data.val_shards={shards / 'val' / '*.tar'}",
            f"model.latent={latent}",
            "pixel_decoder.steps=30",
            "pixel_decoder.batch_size=32",
            "pixel_decoder.width=64",
            "pixel_decoder.train_frames=192",
        ],
    )


# ---- metrics against direct computations -----------------------------------------------------------------------


def _ssim_direct(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM of one-channel images [h, w] written out window by window (11x11 Gaussian, sigma 1.5, valid region)."""
    ax = np.arange(11) - 5.0
    g = np.exp(-(ax**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            a, b = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb = (w * a * a).sum() - ma**2, (w * b * b).sum() - mb**2
            cov = (w * a * b).sum() - ma * mb
            values.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


def test_pixel_metrics_equal_direct_computation():
    gen = torch.Generator().manual_seed(0)
    pred = torch.rand(2, 3, 14, 13, 1, generator=gen)  # [B, H, h, w, c]
    truth = (pred + 0.1 * torch.randn(2, 3, 14, 13, 1, generator=gen)).clamp(0, 1)
    errors = pixel_errors(pred, truth)
    assert set(errors) == set(PIXEL_METRICS) and all(v.shape == (2, 3) for v in errors.values())
    mse = ((pred - truth) ** 2).mean(dim=(-3, -2, -1))
    torch.testing.assert_close(errors["mse"], mse)
    torch.testing.assert_close(errors["psnr"], 10 * torch.log10(1 / mse))
    for b in range(2):
        for h in range(3):
            direct = _ssim_direct(pred[b, h, ..., 0].double().numpy(), truth[b, h, ..., 0].double().numpy())
            assert errors["ssim"][b, h].item() == pytest.approx(direct, abs=1e-5)
    # identical frames: SSIM 1, PSNR at its cap; constant frames a, b: the closed form of SSIM
    same = pixel_errors(pred, pred)
    torch.testing.assert_close(same["ssim"], torch.ones(2, 3))
    torch.testing.assert_close(same["psnr"], torch.full((2, 3), 60.0))
    a, b = torch.full((1, 16, 16, 3), 0.2), torch.full((1, 16, 16, 3), 0.6)
    expected = (2 * 0.2 * 0.6 + 0.01**2) / (0.2**2 + 0.6**2 + 0.01**2)
    assert ssim(a, b).item() == pytest.approx(expected, abs=2e-4)  # float32 variances of constant frames
    assert psnr(torch.tensor(0.01)).item() == pytest.approx(20.0)
    # the accumulator averages per-frame values over clips, split by event
    acc = ErrorAccumulator(3, PIXEL_METRICS)
    events = torch.tensor([[True, False, False], [False, False, True]])
    acc.add("m", errors, events)
    result = acc.result()["m"]
    assert result["all"]["psnr"] == pytest.approx(errors["psnr"].mean(0).tolist(), rel=1e-6)
    assert result["event"]["mse"][0] == pytest.approx(errors["mse"][0, 0].item(), rel=1e-6)
    assert result["event"]["mse"][1] is None and result["no_event"]["count"] == [1, 2, 1]


def test_decoder_shapes_for_frame_and_token_latents():
    for n, d, size in ((1, 64, 32), (16, 32, 64), (4, 8, 24)):
        decoder = PixelDecoder(PixelDecoderSpec(n, d, size, 3, width=48))
        out = decoder(torch.randn(2, 5, n, d))
        assert out.shape == (2, 5, size, size, 3) and out.min() >= 0 and out.max() <= 1
    with pytest.raises(ValueError, match="square token grid"):
        PixelDecoder(PixelDecoderSpec(3, 8, 32, 3))


# ---- learning real frames ---------------------------------------------------------------------------------------


def test_decoder_learns_real_frames_of_the_default_data(digits_shards):
    """From the frozen target latents of a (barely trained) tiny world model, a small budget already reconstructs
    held-out moving-digit frames far better than the best constant image (the mean training frame)."""
    cfg = _cfg(digits_shards)
    torch.manual_seed(0)
    model = WorldModel(cfg.model).eval()
    frames, latents = training_frames(model, cfg.data, cfg.data.train_shards, max_frames=96, batch_size=4, device=CPU)
    assert frames.dtype == torch.uint8 and frames.shape == (96, 64, 64, 3) and latents.shape == (96, 1, 64)
    decoder, record = train_decoder(
        latents, frames, steps=150, batch_size=32, lr=3e-3, width=64, device=CPU, progress=False
    )
    assert record["steps"] == 150 and math.isfinite(record["train_mse"])
    held_out = next(iter(make_eval_loader(cfg.data, cfg.data.val_shards, num_clips=4, batch_size=4)))["frames"]
    truth = to_unit(held_out)  # [4, T, 64, 64, 3]
    with torch.no_grad():
        latents_out = model.encode_target(held_out)  # [4, T, 1, 64]
        decoded_psnr = psnr(mse_per_frame(decoder(latents_out), truth)).mean().item()
        # the same latents given to the wrong clips: the decoder reads the latent, not a memorised average
        swapped_psnr = psnr(mse_per_frame(decoder(latents_out.roll(1, dims=0)), truth)).mean().item()
    mean_frame = to_unit(frames).mean(dim=0).expand_as(truth)
    constant_psnr = psnr(mse_per_frame(mean_frame, truth)).mean().item()
    assert decoded_psnr > constant_psnr + 2.5, (decoded_psnr, constant_psnr)
    assert decoded_psnr > swapped_psnr + 2.0, (decoded_psnr, swapped_psnr)


# ---- the evaluation path: process_batch, evaluate_run, compare --------------------------------------------------


@pytest.fixture(scope="module")
def two_runs(digits_shards, tmp_path_factory):
    """A plain-JEPA and an AdaSSL-V tiny run (different latent spaces), both evaluated with pixel metrics."""
    root = tmp_path_factory.mktemp("pixel_runs")
    runs = []
    for latent in ("none", "adassl_v"):
        cfg = _cfg(digits_shards, root / latent, latent)
        train(cfg)
        evaluate_run(root / latent, str(digits_shards / "val" / "*.tar"), progress=False, pixels=True)
        runs.append(root / latent)
    return runs


def test_pixel_metrics_of_copy_last_and_decoder_limit_are_direct(two_runs, digits_shards):
    run = two_runs[1]
    cfg, model, _, step = load_run(run, CPU)
    decoder, record = load_decoder(run, step, CPU)
    assert record["checkpoint_step"] == step and record["settings"]["steps"] == 30
    collected = Collected(
        errors=ErrorAccumulator(2), num_strips=2, decoder=decoder, pixels=ErrorAccumulator(2, PIXEL_METRICS)
    )
    batch = next(iter(make_eval_loader(cfg.data, str(digits_shards / "val" / "*.tar"), num_clips=4, batch_size=4)))
    process_batch(
        model,
        batch,
        collected,
        num_context=4,
        horizon=2,
        num_samples=3,
        device=CPU,
        generator=torch.Generator().manual_seed(0),
    )
    result = collected.pixels.result()
    assert {"copy_last", "decoder_limit", "prior_mean", "posterior", "zero", "best_of_k", "mean_of_k"} <= set(result)
    truth = to_unit(batch["frames"][:, 4:6])
    copy = to_unit(batch["frames"][:, 3:4]).expand_as(truth)
    assert result["copy_last"]["all"]["psnr"] == pytest.approx(psnr(mse_per_frame(copy, truth)).mean(0).tolist())
    # the energy score in pixels: a deterministic row's is its RMS pixel error per frame
    rms = mse_per_frame(copy, truth).sqrt().mean(0).tolist()
    assert result["copy_last"]["all"]["energy_score"] == pytest.approx(rms, rel=1e-5)
    assert result["best_of_k"]["all"]["energy_score"] == result["mean_of_k"]["all"]["energy_score"]
    assert "spread_skill" in result["best_of_k"]["all"] and "spread_skill" not in result["prior_mean"]["all"]
    with torch.no_grad():
        limit = decoder(model.encode_target(batch["frames"])[:, 4:6])
    assert result["decoder_limit"]["all"]["mse"] == pytest.approx(mse_per_frame(limit, truth).mean(0).tolist())
    # best-of-K picks, per clip, the sample with the lowest pixel MSE: never above the mean of the K
    best, mean = result["best_of_k"]["all"]["mse"], result["mean_of_k"]["all"]["mse"]
    assert sum(best) <= sum(mean) + 1e-9
    strips = collected.decoded_strips
    assert list(strips) == ["decoded truth", "prior_mean", "sample 1", "sample 2", "sample 3", "posterior", "copy_last"]
    assert all(len(rows) == 1 and rows[0].shape == (2, 2, 64, 64, 3) for rows in strips.values())


def test_evaluate_writes_pixel_metrics_strips_gifs_and_reuses_the_decoder(two_runs, digits_shards):
    run = two_runs[1]
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    decoded = metrics["decoded"]
    assert decoded["decoder"]["reused"] is False and decoded["decoder"]["checkpoint_step"] == metrics["checkpoint_step"]
    for mode in ("copy_last", "decoder_limit", "prior_mean", "best_of_k"):
        for split in ("all", "event", "no_event"):
            assert len(decoded["modes"][mode][split]["psnr"]) == metrics["horizon"]
    for name in ("psnr.png", "decoded-strip-00.png", "decoded-00.gif"):
        assert (run / "eval" / name).stat().st_size > 0 and name in metrics["plots"]
    report = (run / "eval" / "report.md").read_text()
    assert "## Decoded rollouts" in report and "decoder_limit" in report
    assert evaluated_final(run, pixels=True)
    before = (run / "pixel_decoder" / "decoder.safetensors").read_bytes()
    again = evaluate_run(run, str(digits_shards / "val" / "*.tar"), progress=False, pixels=True)
    assert again["decoded"]["decoder"]["reused"] is True
    assert (run / "pixel_decoder" / "decoder.safetensors").read_bytes() == before
    assert again["decoded"]["modes"]["decoder_limit"] == decoded["modes"]["decoder_limit"]
    meta_path = run / "pixel_decoder" / "decoder.json"
    meta = json.loads(meta_path.read_text())
    assert load_decoder(run, metrics["checkpoint_step"] + 1, CPU) is None  # another checkpoint: train again
    meta_path.write_text(json.dumps({**meta, "architecture": 1}))
    assert load_decoder(run, metrics["checkpoint_step"], CPU) is None  # another architecture: train again
    meta_path.write_text(json.dumps(meta))
    evaluate_run(run, str(digits_shards / "val" / "*.tar"), progress=False)  # without --pixels
    assert not evaluated_final(run, pixels=True) and evaluated_final(run)
    evaluate_run(run, str(digits_shards / "val" / "*.tar"), progress=False, pixels=True)  # as the module found it


def test_compare_puts_two_latent_spaces_in_the_same_units(two_runs, tmp_path):
    none_metrics, adassl_metrics = (json.loads((r / "eval" / "metrics.json").read_text()) for r in two_runs)
    # different latent spaces: different decoders, but copy-last is the same real pixels for both
    assert none_metrics["decoded"]["modes"]["copy_last"] == adassl_metrics["decoded"]["modes"]["copy_last"]
    result = compare_runs([str(r) for r in two_runs], tmp_path)
    head = result["headline"]
    assert head["splits"] == ["no_event", "event"] and head["steps"] == [1]
    rows = {(r["run"], r["mode"]): r for r in head["rows"]}
    assert {
        ("any run", "copy_last"),
        ("none", "prior_mean"),
        ("adassl_v", "prior_mean"),
        ("adassl_v", "best_of_k"),
        ("adassl_v", "posterior"),
        ("none", "noisy_best_of_k"),
        ("none", "decoder_limit"),
        ("adassl_v", "decoder_limit"),
    } <= set(rows)
    assert all(r["units"] == "pixels" for r in head["rows"])
    for run, metrics in (("none", none_metrics), ("adassl_v", adassl_metrics)):
        modes = metrics["decoded"]["modes"]
        row = rows[(run, "prior_mean")]
        assert row["psnr"]["no_event"] == [modes["prior_mean"]["no_event"]["psnr"][0]]
        expected = modes["prior_mean"]["event"]["mse"][0] / modes["copy_last"]["event"]["mse"][0]
        assert row["over_copy_last"]["event"] == [pytest.approx(expected)]
        assert row["energy_score"]["event"] == [modes["prior_mean"]["event"]["energy_score"][0]]
    # the noise-matched baseline of the deterministic run, decoded, beside AdaSSL-V's best-of-K
    assert "noisy_best_of_k" in none_metrics["decoded"]["modes"] and "noisy_best_of_k" in none_metrics["modes"]
    assert "noisy_best_of_k" not in adassl_metrics["modes"]
    assert rows[("adassl_v", "prior_mean")]["kick_auc"] is not None and rows[("none", "prior_mean")]["kick_auc"] is None
    text = (tmp_path / "compare.md").read_text()
    assert text.index("## Headline (shared units)") < text.index("## All metrics")
    assert "ES unkicked (h1)" in text
    assert (tmp_path / "psnr.png").stat().st_size > 0 and not result["notes"]
