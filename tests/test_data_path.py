"""The trainer never waits for data it could have had: one loader per run (its workers last across epochs), a thread
budget from the cores, no host sync between check steps, counted PyAV fallbacks and the skip alarm."""

from __future__ import annotations

import multiprocessing
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from shard_helpers import train_glob

from data_pipeline.config import DataConfig
from data_pipeline.stream import make_train_loader
from worldmodel.run.config import load_config
from worldmodel.train.launch import StopRequest
from worldmodel.train.setup import thread_budget
from worldmodel.train.state import build_state
from worldmodel.train.step import TrainingDiverged, take_step
from worldmodel.train.window import SkipAlarm, Window

ROOT = Path(__file__).resolve().parents[1]
CFG = DataConfig(num_context=3, num_target=3, batch_size=2, num_workers=2, shuffle_buffer=4, epoch_batches=3)


def test_one_loader_keeps_its_workers_across_epochs_and_tags_every_batch_with_its_epoch(digits_shards):
    loader = make_train_loader(CFG, train_glob(digits_shards), seed=0, epoch=5, rank=0, world_size=1, epochs=None)
    batches = iter(loader)
    first = next(batches)
    workers_at_start = {p.pid for p in multiprocessing.active_children()}
    rest = [next(batches) for _ in range(3 * CFG.epoch_batches)]
    workers_later = {p.pid for p in multiprocessing.active_children()}
    batches.close()
    assert len(workers_at_start) >= CFG.num_workers
    assert workers_later == workers_at_start  # the same processes after three epochs: one loader per run
    # 3 batches per epoch with 2 workers (2 + 1, then 1 + 2, ...): every epoch has exactly epoch_batches batches
    assert [b["epoch"] for b in [first, *rest]] == [5, 5, 5, 6, 6, 6, 7, 7, 7, 8]
    # the endless loader's first epoch is the one-epoch loader's epoch
    one = list(make_train_loader(CFG, train_glob(digits_shards), seed=0, epoch=5, rank=0, world_size=1))
    assert [b["key"] for b in one] == [b["key"] for b in [first, *rest[:2]]]
    assert len(one) == CFG.epoch_batches


def test_two_ranks_get_equal_epochs_of_disjoint_samples_from_endless_loaders(digits_shards):
    cfg = replace(CFG, num_workers=1, epoch_batches=2)
    per_rank = []
    for rank in (0, 1):
        loader = make_train_loader(cfg, train_glob(digits_shards), seed=3, epoch=0, rank=rank, world_size=2, epochs=3)
        per_rank.append([(b["epoch"], key) for b in loader for key in b["key"]])
    for epoch in range(3):
        keys = [[k for e, k in rank_keys if e == epoch] for rank_keys in per_rank]
        assert [len(k) for k in keys] == [4, 4]
        assert not set(keys[0]) & set(keys[1])


@pytest.mark.parametrize(
    ("requested", "workers", "processes", "cores", "expected"),
    [(0, 1, 1, 2, 1), (0, 0, 1, 2, 2), (0, 2, 1, 2, 1), (0, 2, 2, 16, 6), (0, 12, 1, 16, 4), (3, 1, 1, 2, 3)],
)
def test_thread_budget_leaves_a_core_to_each_decode_worker(requested, workers, processes, cores, expected):
    assert thread_budget(requested, workers, processes, cores=cores) == expected


def _tiny(tmp_path: Path, shards: Path, *overrides: str):
    return load_config(
        ROOT / "configs" / "tiny.yaml",
        [
            f"run_dir={tmp_path / 'run'}",
            f"data.train_shards={shards}/train/shard-*.tar",
            f"data.val_shards={shards}/val/shard-*.tar",
            *overrides,
        ],
    )


class _HostReads:
    """Counts the tensor methods that copy a value to the host (on a GPU each waits for the device), except on the
    tensors of `host_tensors`: AdamW's step counters, which torch keeps on the host (CPU) beside CUDA parameters
    unless the optimizer is capturable or fused, so reading them waits for nothing."""

    METHODS = ("item", "tolist", "__float__", "__int__", "__bool__")

    def __init__(self, host_tensors: list[torch.Tensor]) -> None:
        self.calls: list[str] = []
        self.host = {id(t) for t in host_tensors}
        self.real = {name: getattr(torch.Tensor, name) for name in self.METHODS}

    def __enter__(self) -> _HostReads:
        for name, real in self.real.items():

            def counted(tensor, *args, _name=name, _real=real):
                if id(tensor) not in self.host:
                    self.calls.append(_name)
                return _real(tensor, *args)

            setattr(torch.Tensor, name, counted)
        return self

    def __exit__(self, *exc) -> None:
        for name, real in self.real.items():
            setattr(torch.Tensor, name, real)


def test_a_step_between_checks_reads_nothing_from_the_device_and_a_check_step_does(digits_shards, tmp_path):
    cfg = _tiny(tmp_path, digits_shards, "train.log_every=4", "train.check_every=4", "train.checkpoint_every=100")
    run = build_state(cfg, None)
    window, stop = Window(), StopRequest()
    try:
        take_step(run, 0, window, stop)  # step 1: warm-up outside the count (lazy initialisations)
        steps = [state["step"] for state in run.optimizer.state.values()]
        with _HostReads(steps) as reads:
            result = take_step(run, 1, window, stop)  # step 2: neither a check nor a log step
        assert reads.calls == [] and result.loss is None
        assert "emb_eff_rank" not in window.sums  # the collapse monitors run at log steps only
        take_step(run, 2, window, stop)
        with _HostReads(steps) as reads:
            result = take_step(run, 3, window, stop)  # step 4: the check (and log) step
        assert reads.calls and result.loss is not None
        assert window.counts["emb_eff_rank"] == 1 and window.counts["pred"] == 4
    finally:
        stop.restore()
        run.epochs.close()
        run.accelerator.end_training()


def test_a_nan_between_checks_stops_at_the_next_check_naming_its_step(digits_shards, tmp_path):
    cfg = _tiny(tmp_path, digits_shards, "train.log_every=4", "train.check_every=4", "train.checkpoint_every=100")
    run = build_state(cfg, None)
    window, stop = Window(), StopRequest()
    try:
        take_step(run, 0, window, stop)
        for p in run.core.predictor.parameters():
            p.data.fill_(float("nan"))
        take_step(run, 1, window, stop)  # step 2: non-finite, not a check step: goes on
        take_step(run, 2, window, stop)
        with pytest.raises(TrainingDiverged, match=r"non-finite loss at step 2 .*found at the check of step 4"):
            take_step(run, 3, window, stop)
    finally:
        stop.restore()
        run.epochs.close()
        run.accelerator.end_training()


def test_skip_alarm_warns_once_above_the_bar_and_again_after_recovering():
    alarm = SkipAlarm(0.05)
    assert alarm.check(10, {"skipped/recent_share": 0.01, "skipped/total": 1.0}) is None
    line = alarm.check(20, {"skipped/recent_share": 0.2, "skipped/total": 50.0, "skipped/decode_error": 50.0})
    assert line and "20.0%" in line and "decode_error=50" in line and "data.max_skip_share" in line
    assert alarm.check(30, {"skipped/recent_share": 0.3, "skipped/total": 80.0}) is None  # once
    assert alarm.check(40, {"skipped/recent_share": 0.0, "skipped/total": 80.0}) is None
    assert alarm.check(50, {"skipped/recent_share": 0.5, "skipped/total": 99.0})  # again after recovering


def test_window_keeps_about_the_latest_thousand_samples_for_the_skip_share():
    window = Window(skip_window=100)

    def batches():
        for i in range(40):
            yield 0, {"key": [f"k{i}-{j}" for j in range(10)], "skipped": {"decode_error": 10 if i >= 30 else 0}}

    source = batches()
    for _ in range(40):
        window.next_batch(source)
    read = sum(n for n, _ in window.recent)
    skipped = sum(k for _, k in window.recent)
    assert 100 <= read <= 120 and skipped / read == 0.5  # the latest batches only, where half the samples were skipped
