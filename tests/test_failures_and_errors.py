"""Per-sample failure codes, and clear errors for invalid input (each message asserted)."""
import math
import warnings

import pytest
import torch

import pybridge as pb

RC = pb.ReturnCode


def blowup_batch():
    # y' = y², y(0) = y0 explodes at t = 1/y0: only the first sample reaches infinity (at 0.8) before 1.5.
    y0 = torch.tensor([[1.25], [0.1], [0.5]], dtype=torch.float64)
    return pb.ODEProblem(lambda t, y: y ** 2, y0, torch.linspace(0, 1.5, 4, dtype=torch.float64))


def test_one_failing_sample_keeps_its_values_and_spares_the_others():
    with pytest.warns(RuntimeWarning, match="sample 0: DtLessThanMin"):
        sol = pb.solve(blowup_batch(), pb.Tsit5(), rtol=1e-8, atol=1e-10)
    assert sol.retcode.tolist() == [RC.DtLessThanMin, RC.Success, RC.Success]
    assert not sol.success
    exact = lambda y0, t: y0 / (1 - y0 * t)
    t = sol.ts
    assert torch.allclose(sol.ys[:2, 0, 0], exact(1.25, t[:2]), rtol=1e-6)  # kept up to the failure
    assert torch.isnan(sol.ys[2:, 0]).all()                                  # NaN after
    for b, y0 in ((1, 0.1), (2, 0.5)):
        assert torch.allclose(sol.ys[:, b, 0], exact(y0, t), rtol=1e-6)


def test_same_answer_for_healthy_samples_with_or_without_the_failing_one():
    prob = blowup_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        together = pb.solve(prob, pb.Tsit5())
    alone = pb.solve(pb.ODEProblem(prob.f, prob.y0[1:], prob.t), pb.Tsit5())
    assert torch.equal(together.ys[:, 1:], alone.ys)


def test_max_iters_per_sample():
    with pytest.warns(RuntimeWarning, match="MaxIters"):
        sol = pb.solve(blowup_batch(), pb.Tsit5(), max_steps=25)
    assert sol.retcode[0] == RC.MaxIters and sol.retcode[1] == RC.Success
    assert int(sol.stats.naccept[0] + sol.stats.nreject[0]) == 25


def test_non_finite_rhs_is_unstable():
    def f(t, y):
        return torch.where(t[:, None] > 0.5, torch.log(y - 2), -y) if t.dim() else -y
    y0 = torch.tensor([[1.0], [1.0]], dtype=torch.float64)
    t = torch.tensor([[0.0, 1.0], [0.0, 0.4]], dtype=torch.float64)
    with pytest.warns(RuntimeWarning):
        sol = pb.solve(pb.ODEProblem(f, y0, t), pb.Tsit5())
    assert sol.retcode.tolist() == [RC.Unstable, RC.Success]
    assert torch.isnan(sol.ys[-1, 0]).all() and torch.isfinite(sol.ys[-1, 1]).all()


def test_lockstep_stops_a_diverging_sample_and_finishes_the_others():
    f = lambda t, y: torch.cat([torch.log(y[:1] - 2), -y[1:]])
    y0 = torch.ones(3, 1, dtype=torch.float64)
    with pytest.warns(RuntimeWarning):
        sol = pb.solve(pb.ODEProblem(f, y0, torch.tensor([0.0, 1.0]).double()), pb.Tsit5(), batch="lockstep")
    assert sol.retcode.tolist() == [RC.Unstable, RC.Success, RC.Success]
    assert torch.allclose(sol.ys[-1, 1:, 0], torch.exp(torch.tensor(-1.0, dtype=torch.float64)), rtol=1e-3)


@pytest.mark.parametrize("solver", [pb.Tsit5(), pb.Vern7(), pb.Rodas5P(), pb.RK4()],
                         ids=["Tsit5", "Vern7", "Rodas5P", "RK4-fixed"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_lockstep_keeps_the_time_of_the_running_samples_after_sample_0_stops(solver, grad):
    """f received τ[0] as the batch's time: once sample 0 stopped, the others were solved with f at
    the time it stopped at (y = sin t came out 1.99 instead of 0.14 at t = 3)."""
    def f(t, y):   # y' = cos t; sample 0's f is NaN after t = 1 (it stops Unstable there)
        tt = t.expand(y.shape[0]) if t.dim() == 0 else t
        out = torch.cos(tt)[:, None].expand_as(y)
        return torch.where((torch.arange(y.shape[0]) == 0)[:, None] & (tt[:, None] > 1), torch.nan, out)
    t = torch.linspace(0, 3, 4, dtype=torch.float64)
    kw = dict(dt=0.01) if not solver.adaptive else {}
    with torch.set_grad_enabled(grad), pytest.warns(RuntimeWarning, match="sample 0: Unstable"):
        sol = pb.solve(pb.ODEProblem(f, torch.zeros(3, 1, dtype=torch.float64), t), solver, rtol=1e-8,
                       atol=1e-10, batch="lockstep", **kw)
    assert sol.retcode.tolist() == [RC.Unstable, RC.Success, RC.Success]
    tol = 1e-6 if solver.adaptive else 1e-8
    torch.testing.assert_close(sol.ys[:, 1:, 0], torch.sin(t)[:, None].expand(4, 2), rtol=0, atol=tol)


@pytest.mark.parametrize("solver", [pb.Tsit5(), pb.Vern7()], ids=lambda s: s.name)
def test_lockstep_sample_whose_f_is_nan_at_y0_changes_nothing_for_the_others(solver):
    """Its NaN left the lockstep initial-step norms NaN (the batch started at the fallback 1e-6 and,
    in float32, stiffness estimates came out 0) and entered the lockstep stiffness mean (all 0)."""
    a = torch.tensor(1.0)
    f = lambda t, y: torch.cat([torch.log(y[:1] - 2), -a * y[1:] * torch.tanh(y[1:])])  # noqa: E731
    t = torch.linspace(0, 1, 3)
    with pytest.warns(RuntimeWarning, match="sample 0: Unstable"):
        with_bad = pb.solve(pb.ODEProblem(f, torch.ones(3, 1), t), solver, rtol=1e-6, atol=1e-8, batch="lockstep")
    alone = pb.solve(pb.ODEProblem(lambda t, y: -a * y * torch.tanh(y), torch.ones(2, 1), t), solver,
                     rtol=1e-6, atol=1e-8, batch="lockstep")
    torch.testing.assert_close(with_bad.ys[:, 1:], alone.ys, rtol=0, atol=0)
    torch.testing.assert_close(with_bad.trace.stiffness[1:], alone.trace.stiffness, rtol=1e-6, atol=0)
    assert float(alone.trace.stiffness[0, 0]) > 0.5


@pytest.mark.parametrize("kw", [dict(solver=pb.Tsit5()), dict(solver=pb.Vern7()),
                                dict(solver=pb.Tsit5(), adaptive=False, dt=0.01)], ids=["Tsit5", "Vern7", "fixed"])
def test_lockstep_gradients_stay_finite_where_a_stopped_samples_f_has_no_derivative(kw):
    """y' = p·√(y − t): sample 0 reaches y < t and fails. Evaluated at the running sample's time, its
    row of f (and ∂f/∂p there) is NaN; the zero cotangent times that NaN reached p's gradient."""
    y0 = torch.tensor([[0.05], [5.0]], dtype=torch.float64)
    grads = []
    for batch in ("lockstep", "independent"):
        p = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
        f = lambda t, y: p * torch.sqrt(y - (t if t.dim() == 0 else t[:, None]))  # noqa: E731
        with pytest.warns(RuntimeWarning, match="sample 0: Unstable"):
            sol = pb.solve(pb.ODEProblem(f, y0, torch.linspace(0, 1, 5, dtype=torch.float64)), batch=batch,
                           rtol=1e-8, atol=1e-10, **kw)
        grads.append(torch.autograd.grad(sol.ys[-1, 1].sum(), p)[0])
    assert torch.isfinite(grads[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-8, atol=0)


def _fails_after(t_fail, row=0):
    """f = cos(5t) (y = y0 + sin(5t)/5), NaN for sample `row` after t_fail; records its times."""
    def f(t, y):
        f.times.append(float(t.reshape(-1)[-1]))
        bad = (torch.arange(y.shape[0])[:, None] == row) & (t.reshape(-1, 1) > t_fail)
        return torch.where(bad, torch.nan, torch.cos(5 * t).reshape(-1, 1) * torch.ones_like(y))
    f.times = []
    return f


def test_lockstep_lazy_interpolant_stages_get_the_running_samples_time():
    """Vern7's lazy stages, for saves inside steps (fixed steps, no gradients) and for sol(t) at
    τ < 0 (where a stopped sample's padded rows, τ = 0, were the latest): computed at a stopped
    sample's time, sample 1's values came out wrong by up to 0.1."""
    t = torch.linspace(0, 1, 41, dtype=torch.float64)         # saves strictly inside the dt = 0.1 steps
    exact = torch.sin(5 * t) / 5
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="sample 0: Unstable"):
        sol = pb.solve(pb.ODEProblem(_fails_after(0.3), torch.zeros(2, 1, dtype=torch.float64), t), pb.Vern7(),
                       batch="lockstep", adaptive=False, dt=0.1)
    torch.testing.assert_close(sol.ys[:, 1, 0], exact, rtol=0, atol=1e-10)
    t = torch.linspace(-2, -1, 3, dtype=torch.float64)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="sample 0: Unstable"):
        sol = pb.solve(pb.ODEProblem(_fails_after(-1.7), torch.zeros(2, 1, dtype=torch.float64), t), pb.Vern7(),
                       batch="lockstep", dense=True, rtol=1e-10, atol=1e-12)
        tq = torch.linspace(-1.5, -1.01, 7, dtype=torch.float64)
        values = sol(tq)[:, 1, 0]
    exact = (torch.sin(5 * tq) - math.sin(-10.0)) / 5
    torch.testing.assert_close(values, exact, rtol=0, atol=1e-9)


def test_lockstep_local_regularizer_steps_at_the_probe_time_after_a_failure():
    """A sample (not the first) that fails after the shared probe time: the extra step's f got the
    failure time instead of the probe's."""
    for seed in range(10):
        f = _fails_after(0.7, row=2)
        with pytest.warns(RuntimeWarning, match="sample 2: Unstable"):
            sol = pb.solve(pb.ODEProblem(f, torch.ones(3, 2, dtype=torch.float64), torch.linspace(0, 1, 5).double()),
                           pb.Tsit5(), batch="lockstep", local_regularizer="unbiased", seed=seed, rtol=1e-6)
        t_reg = float(sol.extras["t_reg"][0])
        if t_reg < 0.6:
            break
    stages = f.times[-7:]          # the regularizer's step: Tsit5's 6 stages and f at its end
    assert all(t_reg <= s <= t_reg + 0.1 for s in stages), (t_reg, stages)


@pytest.mark.parametrize("kw", [dict(solver=pb.Tsit5()), dict(solver=pb.Vern7()), dict(solver=pb.Rodas5P()),
                                dict(solver=pb.Tsit5(), compile=True)], ids=["Tsit5", "Vern7", "Rodas5P", "compiled"])
def test_lockstep_sample_whose_f_turns_nan_later_leaves_shared_gradients_exact(kw):
    """In lockstep f gets the running samples' time, where a stopped sample's f may be NaN: 0·NaN in
    its masked-out rows made the shared parameter's gradient NaN. It must equal independent mode's."""
    k = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)

    def f(t, y):   # sample 1's f is NaN after t = 0.3 (it stops Unstable)
        tt = t.reshape(-1, 1)
        return torch.where((torch.arange(2)[:, None] == 1) & (tt > 0.3), torch.nan, -k * y)
    t = torch.tensor([0.0, 0.2, 1.0, 3.0], dtype=torch.float64)
    grads = []
    for batch in ("lockstep", "independent"):
        with pytest.warns(RuntimeWarning, match="sample 1: Unstable"):
            sol = pb.solve(pb.ODEProblem(f, torch.ones(2, 1, dtype=torch.float64), t), rtol=1e-8, atol=1e-10,
                           batch=batch, **kw)
        grads.append(torch.autograd.grad(sol.ys[1:, 0, 0].sum(), k)[0])
    assert torch.isfinite(grads[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=0)


@pytest.mark.parametrize("kw", [dict(), dict(batch="lockstep"), dict(adaptive=False, dt=0.1),
                                dict(solver=pb.Rodas5P())], ids=["independent", "lockstep", "fixed", "Rodas5P"])
def test_a_sample_whose_f_is_nan_at_y0_leaves_shared_gradients_finite(kw):
    """f = −√(a(y − 2)) is NaN at y0 = 1: that sample fails at once. Its f(t0, y0) in the graph made
    the shared parameter's gradient NaN (zero cotangent × infinite derivative); it now holds a
    stand-in state, and the other sample's gradient is the one it has solved alone."""
    kw = dict(kw)
    solver = kw.pop("solver", pb.Tsit5())
    a = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    f = lambda t, y: -torch.sqrt(a * (y - 2))  # noqa: E731
    t = torch.linspace(0, 1, 3, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="sample 0: Unstable"):
        sol = pb.solve(pb.ODEProblem(f, torch.tensor([[1.0], [3.0]], dtype=torch.float64), t), solver,
                       rtol=1e-8, atol=1e-10, **kw)
    assert sol.ys[0, 0, 0] == 1.0 and torch.isnan(sol.ys[1:, 0]).all()
    g, = torch.autograd.grad(sol.ys[-1, 1].sum(), a)
    solo = pb.solve(pb.ODEProblem(f, torch.tensor([[3.0]], dtype=torch.float64), t), solver, rtol=1e-8, atol=1e-10, **kw)
    g_solo, = torch.autograd.grad(solo.ys[-1, 0].sum(), a)
    torch.testing.assert_close(g, g_solo, rtol=1e-6, atol=0)


def test_raise_on_failure_names_sample_time_step_and_code():
    with pytest.raises(pb.SolveError, match=r"sample 0: DtLessThanMin at t=0\.7999\d*, dt=\d"):
        pb.solve(blowup_batch(), pb.Tsit5(), raise_on_failure=True)


# ---- invalid input: (call, exception, message) -------------------------------------------------
y0 = torch.ones(2, dtype=torch.float64)
t = torch.linspace(0, 1, 3, dtype=torch.float64)
ok = lambda t, y: -y
P = lambda **kw: pb.ODEProblem(kw.pop("f", ok), kw.pop("y0", y0), kw.pop("t", t), **kw)

CASES = [
    ("y0 not a tensor", lambda: P(y0=[1.0, 2.0]), TypeError, "y0 must be a torch.Tensor"),
    ("y0 integer", lambda: P(y0=torch.ones(2, dtype=torch.long)), TypeError, "y0 must have a floating-point dtype"),
    ("y0 nan", lambda: P(y0=torch.tensor([1.0, float("nan")])), ValueError, r"y0 has non-finite values \(1 of 2; first at index \(1,\)\)"),
    ("y0 inf", lambda: P(y0=torch.tensor([[1.0], [float("inf")]])), ValueError, "y0 has non-finite values"),
    ("t not monotonic", lambda: P(t=torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64)), ValueError, "t must be strictly increasing or strictly decreasing"),
    ("t repeated", lambda: P(t=torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)), ValueError, "strictly increasing"),
    # float64 times (NumPy's) for a float32 state: two of them are one float32 (the solve stood still)
    ("t collapses in y0's dtype", lambda: P(y0=torch.zeros(1), t=torch.tensor([100.0, 100.000001, 101.0], dtype=torch.float64)),
     ValueError, r"strictly decreasing \(per sample\) after rounding to y0's dtype torch.float32 \(t is torch.float64\)"),
    ("t overflows y0's dtype", lambda: P(y0=torch.zeros(1), t=torch.tensor([0.0, 1e300], dtype=torch.float64)),
     ValueError, "t overflows y0's dtype torch.float32"),
    ("t 3-d", lambda: P(t=torch.zeros(1, 1, 2)), ValueError, r"t must have shape \(T,\) or \(B, T\); got \(1, 1, 2\)"),
    ("t one point", lambda: P(t=torch.tensor([0.0], dtype=torch.float64)), ValueError, "t must hold at least two times"),
    ("t integer", lambda: P(t=torch.tensor([0, 1])), TypeError, "t must have a floating-point dtype; got torch.int64"),
    ("t rows mismatch", lambda: P(y0=torch.ones(3, 2), t=torch.ones(2, 4).cumsum(1)), ValueError, r"must have one row per sample: expected \(3, T\)"),
    ("t per-sample, unbatched", lambda: P(t=torch.ones(2, 3, dtype=torch.float64).cumsum(1)), ValueError, "gives per-sample times"),
    ("t device", lambda: P(t=torch.linspace(0, 1, 3, device="meta")), ValueError, "t is on device meta but y0 is on cpu"),
    ("t non-finite", lambda: P(t=torch.tensor([0.0, float("inf")], dtype=torch.float64)), ValueError, "t has non-finite values"),
    ("f not callable", lambda: P(f=3), TypeError, "f must be callable"),
    ("f returns list", lambda: pb.solve(P(f=lambda t, y: [1.0, 2.0])), TypeError, "f must return a torch.Tensor; got list"),
    ("f wrong shape", lambda: pb.solve(P(f=lambda t, y: torch.cat([y, y]))), ValueError, r"f returned shape \(4,\); expected \(2,\)"),
    ("f wrong dtype", lambda: pb.solve(P(f=lambda t, y: y.float())), TypeError, "f returned dtype torch.float32; expected torch.float64"),
    ("f wrong device", lambda: pb.solve(P(f=lambda t, y: torch.empty(2, dtype=torch.float64, device="meta"))), ValueError, "f returned a tensor on meta; expected cpu"),
    ("rtol negative", lambda: pb.solve(P(), rtol=-1e-3), ValueError, "rtol must be finite and >= 0; got -0.001"),
    ("atol negative tensor", lambda: pb.solve(P(), atol=torch.tensor([1e-6, -1.0], dtype=torch.float64)), ValueError, "atol must be finite and >= 0"),
    ("atol wrong shape", lambda: pb.solve(P(), atol=torch.ones(3, dtype=torch.float64)), ValueError, r"atol has shape \(3,\), which does not broadcast to y0's shape \(2,\)"),
    ("rtol wrong type", lambda: pb.solve(P(), rtol="tight"), TypeError, "rtol must be a float or a tensor; got str"),
    ("fixed step without dt", lambda: pb.solve(P(), pb.RK4()), ValueError, r"RK4\(\) with fixed steps needs a step size: pass dt="),
    ("adaptive without estimate", lambda: pb.solve(P(), pb.RK4(), adaptive=True), ValueError, "has no error estimate"),
    ("dt negative", lambda: pb.solve(P(), pb.Euler(), dt=-0.1), ValueError, "dt must be a positive finite number; got -0.1"),
    ("max_steps zero", lambda: pb.solve(P(), max_steps=0), ValueError, "max_steps must be an integer >= 1; got 0"),
    ("dtmin > dtmax", lambda: pb.solve(P(), dtmin=1.0, dtmax=0.1), ValueError, r"dtmin \(1.0\) must not exceed dtmax \(0.1\)"),
    ("unknown batch mode", lambda: pb.solve(P(), batch="vmap"), ValueError, "batch must be one of"),
    ("lockstep per-sample t", lambda: pb.solve(P(y0=torch.ones(2, 1), t=torch.ones(2, 3).cumsum(1)), batch="lockstep"), ValueError, "needs shared times"),
    ("solver not a solver", lambda: pb.solve(P(), "Tsit5"), TypeError, "solver must be a pybridge solver"),
    ("unknown engine", lambda: pb.solve(P(), engine="jax"), ValueError, "engine must be one of"),
    ("odeint unknown method", lambda: pb.odeint(ok, y0, t, method="dopri8"), ValueError, "odeint: unknown method 'dopri8'"),
    ("odeint unknown option", lambda: pb.odeint(ok, y0, t, options={"safety": 0.8}), ValueError, "odeint: unknown option 'safety'"),
    ("odeint zero tolerances", lambda: pb.odeint(ok, y0, t, rtol=0.0, atol=0.0), ValueError, "rtol and atol must not both be zero"),
]


@pytest.mark.parametrize("call,exc,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_invalid_input_raises_with_clear_message(call, exc, message):
    with pytest.raises(exc, match=message):
        call()


def test_numbers_of_any_kind_and_zero_tolerances():
    """max_steps and dtmax accept NumPy and 0-d tensor numbers; rtol = atol = 0 in an adaptive solve
    raises naming both (the error is relative to atol + rtol·|y|), where it used to fail at t = 0."""
    import numpy as np
    prob = pb.ODEProblem(lambda t, y: -y, torch.ones(2, 1, dtype=torch.float64),
                         torch.tensor([0.0, 1.0], dtype=torch.float64))
    ref = pb.solve(prob, pb.Tsit5(), dtmax=0.5, max_steps=100).ys
    for kw in (dict(dtmax=torch.tensor(0.5), max_steps=np.int64(100)), dict(dtmax=np.float32(0.5), max_steps=torch.tensor(100))):
        torch.testing.assert_close(pb.solve(prob, pb.Tsit5(), **kw).ys, ref, rtol=0, atol=0)
    for bad in (2.5, True, torch.tensor(3.0)):
        with pytest.raises(ValueError, match="max_steps must be an integer"):
            pb.solve(prob, pb.Tsit5(), max_steps=bad)
    with pytest.raises(ValueError, match="rtol and atol must not both be zero"):
        pb.solve(prob, pb.Tsit5(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="rtol and atol must not both be zero"):
        pb.solve(prob, pb.Tsit5(), rtol=0.0, atol=torch.tensor([0.0], dtype=torch.float64))
    pb.solve(prob, pb.RK4(), dt=0.1, rtol=0, atol=0)  # fixed steps judge nothing: allowed


def test_dtmin_bounds_the_automatic_first_step_and_dense_queries_stay_in_the_span():
    """As OrdinaryDiffEq: the automatic initial step is at least dtmin. sol(t) raises for t outside
    the solved span at either end (NaN is reserved for times past where a failed sample stopped)."""
    prob = pb.ODEProblem(lambda t, y: -y, torch.ones(1, 1, dtype=torch.float64),
                         torch.tensor([0.0, 1.0], dtype=torch.float64))
    free = pb.solve(prob, pb.Tsit5())
    assert float(free.trace.dt[0, 0]) < 0.2
    sol = pb.solve(prob, pb.Tsit5(), dtmin=0.2, dense=True)
    assert float(sol.trace.dt[0, 0]) >= 0.2
    for t_out, where in ((-0.1, "before"), (1.1, "after")):
        with pytest.raises(ValueError, match=f"t lies {where}"):
            sol(torch.tensor([t_out], dtype=torch.float64))


def test_fixed_steps_differentiate_the_save_times():
    """t requiring grad with fixed steps: the solve takes the general loop (the fixed loop's step grid
    is host numbers): dy(t1)/dt1 is the derivative of the last RK4 step in its length, f(y(t1)) up
    to the step's O(h^4) error, and the same with and without dense output."""
    t = torch.tensor([0.0, 1.0], dtype=torch.float64, requires_grad=True)
    grads = []
    for kw in (dict(dt=0.1), dict(dt=0.1, dense=True)):
        sol = pb.solve(pb.ODEProblem(lambda t, y: -y, torch.ones(2, 1, dtype=torch.float64), t), pb.RK4(), **kw)
        (g,) = torch.autograd.grad(sol.ys[-1].sum(), t)
        torch.testing.assert_close(g[1], -2 * sol.ys[-1, 0, 0].detach(), rtol=1e-4, atol=0)
        grads.append(g)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=0)
    # A save time that a step ends on (0.5 = 5·0.1 exactly; 0.3 is not 3·0.1 in binary) moves its
    # value along f there: it had a zero gradient. Adaptive steps too (the end, aimed at, once).
    for solver, kw in ((pb.RK4(), dict(dt=0.1)), (pb.RK4(), dict(dt=0.1, dense=True)), (pb.Tsit5(), dict())):
        t = torch.tensor([0.0, 0.3, 0.5, 1.0], dtype=torch.float64, requires_grad=True)
        sol = pb.solve(pb.ODEProblem(lambda t, y: -y, torch.ones(1, dtype=torch.float64), t), solver,
                       rtol=1e-10, atol=1e-12, **kw)
        (g,) = torch.autograd.grad(sol.ys[1:].sum(), t)
        torch.testing.assert_close(g[1:], -torch.exp(-t[1:].detach()), rtol=1e-4, atol=0)
