"""Continuous adjoints (backsolve, interpolating, quadrature) against the discrete adjoint and
against analytic gradients; batching; O(1) memory of backsolve; the seminorm's saving."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

try:
    import pybridge  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pybridge as pb
from pybridge.adjoint import (BacksolveAdjoint, InterpolatingAdjoint, QuadratureAdjoint,
                              augmented_tolerance)
from pybridge.torch_engine.controller import Norm, error_norm

D = torch.float64
ADJOINTS = {
    "backsolve": lambda: BacksolveAdjoint(),
    "backsolve-fullnorm": lambda: BacksolveAdjoint(seminorm=False),
    "interpolating": lambda: InterpolatingAdjoint(),
    "interpolating-ckpt": lambda: InterpolatingAdjoint(checkpoints=True),
    "quadrature": lambda: QuadratureAdjoint(),
}
SOLVERS = {  # name -> (solver, options); rtol 1e-8 -> agreement ~1e-5 relative is asked
    "Tsit5": (pb.Tsit5(), dict(rtol=1e-8, atol=1e-8)),
    "DP5": (pb.DP5(), dict(rtol=1e-8, atol=1e-8)),
    "BS3": (pb.BS3(), dict(rtol=1e-8, atol=1e-8)),
    "Vern7": (pb.Vern7(), dict(rtol=1e-8, atol=1e-8)),
    "RK4": (pb.RK4(), dict(dt=0.02)),
}


class MLP(torch.nn.Module):
    """Small time-dependent field; t is 0-d or (B,) as pybridge passes it."""

    def __init__(self, n=2, hidden=16):
        super().__init__()
        self.l1 = torch.nn.Linear(n + 1, hidden, dtype=D)
        self.l2 = torch.nn.Linear(hidden, n, dtype=D)

    def forward(self, t, y):
        tt = t.reshape(-1, 1).expand(*y.shape[:-1], 1) if y.dim() == 2 else t.reshape(1)
        return self.l2(torch.tanh(self.l1(torch.cat([y, tt], -1))))


def grads(f, y0, t, solver, adjoint, params, weights, **kw):
    sol = pb.solve(pb.ODEProblem(f, y0, t), solver, adjoint=adjoint, **kw)
    loss = (sol.ys * weights).sum()
    return torch.autograd.grad(loss, [y0] + list(params)), sol


def rel(g, g_ref):
    flat = lambda gs: torch.cat([x.reshape(-1) for x in gs])
    return float((flat(g) - flat(g_ref)).norm() / flat(g_ref).norm())


@pytest.mark.parametrize("solver_name", list(SOLVERS))
@pytest.mark.parametrize("adj_name", list(ADJOINTS))
def test_agrees_with_discrete_adjoint(adj_name, solver_name):
    torch.manual_seed(0)
    f = MLP()
    y0 = torch.tensor([1.0, -0.5], dtype=D, requires_grad=True)
    t = torch.tensor([0.0, 0.4, 0.7, 1.2], dtype=D)
    w = torch.randn(4, 2, dtype=D)
    solver, kw = SOLVERS[solver_name]
    g_ref, _ = grads(f, y0, t, solver, None, f.parameters(), w, **kw)
    g, sol = grads(f, y0, t, solver, ADJOINTS[adj_name](), f.parameters(), w, **kw)
    assert rel(g, g_ref) < 1e-5
    assert sol.extras["adjoint_stats"]["intervals"] == 3


@pytest.mark.parametrize("solver_name", list(SOLVERS))
@pytest.mark.parametrize("adj_name", list(ADJOINTS))
def test_linear_ode_matches_matrix_exponential(adj_name, solver_name):
    """y' = A y: L = Σ_j w_j·expm(A t_j) y0, differentiated exactly through matrix_exp."""
    torch.manual_seed(1)
    A = torch.nn.Parameter(0.5 * torch.randn(3, 3, dtype=D))
    f = lambda t, y: A @ y
    y0 = torch.randn(3, dtype=D, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0, 1.5], dtype=D)
    w = torch.randn(4, 3, dtype=D)
    solver, kw = SOLVERS[solver_name]
    g, _ = grads(f, y0, t, solver, ADJOINTS[adj_name](), [A], w, adjoint_params=(A,), **kw)
    exact = sum(w[j] @ torch.linalg.matrix_exp(A * t[j]) @ y0 for j in range(4))
    g_exact = torch.autograd.grad(exact, [y0, A])
    assert rel(g, g_exact) < 1e-5


@pytest.mark.parametrize("adj_name", ["backsolve", "interpolating", "interpolating-ckpt", "quadrature"])
@pytest.mark.parametrize("case", ["per-sample-times", "shared-independent", "lockstep", "rk4-per-sample"])
def test_batched(adj_name, case):
    torch.manual_seed(2)
    f = MLP()
    B = 3
    y0 = torch.randn(B, 2, dtype=D, requires_grad=True)
    t = torch.tensor([[0.0, 0.3, 0.7, 1.2], [0.5, 0.6, 0.9, 1.0], [1.0, 0.5, 0.2, -0.3]], dtype=D)
    solver, kw = pb.Tsit5(), dict(rtol=1e-8, atol=1e-8)
    if case in ("shared-independent", "lockstep"):
        t = t[0]
    if case == "lockstep":
        kw["batch"] = "lockstep"
    if case == "rk4-per-sample":
        solver, kw = pb.RK4(), dict(dt=0.02)
    w = torch.randn(4, B, 2, dtype=D)
    g_ref, _ = grads(f, y0, t, solver, None, f.parameters(), w, **kw)
    g, sol = grads(f, y0, t, solver, ADJOINTS[adj_name](), f.parameters(), w, **kw)
    assert sol.ys.shape == (4, B, 2)
    assert rel(g, g_ref) < 1e-5


def test_matrix_state_and_partial_requires_grad():
    """An unbatched matrix state; y0 without grad; a frozen parameter gets no gradient."""
    torch.manual_seed(3)
    f = MLP(n=2)
    f.l1.bias.requires_grad_(False)
    y0 = torch.randn(3, 2, dtype=D)
    t = torch.linspace(0, 1, 3, dtype=D)
    params = [f.l1.weight, f.l2.weight, f.l2.bias]
    for adj in ADJOINTS.values():
        sol = pb.solve(pb.ODEProblem(f, y0, t, batched=False), pb.Tsit5(), rtol=1e-8, atol=1e-8,
                       adjoint=adj())
        g = torch.autograd.grad(sol.ys.square().sum(), params)
        ref = pb.solve(pb.ODEProblem(f, y0, t, batched=False), pb.Tsit5(), rtol=1e-8, atol=1e-8)
        g_ref = torch.autograd.grad(ref.ys.square().sum(), params)
        assert rel(g, g_ref) < 1e-5


def test_closure_tensors_need_adjoint_params():
    torch.manual_seed(4)
    W = torch.randn(2, 2, dtype=D, requires_grad=True)
    f = lambda t, y: torch.tanh(W @ y)
    y0 = torch.randn(2, dtype=D, requires_grad=True)
    t = torch.linspace(0, 1, 3, dtype=D)
    prob = pb.ODEProblem(f, y0, t)
    with pytest.raises(ValueError, match="adjoint_params"):
        pb.solve(prob, pb.Tsit5(), adjoint=BacksolveAdjoint())
    w = torch.ones(3, 2, dtype=D)
    g, _ = grads(f, y0, t, pb.Tsit5(), BacksolveAdjoint(), [W], w, adjoint_params=(W,), rtol=1e-8, atol=1e-8)
    g_ref, _ = grads(f, y0, t, pb.Tsit5(), None, [W], w, rtol=1e-8, atol=1e-8)
    assert rel(g, g_ref) < 1e-5
    with pytest.raises(ValueError, match="checkpoints"):
        InterpolatingAdjoint(checkpoints=3)
    # A tensor listed twice (list(model.parameters()) + [extra]) gets its gradient once, not twice.
    g2, _ = grads(f, y0, t, pb.Tsit5(), BacksolveAdjoint(), [W], w, adjoint_params=(W, W), rtol=1e-8, atol=1e-8)
    assert rel(g2, g_ref) < 1e-5


@pytest.mark.parametrize("adj_name", ["backsolve", "interpolating", "quadrature"])
def test_what_continuous_adjoints_cannot_differentiate_is_said_not_dropped(adj_name):
    """dL/dt and gradients through sol(t) are not available under a continuous adjoint: a t that
    requires grad is refused, and sol(t) gives the values whose gradient raises when reached
    (before, t.grad stayed None and a loss term sol(0.5) silently contributed nothing)."""
    a = torch.tensor(1.0, dtype=D, requires_grad=True)
    f = lambda t, y: -a * y  # noqa: E731
    y0 = torch.ones(1, dtype=D)
    t = torch.tensor([0.0, 1.0], dtype=D)
    kw = dict(adjoint=ADJOINTS[adj_name](), adjoint_params=(a,), rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match=r"t requires grad.*does not differentiate the save times"):
        pb.solve(pb.ODEProblem(f, y0, t.clone().requires_grad_()), pb.Tsit5(), **kw)
    sol = pb.solve(pb.ODEProblem(f, y0, t), pb.Tsit5(), dense=True, **kw)
    mid = sol(torch.tensor([0.5], dtype=D))
    torch.testing.assert_close(mid.detach(), torch.full((1, 1), math.exp(-0.5), dtype=D), rtol=1e-6, atol=0)
    with pytest.raises(RuntimeError, match="sol.t. is not differentiable under adjoint="):
        torch.autograd.grad(sol.ys[-1].sum() + mid.sum(), a)
    g, = torch.autograd.grad(sol.ys[-1].sum() + mid.detach().sum(), a)   # values only: fine
    torch.testing.assert_close(g, torch.tensor(-math.exp(-1.0), dtype=D), rtol=1e-6, atol=0)
    with torch.no_grad():
        assert not sol(torch.tensor([0.5], dtype=D)).requires_grad
    # The global regularizers read the trace, which has no graph here either (they added nothing).
    r_e = pb.error_regularizer(sol)
    # (the adjoint's forward solve records no graph, so it runs native_rk's iteration: same steps, EEst
    # to rounding, which its cancelling sum amplifies to ~1e-9)
    torch.testing.assert_close(r_e.detach(), pb.error_regularizer(pb.solve(pb.ODEProblem(f, y0, t), pb.Tsit5(),
                               rtol=1e-8, atol=1e-10)).detach(), rtol=1e-7, atol=0)
    with pytest.raises(RuntimeError, match=r"sol.trace .*error_regularizer.* is not differentiable under adjoint="):
        torch.autograd.grad(sol.ys[-1].sum() + r_e, a)
    with pytest.raises(RuntimeError, match=r"sol.trace .* is not differentiable under adjoint="):
        torch.autograd.grad(sol.ys[-1].sum() + pb.stiffness_regularizer(sol), a)


@pytest.mark.parametrize("atol_shape", [(3, 2, 3), (2, 3)])
def test_per_sample_backward_takes_per_component_tolerances_of_a_multidimensional_state(atol_shape):
    """QuadratureAdjoint's backward state is (B, n): a tolerance of y0's shape (B, 2, 3), or of one
    sample's (2, 3), must reach it as (B, n) (it crashed in an expand); equal values give equal results."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 6).double()
    f = lambda t, y: torch.tanh(lin(y.reshape(y.shape[0], 6))).reshape(y.shape)  # noqa: E731
    y0 = torch.randn(3, 2, 3, dtype=D, requires_grad=True)
    t = torch.linspace(0, 1, 3, dtype=D)
    grads = []
    for atol in (torch.full(atol_shape, 1e-8, dtype=D), 1e-8):
        sol = pb.solve(pb.ODEProblem(f, y0, t), pb.Tsit5(), rtol=1e-6, atol=atol, adjoint=QuadratureAdjoint(),
                       adjoint_params=list(lin.parameters()))
        grads.append(torch.autograd.grad(sol.ys.square().sum(), [y0] + list(lin.parameters())))
    for g, ref in zip(*grads):
        torch.testing.assert_close(g, ref, rtol=1e-12, atol=1e-14)


def test_seminorm_tolerance_is_exactly_the_seminorm():
    """inf atol / 0 rtol on the a_θ channels plus the sqrt(m/N) rescale: RMS over N = RMS over m."""
    torch.manual_seed(5)
    shape, k, P = (3, 2), 2, 17
    m = k * 6
    err, y0, y1 = (torch.randn(1, m + P, dtype=D) for _ in range(3))
    args = (shape, k, P, True, D, torch.device("cpu"))
    atol = augmented_tolerance(1e-6, math.inf, *args)
    rtol = augmented_tolerance(torch.full(shape, 1e-3, dtype=D), 0.0, *args)
    got = error_norm(Norm(False), err, y0, y1, atol[None], rtol[None])
    scale = 1e-6 + 1e-3 * torch.maximum(y0.abs(), y1.abs())
    want = (err / scale)[:, :m].square().mean().sqrt()
    assert torch.allclose(got, want.expand(1), rtol=1e-12)


def _saved_bytes(fn):
    total = [0]

    def pack(x):
        total[0] += x.numel() * x.element_size()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = fn()
    return total[0], out


def test_backsolve_memory_does_not_grow_with_steps():
    """Bytes autograd saves for backward: constant for backsolve, ~×steps for backprop."""
    A = torch.nn.Parameter(torch.tensor([[0.0, 1.0], [-1.0, -0.1]], dtype=D))
    f = lambda t, y: A @ y
    y0 = torch.tensor([1.0, 0.0], dtype=D, requires_grad=True)
    measured = {}
    for name, adj in (("backsolve", BacksolveAdjoint()), ("discrete", None)):
        for span in (1.0, 10.0):
            t = torch.tensor([0.0, span / 2, span], dtype=D)  # same number of save points
            nbytes, sol = _saved_bytes(lambda: pb.solve(pb.ODEProblem(f, y0, t), pb.Tsit5(), rtol=1e-8,
                                                       atol=1e-8, adjoint=adj, adjoint_params=(A,)))
            sol.ys.sum().backward()
            measured[name, span] = (nbytes, int(sol.stats.naccept))
    print("saved bytes, accepted steps:", measured)
    steps_ratio = measured["backsolve", 10.0][1] / measured["backsolve", 1.0][1]
    assert steps_ratio > 5
    assert measured["backsolve", 10.0][0] == measured["backsolve", 1.0][0] > 0
    assert measured["discrete", 10.0][0] > 3 * measured["discrete", 1.0][0]


def test_seminorm_reduces_backward_nfe():
    torch.manual_seed(0)
    H = 64
    net = torch.nn.Sequential(torch.nn.Linear(2, H, dtype=D), torch.nn.Tanh(), torch.nn.Linear(H, H, dtype=D),
                              torch.nn.Tanh(), torch.nn.Linear(H, 2, dtype=D))
    f = lambda t, y: net(y)
    y0 = torch.randn(2, dtype=D)
    t = torch.linspace(0, 2, 5, dtype=D)
    nfe, g = {}, {}
    for seminorm in (True, False):
        sol = pb.solve(pb.ODEProblem(f, y0, t), pb.Tsit5(), rtol=1e-3, atol=1e-6,
                       adjoint=BacksolveAdjoint(seminorm=seminorm), adjoint_params=tuple(net.parameters()))
        g[seminorm] = torch.autograd.grad(sol.ys.square().sum(), list(net.parameters()))
        nfe[seminorm] = sol.extras["adjoint_stats"]["nfe"]
    print(f"backward NFE with seminorm {nfe[True]}, without {nfe[False]} "
          f"({sum(p.numel() for p in net.parameters())} parameters)")
    assert nfe[True] < 0.8 * nfe[False]
    assert rel(g[True], g[False]) < 1e-2  # both within the (loose) tolerance of each other


def test_quadrature_with_stiff_solvers():
    """Quadrature's right-hand side composes with torch.func, so Rosenbrock methods can take its
    Jacobian; backsolve (state [y, a_y]) refuses implicit methods with a pointer to the others."""
    torch.manual_seed(6)
    f = MLP()
    y0 = torch.tensor([1.0, -0.5], dtype=D, requires_grad=True)
    t = torch.linspace(0, 1, 3, dtype=D)
    w = torch.randn(3, 2, dtype=D)
    for solver, tol in ((pb.Rodas5P(), 1e-8), (pb.Rosenbrock23(), 1e-6)):  # order 2: looser, or slow
        g_ref, _ = grads(f, y0, t, solver, None, f.parameters(), w, rtol=tol, atol=tol)
        g, _ = grads(f, y0, t, solver, QuadratureAdjoint(), f.parameters(), w, rtol=tol, atol=tol)
        assert rel(g, g_ref) < 1e3 * tol
    with pytest.raises(ValueError, match="InterpolatingAdjoint"):
        pb.solve(pb.ODEProblem(f, y0, t), pb.Rodas5P(), adjoint=BacksolveAdjoint())


class RateKinetics(torch.nn.Module):
    """ROBER with learnable log-rates: stiffness ratio ~1e7 on the span used below."""

    def __init__(self):
        super().__init__()
        self.log_k = torch.nn.Parameter(torch.tensor([0.04, 1e4, 3e7], dtype=D).log())

    def forward(self, t, y):
        k1, k2, k3 = self.log_k.exp().unbind(0)
        y1, y2, y3 = y.unbind(-1)
        return torch.stack([-k1 * y1 + k2 * y2 * y3, k1 * y1 - k2 * y2 * y3 - k3 * y2 ** 2, k3 * y2 ** 2], -1)


@pytest.mark.parametrize("solver, adjoint", [(pb.Rodas5P(), "interpolating"), (pb.Kvaerno5(), "interpolating"),
                                             (pb.Kvaerno5(), "interpolating-ckpt"), (pb.Rodas5P(), "quadrature")],
                         ids=["Rodas5P-interpolating", "Kvaerno5-interpolating", "Kvaerno5-checkpoints",
                              "Rodas5P-quadrature"])
def test_continuous_adjoints_on_a_stiff_problem(solver, adjoint):
    """The adjoints that keep y from the forward pass work with implicit methods on a stiff problem
    with parameters (InterpolatingAdjoint takes a_θ by quadrature there): gradients w.r.t. the
    rates and y0 agree with backpropagation through the solver."""
    f = RateKinetics()
    y0 = torch.tensor([[1.0, 0.0, 0.0], [0.9, 1e-5, 0.1]], dtype=D, requires_grad=True)
    t = torch.tensor([0.0, 0.1, 1.0], dtype=D)
    w = torch.randn(3, 2, 3, dtype=D, generator=torch.Generator().manual_seed(2))
    tol = 1e-8
    (gy_ref, gk_ref), _ = grads(f, y0, t, solver, None, f.parameters(), w, rtol=tol, atol=tol)
    (gy, gk), sol = grads(f, y0, t, solver, ADJOINTS[adjoint](), f.parameters(), w, rtol=tol, atol=tol)
    assert sol.extras["adjoint_stats"]["steps"] > 0
    assert rel([gy], [gy_ref]) < 1e-3  # ∂/∂y0 of a stiff problem: condition ~1e4
    # each rate on its own scale (their gradients span orders of magnitude)
    assert ((gk - gk_ref).abs() / gk_ref.abs()).max() < 1e-3


@pytest.mark.parametrize("adjoint", [pb.InterpolatingAdjoint(checkpoints=True), pb.QuadratureAdjoint(checkpoints=True),
                                     pb.BacksolveAdjoint()])
def test_checkpointed_adjoints_leave_out_a_failed_sample_the_loss_does_not_use(adjoint):
    """y' = a·y² from y0 = 2 blows up at t = 0.5 (the solve of that sample fails); the loss uses the
    other sample only. A checkpoint re-solve of an interval, or backsolve's re-integration, used to
    start from the failed sample's NaN (a y0 error) or fail again near the blow-up; a sample whose
    cotangent is zero needs no state, so the gradients equal those without checkpoints."""
    a = torch.nn.Parameter(torch.tensor(1.0, dtype=torch.float64))

    class F(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = a

        def forward(self, t, y):
            return self.a * y ** 2

    y0 = torch.tensor([[0.5], [2.0]], dtype=torch.float64, requires_grad=True)
    t = torch.linspace(0, 1, 5, dtype=torch.float64)
    grads = []
    for adj in (pb.InterpolatingAdjoint(), adjoint):
        with pytest.warns(RuntimeWarning):
            sol = pb.solve(pb.ODEProblem(F(), y0, t), pb.Tsit5(), rtol=1e-6, atol=1e-8, adjoint=adj)
        assert sol.retcodes[1] != pb.ReturnCode.Success
        grads.append(torch.autograd.grad(sol.ys[:, 0].sum(), (y0, a)))
    for g, ref in zip(grads[1], grads[0]):
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=0)
    assert grads[1][0][1, 0] == 0
    if isinstance(adjoint, pb.BacksolveAdjoint):   # a loss on the failed sample's NaN values: said so
        with pytest.warns(RuntimeWarning):
            sol = pb.solve(pb.ODEProblem(F(), y0, t), pb.Tsit5(), rtol=1e-6, atol=1e-8, adjoint=adjoint)
        with pytest.raises(RuntimeError, match="sample 1 failed in the forward solve and the loss uses"):
            torch.autograd.grad(sol.ys[-1].sum(), a)
