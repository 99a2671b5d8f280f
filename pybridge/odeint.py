"""A drop-in for torchdiffeq.odeint, solved by pybridge (torchdiffeq's defaults and semantics)."""
from __future__ import annotations

import math
import warnings

import torch

from . import solvers as S
from .problem import ODEProblem
from .solve import solve

# torchdiffeq method name -> pybridge solver
METHODS = {
    "euler": S.Euler, "midpoint": S.Midpoint, "heun2": S.Heun, "heun": S.Heun, "rk4": S.RK4,
    "bosh3": S.BS3, "dopri5": S.DP5, "tsit5": S.Tsit5, "vern7": S.Vern7,
}
# torchdiffeq option -> solve() keyword ("interp": how a fixed-grid solve fills times between its steps)
OPTIONS = {"step_size": "dt", "first_step": "dt", "max_num_steps": "max_steps", "dtype": None, "interp": None}
# Options torchdiffeq's fixed-grid solvers do not take (it warns and ignores them), and its adaptive ones'
FIXED_GRID_IGNORES = {"first_step", "max_num_steps"}
ADAPTIVE_IGNORES = {"interp", "step_size"}


def odeint(func, y0, t, *, rtol: float = 1e-7, atol: float = 1e-9, method: str | None = "dopri5",
           options: dict | None = None, event_fn=None, _adjoint=None) -> torch.Tensor:
    """Solve like torchdiffeq.odeint: y0 (any shape, or a tuple of tensors) is one state,
    func(t, y) gets a 0-d t, the error norm is the RMS over all of y; returns (T, *y0.shape).

    As torchdiffeq: method=None means "dopri5"; a fixed-step method ("euler", "midpoint", "heun2",
    "rk4") without options={"step_size": ...} takes one step per interval of t, and with one steps
    on t0 + k·step_size, filling times between steps linearly (options={"interp": "cubic"}: cubic
    Hermite); fixed-step methods ignore "first_step" and "max_num_steps", with a warning; a failed
    solve raises (pybridge.SolveError, a RuntimeError). "max_num_steps" bounds the whole solve at
    max_num_steps × (len(t) − 1) steps (torchdiffeq bounds each interval of t separately).
    Differences: "rk4" is the classic RK4 (torchdiffeq's is the 3/8 rule, so fixed-step results
    differ at truncation-error level); "tsit5" is OrdinaryDiffEq's Tsit5 (torchdiffeq 0.2.5 has none).
    event_fn(t, y): as torchdiffeq, the solve runs from t[0] (towards t[1] if given; later times
    are ignored) until event_fn crosses zero and returns (event_t, solution at (t[0], event_t));
    with several values, the first of them to cross. Both are differentiable (see
    pybridge.solve's `event`; through odeint_adjoint, the state at the event time by the adjoint).
    (_adjoint: (adjoint, params), set by odeint_adjoint.)
    """
    method = "dopri5" if method is None else method
    if method not in METHODS:
        raise ValueError(f"odeint: unknown method {method!r}; pybridge supports {sorted(METHODS)}")
    if isinstance(y0, tuple):   # (its options are read once, by the call on the packed state)
        return _odeint_tuple(func, y0, t, rtol, atol, method, options, _adjoint, event_fn)
    solver, kwargs, interp = _solver_and_options(method, options)
    if _adjoint is not None:
        kwargs["adjoint"], kwargs["adjoint_params"] = _adjoint
    t = _as_times(t, y0)
    if event_fn is not None:
        return _until_event(func, y0, t, solver, rtol, atol, kwargs, event_fn)
    if isinstance(t, torch.Tensor) and t.dim() == 1 and t.shape[0] == 1:
        return y0[None]  # (torchdiffeq returns the initial state alone)
    if "max_steps" in kwargs and isinstance(t, torch.Tensor) and t.dim() == 1:
        # One budget for the whole solve, max_num_steps per interval of t on average (torchdiffeq
        # bounds each interval's steps separately).
        kwargs["max_steps"] *= max(t.shape[0] - 1, 1)
    prob = ODEProblem(func, y0, t, batched=False)  # (checks y0 and t)
    if not solver.adaptive and "dt" not in kwargs:
        return _fixed_on_grid(func, y0, prob.t, solver, rtol, atol, kwargs)
    if not solver.adaptive and interp == "linear":
        return _linear_between_steps(func, y0, prob.t, solver, rtol, atol, kwargs)
    return solve(prob, solver, rtol=rtol, atol=atol, raise_on_failure=True, **kwargs).ys


def _solver_and_options(method, options):
    """(solver, solve() keywords, interp) for torchdiffeq's method name and options."""
    kwargs = {}
    solver = METHODS[method]()
    ignored = FIXED_GRID_IGNORES if not solver.adaptive else ADAPTIVE_IGNORES
    interp = (options or {}).get("interp", "linear")
    if interp not in ("linear", "cubic"):
        raise ValueError(f"odeint: option interp must be 'linear' or 'cubic'; got {interp!r}")
    for key, val in (options or {}).items():
        if key not in OPTIONS:
            raise ValueError(f"odeint: unknown option {key!r} for method {method!r}; "
                             f"supported options: {sorted(OPTIONS)}")
        if key in ignored:
            warnings.warn(f"odeint: method {method!r} ignores option {key!r} (as torchdiffeq does)", stacklevel=2)
        elif OPTIONS[key] is not None:
            kwargs[OPTIONS[key]] = float(val) if OPTIONS[key] == "dt" else int(val)
    return solver, kwargs, interp


def _until_event(func, y0, t, solver, rtol, atol, kwargs, event_fn):
    """torchdiffeq's odeint with event_fn: no end time, so the solve's end is a horizon no step
    reaches (√(the dtype's largest number) past t0); the event, or max_num_steps, ends it."""
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] == 0:
        raise ValueError(f"odeint: t must be a 1-d tensor holding the start time; got {getattr(t, 'shape', t)!r}")
    if not solver.adaptive and "dt" not in kwargs:
        raise ValueError("odeint: event handling with a fixed-step method needs options={'step_size': ...}")
    t0 = t[0]
    with torch.no_grad():
        if bool((torch.as_tensor(event_fn(t0, y0)) == 0).any()):
            return t0, torch.stack([y0, y0])   # (as torchdiffeq: an event at the start ends the solve there)
    sign = -1.0 if t.shape[0] > 1 and bool(t[1] < t[0]) else 1.0
    horizon = math.sqrt(torch.finfo(y0.dtype).max)
    span = torch.stack([t0, t0.detach() + sign * horizon])
    plain = {k: v for k, v in kwargs.items() if k not in ("adjoint", "adjoint_params")}
    if "adjoint" not in kwargs:
        sol = solve(ODEProblem(func, y0, span, batched=False), solver, rtol=rtol, atol=atol, event=event_fn,
                    raise_on_failure=True, **plain)
        return sol.event_t, torch.stack([y0, sol.event_y])
    # odeint_adjoint: find the event without gradients, solve up to it with the continuous adjoint,
    # and link the event time's gradient there by the implicit function theorem (as torchdiffeq).
    with torch.no_grad():
        t_star = solve(ODEProblem(func, y0.detach(), span.detach(), batched=False), solver, rtol=rtol, atol=atol,
                       event=event_fn, raise_on_failure=True, **plain).event_t
    ys = solve(ODEProblem(func, y0, torch.stack([t0, t_star]), batched=False), solver, rtol=rtol, atol=atol,
               raise_on_failure=True, **kwargs).ys
    event_t, y_event = _link_event_time(func, event_fn, t_star, ys[-1])
    return event_t, torch.stack([y0, y_event])


def _link_event_time(func, event_fn, t_star, y_star):
    """(t*, y*) with gradients: t* − (g − ḡ)/(dg/dt) (its value t*, its gradient −(dg/dp)/(dg/dt), the
    component nearest zero being the one that crossed) and y* + f·(t − t*) (y*'s own gradient plus
    the motion of the event time)."""
    from .torch_engine.events import linked_root, slope_along

    t_star = t_star.detach()
    g_all = torch.as_tensor(event_fn(t_star, y_star)).reshape(-1)
    which = int(g_all.detach().abs().argmin())
    g_component = lambda t, y: torch.as_tensor(event_fn(t, y)).reshape(-1)[which]  # noqa: E731
    with torch.no_grad():
        f_star = func(t_star, y_star)
    event_t = linked_root(t_star, g_all[which], slope_along(g_component, t_star, y_star, f_star))
    return event_t, y_star + f_star * (event_t - t_star)


def odeint_event(func, y0, t0, *, event_fn, reverse_time: bool = False, odeint_interface=None, **kwargs):
    """A drop-in for torchdiffeq.odeint_event: solve from t0 (backwards with reverse_time) until
    event_fn(t, y) crosses zero; returns (event_t, solution at (t0, event_t)), both differentiable
    (by the implicit function theorem at the crossing). odeint_interface: pb.odeint (the default:
    gradients by backpropagation through the solve) or pb.odeint_adjoint (the state at the event
    time by the continuous adjoint)."""
    interface = odeint if odeint_interface is None else odeint_interface
    t0 = torch.as_tensor(t0).reshape(-1)
    t = torch.cat([t0, t0.detach() + (-1.0 if reverse_time else 1.0)])
    return interface(func, y0, t, event_fn=event_fn, **kwargs)


def _fixed_on_grid(func, y0, t, solver, rtol, atol, kwargs):
    """torchdiffeq's fixed grid without a step size: one step from each time of t to the next."""
    ys = [y0]
    for t0, t1 in zip(t[:-1], t[1:]):
        prob = ODEProblem(func, ys[-1], torch.stack([t0, t1]), batched=False)
        step = float((t1 - t0).abs())
        ys.append(solve(prob, solver, rtol=rtol, atol=atol, dt=step, raise_on_failure=True, **kwargs).ys[-1])
    return torch.stack(ys)


def _linear_between_steps(func, y0, t, solver, rtol, atol, kwargs):
    """torchdiffeq's fixed grid with a step size: steps on t0 + k·step (the last one shortened to end
    on t[-1]) and, by default, values at times between two steps interpolated linearly. The solve
    saves only the step ends around each requested time (memory O(len(t)), not O(steps))."""
    step, sign = kwargs["dt"], (1.0 if bool(t[-1] > t[0]) else -1.0)
    s = sign * t                                                     # increasing
    n_steps = math.ceil(float(s[-1] - s[0]) / step)
    grid = torch.arange(n_steps + 1, dtype=t.dtype, device=t.device) * step + s[0]
    grid = torch.cat([grid[grid < s[-1]], s[-1:]])   # (a k·step rounding past the end is dropped)
    j = (torch.searchsorted(grid.detach(), s.detach(), right=True) - 1).clamp(0, grid.shape[0] - 2)
    needed = torch.unique(torch.cat([j, j + 1]))                      # the step ends around t, sorted
    ys = solve(ODEProblem(func, y0, sign * grid[needed], batched=False), solver, rtol=rtol, atol=atol,
               raise_on_failure=True, **kwargs).ys
    lo, hi = torch.searchsorted(needed, j), torch.searchsorted(needed, j + 1)
    w = ((s - grid[j]) / (grid[j + 1] - grid[j])).reshape(-1, *([1] * y0.dim()))
    return ys[lo] + w * (ys[hi] - ys[lo])


def odeint_adjoint(func, y0, t, *, rtol: float = 1e-7, atol: float = 1e-9, method: str | None = "dopri5",
                   options: dict | None = None, event_fn=None, adjoint_rtol: float | None = None,
                   adjoint_atol: float | None = None, adjoint_method: str | None = None,
                   adjoint_options: dict | None = None, adjoint_params=None) -> torch.Tensor:
    """A drop-in for torchdiffeq.odeint_adjoint: the forward solve as `odeint`, gradients from the
    continuous adjoint solved backwards with y re-integrated beside it (pb.BacksolveAdjoint, as
    torchdiffeq does), O(1) memory in the number of steps.

    adjoint_params: the tensors to differentiate (default: func's parameters; torchdiffeq requires
    func to be an nn.Module then, and so does this). adjoint_rtol / adjoint_atol: the backward
    solve's tolerances (default rtol / atol). adjoint_options={"norm": "seminorm"} ignores the
    parameter-adjoint channels in the backward error norm (Kidger et al. 2021); the default is the
    full norm, as torchdiffeq's. The backward solve uses the forward's method and step options:
    another adjoint_method, or adjoint_options other than "norm", raise. Unlike torchdiffeq's, it
    does not differentiate t: a t that requires grad raises (pb.odeint differentiates it).
    """
    from .adjoint import BacksolveAdjoint

    if adjoint_method is not None and adjoint_method != (method or "dopri5"):
        raise ValueError(f"odeint_adjoint: adjoint_method={adjoint_method!r} differs from method={method!r}; "
                         "pybridge solves the adjoint with the forward's method")
    norm = "default"
    for key, val in (adjoint_options or {}).items():
        if key != "norm" or val not in ("seminorm", "default"):
            raise ValueError(f"odeint_adjoint: adjoint_options supports only {{'norm': 'seminorm' or 'default'}}; "
                             f"got {key!r}: {val!r}")
        norm = val
    if adjoint_params is None:
        if not isinstance(func, torch.nn.Module):
            raise ValueError("odeint_adjoint: func must be an nn.Module when adjoint_params is not given "
                             "(its parameters are what the adjoint differentiates)")
        adjoint_params = tuple(func.parameters())
    adjoint = BacksolveAdjoint(seminorm=norm == "seminorm", rtol=adjoint_rtol, atol=adjoint_atol)
    return odeint(func, y0, t, rtol=rtol, atol=atol, method=method, options=options, event_fn=event_fn,
                  _adjoint=(adjoint, tuple(adjoint_params)))


def _as_times(t, y0):
    if isinstance(t, torch.Tensor) and t.is_floating_point() and isinstance(y0, torch.Tensor):
        return t.to(y0.dtype)
    return t


def _odeint_tuple(func, y0s, t, rtol, atol, method, options, adjoint, event_fn=None):
    """torchdiffeq accepts a tuple state: pack it into one flat vector and unpack the result."""
    shapes = [y.shape for y in y0s]
    sizes = [y.numel() for y in y0s]
    flat0 = torch.cat([y.reshape(-1) for y in y0s])

    def unpack(flat):
        return tuple(p.reshape(s) for p, s in zip(torch.split(flat, sizes), shapes))

    def flat_func(tt, flat):
        return torch.cat([d.reshape(-1) for d in func(tt, unpack(flat))])

    flat_event = None if event_fn is None else (lambda tt, flat: event_fn(tt, unpack(flat)))
    out = odeint(flat_func, flat0, _as_times(t, flat0), rtol=rtol, atol=atol, method=method,
                 options=options, event_fn=flat_event, _adjoint=adjoint)
    event_t, ys = out if event_fn is not None else (None, out)
    split = tuple(p.reshape((ys.shape[0],) + tuple(s)) for p, s in zip(torch.split(ys, sizes, dim=1), shapes))
    return split if event_fn is None else (event_t, split)

