"""The torch engine: turns a checked problem into loop calls and the loop's tensors into a Solution."""
from __future__ import annotations

import functools

import torch

from ..solution import OPTIONAL_COUNTERS, ReturnCode, Solution, Stats, Trace
from ..regularization import parse_local_regularizer
from .explicit_rk import ExplicitRK
from .explicit_tableaus import EXPLICIT_TABLEAUS
from .controller import Norm
from .loop import LoopOptions, integrate
from . import events, linear_solve
from .stand_in import taking_part
from .rosenbrock import Rosenbrock
from .rosenbrock_tableaus import ROSENBROCK_TABLEAUS
from .esdirk import ESDIRK
from .esdirk_tableaus import ESDIRK_TABLEAUS


def build_method(solver, dtype, device):
    """The stepping object for a solver name. Methods hold only constant coefficient tensors, so
    they are cached: uploading coefficients costs a host-device transfer each on CUDA."""
    # A composite (auto-switching) solver's stiff method is part of the cache key.
    stiff = getattr(solver, "stiff", None)
    inner = (stiff.family, stiff.name) if stiff is not None else None
    if solver.family in ("rosenbrock", "esdirk") or stiff is not None:
        linear_solve.prepare(device)   # (before a compiled step is traced)
    return _build_method(solver.family, solver.name, dtype, torch.device(device), inner)


@functools.lru_cache(maxsize=64)
def _build_method(family, name, dtype, device, stiff=None):
    # Cached objects outlive the caller's mode: coefficient tensors made under inference_mode
    # could never be saved for backward by a later solve that needs gradients.
    with torch.inference_mode(False):
        return _construct_method(family, name, dtype, device, stiff)


def _construct_method(family, name, dtype, device, stiff):
    if family == "explicit_rk":
        return ExplicitRK(EXPLICIT_TABLEAUS[name], dtype, device)
    if family == "rosenbrock":
        return Rosenbrock(ROSENBROCK_TABLEAUS[name], dtype, device)
    if family == "esdirk":
        return ESDIRK(ESDIRK_TABLEAUS[name], dtype, device)
    if family == "auto":
        from .auto_switch import NONSTIFF, AutoSwitch
        return AutoSwitch(_build_method("explicit_rk", NONSTIFF[name], dtype, device),
                          _build_method(*stiff, dtype, device))
    raise ValueError(f"solver {name}() has no torch-engine implementation (family {family!r})")


class RightHandSide:
    """f in the loop's terms: τ = direction·t, states flattened to (B, n); checks f's first output."""

    def __init__(self, f, prob, direction, scalar_time: bool):
        self.f = f
        self.batched = prob.batched
        self.shape = (prob.batch_size,) + prob.state_shape if prob.batched else prob.state_shape
        self.direction = direction
        self.flip = bool((direction < 0).any())
        self.scalar_time = scalar_time
        self.shared_time = scalar_time and prob.batched   # (lockstep: see stand_in.py)
        self.y0 = prob.y0
        self.checked = False
        # The user's Jacobian describes prob.f only (not, e.g., an adjoint's augmented system).
        self.user_jac = prob.jac if f is prob.f else None

    def time_arg(self, tau):
        """The t that f receives for the loop's τ (B,): per sample, or one 0-d time (lockstep, one
        sample): the first row's, which callers make every row's (stand_in.taking_part) where rows
        may disagree."""
        if not self.scalar_time:
            return tau * self.direction if self.flip else tau
        return tau[0] * self.direction[0] if self.flip else tau[0]

    def __call__(self, tau, y):
        t_arg = self.time_arg(tau)
        # (reshape only when needed: on small problems every dispatched op costs as much as its work)
        out = self.f(t_arg, y if y.shape == self.shape else y.reshape(self.shape))
        if not self.checked:
            check_output(out, self.y0, self.shape)
            self.checked = True
        if out.shape != y.shape:
            out = out.reshape(y.shape)
        return out * self.direction[:, None] if self.flip else out

    def jacobian(self, tau, y):
        """∂(rhs)/∂y as (B, n, n) from the user's jac(t, y), or None (the method then uses AD)."""
        if self.user_jac is None:
            return None
        J = self.user_jac(self.time_arg(tau), y.reshape(self.shape))
        if not isinstance(J, torch.Tensor) or J.numel() != y.shape[0] * y.shape[1] ** 2:
            raise ValueError(f"jac must return a tensor of shape ({y.shape[0]}, {y.shape[1]}, {y.shape[1]}) "
                             f"(B, n, n); got {getattr(J, 'shape', type(J).__name__)}")
        J = J.reshape(y.shape[0], y.shape[1], y.shape[1]).to(y.dtype)
        return J * self.direction[:, None, None] if self.flip else J


def check_output(out, y0, shape):
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"f must return a torch.Tensor; got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"f returned shape {tuple(out.shape)}; expected {tuple(shape)} (the shape of y)")
    if out.dtype != y0.dtype:
        raise TypeError(f"f returned dtype {out.dtype}; expected {y0.dtype} (the dtype of y0)")
    if out.device != y0.device:
        raise ValueError(f"f returned a tensor on {out.device}; expected {y0.device} (the device of y0)")


def solve_ode(prob, solver, *, rtol, atol, dt, adaptive, dtmin, dtmax, max_steps, dense, lockstep,
              differentiable_dt, f=None, local_regularizer=None, seed=None, compile=False, event=None,
              event_direction=0):
    y0 = prob.y0
    B = prob.batch_size
    n = y0.numel() // B
    y0_flat = y0.reshape(B, n)
    t = prob.t
    t_rows = t.expand(B, -1) if t.dim() == 1 else t
    direction = torch.sign(t_rows[:, 1] - t_rows[:, 0])
    tau_save = t_rows * direction[:, None]
    scalar_time = lockstep or not prob.batched
    rhs = RightHandSide(f or prob.f, prob, direction, scalar_time)
    method = build_method(solver, y0.dtype, y0.device)
    if hasattr(method, "for_solve"):  # auto-switching: per-sample modes live for this solve only
        method = method.for_solve()
    # A cubic Hermite interpolant would spoil a high-order method's saved values: step onto them.
    stop_at_saves = method.interpolation_order < method.order - 1
    opts = LoopOptions(adaptive=adaptive, dt=dt, dtmin=dtmin, dtmax=dtmax, max_steps=max_steps,
                       lockstep=lockstep, dense=dense, differentiable_dt=differentiable_dt,
                       stop_at_saves=stop_at_saves, controller=getattr(method, "controller", None),
                       compile=compile, event=events.watch(event, event_direction, prob, direction))
    if local_regularizer is not None:
        time_kind, detach_k1 = parse_local_regularizer(local_regularizer)
        opts.probe = _probe(time_kind, seed, tau_save, lockstep)
    atol, rtol = _per_component(atol, prob), _per_component(rtol, prob)
    if hasattr(method, "with_tolerances"):   # implicit methods scale their Newton norm by the solve's tolerances
        method = method.with_tolerances(atol, rtol, lockstep)
    res = integrate(rhs, method, tau_save, y0_flat, atol, rtol, opts)
    sol = _to_solution(res, prob, solver, method, direction, rhs)
    if local_regularizer is not None:
        attach_local_regularizer(sol, res, rhs, method, atol, rtol, lockstep, tau_save, direction, detach_k1)
    return sol


def attach_local_regularizer(sol, res, rhs, method, atol, rtol, lockstep, tau_save, direction, detach_k1):
    """sol.local_regularizer: the 2023 paper's extra step from the probe the loop kept (res.probe),
    differentiable (ODE and SDE engines alike); sol.extras["t_reg"] the times it was taken at."""
    from ..regularization import local_error_step
    tau_reg, y_reg = res.probe
    span = tau_save[:, -1] - tau_save[:, 0]
    # A failed sample's probe may sit where it blew up: it is left out (outside the lockstep norm and
    # the mean) and steps with dt = 0 from its last accepted state, where f is finite, so that it
    # cannot make the batch's regularizer or its gradient non-finite. With no successful sample the
    # regularizer is 0.
    ok = res.status == int(ReturnCode.Success)
    if not bool(ok.all()):
        tau_reg = torch.where(ok, tau_reg, res.tau)
        y_reg = torch.where(ok[:, None], y_reg, res.y_end)
    with torch.enable_grad():
        r = local_error_step(taking_part(rhs, ok), method, tau_reg, y_reg, atol, rtol, Norm(lockstep), span,
                             detach_k1, valid=ok)
        # One number per step in lockstep (as the papers), a per-sample mean otherwise.
        sol.local_regularizer = r[ok].mean() if bool(ok.any()) else torch.zeros((), dtype=r.dtype, device=r.device)
    sol.extras["t_reg"] = tau_reg * direction


def _probe(kind, seed, tau_save, lockstep):
    gen = torch.Generator().manual_seed(0 if seed is None else int(seed))
    if kind == "biased":   # (in lockstep one draw per step for the batch: one shared time, as unbiased)
        return ("biased", (gen, 1 if lockstep else tau_save.shape[0]))
    B = tau_save.shape[0]
    u = torch.rand(1 if lockstep else B, generator=gen, dtype=tau_save.dtype).to(tau_save.device)
    return ("unbiased", tau_save[:, 0] + u * (tau_save[:, -1] - tau_save[:, 0]))


def _per_component(tol, prob):
    """A float stays a float; a tensor broadcast to the state becomes (B, n) (or (1, n))."""
    if not isinstance(tol, torch.Tensor):
        return float(tol)
    tol = tol.to(prob.y0.dtype)
    if tol.dim() == 0:
        return tol
    B = prob.batch_size
    return tol.broadcast_to(prob.y0.shape).reshape(B, -1)


def _to_solution(res, prob, solver, method, direction, rhs=None):
    unbatch = (lambda x: x[0]) if not prob.batched else (lambda x: x)
    ys = res.ys.reshape((res.ys.shape[0],) + tuple(prob.y0.shape))
    tr = res.trace
    trace = Trace(t=unbatch(tr["t"] * direction[:, None]), dt=unbatch(tr["dt"]), eest=unbatch(tr["eest"]),
                  stiffness=unbatch(tr["stiffness"]), mask=unbatch(tr["mask"]),
                  stability_size=method.stability_size,
                  method=unbatch(tr["method"]) if "method" in tr else None)
    extra = {k: unbatch(v) for k, v in (res.counters or {}).items() if k in OPTIONAL_COUNTERS}
    stats = Stats(nfe=unbatch(res.nfe), naccept=unbatch(res.naccept), nreject=unbatch(res.nreject), **extra)
    interpolant = None
    if res.dense is not None:
        interpolant = DenseOutput(res.dense, tr["mask"], method, direction, prob, res.tau, rhs)
    sol = Solution(ys=ys, ts=prob.t, stats=stats, retcode=unbatch(res.status), trace=trace,
                   interpolant=interpolant, solver=solver, batched=prob.batched)
    sol.extras["t_final"] = unbatch(res.tau * direction)
    sol.extras["dt_final"] = unbatch(res.dt)
    if res.event is not None:
        tau_evt, y_evt, found = res.event
        sol.event_t = unbatch(tau_evt * direction)
        sol.event_y = unbatch(y_evt.reshape(prob.y0.shape if prob.batched else (1,) + tuple(prob.y0.shape)))
    return sol


class DenseOutput:
    """sol(t): locate each query's accepted step per sample and evaluate the method's interpolant.

    An interpolant with lazy stages (Vern7) evaluates the right-hand side rhs: per step that some
    query falls in, on the (B, n) batch of every sample's step of that index (these evaluations are
    not counted in stats). They are kept for later calls made without gradients (e.g. an adjoint's
    backward pass); calls that record gradients recompute them."""

    def __init__(self, data, mask, method, direction, prob, tau_reached, rhs=None):
        self.data, self.mask, self.method = data, mask, method
        self.direction, self.prob, self.tau_reached = direction, prob, tau_reached
        self.rhs = rhs if getattr(method, "extra_stages", 0) else None
        self._lazy_cache = {}
        starts = data["tau"]
        self.starts = torch.where(mask, starts, torch.full_like(starts, float("inf")))

    def _stages(self, idx):
        """The stages of the steps idx (B, Tq) points at, as (stages (B, N', S, n), idx into them)."""
        d, ks = self.data, self.data["ks"]
        cols = torch.unique(idx).tolist()
        cache = self._lazy_cache if not torch.is_grad_enabled() else {}
        for i in cols:
            if i not in cache:
                cache[i] = self.method.extend_stages(self.rhs, d["tau"][:, i], d["y0"][:, i], d["h"][:, i],
                                                     ks[:, i], use=self.mask[:, i])
        pos = torch.zeros(ks.shape[1], dtype=torch.long, device=idx.device)
        pos[cols] = torch.arange(len(cols), device=idx.device)
        return torch.stack([cache[i] for i in cols], 1), pos[idx]

    def __call__(self, t, extrapolate: bool = False):
        """extrapolate: extend the first and last steps' polynomials beyond the solved span (for
        internal callers whose stage times overshoot a step, e.g. Kvaerno5's c₃ ≈ 1.23)."""
        prob = self.prob
        t = torch.as_tensor(t, dtype=prob.y0.dtype, device=prob.y0.device)
        B = self.mask.shape[0]
        tq = t.expand(B, -1) if t.dim() == 1 else t
        if t.dim() not in (1, 2) or tq.shape[0] != B:
            raise ValueError(f"sol(t): t must have shape (Tq,) or ({B}, Tq); got {tuple(t.shape)}")
        tau = tq * self.direction[:, None]
        tau0 = self.data["tau"][:, :1]
        if not extrapolate:  # the solved span; beyond where a failed sample stopped, NaN (below)
            t_end = prob.t[..., -1:].to(tau)
            tau_end = (t_end.expand(B, 1) if t_end.dim() == 1 else t_end) * self.direction[:, None]
            if (tau < tau0 - 1e-12 * tau0.abs().clamp(min=1)).any():
                raise ValueError("sol(t): t lies before the initial time")
            if (tau > tau_end + 1e-12 * tau_end.abs().clamp(min=1)).any():
                raise ValueError("sol(t): t lies after the final time")
        nsteps = self.mask.sum(1, keepdim=True).clamp(min=1)
        idx = (torch.searchsorted(self.starts.contiguous(), tau.contiguous(), right=True) - 1)
        idx = torch.minimum(idx.clamp(min=0), nsteps - 1)
        Tq = idx.shape[1]
        pick = lambda x: torch.gather(x, 1, idx.view(B, Tq, *([1] * (x.dim() - 2))).expand(B, Tq, *x.shape[2:]))
        flat = lambda x: x.reshape(B * Tq, *x.shape[2:])
        start, h = pick(self.data["tau"]), pick(self.data["h"])
        theta = ((tau - start) / torch.where(h > 0, h, torch.ones_like(h))).reshape(-1, 1)
        if self.rhs is None:
            ks = pick(self.data["ks"])
        else:
            ks, ks_idx = self._stages(idx)
            ks = torch.gather(ks, 1, ks_idx.view(B, Tq, 1, 1).expand(B, Tq, *ks.shape[2:]))
        vals = self.method.interpolate(flat(pick(self.data["y0"])), flat(h), flat(ks),
                                       flat(pick(self.data["y1"])), flat(pick(self.data["f1"])), theta)
        vals = vals.reshape(B, Tq, -1)
        if not extrapolate:
            reached = self.tau_reached[:, None]
            beyond = tau > reached + 1e-12 * reached.abs().clamp(min=1)
            vals = torch.where(beyond[..., None], torch.full_like(vals, float("nan")), vals)
        vals = vals.transpose(0, 1)
        return vals.reshape((Tq,) + tuple(prob.y0.shape))
