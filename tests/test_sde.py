"""SDE solvers on the torch engine: strong/weak convergence against exact solutions on the same
Brownian path (../shared/problems/README.md), adaptivity, gradients, the reversible adjoint, errors."""
import math
import warnings

import numpy as np
import pytest
import torch

import pybridge as pb
from pybridge.torch_engine.sde_tableaus import SOSRI, SRA1, SRIW1, sra_order_conditions, sri_order_conditions

D = torch.float64
MU, SIG, U0 = 1.01, 0.87, 0.5   # gbm of the reference problems


def tree(B, m=1, seed=3, tol=2.0 ** -9, t1=1.0):
    # Leaves of 2^-9: every fixed step below is a union of leaves, so its increment is exact.
    return pb.VirtualBrownianTree(0.0, t1, (B, m), seed=seed, levy_area=True, tol=tol)


def gbm(B, interpretation="ito", mu=MU, sig=SIG):
    f = lambda t, y: mu * y  # noqa: E731
    g = lambda t, y: sig * y  # noqa: E731
    return pb.SDEProblem(f, g, torch.full((B, 1), U0, dtype=D), torch.tensor([0.0, 1.0], dtype=D),
                         interpretation=interpretation)


def gbm_exact(W, interpretation="ito"):
    drift = MU - SIG ** 2 / 2 if interpretation == "ito" else MU
    return U0 * torch.exp(drift + SIG * W)


ALPHA, BETA = 0.1, 0.05


def additive(B):
    def f(t, u):
        t = torch.as_tensor(t, dtype=D).reshape(-1, 1)
        return BETA / torch.sqrt(1 + t) - u / (2 * (1 + t))

    def g(t, u):
        t = torch.as_tensor(t, dtype=D).reshape(-1, 1)
        return (ALPHA * BETA / torch.sqrt(1 + t)).expand_as(u)

    return pb.SDEProblem(f, g, torch.ones(B, 1, dtype=D), torch.tensor([0.0, 1.0], dtype=D), noise="additive")


def additive_exact(W):
    return 1 / math.sqrt(2) + BETA * (1 + ALPHA * W) / math.sqrt(2)


def strong_order(prob, solver, bm, exact, ks):
    errs = []
    for k in ks:
        sol = pb.solve(prob, solver, adaptive=False, dt=2.0 ** -k, brownian=bm)
        errs.append((sol.ys[-1] - exact).abs().mean().item())
    return np.polyfit(np.log(2.0 ** -np.array(ks)), np.log(errs), 1)[0], errs


def test_tableau_order_conditions():
    for tab in (SRIW1, SOSRI):
        assert np.abs(sri_order_conditions(tab)).max() < 1e-12, tab.name
    assert np.abs(sra_order_conditions(SRA1)).max() < 1e-14
    # c = A·1 for SOSRI (stages consistent in time)
    assert np.allclose(np.array(SOSRI.A0).sum(1), SOSRI.c0) and np.allclose(np.array(SOSRI.A1).sum(1), SOSRI.c1)


@pytest.mark.parametrize("solver,order,ks", [
    (pb.EM(), 0.5, range(3, 8)),
    (pb.RKMil(), 1.0, range(3, 8)),
    (pb.SRIW1(), 1.5, range(4, 8)),
    (pb.SOSRI(), 1.5, range(4, 8)),
])
def test_strong_order_gbm(solver, order, ks):
    B = 100
    bm = tree(B)
    p, errs = strong_order(gbm(B), solver, bm, gbm_exact(bm(0.0, 1.0)), list(ks))
    print(f"{solver!r}: strong order {p:.3f}, errors {errs}")
    assert abs(p - order) < 0.25, (p, errs)


@pytest.mark.parametrize("solver", [pb.EulerHeun(), pb.ReversibleHeun(), pb.RKMil()])
def test_strong_order_stratonovich_gbm(solver):
    # Diagonal (hence commutative) noise: Heun-type Stratonovich schemes reach strong order 1.
    B = 100
    bm = tree(B)
    p, errs = strong_order(gbm(B, "stratonovich"), solver, bm, gbm_exact(bm(0.0, 1.0), "stratonovich"),
                           list(range(3, 8)))
    print(f"{solver!r} (Stratonovich): strong order {p:.3f}, errors {errs}")
    assert abs(p - 1.0) < 0.25, (p, errs)


def test_strong_order_additive_sra1():
    B = 100
    bm = tree(B)
    p, errs = strong_order(additive(B), pb.SRA1(), bm, additive_exact(bm(0.0, 1.0)), list(range(1, 6)))
    print(f"SRA1 (additive): strong order {p:.3f}, errors {errs}")
    # Strong order 1.5 is guaranteed; on this problem (noise αβ = 0.005) the deterministic part's
    # order 2 dominates at these steps (README: "2.0 deterministic part"), so ≈ 2 is measured.
    assert 1.25 < p < 2.25, (p, errs)


def test_weak_moments_gbm():
    B = 4000
    sol = pb.solve(gbm(B), pb.SOSRI(), adaptive=False, dt=2.0 ** -5, seed=11)
    x = sol.ys[-1, :, 0]
    mean = U0 * math.exp(MU)
    var = U0 ** 2 * math.exp(2 * MU) * (math.exp(SIG ** 2) - 1)
    se_mean = x.std().item() / math.sqrt(B)
    c = x - x.mean()
    se_var = math.sqrt(((c ** 4).mean() - (c ** 2).mean() ** 2).item() / B)
    assert abs(x.mean().item() - mean) < 3 * se_mean
    assert abs(x.var().item() - var) < 3 * se_var


def test_adaptive_tolerance_and_trace():
    B = 20
    bm = tree(B, tol=2.0 ** -12)
    exact = gbm_exact(bm(0.0, 1.0))
    errs = []
    for tol in (1e-1, 2e-2):
        sol = pb.solve(gbm(B), pb.SOSRI(), rtol=tol, atol=tol, brownian=bm)
        assert sol.success
        errs.append((sol.ys[-1] - exact).abs().max().item())
        tr = sol.trace
        assert tr.eest.shape == tr.dt.shape == tr.mask.shape
        assert (tr.eest[tr.mask] <= 1).all() and (tr.dt[tr.mask] > 0).all()
        last = tr.t.gather(1, (tr.mask.sum(1) - 1)[:, None])[:, 0]
        torch.testing.assert_close(last, torch.ones(B, dtype=D), rtol=0, atol=0)  # steps land on t1 exactly
    assert errs[1] < errs[0] / 3 and errs[1] < 2e-2, errs


@pytest.mark.parametrize("interpretation", ["ito", "stratonovich"])
def test_adaptive_rkmil_error_follows_the_tolerance(interpretation):
    """RKMil's noise error term is ΔW³ (g g')²/6; with a drift in place of g g' (upstream's
    out-of-place cache) the estimate shrank like √h and a solve at rtol 1e-3 stalled at MaxIters."""
    B = 20
    bm = tree(B, tol=2.0 ** -14)
    exact = gbm_exact(bm(0.0, 1.0), interpretation)
    errs, steps = [], []
    for tol in (1e-2, 1e-3, 1e-4):
        sol = pb.solve(gbm(B, interpretation), pb.RKMil(), rtol=tol, atol=tol, brownian=bm, max_steps=5000)
        assert sol.success, tol
        errs.append((sol.ys[-1] - exact).abs().mean().item())
        steps.append(sol.stats.naccept.double().mean().item())
    assert errs[2] < errs[0] / 5 and steps[2] < 2000, (errs, steps)


def test_rejections_do_not_change_the_path():
    """Re-solving with fixed steps on the grid an adaptive solve accepted (no rejections there)
    reproduces it: the rejected attempts drew nothing that changed the Brownian path."""
    B = 8
    bm = tree(B, tol=2.0 ** -12)
    prob = gbm(B)
    # A first step of 0.5 is far too large: rejected, retried smaller (and more rejections later).
    sol = pb.solve(prob, pb.LambaEM(), rtol=1e-2, atol=1e-2, dt=0.5, batch="lockstep", brownian=bm)
    assert int(sol.stats.nreject[0]) > 0
    steps = sol.trace.t[0][sol.trace.mask[0]]
    grid = torch.cat([prob.t[:1], steps])
    fixed = pb.solve(pb.SDEProblem(prob.f, prob.g, prob.y0, grid), pb.LambaEM(), adaptive=False, dt=10.0,
                     batch="lockstep", brownian=bm)
    assert int(fixed.stats.nreject[0]) == 0
    torch.testing.assert_close(fixed.ys[-1], sol.ys[-1], rtol=1e-10, atol=1e-12)


def test_error_regularizer_and_local_regularizer_differentiable():
    mu = torch.tensor(1.01, dtype=D, requires_grad=True)
    sig = torch.tensor(0.87, dtype=D, requires_grad=True)
    prob = gbm(16, mu=mu, sig=sig)
    sol = pb.solve(prob, pb.SOSRI(), rtol=1e-1, atol=1e-1, seed=1, local_regularizer="unbiased")
    r = pb.error_regularizer(sol)
    gm, gs = torch.autograd.grad(r, (mu, sig), retain_graph=True)
    assert torch.isfinite(gm) and torch.isfinite(gs) and gs.abs() > 0
    gl = torch.autograd.grad(sol.local_regularizer, sig)[0]
    assert torch.isfinite(gl) and gl.abs() > 0


@pytest.mark.parametrize("solver", [pb.EM(), pb.SOSRI(), pb.RKMil()])
def test_gradcheck_fixed_noise(solver):
    B = 3
    bm = tree(B)

    def run(y0, mu, sig):
        prob = pb.SDEProblem(lambda t, y: mu * torch.sin(y), lambda t, y: sig * torch.cos(y), y0,
                             torch.tensor([0.0, 0.5, 1.0], dtype=D))
        return pb.solve(prob, solver, adaptive=False, dt=0.25, brownian=bm).ys

    args = (torch.rand(B, 1, dtype=D, requires_grad=True), torch.tensor(0.7, dtype=D, requires_grad=True),
            torch.tensor(0.4, dtype=D, requires_grad=True))
    assert torch.autograd.gradcheck(run, args)


class NeuralSDE(torch.nn.Module):
    def __init__(self, n=2, hidden=8):
        super().__init__()
        torch.manual_seed(0)
        self.drift = torch.nn.Sequential(torch.nn.Linear(n, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, n)).double()
        self.diff = torch.nn.Linear(n, n).double()

    def f(self, t, y):
        return self.drift(y)

    def g(self, t, y):
        return 0.3 * torch.tanh(self.diff(y))


def test_reversible_adjoint_matches_backprop():
    model = NeuralSDE()
    B = 4
    # Per-sample spans: samples take different numbers of steps (exercises the per-sample reversal).
    t = torch.tensor([[0.0, 0.3, 1.0], [0.0, 0.5, 0.8], [0.2, 0.4, 1.0], [0.0, 0.1, 0.6]], dtype=D)
    bm = pb.VirtualBrownianTree(t[:, 0], t[:, -1], (B, 2), seed=5, levy_area=True)
    y0 = torch.randn(B, 2, dtype=D, requires_grad=True)
    target = torch.randn(3, B, 2, dtype=D)
    params = list(model.parameters())

    def grads(adjoint):
        prob = pb.SDEProblem(model.f, model.g, y0, t, interpretation="stratonovich")
        sol = pb.solve(prob, pb.ReversibleHeun(), adaptive=False, dt=0.05, brownian=bm, adjoint=adjoint,
                       adjoint_params=params)
        loss = ((sol.ys - target) ** 2).sum()
        return sol, torch.autograd.grad(loss, [y0] + params)

    sol_bp, g_bp = grads(None)
    sol_rev, g_rev = grads(pb.ReversibleAdjoint())
    torch.testing.assert_close(sol_rev.ys, sol_bp.ys, rtol=0, atol=0)
    assert len(set(sol_bp.stats.naccept.tolist())) > 1
    for a, b in zip(g_rev, g_bp):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_a_blown_up_reversible_heun_sample_keeps_the_others_gradients_finite():
    """dy = a y³ dt + 0.1 y∘dW blows up from y0 = 50 at once (from 1.2 near t = 0.35). The failed
    sample's h = 0 steps must not evaluate the drift at 2y − ŷ (which overflows: NaN gradients for a),
    and the reversible adjoint must not walk it back from the blow-up; a loss that does use its
    values gets an error saying so."""
    a = torch.tensor(1.0, dtype=D, requires_grad=True)
    t = torch.linspace(0.0, 1.0, 5, dtype=D)

    def solve(y_failing, **kw):
        y0 = torch.tensor([[0.5], [y_failing], [0.3]], dtype=D, requires_grad=True)
        prob = pb.SDEProblem(lambda t, y: a * y ** 3, lambda t, y: 0.1 * y, y0, t, interpretation="stratonovich")
        with pytest.warns(RuntimeWarning, match="sample 1: Unstable"):
            return y0, pb.solve(prob, pb.ReversibleHeun(), adaptive=False, dt=0.01, seed=0, **kw)

    reversible = dict(adjoint=pb.ReversibleAdjoint(), adjoint_params=(a,))
    for y_failing in (50.0, 1.2):
        grads = []
        for kw in ({}, reversible):
            y0, sol = solve(y_failing, **kw)
            grads.append(torch.autograd.grad(sol.ys[-1, [0, 2]].sum(), (a, y0)))
        (ga_bp, gy_bp), (ga_rev, gy_rev) = grads
        assert torch.isfinite(ga_bp) and torch.isfinite(gy_bp).all() and gy_bp[1] == 0
        torch.testing.assert_close(ga_rev, ga_bp, rtol=1e-9, atol=0)
        torch.testing.assert_close(gy_rev, gy_bp, rtol=1e-9, atol=0)

    _, sol = solve(1.2, **reversible)
    with pytest.raises(RuntimeError, match="sample 1 failed .Unstable.*DiscreteAdjoint"):
        torch.autograd.grad(sol.ys[1, 1].sum(), a)   # t = 0.25: finite, before the blow-up
    # dL/dt is not what the reversible adjoint computes: refused, not left None.
    prob = pb.SDEProblem(lambda t, y: a * y, lambda t, y: 0.1 * y, torch.ones(3, 1, dtype=D),
                         t.clone().requires_grad_(), interpretation="stratonovich")
    with pytest.raises(ValueError, match="t requires grad, but adjoint=ReversibleAdjoint"):
        pb.solve(prob, pb.ReversibleHeun(), adaptive=False, dt=0.01, seed=0, **reversible)


def test_reversible_heun_reconstructs_backwards():
    """The algebraic inverse of a reversible Heun solve recovers y0 to rounding."""
    model = NeuralSDE()
    B = 3
    bm = tree(B, m=2)
    prob = pb.SDEProblem(model.f, model.g, torch.randn(B, 2, dtype=D), torch.tensor([0.0, 1.0], dtype=D),
                         interpretation="stratonovich")
    with torch.no_grad():
        z = torch.cat([prob.y0, prob.y0], 1)
        fg = lambda t, yh: (model.f(t, yh), model.g(t, yh))  # noqa: E731
        mu, sig = fg(0.0, prob.y0)
        h = 1 / 64
        for i in range(64):
            s = torch.full((B,), i * h, dtype=D)
            dW = bm(s, s + h)
            y, yh = z[:, :2], z[:, 2:]
            yh1 = 2 * y - yh + h * mu + sig * dW
            mu1, sig1 = fg(0.0, yh1)
            z = torch.cat([y + h * (mu + mu1) / 2 + (sig + sig1) * dW / 2, yh1], 1)
            mu, sig = mu1, sig1
        sol = pb.solve(prob, pb.ReversibleHeun(), adaptive=False, dt=h, brownian=bm)
        torch.testing.assert_close(sol.ys[-1], z[:, :2], rtol=1e-12, atol=1e-12)
        for i in reversed(range(64)):
            s = torch.full((B,), i * h, dtype=D)
            dW = bm(s, s + h)
            y1, yh1 = z[:, :2], z[:, 2:]
            yh = 2 * y1 - yh1 - h * mu - sig * dW
            mu0, sig0 = fg(0.0, yh)
            z = torch.cat([y1 - h * (mu0 + mu) / 2 - (sig0 + sig) * dW / 2, yh], 1)
            mu, sig = mu0, sig0
    torch.testing.assert_close(z[:, :2], prob.y0, rtol=0, atol=1e-12)


def test_scalar_and_matrix_additive_noise():
    B = 64
    t = torch.tensor([0.0, 1.0], dtype=D)
    # scalar noise: both components driven by one W: y_i = y0_i exp((μ − σ²/2)t + σW)
    bm = tree(B, m=1)
    prob = pb.SDEProblem(lambda t, y: MU * y, lambda t, y: SIG * y, torch.full((B, 2), U0, dtype=D), t,
                         noise="scalar")
    sol = pb.solve(prob, pb.SOSRI(), adaptive=False, dt=2.0 ** -6, brownian=bm)
    exact = gbm_exact(bm(0.0, 1.0)).expand(B, 2)
    assert (sol.ys[-1] - exact).abs().mean() < 5e-3
    # matrix additive noise (n = 2, m = 3), nonlinear drift: SRA1 self-convergence at order ≥ 1.5 on the
    # same path, against EM's order 1 (additive noise).
    S = torch.tensor([[0.2, 0.1, 0.0], [0.0, 0.3, -0.1]], dtype=D)
    bm3 = tree(B, m=3)
    prob = pb.SDEProblem(lambda t, y: -y ** 3, lambda t, y: S.expand(y.shape[0], 2, 3), torch.ones(B, 2, dtype=D), t,
                         noise="additive")
    run = lambda solver, k: pb.solve(prob, solver, adaptive=False, dt=2.0 ** -k, brownian=bm3).ys[-1]  # noqa: E731
    ref = run(pb.SRA1(), 7)
    e3, e5 = (run(pb.SRA1(), 3) - ref).abs().max(), (run(pb.SRA1(), 5) - ref).abs().max()
    em5 = (run(pb.EM(), 5) - ref).abs().max()
    assert e5 < 1e-3 and e3 / e5 > 2 ** 3 and em5 > 10 * e5, (e3, e5, em5)
    assert pb.solve(prob, pb.SRA1(), brownian=bm3).success


def test_additive_noise_with_a_state_dependent_g_warns():
    y0 = torch.ones(3, 2, dtype=D)
    t = torch.tensor([0.0, 1.0], dtype=D)
    with pytest.warns(RuntimeWarning, match="noise='additive' says g does not depend on y"):
        pb.solve(pb.SDEProblem(lambda t, y: -y, lambda t, y: 0.1 * y, y0, t, noise="additive"), pb.SRA1(), seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol = pb.solve(pb.SDEProblem(lambda t, y: -y, lambda t, y: 0.1 * torch.ones_like(y), y0, t, noise="additive"),
                       pb.SRA1(), seed=0)
    assert sol.success


def test_nonfinite_sample_fails_alone():
    B = 4
    y0 = torch.tensor([[0.5], [0.5], [1e200], [0.5]], dtype=D)
    prob = pb.SDEProblem(lambda t, y: y ** 3, lambda t, y: 0.1 * y, y0, torch.tensor([0.0, 1.0], dtype=D))
    with pytest.warns(RuntimeWarning, match="did not succeed"):
        sol = pb.solve(prob, pb.EM(), adaptive=False, dt=0.1, seed=0)
    assert sol.retcodes[2] == pb.ReturnCode.Unstable
    assert [sol.retcodes[i] for i in (0, 1, 3)] == [pb.ReturnCode.Success] * 3
    assert torch.isfinite(sol.ys[-1, [0, 1, 3]]).all()
    with pytest.warns(RuntimeWarning, match="did not succeed"):
        sol = pb.solve(prob, pb.SOSRI(), seed=0)   # adaptive: retries shrink dt, then give up
    assert sol.retcodes[2] in (pb.ReturnCode.Unstable, pb.ReturnCode.DtLessThanMin)
    assert [sol.retcodes[i] for i in (0, 1, 3)] == [pb.ReturnCode.Success] * 3


def test_bad_inputs():
    f = lambda t, y: -y  # noqa: E731
    g = lambda t, y: 0.1 * y  # noqa: E731
    y0 = torch.ones(3, 2, dtype=D)
    t = torch.tensor([0.0, 1.0], dtype=D)
    with pytest.raises(ValueError, match="noise must be one of"):
        pb.SDEProblem(f, g, y0, t, noise="commutative")
    with pytest.raises(ValueError, match="interpretation must be one of"):
        pb.SDEProblem(f, g, y0, t, interpretation="ito2")
    with pytest.raises(ValueError, match="y0 has non-finite"):
        pb.SDEProblem(f, g, torch.tensor([[1.0, float("nan")]], dtype=D), t)
    with pytest.raises(TypeError, match="g must be callable"):
        pb.SDEProblem(f, 0.1, y0, t)
    with pytest.raises(ValueError, match="strictly increasing for an SDEProblem"):
        pb.SDEProblem(f, g, y0, torch.tensor([1.0, 0.0], dtype=D))
    with pytest.raises(ValueError, match=r"g returned shape \(3, 2, 2\).*noise='diagonal'"):
        pb.solve(pb.SDEProblem(f, lambda t, y: y[..., None].expand(3, 2, 2), y0, t), pb.EM(), dt=0.1)
    with pytest.raises(ValueError, match=r"EulerHeun\(\) solves stratonovich SDEs.*interpretation='ito'"):
        pb.solve(pb.SDEProblem(f, g, y0, t), pb.EulerHeun(), dt=0.1)
    with pytest.raises(ValueError, match=r"SOSRI\(\) solves ito"):
        pb.solve(pb.SDEProblem(f, g, y0, t, interpretation="stratonovich"), pb.SOSRI())
    with pytest.raises(ValueError, match=r"SRA1\(\) does not support noise='diagonal'"):
        pb.solve(pb.SDEProblem(f, g, y0, t), pb.SRA1())
    with pytest.raises(TypeError, match="SDEProblem needs an SDE solver"):
        pb.solve(pb.SDEProblem(f, g, y0, t), pb.Tsit5())
    with pytest.raises(TypeError, match="solves SDEs: pass a pb.SDEProblem"):
        pb.solve(pb.ODEProblem(f, y0, t), pb.SOSRI())
    with pytest.raises(ValueError, match="cannot step adaptively"):
        pb.solve(pb.SDEProblem(f, g, y0, t), pb.EM(), adaptive=True, dt=0.1)
    with pytest.raises(ValueError, match="needs a step size"):
        pb.solve(pb.SDEProblem(f, g, y0, t), pb.EM())
    with pytest.raises(ValueError, match=r"brownian has shape \(5, 2\)"):
        pb.solve(pb.SDEProblem(f, g, y0, t), pb.EM(), dt=0.1, brownian=pb.VirtualBrownianTree(0.0, 1.0, (5, 2)))
    with pytest.raises(ValueError, match=r"brownian has dtype torch.float32; this problem's y0 is torch.float64"):
        pb.solve(pb.SDEProblem(f, g, y0, t), pb.EM(), dt=0.1,
                 brownian=pb.VirtualBrownianTree(0.0, 1.0, (3, 2), dtype=torch.float32))
    with pytest.raises(ValueError, match="seed picks the Brownian path, but brownian= already fixes it"):
        pb.solve(pb.SDEProblem(f, g, y0, t), pb.EM(), dt=0.1, seed=3, brownian=pb.VirtualBrownianTree(0.0, 1.0, (3, 2)))
    with pytest.raises(ValueError, match="needs the space-time Lévy area"):
        pb.solve(pb.SDEProblem(f, g, y0, t), pb.SOSRI(), brownian=pb.VirtualBrownianTree(0.0, 1.0, (3, 2)))
    with pytest.raises(ValueError, match="needs solver=pb.ReversibleHeun"):
        pb.solve(pb.SDEProblem(f, g, y0, t), pb.EM(), dt=0.1, adjoint=pb.ReversibleAdjoint())
    with pytest.raises(ValueError, match="not available for SDEs"):
        pb.solve(pb.SDEProblem(f, g, y0, t), pb.SOSRI(), adjoint=pb.BacksolveAdjoint())


def test_seed_reproducible_and_default_solver():
    prob = gbm(5)
    a = pb.solve(prob, rtol=0.1, atol=0.1, seed=7)
    b = pb.solve(prob, pb.SOSRI(), rtol=0.1, atol=0.1, seed=7)
    c = pb.solve(prob, rtol=0.1, atol=0.1, seed=8)
    assert a.solver == pb.SOSRI()
    torch.testing.assert_close(a.ys, b.ys, rtol=0, atol=0)
    assert not torch.allclose(a.ys[-1], c.ys[-1])
    # one unbatched sample; dense output is linear between steps and exact at step ends
    one = pb.SDEProblem(lambda t, y: -y, lambda t, y: 0.5 * y, torch.tensor([1.0, 2.0], dtype=D),
                        torch.tensor([0.0, 0.5, 1.0], dtype=D))
    bm = pb.VirtualBrownianTree(0.0, 1.0, (2,), seed=1)
    sol = pb.solve(one, pb.EM(), adaptive=False, dt=0.25, brownian=bm, dense=True)
    assert sol.ys.shape == (3, 2) and sol.stats.naccept.shape == ()
    torch.testing.assert_close(sol(torch.tensor([0.25, 0.375, 1.0], dtype=D)),
                               torch.stack([sol(torch.tensor([0.25], dtype=D))[0],
                                            (sol(torch.tensor([0.25], dtype=D))[0] + sol.ys[1]) / 2, sol.ys[-1]]))


def test_float32_adaptive_first_step():
    """The first step comes from the SDE initial-step rule (drift and diffusion, exponent 1/(p + 1/2));
    a too-small start would fall under float32's step floor at once."""
    prob = pb.SDEProblem(lambda t, y: -y, lambda t, y: 0.3 * y, torch.ones(4, 3), torch.linspace(0, 1, 5))
    sol = pb.solve(prob, pb.LambaEM(), seed=0)
    assert sol.success and sol.ys.dtype == torch.float32
    assert (sol.trace.dt[:, 0] > 1e-5).all() and (sol.trace.dt[:, 0] < 0.25).all()


@pytest.mark.parametrize("solver", [pb.EM(), pb.SRIW1(), pb.ReversibleHeun()])
@pytest.mark.parametrize("saveat", [None, [0.3, 0.5]])
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared-t", "per-sample-t"])
def test_fixed_step_lookahead_matches_per_step_queries(solver, saveat, per_sample):
    """Fixed steps take their increments from batched tree queries: fixed_loop._NoiseChunks for save
    times shared by the batch, sde.StepAhead's look-ahead in the general loop for per-sample ones.
    The result must be that of one tree query per step, with saves shortening steps of the grid."""
    B = 5
    t = torch.tensor([0.0, 1.0] if saveat is None else [0.0] + saveat + [1.0], dtype=D)
    if per_sample:  # each sample its own end: the general loop
        t = torch.tensor([t[:-1].tolist() + [1.0 - 0.01 * b] for b in range(B)], dtype=D)
    interpretation = "stratonovich" if isinstance(solver, pb.ReversibleHeun) else "ito"
    prob = pb.SDEProblem(lambda t, y: MU * y, lambda t, y: SIG * y, torch.full((B, 2), U0, dtype=D), t,
                         interpretation=interpretation)

    class PerStep:  # the same tree, queried one step at a time (no `intervals`, so no look-ahead)
        def __init__(self, bm):
            self.bm, self.shape, self.levy_area = bm, bm.shape, True

        def __call__(self, s, t):
            return self.bm(s, t)

        def increment_and_area(self, s, t):
            return self.bm.increment_and_area(s, t)

    for dt in (2.0 ** -6, 0.03):
        bm = pb.VirtualBrownianTree(0.0, 1.0, (B, 2), seed=4, levy_area=True)
        ys = pb.solve(prob, solver, adaptive=False, dt=dt, brownian=bm).ys
        ref = pb.solve(prob, solver, adaptive=False, dt=dt, brownian=PerStep(bm)).ys
        assert torch.allclose(ys, ref, rtol=1e-12, atol=1e-14)
        if not per_sample and (dt == 0.03 or saveat is None):  # same tree depth per query: bit-identical
            assert torch.equal(ys, ref)


# General noise: g(t, y) of shape (B, n, m). With commuting (here diagonal) matrices,
# dX = A X dt + Σ_k B_k X dW_k has X_i(t) = X_i(0) exp((a_i − c·Σ_k b_ki²) t + Σ_k b_ki W_k(t)),
# c = 1/2 for Itô, 0 for Stratonovich.
GEN_A = torch.tensor([0.3, -0.2], dtype=D)
GEN_B = torch.tensor([[0.4, 0.1], [-0.3, 0.5], [0.2, -0.6]], dtype=D)  # (m = 3, n = 2)


def general(B, interpretation):
    f = lambda t, y: GEN_A * y  # noqa: E731
    g = lambda t, y: y[..., :, None] * GEN_B.T  # noqa: E731  (B, n, m)
    return pb.SDEProblem(f, g, torch.ones(B, 2, dtype=D), torch.tensor([0.0, 1.0], dtype=D), noise="general",
                         interpretation=interpretation)


def general_exact(W, interpretation):
    c = 0.5 if interpretation == "ito" else 0.0
    return torch.exp(GEN_A - c * (GEN_B ** 2).sum(0) + W @ GEN_B)


@pytest.mark.parametrize("solver,interpretation,order", [
    (pb.EM(), "ito", 0.5), (pb.EulerHeun(), "stratonovich", 1.0), (pb.ReversibleHeun(), "stratonovich", 1.0)])
def test_general_noise_strong_order(solver, interpretation, order):
    """g (B, n, m) with m = 3 Brownian motions for n = 2 states; the noise commutes, so the Heun
    schemes reach order 1 (order 0.5 for non-commuting noise without Lévy areas)."""
    B = 100
    bm = tree(B, m=3)
    p, errs = strong_order(general(B, interpretation), solver, bm, general_exact(bm(0.0, 1.0), interpretation),
                           list(range(3, 8)))
    print(f"{solver!r} (general noise): strong order {p:.3f}, errors {errs}")
    assert abs(p - order) < 0.25, (p, errs)


def test_general_noise_checks():
    prob = general(4, "ito")
    with pytest.raises(ValueError, match="does not support noise='general'"):
        pb.solve(prob, pb.SRIW1(), adaptive=False, dt=0.1)
    bad = pb.SDEProblem(prob.f, lambda t, y: y, prob.y0, prob.t, noise="general")  # y's shape: no m axis
    with pytest.raises(ValueError, match=r"noise='general'.*\(4, 2, 'm'\)"):
        pb.solve(bad, pb.EM(), adaptive=False, dt=0.1)


def test_general_noise_reversible_adjoint_matches_backprop():
    torch.manual_seed(0)
    drift, diffusion = torch.nn.Linear(2, 2).double(), torch.nn.Linear(2, 6).double()
    f = lambda t, y: torch.tanh(drift(y))  # noqa: E731
    g = lambda t, y: torch.tanh(diffusion(y)).reshape(*y.shape[:-1], 2, 3)  # noqa: E731  (B, n=2, m=3)
    y0 = torch.randn(4, 2, dtype=D, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=D)
    params = list(drift.parameters()) + list(diffusion.parameters())
    bm = pb.VirtualBrownianTree(0.0, 1.0, (4, 3), seed=1, levy_area=True)

    def grads(adjoint):
        prob = pb.SDEProblem(f, g, y0, t, noise="general", interpretation="stratonovich")
        sol = pb.solve(prob, pb.ReversibleHeun(), adaptive=False, dt=0.05, brownian=bm, adjoint=adjoint,
                       adjoint_params=params)
        return sol, torch.autograd.grad(sol.ys.square().sum(), [y0] + params)

    sol_bp, g_bp = grads(None)
    sol_rev, g_rev = grads(pb.ReversibleAdjoint())
    torch.testing.assert_close(sol_rev.ys, sol_bp.ys, rtol=0, atol=0)
    for a, b in zip(g_rev, g_bp):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_differentiable_dt_and_reversible_adjoint_closures_and_seed_checks():
    """differentiable_dt: the step times carry a graph, but the Brownian path is not differentiable
    in time, so none flows into the tree's query (it was NaN there). ReversibleAdjoint refuses an f
    or g that uses a tensor requiring grad outside adjoint_params (its gradient would be dropped
    silently). A non-integer seed, or a tree tol of 0, is refused by name."""
    mu = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    y0 = torch.ones(4, 1, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    prob = pb.SDEProblem(lambda t, y: mu * y, lambda t, y: 0.3 * y, y0, t)
    grads = []
    for ddt in (False, True):
        sol = pb.solve(prob, pb.SRIW1(), seed=3, differentiable_dt=ddt)
        grads.append(torch.autograd.grad(sol.ys[-1].sum(), (y0, mu)))
    assert all(torch.isfinite(g).all() for g in grads[1])
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=0.05, atol=0)
    with pytest.raises(ValueError, match="requires grad but is not among the adjoint's parameters"):
        pb.solve(pb.SDEProblem(lambda t, y: mu * y, lambda t, y: 0.3 * y, y0, t), pb.ReversibleHeun(),
                 dt=0.1, seed=3, adjoint=pb.ReversibleAdjoint())
    with pytest.raises(TypeError, match="seed must be an integer"):
        pb.solve(prob, pb.SRIW1(), seed=1.5)
    with pytest.raises(ValueError, match="tol must be positive"):
        pb.VirtualBrownianTree(0.0, 1.0, shape=(4, 1), tol=0.0)
    with pytest.raises(ValueError, match="t0 and t1 must be numbers or have one entry per sample"):
        pb.VirtualBrownianTree(torch.zeros(3), 1.0, shape=(4, 1))
