"""A drop-in for torchdiffeq.odeint, solved by pybridge (torchdiffeq's defaults and semantics)."""
from __future__ import annotations

import torch

from . import solvers as S
from .problem import ODEProblem
from .solve import solve

# torchdiffeq method name -> pybridge solver
METHODS = {
    "euler": S.Euler, "midpoint": S.Midpoint, "heun2": S.Heun, "heun": S.Heun, "rk4": S.RK4,
    "bosh3": S.BS3, "dopri5": S.DP5, "tsit5": S.Tsit5, "vern7": S.Vern7,
}
# torchdiffeq option -> solve() keyword
OPTIONS = {"step_size": "dt", "first_step": "dt", "max_num_steps": "max_steps", "dtype": None}


def odeint(func, y0, t, *, rtol: float = 1e-7, atol: float = 1e-9, method: str | None = "dopri5",
           options: dict | None = None, event_fn=None) -> torch.Tensor:
    """Solve like torchdiffeq.odeint: y0 (any shape, or a tuple of tensors) is one state,
    func(t, y) gets a 0-d t, the error norm is the RMS over all of y; returns (T, *y0.shape).

    As torchdiffeq: method=None means "dopri5"; a fixed-step method ("euler", "midpoint", "heun2",
    "rk4") without options={"step_size": ...} takes one step per interval of t; "max_num_steps"
    bounds the steps per interval of t; a failed solve raises (pybridge.SolveError, a RuntimeError).
    Differences: "rk4" is the classic RK4 (torchdiffeq's is the 3/8 rule, so fixed-step results
    differ at truncation-error level); "tsit5" is OrdinaryDiffEq's Tsit5 (torchdiffeq 0.2.5 has none).
    """
    if event_fn is not None:
        raise ValueError("odeint: event_fn is not supported by pybridge")
    method = "dopri5" if method is None else method
    if method not in METHODS:
        raise ValueError(f"odeint: unknown method {method!r}; pybridge supports {sorted(METHODS)}")
    kwargs = {}
    for key, val in (options or {}).items():
        if key not in OPTIONS:
            raise ValueError(f"odeint: unknown option {key!r} for method {method!r}; "
                             f"supported options: {sorted(OPTIONS)}")
        if OPTIONS[key] is not None:
            kwargs[OPTIONS[key]] = float(val) if OPTIONS[key] == "dt" else int(val)
    if isinstance(y0, tuple):
        return _odeint_tuple(func, y0, t, rtol, atol, method, kwargs)
    t = _as_times(t, y0)
    if isinstance(t, torch.Tensor) and t.dim() == 1 and t.shape[0] == 1:
        return y0[None]  # (torchdiffeq returns the initial state alone)
    solver = METHODS[method]()
    if "max_steps" in kwargs and isinstance(t, torch.Tensor) and t.dim() == 1:
        kwargs["max_steps"] *= max(t.shape[0] - 1, 1)  # torchdiffeq counts the steps of each interval of t
    prob = ODEProblem(func, y0, t, batched=False)  # (checks y0 and t)
    if not solver.adaptive and "dt" not in kwargs:
        return _fixed_on_grid(func, y0, prob.t, solver, rtol, atol, kwargs)
    return solve(prob, solver, rtol=rtol, atol=atol, raise_on_failure=True, **kwargs).ys


def _fixed_on_grid(func, y0, t, solver, rtol, atol, kwargs):
    """torchdiffeq's fixed grid without a step size: one step from each time of t to the next."""
    ys = [y0]
    for t0, t1 in zip(t[:-1], t[1:]):
        prob = ODEProblem(func, ys[-1], torch.stack([t0, t1]), batched=False)
        step = float((t1 - t0).abs())
        ys.append(solve(prob, solver, rtol=rtol, atol=atol, dt=step, raise_on_failure=True, **kwargs).ys[-1])
    return torch.stack(ys)


def _as_times(t, y0):
    if isinstance(t, torch.Tensor) and t.is_floating_point() and isinstance(y0, torch.Tensor):
        return t.to(y0.dtype)
    return t


def _odeint_tuple(func, y0s, t, rtol, atol, method, kwargs):
    """torchdiffeq accepts a tuple state: pack it into one flat vector and unpack the result."""
    shapes = [y.shape for y in y0s]
    sizes = [y.numel() for y in y0s]
    flat0 = torch.cat([y.reshape(-1) for y in y0s])

    def unpack(flat):
        return tuple(p.reshape(s) for p, s in zip(torch.split(flat, sizes), shapes))

    def flat_func(tt, flat):
        return torch.cat([d.reshape(-1) for d in func(tt, unpack(flat))])

    ys = odeint(flat_func, flat0, _as_times(t, flat0), rtol=rtol, atol=atol, method=method,
                options={k: v for k, v in _back(kwargs).items()})
    return tuple(p.reshape((ys.shape[0],) + tuple(s)) for p, s in zip(torch.split(ys, sizes, dim=1), shapes))


def _back(kwargs):
    inverse = {"dt": "step_size", "max_steps": "max_num_steps"}
    return {inverse[k]: v for k, v in kwargs.items()}
