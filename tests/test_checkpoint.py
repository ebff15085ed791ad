"""Checkpoint module on its own: a small real module, AdamW, LambdaLR, a CPU GradScaler and real RNG states."""

import copy
import logging
import random

import numpy as np
import pytest
import torch
from torch import nn

from worldmodel.run.checkpoint import (
    checkpoint_dir,
    latest_checkpoint,
    load_checkpoint,
    load_model_state,
    read_state,
    rng_state_bytes,
    save_checkpoint,
)


def _make(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    model.register_buffer("running_center", torch.zeros(3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    return model, optimizer, scheduler, scaler


def _train(model, optimizer, scheduler, steps: int, scaler=None) -> None:
    for _ in range(steps):
        loss = model(torch.randn(4, 6)).square().mean()
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad()
        scheduler.step()
        model.running_center.add_(0.1)


def _save(run_dir, step, model, optimizer, scheduler, scaler, keep=3):
    return save_checkpoint(
        run_dir,
        step,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        rng_states=[rng_state_bytes(), rng_state_bytes()],
        meta={"epoch": 7, "seed": 3},
        keep=keep,
    )


class _Schedule:
    """An LR schedule whose state (a local lambda in __dict__) cannot be pickled."""

    def __init__(self) -> None:
        self.fn = lambda step: 1.0

    def __call__(self, step: int) -> float:
        return self.fn(step)


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_resume_restores_model_optimizer_scheduler_scaler_and_rng(tmp_path):
    model, optimizer, scheduler, scaler = _make()
    _train(model, optimizer, scheduler, 3, scaler)
    scaler.update(new_scale=64.0)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = copy.deepcopy(optimizer.state_dict())
    saved_lr = scheduler.get_last_lr()
    ckpt = _save(tmp_path, 3, model, optimizer, scheduler, scaler)
    expected_draws = (torch.rand(5), np.random.rand(3), random.random())  # noqa: NPY002

    _train(model, optimizer, scheduler, 2)  # move everything away from the saved state
    fresh_model, fresh_opt, fresh_sched, fresh_scaler = _make(seed=1)
    state = load_checkpoint(
        ckpt, model=fresh_model, optimizer=fresh_opt, scheduler=fresh_sched, scaler=fresh_scaler, rank=1
    )

    assert state["step"] == 3 and state["epoch"] == 7 and state["seed"] == 3 and state["world_size"] == 2
    assert state["rng_restored"]
    for k, v in saved_model.items():
        assert torch.equal(fresh_model.state_dict()[k], v), k
    for pid, s in saved_opt["state"].items():
        for name, value in s.items():
            assert torch.equal(fresh_opt.state_dict()["state"][pid][name], value), (pid, name)
    assert fresh_sched.get_last_lr() == saved_lr and fresh_sched.last_epoch == 3
    assert fresh_scaler.get_scale() == 64.0
    assert torch.equal(torch.rand(5), expected_draws[0])
    assert np.array_equal(np.random.rand(3), expected_draws[1])  # noqa: NPY002
    assert random.random() == expected_draws[2]

    # training continues identically from the restored state
    torch.manual_seed(11)
    _train(fresh_model, fresh_opt, fresh_sched, 2)
    model.load_state_dict(saved_model)
    optimizer.load_state_dict(saved_opt)
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    torch.manual_seed(11)
    _train(model, optimizer, scheduler, 2)
    _assert_same_state(model, fresh_model)


def test_keeps_only_the_newest_checkpoints_and_latest_picks_the_newest(tmp_path):
    model, optimizer, scheduler, scaler = _make()
    assert latest_checkpoint(tmp_path) is None
    for step in (10, 20, 30, 40, 50):
        _save(tmp_path, step, model, optimizer, scheduler, None, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-00000040", "step-00000050"]
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 50)
    assert not (checkpoint_dir(tmp_path, 50) / "scaler.pt").exists()


def test_saving_the_same_step_again_replaces_it(tmp_path):
    model, optimizer, scheduler, scaler = _make()
    _save(tmp_path, 5, model, optimizer, scheduler, scaler)
    _train(model, optimizer, scheduler, 1)
    _save(tmp_path, 5, model, optimizer, scheduler, scaler)
    other, *_ = _make(seed=2)
    load_model_state(other, latest_checkpoint(tmp_path))
    _assert_same_state(model, other)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000005"]


def test_crash_while_writing_leaves_the_previous_checkpoint_loadable(tmp_path, caplog):
    model, optimizer, scheduler, scaler = _make()
    _train(model, optimizer, scheduler, 1)
    good = _save(tmp_path, 1, model, optimizer, scheduler, scaler)
    good_state = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model, optimizer, scheduler, 1)

    # a real failure half-way through a save: this scheduler's state cannot be serialised (a local lambda)
    with pytest.raises(Exception, match="pickle|lambda|local"):
        _save(tmp_path, 2, model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, _Schedule()), scaler)
    tmp = tmp_path / "checkpoints" / ".tmp-step-00000002"
    assert (tmp / "model.safetensors").is_file() and not (tmp / "state.json").exists()
    # a checkpoint whose weights were truncated after it was renamed (e.g. a lost page cache)
    bad = _save(tmp_path, 3, model, optimizer, scheduler, scaler)
    weights = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(weights[: len(weights) // 2])

    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(tmp_path) == good
    assert "model.safetensors has" in caplog.text and "step-00000003" in caplog.text
    with pytest.raises(ValueError, match="incomplete or corrupt: model.safetensors"):
        load_checkpoint(bad, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, rank=0)
    restored, *_ = _make(seed=5)
    load_model_state(restored, good)
    for k, v in good_state.items():
        assert torch.equal(restored.state_dict()[k], v)
    assert read_state(good)["step"] == 1


def test_load_model_state_names_the_checkpoint_on_mismatch(tmp_path):
    model, optimizer, scheduler, scaler = _make()
    ckpt = _save(tmp_path, 1, model, optimizer, scheduler, scaler)
    wider = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3), nn.Linear(3, 3))
    with pytest.raises(RuntimeError, match="does not match the model"):
        load_model_state(wider, ckpt)
    with pytest.raises(FileNotFoundError, match="checkpoint directory"):
        load_model_state(model, tmp_path)
