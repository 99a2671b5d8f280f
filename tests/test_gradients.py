"""gradcheck (float64) through every explicit method w.r.t. y0 and an nn.Module's parameters,
batched (both batch modes) and unbatched; the trace's eest is differentiable."""
import contextlib
import warnings
import pytest
import torch

import pybridge as pb
from pybridge.torch_engine import native_rk

FIXED = [pb.Euler, pb.Midpoint, pb.Heun, pb.RK4]
ADAPTIVE = [pb.BS3, pb.DP5, pb.Tsit5, pb.Vern7]
T = torch.linspace(0.0, 0.6, 3, dtype=torch.float64)


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).double()


def _y0(batched):
    torch.manual_seed(1)
    return torch.randn(2, 2, dtype=torch.float64) if batched else torch.randn(2, dtype=torch.float64)


def _check(solver, batched, batch, **kw):
    """gradcheck of ys w.r.t. (y0, W1, b1, W2, b2), the parameters fed in functionally."""
    net = _net()
    names = [n for n, _ in net.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in net.parameters()]
    y0 = _y0(batched).requires_grad_(True)

    def fn(y0, *ps):
        pdict = dict(zip(names, ps))
        f = lambda t, y: torch.func.functional_call(net, pdict, (y,))
        sol = pb.solve(pb.ODEProblem(f, y0, T, batched=batched), solver, batch=batch, **kw)
        assert sol.success
        return sol.ys

    assert torch.autograd.gradcheck(fn, (y0, *params), eps=1e-6, atol=1e-6, rtol=1e-5)


MODES = [(False, "independent"), (True, "independent"), (True, "lockstep")]


@pytest.mark.parametrize("batched,batch", MODES)
@pytest.mark.parametrize("cls", FIXED + ADAPTIVE, ids=lambda c: c.__name__)
def test_gradcheck_fixed_steps(cls, batched, batch):
    _check(cls(), batched, batch, dt=0.1, adaptive=False)


@pytest.mark.parametrize("batched,batch", MODES)
@pytest.mark.parametrize("cls", ADAPTIVE, ids=lambda c: c.__name__)
def test_gradcheck_adaptive(cls, batched, batch):
    # A loose tolerance and a given first step: a handful of steps whose sizes the controller
    # computes from detached error estimates; an eps=1e-6 perturbation does not change whether a
    # step is accepted, and dt's dependence on the inputs is cut, so ys is smooth in them.
    _check(cls(), batched, batch, rtol=1e-4, atol=1e-6, dt=0.05)


@pytest.mark.parametrize("batched,batch", MODES)
@pytest.mark.parametrize("cls", [pb.BS3, pb.Tsit5], ids=lambda c: c.__name__)
def test_gradcheck_differentiable_dt(cls, batched, batch):
    # With differentiable_dt the step sizes stay in the graph, so the gradient is that of the
    # solver's actual (step-size-dependent) map, which finite differences see too.
    _check(cls(), batched, batch, rtol=1e-4, atol=1e-6, dt=0.05, differentiable_dt=True)


def test_gradcheck_can_fail():
    """The check above detects a wrong gradient: a right-hand side with a corrupted backward."""

    class Bad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, y):
            return torch.sin(y)

        @staticmethod
        def backward(ctx, g):
            return g * 0.5  # wrong: should be g * cos(y)

    y0 = _y0(True).requires_grad_(True)

    def fn(y0):
        return pb.solve(pb.ODEProblem(lambda t, y: Bad.apply(y), y0, T), pb.Tsit5(), rtol=1e-4, atol=1e-6).ys

    assert not torch.autograd.gradcheck(fn, (y0,), eps=1e-6, atol=1e-6, rtol=1e-5, raise_exception=False)


EEST_MODES = MODES


@pytest.mark.parametrize("batched,batch", EEST_MODES)
@pytest.mark.parametrize("cls", ADAPTIVE, ids=lambda c: c.__name__)
def test_eest_gradient_finite_nonzero(cls, batched, batch):
    net = _net()
    # Samples of different sizes take different numbers of steps (the first finishes early).
    y0 = torch.tensor([[0.01, -0.02], [30.0, -20.0]], dtype=torch.float64) if batched else _y0(False)
    t = torch.linspace(0.0, 3.0, 3, dtype=torch.float64)
    sol = pb.solve(pb.ODEProblem(lambda t, y: 2 * net(y), y0, t, batched=batched), cls(), rtol=1e-6,
                   atol=1e-8, batch=batch)
    if batched and batch == "independent":
        n = sol.stats.naccept + sol.stats.nreject
        assert n[0] != n[1]
    eest = sol.trace.eest
    assert eest.requires_grad and torch.isfinite(eest).all()
    grads = torch.autograd.grad(eest.sum(), list(net.parameters()))
    assert all(torch.isfinite(g).all() for g in grads), grads
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_first_solve_under_inference_mode_does_not_break_later_gradients():
    """Method objects (coefficient tensors) are cached across solves: the first build happening
    under torch.inference_mode must not leave inference tensors that a later backward needs."""
    from pybridge.torch_engine.engine import _build_method
    _build_method.cache_clear()
    w = torch.tensor([[-0.5, 1.0], [-1.0, -0.3]], dtype=torch.float64, requires_grad=True)
    prob = lambda: pb.ODEProblem(lambda t, y: y @ w, torch.ones(3, 2, dtype=torch.float64),
                                 torch.tensor([0.0, 1.0], dtype=torch.float64))
    for solver in (pb.Tsit5(), pb.Rodas5P(), pb.Kvaerno5()):
        with torch.inference_mode():
            pb.solve(prob(), solver, rtol=1e-4, atol=1e-6)
        sol = pb.solve(prob(), solver, rtol=1e-4, atol=1e-6)
        g, = torch.autograd.grad(sol.ys[-1].sum(), w)
        assert torch.isfinite(g).all() and g.abs().sum() > 0


# (Adaptive lockstep is left out: there the diverging sample's error shrinks everyone's step.)
@pytest.mark.parametrize("batch,adaptive", [("independent", True), ("independent", False), ("lockstep", False)])
def test_a_diverging_sample_leaves_shared_parameter_gradients_finite(batch, adaptive):
    """y' = r·y² from y0 = 1e100 overflows in the first step's stages (y² = 1e200, then inf). Its overflowing steps (rejected, or the one that
    stops it) must not put NaN into the gradient of r, which every sample shares: without the loop's
    guard, the zero cotangent of a discarded step times its infinite partials is NaN."""
    def solve(y0, rate):
        prob = pb.ODEProblem(lambda t, y: rate * y * y, y0, torch.linspace(0.0, 2.0, 5, dtype=torch.float64))
        kw = dict(rtol=1e-6, atol=1e-8, dt=0.5) if adaptive else dict(adaptive=False, dt=0.05)
        with pytest.warns(RuntimeWarning) if y0.shape[0] == 3 else contextlib.nullcontext():
            return pb.solve(prob, pb.Tsit5(), batch=batch, **kw)

    rate = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    sol = solve(torch.tensor([[0.1], [1e100], [0.2]], dtype=torch.float64), rate)
    assert sol.retcode[1] != int(pb.ReturnCode.Success) and (sol.retcode[[0, 2]] == int(pb.ReturnCode.Success)).all()
    (grad,) = torch.autograd.grad(sol.ys[-1, [0, 2]].sum(), rate)
    assert torch.isfinite(grad) and grad > 0
    # The guard changes no value, count or code (compared on the same iteration: without gradients,
    # the native one would run, which agrees to rounding only).
    with torch.no_grad(), native_rk.torch_loop_only():
        plain = solve(torch.tensor([[0.1], [1e100], [0.2]], dtype=torch.float64), rate)
    torch.testing.assert_close(sol.ys.detach(), plain.ys, rtol=0, atol=0, equal_nan=True)
    assert sol.retcodes == plain.retcodes
    assert all(torch.equal(getattr(sol.stats, k), getattr(plain.stats, k)) for k in ("nfe", "naccept", "nreject"))
    if batch == "independent":  # each sample its own steps: the others' gradient is theirs alone
        alone = solve(torch.tensor([[0.1], [0.2]], dtype=torch.float64), rate)
        (grad_alone,) = torch.autograd.grad(alone.ys[-1].sum(), rate)
        torch.testing.assert_close(grad, grad_alone, rtol=1e-12, atol=0)


@pytest.mark.parametrize("method", ["BS3", "DP5", "Tsit5", "Vern7"])
@pytest.mark.parametrize("batch", ["independent", "lockstep"])
def test_a_sample_whose_last_stage_overflows_leaves_shared_gradients_finite(method, batch):
    """y' = p·exp(3y) from y0 = 1 blows up at t ≈ 0.017: a step can end on a finite y1 whose
    f(t1, y1) (Tsit5's and DP5's last stage, part of their error estimate) is infinite. That stage
    was left in the graph, so the gradient of p, which the samples share, was NaN."""
    def solve(y0, p):
        prob = pb.ODEProblem(lambda t, y: p * torch.exp(3 * y), y0, torch.tensor([0.0, 1.0], dtype=torch.float64))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return pb.solve(prob, getattr(pb, method)(), batch=batch)

    p = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    sol = solve(torch.tensor([[-3.0], [1.0]], dtype=torch.float64), p)
    assert sol.retcode[1] != int(pb.ReturnCode.Success)
    (grad,) = torch.autograd.grad(sol.ys[-1, 0].sum(), p)
    assert torch.isfinite(grad)
    with torch.no_grad():   # the guard changes no value or code
        plain = solve(torch.tensor([[-3.0], [1.0]], dtype=torch.float64), p)
    torch.testing.assert_close(sol.ys.detach(), plain.ys, rtol=0, atol=0, equal_nan=True)
    assert sol.retcodes == plain.retcodes
    if batch == "independent":
        (alone,) = torch.autograd.grad(solve(torch.tensor([[-3.0]], dtype=torch.float64), p).ys[-1].sum(), p)
        torch.testing.assert_close(grad, alone, rtol=1e-12, atol=0)


@pytest.mark.parametrize("method, kw", [
    ("Tsit5", dict(rtol=1e-6, atol=1e-8)),                     # general loop
    ("Tsit5", dict(adaptive=False, dt=0.05)),                   # fixed-step loop
    ("Rodas5P", dict(rtol=1e-6, atol=1e-8)),                    # stiff steps, general loop
])
def test_end_only_saves_equal_interpolated_saves(method, kw):
    """Save times (t0, t1): the end's value is the last state, not an interpolation of buffered
    steps. It must equal what the buffered path gives for the same end (a solve with one more save
    time in between takes the same steps), NaN for a sample that stopped early, and carry the same
    gradients."""
    rate = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([[0.1], [1e100], [0.2]], dtype=torch.float64)

    def solve(t):
        prob = pb.ODEProblem(lambda t, y: rate * y * y, y0, torch.tensor(t, dtype=torch.float64))
        with pytest.warns(RuntimeWarning):
            return pb.solve(prob, getattr(pb, method)(), **kw)

    ends, more = solve([0.0, 1.0]), solve([0.0, 0.4, 1.0])
    assert ends.ys.shape == (2, 3, 1)
    torch.testing.assert_close(ends.ys[-1], more.ys[-1], rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(ends.ys[-1, 1]).all() and torch.isfinite(ends.ys[-1, [0, 2]]).all()
    assert ends.retcodes == more.retcodes
    g_end = torch.autograd.grad(ends.ys[-1, [0, 2]].sum(), rate)[0]
    g_more = torch.autograd.grad(more.ys[-1, [0, 2]].sum(), rate)[0]
    torch.testing.assert_close(g_end, g_more, rtol=1e-14, atol=0)


@pytest.mark.parametrize("method, kw", [
    ("RK4", dict(adaptive=False, dt=0.01)),                      # fixed-step loop
    ("RK4", dict(adaptive=False, dt=0.01, dense=True)),          # general loop, fixed steps
    ("Midpoint", dict(adaptive=False, dt=0.01)),
    ("Tsit5", dict(adaptive=False, dt=0.01)),                    # FSAL, no error estimate
    ("Vern7", dict(rtol=1e-6, atol=1e-8)),                       # adaptive, f(t1, y1) not a stage
])
def test_a_finite_state_whose_derivative_overflows_ends_its_sample_cleanly(method, kw):
    """y' = a·y² from y0 = 2 reaches finite states (~1e170) whose y² overflows: f(t1, y1) = inf while
    y1 is finite. The next step starts from f(t1, y1), so such a step must not count; otherwise the
    stopped sample's later h = 0 steps form y + 0·inf = NaN and the gradient of the shared `a` is
    NaN. The other samples' gradient must be theirs alone."""
    a = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    t = torch.linspace(0, 1, 6, dtype=torch.float64)

    def solve(y0, blowing):
        f = lambda t, y: blowing * a * y * y - (1 - blowing) * a * y  # noqa: E731
        with pytest.warns(RuntimeWarning) if bool(blowing.any()) else contextlib.nullcontext():
            return pb.solve(pb.ODEProblem(f, y0, t), getattr(pb, method)(), **kw)

    y0 = torch.tensor([[1.0], [2.0], [1.0]], dtype=torch.float64)
    sol = solve(y0, torch.tensor([[0.0], [1.0], [0.0]], dtype=torch.float64))
    assert sol.retcodes[1] != pb.ReturnCode.Success and sol.retcode[[0, 2]].eq(int(pb.ReturnCode.Success)).all()
    (grad,) = torch.autograd.grad(sol.ys[:, [0, 2]].sum(), a)
    alone = solve(y0[[0, 2]], torch.zeros(2, 1, dtype=torch.float64))
    (grad_alone,) = torch.autograd.grad(alone.ys.sum(), a)
    torch.testing.assert_close(grad, grad_alone, rtol=1e-12, atol=0)
    assert torch.isfinite(sol.ys[:, 1]).any()  # it kept its values up to the failure


def test_a_stopped_sample_is_not_evaluated_past_its_own_time():
    """A fixed-step sample stopped at t = 0.4 (its forcing sqrt(0.4 − t) is NaN beyond) steps on with
    h = 0 at its own time, not at the grid's later times, in both loops: its f stays finite there and
    the shared parameter's gradient equals that of the other samples alone."""
    a = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    t = torch.linspace(0, 1, 6, dtype=torch.float64)

    def solve(y0, forced, dense):
        def f(t, y):
            forcing = torch.sqrt(0.4 - t)[:, None]
            return -a * y + torch.where(forced, forcing, torch.zeros_like(forcing))
        with pytest.warns(RuntimeWarning) if bool(forced.any()) else contextlib.nullcontext():
            return pb.solve(pb.ODEProblem(f, y0, t), pb.RK4(), dt=0.05, dense=dense)

    for dense in (False, True):
        sol = solve(torch.ones(3, 1, dtype=torch.float64), torch.tensor([[False], [True], [False]]), dense)
        assert sol.retcodes[1] == pb.ReturnCode.Unstable
        (grad,) = torch.autograd.grad(sol.ys[:, [0, 2]].sum(), a)
        alone = solve(torch.ones(2, 1, dtype=torch.float64), torch.tensor([[False], [False]]), dense)
        (grad_alone,) = torch.autograd.grad(alone.ys.sum(), a)
        torch.testing.assert_close(grad, grad_alone, rtol=1e-12, atol=0)
