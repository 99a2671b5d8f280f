"""CUDA: a batched MLP ODE solved with Tsit5 on the GPU matches the CPU (float64), dense output and
gradients work there, and the loop reads the device at most once per step."""
import warnings

import pytest
import torch

import pybridge as pb

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

B, N = 8, 4
RTOL, ATOL = 1e-8, 1e-10


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(N, 16), torch.nn.Tanh(), torch.nn.Linear(16, N)).double()


class _F(torch.nn.Module):
    """Uses t (shape () or (B,)) so that per-sample times matter in independent mode."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, t, y):
        t = t.reshape(-1, 1) if t.dim() else t
        return self.net(y) * (1 + 0.1 * torch.sin(t))


def _setup(device):
    net = _mlp().to(device)
    f = _F(net)
    torch.manual_seed(1)
    y0 = torch.randn(B, N, dtype=torch.float64).to(device)
    t = torch.linspace(0.0, 2.0, 6, dtype=torch.float64, device=device)
    return f, y0, t


def _solve(device, batch, dense=False):
    f, y0, t = _setup(device)
    sol = pb.solve(pb.ODEProblem(f, y0, t), pb.Tsit5(), rtol=RTOL, atol=ATOL, batch=batch, dense=dense)
    return f, sol


@pytest.mark.parametrize("batch", ["independent", "lockstep"])
def test_cuda_matches_cpu(batch):
    _, cpu = _solve("cpu", batch)
    _, gpu = _solve("cuda", batch)
    assert gpu.ys.device.type == "cuda"
    assert gpu.success and cpu.success
    assert gpu.ys.shape == cpu.ys.shape == (6, B, N)
    torch.testing.assert_close(gpu.ys.cpu(), cpu.ys, rtol=0, atol=1e-6)
    # The step sequences agree too (up to rounding-level differences in the step sizes).
    assert torch.equal(gpu.stats.naccept.cpu(), cpu.stats.naccept)


@pytest.mark.parametrize("batch", ["independent", "lockstep"])
def test_cuda_dense_output(batch):
    _, cpu = _solve("cpu", batch, dense=True)
    _, gpu = _solve("cuda", batch, dense=True)
    tq = torch.linspace(0.0, 2.0, 17, dtype=torch.float64)
    vg = gpu(tq.cuda())
    assert vg.device.type == "cuda" and vg.shape == (17, B, N)
    torch.testing.assert_close(vg.cpu(), cpu(tq), rtol=0, atol=1e-6)
    # At the save times the interpolant reproduces ys.
    torch.testing.assert_close(gpu(gpu.ts), gpu.ys, rtol=0, atol=1e-7)


def _grads(device, batch, which):
    f, y0, t = _setup(device)
    y0 = y0.clone().requires_grad_(True)
    sol = pb.solve(pb.ODEProblem(f, y0, t), pb.Tsit5(), rtol=RTOL, atol=ATOL, batch=batch)
    loss = sol.ys[-1].square().sum() if which == "ys" else sol.trace.eest.sum()
    gs = torch.autograd.grad(loss, [y0] + list(f.parameters()))
    assert all(g.device.type == device for g in gs)
    return [g.cpu() for g in gs]


@pytest.mark.parametrize("batch", ["independent", "lockstep"])
def test_cuda_gradients_match_cpu(batch):
    gpu, cpu = _grads("cuda", batch, "ys"), _grads("cpu", batch, "ys")
    for gg, gc in zip(gpu, cpu):
        assert torch.isfinite(gg).all()
        torch.testing.assert_close(gg, gc, rtol=1e-6, atol=1e-8)
    assert all(g.abs().sum() > 0 for g in gpu)


@pytest.mark.parametrize("batch", ["independent", "lockstep"])
def test_cuda_eest_gradients(batch):
    gpu, cpu = _grads("cuda", batch, "eest"), _grads("cpu", batch, "eest")
    assert all(torch.isfinite(g).all() for g in gpu)
    # eest is a small difference of stage sums: rounding-sensitive, so only loosely comparable.
    flat = lambda gs: torch.cat([g.reshape(-1) for g in gs])
    assert (flat(gpu) - flat(cpu)).norm() <= 2e-2 * flat(cpu).norm()
    assert all(g.abs().sum() > 0 for g in gpu)


def _count_syncs(prob, batch, rtol):
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            sol = pb.solve(prob, pb.Tsit5(), rtol=rtol, atol=rtol * 1e-2, batch=batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    iters = int((sol.stats.naccept + sol.stats.nreject).max())
    return len(syncs), iters


@pytest.mark.parametrize("batch", ["independent", "lockstep"])
def test_cuda_at_most_one_sync_per_step(batch):
    f, y0, t = _setup("cuda")
    prob = pb.ODEProblem(f, y0, t)  # problem checks may sync; only the solve is counted
    pb.solve(prob, pb.Tsit5(), batch=batch)  # warm-up (CUDA lazy initialization)
    s_lo, n_lo = _count_syncs(prob, batch, 1e-4)
    s_hi, n_hi = _count_syncs(prob, batch, 1e-10)
    print(f"{batch}: {s_lo} syncs / {n_lo} steps (rtol=1e-4), {s_hi} syncs / {n_hi} steps (rtol=1e-10)")
    assert n_hi >= n_lo + 10
    # Syncs per extra step: the loop reads the device once per iteration (fixed costs cancel).
    assert (s_hi - s_lo) <= (n_hi - n_lo), f"{s_hi - s_lo} extra syncs for {n_hi - n_lo} extra steps"
    # Fixed per-solve syncs (tableau upload, direction check, failure report) stay bounded.
    assert s_hi <= n_hi + 30
