"""SIGReg (worldmodel/model/sigreg.py): what it measures, and that two gloo processes give what one process with the
whole batch gives, value and gradients (after DDP's averaging of the gradients over ranks)."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

from worldmodel.model.sigreg import gaussian_level, sigreg


def test_gaussian_samples_reach_the_expected_level_and_collapse_does_not():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(4, 512, 32, generator=gen)
    level = gaussian_level()
    assert sigreg(z, seed=1) == pytest.approx(level, rel=0.15)
    assert sigreg(z[..., :1].expand_as(z).contiguous(), seed=1) > 10 * level  # every dim the same: rank 1
    assert sigreg(0.2 * z, seed=1) > 10 * level  # too narrow
    assert sigreg(z + 1.0, seed=1) > 10 * level  # off centre
    assert sigreg(torch.zeros_like(z), seed=1) > 50 * level  # collapsed to a constant


def test_the_seed_fixes_the_directions():
    z = torch.randn(2, 64, 16) * 0.5
    assert sigreg(z, seed=3) == sigreg(z, seed=3)
    assert sigreg(z, seed=3) != sigreg(z, seed=4)


def test_the_gradient_pulls_a_narrow_embedding_wider():
    z = (0.3 * torch.randn(2, 256, 8)).requires_grad_()
    sigreg(z, seed=0).backward()
    # a gradient step (z - lr * grad) must move the samples away from the origin
    assert (z.grad * z).sum() < 0


def _data() -> tuple[torch.Tensor, torch.nn.Linear]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 6, generator=gen)  # [T, n, features]
    layer = torch.nn.Linear(6, 8)
    with torch.no_grad():
        layer.weight.copy_(0.4 * torch.randn(8, 6, generator=gen))
        layer.bias.copy_(0.1 * torch.randn(8, generator=gen))
    return x, layer


def _rank(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    x, layer = _data()
    share = x.shape[1] // world
    value = sigreg(layer(x[:, rank * share : (rank + 1) * share]), seed=5)
    value.backward()
    grads = torch.cat([layer.weight.grad.flatten(), layer.bias.grad])
    torch.distributed.all_reduce(grads)  # what DDP does with the gradients: their mean over ranks
    grads /= world
    torch.save({"value": value.detach(), "grads": grads}, f"{out}.{rank}")
    torch.distributed.barrier()  # leave together: a rank that tears gloo down while the other still talks aborts
    torch.distributed.destroy_process_group()
    # skip interpreter teardown: under load the autograd/gloo threads' static destructors sometimes abort the
    # process ("terminate called without an active exception") after the results are written
    os._exit(0)


def test_two_ranks_give_the_value_and_gradients_of_one_process_with_the_whole_batch():
    x, layer = _data()
    value = sigreg(layer(x), seed=5)
    value.backward()
    grads = torch.cat([layer.weight.grad.flatten(), layer.bias.grad])
    per_rank_value = sigreg(layer(x[:, :20]), seed=5)  # what a per-rank statistic would give instead
    assert abs(float(per_rank_value.detach() - value.detach())) > 1e-3
    with tempfile.TemporaryDirectory() as tmp:
        init_file, out = os.path.join(tmp, "init"), os.path.join(tmp, "out")
        mp.spawn(_rank, args=(2, init_file, out), nprocs=2, join=True)
        for rank in range(2):
            got = torch.load(f"{out}.{rank}", weights_only=True)
            assert torch.allclose(got["value"], value.detach(), rtol=1e-5, atol=1e-6)
            assert torch.allclose(got["grads"], grads, rtol=1e-4, atol=1e-6)
