"""Automatic stiffness switching (AutoTsit5 / AutoVern7 with a Rosenbrock stiff method), per sample:
the switching rule itself, stiff and non-stiff problems, mixed batches, accuracy, gradients."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

import pybridge as pb
from tests.stiff_problems import vdpol
from pybridge.torch_engine.controller import Norm, PIController
from pybridge.torch_engine.engine import build_method

F64 = torch.float64
TSIT5_STABILITY = 3.5068


def lotka_volterra(t, y):
    a, b = y.unbind(-1)
    return torch.stack([1.5 * a - a * b, -3.0 * b + a * b], -1)


def relax(lam):
    """y' = −λ(y − cos t): stiffness |λ| per sample (lam of shape (B,)), slow solution ≈ cos t."""
    def f(t, y):
        tt = t[:, None] if t.dim() == 1 else t
        return -lam[:, None] * (y - torch.cos(tt))
    return f


def switches(method_row):
    return int((method_row[1:] != method_row[:-1]).sum())


# ----------------------------------------------------------------------------------------------
# Descriptors
# ----------------------------------------------------------------------------------------------
def test_descriptors():
    a = pb.AutoTsit5(pb.Rosenbrock23())
    assert repr(a) == "AutoTsit5(Rosenbrock23())"
    assert a == pb.AutoTsit5(pb.Rosenbrock23()) and hash(a) == hash(pb.AutoTsit5(pb.Rosenbrock23()))
    assert a != pb.AutoTsit5(pb.Rodas5P()) and a != pb.AutoVern7(pb.Rosenbrock23())
    assert len({a, pb.AutoTsit5(pb.Rodas5P()), pb.AutoTsit5(pb.Rosenbrock23())}) == 2
    with pytest.raises(TypeError, match="stiff must be a Rosenbrock or ESDIRK"):
        pb.AutoTsit5(pb.Tsit5())
    # The engine's method cache keys on the stiff method too.
    m23 = build_method(a, F64, "cpu")
    m5p = build_method(pb.AutoTsit5(pb.Rodas5P()), F64, "cpu")
    assert m23.stiff.tableau.name == "Rosenbrock23" and m5p.stiff.tableau.name == "Rodas5P"
    assert build_method(pb.AutoVern7(pb.Rodas5P()), F64, "cpu").explicit.tableau.name == "Vern7"


# ----------------------------------------------------------------------------------------------
# The switching rule, driven through the loop's protocol (step → stiffness → controller.propose)
# ----------------------------------------------------------------------------------------------
def test_switching_thresholds_per_sample():
    """Sample 0 has |λ| = 1e6 (every check stiff), sample 1 |λ| = 1e-3 (never). With y' = −λy the
    Tsit5 estimate and ‖J‖∞ both equal |λ|, so each check's outcome is known."""
    lam = torch.tensor([1e6, 1e-3], dtype=F64)
    f = lambda t, y: -lam[:, None] * y
    run = build_method(pb.AutoTsit5(pb.Rosenbrock23()), F64, "cpu").for_solve()
    ctrl = run.controller
    tsit5_pi = PIController.for_order(5)
    ros23_pi = PIController.for_order(2, qsteady_max=1.2)
    t = torch.zeros(2, dtype=F64)
    y = torch.ones(2, 1, dtype=F64)
    errold = ctrl.initial_errold(t)
    eest = torch.full((2,), 0.5, dtype=F64)
    accept = torch.ones(2, dtype=torch.bool)

    def check(h, stiff_lam0):
        nonlocal errold
        lam[0] = 1e6 if stiff_lam0 else 1e-3
        mode_before = run.mode.clone() if run.mode is not None else torch.zeros(2, dtype=torch.bool)
        step = run.step(f, t, y, h, f(t, y))
        run.stiffness(step, step.y1, f(t, y), Norm(False))
        # What each sample's own method's controller proposes.
        expect = torch.where(mode_before, ros23_pi.propose(h, eest, errold, accept)[0],
                             tsit5_pi.propose(h, eest, errold, accept)[0])
        dt_new, errold = ctrl.propose(h, eest, errold, accept)
        return step, expect, dt_new

    h = torch.full((2,), 1e-3, dtype=F64)
    for i in range(10):   # 10 consecutive stiff checks: not yet
        step, expect, dt_new = check(h, True)
        assert step.extra_trace["method"].tolist() == [0, 0]
        assert torch.equal(dt_new, expect)
    step, expect, dt_new = check(h, True)  # the 11th switches sample 0 only, doubling its dt
    assert run.mode.tolist() == [True, False]
    assert dt_new[0] == 2 * expect[0] and dt_new[1] == expect[1]
    # Now sample 0 steps with Rosenbrock23 (its own controller); 3 non-stiff checks keep it stiff.
    for i in range(3):
        step, expect, dt_new = check(h, False)
        assert step.extra_trace["method"].tolist() == [1, 0]
        assert int(step.stats["njac"][0]) == 1 and int(step.stats["njac"][1]) == 0
        assert torch.equal(dt_new, expect)
    step, expect, dt_new = check(h, False)  # the 4th switches back, halving dt
    assert run.mode.tolist() == [False, False]
    assert dt_new[0] == expect[0] / 2
    # An interrupted run of stiff checks starts counting again.
    for stiff in [True] * 10 + [False] + [True] * 10:
        check(h, stiff)
    assert run.mode.tolist() == [False, False]
    check(h, True)
    assert run.mode.tolist() == [True, False]


# ----------------------------------------------------------------------------------------------
# Non-stiff problems never switch and reproduce the explicit method exactly
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("auto,explicit", [(pb.AutoTsit5(pb.Rosenbrock23()), pb.Tsit5()),
                                           (pb.AutoVern7(pb.Rodas5P()), pb.Vern7())], ids=repr)
def test_nonstiff_equals_explicit_bit_for_bit(auto, explicit):
    y0 = torch.tensor([[1.0, 1.0], [2.0, 0.5], [0.5, 3.0]], dtype=F64)
    prob = pb.ODEProblem(lotka_volterra, y0, torch.linspace(0, 8, 9, dtype=F64))
    a = pb.solve(prob, auto, rtol=1e-6, atol=1e-8, dense=True)
    e = pb.solve(prob, explicit, rtol=1e-6, atol=1e-8, dense=True)
    assert a.success and e.success
    assert not a.trace.method.any()
    assert torch.equal(a.ys, e.ys)
    for k in ("t", "dt", "eest", "stiffness", "mask"):
        assert torch.equal(getattr(a.trace, k), getattr(e.trace, k)), k
    for k in ("nfe", "naccept", "nreject"):
        assert torch.equal(getattr(a.stats, k), getattr(e.stats, k)), k
    # The stiff method never ran: its counters are 0 (they were absent, yet present in a batch where
    # another sample had switched).
    assert torch.equal(a.stats.njac, torch.zeros(3, dtype=torch.long)) and e.stats.njac is None
    tq = torch.linspace(0.05, 7.9, 23, dtype=F64)
    assert torch.equal(a(tq), e(tq))
    assert a.trace.stability_size == e.trace.stability_size


# ----------------------------------------------------------------------------------------------
# Stiff problems
# ----------------------------------------------------------------------------------------------
def test_vdpol_switches_and_beats_tsit5():
    """VDPOL (ε = 1e-6) up to t = 0.5, on its slow manifold: AutoTsit5 turns to Rosenbrock23 after
    11 stiff checks; Tsit5 is stability-bound at dt ≈ 1e-6."""
    prob = pb.ODEProblem(vdpol, torch.tensor([2.0, 0.0], dtype=F64), torch.tensor([0.0, 0.5], dtype=F64))
    auto = pb.solve(prob, pb.AutoTsit5(pb.Rosenbrock23()), rtol=1e-3, atol=1e-3)
    assert auto.success
    m = auto.trace.method[auto.trace.mask]
    assert m[0] == 0 and m[-1] == 1 and switches(m) >= 1
    first_stiff = int(m.argmax())
    assert first_stiff >= 1 and not m[:first_stiff].any() and m[first_stiff:].all()
    steps = int(auto.stats.naccept + auto.stats.nreject)
    assert steps < 100
    # Stats: one Jacobian per stiff attempt, none for explicit ones.
    assert 0 < int(auto.stats.njac) <= steps - first_stiff
    with pytest.warns(RuntimeWarning, match="MaxIters"):
        tsit5 = pb.solve(prob, pb.Tsit5(), rtol=1e-3, atol=1e-3, max_steps=20 * steps)
    assert tsit5.retcodes == [pb.ReturnCode.MaxIters]
    covered = float(tsit5.extras["t_final"]) / 0.5
    assert covered < 0.05   # so Tsit5 would need more than 20·20 = 400× the steps
    # Same answer as Rodas5P at a tight tolerance.
    ref = pb.solve(prob, pb.Rodas5P(), rtol=1e-8, atol=1e-8)
    assert torch.allclose(auto.ys[-1], ref.ys[-1], rtol=1e-2)


def test_vdpol_reference(reference):
    """The Bari VDPOL (ε = 1e-6, t ∈ [0, 2], two relaxation jumps) against the reference solution."""
    ref = reference["vdpol"]
    rtol = atol = 1e-3
    prob = pb.ODEProblem(vdpol, torch.tensor(ref["y0"], dtype=F64), torch.tensor([ref["t0"], ref["t1"]], dtype=F64))
    sol = pb.solve(prob, pb.AutoTsit5(pb.Rodas5P()), rtol=rtol, atol=atol)
    assert sol.success
    y, r = np.asarray(sol.ys[-1].tolist()), np.asarray(ref["y_t1"])
    mescd = -math.log10(np.max(np.abs(y - r) / (atol / rtol + np.abs(r))))
    assert mescd >= -math.log10(rtol) - 1.0, mescd
    m = sol.trace.method[sol.trace.mask]
    assert m[0] == 0 and bool(m.any())
    assert int(sol.stats.naccept) < 400


def test_stiff_then_nonstiff_switches_back():
    """λ(t) = 1e4·e^{−12t} + 1: stiff at first, then not; the trace goes 0 → 1 → 0."""
    f = lambda t, y: -(1e4 * torch.exp(-12 * t) + 1) * (y - torch.cos(t))
    prob = pb.ODEProblem(f, torch.ones(1, dtype=F64), torch.tensor([0.0, 0.5, 3.0], dtype=F64))
    sol = pb.solve(prob, pb.AutoTsit5(pb.Rodas5P()), rtol=1e-5, atol=1e-8, dense=True)
    assert sol.success
    m = sol.trace.method[sol.trace.mask]
    assert m[0] == 0 and bool(m.any()) and m[-1] == 0
    # The stiffness trace is ‖J‖∞ = λ(t_start) on stiff steps and the Tsit5 estimate otherwise;
    # on this linear problem both are λ (at slightly different times).
    t_end, dt, s = (getattr(sol.trace, k)[sol.trace.mask] for k in ("t", "dt", "stiffness"))
    lam_start = 1e4 * torch.exp(-12 * (t_end - dt)) + 1
    lam_end = 1e4 * torch.exp(-12 * t_end) + 1
    assert torch.allclose(s[m == 1], lam_start[m == 1], rtol=1e-10)
    assert ((s[m == 0] <= lam_start[m == 0] * 1.001) & (s[m == 0] >= lam_end[m == 0] * 0.999)).all()
    ref = solve_ivp(lambda t, y: -(1e4 * np.exp(-12 * t) + 1) * (y - np.cos(t)), (0.0, 3.0), [1.0],
                    method="Radau", rtol=1e-10, atol=1e-12, dense_output=True).sol
    assert (sol.ys[:, 0] - torch.from_numpy(ref(prob.t.numpy())[0])).abs().max() < 1e-4
    # Dense output across both methods' interpolants.
    tq = torch.linspace(0.0, 3.0, 41, dtype=F64)
    assert (sol(tq)[:, 0] - torch.from_numpy(ref(tq.numpy())[0])).abs().max() < 1e-3


# ----------------------------------------------------------------------------------------------
# Per-sample switching in a batch
# ----------------------------------------------------------------------------------------------
# Rosenbrock23 (order 2) only at a loose tolerance: at tight ones its steps shrink towards the
# explicit stability limit on this problem, and the sample rightly switches back and forth.
@pytest.mark.parametrize("stiff,rtol,t1", [(pb.Rosenbrock23(), 1e-3, 0.5), (pb.Rodas5P(), 1e-6, 2.0)],
                         ids=lambda v: repr(v) if isinstance(v, pb.Solver) else str(v))
def test_mixed_batch_switches_only_the_stiff_sample(stiff, rtol, t1):
    lam = torch.tensor([1e4, 1.0], dtype=F64)
    ts = torch.tensor([0.0, 0.3, t1], dtype=F64)
    y0 = torch.ones(2, 1, dtype=F64)
    solver = pb.AutoTsit5(stiff)
    atol = 1e-3 * rtol
    sol = pb.solve(pb.ODEProblem(relax(lam), y0, ts), solver, rtol=rtol, atol=atol)
    assert sol.success
    m = sol.trace.method
    assert bool(m[0][sol.trace.mask[0]].any()) and not m[1].any()
    for b in range(2):
        lb = lam[b:b + 1]
        solo = pb.solve(pb.ODEProblem(lambda t, y: -lb * (y - torch.cos(t)), y0[b], ts), solver,
                        rtol=rtol, atol=atol)
        assert int(solo.stats.naccept) == int(sol.stats.naccept[b])
        assert torch.equal(solo.trace.method[solo.trace.mask], m[b][sol.trace.mask[b]])
        assert torch.allclose(solo.ys, sol.ys[:, b], rtol=1e-12, atol=1e-14)
    exact = (lam ** 2 * torch.cos(ts[-1]) + lam * torch.sin(ts[-1])) / (1 + lam ** 2) \
        + torch.exp(-lam * ts[-1]) / (1 + lam ** 2)
    assert torch.allclose(sol.ys[-1, :, 0], exact, rtol=10 * rtol)
    # The non-stiff sample stepped exactly as Tsit5 alone would.
    tsit5 = pb.solve(pb.ODEProblem(lambda t, y: -(y - torch.cos(t)), y0[1], ts), pb.Tsit5(), rtol=rtol, atol=atol)
    assert int(tsit5.stats.naccept) == int(sol.stats.naccept[1])
    assert torch.allclose(tsit5.ys, sol.ys[:, 1], rtol=1e-12, atol=1e-14)


def test_lockstep_switches_together():
    lam = torch.tensor([1e4, 1.0], dtype=F64)
    sol = pb.solve(pb.ODEProblem(relax(lam), torch.ones(2, 1, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64)),
                   pb.AutoTsit5(pb.Rodas5P()), rtol=1e-6, atol=1e-9, batch="lockstep")
    assert sol.success
    assert torch.equal(sol.trace.method[0], sol.trace.method[1]) and bool(sol.trace.method.any())
    assert torch.equal(sol.trace.dt[0], sol.trace.dt[1])


# ----------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------
def _kinetics(p):
    def f(t, y):
        a, b = y.unbind(-1)
        return torch.stack([-p[0] * a + p[1] * b * b, p[0] * a - p[1] * b * b - p[2] * b], -1)
    return pb.ODEProblem(f, torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([0.0, 0.1], dtype=F64))


def test_gradients_through_switching():
    p = torch.tensor([5.0, 20.0, 2000.0], dtype=F64, requires_grad=True)
    solver = pb.AutoTsit5(pb.Rosenbrock23())
    sol = pb.solve(_kinetics(p), solver, rtol=1e-2, atol=1e-6)
    m = sol.trace.method[sol.trace.mask]
    assert sol.success and m[0] == 0 and m[-1] == 1   # explicit steps, then stiff ones
    # With differentiable_dt the steps are smooth in p (the switching pattern is fixed nearby),
    # so the discrete gradient is the exact derivative of what was computed.
    fn = lambda p: pb.solve(_kinetics(p), solver, rtol=1e-2, atol=1e-6, differentiable_dt=True).ys[-1]
    assert torch.autograd.gradcheck(fn, (p,), atol=1e-5, rtol=1e-3)
    # The error regularizer's gradient flows through both methods' error estimates.
    g, = torch.autograd.grad(pb.error_regularizer(sol), p)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    # The local (2023) regularizer's extra step is taken by the composite too.
    local = pb.solve(_kinetics(p), solver, rtol=1e-2, atol=1e-6, local_regularizer="unbiased", seed=0)
    g, = torch.autograd.grad(local.local_regularizer, p)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("stiff", [pb.KenCarp4(), pb.TRBDF2()], ids=repr)
def test_esdirk_as_the_stiff_method(stiff):
    """ESDIRK stiff methods (Newton counters, own controller) switch in per sample as Rosenbrocks do."""
    lam = torch.tensor([1e4, 1.0], dtype=F64)
    ts = torch.tensor([0.0, 0.3, 1.0], dtype=F64)
    sol = pb.solve(pb.ODEProblem(relax(lam), torch.ones(2, 1, dtype=F64), ts), pb.AutoTsit5(stiff),
                   rtol=1e-5, atol=1e-8)
    assert sol.success
    assert bool(sol.trace.method[0].any()) and not sol.trace.method[1].any()
    assert int(sol.stats.nnonliniter[0]) > 0 and int(sol.stats.nnonliniter[1]) == 0
    exact = (lam ** 2 * torch.cos(ts[-1]) + lam * torch.sin(ts[-1])) / (1 + lam ** 2) \
        + torch.exp(-lam * ts[-1]) / (1 + lam ** 2)
    assert torch.allclose(sol.ys[-1, :, 0], exact, rtol=1e-4)
