"""Checkpoints, run directories and the image context under hostile and careless input (issue "data-integrity").

Real checkpoints only: written by `save_checkpoint` from a small real model (real tiny runs of train.py on the
moving-digits shards: test_hostile_checkpoints_runs.py), then damaged on disk the way a disk, a kill or a person does
it. Every case ends in a clear error or in a warning and a fallback, never in a crash deep in a stack or in a silently
changed model.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from hostile_helpers import flip_byte
from safetensors.torch import load_file
from test_docker_context import dockerignore_patterns, is_ignored
from torch import nn

from worldmodel.eval.pixel_decoder import (
    ARCHITECTURE,
    PixelDecoder,
    PixelDecoderSpec,
    decoder_dir,
    fit_or_load,
    load_decoder,
    save_decoder,
)
from worldmodel.model.world_model import WorldModel
from worldmodel.run.checkpoint import (
    checkpoint_dir,
    latest_checkpoint,
    load_checkpoint,
    read_state,
    rng_state_bytes,
    save_checkpoint,
)
from worldmodel.run.config import load_config
from worldmodel.run.manifest import MANIFEST, CheckpointError, read_manifest, verify_checkpoint
from worldmodel.train.launch import ResumeError, resume_dir
from worldmodel.train.metrics_log import MetricsLog

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


# ---- a small real model, saved for real ------------------------------------------------------------------------


def _make(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    return model, optimizer, scheduler


def _step(model, optimizer, scheduler) -> None:
    model(torch.randn(4, 6)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()


def _save(run_dir: Path, step: int, model, optimizer, scheduler, keep: int = 3) -> Path:
    return save_checkpoint(
        run_dir,
        step,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=None,
        rng_states=[rng_state_bytes(), rng_state_bytes()],
        meta={"epoch": step, "seed": 0},
        keep=keep,
    )


def _two_checkpoints(run_dir: Path, keep: int = 3) -> tuple[Path, Path, dict]:
    """Steps 1 and 2 of a real training; returns both directories and the step-1 weights."""
    model, optimizer, scheduler = _make()
    _step(model, optimizer, scheduler)
    first = _save(run_dir, 1, model, optimizer, scheduler, keep)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    _step(model, optimizer, scheduler)
    second = _save(run_dir, 2, model, optimizer, scheduler, keep)
    return first, second, weights


def _assert_auto_falls_back(run_dir: Path, bad: Path, good: Path, caplog, *expected: str) -> None:
    """--resume auto's decision: `good`, with a warning naming `bad` and what failed; `bad` moved aside."""
    with caplog.at_level(logging.WARNING):
        assert resume_dir("auto", run_dir) == good
    warning = caplog.text
    assert f"checkpoint {bad} fails verification" in warning and f"falling back to {good}" in warning, warning
    for text in expected:
        assert text in warning, (text, warning)
    assert not bad.exists() and (bad.parent / f".corrupt-{bad.name}").is_dir()  # kept for inspection
    assert latest_checkpoint(run_dir) == good


def test_same_size_flip_in_the_newest_weights_falls_back_to_the_previous_checkpoint(tmp_path, caplog):
    first, second, first_weights = _two_checkpoints(tmp_path)
    weights = second / "model.safetensors"
    before = {k: v.clone() for k, v in load_file(weights).items()}  # copies: load_file may map the file
    size = weights.stat().st_size
    flip_byte(weights, size - 3)  # in the tensor data: safetensors itself would load it without a word
    assert weights.stat().st_size == size
    assert any(not torch.equal(before[k], v) for k, v in load_file(weights).items()), "the flip changed no weight"
    assert "sha256" in verify_checkpoint(second)

    _assert_auto_falls_back(tmp_path, second, first, caplog, "model.safetensors does not match its sha256")
    model, optimizer, scheduler = _make(seed=3)
    state = load_checkpoint(first, model=model, optimizer=optimizer, scheduler=scheduler, scaler=None, rank=0)
    assert state["step"] == 1
    for name, value in first_weights.items():
        assert torch.equal(model.state_dict()[name], value), name


def test_flip_in_the_optimizer_state_falls_back_and_load_refuses_it(tmp_path, caplog):
    first, second, _ = _two_checkpoints(tmp_path)
    optimizer_file = second / "optimizer.pt"
    flip_byte(optimizer_file, optimizer_file.stat().st_size // 2)
    model, optimizer, scheduler = _make()
    with pytest.raises(CheckpointError, match=r"incomplete or corrupt: optimizer\.pt does not match its sha256"):
        load_checkpoint(second, model=model, optimizer=optimizer, scheduler=scheduler, scaler=None, rank=0)
    _assert_auto_falls_back(tmp_path, second, first, caplog, "optimizer.pt does not match its sha256")


def test_a_missing_manifest_falls_back(tmp_path, caplog):
    first, second, _ = _two_checkpoints(tmp_path)
    (second / MANIFEST).unlink()
    _assert_auto_falls_back(tmp_path, second, first, caplog, "manifest.json is missing (state.json says one")


def test_a_truncated_manifest_falls_back(tmp_path, caplog):
    first, second, _ = _two_checkpoints(tmp_path)
    manifest = second / MANIFEST
    manifest.write_bytes(manifest.read_bytes()[: manifest.stat().st_size // 2])
    _assert_auto_falls_back(tmp_path, second, first, caplog, "manifest.json is unreadable")


def test_every_single_bit_flip_of_the_manifest_is_detected_without_a_crash(tmp_path, caplog):
    first, second, _ = _two_checkpoints(tmp_path)
    manifest = second / MANIFEST
    original = manifest.read_bytes()
    assert set(read_manifest(second)) == {p.name for p in second.iterdir()} - {MANIFEST}
    for offset in range(len(original)):
        manifest.write_bytes(original)
        flip_byte(manifest, offset)
        problem = verify_checkpoint(second)  # returns a sentence, never raises
        assert problem, f"a flip of byte {offset} ({original[offset : offset + 1]!r}) went unnoticed"
    manifest.write_bytes(original)
    assert verify_checkpoint(second) is None
    flip_byte(manifest, original.index(b'"sha256": "') + 12)  # a digest of the manifest itself
    _assert_auto_falls_back(tmp_path, second, first, caplog, "manifest.json")


def test_every_checkpoint_corrupt_is_a_clear_error_and_nothing_is_moved(tmp_path):
    first, second, _ = _two_checkpoints(tmp_path)
    flip_byte(first / "model.safetensors", 100)
    (second / MANIFEST).write_text("{")
    with pytest.raises(ResumeError) as err:
        resume_dir("auto", tmp_path)
    message = str(err.value)
    assert "no checkpoint of" in message and "verifies, nothing to resume from" in message
    assert "step-00000002: manifest.json is unreadable" in message and "step-00000001: " in message
    assert first.is_dir() and second.is_dir()  # no fallback happened: left as found
    with pytest.raises(ResumeError, match="already holds checkpoints"):  # and no fresh start over them either
        resume_dir(None, tmp_path)


def test_an_old_checkpoint_without_manifest_is_accepted_by_size_with_a_warning(tmp_path, caplog):
    """Checkpoints written before manifests: state.json without "manifest". Accepted, as before, by the sizes
    state.json records, with a warning that the content is not verified; a truncation is still caught."""
    model, optimizer, scheduler = _make()
    old = _save(tmp_path, 1, model, optimizer, scheduler)
    (old / MANIFEST).unlink()
    state = read_state(old)
    del state["manifest"]
    (old / "state.json").write_text(json.dumps(state))
    with caplog.at_level(logging.WARNING):
        assert resume_dir("auto", tmp_path) == old
    assert "has no manifest.json (written before checkpoints had one): verified by file sizes only" in caplog.text
    weights = old / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    assert "model.safetensors has" in verify_checkpoint(old) and "state.json recorded" in verify_checkpoint(old)


def _rename_gap(run_dir: Path, step: int, *, complete_new: bool = True) -> tuple[dict, dict]:
    """The on-disk state of a re-save of `step` killed between its two renames: the old checkpoint renamed to
    .old-step-X, the new one complete in .tmp-step-X (with its manifest; without it when not `complete_new`), and no
    step-X. Returns the old and the new weights."""
    model, optimizer, scheduler = _make()
    _step(model, optimizer, scheduler)
    old = _save(run_dir, step, model, optimizer, scheduler)
    old_weights = load_file(old / "model.safetensors")
    _step(model, optimizer, scheduler)
    new = _save(run_dir / "elsewhere", step, model, optimizer, scheduler)
    new_weights = load_file(new / "model.safetensors")
    root = run_dir / "checkpoints"
    old.rename(root / f".old-{old.name}")
    new.rename(root / f".tmp-{new.name}")
    if not complete_new:
        (root / f".tmp-{new.name}" / MANIFEST).unlink()
    return old_weights, new_weights


def test_the_rename_gap_of_a_re_save_is_recovered_by_resume_and_by_the_next_save(tmp_path, caplog):
    # killed between the two renames: the only copies are where neither resume nor a listing looks
    _, new_weights = _rename_gap(tmp_path, 5)
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(tmp_path) is None
    assert "step-00000005 exists only as .old-step-00000005" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        resumed = resume_dir("auto", tmp_path)
    assert resumed == checkpoint_dir(tmp_path, 5) and verify_checkpoint(resumed) is None
    assert "recovered" in caplog.text and ".tmp-step-00000005" in caplog.text
    for name, value in load_file(resumed / "model.safetensors").items():  # the newer copy: its manifest verifies
        assert torch.equal(value, new_weights[name]), name

    # the new copy was not complete yet: the old one comes back; a save of another step never deletes it
    other = tmp_path / "other"
    old_weights, _ = _rename_gap(other, 5, complete_new=False)
    model, optimizer, scheduler = _make(seed=1)
    _save(other, 6, model, optimizer, scheduler)
    assert sorted(p.name for p in (other / "checkpoints").iterdir()) == ["step-00000005", "step-00000006"]
    for name, value in load_file(checkpoint_dir(other, 5) / "model.safetensors").items():
        assert torch.equal(value, old_weights[name]), name
    assert not list((other / "checkpoints").glob(".*"))  # the stale copies are gone, the checkpoint is not


def test_a_fallback_with_keep_1_never_prunes_the_only_good_checkpoint(tmp_path, caplog):
    first, second, _ = _two_checkpoints(tmp_path, keep=2)
    flip_byte(second / "model.safetensors", 200)
    _assert_auto_falls_back(tmp_path, second, first, caplog)
    model, optimizer, scheduler = _make(seed=2)
    saved = _save(tmp_path, 2, model, optimizer, scheduler, keep=1)  # the resumed run saves its next step
    assert verify_checkpoint(saved) is None and latest_checkpoint(tmp_path) == saved
    # a newer step-* directory (e.g. another timeline) never makes a save delete the checkpoint it just wrote
    shutil.copytree(saved, checkpoint_dir(tmp_path, 9))
    again = _save(tmp_path, 3, model, optimizer, scheduler, keep=1)
    assert again.is_dir() and verify_checkpoint(again) is None


def test_a_torn_last_metrics_line_is_dropped_with_a_warning_and_the_file_rewritten_atomically(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "loss": 1.0 / s} for s in range(1, 5)]
    text = "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(text[: len(text) - 9])  # a kill in the middle of writing step 4's line
    with caplog.at_level(logging.WARNING):
        log = MetricsLog(tmp_path, enabled=True, total_steps=10, start_step=3)
        log.log(4, {"loss": 0.2})
        log.close()
    assert "dropped its torn last line 4" in caplog.text
    lines = path.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    assert not list(tmp_path.glob(".metrics.jsonl*"))  # the temporary file was renamed over it
    # torn lines elsewhere (or garbage bytes) are dropped too, never a crash
    path.write_bytes(b'{"step": 1}\n\xff\xfe{"st\n[1, 2]\n{"step": "2"}\n{"step": 2}\n')
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        MetricsLog(tmp_path, enabled=True, total_steps=10, start_step=5).close()
    assert "dropped 3 line(s) that are not complete JSON records: [2, 3, 4]" in caplog.text
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


# ---- the pixel decoder store and the image context -------------------------------------------------------------


def test_a_corrupt_decoder_store_is_trained_again(digits_shards, tmp_path, capsys):
    run = tmp_path / "run"
    torch.manual_seed(0)
    stored = PixelDecoder(PixelDecoderSpec(16, 32, 64, 3, width=32))
    meta = {"checkpoint_step": 4, "architecture": ARCHITECTURE, "settings": {}}
    folder = save_decoder(run, stored, meta)
    decoder, record = load_decoder(run, 4, CPU)
    assert "sha256" not in record
    for name, value in stored.state_dict().items():
        assert torch.equal(decoder.state_dict()[name], value), name

    weights, meta_path = folder / "decoder.safetensors", folder / "decoder.json"
    good_weights, good_meta = weights.read_bytes(), meta_path.read_bytes()
    legacy_meta = json.dumps({k: v for k, v in json.loads(good_meta).items() if k != "sha256"}).encode()
    damage = [  # (what the warning says, the harm)
        ("decoder.safetensors does not match the sha256", lambda: flip_byte(weights, len(good_weights) - 5)),
        ("decoder.safetensors does not match the sha256", lambda: weights.write_bytes(good_weights[:100])),
        ("decoder.json is unreadable", lambda: meta_path.write_bytes(good_meta[: len(good_meta) // 2])),
        # a store written before the digest: what does not load is caught all the same
        ("it does not load", lambda: (meta_path.write_bytes(legacy_meta), weights.write_bytes(good_weights[:100]))),
        ("it does not load", lambda: (meta_path.write_bytes(legacy_meta), flip_byte(weights, 3, 0x40))),
    ]
    for expected, harm in damage:
        weights.write_bytes(good_weights)
        meta_path.write_bytes(good_meta)
        harm()
        assert load_decoder(run, 4, CPU) is None, expected
        err = capsys.readouterr().err
        assert f"warning: the pixel decoder in {folder} is corrupt" in err and expected in err, (expected, err)
    meta_path.write_bytes(legacy_meta)
    weights.write_bytes(good_weights)
    assert load_decoder(run, 4, CPU) is not None  # an intact store without the digest still loads
    # a spec that does not build is corrupt as well
    meta_path.write_text(json.dumps({**json.loads(good_meta), "spec": {"num_tokens": "x"}}))
    weights.write_bytes(good_weights)
    assert load_decoder(run, 4, CPU) is None and "is corrupt" in capsys.readouterr().err

    # what evaluate.py --pixels does with it: trains the decoder again and stores an intact one
    flip_byte(weights, len(good_weights) - 5)
    cfg = load_config(
        ROOT / "configs" / "tiny.yaml",
        [f"run_dir={run}", f"data.train_shards={digits_shards / 'train' / '*.tar'}", "pixel_decoder.steps=5"],
    )
    model = WorldModel(cfg.model).eval()
    meta_path.write_text(json.dumps({**json.loads(good_meta), "settings": {**vars(cfg.pixel_decoder)}}))
    _, record = fit_or_load(run, model, cfg, 4, CPU, progress=False)
    assert record["reused"] is False and "is corrupt" in capsys.readouterr().err
    assert load_decoder(run, 4, CPU) is not None and decoder_dir(run) == folder
    _, again = fit_or_load(run, model, cfg, 4, CPU, progress=False)
    assert again["reused"] is True


def test_the_image_context_is_an_allow_list_that_leaves_out_a_stray_env():
    patterns = dockerignore_patterns()
    for stray in [
        ".env",
        ".env.local",
        "configs/.env",
        "worldmodel/.env",
        "docker/.env",
        "secrets.json",
        "notes/todo.md",
        "id_rsa",
        ".aws/credentials",
        "docker/server.key",
        "tests/test_train.py",
        "runs/tiny/checkpoints/step-00000002/model.safetensors",
        "data/moving_digits/train/shard-000000.tar",
    ]:
        assert is_ignored(stray, patterns), f".dockerignore lets {stray} into the image"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    needed = [f for f in files if f.split("/")[0] in {"worldmodel", "data_pipeline", "worlds", "benchmarks", "configs"}]
    needed += ["train.py", "evaluate.py", "pyproject.toml", "constraints.txt", "README.md", "scripts/install.sh"]
    needed += ["docker/entrypoint.sh", "docker/launch_multinode.sh"]
    left_out = [f for f in needed if is_ignored(f, patterns)]
    assert not left_out, f".dockerignore leaves out files the image needs: {left_out}"
    assert not patterns[0][0] and patterns[0][1].pattern == r"[^/]*\Z", "the allow-list starts by denying everything"
