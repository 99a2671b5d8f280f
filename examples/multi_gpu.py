"""Data-parallel training of an error-regularized neural ODE with torch.distributed (DDP).

    torchrun --nproc_per_node=4 examples/multi_gpu.py          # one process per GPU (NCCL)
    torchrun --nproc_per_node=2 examples/multi_gpu.py --cpu    # CPU processes (gloo)
    python examples/multi_gpu.py                               # no torchrun: spawns 2 CPU processes

Each process solves its own shard of the batch with pybridge's independent per-sample stepping, so
ranks take different numbers of solver steps; that is fine, because DDP communicates only in
backward (one gradient all-reduce per training step). Put the whole solve inside the module that
DDP wraps, so that DDP sees one forward per step. With equal per-rank batches and the loss a mean
over the local batch, DDP's averaged gradient is the gradient of the mean over the global batch
(tests/test_ddp.py checks this against one process on the concatenated batch).
"""
from __future__ import annotations

import argparse
import datetime
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import pybridge as pb

ROT = torch.tensor([[0.0, -1.0], [1.0, 0.0]])  # the task: map x to its quarter turn at t = 1


class NeuralODE(torch.nn.Module):
    def __init__(self, hidden=64, rtol=1e-4, atol=1e-6):
        super().__init__()
        self.field = torch.nn.Sequential(torch.nn.Linear(2, hidden), torch.nn.Tanh(),
                                         torch.nn.Linear(hidden, hidden), torch.nn.Tanh(),
                                         torch.nn.Linear(hidden, 2))
        self.rtol, self.atol = rtol, atol

    def forward(self, x: torch.Tensor):
        """x: (B, 2) -> (prediction (B, 2), error regularizer (0-d), per-sample NFE (B,))."""
        t = torch.tensor([0.0, 1.0], dtype=x.dtype, device=x.device)
        sol = pb.solve(pb.ODEProblem(lambda t, y: self.field(y), x, t), pb.Tsit5(), rtol=self.rtol, atol=self.atol)
        return sol.ys[-1], pb.error_regularizer(sol), sol.stats.nfe


def run(rank: int, world: int, args) -> None:
    use_cuda = torch.cuda.is_available() and not args.cpu
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=5))
    torch.manual_seed(0)  # the same initial parameters on every rank (DDP also broadcasts rank 0's)
    model = NeuralODE().to(device)
    ddp = DDP(model, device_ids=[device.index] if use_cuda else None)
    opt = torch.optim.Adam(ddp.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(1000 + rank)  # every rank draws its own shard
    rot = ROT.to(device)
    start = time.perf_counter()
    for it in range(args.iters):
        x = torch.randn(args.batch_per_rank, 2, generator=gen).to(device)
        pred, reg, nfe = ddp(x)
        fit = (pred - x @ rot.T).square().mean()
        loss = fit + args.lam * reg
        opt.zero_grad()
        loss.backward()  # DDP's all-reduce happens here, whatever number of steps each rank took
        opt.step()
        if it % args.log_every == 0 or it == args.iters - 1:
            stats = torch.stack([fit.detach(), nfe.float().mean()])
            dist.all_reduce(stats)  # for logging only: averages over ranks
            stats /= world
            if rank == 0:
                print(f"iter {it:4d}  fit {stats[0]:.4f}  mean NFE/sample {stats[1]:.1f}  "
                      f"({time.perf_counter() - start:.1f}s, {world} x {device.type})", flush=True)
    dist.destroy_process_group()


def _spawned(rank, world, args, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    run(rank, world, args)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--batch-per-rank", type=int, default=128)
    p.add_argument("--lam", type=float, default=1.0, help="weight of the error regularizer")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--cpu", action="store_true", help="gloo on CPU even if CUDA is available")
    p.add_argument("--nprocs", type=int, default=2, help="processes to spawn without torchrun")
    args = p.parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        run(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args)
    else:  # plain `python examples/multi_gpu.py`: spawn CPU processes with gloo
        import tempfile

        args.cpu = True
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_spawned, args=(args.nprocs, args, os.path.join(tmp, "rdzv")), nprocs=args.nprocs, join=True)


if __name__ == "__main__":
    main()
