"""Cost of the Julia bridge: per right-hand-side call, and whole solves against the torch engine.

    python -m benchmarks.julia_overhead [--hidden 64] [--batch 16]

Target (issue 6): at most 5 µs per call beyond the network itself. Three numbers per call:
  network     f(t, y) called directly from Python
  bridge      the same f through Bridge.rhs on foreign memory (view lookup + copy into Julia's du)
  julia       whole-solve time / nfe on engine="julia" (Julia → Python call + solver work)
The first two need no Julia; the third and the solve comparison run only where juliacall can
start Julia, and say so otherwise.
"""
from __future__ import annotations

import argparse
import importlib.util
import time

import numpy as np
import torch

import pybridge as pb
from pybridge.julia_engine.bridge import Bridge


def mlp(n, hidden):
    net = torch.nn.Sequential(torch.nn.Linear(n, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, n)).double()
    return lambda t, y: net(y)


def per_call(fn, reps=20000):
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(1)
    n, B = args.n, args.batch
    f = mlp(n, args.hidden)
    y = torch.randn(B, n, dtype=torch.float64)
    t = torch.tensor(0.0, dtype=torch.float64)

    with torch.no_grad():
        direct = per_call(lambda: f(t, y))
    u = np.asfortranarray(np.random.rand(n, B))     # stands in for Julia's n × B state buffers
    du = np.zeros((n, B), order="F")
    tbuf = np.zeros(1)
    br = Bridge(f, (B, n), (), torch.float64, B, n)
    a = (du.ctypes.data, du.size, u.ctypes.data, u.size, tbuf.ctypes.data)
    bridged = per_call(lambda: br.rhs(*a))
    print(f"network call           {direct:8.2f} µs")
    print(f"through Bridge.rhs     {bridged:8.2f} µs  (+{bridged - direct:.2f} µs Python side)")

    prob = pb.ODEProblem(f, y, torch.linspace(0, 5, 20, dtype=torch.float64))
    start = time.perf_counter()
    sol = pb.solve(prob, pb.Tsit5(), batch="lockstep")
    torch_s = time.perf_counter() - start
    print(f"torch engine solve     {torch_s * 1e3:8.2f} ms  nfe={int(sol.stats.nfe.max())}")

    if importlib.util.find_spec("juliacall") is None:
        print("julia engine           skipped: juliacall is not installed (no Julia runtime here)")
        return
    pb.solve(prob, pb.Tsit5(), engine="julia", batch="lockstep")  # compile once
    start = time.perf_counter()
    sol = pb.solve(prob, pb.Tsit5(), engine="julia", batch="lockstep")
    julia_s = time.perf_counter() - start
    nfe = int(sol.stats.nfe.max())
    print(f"julia engine solve     {julia_s * 1e3:8.2f} ms  nfe={nfe}")
    print(f"julia per call         {julia_s / nfe * 1e6:8.2f} µs  (+{julia_s / nfe * 1e6 - direct:.2f} µs "
          "beyond the network; target ≤ 5)")


if __name__ == "__main__":
    main()
