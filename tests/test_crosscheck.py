"""Correctness cross-check: on the same problems and tolerances, pybridge agrees with torchdiffeq,
torchode and diffrax (JAX, float64), and all of them agree with a tight reference.

The reference is scipy's DOP853 at rtol = atol = 1e-13 (a code independent of all four libraries).
Every library solves a batch of initial conditions at rtol = atol = TOL with its Tsit5 / dopri5;
the global error of a tolerance-controlled solve is a small multiple of TOL on these non-stiff,
short-span problems, so we require |y - ref| <= C·TOL·(1 + |ref|) with C = 100 for each library and
2·C for each pair. Baselines that are not installed are skipped with the install command.
"""
from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

import pybridge as pb

TOL = 1e-7
C = 100.0
B = 4


def lotka_volterra(t, y):
    x, z = y[..., 0], y[..., 1]
    return torch.stack([1.5 * x - x * z, -3.0 * z + x * z], -1)


def cubic_spiral(t, y):
    A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=y.dtype)
    return (y ** 3) @ A


def forced_oscillator(t, y):
    # Non-autonomous: every library must pass the right time per sample.
    t = torch.as_tensor(t, dtype=y.dtype)
    t = t[:, None] if t.dim() == 1 else t
    q, p = y[..., :1], y[..., 1:]
    return torch.cat([p, -4.0 * q - 0.1 * p + torch.sin(3.0 * t).expand_as(q)], -1)


PROBLEMS = {
    "lotka_volterra": (lotka_volterra, lambda g: 1.0 + torch.rand(B, 2, generator=g, dtype=torch.float64), 4.0),
    "cubic_spiral": (cubic_spiral, lambda g: 0.5 + torch.rand(B, 2, generator=g, dtype=torch.float64), 6.0),
    "forced_oscillator": (forced_oscillator, lambda g: torch.randn(B, 2, generator=g, dtype=torch.float64), 5.0),
}


def numpy_rhs(f):
    """The whole batch as one flat system of B·2 equations (one scipy solve per problem)."""
    def rhs(t, y):
        return f(torch.full((B,), t, dtype=torch.float64), torch.from_numpy(y).reshape(B, 2)).reshape(-1).numpy()
    return rhs


def setup(name):
    f, make_y0, t1 = PROBLEMS[name]
    y0 = make_y0(torch.Generator().manual_seed(7))
    t = torch.linspace(0.0, t1, 9, dtype=torch.float64)
    return f, y0, t


@pytest.fixture(scope="module")
def references():
    from scipy.integrate import solve_ivp

    out = {}
    for name in PROBLEMS:
        f, y0, t = setup(name)
        r = solve_ivp(numpy_rhs(f), (float(t[0]), float(t[-1])), y0.reshape(-1).numpy(), method="DOP853",
                      t_eval=t.numpy(), rtol=1e-13, atol=1e-13)
        assert r.success, r.message
        out[name] = torch.from_numpy(r.y.T.copy()).reshape(len(t), B, 2)  # (T, B, 2)
    return out


def solve_pybridge(f, y0, t):
    sol = pb.solve(pb.ODEProblem(f, y0, t), pb.Tsit5(), rtol=TOL, atol=TOL)
    assert sol.success
    return sol.ys


def solve_torchdiffeq(f, y0, t):
    tde = pytest.importorskip("torchdiffeq", reason="torchdiffeq not installed: pip install 'pybridge[baselines]'")
    return tde.odeint(f, y0, t, rtol=TOL, atol=TOL, method="dopri5")


def solve_torchode(f, y0, t):
    to = pytest.importorskip("torchode", reason="torchode not installed: pip install 'pybridge[baselines]'")
    term = to.ODETerm(f)
    solver = to.AutoDiffAdjoint(to.Tsit5(term=term), to.IntegralController(atol=TOL, rtol=TOL, term=term))
    sol = solver.solve(to.InitialValueProblem(y0=y0, t_eval=t.expand(y0.shape[0], -1)))
    assert (sol.status == 0).all(), sol.status
    return sol.ys.transpose(0, 1)


JAX_MISSING = (importlib.util.find_spec("jax") is None or importlib.util.find_spec("diffrax") is None)
_DIFFRAX_CACHE: dict = {}


def solve_diffrax(name):
    """All problems in one jit compilation (lax.switch over the field), vmapped over the batch."""
    if JAX_MISSING:
        pytest.skip("diffrax/JAX not installed: pip install 'pybridge[baselines]' (or pip install jax diffrax)")
    if not _DIFFRAX_CACHE:
        import jax

        jax.config.update("jax_enable_x64", True)
        import diffrax
        import jax.numpy as jnp

        A = jnp.array([[-0.1, 2.0], [-2.0, -0.1]])
        names = list(PROBLEMS)
        fields = {
            "lotka_volterra": lambda t, y: jnp.stack([1.5 * y[0] - y[0] * y[1], -3.0 * y[1] + y[0] * y[1]]),
            "cubic_spiral": lambda t, y: (y ** 3) @ A,
            "forced_oscillator": lambda t, y: jnp.stack([y[1], -4.0 * y[0] - 0.1 * y[1] + jnp.sin(3.0 * t)]),
        }
        branches = [fields[n] for n in names]

        def field(t, y, which):
            return jax.lax.switch(which, branches, t, y)

        @jax.jit
        @jax.vmap
        def run(y, ts, which):
            sol = diffrax.diffeqsolve(diffrax.ODETerm(field), diffrax.Tsit5(), ts[0], ts[-1], None, y,
                                      args=which, stepsize_controller=diffrax.PIDController(rtol=TOL, atol=TOL),
                                      saveat=diffrax.SaveAt(ts=ts), max_steps=100_000)
            return sol.ys

        y0s, tss, which = [], [], []
        for i, n in enumerate(names):
            _, y0, t = setup(n)
            y0s.append(y0.numpy())
            tss.append(np.broadcast_to(t.numpy(), (B, t.shape[0])))
            which += [i] * B
        ys = np.asarray(run(jnp.asarray(np.concatenate(y0s)), jnp.asarray(np.concatenate(tss)), jnp.asarray(which)))
        assert ys.dtype == np.float64
        for i, n in enumerate(names):
            _DIFFRAX_CACHE[n] = torch.tensor(ys[i * B:(i + 1) * B]).transpose(0, 1)  # (T, B, 2)
    return _DIFFRAX_CACHE[name]


LIBRARIES = ["pybridge", "torchdiffeq", "torchode", "diffrax"]


def solve_with(lib, name):
    if lib == "diffrax":
        return solve_diffrax(name)
    f, y0, t = setup(name)
    return {"pybridge": solve_pybridge, "torchdiffeq": solve_torchdiffeq, "torchode": solve_torchode}[lib](f, y0, t)


def rel_err(ys, ref):
    return float(((ys - ref).abs() / (1.0 + ref.abs())).max())


@pytest.mark.parametrize("lib", LIBRARIES)
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_library_matches_reference(lib, name, references):
    ys = solve_with(lib, name)
    ref = references[name]
    assert ys.shape == ref.shape
    assert torch.isfinite(ys).all()
    err = rel_err(ys, ref)
    assert err <= C * TOL, f"{lib} on {name}: max scaled error {err:.3g} > {C * TOL:.3g}"
    # A solve that is too exact for its tolerance would mean the tolerance was not honoured (e.g.
    # a library silently running a different method or tolerance): the check is two-sided.
    assert err >= 1e-4 * TOL or name == "forced_oscillator", f"{lib} on {name}: error {err:.3g} suspiciously small"


@pytest.mark.parametrize("baseline", LIBRARIES[1:])
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_pybridge_agrees_with_baseline(baseline, name):
    ours = solve_with("pybridge", name)
    theirs = solve_with(baseline, name)
    err = rel_err(ours, theirs)
    assert err <= 2 * C * TOL, f"pybridge vs {baseline} on {name}: {err:.3g} > {2 * C * TOL:.3g}"


def test_tolerance_is_what_separates_the_libraries(references):
    """At a 1000x looser tolerance pybridge's error grows accordingly (so the agreement above is
    not an artefact of, e.g., ignoring rtol/atol)."""
    f, y0, t = setup("lotka_volterra")
    loose = pb.solve(pb.ODEProblem(f, y0, t), pb.Tsit5(), rtol=1e-4, atol=1e-4).ys
    tight = solve_with("pybridge", "lotka_volterra")
    ref = references["lotka_volterra"]
    assert rel_err(loose, ref) > 10 * rel_err(tight, ref)
    assert math.isfinite(rel_err(loose, ref))
