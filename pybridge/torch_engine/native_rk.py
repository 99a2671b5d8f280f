"""Eager iterations of the adaptive explicit Runge–Kutta methods on the CPU without gradients, with
their bookkeeping in rk_step.c.

On a small problem the solver's cost is its number of dispatched torch ops (~1-5 µs each), and an
iteration of loop.Advance is ~100 of them beside the network's calls. :class:`NativeAdvance` does
the same iteration with one C call to aim the step, one per stage argument (and one for y1 without
FSAL) and one to judge it.
Measured on the issue-2 reference problem (MLP 2→64→2, batch 256, float32, one thread, 2026-12-06):
see benchmarks/RESULTS.md.

It is used where nothing needs the autograd graph or a compiled graph (:func:`usable`); otherwise,
and without a C compiler or with ``PYBRIDGE_NATIVE_STEP=0`` (or ``PYBRIDGE_NATIVE=0``), loop.Advance
runs. Both compute the same formulas in the same floating-point type; sums may round differently,
so solutions agree to rounding (tests/test_native_rk.py compares them).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
from pathlib import Path

import torch
import torch.autograd.forward_ad as forward_ad

from ..solution import ReturnCode
from .controller import PIController
from .explicit_rk import ExplicitRK, RKStep
from .stand_in import taking_part
from .loop import Iteration, end_targets
from .native_build import NativeLibrary

_SCALAR = {torch.float64: ("f64", ctypes.c_double), torch.float32: ("f32", ctypes.c_float)}
_kernels = {}   # dtype -> (Setup structure, aim, combine, judge, (first_step_a, first_step_b))


def _setup_structure(real):
    """rk_setup_<T> of rk_step.c (a solve's constants), for the scalar type real."""
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fields = ([(name, i64) for name in ("B", "n", "s", "lockstep", "fused")]
              + [(name, ptr) for name in ("nodes", "btilde", "tau_end", "slack", "dtmax", "atol", "rtol")]
              + [(name, real) for name in ("beta1", "beta2", "gamma", "qmin", "qmax", "qsteady_min", "qsteady_max",
                                           "dtmin")]
              + [(name, i64) for name in ("code_running", "code_success", "code_dtmin", "code_unstable", "n_save", "D")]
              + [(name, ptr) for name in ("tau_save", "dense", "next_save", "ys")])
    return type(f"Setup_{real.__name__}", (ctypes.Structure,), {"_fields_": fields})


def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for dtype, (suffix, real) in _SCALAR.items():
        setup = _setup_structure(real)
        aim, combine, judge = (getattr(lib, f"rk_{name}_{suffix}") for name in ("aim", "combine", "judge"))
        aim.argtypes = [ctypes.POINTER(setup)] + [ptr] * 5
        combine.argtypes = [ptr] * 5 + [i64] * 4
        aim.restype = combine.restype = None
        judge.argtypes = [ctypes.POINTER(setup)] + [ptr] * 18
        judge.restype = i64
        first_a, first_b = getattr(lib, f"rk_first_step_a_{suffix}"), getattr(lib, f"rk_first_step_b_{suffix}")
        first_a.argtypes = [ctypes.POINTER(setup)] + [ptr] * 6
        first_b.argtypes = [ctypes.POINTER(setup)] + [ptr] * 4 + [real] + [ptr] * 2
        first_a.restype = first_b.restype = None
        _kernels[dtype] = (setup, aim, combine, judge, (first_a, first_b))


_LIB = NativeLibrary(Path(__file__).with_name("rk_step.c"), "PYBRIDGE_NATIVE_STEP", "the native Runge–Kutta step",
                     "explicit solves use torch ops instead (slower on small problems)", _declare)


_torch_loop_only = False


@contextlib.contextmanager
def torch_loop_only():
    """Solves inside run loop.Advance even where NativeAdvance could (to compare the two, or to time
    the path that solves recording gradients take)."""
    global _torch_loop_only
    previous, _torch_loop_only = _torch_loop_only, True
    try:
        yield
    finally:
        _torch_loop_only = previous


def usable(method, opts, y0: torch.Tensor, controller) -> bool:
    """Whether NativeAdvance can run this solve: an adaptive explicit RK method, eager (not compiled),
    nothing recording gradients (autograd or forward-mode), a plain CPU float32/float64 state, the
    PI controller, steps not aimed at save points, no local-regularization probe, no event, and the
    library."""
    return (not _torch_loop_only and type(method) is ExplicitRK and method.adaptive and opts.adaptive and not opts.compile
            and not opts.stop_at_saves and opts.probe is None and opts.event is None
            and type(controller) is PIController
            and not torch.is_grad_enabled() and forward_ad._current_level < 0
            and type(y0) is torch.Tensor and y0.device.type == "cpu" and y0.dtype in _SCALAR
            and not torch._C._functorch.is_functorch_wrapped_tensor(y0)
            and _LIB.get() is not None)


@functools.lru_cache(maxsize=None)
def torch_fuses_multiply_add() -> bool:
    """Whether torch's addcmul rounds a + b·c once (its AVX2/AVX512 CPU kernels fuse it) or twice
    (its default kernels): the kernels' MADD follows, so that stage times and arguments agree."""
    a, b, c = (torch.full((64,), v, dtype=torch.float32) for v in (100000.25, 0.1171875, 0.3))
    fused = torch.addcmul(a, b, c)           # 100000.2890625 rounded once, 100000.28125 twice
    return bool((fused != a + b * c).all())


_coefficient_arrays = {}   # (tableau name, dtype) -> _coefficients


def _coefficients(tableau, dtype) -> dict:
    """The tableau's coefficients as arrays of dtype for the kernels (made once: read only)."""
    key = (tableau.name, dtype)
    if key not in _coefficient_arrays or _coefficient_arrays[key]["tableau"] is not tableau:
        as_array = lambda v: torch.tensor([float(x) for x in v], dtype=dtype)  # noqa: E731
        a_rows = [as_array(row) if len(row) else None for row in tableau.a]
        _coefficient_arrays[key] = {
            "tableau": tableau, "a_rows": a_rows, "a_ptrs": [0 if row is None else row.data_ptr() for row in a_rows],
            "b": as_array(tableau.b), "c": as_array(tableau.c), "btilde": as_array(tableau.b_error),
            # (from the tableau's numbers, not the method's tensors: a method first built inside a
            # torch.func transform holds wrappers without storage)
            "dense": (torch.tensor([[float(x) for x in row] for row in tableau.dense], dtype=dtype)
                      if tableau.dense is not None else None)}
    return _coefficient_arrays[key]


def _plain(k: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """k as a contiguous array of like's dtype (the kernels read raw memory)."""
    if k.dtype is not like.dtype or not k.is_contiguous() or not k.is_cpu:
        k = k.to(like).contiguous()
    return k


class NativeAdvance:
    """loop.Advance's iteration for the cases :func:`usable` admits, from the same settings; returns
    the same Iteration (stiffness computed, not deferred). :meth:`first_step` is the initial step.

    With `saves`, each accepted step also writes the save points it covers, as loop._flush_saves
    would (not for interpolants with lazy stages, which call f; see saves_inline), and
    :meth:`saved` gives ys (T, B, n). Iteration.step.ks (B, s, n) is filled only with `keep_stages`
    (dense output, or save points the loop interpolates)."""

    def __init__(self, rhs, method, controller, opts, atol, rtol, tau_save, dtmax, y0, saves=False,
                 keep_stages=True):
        self.rhs, self.method = rhs, method
        self.track_stopped, self.some_stopped = opts.lockstep, False   # (as loop.Advance's)
        dtype = tau_save.dtype
        (B, T), n = tau_save.shape, y0.shape[1]
        setup_type, self.aim_fn, self.combine_fn, self.judge_fn, self.first_fns = _kernels[dtype]
        tab = method.tableau
        s = tab.stages
        self.s, self.fsal, self.pair, self.order = s, tab.fsal, tab.stiffness_pair, method.order
        self.stage_ptrs = (ctypes.c_void_p * s)()
        coefficients = _coefficients(tab, dtype)
        self.a_ptrs, self.b = coefficients["a_ptrs"], coefficients["b"]
        self.keep_stages = keep_stages
        self.first_call = True
        tau_end, slack = end_targets(tau_save)
        tolerance = lambda x: torch.broadcast_to(torch.as_tensor(x, dtype=dtype), (B, n)).contiguous()  # noqa: E731
        # Tensors the setup points into are kept here (the structure holds bare addresses).
        self._held = {"nodes": coefficients["c"], "btilde": coefficients["btilde"], "tau_end": tau_end, "slack": slack,
                      "dtmax": dtmax.expand(B).contiguous(), "atol": tolerance(atol), "rtol": tolerance(rtol)}
        self.setup = setup_type(
            B=B, n=n, s=s, lockstep=int(opts.lockstep), fused=int(torch_fuses_multiply_add()),
            beta1=controller.beta1, beta2=controller.beta2, gamma=controller.gamma, qmin=controller.qmin,
            qmax=controller.qmax, qsteady_min=controller.qsteady_min, qsteady_max=controller.qsteady_max,
            dtmin=float(opts.dtmin), code_running=int(ReturnCode.Running), code_success=int(ReturnCode.Success),
            code_dtmin=int(ReturnCode.DtLessThanMin), code_unstable=int(ReturnCode.Unstable))
        self.ys = None
        if saves:
            self.ys = torch.full((B, T, n), float("nan"), dtype=dtype)
            self.ys[:, 0] = y0
            dense = coefficients["dense"]
            self._held.update(tau_save=tau_save.contiguous(), next_save=torch.ones(B, dtype=torch.long), ys=self.ys)
            if dense is not None and dense.shape[0] == s:
                self._held["dense"] = dense
                self.setup.D = dense.shape[1]
            self.setup.n_save = T
        for name, tensor in self._held.items():
            setattr(self.setup, name, tensor.data_ptr())
        self.setup_ref = ctypes.byref(self.setup)

    def first_step(self, tau, y0, f0):
        """controller.initial_step's Hairer–Wanner step (one more call of f), by the kernel."""
        tau, y0, f0 = (_plain(x, y0) for x in (tau, y0, f0))
        B = y0.shape[0]
        W, V, y1 = torch.empty((5, B), dtype=y0.dtype), torch.empty((2, B), dtype=torch.uint8), torch.empty_like(y0)
        first_a, first_b = self.first_fns
        first_a(self.setup_ref, tau.data_ptr(), y0.data_ptr(), f0.data_ptr(), W.data_ptr(), V.data_ptr(), y1.data_ptr())
        f1 = _plain(self.rhs(W[2], y1), y0)
        first_b(self.setup_ref, tau.data_ptr(), y0.data_ptr(), f0.data_ptr(), f1.data_ptr(), self.order,
                W.data_ptr(), V.data_ptr())
        return W[4]

    @staticmethod
    def saves_inline(method) -> bool:
        """Whether save points can be written by the kernel (an interpolant without lazy stages)."""
        return method.extra_stages == 0 and method.tableau.stages <= 64

    def saved(self) -> torch.Tensor:
        """The values at the save times, (T, B, n): y0 first, NaN where a sample did not get."""
        return self.ys.transpose(0, 1)

    def _stage_argument(self, y, h, rows):
        """stage_argument for ExplicitRK.stages: y_i = y + h Σ_j a_ij k_j by the kernel, written into
        rows[i - 1]."""
        ptrs, B, n, fused = self.stage_ptrs, y.shape[0], y.shape[1], self.setup.fused
        y_ptr, h_ptr, a_ptrs, combine = y.data_ptr(), h.data_ptr(), self.a_ptrs, self.combine_fn

        def argument(i, ks):
            k = ks[i - 1]                          # (the newest stage; the earlier ones are set)
            if k.dtype is not y.dtype or not k.is_contiguous() or not k.is_cpu:
                k = ks[i - 1] = _plain(k, y)       # (the kernel reads raw memory)
            ptrs[i - 1] = k.data_ptr()
            out = rows[i - 1]
            combine(out.data_ptr(), y_ptr, h_ptr, ptrs, a_ptrs[i], i, B, n, fused)
            return out
        return argument

    def __call__(self, tau, y, dt, k1, errold, status, active, next_save, noise=None, frozen=None) -> Iteration:
        if self.first_call:   # (the loop's initial state may be in any layout; later ones are ours)
            self.first_call = False
            tau, dt, errold, y, k1 = (_plain(x, y) for x in (tau, dt, errold, y, k1))
            status = status.contiguous()
        B, n = y.shape
        s = self.s
        # The per-sample results in arrays F, U, Y (rk_step.c's rows), each split into views once.
        # The stage arguments (and y1 without FSAL) are further rows of Y; each its own tensor where the
        # loop keeps the step's data (y1 for dense output: a row would keep the whole array alive).
        F, U, Y = (torch.empty((7 + s, B), dtype=y.dtype), torch.empty((3, B), dtype=torch.bool),
                   torch.empty((2 if self.keep_stages else 2 + s, B, n), dtype=y.dtype))
        h, t_end, eest, tau_new, dt_new, errold_new, stiff, *times = F.unbind(0)
        hit, accept, running = U.unbind(0)
        y_new, k1_new, *rows = Y.unbind(0)
        if self.keep_stages:
            rows = [torch.empty_like(y) for _ in range(s)]
        self.aim_fn(self.setup_ref, tau.data_ptr(), dt.data_ptr(), status.data_ptr(), F.data_ptr(), U.data_ptr())

        rhs = taking_part(self.rhs, active, k1) if self.some_stopped else self.rhs
        ks, args = self.method.stages(rhs, tau, y, h, k1, self._stage_argument(y, h, rows), times)
        ks[s - 1] = _plain(ks[s - 1], y)
        self.stage_ptrs[s - 1] = ks[s - 1].data_ptr()
        if self.fsal:
            y1, f_end, extra_eval = args[s - 1], ks[s - 1], None
        else:
            y1 = rows[s - 1]
            self.combine_fn(y1.data_ptr(), y.data_ptr(), h.data_ptr(), self.stage_ptrs, self.b.data_ptr(), s, B, n,
                            self.setup.fused)
            f_end = _plain(rhs(t_end, y1), y)
            extra_eval = accept
        i, j = self.pair
        (k_i, k_j), (g_i, g_j) = self.method.stiffness_operands(ks.__getitem__, s, (args.get(i), args.get(j)),
                                                                    y1, f_end)

        K = torch.empty((B, s, n), dtype=y.dtype) if self.keep_stages else None
        status_new = torch.empty_like(status)
        still_running = self.judge_fn(
            self.setup_ref, y.data_ptr(), y1.data_ptr(), f_end.data_ptr(), k1.data_ptr(), self.stage_ptrs,
            0 if K is None else K.data_ptr(), tau.data_ptr(), dt.data_ptr(), status.data_ptr(), errold.data_ptr(),
            k_i.data_ptr(), k_j.data_ptr(), g_i.data_ptr(), g_j.data_ptr(),
            F.data_ptr(), U.data_ptr(), Y.data_ptr(), status_new.data_ptr())
        step = RKStep(y1, None, K, (args.get(i), args.get(j)), s - 1)
        flags = [still_running > 0, still_running == B] if self.track_stopped else still_running > 0
        return Iteration(tau_new, y_new, k1_new, dt_new, errold_new, status_new, running, step, h, eest, accept,
                         hit, self._held["tau_end"], f_end, extra_eval, stiff, None, None, flags)
