"""Scale-out with torch.distributed: 2 processes (gloo, CPU) train an error-regularized neural ODE
with DistributedDataParallel; the result must equal one process trained on the concatenated batch.

Each rank solves its own half of the global batch with independent per-sample stepping. The ranks'
halves are chosen so that they need different numbers of solver steps (rank 1's states are larger,
so the same tolerance needs more steps): the loop runs a different number of iterations on each rank, and the
only collective is DDP's gradient all-reduce in backward, so nothing can deadlock. The loss is the
mean over the local batch; DDP averages gradients over the (equal-sized) ranks, which is the mean
over the global batch — the single process's loss.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pybridge as pb

WORLD = 2
PER_RANK = 6
STEPS = 3
DIM = 2


class Field(torch.nn.Module):
    def __init__(self, hidden=16):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(DIM, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, DIM))

    def forward(self, t, y):
        return self.net(y)


class NeuralODE(torch.nn.Module):
    """The whole solve inside forward, so that DDP sees one forward per training step."""

    def __init__(self):
        super().__init__()
        self.field = Field()

    def forward(self, y0, t):
        sol = pb.solve(pb.ODEProblem(self.field, y0, t), pb.Tsit5(), rtol=1e-6, atol=1e-8)
        iterations = int((sol.stats.naccept + sol.stats.nreject).max())
        return sol.ys[-1], pb.error_regularizer(sol), iterations


def make_model():
    torch.manual_seed(1234)
    return NeuralODE().double()


def global_batch():
    g = torch.Generator().manual_seed(99)
    # Rank 0's half: small states; rank 1's half: large ones (more steps for the same tolerance).
    scale = torch.cat([torch.full((PER_RANK, 1), 0.2), torch.full((PER_RANK, 1), 3.0)]).double()
    x = torch.randn(WORLD * PER_RANK, DIM, generator=g, dtype=torch.float64) * scale
    target = torch.stack([x[:, 1], -x[:, 0]], -1)  # a quarter turn
    return x, target


T = torch.tensor([0.0, 1.5], dtype=torch.float64)


def train(model, x, target, step_fn=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    iterations = []
    for _ in range(STEPS):
        opt.zero_grad()
        pred, reg, iters = model(x, T)
        loss = (pred - target).square().mean() + 0.1 * reg
        loss.backward()
        opt.step()
        iterations.append(iters)
    return iterations


def worker(rank, world, rdzv, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        model = torch.nn.parallel.DistributedDataParallel(make_model())
        x, target = global_batch()
        local = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        iterations = train(model, x[local], target[local])
        torch.save({"params": [p.detach().clone() for p in model.module.parameters()],
                    "iterations": iterations}, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_equal_one_process_on_concatenated_batch(tmp_path):
    mp.spawn(worker, args=(WORLD, str(tmp_path / "rdzv"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    # The ranks really took different numbers of solver iterations (the no-deadlock case).
    its = [r["iterations"] for r in ranks]
    assert any(a != b for a, b in zip(*its)), its
    # DDP kept the replicas identical.
    for p0, p1 in zip(ranks[0]["params"], ranks[1]["params"]):
        torch.testing.assert_close(p0, p1, rtol=0, atol=0)

    torch.set_num_threads(1)
    single = make_model()
    initial = [p.detach().clone() for p in single.parameters()]
    x, target = global_batch()
    train(single, x, target)
    for p_ddp, p_one, p_init in zip(ranks[0]["params"], single.parameters(), initial):
        torch.testing.assert_close(p_ddp, p_one.detach(), rtol=0, atol=1e-6)
        assert not torch.allclose(p_one, p_init)  # training moved the parameters
