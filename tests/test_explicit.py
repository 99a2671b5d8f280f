"""Explicit Runge–Kutta solvers: order, accuracy on reference problems, batches, trace, gradients."""
import math

import numpy as np
import pytest
import torch

import pybridge as pb

ADAPTIVE = [pb.BS3, pb.DP5, pb.Tsit5, pb.Vern7]
ALL = [pb.Euler, pb.Midpoint, pb.Heun, pb.RK4] + ADAPTIVE
ORDER = {"Euler": 1, "Midpoint": 2, "Heun": 2, "RK4": 4, "BS3": 3, "DP5": 5, "Tsit5": 5, "Vern7": 7}


def linear_problem(batch=None, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    A = 0.5 * torch.randn(10, 10, generator=g, dtype=dtype)
    shape = (10,) if batch is None else (batch, 10)
    y0 = torch.randn(*shape, generator=g, dtype=dtype)
    return A, y0


def exact_linear(A, y0, t):
    return torch.stack([y0 @ torch.linalg.matrix_exp(A * ti).T for ti in t])


@pytest.mark.parametrize("solver", ALL, ids=lambda s: s.__name__)
def test_convergence_order(solver):
    A, y0 = linear_problem()
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    exact = exact_linear(A, y0, t)[-1]
    dts, errs = [], []
    # Start in the asymptotic regime; a 7th-order method reaches roundoff within a few halvings.
    for k in range(0 if ORDER[solver.__name__] >= 7 else 2, 12):
        dt = 2.0 ** -k
        sol = pb.solve(pb.ODEProblem(lambda t, y: y @ A.T, y0, t), solver(), adaptive=False, dt=dt)
        err = (sol.ys[-1] - exact).abs().max().item()
        if 1e-12 < err < 1e-1:
            dts.append(dt)
            errs.append(err)
        if err < 1e-12:
            break
    assert len(dts) >= 3, (dts, errs)
    slope = np.polyfit(np.log(dts), np.log(errs), 1)[0]
    assert abs(slope - ORDER[solver.__name__]) <= 0.5, slope


@pytest.mark.parametrize("solver", ADAPTIVE, ids=lambda s: s.__name__)
def test_exp_problem_within_tolerance(solver):
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    u0 = torch.tensor([0.5], dtype=torch.float64)
    for rtol in (1e-4, 1e-7, 1e-10):
        sol = pb.solve(pb.ODEProblem(lambda t, u: 1.01 * u, u0, t), solver(), rtol=rtol, atol=rtol * 1e-2)
        exact = 0.5 * torch.exp(1.01 * t)
        rel = ((sol.ys[:, 0] - exact) / exact).abs().max().item()
        assert rel < 50 * rtol, (rtol, rel)
        assert sol.success


def arenstorf(t, y):
    mu = 0.012277471
    mu1 = 1 - mu
    x, yy, vx, vy = y.unbind(-1)
    d1 = ((x + mu) ** 2 + yy ** 2) ** 1.5
    d2 = ((x - mu1) ** 2 + yy ** 2) ** 1.5
    ax = x + 2 * vy - mu1 * (x + mu) / d1 - mu * (x - mu1) / d2
    ay = yy - 2 * vx - mu1 * yy / d1 - mu * yy / d2
    return torch.stack([vx, vy, ax, ay], -1)


@pytest.mark.parametrize("solver,rtol,tol", [(pb.Tsit5, 1e-8, 1e-3), (pb.DP5, 1e-8, 1e-3),
                                             (pb.Tsit5, 1e-10, 1e-5), (pb.Vern7, 1e-10, 1e-5)],
                         ids=lambda x: getattr(x, "__name__", str(x)))
def test_arenstorf_orbit_closes(reference, solver, rtol, tol):
    ref = reference["arenstorf"]
    y0 = torch.tensor(ref["y0"], dtype=torch.float64)
    t = torch.tensor([ref["t0"], ref["t1"]], dtype=torch.float64)
    sol = pb.solve(pb.ODEProblem(arenstorf, y0, t), solver(), rtol=rtol, atol=rtol)
    err = (sol.ys[-1] - torch.tensor(ref["y_t1"], dtype=torch.float64)).abs().max().item()
    assert sol.success and err < tol, err


def test_linear_reference_all_save_points():
    A, y0 = linear_problem()
    t = torch.linspace(0, 2, 21, dtype=torch.float64)
    sol = pb.solve(pb.ODEProblem(lambda t, y: y @ A.T, y0, t), pb.Tsit5(), rtol=1e-9, atol=1e-12)
    assert torch.allclose(sol.ys, exact_linear(A, y0, t), rtol=1e-6, atol=1e-9)


def test_step_control_matches_specification():
    """Every accepted step has EEst ≤ 1; NFE = 2 (start) + 6 per step for FSAL Tsit5."""
    A, y0 = linear_problem()
    t = torch.linspace(0, 3, 4, dtype=torch.float64)
    sol = pb.solve(pb.ODEProblem(lambda t, y: y @ A.T, y0, t), pb.Tsit5(), rtol=1e-6, atol=1e-8)
    tr = sol.trace
    assert (tr.eest[tr.mask] <= 1).all()
    assert int(sol.stats.nfe) == 2 + 6 * (int(sol.stats.naccept) + int(sol.stats.nreject))
    assert torch.isclose(tr.dt[tr.mask].sum(), torch.tensor(3.0, dtype=torch.float64))
    assert tr.t[tr.mask][-1] == 3.0  # never past the end, lands on it exactly


def test_dtmax_and_first_step_respected():
    A, y0 = linear_problem()
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    sol = pb.solve(pb.ODEProblem(lambda t, y: y @ A.T, y0, t), pb.Tsit5(), dtmax=0.05, dt=0.01)
    dts = sol.trace.dt[sol.trace.mask]
    assert dts[0] == pytest.approx(0.01)
    assert (dts <= 0.05 + 1e-15).all()


def test_initial_step_follows_hairer():
    """The first step is Hairer's estimate (SOLVERS.md), computed here by hand."""
    u0 = torch.tensor([0.5], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    sol = pb.solve(pb.ODEProblem(lambda t, u: 1.01 * u, u0, t), pb.Tsit5(), rtol=1e-3, atol=1e-6)
    sk = 1e-6 + 0.5 * 1e-3
    d0, d1 = 0.5 / sk, 1.01 * 0.5 / sk
    dt0 = 0.01 * d0 / d1
    f1 = 1.01 * (0.5 + dt0 * 1.01 * 0.5)
    d2 = abs(f1 - 1.01 * 0.5) / sk / dt0
    dt1 = (0.01 / max(d1, d2)) ** (1 / 5)
    assert sol.trace.dt[0].item() == pytest.approx(min(100 * dt0, dt1, 1.0), rel=1e-12)


@pytest.mark.parametrize("batch", ["independent", "lockstep"])
def test_batch_modes_match_unbatched_accuracy(batch):
    A, y0 = linear_problem(batch=5)
    t = torch.linspace(0, 1, 6, dtype=torch.float64)
    sol = pb.solve(pb.ODEProblem(lambda t, y: y @ A.T, y0, t), pb.Tsit5(), rtol=1e-8, atol=1e-10, batch=batch)
    assert sol.ys.shape == (6, 5, 10)
    assert torch.allclose(sol.ys, exact_linear(A, y0, t), rtol=1e-5, atol=1e-7)
    if batch == "lockstep":
        assert (sol.stats.naccept == sol.stats.naccept[0]).all()
        assert torch.equal(sol.trace.dt[0], sol.trace.dt[1])


def test_independent_samples_take_their_own_steps():
    """A fast and a slow sample in one batch: each takes the steps it would take alone."""
    rates = torch.tensor([[1.0], [20.0]], dtype=torch.float64)
    f = lambda t, y: -rates * y + torch.sin(rates * t[:, None])
    y0 = torch.ones(2, 1, dtype=torch.float64)
    t = torch.linspace(0, 2, 3, dtype=torch.float64)
    batched = pb.solve(pb.ODEProblem(f, y0, t), pb.Tsit5(), rtol=1e-6, atol=1e-8)
    for b in range(2):
        alone = pb.solve(pb.ODEProblem(lambda t, y: -rates[b] * y + torch.sin(rates[b] * t), y0[b], t),
                         pb.Tsit5(), rtol=1e-6, atol=1e-8)
        assert int(batched.stats.naccept[b]) == int(alone.stats.naccept)
        assert torch.allclose(batched.ys[:, b], alone.ys, rtol=1e-12, atol=1e-14)
    assert batched.stats.naccept[1] > batched.stats.naccept[0]


def test_per_sample_times_and_directions():
    A, y0 = linear_problem(batch=3)
    t = torch.stack([torch.linspace(0, 1, 5), torch.linspace(0.5, 3, 5), torch.linspace(1, -1, 5)]).double()
    sol = pb.solve(pb.ODEProblem(lambda t, y: y @ A.T, y0, t), pb.DP5(), rtol=1e-9, atol=1e-11)
    for b in range(3):
        ex = exact_linear(A, y0[b], t[b] - t[b, 0])
        assert torch.allclose(sol.ys[:, b], ex, rtol=1e-6, atol=1e-8), b


def test_time_dependent_f_gets_per_sample_time():
    seen = []

    def f(t, y):
        seen.append(t.shape)
        return torch.cos(t)[:, None] * torch.ones_like(y)

    y0 = torch.zeros(2, 1, dtype=torch.float64)
    t = torch.tensor([[0.0, 1.0], [0.0, 2.0]], dtype=torch.float64)
    sol = pb.solve(pb.ODEProblem(f, y0, t), pb.Tsit5(), rtol=1e-9, atol=1e-12)
    assert set(seen) == {(2,)}
    assert torch.allclose(sol.ys[-1, :, 0], torch.sin(torch.tensor([1.0, 2.0], dtype=torch.float64)), atol=1e-8)


def test_unbatched_state_of_any_shape_is_one_sample():
    M0 = torch.eye(3, dtype=torch.float64)
    A = torch.tensor([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, -0.5]], dtype=torch.float64)
    t = torch.linspace(0, 1, 3, dtype=torch.float64)
    sol = pb.solve(pb.ODEProblem(lambda t, M: A @ M, M0, t, batched=False), pb.Tsit5(), rtol=1e-9, atol=1e-12)
    assert sol.ys.shape == (3, 3, 3)
    assert sol.stats.nfe.dim() == 0 and sol.retcode.dim() == 0 and sol.trace.dt.dim() == 1
    assert torch.allclose(sol.ys[-1], torch.linalg.matrix_exp(A), atol=1e-8)


@pytest.mark.parametrize("solver", ADAPTIVE, ids=lambda s: s.__name__)
def test_dense_output_accuracy(solver):
    A, y0 = linear_problem(batch=2)
    t = torch.tensor([0.0, 2.0], dtype=torch.float64)
    sol = pb.solve(pb.ODEProblem(lambda t, y: y @ A.T, y0, t), solver(), rtol=1e-8, atol=1e-10, dense=True)
    tq = torch.linspace(0, 2, 37, dtype=torch.float64)
    err = (sol(tq) - exact_linear(A, y0, tq)).abs().max().item()
    # Tsit5/DP5 carry free 4th-order interpolants, Vern7 its 7th-order one (lazy stages); BS3 uses
    # cubic Hermite. (The truth, torch.linalg.matrix_exp, is itself only good to ~1e-11.)
    assert err < {"Tsit5": 1e-6, "DP5": 1e-6, "BS3": 1e-6, "Vern7": 1e-7}[solver.__name__], err
    assert torch.allclose(sol(t), sol.ys, atol=1e-12)


def test_dense_output_requires_dense_flag():
    A, y0 = linear_problem()
    sol = pb.solve(pb.ODEProblem(lambda t, y: y @ A.T, y0, torch.tensor([0.0, 1.0]).double()))
    with pytest.raises(ValueError, match="dense=True"):
        sol(torch.tensor([0.5]))


def test_trace_stiffness_estimates_dominant_eigenvalue():
    lam = 30.0
    y0 = torch.tensor([1.0, 1.0], dtype=torch.float64)
    D = torch.diag(torch.tensor([-lam, -1.0], dtype=torch.float64))
    sol = pb.solve(pb.ODEProblem(lambda t, y: y @ D, y0, torch.tensor([0.0, 0.5]).double()), pb.Tsit5(),
                   rtol=1e-6, atol=1e-9)
    s = sol.trace.stiffness[sol.trace.mask]
    # Early, while the fast mode is present, the estimate sees |λ| ≈ 30.
    assert 10 < s[:5].max().item() <= lam * 1.01
    assert sol.trace.stability_size == pytest.approx(3.5068)


def test_float32_works():
    A, y0 = linear_problem(batch=4, dtype=torch.float32)
    t = torch.linspace(0, 1, 3)
    sol = pb.solve(pb.ODEProblem(lambda t, y: y @ A.T, y0, t), pb.Tsit5(), rtol=1e-5, atol=1e-6)
    assert sol.ys.dtype == torch.float32 and sol.trace.eest.dtype == torch.float32
    assert torch.allclose(sol.ys.double(), exact_linear(A.double(), y0.double(), t.double()), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("solver", [pb.Tsit5(), pb.Vern7(), pb.Rodas5P(), pb.Kvaerno5(), pb.TRBDF2()],
                         ids=lambda s: s.name)
def test_float32_far_from_zero_time(solver):
    """float32 times near 1e6 have a resolution of 0.0625. A floor of 10 ulps on dt (1.2 there) failed
    solves whose steps are finer; a first step of 1e-6 did not move t; a 100-ulp snap onto the target
    made every retry the same step; and a state advanced by dt drifted from its rounded time (y' = 1
    gave 0.486 at t0 + 0.5). The floor is now 1–2 ulps, and a step is the time it advances."""
    t = torch.tensor([1e6, 1e6 + 0.5, 1e6 + 1.0])
    sol = pb.solve(pb.ODEProblem(lambda t, y: torch.ones_like(y), torch.zeros(1), t), solver)
    assert sol.success
    torch.testing.assert_close(sol.ys[:, 0], torch.tensor([0.0, 0.5, 1.0]), rtol=0, atol=1e-5)   # (0.486 before)
    t = torch.tensor([1e5, 1e5 + 2.0, 1e5 + 4.0])   # resolution 0.0078; y' = -5y + 1 needs steps ~0.1
    prob = pb.ODEProblem(lambda t, y: 1 - 5 * y, torch.zeros(1), t)
    if solver.name == "TRBDF2":
        # 2nd order: its first steps would need to be below one ulp of t. Retries that round to the
        # same step end used to repeat until MaxIters; now it stops at once.
        with pytest.warns(RuntimeWarning, match="DtLessThanMin"):
            sol = pb.solve(prob, solver, rtol=1e-4, atol=1e-6)
        assert int(sol.stats.nreject) < 5
        return
    sol = pb.solve(prob, solver, rtol=1e-4, atol=1e-6)
    assert sol.success
    exact = 0.2 * (1 - torch.exp(-5 * torch.tensor([0.0, 2.0, 4.0])))
    torch.testing.assert_close(sol.ys[:, 0], exact, rtol=0, atol=1e-5)
    assert (sol.trace.dt[sol.trace.mask] >= torch.finfo(torch.float32).eps * 1e5).all()


def test_float32_far_from_zero_steps_down_to_one_ulp_and_never_length_zero():
    """At t = 1e6 one float32 ulp is 0.0625: a floor of eps·|t| (0.119) stopped a rotation whose
    steps shrink to 0.104. And a step whose end rounds onto a save time must count as reaching it:
    the sample otherwise took one more, zero-length, step there."""
    t0, span = 1e6, 10.0
    w = 2 * math.pi / span * 3
    t = torch.linspace(t0, t0 + span, 5, dtype=torch.float32)
    rot = lambda t, y: torch.stack([-w * y[..., 1], w * y[..., 0]], -1)  # noqa: E731
    sol = pb.solve(pb.ODEProblem(rot, torch.tensor([1.0, 0.0]), t), pb.Tsit5(), rtol=1e-4, atol=1e-6)
    assert sol.success
    s = sol.ts.double() - t0
    torch.testing.assert_close(sol.ys, torch.stack([torch.cos(w * s), torch.sin(w * s)], -1).float(), rtol=0, atol=1e-3)
    t = torch.linspace(1e5, 1e5 + 3.5135953426361084, 4, dtype=torch.float32)
    base = t[0]
    sol = pb.solve(pb.ODEProblem(lambda tt, y: -0.3 * y + torch.sin(2 * (tt - base)), torch.ones(1), t),
                   pb.Tsit5(), rtol=1e-3, atol=1e-6)
    assert sol.success and (sol.trace.dt[sol.trace.mask] > 0).all()
