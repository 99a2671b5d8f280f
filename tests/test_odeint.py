"""pb.odeint is a drop-in for torchdiffeq.odeint: same results (to tolerance), shapes, tuple
states and gradients."""
import warnings
import pytest
import torch

import pybridge as pb

tdq = pytest.importorskip("torchdiffeq", reason="torchdiffeq is not installed")

T = torch.linspace(0.0, 2.0, 5, dtype=torch.float64)


class Lotka(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.tensor([1.5, 1.0, 3.0, 1.0], dtype=torch.float64))

    def forward(self, t, y):
        a, b, c, d = self.p
        x, z = y[..., 0], y[..., 1]
        return torch.stack([a * x - b * x * z, -c * z + d * x * z], -1)


Y0 = torch.tensor([1.0, 1.0], dtype=torch.float64)
ADAPTIVE = [("dopri5", 1e-7), ("bosh3", 1e-5), ("tsit5", 1e-5)]
FIXED = [("rk4", 2e-5), ("euler", 1e-12), ("midpoint", 1e-12)]


@pytest.mark.parametrize("method,tol", ADAPTIVE)
def test_adaptive_agrees_with_torchdiffeq(method, tol):
    f = Lotka()
    ours = pb.odeint(f, Y0, T, rtol=1e-8, atol=1e-10, method=method)
    assert ours.shape == (5, 2)
    if method != "tsit5":  # torchdiffeq 0.2.5 has no tsit5: compare it with the reference only
        ref = tdq.odeint(f, Y0, T, rtol=1e-8, atol=1e-10, method=method)
        torch.testing.assert_close(ours, ref, rtol=0, atol=tol)
    exact = tdq.odeint(f, Y0, T, rtol=1e-12, atol=1e-12, method="dopri8")
    torch.testing.assert_close(ours, exact, rtol=0, atol=tol)


@pytest.mark.parametrize("method,tol", FIXED)
def test_fixed_agrees_with_torchdiffeq(method, tol):
    f = Lotka()
    ours = pb.odeint(f, Y0, T, method=method, options={"step_size": 0.05})
    ref = tdq.odeint(f, Y0, T, method=method, options={"step_size": 0.05})
    # Same steps: euler/midpoint agree to rounding; torchdiffeq's rk4 is the 3/8-rule variant,
    # pybridge's the classical one, so they agree to the O(h^4) truncation error only.
    torch.testing.assert_close(ours, ref, rtol=0, atol=tol)


def test_output_shapes():
    f = lambda t, y: -y * (1 + t)
    for shape in [(3,), (2, 3), (2, 2, 3)]:
        y0 = torch.ones(shape, dtype=torch.float64)
        ys = pb.odeint(f, y0, T)
        assert ys.shape == (5,) + shape
        torch.testing.assert_close(ys, tdq.odeint(f, y0, T), rtol=1e-5, atol=1e-6)


def test_tuple_state():
    def f(t, state):
        x, v = state
        return v, -x

    y0 = (torch.tensor([1.0, 0.5], dtype=torch.float64), torch.zeros(2, 1, dtype=torch.float64)[:, 0])
    y0 = (torch.tensor([1.0, 0.5], dtype=torch.float64), torch.tensor([0.0, 0.1], dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # (it warned that dopri5 ignores an option no one passed)
        ours = pb.odeint(f, y0, T, rtol=1e-9, atol=1e-11)
    ref = tdq.odeint(f, y0, T, rtol=1e-9, atol=1e-11)
    assert isinstance(ours, tuple) and len(ours) == 2
    for o, r in zip(ours, ref):
        assert o.shape == (5, 2)
        torch.testing.assert_close(o, r, rtol=0, atol=1e-7)
    torch.testing.assert_close(ours[0][:, 0], torch.cos(T), rtol=0, atol=1e-7)


@pytest.mark.parametrize("method,kw,tol", [
    ("dopri5", dict(rtol=1e-9, atol=1e-11), 1e-6),
    ("rk4", dict(options={"step_size": 0.05}), 5e-5),
    ("euler", dict(options={"step_size": 0.05}), 1e-10),
])
def test_gradients_match_torchdiffeq(method, kw, tol):
    grads = []
    for odeint in (pb.odeint, tdq.odeint):
        f = Lotka()
        y0 = Y0.clone().requires_grad_(True)
        ys = odeint(f, y0, T, method=method, **kw)
        loss = (ys[-1] ** 2).sum() + ys[2].sum()
        grads.append(torch.autograd.grad(loss, [y0, f.p]))
    for a, b in zip(*grads):
        assert torch.isfinite(a).all() and a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_torchdiffeq_calls_that_a_switching_user_makes():
    """method=None, fixed-step methods without a step size (one step per interval of t), torchdiffeq's
    name "heun2", max_num_steps per interval of t, a failed solve raising, and t of length 1."""
    f = Lotka()
    torch.testing.assert_close(pb.odeint(f, Y0, T, method=None), pb.odeint(f, Y0, T, method="dopri5"), rtol=0, atol=0)
    t_uneven = torch.tensor([0.0, 0.1, 0.35, 0.4, 1.0], dtype=torch.float64)
    for method in ("euler", "midpoint", "heun2"):
        torch.testing.assert_close(pb.odeint(f, Y0, t_uneven, method=method),
                                   tdq.odeint(f, Y0, t_uneven, method=method), rtol=0, atol=1e-13)
    opts = {"step_size": 0.05}
    torch.testing.assert_close(pb.odeint(f, Y0, T, method="heun2", options=opts),
                               tdq.odeint(f, Y0, T, method="heun2", options=opts), rtol=0, atol=1e-13)
    # torchdiffeq bounds the steps of each interval of t: 40 intervals of a few steps each pass.
    t_fine = torch.linspace(0.0, 2.0, 41, dtype=torch.float64)
    assert tdq.odeint(f, Y0, t_fine, options={"max_num_steps": 4}).shape == (41, 2)
    assert torch.isfinite(pb.odeint(f, Y0, t_fine, options={"max_num_steps": 4})).all()
    with pytest.raises(RuntimeError, match="MaxIters"):  # torchdiffeq raises too (AssertionError)
        pb.odeint(f, Y0, T[[0, -1]], options={"max_num_steps": 3})
    assert pb.odeint(f, Y0, T[:1]).shape == (1, 2) and torch.equal(pb.odeint(f, Y0, T[:1])[0], Y0)


@pytest.mark.parametrize("method,kw,tol", [
    ("dopri5", dict(rtol=1e-9, atol=1e-11), 1e-6),
    ("dopri5", dict(rtol=1e-6, atol=1e-8, adjoint_rtol=1e-10, adjoint_atol=1e-12,
                    adjoint_options={"norm": "seminorm"}), 5e-4),   # each ~1e-4 off the exact gradient
    ("rk4", dict(options={"step_size": 0.05}), 3e-3),   # each ~1e-3 off (torchdiffeq's rk4: the 3/8 rule)
])
def test_odeint_adjoint_matches_torchdiffeq(method, kw, tol):
    """`from pybridge import odeint_adjoint as odeint` in place of torchdiffeq's: the same
    backsolve adjoint, its own backward tolerances and the seminorm option."""
    grads = []
    for odeint_adjoint in (pb.odeint_adjoint, tdq.odeint_adjoint):
        f = Lotka()
        y0 = Y0.clone().requires_grad_(True)
        ys = odeint_adjoint(f, y0, T, method=method, **kw)
        loss = (ys[-1] ** 2).sum() + ys[2].sum()
        grads.append(torch.autograd.grad(loss, [y0, f.p]))
    for a, b in zip(*grads):
        assert torch.isfinite(a).all() and a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_odeint_adjoint_options_and_tuple_states():
    f = Lotka()
    y0 = Y0.clone().requires_grad_(True)
    # With a tight forward solve, the backward tolerances set the gradient's error.
    exact = torch.autograd.grad(pb.odeint(f, y0, T, rtol=1e-12, atol=1e-12)[-1].sum(), f.p)[0]
    errs = [(torch.autograd.grad(pb.odeint_adjoint(f, y0, T, rtol=1e-11, atol=1e-12, adjoint_rtol=r,
                                                   adjoint_atol=r * 1e-2)[-1].sum(), f.p)[0] - exact).abs().max()
            for r in (1e-3, 1e-9)]
    assert errs[1] < errs[0] / 100, errs
    # A tuple state: gradients as for the packed state.
    def pair(t, ys):
        x, z = ys
        return f(t, torch.cat([x, z]))[:1], f(t, torch.cat([x, z]))[1:]
    xs = pb.odeint_adjoint(pair, (y0[:1], y0[1:]), T, adjoint_params=tuple(f.parameters()))
    g_tuple = torch.autograd.grad(xs[0][-1].sum() + xs[1][-1].sum(), f.p)[0]
    g_flat = torch.autograd.grad(pb.odeint_adjoint(f, y0, T)[-1].sum(), f.p)[0]
    torch.testing.assert_close(g_tuple, g_flat, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="adjoint_method='rk4' differs from method='dopri5'"):
        pb.odeint_adjoint(f, y0, T, adjoint_method="rk4")
    with pytest.raises(ValueError, match="adjoint_options supports only"):
        pb.odeint_adjoint(f, y0, T, adjoint_options={"step_size": 0.1})
    with pytest.raises(ValueError, match="func must be an nn.Module"):
        pb.odeint_adjoint(lambda t, y: -y, y0, T)
    with pytest.raises(ValueError, match="rtol of an adjoint must be"):
        pb.odeint_adjoint(f, y0, T, adjoint_rtol=-1.0)
    with pytest.raises(ValueError, match="both 0"):
        pb.BacksolveAdjoint(rtol=0, atol=0)


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4"])
def test_fixed_step_size_fills_times_between_steps_as_torchdiffeq(method):
    """step_size 0.3 on [0, 1] with a save at 0.5 (between steps): linear interpolation, as
    torchdiffeq's default, and torchdiffeq's gradients; "cubic" is Hermite (closer to exact)."""
    f = Lotka()
    y0 = Y0.clone().requires_grad_(True)
    t = torch.tensor([0.0, 0.5, 1.0, 1.75], dtype=torch.float64)
    opts = {"step_size": 0.3}
    ours, theirs = pb.odeint(f, y0, t, method=method, options=opts), tdq.odeint(f, y0, t, method=method, options=opts)
    tol = 1e-3 if method == "rk4" else 1e-12     # (torchdiffeq's rk4 is the 3/8 rule)
    torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)
    g_ours = torch.autograd.grad(ours[1:].sum(), [y0, f.p])
    g_theirs = torch.autograd.grad(theirs[1:].sum(), [y0, f.p])
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=10 * tol, atol=10 * tol)
    cubic = pb.odeint(f, Y0, t, method=method, options=dict(opts, interp="cubic"))
    tdq_cubic = tdq.odeint(f, Y0, t, method=method, options=dict(opts, interp="cubic"))
    torch.testing.assert_close(cubic, tdq_cubic, rtol=tol, atol=tol)
    # Backwards in time, and a time on a step end exactly.
    t_back = torch.tensor([1.0, 0.7, 0.45, 0.0], dtype=torch.float64)
    torch.testing.assert_close(pb.odeint(f, Y0, t_back, method=method, options=opts),
                               tdq.odeint(f, Y0, t_back, method=method, options=opts), rtol=tol, atol=tol)


def test_options_torchdiffeq_ignores_are_ignored_with_a_warning():
    f = Lotka()
    with pytest.warns(UserWarning, match="'euler' ignores option 'max_num_steps'"):
        ys = pb.odeint(f, Y0, T, method="euler", options={"step_size": 0.01, "max_num_steps": 10})
    torch.testing.assert_close(ys, tdq.odeint(f, Y0, T, method="euler", options={"step_size": 0.01}),
                               rtol=1e-10, atol=1e-10)
    with pytest.warns(UserWarning, match="'euler' ignores option 'first_step'"):
        ys = pb.odeint(f, Y0, T, method="euler", options={"first_step": 0.01})
    torch.testing.assert_close(ys, tdq.odeint(f, Y0, T, method="euler"), rtol=1e-12, atol=1e-12)
    with pytest.warns(UserWarning, match="'dopri5' ignores option 'interp'"):
        pb.odeint(f, Y0, T, options={"interp": "cubic"})
    with pytest.warns(UserWarning, match="'dopri5' ignores option 'step_size'"):   # (not a first step)
        ys = pb.odeint(f, Y0, T, options={"step_size": 0.5})
    torch.testing.assert_close(ys, pb.odeint(f, Y0, T), rtol=0, atol=0)
    with pytest.raises(ValueError, match="interp must be 'linear' or 'cubic'"):
        pb.odeint(f, Y0, T, method="rk4", options={"step_size": 0.1, "interp": "quintic"})
