"""Error norm, PI step-size controller and initial step, as OrdinaryDiffEq does them (SOLVERS.md)."""
from __future__ import annotations

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
        total = torch.where(valid[:, None], sq, 0.0).sum()
        return _safe_sqrt(total / count).expand(x.shape[0])


def _safe_sqrt(x):
    # sqrt'(0) is infinite: finished samples (h = 0, zero error) would turn gradients into NaN.
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, 1.0).sqrt(), 0.0)


def error_norm(norm: Norm, err, y0, y1, atol, rtol, valid=None) -> torch.Tensor:
    """EEst = rms(err / (atol + rtol·max(|y0|, |y1|))); non-finite errors give +inf.

    Non-finite entries are zeroed before the norm (and the result replaced afterwards) so that a
    diverging sample cannot turn the others' gradients into NaN.
    """
    scale = atol + rtol * torch.maximum(y0.abs(), y1.abs())
    ratio = err / scale
    finite = torch.isfinite(ratio).all(-1)
    if norm.lockstep and valid is not None:
        # Rows outside the lockstep reduction are zeroed by the norm anyway: one mask for both.
        valid = valid & finite
        safe = torch.where(valid[:, None], ratio, 0.0)
        count = (valid.sum() * ratio.shape[1]).clamp_min(1)
        eest = _safe_sqrt(safe.square().sum() / count).expand(ratio.shape[0])
    else:
        safe = torch.where(finite[:, None], ratio, 0.0)
        eest = norm(safe, finite)
    return torch.where(finite, eest, float("inf"))


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
        finite = torch.isfinite(eest)
        e = torch.where(finite, eest, 1.0)
        q11 = e.pow(self.beta1)
        q = (q11 / errold.pow(self.beta2) / self.gamma).clamp(1 / self.qmax, 1 / self.qmin)
        q = torch.where(e == 0, 1 / self.qmax, q)
        if not (self.qsteady_min == self.qsteady_max == 1):  # [1, 1] would map q = 1 to itself
            steady = (q >= self.qsteady_min) & (q <= self.qsteady_max)
            q = torch.where(steady, 1.0, q)
        dt_accept = dt / q
        dt_reject = dt / torch.clamp(q11 / self.gamma, max=1 / self.qmin)
        dt_reject = torch.where(finite, dt_reject, dt * self.qmin)
        dt_new = torch.where(accept, dt_accept, dt_reject)
        errold_new = torch.where(accept, torch.clamp(e, min=1e-4), errold)
        return dt_new, errold_new


def initial_step(rhs: Callable, t0, y0, f0, order: int, atol, rtol, norm: Norm, dtmax):
    """Hairer–Wanner's starting step (per sample); costs one evaluation of the right-hand side."""
    sk = atol + y0.abs() * rtol
    d0 = norm(y0 / sk)
    d1 = norm(f0 / sk)
    small = (d0 < 1e-5) | (d1 < 1e-5)
    dt0 = torch.where(small, torch.full_like(d0, 1e-6), 0.01 * d0 / torch.where(small, torch.ones_like(d1), d1))
    dt0 = torch.minimum(dt0, dtmax)
    y1 = y0 + dt0[:, None] * f0
    f1 = rhs(t0 + dt0, y1)
    d2 = norm((f1 - f0) / sk) / dt0
    dmax = torch.maximum(d1, d2)
    tiny = dmax <= 1e-15
    dt1 = torch.where(tiny, torch.clamp(dt0 * 1e-3, min=1e-6),
                      (0.01 / torch.where(tiny, torch.ones_like(dmax), dmax)).pow(1.0 / order))
    dt = torch.minimum(torch.minimum(100 * dt0, dt1), dtmax)
    # A non-finite start (f blows up at y0) falls back to the tiny step; the loop then reports it.
    return torch.where(torch.isfinite(dt), dt, torch.full_like(dt, 1e-6))
