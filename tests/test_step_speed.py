"""benchmarks.step_speed on the tiny config, on CPU: every field, consistent figures, the data-fed and compiled
paths, and the synthetic mode where the decoders and webdataset are not installed (as on the GPU machines)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.step_speed import PEAK_TFLOPS, main, peak_tflops

ROOT = Path(__file__).resolve().parents[1]
FIELDS = {
    "config", "overrides", "device", "device_name", "torch", "mixed_precision", "compile", "compile_backend", "tf32",
    "fused_adamw", "timm_fused_attn", "synthetic", "latent", "params_m", "batch_size", "grad_accum_steps",
    "clip_length", "image_size", "patch_size", "num_workers", "warmup_steps", "warmup_s", "steps", "step_s",
    "data_wait_s", "fwd_bwd_s", "optimizer_s", "ema_s", "data_wait_share", "flops_per_step", "attention_flop_share",
    "conv_flop_share", "tflops_s", "peak_tflops", "mfu", "clips_s", "frames_s", "peak_memory_gb", "peak_memory_kind",
    "decode_fps_per_core", "decode_workers_needed", "torch_threads", "threads_rule",
}  # fmt: skip
# what the GPU machines lack: the decoders, the shard reader, and the evaluation's and logging's extras
NOT_INSTALLED = (
    "decord", "av", "webdataset", "braceexpand", "scipy", "sklearn", "matplotlib", "tensorboard", "skvideo",
)  # fmt: skip


def _run(capsys, *args: str) -> dict:
    assert main(["--config", "configs/tiny.yaml", "--cpu", *args]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    return json.loads(lines[0])


def test_synthetic_run_prints_every_field_and_they_agree(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    record = _run(capsys, "--synthetic", "--steps", "3", "--warmup", "1", "--peak-tflops", "2.5",
                  "--decode-fps-per-core", "100")  # fmt: skip
    assert set(record) == FIELDS
    assert record["device"] == "cpu" and record["synthetic"] and record["mixed_precision"] == "no"
    assert not record["compile"] and record["timm_fused_attn"] and not record["fused_adamw"]
    phases = sum(record[k] for k in ("data_wait_s", "fwd_bwd_s", "optimizer_s", "ema_s"))
    assert record["step_s"] == pytest.approx(phases, abs=5e-5)
    assert min(record[k] for k in ("fwd_bwd_s", "optimizer_s", "ema_s")) > 0
    assert record["clips_s"] == pytest.approx(4 / record["step_s"], rel=1e-2)
    assert record["frames_s"] == pytest.approx(record["clips_s"] * 6, rel=1e-2)
    # tiny: 4 clips x 6 frames of 64 px, 16-px patches: the patch embedding alone is 2 x 24 x 16 x 768 x 32 MACs
    # forward for each of the two encoders, so the count is well above that and far below a ViT-S
    assert 1e7 < record["flops_per_step"] < 1e10
    assert 0 < record["attention_flop_share"] < 1 and 0 < record["conv_flop_share"] < 1
    assert record["tflops_s"] == pytest.approx(record["flops_per_step"] / record["step_s"] / 1e12, rel=1e-2)
    assert record["peak_tflops"] == 2.5 and record["mfu"] == pytest.approx(record["tflops_s"] / 2.5, rel=1e-2)
    assert record["decode_workers_needed"] == -(-record["frames_s"] // 100)
    assert record["peak_memory_kind"] == "cpu_max_rss" and record["peak_memory_gb"] > 0


def test_data_fed_and_compiled(capsys, monkeypatch, digits_shards):
    monkeypatch.chdir(ROOT)
    shards = f"data.train_shards={digits_shards / 'train' / '*.tar'}"
    record = _run(capsys, "--steps", "2", "--warmup", "1", shards, "train.compile=true",
                  "train.compile_backend=aot_eager")  # fmt: skip
    assert not record["synthetic"] and record["num_workers"] == 0
    assert record["compile"] and record["compile_backend"] == "aot_eager"
    assert record["data_wait_s"] > 0 and record["mfu"] is None  # no peak known for a CPU


def test_synthetic_mode_runs_without_decoders_or_webdataset(tmp_path):
    """The GPU machines have torch, timm, accelerate, einops and safetensors, but none of NOT_INSTALLED: blocked
    here with sys.modules[name] = None (an import of it raises ImportError), the bf16 synthetic run must work."""
    script = f"""
import sys
for name in {NOT_INSTALLED!r}:
    sys.modules[name] = None
try:
    import webdataset
except ImportError:
    pass
else:
    raise SystemExit("the block does not work")
from benchmarks.step_speed import main
code = main(["--config", "configs/tiny.yaml", "--synthetic", "--steps", "1", "--warmup", "1",
             "train.mixed_precision=bf16"])
loaded = sorted(n for n in {NOT_INSTALLED!r} if sys.modules.get(n) is not None)
print("loaded:", loaded)
raise SystemExit(code)
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record_line, loaded_line = result.stdout.strip().splitlines()[-2:]
    record = json.loads(record_line)
    assert record["mixed_precision"] == "bf16" and record["synthetic"] and record["flops_per_step"] > 0
    assert loaded_line == "loaded: []"


def test_peak_lookup_tells_each_variant_from_its_family():
    """peak_tflops takes the first pattern that matches, so a variant's pattern must come before its family's and
    every name must match on word boundaries. Read as its family, a variant would get the wrong peak: the orderings
    below are the devices' specification sheets (a PCIe card is clocked lower than the SXM module, an L40S above an
    L40 above an L4), not the table's numbers."""
    peak = {
        name: peak_tflops(f"NVIDIA {name}")
        for name in ("H100 80GB HBM3", "H100 PCIe", "H100 NVL", "H200", "GH200 480GB", "H800", "B200",
                     "A100-SXM4-80GB", "A100 80GB PCIe", "A10", "L40S", "L40", "L4")
    }  # fmt: skip
    assert peak["H100 PCIe"] < peak["H100 NVL"] < peak["H100 80GB HBM3"] < peak["B200"]
    assert peak["H200"] == peak["GH200 480GB"] == peak["H800"] == peak["H100 80GB HBM3"]  # the same Hopper die
    assert peak["A100-SXM4-80GB"] == peak["A100 80GB PCIe"] > peak["A10"]
    assert peak["L4"] < peak["L40"] < peak["L40S"]
    assert set(peak.values()) == {value for _, value in PEAK_TFLOPS}  # no pattern shadowed by an earlier one
    for unknown in ("NVIDIA GeForce RTX 3090", "NVIDIA A40", "cpu"):
        assert peak_tflops(unknown) is None


def test_bad_config_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["--config", "configs/tiny.yaml", "--synthetic", "train.compile=maybe"]) == 2
    assert "train.compile must be true or false" in capsys.readouterr().err


def test_gpu_check_script_runs_each_config_eager_and_compiled():
    """benchmarks/gpu_check.sh end to end, on the CPU with the tiny config and the light backend: an environment
    line, then one record per config and compile setting."""
    script = ROOT / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "CONFIGS": "configs/tiny.yaml"}
    result = subprocess.run(
        ["bash", str(script), "--cpu", "--steps", "1", "--warmup", "1", "train.compile_backend=aot_eager"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    environment, *records = [json.loads(line) for line in result.stdout.splitlines()]
    assert environment["kind"] == "environment" and environment["torch"]
    assert [(r["config"], r["compile"], r["synthetic"]) for r in records] == [
        ("configs/tiny.yaml", False, True), ("configs/tiny.yaml", True, True),
    ]  # fmt: skip
    shellcheck = Path(sys.executable).parent / "shellcheck"
    if shellcheck.exists():
        lint = subprocess.run([str(shellcheck), str(script)], capture_output=True, text=True, timeout=60)
        assert lint.returncode == 0, lint.stdout
