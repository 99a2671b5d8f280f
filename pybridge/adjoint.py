"""How gradients of a solve are computed. The default backpropagates through the solver's operations.

The continuous adjoints (Backsolve, Interpolating, Quadrature) solve the forward problem under
no_grad and, in `backward`, integrate the adjoint system a' = -aᵀ∂f/∂y from t[T-1] to t[0] one
save interval at a time, adding grad_output[j] at each save time (as torchdiffeq's odeint_adjoint).
Each interval is itself a torch-engine solve of an augmented ODEProblem with the same solver and
tolerances; vector-Jacobian products come from torch.autograd.grad on f.

Design (shared by the three adjoints, see `_Backward.interval`):
- Time of interval j is reparametrized, per sample, as t_b(s) = t_b[j] + s·Δ_b with s from 1 to 0,
  Δ_b = t_b[j+1] - t_b[j]. A linear change of time leaves every Runge–Kutta step and error estimate
  unchanged, and it lets per-sample times (B, T) share one s-span.
- Backsolve and Interpolating carry a_θ in the state. A per-sample a_θ would be B×P and need
  per-sample parameter VJPs, so their backward treats the whole batch as ONE sample: state
  [y (B·n), a_y (B·n), a_θ (P)], one step size for the batch (torchdiffeq's behaviour); every
  sample keeps its own a_y, and one VJP with cotangent Δ_b·a_b gives Σ_b a_bᵀ∂f_b/∂θ.
- Quadrature carries a_y only, so in independent batching its backward is truly per sample
  (each its own steps); the parameter gradient ∫ Δ·aᵀ∂f/∂θ ds is a Gauss–Legendre sum over the
  accepted backward steps, every sample at its own nodes in one batched f call per node.
- Seminorm (Kidger et al. 2021) through per-component tolerances: atol=inf, rtol=0 zero the a_θ
  channels' contribution, and the others' tolerances are scaled by sqrt(m/N) (m counted of N
  components) so the RMS over N equals the RMS over the m counted ones: exactly the seminorm.
- f must treat samples independently (no batch statistics), as for independent batching.
- After backward, sol.extras["adjoint_stats"] = {nfe: augmented right-hand-side evaluations (one
  batched f call + VJP each, quadrature nodes included), steps: accepted backward steps, intervals}.
- Gradients w.r.t. t (refused: t must not require grad), double backward and the trace's
  eest/stiffness are not differentiable here; sol(t) gives values, and a gradient reaching them raises.
"""
from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable


class Adjoint:
    """Base class. A continuous adjoint implements `solve(prob, solver, params, options) -> Solution`
    whose `ys` are differentiable through a torch.autograd.Function."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class DiscreteAdjoint(Adjoint):
    """Backpropagation through every operation of the solve: the exact gradient of what was computed.
    Memory grows with the number of steps. The only adjoint under which the trace (eest, stiffness)
    is differentiable, so global regularizers need it."""


class _ContinuousAdjoint(Adjoint):
    carries_y = False       # backsolve: y re-integrated backwards in the state
    carries_theta = True    # quadrature: False (a_θ by quadrature)
    checkpoints = None
    seminorm = False
    rtol = None             # the backward solve's tolerances; None: the forward's
    atol = None

    def solve(self, prob, solver, adjoint_params, options):
        params = _resolve_params(prob, adjoint_params)
        if self.carries_y and params and _implicit(solver):
            # The state [y, a_y] of the whole batch would need a (2Bn × 2Bn) Jacobian and LU per step
            # (and second derivatives of f); backsolve is also the least reliable adjoint on stiff problems.
            raise ValueError(
                f"adjoint={type(self).__name__}() with solver={solver!r} and parameters is not supported: use "
                "InterpolatingAdjoint() or QuadratureAdjoint() (state a_y only; its Jacobian is -∂f/∂yᵀ) "
                "or DiscreteAdjoint()")
        if torch.is_grad_enabled():
            _check_closure(prob, params, options["lockstep"])
            _refuse_time_gradients(prob, self)
        holder = {}
        ys = _AdjointFunction.apply(self, prob, solver, options, holder, prob.y0, *params)
        sol = holder["sol"]
        sol.ys = ys
        _values_only_dense_output(sol, self)
        _values_only_trace(sol, self)
        return sol

    @property
    def _needs_dense(self):
        return not self.carries_y and self.checkpoints is None


class BacksolveAdjoint(_ContinuousAdjoint):
    """Re-integrates y backwards beside the adjoint: O(1) memory in the number of steps (only the
    saved values are kept). Can be inaccurate for stiff or chaotic problems (y is not reversible);
    use InterpolatingAdjoint there. seminorm: ignore the a_θ channels in the backward error norm.
    rtol, atol (all continuous adjoints): the backward solve's tolerances; None: the forward's."""

    carries_y = True

    def __init__(self, seminorm: bool = True, rtol=None, atol=None):
        self.seminorm = bool(seminorm)
        self.rtol, self.atol = _own_tolerances(rtol, atol)


class InterpolatingAdjoint(_ContinuousAdjoint):
    """y(t) in the backward pass from the forward solve's dense output (memory grows with the number
    of steps), or with checkpoints=True from a forward re-solve of each save interval started at
    the saved value (memory of one interval). State [a_y, a_θ]; seminorm as BacksolveAdjoint.
    With an implicit solver and parameters the state is a_y alone and a_θ comes by quadrature,
    as in QuadratureAdjoint (a_θ in the state would make the Jacobian to factorize (Bn+P)²)."""

    def __init__(self, checkpoints=None, seminorm: bool = True, rtol=None, atol=None):
        self.checkpoints = _check_checkpoints(checkpoints)
        self.seminorm = bool(seminorm)
        self.rtol, self.atol = _own_tolerances(rtol, atol)


class QuadratureAdjoint(_ContinuousAdjoint):
    """State a_y only (per sample, independent steps in independent batching); y(t) as
    InterpolatingAdjoint; the parameter gradient by Gauss–Legendre quadrature of aᵀ∂f/∂θ over each
    accepted step of the backward solve, using its dense output for a(t)."""

    carries_theta = False

    def __init__(self, checkpoints=None, rtol=None, atol=None):
        self.checkpoints = _check_checkpoints(checkpoints)
        self.rtol, self.atol = _own_tolerances(rtol, atol)


def _refuse_time_gradients(prob, adjoint):
    """The continuous adjoints do not differentiate the save times: say so rather than leave t.grad None."""
    if isinstance(prob.t, torch.Tensor) and prob.t.requires_grad:
        raise ValueError(f"t requires grad, but adjoint={type(adjoint).__name__}() does not differentiate the "
                         "save times: use adjoint=pb.DiscreteAdjoint() (the default; pb.odeint) for dL/dt, "
                         "or pass t.detach()")


def _values_only_dense_output(sol, adjoint):
    """sol(t) under a continuous adjoint comes from a forward solve without a graph. Its values are
    returned as they are, but a gradient that reaches them raises instead of being dropped."""
    interpolant = sol._interpolant
    if interpolant is None or not sol.ys.requires_grad:
        return
    anchor = sol.ys
    message = (f"sol(t) is not differentiable under adjoint={type(adjoint).__name__}() (its dense output "
               "comes from a forward solve without a graph): put the query times into t, or use "
               "adjoint=pb.DiscreteAdjoint(); detach() sol(t) where only its values are wanted")

    def values(t):
        out = interpolant(t)
        return _NoGradient.apply(out, anchor, message) if torch.is_grad_enabled() else out
    sol._interpolant = values


def _values_only_trace(sol, adjoint):
    """The trace of a solve under a continuous adjoint has no graph either: error_regularizer(sol)
    and stiffness_regularizer(sol) would silently add nothing to the gradient. Their backward raises."""
    trace = sol.trace
    if trace is None or not sol.ys.requires_grad or not torch.is_grad_enabled():
        return
    message = (f"sol.trace (and error_regularizer / stiffness_regularizer, built on it) is not differentiable "
               f"under adjoint={type(adjoint).__name__}(): the forward solve keeps no graph. Use "
               "adjoint=pb.DiscreteAdjoint() for the global regularizers, or solve(..., local_regularizer=...), "
               "which works with every adjoint; detach() the trace where only its values are wanted")
    for name in ("dt", "eest", "stiffness"):
        setattr(trace, name, _NoGradient.apply(getattr(trace, name), sol.ys, message))


class _NoGradient(torch.autograd.Function):
    """Identity on `values`, attached to the graph through `anchor`, whose backward raises."""

    @staticmethod
    def forward(ctx, values, anchor, message):
        ctx.message = message
        return values.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(ctx.message)


def _own_tolerances(rtol, atol):
    """An adjoint's own backward tolerances: each None (the forward solve's) or a finite number ≥ 0."""
    out = []
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 <= value < math.inf):
            raise ValueError(f"{name} of an adjoint must be None (the forward solve's) or a finite number ≥ 0; "
                             f"got {value!r}")
        out.append(None if value is None else float(value))
    if out == [0.0, 0.0]:
        raise ValueError("rtol and atol of an adjoint are both 0: no backward step could meet that")
    return tuple(out)


def _check_checkpoints(checkpoints):
    if checkpoints not in (None, False, True):
        raise ValueError(f"checkpoints must be None (forward dense output) or True (re-solve each "
                         f"save interval); got {checkpoints!r}")
    return checkpoints or None


def _implicit(solver):
    return getattr(solver, "family", "explicit_rk") != "explicit_rk"


def _resolve_params(prob, adjoint_params):
    if adjoint_params is None:
        f = prob.f
        return tuple(f.parameters()) if isinstance(f, torch.nn.Module) else ()
    params = tuple(adjoint_params)
    for p in params:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"adjoint_params must be tensors; got {type(p).__name__}")
    return _unique(params)


def _unique(params):
    """Each tensor once (a list such as list(model.parameters()) + [model.c] may repeat one): a
    repeated input of the autograd Function would receive its gradient once per occurrence."""
    seen = set()
    return tuple(p for p in params if not (id(p) in seen or seen.add(id(p))))


def _f_time(t_B, per_sample):
    """f's time argument: (B,) in independent batching of a batch, else 0-d (times are shared)."""
    return t_B if per_sample else t_B[0]


def _check_closure(prob, params, lockstep, fns=None):
    """A continuous adjoint can only differentiate y0 and adjoint_params: fail loudly, instead of
    returning silently missing gradients, when f (or each of `fns`, e.g. an SDE's f and g) uses
    another tensor that requires grad."""
    per_sample = prob.batched and not lockstep
    t0 = prob.t[:, 0] if prob.t.dim() == 2 else prob.t[0].expand(prob.batch_size)
    for fn in (fns or (prob.f,)):
        with torch.enable_grad():
            out = fn(_f_time(t0, per_sample), prob.y0.detach())
        if isinstance(out, torch.Tensor) and out.grad_fn is not None:
            _check_graph(out, params)


def _check_graph(out, params):
    ids = {id(p) for p in params}
    stops = {p.grad_fn for p in params if p.grad_fn is not None}
    todo, seen = [out.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen or fn in stops:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)
        if var is not None and id(var) not in ids:
            raise ValueError(
                f"f (or an SDE's g) uses a tensor of shape {tuple(var.shape)} that requires grad but is not among the "
                f"adjoint's parameters ({len(params)} given); a continuous adjoint differentiates only y0 "
                "and adjoint_params: pass adjoint_params=(...) including it, or use DiscreteAdjoint()")
        todo.extend(nxt for nxt, _ in fn.next_functions)


class _AdjointFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, adjoint, prob, solver, options, holder, y0, *params):
        from .torch_engine.engine import solve_ode
        with torch.no_grad():
            sol = solve_ode(prob, solver, differentiable_dt=False,
                            **dict(options, dense=options["dense"] or adjoint._needs_dense))
        dense = sol._interpolant
        if not options["dense"]:
            sol._interpolant = None  # internal only: the user did not ask for sol(t)
        sol.extras["adjoint_stats"] = {}
        holder["sol"] = sol
        ctx.adjoint, ctx.prob, ctx.solver, ctx.options = adjoint, prob, solver, options
        ctx.dense = dense if adjoint._needs_dense else None
        ctx.stats = sol.extras["adjoint_stats"]
        ctx.save_for_backward(sol.ys, *params)
        return sol.ys

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ys):
        ys, *params = ctx.saved_tensors
        want = [i for i, p in enumerate(params) if ctx.needs_input_grad[6 + i]]
        bw = _Backward(ctx, ys, [params[i] for i in want])
        g_y0, g_params = bw.run(grad_ys)
        grads = [None] * len(params)
        for i, g in zip(want, g_params):
            grads[i] = g.to(params[i].dtype)
        return (None,) * 5 + (g_y0 if ctx.needs_input_grad[5] else None,) + tuple(grads)


class _Backward:
    """The backward pass: one augmented solve per save interval (`interval`), shared by all three."""

    def __init__(self, ctx, ys, params):
        prob, self.adj, self.solver = ctx.prob, ctx.adjoint, ctx.solver
        # The backward solves take no regularization probe: that belongs to the forward solve. Nor
        # compile: their right-hand sides call autograd (vector-Jacobian products), which it cannot trace.
        self.opts = {k: v for k, v in ctx.options.items() if k not in ("local_regularizer", "seed", "compile")}
        self.f, self.params, self.dense, self.stats = prob.f, params, ctx.dense, ctx.stats
        self.prob = prob
        self.B = B = prob.batch_size
        self.shape = tuple(prob.y0.shape)
        self.n = prob.y0.numel() // B
        self.dtype = prob.y0.dtype
        self.ys = ys.reshape(ys.shape[0], B, self.n)
        self.t = prob.t.expand(B, -1) if prob.t.dim() == 1 else prob.t
        self.per_sample_time = prob.batched and not self.opts["lockstep"]
        # a_θ in the state would give an implicit solver a (Bn+P)² Jacobian to factorize: with one,
        # InterpolatingAdjoint integrates a_θ by quadrature as QuadratureAdjoint does.
        self.theta_in_state = self.adj.carries_theta and not (_implicit(self.solver) and params)
        # a_θ by quadrature in independent batching keeps samples apart; else the batch is one sample.
        self.whole = self.theta_in_state or not self.per_sample_time
        self.P = sum(p.numel() for p in params)
        self.stats.update(nfe=0, steps=0, intervals=0)

    def run(self, grad_ys):
        G = grad_ys.reshape(self.ys.shape)
        a = G[-1].clone()
        a_th = torch.zeros(self.P, dtype=self.dtype, device=a.device)
        for j in range(self.ys.shape[0] - 2, -1, -1):
            a, a_th = self.interval(j, a, a_th)
            a = a + G[j]
        g_params, k = [], 0
        for p in self.params:
            g_params.append(a_th[k:k + p.numel()].view_as(p))
            k += p.numel()
        return a.reshape(self.shape), g_params

    # --- pieces ---------------------------------------------------------------------------
    def _vjp(self, t_B, y, cot, want_y, theta=True):
        """f(t, y) and (cotᵀ∂f/∂y, cotᵀ∂f/∂θ) with y, cot of shape (B, n); θ flattened, in dtype."""
        if want_y and not (theta and self.params):
            # Functorch-composable (no autograd.grad): implicit solvers may take the Jacobian of
            # this right-hand side with torch.func (forward-over-reverse).
            fy, pullback = torch.func.vjp(lambda yy: self.f(_f_time(t_B, self.per_sample_time), yy),
                                          y.reshape(self.shape))
            return fy.reshape(self.B, self.n), pullback(cot.reshape(self.shape))[0].reshape(self.B, self.n), \
                y.new_zeros(0)
        with torch.enable_grad():
            y = y.detach().requires_grad_(want_y)
            fy = self.f(_f_time(t_B, self.per_sample_time), y.view(self.shape))
            inputs = ([y] if want_y else []) + list(self.params)
            gs = torch.autograd.grad(fy, inputs, cot.view(self.shape), allow_unused=True) if inputs else ()
        gs = [torch.zeros_like(x) if g is None else g for g, x in zip(gs, inputs)]
        g_y = gs[0].reshape(self.B, self.n) if want_y else None
        g_th = (torch.cat([g.reshape(-1).to(self.dtype) for g in gs[int(want_y):]]) if self.params
                else y.new_zeros(0))
        return fy.detach().reshape(self.B, self.n), g_y, g_th

    def _y_source(self, j, idle):
        """t (B, Q) -> y (Q, B, n) from the forward's dense output or a checkpoint re-solve. idle (B,):
        samples whose cotangent at t_{j+1} is zero; it stays zero over the interval whatever y is."""
        interp = self.dense
        if interp is None:
            from .problem import ODEProblem
            t = self.prob.t[..., j:j + 2]
            # An idle sample needs no y: it re-solves from a finite placeholder (its value at t_j, or
            # its start), whatever the outcome, and reads that constant. So a sample whose forward
            # solve failed (NaN from some t on; its re-solve might fail again) and whose values the
            # loss does not use leaves the others' gradients as without checkpoints.
            y0 = torch.where(torch.isfinite(self.ys[j]).all(-1, keepdim=True), self.ys[j], self.ys[0])
            sol = self._solve(ODEProblem(self.f, y0.reshape(self.shape), t, batched=self.prob.batched),
                              dict(self.opts, dense=True), what=f"checkpoint re-solve of interval {j}",
                              ignore=idle)
            re_solved = sol._interpolant

            def interp(tq, extrapolate):
                vals = re_solved(tq, extrapolate=extrapolate).reshape(tq.shape[1], self.B, self.n)
                return torch.where(idle[:, None], y0, vals)
        # Some implicit methods evaluate stages past the step's end (Kvaerno5: c₃ ≈ 1.23), so a
        # backward step ending at t_j may ask for y slightly outside the interval: extrapolate.
        return lambda tq: interp(tq, extrapolate=True).reshape(tq.shape[1], self.B, self.n)

    def _solve(self, aug_prob, opts, what, ignore=None):
        """ignore (B,): samples whose outcome does not matter (placeholders for failed ones)."""
        from .torch_engine.engine import solve_ode
        from .solution import ReturnCode
        sol = solve_ode(aug_prob, self.solver, differentiable_dt=False, **opts)
        bad = sol.retcode != ReturnCode.Success
        if ignore is not None:
            bad = bad & ~ignore.reshape(bad.shape)
        if bad.any():
            codes = sorted({ReturnCode(int(c)).name for c in sol.retcode.reshape(-1)[bad.reshape(-1)]})
            raise RuntimeError(f"{type(self.adj).__name__}: the {what} failed ({', '.join(codes)}); "
                               "the gradient cannot be computed (tighten tolerances, raise max_steps, "
                               "or try InterpolatingAdjoint / DiscreteAdjoint)")
        return sol

    def _backsolve_start(self, j, idle):
        """Backsolve's y at t_{j+1} and the factor of its derivative (Δ per sample). A sample that
        failed in the forward solve has no y there (NaN); if the loss does not use it (idle: zero
        cotangent), it holds its start value, a finite placeholder, still (factor 0)."""
        y_start, scale = self.ys[j + 1], self.t[:, j + 1:j + 2] - self.t[:, j:j + 1]
        missing = ~torch.isfinite(y_start).all(-1)
        if bool(missing.any()):
            used = missing & ~idle
            if bool(used.any()):
                b = int(used.nonzero()[0, 0])
                raise RuntimeError(f"BacksolveAdjoint: sample {b} failed in the forward solve and the loss uses "
                                   f"its values after the failure (at t = {float(self.t[b, j + 1]):g}); leave "
                                   "the failed samples (sol.retcode != 0) out of the loss")
            y_start = torch.where(missing[:, None], self.ys[0], y_start)
            scale = torch.where(missing[:, None], torch.zeros_like(scale), scale)
        return y_start, scale

    def _tolerances(self, k):
        """Per-component atol/rtol for the state [k blocks of (B, n), a_θ (P)] (or (B, n) per sample)."""
        o, adj = self.opts, self.adj
        atol = o["atol"] if adj.atol is None else adj.atol
        rtol = o["rtol"] if adj.rtol is None else adj.rtol
        if not self.whole:   # the state is (B, n): a per-component tolerance of y0's shape goes to (B, n)
            per_sample = lambda tol: (tol.broadcast_to(self.shape).reshape(self.B, self.n)  # noqa: E731
                                      if isinstance(tol, torch.Tensor) and tol.dim() > 0 else tol)
            return per_sample(atol), per_sample(rtol)
        P = self.P if self.theta_in_state else 0
        args = (self.shape, k, P, adj.seminorm, self.dtype, self.ys.device)
        return augmented_tolerance(atol, math.inf, *args), augmented_tolerance(rtol, 0.0, *args)

    def _step_options(self, dlt):
        """The forward's options in s-units: |dt_s| = |dt| / max|Δ| (fixed steps: a whole number per interval)."""
        o, scale = dict(self.opts), float(dlt.abs().max())
        if o["dt"] is not None:
            o["dt"] = 1.0 / math.ceil(scale / o["dt"] - 1e-9) if not o["adaptive"] else None
        o["dtmin"] = o["dtmin"] / scale
        o["dtmax"] = None if o["dtmax"] is None else o["dtmax"] / scale
        o["lockstep"] = False
        o["dense"] = not self.theta_in_state
        return o

    def interval(self, j, a, a_th):
        """Integrate the augmented system from t[j+1] to t[j]; returns (a(t_j), a_θ(t_j))."""
        from .problem import ODEProblem
        B, n, adj = self.B, self.n, self.adj
        t0, dlt = self.t[:, j], self.t[:, j + 1] - self.t[:, j]
        time = lambda s: t0 + s * dlt  # s: 0-d (whole batch) or (B,) (per sample) -> (B,)
        idle = (a.reshape(B, n) == 0).all(-1)
        y_at = None if adj.carries_y else self._y_source(j, idle=idle)
        k = 1 + adj.carries_y
        Bn = B * n
        y_start, dy_scale = (self._backsolve_start(j, idle) if adj.carries_y else (None, None))

        def rhs(s, z):
            zz = z.reshape(-1) if self.whole else z
            t_B = time(s)
            y = zz[:Bn].view(B, n) if adj.carries_y else y_at(t_B[:, None])[0]
            av = zz[(k - 1) * Bn:k * Bn].view(B, n)
            fy, g_y, g_th = self._vjp(t_B, y, av * dlt[:, None], want_y=True, theta=self.theta_in_state)
            self._nfe += 1
            parts = ([fy * dy_scale] if adj.carries_y else []) + [-g_y]
            if not self.whole:
                return parts[0]
            return torch.cat([p.reshape(-1) for p in parts] + ([-g_th] if self.theta_in_state else []))

        blocks = ([y_start] if adj.carries_y else []) + [a]
        if self.whole:
            z0 = torch.cat([b.reshape(-1) for b in blocks] + ([a_th] if self.theta_in_state else []))
        else:
            z0 = a
        s_span = torch.tensor([1.0, 0.0], dtype=self.dtype, device=a.device)
        atol, rtol = self._tolerances(k)
        opts = dict(self._step_options(dlt), atol=atol, rtol=rtol)
        self._nfe = 0
        sol = self._solve(ODEProblem(rhs, z0, s_span, batched=not self.whole), opts,
                          what=f"backward solve of interval {j}")
        self.stats["nfe"] += self._nfe
        self.stats["steps"] += int(sol.stats.naccept.max())
        self.stats["intervals"] += 1
        zT = sol.ys[-1]
        if self.whole:
            a = zT[(k - 1) * Bn:k * Bn].view(B, n)
            a_th = zT[k * Bn:] if self.theta_in_state else a_th
        else:
            a = zT
        if not self.theta_in_state and self.P:
            a_th = a_th + self._quadrature(sol, time, dlt, y_at)
        return a, a_th

    def _quadrature(self, sol, time, dlt, y_at):
        """∫_0^1 Δ·a(s)ᵀ ∂f/∂θ(t(s), y(t(s))) ds, Gauss–Legendre on each accepted step."""
        x, w = _gauss_legendre(self.order_nodes(), self.dtype, dlt.device)
        tr = sol.trace
        Bz = self.B if not self.whole else 1
        s_end, h, mask = (v.reshape(Bz, -1) for v in (tr.t, tr.dt, tr.mask))
        # Backwards in s: an accepted step covers [s_end, s_end + h].
        S = (s_end[..., None] + h[..., None] * x).reshape(Bz, -1)
        W = (h * mask)[..., None].mul(w).reshape(Bz, -1)
        a_q = sol(S).reshape(S.shape[1], self.B, self.n)
        t_q = time(S.T).T  # (B, Q): S.T is (Q, B) per sample or (Q, 1) for the whole batch
        y_q = y_at(t_q)
        out = torch.zeros(self.P, dtype=self.dtype, device=dlt.device)
        for q in range(S.shape[1]):
            wq = W[:, q] if not self.whole else W[0, q].expand(self.B)
            if not bool((wq != 0).any()):
                continue
            _, _, g_th = self._vjp(t_q[:, q], y_q[q], a_q[q] * (dlt * wq)[:, None], want_y=False)
            out = out + g_th
            self.stats["nfe"] += 1
        return out

    def order_nodes(self):
        from .torch_engine.engine import build_method
        order = build_method(self.solver, self.dtype, self.ys.device).order
        return max(2, math.ceil((order + 1) / 2))


def augmented_tolerance(tol, theta_val, shape, k, P, seminorm, dtype, device):
    """The tolerance (float, or tensor broadcastable to `shape`) for a flat state of k copies of
    `shape` followed by P parameter-adjoint channels. seminorm: those channels get theta_val
    (atol inf, rtol 0: err/scale = 0) and the others are scaled by sqrt(m/(m+P)), so that the
    loop's RMS over all m+P components equals the RMS over the m counted ones."""
    if not (seminorm and P) and not (isinstance(tol, torch.Tensor) and tol.dim() > 0):
        return tol
    numel = math.prod(shape)
    block = torch.as_tensor(tol, dtype=dtype, device=device).broadcast_to(shape).reshape(-1).repeat(k)
    if seminorm and P:
        block = block * math.sqrt(k * numel / (k * numel + P))
    theta = block.new_full((P,), theta_val if seminorm else float(block.mean()))
    return torch.cat([block, theta])


def _gauss_legendre(m, dtype, device):
    """Nodes and weights on [0, 1] (Golub–Welsch)."""
    k = torch.arange(1, m, dtype=torch.float64)
    off = k / torch.sqrt(4 * k * k - 1)
    J = torch.diag(off, 1) + torch.diag(off, -1)
    x, V = torch.linalg.eigh(J)
    w = 2 * V[0] ** 2
    return ((x + 1) / 2).to(dtype=dtype, device=device), (w / 2).to(dtype=dtype, device=device)
