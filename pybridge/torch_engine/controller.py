"""Error norm, PI step-size controller and initial step, as OrdinaryDiffEq does them (SOLVERS.md)."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch


class Norm:
    """RMS over a sample's components (independent batching) or over the whole batch (lockstep).

    Tensors are (B, n); the result is (B,) either way, so the loop never branches on the mode.
    `valid` masks samples out of a lockstep reduction (failed samples must not poison the others).
    """

    def __init__(self, lockstep: bool):
        self.lockstep = lockstep

    def __call__(self, x: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        sq = x.square()
        if not self.lockstep:
            return _safe_sqrt(sq.mean(-1))
        if valid is None:
            return _safe_sqrt(sq.mean()).expand(x.shape[0])
        count = (valid.sum() * x.shape[1]).clamp_min(1)
        total = torch.where(valid[:, None], sq, constant(0.0, sq)).sum()
        return _safe_sqrt(total / count).expand(x.shape[0])


def _safe_sqrt(x):
    # sqrt'(0) is infinite: finished samples (h = 0, zero error) would turn gradients into NaN.
    zero = constant(0.0, x)
    positive = x > zero
    return torch.where(positive, torch.where(positive, x, constant(1.0, x)).sqrt(), zero)


@functools.lru_cache(maxsize=None)
def _constant(value, dtype, device):
    # Built outside inference mode: an inference tensor could not be saved for backward later.
    with torch.inference_mode(False):
        return torch.tensor(value, dtype=dtype, device=device)


def constant(value, like: torch.Tensor) -> torch.Tensor:
    """A cached 0-d tensor of `value` (not NaN: it would miss the cache) with like's dtype and device.

    A Python number in a tensor op is wrapped and converted to the op's dtype on every call
    (torch.where even builds a new tensor), which costs as much as the op itself; the result is
    the same, the number being rounded to the dtype either way."""
    if torch.compiler.is_compiling():  # a graph constant there (the compiler folds it; no cache to trace)
        return torch.tensor(value, dtype=like.dtype, device=like.device)
    return _constant(value, like.dtype, like.device)


def _as_operand(value, like):
    """value itself if a tensor (per-component tolerances), else the cached constant."""
    return value if isinstance(value, torch.Tensor) else constant(value, like)


def rows_finite(x: torch.Tensor) -> torch.Tensor:
    """isfinite(x).all(-1) in fewer ops (isfinite dispatches several): |x| < inf is False for ±inf and NaN."""
    return (x.abs() < constant(math.inf, x)).all(-1)


def rows_both_finite(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """rows_finite(x) & rows_finite(y), as one check of x + y where the shapes agree: the sum is
    non-finite if either term is, and overflows otherwise only at the floating-point limit."""
    return rows_finite(x + y) if x.shape == y.shape else rows_finite(x) & rows_finite(y)


def error_norm(norm: Norm, err, y0, y1, atol, rtol, valid=None) -> torch.Tensor:
    """EEst = rms(err / (atol + rtol·max(|y0|, |y1|))); non-finite errors give +inf.

    Non-finite entries are zeroed before the norm (and the result replaced afterwards) so that a
    diverging sample cannot turn the others' gradients into NaN.
    """
    ymax = torch.maximum(y0.abs(), y1.abs())
    scale = _as_operand(atol, ymax) + _as_operand(rtol, ymax) * ymax
    ratio = err / scale
    inf = constant(math.inf, ratio)
    if not norm.lockstep and not ratio.requires_grad:
        # Without gradients to protect, no zeroing is needed: a non-finite component makes its
        # own sample's mean square NaN or inf (and only that sample's), and an overflowing square
        # gives inf as before.
        ms = ratio.square().mean(-1)
        return torch.where(ms < inf, ms.sqrt(), inf)
    finite = rows_finite(ratio)
    if norm.lockstep and valid is not None:
        # Rows outside the lockstep reduction are zeroed by the norm anyway: one mask for both.
        valid = valid & finite
        safe = torch.where(valid[:, None], ratio, constant(0.0, ratio))
        count = (valid.sum() * ratio.shape[1]).clamp_min(1)
        root = _safe_sqrt if ratio.requires_grad else torch.sqrt  # the guard is for gradients only
        eest = root(safe.square().sum() / count).expand(ratio.shape[0])
    else:
        safe = torch.where(finite[:, None], ratio, constant(0.0, ratio))
        eest = norm(safe, finite)
    return torch.where(finite, eest, inf)


@dataclass
class PIController:
    """OrdinaryDiffEq's PI controller (defaults: β1 = 7/(10p), β2 = 2/(5p), γ = 0.9, qmin = 1/5, qmax = 10)."""

    beta1: float
    beta2: float
    gamma: float = 0.9
    qmin: float = 0.2
    qmax: float = 10.0
    qsteady_min: float = 1.0
    qsteady_max: float = 1.0  # implicit methods use 1.2: keep dt (and the factorization) when q is near 1

    @classmethod
    def for_order(cls, order: int, beta1=None, beta2=None, **kw) -> "PIController":
        return cls(beta1=beta1 if beta1 is not None else 7 / (10 * order),
                   beta2=beta2 if beta2 is not None else 2 / (5 * order), **kw)

    def initial_errold(self, like: torch.Tensor) -> torch.Tensor:
        return torch.full_like(like, 1e-4)

    def propose(self, dt, eest, errold, accept):
        """Next step size and error memory for every sample, given this step's outcome."""
        finite = eest < constant(math.inf, eest)   # eest ≥ 0 (or NaN): isfinite in one op
        # A non-finite EEst only reaches the reject branch, which is replaced below; the where keeps
        # inf out of the graph when gradients flow through dt (differentiable_dt).
        e = torch.where(finite, eest, constant(1.0, eest)) if eest.requires_grad else eest
        q11 = e.pow(self.beta1)
        gamma = constant(self.gamma, q11)
        q = (q11 / errold.pow(self.beta2) / gamma).clamp(1 / self.qmax, 1 / self.qmin)
        if self.beta1 <= 0:  # EEst = 0 gives q11 = 0, hence q = 1/qmax from the clamp, unless β1 = 0
            q = torch.where(e == 0, constant(1 / self.qmax, q), q)
        if not (self.qsteady_min == self.qsteady_max == 1):  # [1, 1] would map q = 1 to itself
            steady = (q >= self.qsteady_min) & (q <= self.qsteady_max)
            q = torch.where(steady, constant(1.0, q), q)
        # One division for both outcomes (a non-finite EEst is never accepted).
        q_reject = torch.clamp(q11 / gamma, max=1 / self.qmin)
        dt_new = dt / torch.where(accept, q, q_reject)
        dt_new = torch.where(finite, dt_new, dt * constant(self.qmin, dt))
        errold_new = torch.where(accept, torch.clamp(e, min=1e-4), errold)
        return dt_new, errold_new


def step_floor(t: torch.Tensor) -> torch.Tensor:
    """The smallest step that moves t: one ulp of max(|t|, 1), as OrdinaryDiffEq's dtmin eps(t).
    Initial steps are raised to it (1e-6 does not move float32's t = 1e5) and the loop's dtmin is it."""
    m = torch.clamp(t.abs(), min=1.0)
    return torch.nextafter(m, torch.full_like(m, math.inf)) - m


def initial_step(rhs: Callable, t0, y0, f0, order: int, atol, rtol, norm: Norm, dtmax):
    """Hairer–Wanner's starting step (per sample); costs one evaluation of the right-hand side."""
    sk = atol + y0.abs() * rtol
    # In lockstep the norms run over the samples where f is finite: one sample whose f is NaN at y0
    # (it fails at its first step) would otherwise give the whole batch the fallback step 1e-6.
    valid = rows_finite(f0) if norm.lockstep else None
    d0 = norm(y0 / sk, valid)
    d1 = norm(f0 / sk, valid)
    small = (d0 < 1e-5) | (d1 < 1e-5)
    dt0 = torch.where(small, torch.full_like(d0, 1e-6), 0.01 * d0 / torch.where(small, torch.ones_like(d1), d1))
    floor = step_floor(t0)
    dt0 = torch.minimum(torch.maximum(dt0, floor), dtmax)
    y1 = y0 + dt0[:, None] * f0
    f1 = rhs(t0 + dt0, y1)
    d2 = norm((f1 - f0) / sk, None if valid is None else valid & rows_finite(f1)) / dt0
    dmax = torch.maximum(d1, d2)
    tiny = dmax <= 1e-15
    dt1 = torch.where(tiny, torch.clamp(dt0 * 1e-3, min=1e-6),
                      (0.01 / torch.where(tiny, torch.ones_like(dmax), dmax)).pow(1.0 / order))
    dt = torch.minimum(torch.minimum(100 * dt0, dt1), dtmax)
    # A non-finite start (f blows up at y0) falls back to the tiny step; the loop then reports it.
    dt = torch.where(torch.isfinite(dt), dt, torch.full_like(dt, 1e-6))
    return torch.minimum(torch.maximum(dt, floor), dtmax)
