"""Terminal events: solve(..., event=g), pb.odeint(event_fn=...) and pb.odeint_event."""
import math
import warnings

import pytest
import torch

import pybridge as pb
from pybridge import ReturnCode as RC

G = 9.81
D = torch.float64


def fall(t, y):
    """y = (height, velocity) under gravity: height h0 − G t²/2 from rest."""
    return torch.stack([y[..., 1], torch.full_like(y[..., 1], -G)], -1)


def drop(h0):
    return torch.stack([h0, torch.zeros_like(h0)], -1)


def landing(h0, c=0.0):
    """When height h0 − G t²/2 reaches c."""
    return torch.sqrt(2 * (h0 - c) / G)


SOLVERS = [pb.Tsit5(), pb.DP5(), pb.BS3(), pb.Vern7(), pb.Rodas5P(), pb.Kvaerno5(), pb.AutoTsit5(pb.Rosenbrock23())]


@pytest.mark.parametrize("batch", ["independent", "lockstep"])
@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: repr(s))
def test_each_sample_stops_at_its_own_event(solver, batch):
    h0 = torch.tensor([1.0, 2.0, 5.0, 40.0], dtype=D)   # the last one does not land before t = 2
    t = torch.linspace(0, 2, 11, dtype=D)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)   # a terminated sample is no failure: no warning
        sol = pb.solve(pb.ODEProblem(fall, drop(h0), t), solver, rtol=1e-8, atol=1e-10, batch=batch,
                       event=lambda t, y: y[:, 0])
    assert sol.retcode.tolist() == [RC.Terminated] * 3 + [RC.Success] and sol.success
    torch.testing.assert_close(sol.event_t[:3], landing(h0[:3]), rtol=0, atol=1e-12)
    torch.testing.assert_close(sol.event_y[:3, 0], torch.zeros(3, dtype=D), rtol=0, atol=1e-12)
    torch.testing.assert_close(sol.event_y[:3, 1], -G * landing(h0[:3]), rtol=0, atol=1e-10)
    assert torch.isnan(sol.event_t[3]) and torch.isnan(sol.event_y[3]).all()
    # Values up to the event are kept (the exact parabola), later ones are NaN, as after a failure.
    before = t[:, None] <= sol.event_t.nan_to_num(nan=math.inf)[None, :]
    exact = h0[None, :] - G * t[:, None] ** 2 / 2
    torch.testing.assert_close(sol.ys[..., 0][before], exact[before], rtol=0, atol=1e-7)
    assert torch.isnan(sol.ys[..., 0][~before]).all() and (~before).sum() == 8 + 7 + 5


def test_an_event_that_never_fires_changes_nothing():
    h0 = torch.tensor([1.0, 2.0], dtype=D)
    prob = pb.ODEProblem(fall, drop(h0), torch.linspace(0, 0.3, 7, dtype=D))
    plain = pb.solve(prob, pb.Tsit5(), rtol=1e-6)
    watched = pb.solve(prob, pb.Tsit5(), rtol=1e-6, event=lambda t, y: y[:, 0] + 100)
    assert torch.equal(plain.ys, watched.ys) and torch.equal(plain.stats.nfe, watched.stats.nfe)
    assert watched.retcode.tolist() == [RC.Success] * 2 and torch.isnan(watched.event_t).all()
    assert plain.event_t is None


@pytest.mark.parametrize("direction, expected", [(0, math.pi), (-1, math.pi), (1, 2 * math.pi)])
def test_direction_picks_the_crossing(direction, expected):
    """y = sin t, starting at t = 0.5 (y > 0): down through zero at π, up at 2π."""
    rot = lambda t, y: torch.stack([y[..., 1], -y[..., 0]], -1)  # noqa: E731  (sin, cos)
    y0 = torch.tensor([[math.sin(0.5), math.cos(0.5)]], dtype=D)
    sol = pb.solve(pb.ODEProblem(rot, y0, torch.tensor([0.5, 10.0], dtype=D)), pb.Vern7(), rtol=1e-10,
                   atol=1e-12, event=lambda t, y: y[:, 0], event_direction=direction)
    assert abs(float(sol.event_t[0]) - expected) < 1e-9


def test_several_event_values_stop_at_the_first_crossing():
    h0 = torch.tensor([1.0, 2.0], dtype=D)
    event = lambda t, y: torch.stack([y[:, 0] - 0.5, t - 0.3], -1)  # noqa: E731  (height 0.5, or t = 0.3)
    sol = pb.solve(pb.ODEProblem(fall, drop(h0), torch.tensor([0.0, 2.0], dtype=D)), pb.Tsit5(), rtol=1e-9,
                   atol=1e-11, event=event)
    # sample 0 reaches height 0.5 at 0.319 > 0.3: the clock fires first; sample 1 at 0.553: the clock too
    torch.testing.assert_close(sol.event_t, torch.tensor([0.3, 0.3], dtype=D), rtol=0, atol=1e-13)
    sol = pb.solve(pb.ODEProblem(fall, drop(h0), torch.tensor([0.0, 2.0], dtype=D)), pb.Tsit5(), rtol=1e-9,
                   atol=1e-11, event=lambda t, y: torch.stack([y[:, 0] - 0.5, t - 0.5], -1))
    torch.testing.assert_close(sol.event_t, torch.stack([landing(h0[0], 0.5), torch.tensor(0.5, dtype=D)]),
                               rtol=0, atol=1e-11)


@pytest.mark.parametrize("batch", ["independent", "lockstep"])
@pytest.mark.parametrize("solver", [pb.Tsit5(), pb.Vern7(), pb.Rodas5P()], ids=lambda s: repr(s))
def test_gradients_of_the_event_time_and_state(solver, batch):
    """t* = √(2(h0 − c)/G): dt*/dh0 = 1/√(2G(h0 − c)) = −dt*/dc; v(t*) = −G t*."""
    h0 = torch.tensor([1.0, 2.0, 5.0], dtype=D, requires_grad=True)
    c = torch.tensor(0.3, dtype=D, requires_grad=True)
    sol = pb.solve(pb.ODEProblem(fall, drop(h0), torch.tensor([0.0, 2.0], dtype=D)), solver, rtol=1e-8,
                   atol=1e-10, batch=batch, event=lambda t, y: y[:, 0] - c)
    dh0, dc = torch.autograd.grad(sol.event_t.sum(), (h0, c), retain_graph=True)
    slope = 1 / torch.sqrt(2 * G * (h0.detach() - c.detach()))
    torch.testing.assert_close(dh0, slope, rtol=1e-9, atol=0)
    torch.testing.assert_close(dc, -slope.sum(), rtol=1e-9, atol=0)
    dv, = torch.autograd.grad(sol.event_y[:, 1].sum(), h0)
    torch.testing.assert_close(dv, -G * slope, rtol=1e-9, atol=0)


def test_gradcheck_through_the_event():
    """float64 gradcheck of (event_t, event_y) in y0 and in a parameter of g that also uses t."""
    t = torch.tensor([0.0, 2.0], dtype=D)

    def event_of(h0, c):
        sol = pb.solve(pb.ODEProblem(fall, drop(h0), t), pb.Tsit5(), rtol=1e-11, atol=1e-13,
                       event=lambda t, y: y[:, 0] - c * t)
        return sol.event_t, sol.event_y

    args = (torch.tensor([1.0, 2.0], dtype=D, requires_grad=True), torch.tensor(0.3, dtype=D, requires_grad=True))
    assert torch.autograd.gradcheck(event_of, args)


@pytest.mark.parametrize("solver", [pb.Tsit5(), pb.Vern7()], ids=repr)
def test_gradients_with_respect_to_the_start_time_and_through_differentiable_dt(solver):
    """Autonomous: moving t0 moves the event by as much (d t*/d t0 = 1, the state there unchanged);
    with differentiable_dt the step sizes carry gradients, and the event's must stay exact."""
    h0 = torch.tensor([1.0, 2.0], dtype=D, requires_grad=True)
    t = torch.tensor([0.5, 3.0], dtype=D, requires_grad=True)
    sol = pb.solve(pb.ODEProblem(fall, drop(h0), t), solver, rtol=1e-9, atol=1e-11,
                   event=lambda t, y: y[:, 0], differentiable_dt=True)
    d_t, d_h0 = torch.autograd.grad(sol.event_t.sum(), (t, h0), retain_graph=True)
    torch.testing.assert_close(d_t, torch.tensor([2.0, 0.0], dtype=D), rtol=0, atol=1e-9)
    torch.testing.assert_close(d_h0, 1 / torch.sqrt(2 * G * h0.detach()), rtol=1e-9, atol=0)
    d_t, = torch.autograd.grad(sol.event_y.sum(), t)
    torch.testing.assert_close(d_t, torch.zeros(2, dtype=D), rtol=0, atol=1e-8)


@pytest.mark.parametrize("solver", [pb.Tsit5(), pb.Vern7(), pb.Rodas5P()], ids=repr)
def test_a_nan_in_another_sample_stays_out_of_the_shared_gradients(solver):
    """Sample 1 never fires: its g is NaN (a √ of a negative), or its f turns NaN (it fails). Sample
    0's event time must keep its exact gradient in k, shared by both."""
    k = torch.tensor(1.0, dtype=D, requires_grad=True)
    t = torch.tensor([0.0, 2.0], dtype=D)
    exact = math.log(0.7) / k.detach() ** 2      # y = e^(−kt) reaches 0.7 at t* = −ln 0.7 / k

    def f_nan_late(t, y):   # sample 1 fails at t > 0.1, before sample 0's event
        return torch.where((torch.arange(2) == 1)[:, None] & (t[:, None] > 0.1), torch.nan, -k * y)
    cases = [(lambda t, y: -k * y, lambda t, y: torch.sqrt(y[:, 0] - torch.tensor([0.0, 5.0], dtype=D)) - 0.7 ** 0.5),
             (f_nan_late, lambda t, y: y[:, 0] - 0.7)]
    for f, event in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            sol = pb.solve(pb.ODEProblem(f, torch.ones(2, 1, dtype=D), t), solver, rtol=1e-10, atol=1e-12,
                           event=event)
        assert int(sol.retcode[0]) == RC.Terminated
        dk, = torch.autograd.grad(sol.event_t[0], k)
        torch.testing.assert_close(dk, exact, rtol=1e-6, atol=0)


def test_edge_events_at_the_end_infinite_and_turning_nan():
    one = torch.ones(1, 1, dtype=D)
    # an event exactly at the end time keeps the end's value (T = 2 takes the end-only path)
    for T in (2, 3):
        sol = pb.solve(pb.ODEProblem(lambda t, y: torch.ones_like(y), 0 * one, torch.linspace(0, 1, T, dtype=D)),
                       pb.Tsit5(), event=lambda t, y: t - 1)
        assert int(sol.retcode[0]) == RC.Terminated and abs(float(sol.ys[-1, 0, 0]) - 1) < 1e-12
    # g jumping to ±inf at the crossing: located, finite, gradient-free
    y0 = one.clone().requires_grad_(True)
    sol = pb.solve(pb.ODEProblem(lambda t, y: -y, y0, torch.tensor([0.0, 2.0], dtype=D)), pb.Tsit5(), rtol=1e-9,
                   atol=1e-11, event=lambda t, y: torch.sign(y[:, 0] - 0.7) * torch.inf)
    assert abs(float(sol.event_t[0]) + math.log(0.7)) < 1e-8 and torch.isfinite(sol.event_y).all()
    # g that turns NaN past the surface (√height) fires where it does, as torchdiffeq's sign test
    sol = pb.solve(pb.ODEProblem(fall, drop(torch.tensor([2.0], dtype=D)), torch.tensor([0.0, 2.0], dtype=D)),
                   pb.Tsit5(), rtol=1e-9, atol=1e-11, event=lambda t, y: torch.sqrt(y[:, 0]))
    torch.testing.assert_close(sol.event_t, landing(torch.tensor([2.0], dtype=D)), rtol=0, atol=1e-9)


def test_backwards_in_time_and_per_sample_times():
    """Backwards from t = 0: height 1 + ... reaches 0 at −t*; per-sample spans."""
    h0 = torch.tensor([1.0, 3.0], dtype=D)
    back = pb.solve(pb.ODEProblem(fall, drop(h0), torch.tensor([0.0, -2.0], dtype=D)), pb.Tsit5(), rtol=1e-9,
                    atol=1e-11, event=lambda t, y: y[:, 0])
    torch.testing.assert_close(back.event_t, -landing(h0), rtol=0, atol=1e-11)
    t = torch.tensor([[0.0, 0.2, 2.0], [1.0, 1.2, 3.0]], dtype=D)   # sample 1 starts at t = 1
    per = pb.solve(pb.ODEProblem(fall, drop(h0), t), pb.Tsit5(), rtol=1e-9, atol=1e-11,
                   event=lambda t, y: y[:, 0])
    torch.testing.assert_close(per.event_t, t[:, 0] + landing(h0), rtol=0, atol=1e-11)


def test_dense_output_ends_at_the_event():
    h0 = torch.tensor([1.0, 5.0], dtype=D)
    sol = pb.solve(pb.ODEProblem(fall, drop(h0), torch.tensor([0.0, 2.0], dtype=D)), pb.Tsit5(), rtol=1e-9,
                   atol=1e-11, dense=True, event=lambda t, y: y[:, 0])
    t_land = landing(h0)
    q = torch.stack([0.9 * t_land, 1.01 * t_land], 1)          # (B, 2): just before and just after
    vals = sol(q)[..., 0]
    torch.testing.assert_close(vals[0], h0 - G * q[:, 0] ** 2 / 2, rtol=0, atol=1e-9)
    assert torch.isnan(vals[1]).all()
    torch.testing.assert_close(sol.extras["t_final"], t_land, rtol=0, atol=1e-12)


def test_a_failing_sample_and_a_terminated_one_keep_their_own_codes():
    h0 = torch.tensor([1.0, 2.0, 5.0], dtype=D)

    def f(t, y):   # sample 2's f is NaN after t = 0.2
        out = fall(t, y)
        return torch.where((torch.arange(3) == 2)[:, None] & (t[:, None] > 0.2), torch.nan, out)
    with pytest.warns(RuntimeWarning, match="1 of 3 samples did not succeed: sample 2: Unstable"):
        sol = pb.solve(pb.ODEProblem(f, drop(h0), torch.tensor([0.0, 2.0], dtype=D)), pb.Tsit5(), rtol=1e-9,
                       atol=1e-11, event=lambda t, y: y[:, 0])
    assert sol.retcode.tolist() == [RC.Terminated, RC.Terminated, RC.Unstable]
    torch.testing.assert_close(sol.event_t[:2], landing(h0[:2]), rtol=0, atol=1e-11)


def test_without_gradients_and_compiled_the_same_event():
    h0 = torch.tensor([1.0, 2.0], dtype=D)
    prob = pb.ODEProblem(fall, drop(h0), torch.linspace(0, 2, 5, dtype=D))
    kw = dict(rtol=1e-8, atol=1e-10, event=lambda t, y: y[:, 0])
    ref = pb.solve(prob, pb.Tsit5(), **kw)
    with torch.no_grad():
        quiet = pb.solve(prob, pb.Tsit5(), **kw)
    compiled = pb.solve(prob, pb.Tsit5(), compile=True, **kw)
    for other, tol in ((quiet, 0.0), (compiled, 1e-12)):   # (a compiled graph may round differently)
        torch.testing.assert_close(other.event_t, ref.event_t, rtol=0, atol=tol)
        torch.testing.assert_close(other.ys, ref.ys, rtol=0, atol=tol, equal_nan=True)


def test_fixed_steps_locate_the_event_on_the_interpolant():
    h0 = torch.tensor([1.0, 2.0], dtype=D)
    sol = pb.solve(pb.ODEProblem(fall, drop(h0), torch.tensor([0.0, 2.0], dtype=D)), pb.RK4(), dt=0.05,
                   event=lambda t, y: y[:, 0])
    # RK4 is exact on a parabola; its Hermite interpolant too (a cubic)
    torch.testing.assert_close(sol.event_t, landing(h0), rtol=0, atol=1e-12)


EVENT = lambda t, y: y[:, 0]  # noqa: E731


@pytest.mark.parametrize("kwargs, exc, message", [
    (dict(event=3.0), TypeError, "event must be callable"),
    (dict(event=EVENT, event_direction=2), ValueError, "event_direction must be 0"),
    (dict(event=EVENT, event_direction=True), ValueError, "event_direction must be 0"),
    (dict(event=EVENT, engine="julia"), ValueError, "event= is available on the torch engine only"),
    (dict(event=EVENT, adjoint=pb.BacksolveAdjoint()), ValueError, "event= needs gradients by backpropagation"),
    (dict(event=EVENT, local_regularizer="unbiased"), ValueError, "cannot be combined"),
    (dict(event=lambda t, y: y[:1, 0]), ValueError, r"event returned shape \(1,\); expected \(B,\) or \(B, m\) with B = 2"),
    (dict(event=lambda t, y: float(y[0, 0])), TypeError, "event must return a torch.Tensor"),
    (dict(event=lambda t, y: (y[:, 0] > 0).long()), TypeError, "event returned dtype torch.int64; expected torch.float64"),
    (dict(event=lambda t, y: y[:, 0].float()), TypeError, "event returned dtype torch.float32; expected torch.float64"),
])
def test_bad_event_arguments(kwargs, exc, message):
    prob = pb.ODEProblem(fall, drop(torch.tensor([1.0, 2.0], dtype=D)), torch.tensor([0.0, 2.0], dtype=D))
    with pytest.raises(exc, match=message):
        pb.solve(prob, pb.Tsit5(), **kwargs)


def test_sde_refuses_an_event():
    prob = pb.SDEProblem(lambda t, y: -y, lambda t, y: 0.1 * y, torch.ones(2, 1, dtype=D),
                         torch.tensor([0.0, 1.0], dtype=D))
    with pytest.raises(ValueError, match="event= is available for ODEProblems only"):
        pb.solve(prob, pb.EM(), dt=0.1, event=lambda t, y: y[:, 0])


class Ball(torch.nn.Module):
    def forward(self, t, y):
        return torch.stack([y[1], -G * torch.ones_like(y[1])])


def test_odeint_event_as_torchdiffeq_with_exact_gradients():
    torchdiffeq = pytest.importorskip("torchdiffeq")
    h0 = torch.tensor(3.0, dtype=D, requires_grad=True)
    y0 = torch.stack([h0, torch.tensor(0.0, dtype=D)])
    t0 = torch.tensor(0.0, dtype=D)
    ours_t, ours = pb.odeint_event(Ball(), y0, t0, event_fn=lambda t, y: y[0], rtol=1e-9, atol=1e-11)
    theirs_t, theirs = torchdiffeq.odeint_event(Ball(), y0, t0, event_fn=lambda t, y: y[0], rtol=1e-9, atol=1e-11)
    assert ours.shape == theirs.shape == (2, 2)
    torch.testing.assert_close(ours_t, theirs_t, rtol=0, atol=1e-9)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-8)
    d_ours, = torch.autograd.grad(ours_t, h0)
    torch.testing.assert_close(d_ours, 1 / torch.sqrt(2 * G * h0.detach()), rtol=1e-10, atol=0)
    # backwards in time: from rest at height 0, it was at height 1 at −√(2/G)
    back_t, _ = pb.odeint_event(Ball(), torch.zeros(2, dtype=D), t0, event_fn=lambda t, y: y[0] + 1,
                                reverse_time=True)
    assert abs(float(back_t) + math.sqrt(2 / G)) < 1e-6


def test_odeint_with_event_fn_tuples_and_refusals():
    t = torch.tensor([0.0, 1.0], dtype=D)
    y0 = torch.tensor([3.0, 0.0], dtype=D)
    event_t, sol = pb.odeint(Ball(), y0, t, event_fn=lambda t, y: y[0], rtol=1e-9, atol=1e-11)
    assert abs(float(event_t) - math.sqrt(6 / G)) < 1e-9 and sol.shape == (2, 2)
    f2 = lambda t, s: (s[1], -G * torch.ones_like(s[1]))  # noqa: E731
    event_t, (h, v) = pb.odeint(f2, (y0[:1], y0[1:]), t, event_fn=lambda t, s: s[0], rtol=1e-9, atol=1e-11)
    assert abs(float(event_t) - math.sqrt(6 / G)) < 1e-9 and h.shape == v.shape == (2, 1)
    at_start_t, at_start = pb.odeint(Ball(), y0, t, event_fn=lambda t, y: y[0] - 3.0)   # as torchdiffeq
    assert float(at_start_t) == 0.0 and torch.equal(at_start, torch.stack([y0, y0]))
    with pytest.raises(ValueError, match="needs options=\\{'step_size'"):
        pb.odeint(Ball(), y0, t, event_fn=lambda t, y: y[0], method="rk4")
    event_t, _ = pb.odeint(Ball(), y0, t, event_fn=lambda t, y: y[0], method="rk4", options={"step_size": 0.1})
    assert abs(float(event_t) - math.sqrt(6 / G)) < 1e-12
    with pytest.raises(pb.SolveError, match="MaxIters"):   # no event: the step budget ends it
        pb.odeint(Ball(), y0, t, event_fn=lambda t, y: y[0] + 1e300, options={"max_num_steps": 50})


class ParamBall(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.g = torch.nn.Parameter(torch.tensor(G, dtype=D))

    def forward(self, t, y):
        return torch.stack([y[1], -self.g * torch.ones_like(y[1])])


@pytest.mark.parametrize("interface", ["odeint", "odeint_adjoint"])
def test_odeint_event_gradients_through_either_interface(interface):
    """Height h0 − g t²/2 reaches 0.5 at t* = √(2(h0 − 0.5)/g), with speed v* = −√(2g(h0 − 0.5)):
    d(t* + v*)/dh0 and d(t* + v*)/dg, analytic. Through odeint_adjoint the state at t* comes from
    the continuous adjoint and the event time is linked at the end (torchdiffeq's bouncing-ball way)."""
    ball = ParamBall()
    h0 = torch.tensor(3.0, dtype=D, requires_grad=True)
    event_t, sol = pb.odeint_event(ball, torch.stack([h0, torch.tensor(0.0, dtype=D)]), torch.tensor(0.0, dtype=D),
                                   event_fn=lambda t, y: y[0] - 0.5, odeint_interface=getattr(pb, interface),
                                   rtol=1e-10, atol=1e-12)
    (event_t + sol[-1, 1]).backward()
    drop_h = 2.5
    t_star = math.sqrt(2 * drop_h / G)
    assert abs(float(event_t) - t_star) < 1e-9
    assert abs(float(h0.grad) - (1 - G) / math.sqrt(2 * G * drop_h)) < 1e-8
    assert abs(float(ball.g.grad) - (-0.5 * t_star / G - math.sqrt(drop_h / (2 * G)))) < 1e-8


def test_training_a_rate_to_hit_a_target_event_time():
    """y' = −k y from y0 = 1 reaches 1/2 at ln 2 / k: gradient descent on (t* − 1)² finds k = ln 2."""
    k = torch.nn.Parameter(torch.tensor(3.0, dtype=D))
    opt = torch.optim.Adam([k], lr=0.1)
    prob = pb.ODEProblem(lambda t, y: -k * y, torch.ones(4, 1, dtype=D), torch.tensor([0.0, 10.0], dtype=D))
    for _ in range(120):
        opt.zero_grad()
        sol = pb.solve(prob, pb.Tsit5(), rtol=1e-8, atol=1e-10, event=lambda t, y: y[:, 0] - 0.5)
        loss = (sol.event_t - 1.0).square().mean()
        loss.backward()
        opt.step()
    assert abs(float(k) - math.log(2)) < 1e-3
