"""Stiff solvers (Rosenbrock family): tableau consistency, convergence order, stiff accuracy on the
Bari test set (ROBER, VDPOL), singular-matrix rejection, per-sample batching, gradients."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.linalg import expm

import pybridge as pb
from tests.stiff_problems import mescd, rober, vdpol
from pybridge.torch_engine.rosenbrock_tableaus import ROSENBROCK_TABLEAUS

F64 = torch.float64
ROSENBROCKS = [pb.Rosenbrock23, pb.Rodas4, pb.Rodas5P]
ORDER = {"Rosenbrock23": 2, "Rodas4": 4, "Rodas5P": 5}


# ----------------------------------------------------------------------------------------------
# Tableaus
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(ROSENBROCK_TABLEAUS))
def test_tableau_consistency(name):
    """Time nodes and ∂f/∂t coefficients agree with A and C (c = rowsum(AΓ), d = rowsum(Γ),
    Γ = (I/γ − C)⁻¹); the dense output ends at y1; the error weights annihilate constants."""
    tab = ROSENBROCK_TABLEAUS[name]
    s = tab.stages
    G = np.linalg.inv(np.eye(s) / tab.gamma - np.asarray(tab.C))
    np.testing.assert_allclose((np.asarray(tab.A) @ G).sum(1), tab.c, atol=1e-13)
    # (Rosenbrock23 included: its error stage's T coefficient is −d = rowsum(Γ), see the tableau)
    np.testing.assert_allclose(G.sum(1), tab.d, atol=1e-13)
    np.testing.assert_allclose(np.asarray(tab.dense).sum(0), tab.b, atol=1e-13)
    # Back in the textbook form (weights bΓ): Σ b_i = 1 (order 1) and the error weights sum to 0.
    assert abs((np.asarray(tab.b) @ G).sum() - 1) < 1e-13
    assert abs((np.asarray(tab.btilde) @ G).sum()) < 1e-13


# ----------------------------------------------------------------------------------------------
# Convergence order against the matrix exponential (fixed steps)
# ----------------------------------------------------------------------------------------------
def _fixed_errors(solver, f, y0, exact, dts):
    errs = []
    for dt in dts:
        sol = pb.solve(pb.ODEProblem(f, y0, torch.tensor([0.0, 1.0], dtype=F64)), solver, dt=dt,
                       adaptive=False)
        assert sol.success
        errs.append((sol.ys[-1] - exact).abs().max().item())
    return np.polyfit(np.log(dts), np.log(errs), 1)[0]


@pytest.mark.parametrize("solver", ROSENBROCKS, ids=lambda s: s.__name__)
def test_convergence_order(solver):
    g = torch.Generator().manual_seed(1)
    A = 0.5 * torch.randn(10, 10, generator=g, dtype=F64)
    y0 = torch.randn(10, generator=g, dtype=F64)
    p = ORDER[solver.__name__]
    # Keep the finest step's error well above round-off for the high-order methods.
    dts = [2.0 ** -k for k in (range(2, 6) if p == 5 else range(2, 7))]
    exact = torch.from_numpy(expm(A.numpy()) @ y0.numpy())
    slope = _fixed_errors(solver(), lambda t, y: y @ A.T, y0, exact, dts)
    # On y' = Ay only the stability function R(z) matters; Rodas5P's matches e^z to one order
    # more than the method's (measured slope ≈ 6), so here the order is a lower bound.
    assert slope > p - 0.5 and (p == 5 or slope < p + 0.5), slope
    # Non-autonomous y' = cos(t)·A y, exact expm(sin(t)·A) y0: exercises the ∂f/∂t terms (d_i)
    # and the time nodes (c_i).
    exact = torch.from_numpy(expm(math.sin(1.0) * A.numpy()) @ y0.numpy())
    slope = _fixed_errors(solver(), lambda t, y: torch.cos(t) * (y @ A.T), y0, exact,
                          [2.0 ** -k for k in range(2, 7)])
    assert abs(slope - p) < 0.5, slope


# ----------------------------------------------------------------------------------------------
# Stiff linear system
# ----------------------------------------------------------------------------------------------
def _stiff_linear(seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=F64))
    lam = torch.tensor([-1.0, -10.0, -1e3, -1e4, -1e6, -1e8], dtype=F64)
    A = Q @ torch.diag(lam) @ Q.T
    y0 = torch.randn(6, generator=g, dtype=F64)
    return A, y0


@pytest.mark.parametrize("solver", ROSENBROCKS, ids=lambda s: s.__name__)
def test_stiff_linear_against_expm(solver):
    A, y0 = _stiff_linear()
    ts = torch.tensor([0.0, 0.01, 0.1, 0.5, 1.0, 3.0], dtype=F64)
    rtol, atol = 1e-6, 1e-9
    sol = pb.solve(pb.ODEProblem(lambda t, y: y @ A.T, y0, ts), solver(), rtol=rtol, atol=atol, dense=True)
    assert sol.success
    exact = torch.stack([torch.from_numpy(expm(A.numpy() * float(t)) @ y0.numpy()) for t in ts])
    assert (sol.ys - exact).abs().max() < 100 * rtol
    assert int(sol.stats.naccept) < 2000   # Tsit5 would need ~1e8 steps
    # Dense output between steps (the Rosenbrock interpolants), away from the initial layer.
    tq = torch.linspace(0.05, 3.0, 37, dtype=F64)
    exact_q = torch.stack([torch.from_numpy(expm(A.numpy() * float(t)) @ y0.numpy()) for t in tq])
    assert (sol(tq) - exact_q).abs().max() < 1e3 * rtol
    # Stats of a Rosenbrock solve: one Jacobian and one LU per step attempt.
    steps = sol.stats.naccept + sol.stats.nreject
    assert torch.equal(sol.stats.njac, steps) and torch.equal(sol.stats.nlu, steps)
    assert torch.equal(sol.stats.nsolve, steps * ROSENBROCK_TABLEAUS[solver.__name__].stages)
    # Stiffness in the trace is ‖J‖∞ (constant here).
    m = sol.trace.mask
    assert torch.allclose(sol.trace.stiffness[m], A.abs().sum(-1).max().expand(int(m.sum())))


def test_reverse_time_and_user_jacobian():
    """Integrating backwards, and a user jac (called, and giving the same answer as AD)."""
    A, y0 = _stiff_linear(3)
    A = A / 1e4   # eigenvalues down to -1e4
    calls = []

    def jac(t, y):
        calls.append(1)
        return A.expand(y.shape[0], 6, 6) if y.dim() == 2 else A

    ts = torch.tensor([1.0, 0.5, 0.0], dtype=F64)
    f = lambda t, y: -(y @ A.T)   # backwards from t=1: y(t) = expm(-A (t - 1))... stable in reverse
    exact = torch.stack([torch.from_numpy(expm(-A.numpy() * (float(t) - 1.0)) @ y0.numpy()) for t in ts])
    jac_neg = lambda t, y: -jac(t, y)
    sol_ad = pb.solve(pb.ODEProblem(f, y0, ts), pb.Rodas5P(), rtol=1e-8, atol=1e-10)
    sol_jac = pb.solve(pb.ODEProblem(f, y0, ts, jac=jac_neg), pb.Rodas5P(), rtol=1e-8, atol=1e-10)
    assert calls
    assert sol_ad.success and sol_jac.success
    assert (sol_ad.ys - exact).abs().max() < 1e-6
    assert (sol_jac.ys - sol_ad.ys).abs().max() < 1e-12


# ----------------------------------------------------------------------------------------------
# Bari IVP test set
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("solver,rtol,atol", [(pb.Rodas5P, 1e-5, 1e-11), (pb.Rodas5P, 1e-8, 1e-14),
                                              (pb.Rodas4, 1e-6, 1e-12), (pb.Rosenbrock23, 1e-4, 1e-10)],
                         ids=lambda v: getattr(v, "__name__", str(v)))
def test_rober(reference, solver, rtol, atol):
    ref = reference["rober"]
    ts = torch.tensor([0.0] + [10.0 ** k for k in range(-5, 12)], dtype=F64)
    sol = pb.solve(pb.ODEProblem(rober, torch.tensor(ref["y0"], dtype=F64), ts), solver(),
                   rtol=rtol, atol=atol)
    assert sol.success
    assert (sol.ys.sum(-1) - 1).abs().max() < 1e-8   # the invariant, at every output time
    assert float(sol.ts[-1]) == ref["t1"]
    assert mescd(sol.ys[-1].tolist(), ref["y_t1"], rtol, atol) >= -math.log10(rtol) - 1.5


@pytest.mark.parametrize("solver,rtol", [(pb.Rodas5P, 1e-5), (pb.Rodas5P, 1e-7), (pb.Rodas4, 1e-6),
                                         (pb.Rosenbrock23, 1e-4)],
                         ids=lambda v: getattr(v, "__name__", str(v)))
def test_vdpol(reference, solver, rtol):
    ref = reference["vdpol"]
    atol = rtol
    prob = pb.ODEProblem(vdpol, torch.tensor(ref["y0"], dtype=F64), torch.tensor([ref["t0"], ref["t1"]], dtype=F64))
    sol = pb.solve(prob, solver(), rtol=rtol, atol=atol)
    assert sol.success
    assert mescd(sol.ys[-1].tolist(), ref["y_t1"], rtol, atol) >= -math.log10(rtol) - 1.5


def test_tsit5_needs_far_more_work_than_rodas5p():
    """A stiff problem (|λ| = 1e4): Tsit5 is stability-bound, Rodas5P is accuracy-bound."""
    f = lambda t, y: -1e4 * (y - torch.cos(t))
    prob = pb.ODEProblem(f, torch.zeros(1, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64))
    stiff = pb.solve(prob, pb.Rodas5P(), rtol=1e-6, atol=1e-8)
    assert stiff.success
    assert abs(float(stiff.ys[-1, 0]) - math.cos(1.0)) < 1e-4   # quasi-stationary: y ≈ cos t
    explicit = pb.solve(prob, pb.Tsit5(), rtol=1e-6, atol=1e-8)
    assert (not explicit.success) or int(explicit.stats.nfe) >= 10 * int(stiff.stats.nfe)


# ----------------------------------------------------------------------------------------------
# Singular W, per-sample batching
# ----------------------------------------------------------------------------------------------
def test_singular_matrix_rejects_that_sample_only():
    """y' = λy with γhλ = 1 makes I − γhJ exactly singular on the first step."""
    gamma = ROSENBROCK_TABLEAUS["Rodas4"].gamma   # 1/4
    lam = torch.tensor([[4.0], [-4.0]], dtype=F64)   # sample 0: singular at h = 1; sample 1: fine
    f = lambda t, y: lam * y
    prob = pb.ODEProblem(f, torch.ones(2, 1, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64))
    assert gamma * 1.0 * 4.0 == 1.0
    sol = pb.solve(prob, pb.Rodas4(), dt=1.0, rtol=1e-6, atol=1e-9)
    assert sol.success
    assert int(sol.stats.nreject[0]) >= 1
    exact = torch.exp(lam[:, 0])
    assert torch.allclose(sol.ys[-1, :, 0], exact, rtol=1e-4)
    # Fixed steps cannot retry: the singular sample stops (Unstable), the other one succeeds.
    with pytest.warns(RuntimeWarning):
        fixed = pb.solve(prob, pb.Rodas4(), dt=1.0, adaptive=False)
    assert fixed.retcodes == [pb.ReturnCode.Unstable, pb.ReturnCode.Success]
    assert torch.isfinite(fixed.ys[-1, 1]).all()


def test_batch_with_per_sample_stiffness():
    """Samples of very different stiffness step independently; each equals its solo solve."""
    lam = torch.tensor([1.0, 1e3, 1e6], dtype=F64)

    def f(t, y):
        return -lam[:, None] * (y - torch.cos(t)[:, None]) if t.dim() == 1 else -lam[:, None] * (y - torch.cos(t))

    ts = torch.tensor([0.0, 0.5, 2.0], dtype=F64)
    y0 = torch.ones(3, 1, dtype=F64)
    sol = pb.solve(pb.ODEProblem(f, y0, ts), pb.Rodas5P(), rtol=1e-7, atol=1e-9)
    assert sol.success
    for b in range(3):
        lb = lam[b]
        solo = pb.solve(pb.ODEProblem(lambda t, y: -lb * (y - torch.cos(t)), y0[b], ts), pb.Rodas5P(),
                        rtol=1e-7, atol=1e-9)
        assert int(solo.stats.naccept) == int(sol.stats.naccept[b])
        assert torch.allclose(solo.ys, sol.ys[:, b], rtol=1e-12, atol=1e-14)
        m = sol.trace.mask[b]
        assert torch.allclose(sol.trace.stiffness[b][m], lb.expand(int(m.sum())))
    # Exact: y = (λ² cos t + λ sin t)/(1+λ²) + C e^{−λt}
    t = ts[-1]
    exact = (lam ** 2 * torch.cos(t) + lam * torch.sin(t)) / (1 + lam ** 2) + (1 - lam ** 2 / (1 + lam ** 2)) * torch.exp(-lam * t)
    assert torch.allclose(sol.ys[-1, :, 0], exact, rtol=1e-5)
    # The stiff samples needed more steps only where the physics does; none is wildly slower.
    assert int(sol.stats.naccept.max()) < 200


STIFF_SOLVERS = [pb.Rosenbrock23, pb.Rodas4, pb.Rodas5P, pb.Kvaerno5, pb.KenCarp4, pb.TRBDF2]


@pytest.mark.parametrize("solver", STIFF_SOLVERS, ids=lambda s: s.__name__)
def test_prothero_robinson_non_autonomous(solver):
    """y' = −λ(y − cos t), λ = 1e5: the time derivative enters every stage (and Rosenbrock23's error
    stage). A wrong ∂f/∂t term shows as an error estimate far above the true error: tiny steps."""
    lam = 1e5
    f = lambda t, y: -lam * (y - torch.cos(t))
    t = torch.tensor([0.0, 1.0], dtype=F64)
    sol = pb.solve(pb.ODEProblem(f, torch.zeros(1, dtype=F64), t), solver(), rtol=1e-3, atol=1e-5)
    assert sol.success
    assert int(sol.stats.naccept) < 200
    exact = math.cos(1.0) + lam * math.sin(1.0) / (1 + lam ** 2)  # slow manifold, transient gone
    assert abs(float(sol.ys[-1, 0]) - exact) < 1e-4


def test_data_dependent_control_flow_in_f():
    """Jacobians come from a plain forward call and a batched backward: Python control flow in f is fine."""
    def f(t, y):
        if (y > 100).any():
            return -y
        return -50.0 * (y - torch.cos(t)[:, None])

    y0 = torch.ones(2, 2, dtype=F64)
    sol = pb.solve(pb.ODEProblem(f, y0, torch.tensor([0.0, 1.0], dtype=F64)), pb.Rodas5P(), rtol=1e-7, atol=1e-9)
    assert sol.success
    lam, t = 50.0, 1.0
    exact = (lam ** 2 * math.cos(t) + lam * math.sin(t)) / (1 + lam ** 2) + math.exp(-lam * t) / (1 + lam ** 2)
    assert abs(float(sol.ys[-1, 0, 0]) - exact) < 1e-6
    assert "njac" in repr(sol.stats)


def test_autodiff_jacobian_paths_agree_with_the_analytic_one():
    """Batched reverse mode and its one-row-at-a-time fallback give J (and ∂f/∂t) exactly; no graph
    is left on a result when nothing upstream requires grad, and one is when a parameter does."""
    from pybridge.torch_engine.jacobian import AutodiffJacobian
    k = torch.tensor([0.04, 1e4, 3e7], dtype=F64)
    def f(t, y):
        y1, y2, y3 = y.unbind(-1)
        return torch.stack([-k[0] * y1 + k[1] * y2 * y3 + torch.sin(t), k[0] * y1 - k[1] * y2 * y3 - k[2] * y2 ** 2,
                            k[2] * y2 ** 2], -1)
    y = torch.tensor([[1.0, 2e-5, 0.3], [0.5, 1e-6, 0.1]], dtype=F64)
    t = torch.tensor([0.2, 0.7], dtype=F64)
    y1, y2, y3 = y.unbind(-1)
    zero = torch.zeros_like(y1)
    exact = torch.stack([torch.stack([-k[0].expand(2), k[1] * y3, k[1] * y2], -1),
                         torch.stack([k[0].expand(2), -k[1] * y3 - 2 * k[2] * y2, -k[1] * y2], -1),
                         torch.stack([zero, 2 * k[2] * y2, zero], -1)], 1)
    for batched in (True, False):
        jac = AutodiffJacobian()
        jac.batched_ok = batched
        J, dT = jac(f, t, y, with_time=True)
        assert torch.allclose(J, exact, rtol=1e-14, atol=0)
        assert torch.allclose(dT, torch.stack([torch.cos(t), zero, zero], -1))
        assert not J.requires_grad and not dT.requires_grad
    k.requires_grad_(True)
    J, _ = AutodiffJacobian()(f, t, y)
    assert J.requires_grad
    g, = torch.autograd.grad(J[:, 1, 1].sum(), k)  # ∂J₂₂/∂k = (0, -y3, -2 y2), summed over samples
    assert torch.allclose(g, torch.stack([zero, -y3, -2 * y2]).sum(1))


# ----------------------------------------------------------------------------------------------
# Gradients (discrete adjoint through the Rosenbrock steps)
# ----------------------------------------------------------------------------------------------
def _param_problem(p):
    # Two-component stiff-ish kinetics with parameters in f (reverse-over-forward AD of the Jacobian).
    def f(t, y):
        a, b = y.unbind(-1)
        return torch.stack([-p[0] * a + p[1] * b * b, p[0] * a - p[1] * b * b - p[2] * b + torch.sin(t) * 0.1], -1)
    return pb.ODEProblem(f, torch.stack([p[3], torch.zeros((), dtype=F64)]),
                         torch.tensor([0.0, 0.3, 1.0], dtype=F64))


@pytest.mark.parametrize("solver", ROSENBROCKS, ids=lambda s: s.__name__)
def test_gradcheck_fixed_steps(solver):
    p = torch.tensor([5.0, 20.0, 50.0, 1.0], dtype=F64, requires_grad=True)
    fn = lambda p: pb.solve(_param_problem(p), solver(), dt=0.1, adaptive=False).ys
    assert torch.autograd.gradcheck(fn, (p,))


def test_gradcheck_adaptive():
    p = torch.tensor([5.0, 20.0, 50.0, 1.0], dtype=F64, requires_grad=True)
    # With differentiable_dt the step sizes are smooth functions of p too, so the discrete
    # gradient is the exact derivative of what was computed (same accepted/rejected pattern).
    fn = lambda p: pb.solve(_param_problem(p), pb.Rodas5P(), rtol=1e-3, atol=1e-5,
                            differentiable_dt=True).ys
    assert torch.autograd.gradcheck(fn, (p,))
    # Default (dt detached): the gradient agrees with finite differences to the solver tolerance.
    out = lambda p: pb.solve(_param_problem(p), pb.Rodas5P(), rtol=1e-7, atol=1e-9).ys[-1].sum()
    g, = torch.autograd.grad(out(p), p)
    eps = 1e-5
    fd = torch.stack([(out(p.detach() + eps * e) - out(p.detach() - eps * e)) / (2 * eps)
                      for e in torch.eye(4, dtype=F64)])
    assert torch.allclose(g, fd, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("solver", [pb.Rosenbrock23, pb.Rodas5P], ids=lambda s: s.__name__)
def test_gradcheck_differentiable_dt_with_a_time_dependent_jacobian(solver):
    """With differentiable_dt the step times depend on p, and here ∂f/∂y depends on t: the Jacobian,
    taken at a detached copy of (t, y), must pass dJ/dt back to the step times (it was dropped, and
    the error regularizer's gradient was wrong by several times its size)."""
    def fn(p):
        f = lambda t, y: -p[0] * (1.5 + torch.cos(3 * t))[..., None] * y ** 2 + p[1] * y  # noqa: E731
        sol = pb.solve(pb.ODEProblem(f, torch.tensor([[1.0], [0.5]], dtype=F64), torch.tensor([0.0, 0.4, 1.0], dtype=F64)),
                       solver(), rtol=1e-3, atol=1e-5, batch="lockstep", differentiable_dt=True)
        return torch.cat([sol.ys.reshape(-1), pb.error_regularizer(sol).reshape(1)])
    assert torch.autograd.gradcheck(fn, (torch.tensor([2.0, 0.3], dtype=F64, requires_grad=True),))


def test_autodiff_jacobian_differentiates_at_a_detached_copy_of_the_state():
    """The reverse-mode Jacobian takes autograd.grad of f at a leaf copy of y, so it never walks the
    solve's history (with y's history attached, each step's Jacobian cost grew with the number of
    steps before it: Rosenbrock23 with y0.requires_grad took 8 ms per step at 400 steps, 60 ms at
    1600). J stays a function of y and of f's parameters: d/dy0 and d/da of a loss on J equal the
    analytic ones."""
    from pybridge.torch_engine.jacobian import AutodiffJacobian
    a = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([[0.3, -1.2], [2.0, 0.5]], dtype=torch.float64, requires_grad=True)
    y = y0 * 1.5 + 0.1                       # a state with a history
    seen = []

    def rhs(t, y):
        seen.append(y.grad_fn is None and y.requires_grad)
        return torch.stack([a * y[:, 0] ** 2 * y[:, 1], -y[:, 1] ** 3], -1)

    J, _ = AutodiffJacobian()(rhs, torch.zeros(2, dtype=torch.float64), y)
    assert seen == [True]
    u, v = y[:, 0], y[:, 1]
    J_exact = torch.stack([torch.stack([2 * a * u * v, a * u ** 2], -1),
                           torch.stack([torch.zeros_like(u), -3 * v ** 2], -1)], -2)
    torch.testing.assert_close(J, J_exact, rtol=1e-14, atol=0)
    g = torch.autograd.grad(J.square().sum(), (y0, a), retain_graph=True)
    g_exact = torch.autograd.grad(J_exact.square().sum(), (y0, a))
    for x, ref in zip(g, g_exact):
        torch.testing.assert_close(x, ref, rtol=1e-12, atol=0)
