"""The smallest AdaSSL-V that should flag the push world's changes of intent: on its true positions, not its frames.

    python -m experiments.minimal_state [--data data/push_world] [--steps 3000] [--reads next step change]
                                       [--betas 1e-3 1e-2]

Per transition t -> t+1 the ground-truth positions x of the agent and the object (4 numbers, from the shards' JSON)
stand in for the frame embedding. The predictor, an MLP, reads [x_t / 10, x_t - x_{t-1}, r] and outputs the step
x_{t+1} - x_t; the prior p(r | x_t, x_t - x_{t-1}) reads the same history; the posterior reads it too and, by
`--reads`, the next positions x_{t+1} / 10 (`next`: what the project's posterior read before), the step (`step`),
or both and the change of the step, x_{t+1} - 2 x_t + x_{t-1} (`change`: what `summaries.Summaries.target` reads now).
Loss: L1 in pixels + beta * KL(q || p), Adam 1e-3, batches of 256, one thread. Also plain JEPA (r = 0) and the
oracle (r = a linear map of the action) with `--methods`.

Prints one JSON line per run, on the held-out transitions: the one-step L1 over copy-last's (prior mean and
posterior mean, unkicked; prior mean on events) and, for AdaSSL-V, the KL on changes of intent and on the other
transitions and its AUC as a detector of them. The ablation table is in docs/results.md ("The posterior is handed
the change of motion").
"""

from __future__ import annotations

import argparse
import json
import tarfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from worldmodel.eval.probes import auc
from worldmodel.model.latents import gaussian_kl, mlp

READS = ("next", "step", "change")
SCALE = 10.0  # px: positions enter the networks divided by this


def load_transitions(split_dir: Path) -> dict[str, torch.Tensor]:
    """All transitions t -> t+1 with t >= 1 of the shards in split_dir: previous, current, next positions [M, 4]
    (x0, y0, x1, y1 in px), action [M, 2], and the flags intent, event [M] (bool)."""
    shards = sorted(split_dir.glob("shard-*.tar"))
    if not shards:
        raise FileNotFoundError(
            f"no shard-*.tar in {split_dir}; write the push world first: python -m worlds.push_world "
            f"--output {split_dir.parent} --num-videos 1024 --val-videos 256 --seed 0"
        )
    rows: dict[str, list] = {k: [] for k in ("previous", "current", "next", "action", "intent", "event")}
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar:
                if not member.name.endswith(".json"):
                    continue
                meta = json.load(tar.extractfile(member))
                pos = np.asarray(meta["state"], np.float32)[:, [0, 1, 4, 5]]
                last = len(meta["action"])  # transitions 1 .. last-1 have a predecessor
                rows["previous"].append(pos[: last - 1])
                rows["current"].append(pos[1:last])
                rows["next"].append(pos[2 : last + 1])
                rows["action"].append(np.asarray(meta["action"], np.float32)[1:last])
                rows["intent"].append(np.asarray(meta["intent_changes"][1:last], bool))
                rows["event"].append(np.asarray(meta["events"][1:last], bool))
    return {k: torch.from_numpy(np.concatenate(v)) for k, v in rows.items()}


def deep_mlp(dim_in: int, width: int, dim_out: int) -> torch.nn.Sequential:
    """Linear -> GELU -> Linear -> GELU -> Linear."""
    return torch.nn.Sequential(mlp(dim_in, width, width), torch.nn.GELU(), torch.nn.Linear(width, dim_out))


class Minimal(torch.nn.Module):
    """Predictor, posterior and prior MLPs of two hidden layers of width 128, the oracle's linear action map
    (d_r = 8)."""

    def __init__(self, method: str, reads: str, d_r: int = 8, width: int = 128):
        super().__init__()
        self.method, self.reads, self.d_r = method, reads, d_r
        read_dim = {"next": 4, "step": 4, "change": 12}[reads]
        self.predictor = deep_mlp(8 + d_r, width, 4)
        self.posterior = deep_mlp(8 + read_dim, width, 2 * d_r)
        self.prior = deep_mlp(8, width, 2 * d_r)
        self.embed = torch.nn.Linear(2, d_r)

    def forward(self, batch: dict[str, torch.Tensor], r_from: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-transition L1 of the predicted step [M] and KL [M]; r_from: sample | posterior | prior."""
        previous, current, nxt = batch["previous"], batch["current"], batch["next"]
        history = torch.cat([current / SCALE, current - previous], dim=-1)
        step = nxt - current
        kl = torch.zeros(len(current))
        if self.method == "none":
            r = torch.zeros(len(current), self.d_r)
        elif self.method == "oracle":
            r = self.embed(batch["action"])
        else:
            read = {
                "next": nxt / SCALE,
                "step": step,
                "change": torch.cat([nxt / SCALE, step, step - (current - previous)], dim=-1),
            }[self.reads]
            mu_q, raw_q = self.posterior(torch.cat([history, read], dim=-1)).chunk(2, dim=-1)
            mu_p, raw_p = self.prior(history).chunk(2, dim=-1)
            sigma_q, sigma_p = F.softplus(raw_q) + 1e-4, F.softplus(raw_p) + 1e-4
            kl = gaussian_kl(mu_q, sigma_q, mu_p, sigma_p)
            r = {"sample": mu_q + sigma_q * torch.randn_like(mu_q), "posterior": mu_q, "prior": mu_p}[r_from]
        return (self.predictor(torch.cat([history, r], dim=-1)) - step).abs().mean(-1), kl


def run(method: str, reads: str, beta: float, steps: int, seed: int, train: dict, val: dict) -> dict:
    """Train one minimal model, return its held-out figures."""
    torch.manual_seed(seed)
    model = Minimal(method, reads)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(train["current"]), (256,), generator=generator)
        err, kl = model({k: v[idx] for k, v in train.items()}, "sample")
        loss = err.mean() + beta * kl.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        prior_err, kl = model(val, "prior")
        posterior_err, _ = model(val, "posterior")
    copy_last = (val["next"] - val["current"]).abs().mean(-1)
    unkicked, event, intent = ~val["event"], val["event"], val["intent"]
    out = {
        "method": method,
        "reads": reads if method == "adassl_v" else None,
        "beta": beta,
        "prior_mean_unkicked": float(prior_err[unkicked].mean() / copy_last[unkicked].mean()),
        "posterior_unkicked": float(posterior_err[unkicked].mean() / copy_last[unkicked].mean()),
        "prior_mean_events": float(prior_err[event].mean() / copy_last[event].mean()),
    }
    if method == "adassl_v":
        out.update(
            kl_intent_change=float(kl[intent].mean()),
            kl_other=float(kl[~intent].mean()),
            intent_change_auc=auc(kl.numpy(), intent.numpy()),
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/push_world"), help="push world (train/, val/)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=["adassl_v"], choices=("none", "adassl_v", "oracle"))
    parser.add_argument("--reads", nargs="+", default=list(READS), choices=READS, help="what the posterior reads")
    parser.add_argument("--betas", type=float, nargs="+", default=[1e-3, 1e-2])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    train, val = load_transitions(args.data / "train"), load_transitions(args.data / "val")
    for method in args.methods:
        for reads in args.reads if method == "adassl_v" else READS[:1]:
            for beta in args.betas if method == "adassl_v" else [0.0]:
                result = run(method, reads, beta, args.steps, args.seed, train, val)
                print(
                    json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}), flush=True
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
