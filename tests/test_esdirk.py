"""ESDIRK solvers (Kvaerno5, KenCarp4, TRBDF2): tableau order conditions, empirical convergence
order, stiff accuracy on the Bari test set (ROBER, VDPOL), Newton failure handling (per-sample
ConvergenceFailure, singular W), statistics, gradients, and the float32 tolerance warning.

ROBER, VDPOL and the order tests pass an analytic `jac` (autodiff Jacobians cost much of a step on
small systems); the AD path is exercised by the stats, failure and gradient tests."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import pybridge as pb
from tests.stiff_problems import mescd, rober, vdpol
from pybridge.torch_engine.esdirk_tableaus import ESDIRK_TABLEAUS

F64 = torch.float64
ESDIRKS = [pb.Kvaerno5, pb.KenCarp4, pb.TRBDF2]
ORDER = {"Kvaerno5": 5, "KenCarp4": 4, "TRBDF2": 2}


def rober_jac(t, y):
    y1, y2, y3 = y.unbind(-1)
    z = torch.zeros_like(y1)
    return torch.stack([torch.stack([z - 0.04, 1e4 * y3, 1e4 * y2], -1),
                        torch.stack([z + 0.04, -1e4 * y3 - 6e7 * y2, -1e4 * y2], -1),
                        torch.stack([z, 6e7 * y2, z], -1)], -2)


def vdpol_jac(t, y, eps=1e-6):
    y1, y2 = y.unbind(-1)
    return torch.stack([torch.stack([torch.zeros_like(y1), torch.ones_like(y1)], -1),
                        torch.stack([(-2 * y1 * y2 - 1) / eps, (1 - y1 ** 2) / eps], -1)], -2)


# ----------------------------------------------------------------------------------------------
# Tableaus
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(ESDIRK_TABLEAUS))
def test_tableau_order_conditions(name):
    """ESDIRK structure, c = row sums, order conditions of b up to the nominal order (up to 5 for
    the trees checked here) and of the embedded bhat = b + btilde up to its order; one condition
    beyond each fails (the orders are not higher)."""
    tab = ESDIRK_TABLEAUS[name]
    A, c = np.asarray(tab.A), np.asarray(tab.c)
    b = A[-1]
    assert np.all(A[0] == 0) and np.allclose(np.diag(A)[1:], tab.gamma) and np.allclose(np.triu(A, 1), 0)
    np.testing.assert_allclose(A.sum(1), c, atol=1e-14)

    def residuals(w, order):
        Ac = A @ c
        conds = {1: [w.sum() - 1], 2: [w @ c - 1 / 2], 3: [w @ c ** 2 - 1 / 3, w @ Ac - 1 / 6],
                 4: [w @ c ** 3 - 1 / 4, w @ (c * Ac) - 1 / 8, w @ A @ c ** 2 - 1 / 12, w @ A @ Ac - 1 / 24],
                 5: [w @ c ** 4 - 1 / 5, w @ (c ** 2 * Ac) - 1 / 10, w @ (c * (A @ c ** 2)) - 1 / 15,
                     w @ (c * (A @ Ac)) - 1 / 30, w @ (Ac ** 2) - 1 / 20, w @ A @ c ** 3 - 1 / 20,
                     w @ A @ (c * Ac) - 1 / 40, w @ A @ A @ c ** 2 - 1 / 60, w @ A @ A @ Ac - 1 / 120]}
        return np.concatenate([conds[k] for k in range(1, order + 1)]), np.asarray(conds.get(order + 1, [1.0]))

    ok, next_order = residuals(b, tab.order)
    assert np.abs(ok).max() < 1e-12
    assert np.abs(next_order).max() > 1e-6
    bhat = b + np.asarray(tab.btilde)
    ok, next_order = residuals(bhat, tab.error_order)
    assert np.abs(ok).max() < 1e-12
    assert np.abs(next_order).max() > 1e-6


# ----------------------------------------------------------------------------------------------
# Convergence order against the matrix exponential (fixed steps)
# ----------------------------------------------------------------------------------------------
def _linear_system(seed=1, n=6):
    """A mildly stiff linear system: eigenvalues −0.5 … −20 plus a rotation."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    lam = -torch.logspace(math.log10(0.5), math.log10(20.0), n, dtype=F64)
    S = torch.randn(n, n, generator=g, dtype=F64)
    A = Q @ torch.diag(lam) @ Q.T + 0.5 * (S - S.T)
    return A, torch.randn(n, generator=g, dtype=F64)


@pytest.mark.parametrize("solver", ESDIRKS, ids=lambda s: s.__name__)
def test_convergence_order(solver):
    A, y0 = _linear_system(n=4)
    p = ORDER[solver.__name__]
    # Steps small enough that Newton (with J frozen at the step's start) meets the tight
    # tolerance on the non-autonomous problem; failed fixed steps cannot be retried.
    dts = [2.0 ** -k for k in range(3, 6)]

    def slope(f, jac, exact):
        errs = []
        for dt in dts:
            prob = pb.ODEProblem(f, y0, torch.tensor([0.0, 1.0], dtype=F64), jac=jac)
            # Tight Newton tolerance: the measured error is the method's, not the iteration's.
            sol = pb.solve(prob, solver(), dt=dt, adaptive=False, rtol=1e-10, atol=1e-12, max_steps=200)
            assert sol.success
            errs.append((sol.ys[-1] - exact).abs().max().item())
        return np.polyfit(np.log(dts), np.log(errs), 1)[0]

    jac = lambda t, y: A.expand(*y.shape[:-1], *A.shape)
    s = slope(lambda t, y: y @ A.T, jac, torch.linalg.matrix_exp(A) @ y0)
    assert abs(s - p) < 0.5, s
    # Non-autonomous y' = cos(t)·A y, exact expm(sin(t)·A) y0: exercises the time nodes c_i.
    s = slope(lambda t, y: torch.cos(t)[..., None] * (y @ A.T) if t.dim() else torch.cos(t) * (y @ A.T),
              lambda t, y: (torch.cos(t)[..., None, None] if t.dim() else torch.cos(t)) * jac(t, y),
              torch.linalg.matrix_exp(math.sin(1.0) * A) @ y0)
    assert abs(s - p) < 0.5, s


# ----------------------------------------------------------------------------------------------
# Bari IVP test set
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("solver,rtol,atol", [(pb.Kvaerno5, 1e-6, 1e-12), (pb.TRBDF2, 1e-4, 1e-10)],
                         ids=lambda v: getattr(v, "__name__", str(v)))
def test_rober(reference, solver, rtol, atol):
    ref = reference["rober"]
    # Save points from 1e-2: the loop's end-of-span slack (100·eps·t_end ≈ 2e-3 for t_end = 1e11)
    # would otherwise swallow Kvaerno5's retries onto earlier save points.
    ts = torch.tensor([0.0] + [10.0 ** k for k in range(-2, 12)], dtype=F64)
    prob = pb.ODEProblem(rober, torch.tensor(ref["y0"], dtype=F64), ts, jac=rober_jac)
    sol = pb.solve(prob, solver(), rtol=rtol, atol=atol)
    assert sol.success
    assert (sol.ys.sum(-1) - 1).abs().max() < 1e-8   # the invariant y1+y2+y3 = 1 at every save
    assert float(sol.ts[-1]) == ref["t1"]
    assert mescd(sol.ys[-1].tolist(), ref["y_t1"], rtol, atol) >= -math.log10(rtol) - 1.5
    assert int(sol.stats.naccept) < 1000


@pytest.mark.parametrize("solver,rtol", [(pb.KenCarp4, 1e-6), (pb.Kvaerno5, 1e-5)],
                         ids=lambda v: getattr(v, "__name__", str(v)))
def test_vdpol(reference, solver, rtol):
    ref = reference["vdpol"]
    atol = rtol
    prob = pb.ODEProblem(vdpol, torch.tensor(ref["y0"], dtype=F64), torch.tensor([ref["t0"], ref["t1"]], dtype=F64),
                         jac=vdpol_jac)
    sol = pb.solve(prob, solver(), rtol=rtol, atol=atol)
    assert sol.success
    assert mescd(sol.ys[-1].tolist(), ref["y_t1"], rtol, atol) >= -math.log10(rtol) - 1.5


# ----------------------------------------------------------------------------------------------
# Statistics, dense output, stiffness trace
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", ESDIRKS, ids=lambda s: s.__name__)
def test_stats_dense_and_stiffness(solver):
    A, y0 = _linear_system(2, n=4)
    ts = torch.tensor([0.0, 0.3, 1.0], dtype=F64)
    sol = pb.solve(pb.ODEProblem(lambda t, y: y @ A.T, y0, ts), solver(), rtol=1e-5, atol=1e-8, dense=True)
    assert sol.success
    st = sol.stats
    steps = st.naccept + st.nreject
    assert torch.equal(st.njac, steps) and torch.equal(st.nlu, steps)   # one each per attempt
    # Newton iterations are the evaluations (plus f(t0) and the initial-step probe) and the
    # solves (plus one error filter per step); on a linear problem nothing fails.
    assert int(st.nnonliniter) >= steps * (ESDIRK_TABLEAUS[solver.__name__].stages - 1)
    assert int(st.nfe) == int(st.nnonliniter) + 2
    assert torch.equal(st.nsolve, st.nnonliniter + steps)
    assert int(st.nnonlinconvfail) == 0
    exact = lambda t: torch.linalg.matrix_exp(A * t) @ y0
    assert (sol.ys[-1] - exact(1.0)).abs().max() < 1e-3
    # Hermite dense output between steps.
    tq = torch.linspace(0.05, 1.0, 9, dtype=F64)
    err_q = max((sol(tq)[i] - exact(float(t))).abs().max().item() for i, t in enumerate(tq))
    assert err_q < 1e-3
    m = sol.trace.mask
    assert torch.allclose(sol.trace.stiffness[m], A.abs().sum(-1).max().expand(int(m.sum())))


# ----------------------------------------------------------------------------------------------
# Failures
# ----------------------------------------------------------------------------------------------
def test_newton_failure_is_per_sample():
    """Sample 0: y' = −sign(y). Once a stage would cross 0 its equation has no solution (Newton
    oscillates), dt halves until dtmin and the sample ends ConvergenceFailure. Sample 1 (y' = −y)
    is untouched: bit-identical to solving it alone, same counters."""
    mask = torch.tensor([[True], [False]])
    f = lambda t, y: torch.where(mask, -torch.sign(y), -y)
    ts = torch.tensor([0.0, 0.5, 2.0], dtype=F64)
    y0 = torch.full((2, 1), 0.7123, dtype=F64, requires_grad=True)
    opts = dict(rtol=1e-6, atol=1e-8, dtmin=1e-4)
    with pytest.warns(RuntimeWarning, match="ConvergenceFailure"):
        sol = pb.solve(pb.ODEProblem(f, y0, ts), pb.KenCarp4(), **opts)
    assert sol.retcodes == [pb.ReturnCode.ConvergenceFailure, pb.ReturnCode.Success]
    assert int(sol.stats.nnonlinconvfail[0]) >= 1 and int(sol.stats.nnonlinconvfail[1]) == 0
    assert abs(float(sol.extras["t_final"][0]) - 0.7123) < 1e-3   # it got to the kink
    y0_solo = y0[1].detach().clone().requires_grad_()
    solo = pb.solve(pb.ODEProblem(lambda t, y: -y, y0_solo, ts), pb.KenCarp4(), **opts)
    assert solo.success
    assert torch.equal(solo.ys, sol.ys[:, 1])
    for k in ("nfe", "naccept", "nreject", "njac", "nnonliniter"):
        assert int(getattr(solo.stats, k)) == int(getattr(sol.stats, k)[1]), k
    # The failed sample leaves nothing non-finite in the graph.
    sol.ys[-1, 1].sum().backward()
    assert torch.isfinite(y0.grad).all()
    assert abs(float(y0.grad[1]) - math.exp(-2.0)) < 1e-5


@pytest.mark.parametrize("batch", ["independent", "lockstep"])
@pytest.mark.parametrize("solver", [pb.Kvaerno5(), pb.KenCarp4(), pb.TRBDF2()], ids=lambda s: s.name)
def test_a_sample_whose_f_turns_nan_stops_alone(solver, batch):
    """y' = −√y: y0 = 0.01 reaches 0 at t = 0.2, after which f is NaN. That sample ends Unstable
    and the other (y0 = 1, y(1) = 1/4) finishes with a finite gradient, in lockstep too: there a
    Newton iterate turned NaN had failed the shared step of every sample until dtmin."""
    y0 = torch.tensor([[1.0], [0.01]], dtype=F64, requires_grad=True)
    prob = pb.ODEProblem(lambda t, y: -torch.sqrt(y), y0, torch.tensor([0.0, 0.5, 1.0], dtype=F64))
    with pytest.warns(RuntimeWarning, match="sample 1: Unstable"):
        sol = pb.solve(prob, solver, batch=batch, rtol=1e-6, atol=1e-8)
    assert sol.retcodes == [pb.ReturnCode.Success, pb.ReturnCode.Unstable]
    torch.testing.assert_close(sol.ys[:, 0, 0], torch.tensor([1.0, 0.5625, 0.25], dtype=F64), rtol=1e-4, atol=0)
    grad, = torch.autograd.grad(sol.ys[-1, 0].sum(), y0)
    assert torch.isfinite(grad).all() and abs(float(grad[0]) - 0.5) < 1e-3   # d(√y0 − 1/2)²/dy0 = 1/2


def test_singular_matrix_rejects_that_sample_only():
    """y' = λy with γhλ = 1 (KenCarp4: γ = 1/4, λ = 4, h = 1) makes I − γhJ exactly singular."""
    assert ESDIRK_TABLEAUS["KenCarp4"].gamma == 0.25
    lam = torch.tensor([[4.0], [-4.0]], dtype=F64)
    prob = pb.ODEProblem(lambda t, y: lam * y, torch.ones(2, 1, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64))
    sol = pb.solve(prob, pb.KenCarp4(), dt=1.0, rtol=1e-6, atol=1e-9)
    assert sol.success
    assert int(sol.stats.nreject[0]) >= 1
    assert int(sol.stats.nnonlinconvfail[0]) == 0   # singular, not a Newton failure
    assert torch.allclose(sol.ys[-1, :, 0], torch.exp(lam[:, 0]), rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Gradients (Newton detached, implicit-function-theorem correction per stage)
# ----------------------------------------------------------------------------------------------
def _param_problem(p, t1=0.2):
    def f(t, y):
        a, b = y.unbind(-1)
        return torch.stack([-p[0] * a + p[1] * b * b, p[0] * a - p[1] * b * b - p[2] * b + torch.sin(t) * 0.1], -1)
    return pb.ODEProblem(f, torch.stack([p[3], torch.zeros((), dtype=F64)]), torch.tensor([0.0, t1 / 2, t1], dtype=F64))


@pytest.mark.parametrize("solver", [pb.TRBDF2, pb.KenCarp4], ids=lambda s: s.__name__)
def test_gradcheck_fixed_steps(solver):
    p = torch.tensor([5.0, 20.0, 50.0, 1.0], dtype=F64, requires_grad=True)
    # Tight tolerances converge Newton far below the step's error, so finite differences see
    # (nearly) the same map. max_steps: a failed fixed step cannot be retried.
    fn = lambda p: pb.solve(_param_problem(p), solver(), dt=0.05, adaptive=False, rtol=1e-10, atol=1e-12,
                            max_steps=50).ys
    assert torch.autograd.gradcheck(fn, (p,))


def test_gradcheck_adaptive_and_finite_differences():
    p = torch.tensor([5.0, 20.0, 50.0, 1.0], dtype=F64, requires_grad=True)
    # differentiable_dt: step sizes are smooth functions of p, so the discrete gradient is the
    # derivative of what was computed (loose tolerance, few steps).
    fn = lambda p: pb.solve(_param_problem(p), pb.TRBDF2(), rtol=1e-3, atol=1e-5, differentiable_dt=True).ys
    assert torch.autograd.gradcheck(fn, (p,), atol=1e-5, rtol=1e-3)
    # Default (dt detached): agrees with finite differences of the whole solve to the tolerance.
    out = lambda p: pb.solve(_param_problem(p), pb.KenCarp4(), rtol=1e-7, atol=1e-9).ys[-1].sum()
    g, = torch.autograd.grad(out(p), p)
    eps = 1e-5
    fd = torch.stack([(out(p.detach() + eps * e) - out(p.detach() - eps * e)) / (2 * eps)
                      for e in torch.eye(4, dtype=F64)])
    assert torch.allclose(g, fd, rtol=1e-4, atol=1e-6), (g, fd)


# ----------------------------------------------------------------------------------------------
# float32 tolerance warning (issue item 7)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", [pb.KenCarp4, pb.Rodas5P], ids=lambda s: s.__name__)
def test_float32_tight_rtol_warns(solver):
    prob = pb.ODEProblem(lambda t, y: -y, torch.ones(2, dtype=torch.float32),
                         torch.tensor([0.0, 0.1], dtype=torch.float32))
    with pytest.warns(UserWarning, match=r"rtol=1e-07 in torch.float32"):
        pb.solve(prob, solver(), rtol=1e-7, atol=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        sol = pb.solve(prob, solver(), rtol=1e-4, atol=1e-6)   # reachable: no warning
        assert sol.success
        pb.solve(pb.ODEProblem(lambda t, y: -y, torch.ones(2, dtype=F64), torch.tensor([0.0, 0.1], dtype=F64)),
                 solver(), rtol=1e-10, atol=1e-12)               # float64: no warning
