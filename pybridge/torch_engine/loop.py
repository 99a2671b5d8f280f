"""The integration loop: per-sample stepping, step control, saving, trace and failure codes.

Everything is carried as (B,) or (B, n) tensors so that samples advance independently without
Python-level branching; the loop reads the device once per iteration (the termination flag, plus
the number of save points the step covered when steps stop at save points, in one transfer).

On small problems each dispatched tensor op costs about as much as its arithmetic, so the
per-step op count is the solver's overhead (benchmarks/overhead.py). Work that no later step
depends on is therefore batched over many steps: saved values (_flush_saves), the stiffness
trace (_flush_stiffness, for methods that offer `stiffness_terms`), and the nfe / naccept /
nreject counts (reduced from per-iteration records after the loop).

The tensor work of an iteration (choose h, step, error norm, accept, controller, return codes) is
`Advance`, a pure function of the loop state; `integrate` keeps the records. With
`LoopOptions.compile`, Advance runs as one torch.compile'd graph. Eager CPU solves of the adaptive
explicit methods that record no gradients run native_rk.NativeAdvance instead: the same iteration
with its bookkeeping in C (and the save points written as each step is accepted).

Time runs in τ = direction·t, so every sample integrates forwards; the caller's right-hand side
already accounts for the sign.
"""
from __future__ import annotations

import functools
import math
import re
import types
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch

from ..progress import SCALE as PROGRESS_SCALE, current_hook as progress_hook
from ..solution import ReturnCode, succeeded
from .events import after_event
from .stand_in import taking_part
from .controller import (Norm, PIController, constant, error_norm, initial_step, rows_both_finite, rows_finite,
                         step_floor)

RUNNING = int(ReturnCode.Running)
TERMINATED = int(ReturnCode.Terminated)


@dataclass
class LoopOptions:
    adaptive: bool = True
    dt: Optional[float] = None          # fixed step, or the first step of an adaptive solve
    dtmin: float = 0.0
    dtmax: Optional[float] = None
    max_steps: int = 100_000
    lockstep: bool = False
    dense: bool = False
    differentiable_dt: bool = False
    controller: Optional[PIController] = None
    stop_at_saves: bool = False         # step exactly onto save points (no interpolation needed)
    # Local regularization (Pal et al. 2023) needs one detached state per sample at a random time:
    # ("unbiased", tau_reg (B,)) interpolates at a time drawn uniformly in the span;
    # ("biased", (torch.Generator, draws)) picks uniformly among the accepted step ends (reservoir
    # sampling; draws = 1 in lockstep: one pick for the batch, B otherwise).
    probe: Optional[tuple] = None
    compile: bool = False               # run each iteration's tensor work as one torch.compile'd graph
    event: Optional[object] = None      # events.EventWatch: samples stop where their event function crosses 0


@dataclass
class LoopResult:
    ys: torch.Tensor                    # (T, B, n)
    status: torch.Tensor                # (B,) ReturnCode values
    nfe: torch.Tensor
    naccept: torch.Tensor
    nreject: torch.Tensor
    trace: dict                         # name -> (B, N) compacted, plus 'mask'
    dense: Optional[dict]               # per accepted step data for sol(t), compacted
    tau: torch.Tensor                   # (B,) where each sample stopped
    dt: torch.Tensor                    # (B,) its last step size
    probe: Optional[tuple] = None       # (tau_reg, y_reg) for local regularization, detached
    counters: Optional[dict] = None     # extra per-sample counts a method reports (njac, nlu, ...)
    y_end: Optional[torch.Tensor] = None  # (B, n) each sample's last state (a failed one's last finite)
    event: Optional[tuple] = None       # (τ_event (B,), y_event (B, n), found (B,)), with opts.event


class Iteration(NamedTuple):
    """What one iteration computes; the loop keeps the records (trace, saves, counts) of it."""
    tau_new: torch.Tensor               # (B,) where each sample is after this iteration
    y_new: torch.Tensor                 # (B, n)
    k1: torch.Tensor                    # (B, n) f(tau_new, y_new)
    dt: torch.Tensor                    # (B,) next step to try
    errold: torch.Tensor                # (B,) the controller's memory
    status: torch.Tensor                # (B,) return codes
    running: torch.Tensor               # (B,) still integrating
    step: tuple                         # the method's step (RKStep or the family's own)
    h: torch.Tensor                     # (B,) the step tried (0 for inactive samples)
    eest: torch.Tensor                  # (B,)
    accept: torch.Tensor                # (B,)
    hit: torch.Tensor                   # (B,) the step aimed exactly at the target
    target: torch.Tensor                # (B,) the time aimed at (the end, or the next save point)
    f_end: torch.Tensor                 # (B, n) f at the proposed step end
    extra_eval: Optional[torch.Tensor]  # (B,) samples that paid an evaluation for f_end (no FSAL)
    stiffness: Optional[torch.Tensor]   # (B,) the stiffness estimate, or None when deferred ...
    stiffness_terms: Optional[tuple]    # ... to these terms (batched later, see _flush_stiffness)
    blew_up: Optional[torch.Tensor]     # (B,) active samples whose step is not finite (with guard_blowups)
    flags: object                       # any running[, all running (track_stopped)][, any blew up]: the
                                        # loop reads it (bools where the iteration ran in C: native_rk)


def end_targets(tau_save):
    """(τ_end, slack), (B,) each: every sample's end time and the rounding slack within which a step
    ending near it counts as landing on it. (Contiguous: a view of tau_save has stride T, which a
    compiled iteration would guard on.)"""
    tau_end = tau_save[:, -1].contiguous()
    return tau_end, 100 * torch.finfo(tau_save.dtype).eps * torch.clamp(tau_end.abs(), min=1.0)


class Advance:
    """The tensor work of one loop iteration: pick each sample's step, take it, judge it, propose the
    next. Pure (no host reads, no Python state changed), so torch.compile can fuse it whole."""

    def __init__(self, rhs, method, norm, controller, opts, atol, rtol, tau_save, dtmax, guard_blowups=False):
        self.rhs, self.method, self.norm, self.controller, self.opts = rhs, method, norm, controller, opts
        self.guard_blowups = guard_blowups
        self.atol, self.rtol, self.tau_save, self.dtmax = atol, rtol, tau_save, dtmax
        self.tau_end, self.end_slack = end_targets(tau_save)
        eps = torch.finfo(tau_save.dtype).eps
        # Shape (1,), not 0-d: compiled, a 0-d float attribute costs a host read per call (a not-NaN guard).
        real = lambda v: constant(v, tau_save).reshape(1)  # noqa: E731
        self.slack_factor, self.snap_fraction = real(100 * eps), real(0.01)
        self.zero, self.inf, self.one = real(0.0), real(math.inf), real(1.0)
        self.nan = torch.tensor([math.nan], dtype=tau_save.dtype, device=tau_save.device)  # (NaN misses the cache)
        # Return codes as cached 0-d tensors (a Python number in torch.where costs a conversion per call).
        code_like = torch.zeros((), dtype=torch.long, device=tau_save.device)
        self.code = {rc: constant(int(rc), code_like) for rc in ReturnCode}
        self.defer_stiffness = hasattr(method, "stiffness_terms")
        # Fixed steps cannot retry; in lockstep one dt serves everyone, so a diverging sample is
        # stopped rather than allowed to shrink the batch's step. Otherwise it retries smaller.
        self.stop_diverged = not opts.adaptive or opts.lockstep
        # Lockstep: whether a sample has stopped (set by the loop, from `flags`); from then on the
        # stopped samples' rows of f are stood in for (stand_in.py), and take k1 (a step y + 0·k1).
        self.track_stopped = opts.lockstep
        self.some_stopped = False

    def aim(self, tau, dt, active, next_save):
        """(target, hit, h, end): the time each sample aims at, whether this step lands on it, the
        step and the time it ends at."""
        # Steps never pass the end, nor, for methods without a good interpolant, the next save point.
        if self.opts.stop_at_saves:
            T = self.tau_save.shape[1]  # (only here: the save times are otherwise not in the graph)
            target = torch.gather(self.tau_save, 1, next_save.clamp(max=T - 1)[:, None])[:, 0]
            # The slack is relative to the target being aimed at (a save point far below t_end must
            # not inherit t_end's slack, or a retry towards it could never shrink).
            slack = torch.clamp(target.abs(), min=1.0) * self.slack_factor
        else:
            target, slack = self.tau_end, self.end_slack
        remaining = target - tau
        if self.opts.adaptive:
            # Stretching a step onto the target is for rounding-size slivers: capped at 1% of the step,
            # else a slack wider than the steps the problem allows (float32 at t ~ 1e5: 100 ulps is 0.8)
            # makes every retry the same too-long step onto the target.
            raw_end = tau + torch.where(active, dt, self.zero)
            # (A step whose end rounds onto the target hits it too, or a zero-length step would follow.)
            hit = active & ((dt >= remaining - torch.minimum(slack, self.snap_fraction * dt)) | (raw_end >= target))
            end = torch.where(hit, target, raw_end)   # hit ⊆ active
            # The step is the time it advances: τ + dt rounds (float32 at t ~ 1e6 by up to 0.03), and a
            # state advanced by dt would drift from its time (~1% over a few steps there).
            return target, hit, end - tau, end
        # Fixed steps end on origin + k·dt (origin: the start, or the save point last stopped at), not
        # on a running sum, whose rounding adds up to a sliver of a last step (dt = 0.001 on [0, 2]:
        # a 2001st step of 1e-13). As OrdinaryDiffEq (PR #3441); fixed_loop.step_grid does the same.
        origin = (torch.gather(self.tau_save, 1, (next_save - 1).clamp(min=0)[:, None])[:, 0]
                  if self.opts.stop_at_saves else self.tau_save[:, 0])
        grid_end = origin + (torch.round((tau - origin) / dt) + 1) * dt
        h_grid = grid_end - tau
        hit = active & (h_grid >= remaining - slack)
        h = torch.where(hit, remaining, torch.where(active, h_grid, self.zero))
        return target, hit, h, torch.where(hit, target, grid_end)

    def __call__(self, tau, y, dt, k1, errold, status, active, next_save, noise=None, frozen=None) -> Iteration:
        """noise: an SDE step's Brownian increments over [tau, tau + h], drawn beforehand (compiled
        loops, see integrate); otherwise the step draws them itself. frozen (B,): samples whose step
        this iteration already found non-finite; they step with h = 0 and are judged as before
        (rejected, EEst = inf), so that no non-finite value enters the autograd graph."""
        opts, method, code = self.opts, self.method, self.code
        target, hit, h, t_end = self.aim(tau, dt, active, next_save)
        h_step, judged, rhs = h, active, self.rhs
        if frozen is not None:  # (the controller still sees the step it would have taken)
            h_step, judged = torch.where(frozen, self.zero, h), active & ~frozen
        if self.track_stopped and (self.some_stopped or frozen is not None):
            rhs = taking_part(rhs, active if frozen is None else active & ~frozen, k1)
        if noise is None:
            step = method.step(rhs, tau, y, h_step, k1)
        else:
            step = method.step(rhs, tau, y, h_step, k1, noise)

        # The step's end time, and f there: the next step starts from (y1, f(t1, y1)), so both must be
        # finite for the step to count (with h = 0, a stopped or frozen sample's stage y + 0·f would
        # otherwise be NaN, and so would the gradients of parameters the samples share). Without
        # FSAL, f(t1, y1) is one more batched call, for every sample (rejected ones: values unused).
        f_end = method.end_derivative(step)
        evaluated_end = f_end is None
        if evaluated_end:
            f_end = rhs(t_end if frozen is None else torch.where(frozen, tau, t_end), step.y1)
        # (Also where the last stage is in the error estimate, which it makes infinite: with
        # gradients, that infinite stage must not stay in the graph either.)
        finite_y1 = rows_both_finite(step.y1, f_end)
        blew_up = active & ~finite_y1 if self.guard_blowups and frozen is None else None
        if step.err is not None:
            eest = error_norm(self.norm, step.err, y, step.y1, self.atol, self.rtol, valid=judged)
        else:
            eest = self.nan.expand(tau.shape)
        if frozen is not None:
            finite_y1 = finite_y1 & ~frozen
            eest = torch.where(frozen, self.inf, eest)
        # A method may reject a sample's step itself (an implicit solve that did not converge).
        failed = getattr(step, "failed", None)
        accept = active & finite_y1 if failed is None else active & finite_y1 & ~failed
        if opts.adaptive:
            accept = accept & (eest <= self.one)

        hit_accept = hit & accept
        # The step that reaches the end time (target is tau_end unless stopping at save points).
        finishing = hit_accept if not opts.stop_at_saves else hit_accept & (target == self.tau_end)
        tau_new = torch.where(accept, t_end, tau)
        accept_col = accept[:, None]
        y_new = torch.where(accept_col, step.y1, y)
        extra_eval = accept if evaluated_end else None  # (charged to the samples whose step it ends)
        k1 = torch.where(accept_col, f_end, k1)
        stiff, stiff_terms = None, None
        if self.defer_stiffness:
            stiff_terms = method.stiffness_terms(step, step.y1, f_end)
        else:
            stiff = method.stiffness(step, step.y1, f_end, self.norm)

        if opts.adaptive:
            eest_ctrl = eest if opts.differentiable_dt or not eest.requires_grad else eest.detach()
            dt_new, errold = self.controller.propose(h, eest_ctrl, errold, accept)
            # A step shortened to land on a target says nothing about the size the problem allows.
            dt_new = torch.where(hit_accept, torch.maximum(dt_new, dt), dt_new)
            dt_new = torch.minimum(dt_new, self.dtmax)
            dtmin = step_floor(tau)   # (one ulp of τ; 10 made float32 solves at t ~ 1e5 fail)
            if opts.dtmin > 0:
                dtmin = torch.clamp(dtmin, min=opts.dtmin)
            # Also too small: a rejected step whose retry would end at the same (rounded) time, as where
            # the steps the problem needs are a few ulps of t (float32 far from t = 0).
            stalled = ~accept & (tau + dt_new == t_end)
            too_small = (active ^ finishing) & ((dt_new < dtmin) | stalled)  # finishing ⊆ active
            status = torch.where(too_small, torch.where(eest < self.inf, code[ReturnCode.DtLessThanMin],
                                                        code[ReturnCode.Unstable]), status)
            if failed is not None:
                status = torch.where(too_small & failed, code[ReturnCode.ConvergenceFailure], status)
            dt = torch.where(active, dt_new, dt)
        if self.stop_diverged:
            status = torch.where(active & ~finite_y1, code[ReturnCode.Unstable], status)
        if failed is not None and not opts.adaptive:
            # A fixed step cannot shrink: an implicit solve that did not converge ends the sample.
            status = torch.where(active & failed, code[ReturnCode.ConvergenceFailure], status)
        status = torch.where(finishing, code[ReturnCode.Success], status)
        running = status == RUNNING
        # What the loop reads from the device after the iteration, reduced here: inside a compiled
        # graph the reductions cost no separate (eager) op calls.
        flags = [running.any()] + ([running.all()] if self.track_stopped else []) + \
            ([blew_up.any()] if blew_up is not None else [])
        flags = flags[0] if len(flags) == 1 else torch.stack(flags)
        return Iteration(tau_new, y_new, k1, dt, errold, status, running, step, h, eest, accept, hit, target,
                         f_end, extra_eval, stiff, stiff_terms, blew_up, flags)


def integrate(rhs: Callable, method, tau_save: torch.Tensor, y0: torch.Tensor, atol, rtol,
              opts: LoopOptions) -> LoopResult:
    from .fixed_loop import grid_for, integrate_fixed  # (fixed_loop builds on this module)
    grid = grid_for(method, tau_save, opts)
    run = _integrate if grid is None else lambda *args: integrate_fixed(*args, grid)
    if not opts.compile:
        return run(rhs, method, tau_save, y0, atol, rtol, opts)
    # An integer a module updates in forward (a call counter) would otherwise be a constant of the
    # compiled graph: a recompilation per call until torch gives up and falls back to eager. With
    # this flag (and automatic dynamic shapes) it becomes a graph input after one recompilation.
    # Every solve shares Advance.__call__'s cache (one entry per solver, problem and mode), so allow
    # more entries than torch's default 8 before it falls back to eager. Set once per solve, not per
    # iteration: a config patch costs ~50 µs.
    with torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True, recompile_limit=64):
        return run(rhs, method, tau_save, y0, atol, rtol, opts)


def stand_in_where_f_fails_at_start(rhs, tau, y0, k1):
    """(y, k1, failed): the state the loop starts from, f there, and the samples that fail at once.

    A sample whose f(t0, y0) is not finite fails before its first step. With gradients, its f at
    y0 must not stay in the graph: a zero cotangent through f's non-finite derivative there is NaN
    for the parameters every sample shares. So it holds a stand-in state (the first finite
    sample's y0) from then on; its reported values are y0 at t0 and NaN after, as for any failure.
    Costs one more call of f, only when that happens."""
    failed = ~rows_finite(k1)
    if not bool(failed.any()):   # (the one host read, once per solve)
        return y0, k1, None
    if not torch.is_grad_enabled() or bool(failed.all()):
        return y0, k1, failed
    first_finite = int((~failed).nonzero()[0, 0])
    y = torch.where(failed[:, None], y0[first_finite].detach(), y0)
    return y, rhs(tau, y), failed


def as_later_iterations_state(y, k1):
    """With f's parameters requiring grad, the state carries their graph from the second iteration
    on; a y0 that does not require grad would give the first compiled iteration a graph of its own
    (a requires_grad guard). y0 as a leaf that requires grad keeps one graph for every iteration."""
    return y.detach().requires_grad_() if k1.requires_grad and not y.requires_grad else y


def _call(step, *args):
    return step(*args)


# Globals that only torch, Python and pybridge itself provide: module objects, their functions and
# constants. The compiled iteration's root frame is this module, so its own globals appear as G['name'].
# (A module of the user's named, say, torch_models or pybridge_runs is not one of them; of the
# namespaces of functions made by exec, only NamedTuple's tuple.__new__ is.)
_LIBRARY_GLOBAL = re.compile(r"^(dict\()?G\['(torch'\]|__import_torch('\]|_dot_)|__import_pybridge('\]|_dot_)|"
                             r"__builtins_dict|__import_functools'\]|__import_math'\]|"
                             r"___unnamed_scope_\w+'\]\['_tuple_new'\])")
_OWN_GLOBAL = re.compile(r"^(dict\()?G\['([A-Za-z_]\w*)'\]")


def _library_guards_dropped(entries):
    """torch.compile's guard filter: keep every guard but those on what only a library could change.

    Torch checks a compiled iteration's guards before each call. Dropped: identity checks of torch's,
    Python's and pybridge's own globals (modules, functions, constants), which nothing changes while
    a program runs; with an AD Jacobian (torch.func) they include a guard function run in Python.
    Kept: everything about the inputs (tensor shapes, dtypes, strides, aliasing), the step object
    and the user's f (its attributes, and the globals of the user's own modules, such as a network
    or a constant that a notebook reassigns), and the global state (grad mode, functorch and
    forward-AD levels). torch's skip_guard_on_globals_unsafe would drop the user's globals too.

    Compiled Rodas5P on VDPOL-mu (n = 2, AD Jacobian; 2026-12-03): dynamo's cache lookup ~60-85 ->
    ~15-35 µs per step, and the whole step ~340-480 -> ~150-230 µs (with Iteration.flags)."""
    own = globals()

    def library(e):
        if not e.is_global or e.guard_type == "DUPLICATE_INPUT":
            return False
        if _LIBRARY_GLOBAL.match(e.name):
            return True
        m = _OWN_GLOBAL.match(e.name)   # this module's own globals (the root frame's)
        return m is not None and not m.group(2).startswith("__import_") and m.group(2) in own
    return [not library(e) for e in entries]


@functools.lru_cache(maxsize=None)
def _compiled_call(cpp_wrapper: bool, kind: tuple):
    # One code object per kind of iteration (its own copy of _call): dynamo keeps a cache per code
    # object and, at every call, tries its entries' guards in turn, so a solver whose entry sits
    # behind another's paid for that one's failing guards. Tsit5 compiled after DP5 in one process,
    # (256, 2) MLP: 25 against 17 ms per solve (2026-12-06).
    code = _call.__code__.replace(co_name=f"_call_{len(_compiled_kinds)}")
    _compiled_kinds.append(kind)
    call = types.FunctionType(code, globals(), code.co_name)
    return torch.compile(call, options={"cpp_wrapper": cpp_wrapper, "guard_filter_fn": _library_guards_dropped})


_compiled_kinds: list = []   # (the kinds _compiled_call has made a code object for, in order)


def _iteration_kind(step) -> tuple:
    """What shapes an iteration's graph most: the step and method classes, the tableau, the batch
    mode and whether gradients are guarded (Advance.guard_blowups, FixedStep.guard)."""
    method = step.method
    tableau = getattr(method, "tableau", None)
    guarded = getattr(step, "guard_blowups", getattr(step, "guard", None))
    return (type(step), type(method), getattr(tableau, "name", None), step.norm.lockstep, guarded)


def compiled(step: Callable, device: torch.device) -> Callable:
    """step(*args) as one torch.compile'd graph. torch.compile(step) would cost ~0.5 ms at every
    solve (it copies the compiler's configuration), a tenth of a short fixed-step solve; one compiled
    caller built once takes the step as its first argument, and dynamo guards on it as it would on
    step itself (its type, attributes and the tensors it holds), so the compiled code is reused
    exactly where torch.compile(step) would reuse it.

    On CPU the generated code calls its kernels from C++ (inductor's cpp_wrapper) rather than from
    Python: a Rosenbrock step makes ~40 calls (fused kernels between LU solves and matmuls), and a
    compiled step of a small stiff problem takes ~1/3 less time (kin20: 457 -> 305 µs), for ~30%
    more compilation time. Not measured on CUDA (no GPU here), so the Python wrapper stays there."""
    return functools.partial(_compiled_call(device.type == "cpu", _iteration_kind(step)), step)


def tolerance_inputs(atol, rtol, dtype, device):
    """Tolerances as inputs of a compiled graph, not constants of it (no recompilation per rtol), and
    at least 1-d: a 0-d tensor gets a guard that reads it on the host at every call (not NaN)."""
    def as_input(x):
        x = torch.as_tensor(x, dtype=dtype, device=device)
        return x.reshape(1) if x.dim() == 0 else x
    return as_input(atol), as_input(rtol)


def _integrate(rhs: Callable, method, tau_save: torch.Tensor, y0: torch.Tensor, atol, rtol,
               opts: LoopOptions) -> LoopResult:
    from . import native_rk  # (it builds on this module)
    B, n = y0.shape
    T = tau_save.shape[1]
    dtype, device = y0.dtype, y0.device
    norm = Norm(opts.lockstep)
    controller = opts.controller or PIController.for_order(
        method.order, getattr(method.tableau, "beta1", None), getattr(method.tableau, "beta2", None),
        qsteady_max=getattr(method, "qsteady_max", 1.0))
    tau = tau_save[:, 0].clone()
    tau_end = tau_save[:, -1]
    span = tau_end - tau
    dtmax = span if opts.dtmax is None else torch.clamp(span, max=opts.dtmax)

    end_only = saves_end_only(opts, T)
    native, inline_saves = None, False
    if native_rk.usable(method, opts, y0, controller):   # (the same iteration with its bookkeeping in C)
        inline_saves = not end_only and native_rk.NativeAdvance.saves_inline(method)
        # (the step's stages are kept for dense output and for save points the loop interpolates)
        native = native_rk.NativeAdvance(rhs, method, controller, opts, atol, rtol, tau_save, dtmax, y0,
                                         saves=inline_saves, keep_stages=opts.dense or not (end_only or inline_saves))

    nfe = torch.ones(B, dtype=torch.long, device=device)
    y, k1, failed_at_start = stand_in_where_f_fails_at_start(rhs, tau, y0, rhs(tau, y0))
    if opts.dt is not None:
        # A tensor gives per-sample first steps (the SDE engine computes its own initial step).
        dt = (opts.dt.to(tau).expand_as(tau).clone() if isinstance(opts.dt, torch.Tensor)
              else torch.full_like(tau, float(opts.dt)))
    else:
        nfe += 1
        dt = (native.first_step(tau, y0, k1) if native is not None
              else initial_step(rhs, tau, y0, k1, method.order, atol, rtol, norm, dtmax))
        if opts.dtmin > 0:  # (as OrdinaryDiffEq's initial step: no smaller than dtmin)
            dt = torch.clamp(dt, min=opts.dtmin)
        if not opts.differentiable_dt:
            dt = dt.detach()
        if opts.lockstep:
            dt = dt.min().expand(B).contiguous()  # (one layout for every iteration: no recompiles)
    errold = controller.initial_errold(tau)
    status = torch.full((B,), RUNNING, dtype=torch.long, device=device)
    if failed_at_start is not None:
        status = torch.where(failed_at_start, int(ReturnCode.Unstable), status)
    counters = {key: [] for key in getattr(method, "counter_names", ())}
    # Per-iteration bookkeeping is kept as lists and reduced once after the loop (fewer ops per step).
    actives, step_nfes, extra_evals = [], [], []
    # Interpolants with lazy stages (Vern7) evaluate f when they interpolate: (B,) counts of those.
    lazy = getattr(method, "extra_stages", 0)
    lazy_evals = []
    n_iter = 0
    arange_cache = {}

    saved_vals, saved_idx = [], []
    defer_saves = not opts.stop_at_saves   # stop_at_saves needs next_save every step
    stiff_pending = []
    pending, pending_size = [], 0
    trace = {k: [] for k in ("t", "dt", "eest", "stiffness", "accept")}
    dense = {k: [] for k in ("tau", "h", "y0", "ks", "y1", "f1")} if opts.dense else None
    next_save = torch.ones(B, dtype=torch.long, device=device)
    max_iters = constant(int(ReturnCode.MaxIters), status)
    probe_tau, probe_y = tau.clone(), y0.detach()
    probe_count = torch.zeros(B, dtype=dtype, device=device)
    probe_step = None

    on_progress = progress_hook()

    if opts.compile:
        # The iteration's tensor work as one compiled graph (fused kernels instead of ~400 dispatched
        # ops); the first solve of a shape pays the compilation (seconds), later ones reuse it. What
        # varies between solves must be graph inputs, not constants of it: tolerances as tensors,
        # and the state in one memory layout (a (1,) view of tau_save has stride T, later ones 1).
        atol, rtol = tolerance_inputs(atol, rtol, dtype, device)
        tau, y, dt, k1, errold = (x.clone(memory_format=torch.contiguous_format) for x in (tau, y, dt, k1, errold))
        y = as_later_iterations_state(y, k1)
    # With gradients, a step that overflows is taken again with its overflowing samples at h = 0: a
    # zero cotangent times an infinite partial derivative is NaN, which would otherwise reach the
    # gradients of parameters every sample shares. It costs a second Advance only when it happens.
    guard_blowups = torch.is_grad_enabled()
    plain = native or Advance(rhs, method, norm, controller, opts, atol, rtol, tau_save, dtmax, guard_blowups)
    advance = compiled(plain, device) if opts.compile else plain
    # Lockstep: once a sample has stopped, the iteration stands in for its rows of f (stand_in.py).
    track_stopped = plain.track_stopped
    plain.some_stopped = track_stopped and failed_at_start is not None
    # An SDE step's Brownian increments come from host-side tree walks and look-ahead checks, which
    # do not trace: a compiled loop draws them eagerly for the step it is about to take.
    draw_outside = opts.compile and hasattr(method, "increments")

    events = opts.event
    if events is not None:
        events.start(tau, y)
    active = status == RUNNING
    while True:
        n_iter += 1
        frozen = None
        while True:  # once, or twice when a step blew up (guard_blowups)
            noise = None
            if draw_outside:
                h_next = plain.aim(tau, dt, active, next_save)[2]
                noise = method.increments(tau, h_next if frozen is None else torch.where(frozen, 0.0, h_next))
            it = advance(tau, y, dt, k1, errold, status, active, next_save, noise, frozen)
            it_status, running = it.status, it.running
            if events is not None:   # (a sample whose step crossed its event stops there)
                crossed, g_new = events.crossed(it.tau_new, it.y_new, it.accept)
                it_status = torch.where(crossed, TERMINATED, it_status)
                running = it_status == RUNNING
            if n_iter >= opts.max_steps:
                # A sample still running has been active in every iteration: its iters = n_iter.
                it_status = torch.where(running, max_iters, it_status)
                running = it_status == RUNNING
            h, accept, tau_new = it.h, it.accept, it.tau_new
            # (running is it.running unless max_steps just stopped the samples still running)
            if defer_saves and on_progress is None and running is it.running:
                values = it.flags.tolist() if isinstance(it.flags, torch.Tensor) else it.flags  # (see Iteration.flags)
                values = list(values) if isinstance(values, list) else [values]
            else:
                if defer_saves:
                    flags = [running.any()]
                else:
                    covered = (tau_save <= tau_new[:, None]).sum(1)
                    nsave = torch.where(accept, covered - next_save, constant(0, next_save))
                    flags = [running.sum(), nsave.max()]
                if on_progress is not None:  # solve(progress=True): the slowest running sample's covered fraction
                    covered_frac = torch.where(running, (tau_new - tau_save[:, 0]) / span, torch.ones_like(span))
                    flags.append((covered_frac.min() * PROGRESS_SCALE).long())
                if events is not None:
                    flags.append(crossed.any())
                if track_stopped:
                    flags.append(running.all())
                if it.blew_up is not None:
                    flags.append(it.blew_up.any())
                values = (torch.stack([x.long() for x in flags]).tolist() if len(flags) > 1 else [bool(flags[0])])
            # (values: the loop's one read from the device per iteration)
            if it.blew_up is not None and values.pop():
                frozen = it.blew_up
                plain.some_stopped = track_stopped   # (a frozen sample steps h = 0, then stops)
                continue
            break
        step, status = it.step, it_status
        if track_stopped and not values.pop():
            plain.some_stopped = True
        if events is not None:
            _keep_event_step(events, values.pop(), crossed, g_new, method, rhs, tau, it.h, y, step, it.f_end,
                             lazy, lazy_evals)
        still_running, *rest = values
        actives.append(active)
        step_nfes.append(step.nfe)
        for key, count in (getattr(step, "stats", None) or {}).items():
            counters.setdefault(key, []).append((len(actives) - 1, count))
        if it.extra_eval is not None:
            extra_evals.append(it.extra_eval)
        f_end = it.f_end

        # Save points covered by accepted steps, interpolated with the method's own dense output:
        # batched over many steps (see _flush_saves), or per step when the targets follow the saves.
        if defer_saves and not end_only and not inline_saves:
            size = step.ks.numel() + 3 * y.numel()
            if pending and (pending_size + size > SAVE_BUFFER_ELEMENTS or step.ks.shape != pending[0][3].shape):
                next_save = _flush_saves(method, pending, tau_save, next_save, saved_vals, saved_idx,
                                         rhs, lazy_evals)
                pending, pending_size = [], 0
            pending.append((tau, h, y, step.ks, step.y1, f_end, tau_new))
            pending_size += size
        k_max = 0 if defer_saves else rest.pop(0)
        frac = rest
        if frac:
            on_progress(frac[0] / PROGRESS_SCALE)
        if k_max > 0:
            j = arange_cache.get(k_max)
            if j is None:
                j = arange_cache[k_max] = torch.arange(k_max, device=device)
            idx = next_save[:, None] + j
            valid = j < nsave[:, None]
            tq = torch.gather(tau_save, 1, idx.clamp(max=T - 1))
            safe_h = torch.where(accept, h, 1.0)
            theta = torch.where(valid, (tq - tau[:, None]) / safe_h[:, None], 0.0)
            # Steps that stop at save points end on them (a save point is never inside a step), so
            # every value here is a step's y1: an interpolant's lazy stages are not evaluated.
            vals = method.interpolate(y, h, step.ks, step.y1, f_end, theta)
            at_end = (tq >= tau_new[:, None])[..., None]
            vals = torch.where(at_end, _value_at_step_end(step.y1[:, None], f_end[:, None], tq[..., None],
                                                          tau_new[:, None, None]), vals)
            saved_vals.append(vals)
            saved_idx.append(torch.where(valid, idx, T))
            next_save = next_save + nsave

        if opts.probe is not None:
            finished = it.hit & (it.target == tau_end)
            if lazy and opts.probe[0] == "unbiased":
                # Keep the step that holds the time; interpolate once after the loop (its lazy
                # stages cost evaluations that only that one step needs).
                probe_step = _keep_probe_step(opts.probe[1], accept, tau, tau_new, h, y, step, f_end, probe_step)
            else:
                probe_tau, probe_y = _update_probe(opts.probe, method, accept, finished, tau, h,
                                                   tau_new, y, step, f_end, probe_tau, probe_y, probe_count)
            probe_count = probe_count + (accept & ~finished)

        if it.stiffness_terms is not None:  # computed for many steps at once (_flush_stiffness); a placeholder until then
            stiff_pending.append(it.stiffness_terms)
        for key, val in (("t", tau_new), ("dt", h), ("eest", it.eest), ("stiffness", it.stiffness), ("accept", accept)):
            trace[key].append(val)
        if stiff_pending and len(stiff_pending) * 2 * y.numel() > SAVE_BUFFER_ELEMENTS:
            _flush_stiffness(method, stiff_pending, trace["stiffness"], norm)
        # Per-step quantities a method adds to the trace (e.g. which method an auto-switcher used).
        for key, val in (getattr(step, "extra_trace", None) or {}).items():
            trace.setdefault(key, []).append(val)
        if dense is not None:
            for key, val in (("tau", tau), ("h", h), ("y0", y), ("ks", step.ks), ("y1", step.y1), ("f1", f_end)):
                dense[key].append(val)
        tau, y, k1, dt, errold = tau_new, it.y_new, it.k1, it.dt, it.errold
        active = running
        if not still_running:
            break

    # Per-sample counts from the per-iteration records: iterations while running, accepted steps,
    # and evaluations (the method's per-step count while active, plus f(t1, y1) on accepted steps
    # for methods without FSAL).
    active_steps = torch.stack(actives)                         # (N, B)
    iters = active_steps.sum(0)
    naccept = torch.stack(trace["accept"]).sum(0)
    nfe = nfe + _count_while_active(active_steps, step_nfes)
    # Stats a method counts per step (njac, nlu, nsolve, Newton iterations) while the sample is active.
    counters = {key: _count_while_active(active_steps[[i for i, _ in c]], [x for _, x in c])
                for key, c in counters.items()}
    if extra_evals:
        nfe = nfe + torch.stack(extra_evals).sum(0)

    if stiff_pending:
        _flush_stiffness(method, stiff_pending, trace["stiffness"], norm)
    if pending:
        next_save = _flush_saves(method, pending, tau_save, next_save, saved_vals, saved_idx, rhs, lazy_evals)
    if lazy_evals:
        nfe = nfe + torch.stack(lazy_evals).sum(0)
    if probe_step is not None:
        probe_tau, probe_y = _interpolate_probe(method, rhs, opts.probe[1], probe_step, probe_tau, probe_y)
    ys = (end_saves(y0, y, succeeded(status)) if end_only
          else plain.saved() if inline_saves else _assemble_saves(y0, saved_vals, saved_idx, T))
    event = None
    if events is not None:
        event = events.locate(method, B, dtype, device)
        tau_evt, _, found = event
        ys = torch.where(after_event(tau_save, tau_evt, found)[..., None], math.nan, ys)
        tau = torch.where(found, tau_evt.detach(), tau)   # (where the solution ends: sol(t) is NaN after)
    return LoopResult(ys=ys, status=status, nfe=nfe, naccept=naccept, nreject=iters - naccept, counters=counters,
                      trace=_compact(trace, "accept"),
                      dense=_compact(dense, None, trace["accept"]) if dense else None, tau=tau, dt=dt,
                      probe=(probe_tau, probe_y) if opts.probe is not None else None, y_end=y, event=event)


def _keep_event_step(events, any_crossed, crossed, g_new, method, rhs, tau, h, y, step, f_end, lazy, lazy_evals):
    """Hand the crossing samples' step to the event watch (only in iterations where one crossed).
    An interpolant's lazy stages are evaluated now, at this iteration's times (in lockstep f gets
    one time for the batch, which after the loop would no longer be the crossing samples')."""
    if not any_crossed:
        return events.keep(None, g_new, None)
    ks = step.ks
    if lazy:
        ks = method.extend_stages(rhs, tau, y, h, ks, use=crossed)
        lazy_evals.append(crossed.long() * lazy)
    events.keep(crossed, g_new, (tau, h, y, ks, step.y1, f_end))


def _count_while_active(active_steps, counts):
    """Σ over iterations of counts[i] (an int, or per sample) where the sample was active (N, B)."""
    if not counts:   # (a counter the method has but no step reported)
        return torch.zeros(active_steps.shape[1], dtype=torch.long, device=active_steps.device)
    if all(isinstance(c, int) for c in counts):
        if len(set(counts)) == 1:
            return counts[0] * active_steps.sum(0)
        return (active_steps * torch.tensor(counts, device=active_steps.device)[:, None]).sum(0)
    B = active_steps.shape[1]
    per_step = torch.stack([torch.as_tensor(c, device=active_steps.device).expand(B) for c in counts])
    return (active_steps * per_step).sum(0)


# Steps whose save points are interpolated together; bounds the memory the buffer holds on top of
# what autograd keeps anyway (elements of ks, y, y1 and f1 over the buffered steps).
SAVE_BUFFER_ELEMENTS = 1 << 22


def _flush_stiffness(method, terms, series, norm):
    """Fill the trailing placeholders of the stiffness trace from the buffered terms, in one go."""
    dk, dg = (torch.stack(x) for x in zip(*terms))          # (M, B, n)
    series[len(series) - len(terms):] = list(method.stiffness_from_terms(dk, dg, norm).unbind(0))
    terms.clear()


def _flush_saves(method, pending, tau_save, next_save, saved_vals, saved_idx, rhs=None, lazy_evals=None):
    """Values at the save points that the buffered steps covered, in one batched interpolation.

    pending holds per iteration (tau, h, y0, ks, y1, f1, tau_new) for every sample (rejected and
    finished samples have tau_new == tau). The save point tq of a sample lies in the first buffered
    step whose end reaches it, tau_new >= tq: earlier steps end before it and a rejected step's
    tau_new is the previous end, so that step is the accepted one with tau < tq <= tau_new. The
    values are those the per-step computation gives: the method's interpolant at θ = (tq − tau)/h,
    and y1 itself where tq is the step's end. Returns the advanced next_save.

    An interpolant with lazy stages (method.extra_stages > 0) gets them per buffered step that holds
    a save point of some sample strictly inside: rhs is called on that step's (B, n) batch, never
    on the gathered rows; each sample is charged (in lazy_evals) for the steps it needed.
    """
    taus, hs, ys, kss, y1s, fs, tnews = (torch.stack(x) for x in zip(*pending))  # (M, B, ...)
    M, B = taus.shape
    T = tau_save.shape[1]
    nsave = (tau_save <= tnews[-1][:, None]).sum(1) - next_save
    K = int(nsave.max())
    if K <= 0:
        return next_save
    j = torch.arange(K, device=tau_save.device)
    idx = next_save[:, None] + j                                  # (B, K)
    valid = j < nsave[:, None]
    tq = torch.gather(tau_save, 1, idx.clamp(max=T - 1))
    m = torch.searchsorted(tnews.T.contiguous(), tq.contiguous()).clamp(max=M - 1)
    rows = (m * B + torch.arange(B, device=m.device)[:, None]).reshape(-1)     # (B*K,) into (M*B)
    pick = lambda x: x.reshape((M * B,) + x.shape[2:]).index_select(0, rows)
    tau_m, h_m, tnew_m, y1_m = pick(taus), pick(hs), pick(tnews), pick(y1s)
    tq, valid_f = tq.reshape(-1), valid.reshape(-1)
    theta = torch.where(valid_f, (tq - tau_m) / torch.where(valid_f, h_m, 1.0), 0.0)[:, None]
    lazy = getattr(method, "extra_stages", 0) if rhs is not None else 0
    steps = []
    if lazy:
        # need[i, b]: a save point of sample b lies inside buffered step i (one at its end is y1).
        inner = valid_f & (tq < tnew_m)
        need = torch.zeros(M * B, dtype=torch.long, device=rows.device)
        need = need.scatter_reduce(0, rows, inner.long(), "amax").view(M, B).bool()
        steps = need.any(1).nonzero().flatten().tolist()
    if steps:
        ext = torch.stack([method.extend_stages(rhs, taus[i], ys[i], hs[i], kss[i], use=need[i])
                           for i in steps])                                 # (M', B, s + e, n)
        pos = torch.zeros(M, dtype=torch.long, device=rows.device)
        pos[steps] = torch.arange(len(steps), device=rows.device)
        rows_e = (pos[m] * B + torch.arange(B, device=m.device)[:, None]).reshape(-1)
        ks_m = ext.reshape((len(steps) * B,) + ext.shape[2:]).index_select(0, rows_e)
        lazy_evals.append(need.sum(0) * lazy)
    else:
        ks_m = pick(kss)
    vals = method.interpolate(pick(ys), h_m, ks_m, y1_m, pick(fs), theta)[:, 0]
    vals = torch.where((tq >= tnew_m)[:, None], _value_at_step_end(y1_m, pick(fs), tq[:, None], tnew_m[:, None]),
                       vals)
    saved_vals.append(vals.reshape(B, K, -1))
    saved_idx.append(torch.where(valid, idx, T))
    return next_save + nsave


def _value_at_step_end(y1, f1, tq, t1):
    """y at a save time tq equal to the step's end t1: y1 + (tq − t1)·f(t1, y1), which is y1 itself.
    With t requiring grad the form matters: dy/dtq = f1 where the step ended on t0 + k·dt, which
    does not move with tq (y1 alone gave such a save time a zero gradient), and 0 + dy1/dtq where
    the step was aimed at tq (t1 is tq there, and y1 depends on it through h)."""
    return y1 + (tq - t1) * f1 if tq.requires_grad else y1


def _assemble_saves(y0, vals, idx, T):
    """One scatter at the end instead of an in-place write per step (cheaper backward)."""
    B, n = y0.shape
    out = torch.full((B, T + 1, n), float("nan"), dtype=y0.dtype, device=y0.device)
    out = out.index_copy(1, torch.zeros(1, dtype=torch.long, device=y0.device), y0[:, None])
    if vals:
        V = torch.cat(vals, 1)
        I = torch.cat(idx, 1)
        out = out.scatter(1, I[..., None].expand(-1, -1, n), V)
    return out[:, :T].transpose(0, 1)


def saves_end_only(opts, T):
    """Whether the save times are the start and the end only, with steps not aimed at them: then the
    end's value is the last state of the samples that got there (no buffering and interpolation of
    every step's stages)."""
    return not opts.stop_at_saves and T == 2


def end_saves(y0, y_end, reached):
    """ys (2, B, n) for save times (start, end): y_end where the sample got to the end, else NaN."""
    nan = torch.tensor(math.nan, dtype=y_end.dtype, device=y_end.device)
    return torch.stack([y0, torch.where(reached[:, None], y_end, nan)])


def _compact(series: dict, mask_key: Optional[str], mask_list=None) -> dict:
    """Stack per-iteration (B, ...) tensors to (B, N, ...) keeping accepted steps, left-aligned."""
    mask = torch.stack(series[mask_key] if mask_key else mask_list, 1)  # (B, N)
    # Without a rejected step in any sample, every row is already accepted steps then padding: no
    # sort and gathers (one host read instead; a solve's whole trace is small).
    aligned = mask.shape[1] < 2 or not bool((mask[:, 1:] & ~mask[:, :-1]).any())
    order = None if aligned else torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
    out = {}
    for key, vals in series.items():
        if key == mask_key:
            continue
        x = torch.stack(vals, 1)
        m = mask
        if order is not None:
            gather_idx = order.view(order.shape + (1,) * (x.dim() - 2)).expand_as(x)
            x = torch.gather(x, 1, gather_idx)
            m = torch.gather(mask, 1, order)
        m = m.view(mask.shape + (1,) * (x.dim() - 2))
        out[key] = torch.where(m, x, torch.zeros_like(x))
    out["mask"] = mask if order is None else torch.gather(mask, 1, order)
    return out


def _update_probe(probe, method, accept, finished, tau, h, tau_new, y, step, f_end, probe_tau, probe_y, count):
    """Keep the detached state at the regularization time of each sample (see LoopOptions.probe)."""
    kind, arg = probe
    with torch.no_grad():
        if kind == "unbiased":
            inside = accept & (tau < arg) & (arg <= tau_new)
            return _probe_at(method, arg, inside, tau, h, y, step.ks, step.y1, f_end, probe_tau, probe_y)
        # biased: the k-th eligible step end replaces the kept one with probability 1/k.
        eligible = accept & ~finished
        k = count + 1
        gen, draws = arg
        u = torch.rand(draws, generator=gen, dtype=tau.dtype, device="cpu").to(tau.device).expand(accept.shape)
        take = eligible & (u * k < 1)
        return torch.where(take, tau_new, probe_tau), torch.where(take[:, None], step.y1.detach(), probe_y)


def _keep_probe_step(tau_reg, accept, tau, tau_new, h, y, step, f_end, kept):
    """The data of the accepted step that holds each sample's regularization time (detached)."""
    inside = accept & (tau < tau_reg) & (tau_reg <= tau_new)
    new = (inside, tau, h, y, step.ks, step.y1, f_end)
    if kept is None:
        return tuple(x.detach() for x in new)
    col = lambda x: inside.view((-1,) + (1,) * (x.dim() - 1))
    return (kept[0] | inside,) + tuple(torch.where(col(a), a.detach(), b) for a, b in zip(new[1:], kept[1:]))


def _interpolate_probe(method, rhs, tau_reg, kept, probe_tau, probe_y):
    """The unbiased probe from the kept step, as _update_probe computes it per step."""
    found, tau, h, y, ks, y1, f1 = kept
    with torch.no_grad():
        ks = method.extend_stages(rhs, tau, y, h, ks, use=found)
        return _probe_at(method, tau_reg, found, tau, h, y, ks, y1, f1, probe_tau, probe_y)


def _probe_at(method, tau_reg, inside, tau, h, y, ks, y1, f1, probe_tau, probe_y):
    """(tau_reg, y(tau_reg)) for the samples whose step (tau, h, ...) holds tau_reg, else the kept ones."""
    theta = ((tau_reg - tau) / torch.where(inside, h, torch.ones_like(h)))[:, None]
    theta = torch.where(inside[:, None], theta, torch.zeros_like(theta))
    val = method.interpolate(y, h, ks, y1, f1, theta)[:, 0]
    return torch.where(inside, tau_reg, probe_tau), torch.where(inside[:, None], val, probe_y)
