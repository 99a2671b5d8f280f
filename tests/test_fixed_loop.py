"""The fixed-step loop (torch_engine/fixed_loop.py) against the general loop it stands in for.

Every fixed-step solve with shared save times now runs in fixed_loop; these tests solve the same
problem with the general loop forced (grid_for patched to decline) and require the same result:
values, counts, trace and return codes, including a sample that blows up mid-solve."""
import math

import numpy as np
import pytest
import torch

import pybridge as pb
from pybridge.torch_engine import fixed_loop
from pybridge.torch_engine.engine import build_method
from pybridge.torch_engine.fixed_loop import step_grid
from pybridge.torch_engine.loop import LoopOptions

D = torch.float64


def general_loop(monkeypatch):
    monkeypatch.setattr(fixed_loop, "grid_for", lambda *a, **k: None)


def both(monkeypatch, run):
    """(run() in the fixed-step loop, run() in the general loop), checking which loop ran."""
    calls = []
    with monkeypatch.context() as m:
        real = fixed_loop.integrate_fixed
        m.setattr(fixed_loop, "integrate_fixed", lambda *a, **k: calls.append(1) or real(*a, **k))
        lean = run()
        assert calls, "the fixed-step loop did not run"
        general_loop(m)
        calls.clear()
        ref = run()
        assert not calls
    return lean, ref


def assert_same(lean, ref, tol=1e-12, stiffness_tol=None):
    assert torch.equal(lean.retcode, ref.retcode)
    torch.testing.assert_close(lean.ys, ref.ys, rtol=tol, atol=tol, equal_nan=True)
    for key in ("nfe", "naccept", "nreject"):
        assert torch.equal(getattr(lean.stats, key), getattr(ref.stats, key)), key
    assert torch.equal(lean.trace.mask, ref.trace.mask)
    for key in ("t", "dt", "eest", "stiffness"):
        k_tol = stiffness_tol if key == "stiffness" and stiffness_tol is not None else tol
        torch.testing.assert_close(getattr(lean.trace, key), getattr(ref.trace, key), rtol=k_tol, atol=k_tol,
                                   equal_nan=True, msg=key)
    torch.testing.assert_close(lean.extras["t_final"], ref.extras["t_final"], rtol=0, atol=0)


def spiral(t, y):
    return torch.stack([-0.1 * y[..., 0] + 2.0 * y[..., 1], -2.0 * y[..., 0] - 0.1 * y[..., 1]], -1)


@pytest.mark.parametrize("solver", [pb.Euler(), pb.Midpoint(), pb.RK4(), pb.Tsit5(), pb.DP5(), pb.Vern7()],
                         ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("batch", ["independent", "lockstep"])
def test_ode_fixed_steps_match_general_loop(monkeypatch, solver, batch):
    y0 = torch.randn(5, 2, dtype=D, generator=torch.Generator().manual_seed(0))
    t = torch.linspace(0.0, 1.3, 7, dtype=D)  # save points between steps: interpolated
    prob = pb.ODEProblem(spiral, y0, t)
    lean, ref = both(monkeypatch, lambda: pb.solve(prob, solver, adaptive=False, dt=0.07, batch=batch))
    assert_same(lean, ref)
    assert lean.trace.mask.shape[-1] == math.ceil(1.3 / 0.07)


@pytest.mark.parametrize("name", ["EM", "EulerHeun", "RKMil", "SRIW1", "SRA1", "ReversibleHeun"])
def test_sde_fixed_steps_match_general_loop(monkeypatch, name):
    solver = getattr(pb, name)()
    noise = "additive" if name == "SRA1" else "diagonal"
    interp = "stratonovich" if name in ("EulerHeun", "ReversibleHeun") else "ito"
    g = (lambda t, y: 0.3 * torch.ones_like(y)) if noise == "additive" else (lambda t, y: 0.4 * y)
    y0 = torch.full((6, 2), 0.5, dtype=D)
    t = torch.tensor([0.0, 0.3, 0.55, 1.0], dtype=D)  # save points off the step grid: shortened steps
    prob = pb.SDEProblem(lambda t, y: 0.8 * y, g, y0, t, noise=noise, interpretation=interp)
    lean, ref = both(monkeypatch, lambda: pb.solve(prob, solver, adaptive=False, dt=2.0**-4, seed=3))
    assert_same(lean, ref)


def test_float32_grid_is_the_general_loops(monkeypatch):
    """dt = 0.1 is not exact in float32: the grid repeats the loop's float32 additions and slack."""
    y0 = torch.randn(4, 2, generator=torch.Generator().manual_seed(1))
    t = torch.linspace(0.0, 3.0, 11)
    prob = pb.ODEProblem(spiral, y0, t)
    lean, ref = both(monkeypatch, lambda: pb.solve(prob, pb.RK4(), dt=0.1))
    assert_same(lean, ref, tol=0)
    sde = pb.SDEProblem(lambda t, y: -y, lambda t, y: 0.2 * y, y0, t)
    lean, ref = both(monkeypatch, lambda: pb.solve(sde, pb.EM(), adaptive=False, dt=0.1, seed=0))
    assert_same(lean, ref, tol=1e-6)


def test_step_grid_lands_on_saves_and_end():
    row = np.array([0.0, 0.25, 1.0], dtype=np.float64)
    grid = step_grid(row, 0.1, stop_at_saves=True, max_steps=100)
    assert grid.ends[2] == 0.25 and grid.ends[-1] == 1.0
    assert grid.saves[2] == [1] and grid.saves[-1] == [2]
    assert sum(len(s) for s in grid.saves) == 2
    assert step_grid(row, 0.1, stop_at_saves=False, max_steps=100).ends[-1] == 1.0
    assert step_grid(row, 1e-4, stop_at_saves=False, max_steps=100) is None  # over max_steps


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fixed_steps_end_on_the_dt_grid_without_a_sliver(monkeypatch, dtype):
    """dt = 0.001 on [0, 2]: 2000 steps, as torchdiffeq and OrdinaryDiffEq take. Summing t + dt
    2000 times misses t = 2 by ~1e-13 and took a 2001st step that long; steps now end on t0 + k·dt
    (after a save point they stop at, on that point + k·dt), in both loops alike."""
    y0 = torch.ones(3, 1, dtype=dtype)
    t = torch.tensor([0.0, 2.0], dtype=dtype)
    lean, ref = both(monkeypatch, lambda: pb.solve(pb.ODEProblem(lambda t, y: -y, y0, t), pb.RK4(), dt=0.001))
    assert_same(lean, ref, tol=0)
    assert lean.stats.naccept.tolist() == [2000] * 3
    dts = lean.trace.dt[0]
    torch.testing.assert_close(dts, torch.full_like(dts, 0.001), rtol=1e-3 if dtype == torch.float32 else 1e-12,
                               atol=0)
    ts = torch.tensor([0.0, 0.2505, 2.0], dtype=D)   # an SDE stops at the save point, then on 0.2505 + k·dt
    sde = pb.SDEProblem(lambda t, y: -y, lambda t, y: 0.2 * y, y0.double(), ts)
    lean, ref = both(monkeypatch, lambda: pb.solve(sde, pb.EM(), adaptive=False, dt=0.001, seed=0))
    assert_same(lean, ref, tol=0)
    assert lean.stats.naccept.tolist() == [251 + 1750] * 3
    assert float(lean.trace.dt[0].min()) > 0.0004


def blow_up(rate):
    return lambda t, y: rate * y * y  # y' = y² from y0 = 3 overflows near t = 1/3


@pytest.mark.parametrize("make", [
    lambda y0, t, rate: (pb.ODEProblem(blow_up(rate), y0, t), pb.RK4()),
    lambda y0, t, rate: (pb.SDEProblem(blow_up(rate), lambda t, y: 0.01 * y, y0, t), pb.EM()),
], ids=["ode", "sde"])
def test_a_failing_sample_keeps_its_values_and_spoils_no_one(monkeypatch, make):
    y0 = torch.tensor([[0.1], [3.0], [0.2]], dtype=D, requires_grad=True)
    rate = torch.tensor(1.0, dtype=D, requires_grad=True)   # a parameter every sample shares
    t = torch.linspace(0.0, 2.0, 9, dtype=D)
    prob, solver = make(y0, t, rate)
    run = lambda: pb.solve(prob, solver, adaptive=False, dt=0.01, seed=0)  # noqa: E731
    lean, ref = both(monkeypatch, run)
    assert_same(lean, ref)
    with torch.no_grad():  # (without gradients, stopped samples' steps are discarded, not zeroed)
        assert_same(run(), ref)
    assert lean.retcode.tolist() == [int(pb.ReturnCode.Success), int(pb.ReturnCode.Unstable),
                                     int(pb.ReturnCode.Success)]
    ys = lean.ys[:, :, 0]
    assert torch.isfinite(ys[:, [0, 2]]).all()
    assert torch.isfinite(ys[:2, 1]).all() and torch.isnan(ys[-1, 1])   # kept up to ~t = 1/3, NaN after
    # The others' gradients stay finite although the failing sample's steps overflowed.
    ys[-1, [0, 2]].sum().backward()
    assert torch.isfinite(y0.grad).all() and y0.grad[1] == 0 and (y0.grad[[0, 2]] > 0).all()
    assert torch.isfinite(rate.grad) and rate.grad > 0


def test_per_sample_save_times_use_the_general_loop():
    t = torch.tensor([[0.0, 1.0], [0.0, 2.0]], dtype=D)
    opts = LoopOptions(adaptive=False, dt=0.1)
    method = build_method(pb.RK4(), D, torch.device("cpu"))
    assert fixed_loop.grid_for(method, t, opts) is None
    assert fixed_loop.grid_for(method, t[:1].expand(2, -1), opts) is not None


def test_compiled_fixed_steps_match_eager():
    """compile=True runs FixedStep as one graph: same steps, values and gradients as eager."""
    w = torch.tensor([[0.3, -1.0], [1.2, 0.1]], dtype=D, requires_grad=True)
    y0 = torch.randn(4, 2, dtype=D, generator=torch.Generator().manual_seed(2))
    prob = pb.ODEProblem(lambda t, y: torch.tanh(y @ w), y0, torch.linspace(0.0, 1.0, 6, dtype=D))

    def run(compile):
        w.grad = None
        sol = pb.solve(prob, pb.Tsit5(), adaptive=False, dt=0.1, compile=compile)
        sol.ys.square().sum().backward()
        return sol, w.grad.clone()

    (eager, g_eager), (compiled, g_compiled) = run(False), run(True)
    # (The stiffness estimate divides differences of nearby stages: fused kernels round them differently.)
    assert_same(compiled, eager, tol=1e-12, stiffness_tol=1e-6)
    torch.testing.assert_close(g_compiled, g_eager, rtol=1e-10, atol=1e-12)


def test_buffered_saves_and_stiffness_flush_in_chunks(monkeypatch):
    """Saves and stiffness estimates are computed many steps at a time; with a tiny buffer they are
    flushed every few steps, with the same result."""
    y0 = torch.randn(5, 2, dtype=D, generator=torch.Generator().manual_seed(4))
    prob = pb.ODEProblem(spiral, y0, torch.linspace(0.0, 2.0, 9, dtype=D))
    run = lambda: pb.solve(prob, pb.Vern7(), adaptive=False, dt=0.05)  # noqa: E731
    whole = run()
    monkeypatch.setattr(fixed_loop, "SAVE_BUFFER_ELEMENTS", 64)
    assert_same(run(), whole, tol=1e-12)  # (interpolating a different number of rows at once rounds differently)
