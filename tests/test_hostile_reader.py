"""The reader under hostile shards (issue "data-integrity"): real tars written by hand with the KEY.json a careless or
hostile tool writes, read by the real loaders, and a real short training on them.

A bad sample never stops the stream and never changes a batch's fields: it is skipped and counted by reason
(`bad_metadata`: KEY.json breaks the sidecar schema; `schema_mismatch`: its widths or names differ from the
dataset's), and the batch keeps `state`, `action` and `labels`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from shard_helpers import read_samples, write_tar

from data_pipeline.config import DataConfig
from data_pipeline.sidecar import MAX_SIDECAR_BYTES
from data_pipeline.stream import make_eval_loader, make_train_loader

ROOT = Path(__file__).resolve().parents[1]
CFG = DataConfig(num_context=3, num_target=3, batch_size=8, num_workers=0, shuffle_buffer=4, epoch_batches=3)
pytestmark = pytest.mark.filterwarnings("ignore:.*index.json:UserWarning")  # hand-made folders: warned, as they should


def _edit(change: Callable[[dict], object]) -> Callable[[dict], bytes]:
    """KEY.json bytes of a sample's metadata after `change` (Python's json writes NaN / Infinity tokens as is)."""

    def make(meta: dict) -> bytes:
        meta = json.loads(json.dumps(meta))
        change(meta)
        return json.dumps(meta).encode()

    return make


def _every_row(field: str, value: object) -> Callable[[dict], None]:
    def change(meta: dict) -> None:
        for row in meta[field]:
            row[0] = value

    return change


def _deep(meta: dict) -> bytes:
    return b'{"num_frames": 24, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"


BAD_METADATA = {
    "string_label": _edit(lambda m: m["labels"].update(digit0="walking")),
    "bool_label": _edit(lambda m: m["labels"].update(digit0=False)),
    "huge_label": _edit(lambda m: m["labels"].update(digit0=2**70)),
    "num_frames_infinity": _edit(lambda m: m.update(num_frames=float("inf"))),
    "num_frames_1e308": _edit(lambda m: m.update(num_frames=1e308)),
    "num_frames_string": _edit(lambda m: m.update(num_frames="24")),
    "num_frames_zero": _edit(lambda m: m.update(num_frames=0)),
    "deep_nesting": _deep,
    "huge_integer_literal": lambda m: json.dumps(m).replace('"num_frames": 24', '"num_frames": ' + "9" * 5000).encode(),
    "nan_state": _edit(_every_row("state", float("nan"))),
    "infinite_action": _edit(_every_row("action", float("-inf"))),
    "state_beyond_float32": _edit(_every_row("state", 1e308)),
    "null_in_action": _edit(_every_row("action", None)),
    "string_rows": _edit(lambda m: m.update(state=[["a"] * 4] * 24)),
    "flat_state": _edit(lambda m: m.update(state=[row[0] for row in m["state"]])),
    "names_not_strings": _edit(lambda m: m.update(state_names=[1, 2, 3, 4])),
    "not_an_object": lambda m: b"[1, 2, 3]",
    "not_utf8": lambda m: b'{"num_frames": 24, "x": "\xff"}',
}
SCHEMA_MISMATCH = {
    "wider_state": _edit(lambda m: (m.pop("state_names"), [row.append(0.0) for row in m["state"]])),
    "narrower_action": _edit(lambda m: (m.pop("action_names"), [row.pop() for row in m["action"]])),
    "other_label_names": _edit(lambda m: m.update(labels={"colour": 2})),
    "other_state_names": _edit(lambda m: m.update(state_names=["a", "b", "c", "d"])),
}


@pytest.fixture(scope="module")
def val(digits_shards) -> dict[str, dict[str, bytes]]:
    return read_samples(digits_shards, "val")


def _shard(path: Path, val: dict, bad: dict[str, bytes], good: tuple[str, ...] = ("val_0000000", "val_0000001")):
    """A tar with the `good` samples of the val split, then one sample per `bad` {key: KEY.json} (the video of
    val_0000002: only the metadata is bad)."""
    entries = [(f"{k}.{ext}", val[k][ext]) for k in good for ext in ("mp4", "json")]
    for key, meta in bad.items():
        entries += [(f"{key}.mp4", val["val_0000002"]["mp4"]), (f"{key}.json", meta)]
    return write_tar(path, entries)


def _read(spec: str, cfg: DataConfig = CFG) -> tuple[list[dict], Counter]:
    batches = list(make_eval_loader(cfg, spec, num_clips=20))
    skipped = Counter()
    for batch in batches:
        skipped.update(batch["skipped"])
    return batches, skipped


def _assert_fields_kept(batch: dict, size: int) -> None:
    assert batch["state"].shape == (size, 6, 4) and batch["action"].shape == (size, 5, 2)
    assert batch["labels"].shape == (size, 1) and batch["label_names"] == ["digit0"]


@pytest.mark.parametrize("kind", sorted(BAD_METADATA))
def test_bad_metadata_is_skipped_and_counted(val, tmp_path, kind):
    meta = json.loads(val["val_0000002"]["json"])
    shard = _shard(tmp_path / "shard-000000.tar", val, {"bad": BAD_METADATA[kind](meta)})
    (batch,), skipped = _read(str(shard))
    assert batch["key"] == ["val_0000000", "val_0000001"] and skipped == {"bad_metadata": 1}
    _assert_fields_kept(batch, 2)


@pytest.mark.parametrize("kind", sorted(SCHEMA_MISMATCH))
def test_a_clip_that_differs_from_the_dataset_is_skipped_not_its_batchs_field(val, tmp_path, kind):
    meta = json.loads(val["val_0000002"]["json"])
    shard = _shard(tmp_path / "shard-000000.tar", val, {"odd": SCHEMA_MISMATCH[kind](meta)})
    (batch,), skipped = _read(str(shard))
    assert batch["key"] == ["val_0000000", "val_0000001"] and skipped == {"schema_mismatch": 1}
    _assert_fields_kept(batch, 2)
    assert batch["state_names"] == ["x0", "y0", "vx0", "vy0"]


def test_an_oversized_key_json_is_skipped(val, tmp_path):
    big = b'{"num_frames": 24, "pad": "' + b" " * MAX_SIDECAR_BYTES + b'"}'
    shard = _shard(tmp_path / "shard-000000.tar", val, {"big": big})
    (batch,), skipped = _read(str(shard))
    assert batch["key"] == ["val_0000000", "val_0000001"] and skipped == {"bad_metadata": 1}


def test_index_json_fixes_the_schema_even_when_an_odd_sample_comes_first(val, digits_shards, tmp_path):
    """The folder's index.json (the writer's) decides the widths, not whichever sample a reader meets first; and a
    field it says every sample has is required."""
    meta = json.loads(val["val_0000002"]["json"])
    bad = {"aa_odd": SCHEMA_MISMATCH["wider_state"](meta), "ab_no_state": _edit(lambda m: m.pop("state"))(meta)}
    entries = []
    for key, data in bad.items():
        entries += [(f"{key}.mp4", val["val_0000002"]["mp4"]), (f"{key}.json", data)]
    for key in ("val_0000000", "val_0000001"):
        entries += [(f"{key}.{ext}", val[key][ext]) for ext in ("mp4", "json")]
    write_tar(tmp_path / "shard-000000.tar", entries)
    index = json.loads((digits_shards / "val" / "index.json").read_text())
    index["shards"] = [
        {"name": "shard-000000.tar", "samples": 4, "bytes": (tmp_path / "shard-000000.tar").stat().st_size}
    ]
    index["total_samples"] = 8  # the schema's counts: every sample has state, action, events and labels
    (tmp_path / "index.json").write_text(json.dumps(index))
    (batch,), skipped = _read(str(tmp_path / "shard-000000.tar"))
    assert batch["key"] == ["val_0000000", "val_0000001"] and skipped == {"schema_mismatch": 2}
    _assert_fields_kept(batch, 2)


def test_training_batches_never_lose_a_field(val, tmp_path):
    meta = json.loads(val["val_0000002"]["json"])
    bad = {f"odd{i}": make(meta) for i, make in enumerate(SCHEMA_MISMATCH.values())}
    good = tuple(f"val_{i:07d}" for i in range(8))
    shard = _shard(tmp_path / "shard-000000.tar", val, bad, good=good)
    cfg = replace(CFG, batch_size=2, clips_per_video=2, epoch_batches=12)  # 24 clips: past one pass
    batches = list(make_train_loader(cfg, str(shard), seed=0, epoch=0, rank=0, world_size=1))
    assert len(batches) == 12
    skipped = Counter()
    for batch in batches:
        skipped.update(batch["skipped"])
        assert set(batch["key"]) <= set(good)
        _assert_fields_kept(batch, 2)
    assert set(skipped) == {"schema_mismatch"} and skipped["schema_mismatch"] >= len(bad)


@pytest.mark.slow  # a real train.py process: ~5 s of CPU, most of it imports
def test_a_short_training_on_every_bad_sidecar_kind_runs_to_the_end(val, digits_shards, tmp_path):
    """train.py (configs/tiny.yaml, 3 steps) on a good shard of the moving-digits set (with its index.json) plus a
    shard holding every bad KEY.json kind: it finishes, and metrics.jsonl counts the bad samples by reason."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("shard-000000.tar", "index.json"):
        shutil.copy(digits_shards / "train" / name, data / name)
    meta = json.loads(val["val_0000002"]["json"])
    bad = {f"bad_{kind}": make(meta) for kind, make in BAD_METADATA.items()}
    odd = {f"odd_{kind}": make(meta) for kind, make in SCHEMA_MISMATCH.items()}
    _shard(data / "shard-bad.tar", val, {**bad, **odd}, good=())
    run = tmp_path / "run"
    command = [
        sys.executable, "train.py", "--config", "configs/tiny.yaml", f"run_dir={run}",
        f"data.train_shards={data}/shard-*.tar", f"data.val_shards={digits_shards}/val/shard-*.tar", "train.steps=3",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "finished.json").exists()
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    # 12 clips from 4 good videos: three passes over the shards, each of their bad samples counted once a pass
    assert last["skipped/bad_metadata"] >= len(bad) and last["skipped/schema_mismatch"] >= len(odd), last
    assert last["skipped/total"] == last["skipped/bad_metadata"] + last["skipped/schema_mismatch"]
