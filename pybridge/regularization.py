"""Regularizers built from the solver's own heuristics (Pal et al., ICML 2021 and 2023).

Global ones are functions of `sol.trace` and need the discrete adjoint (the trace's eest and
stiffness carry the graph of the stages that produced them). The local one is a single extra step
taken at a random time (see `local_error_step`), usable with any adjoint.
"""
from __future__ import annotations

import torch

REDUCTIONS = ("sum", "mean", "max")


def _reduce(values, dt, mask, reduction, with_dt):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")
    x = values * dt.abs() if with_dt else values
    x = torch.where(mask, x, torch.zeros_like(x))
    if reduction == "sum":
        per_sample = x.sum(-1)
    elif reduction == "mean":
        per_sample = x.sum(-1) / mask.sum(-1).clamp(min=1)
    else:
        per_sample = torch.where(mask, x, torch.full_like(x, -float("inf"))).amax(-1).clamp(min=0)
    return per_sample.mean()  # mean over samples (independent batching); a scalar either way


def error_regularizer(sol, reduction: str = "sum", with_dt: bool = True) -> torch.Tensor:
    """R_E = Σ_j EEst_j·|dt_j| (the 2021 paper's definition), averaged over samples.

    reduction "mean" (over steps) is what the paper's released MNIST code used; "max" also offered.
    """
    tr = sol.trace
    if torch.isnan(tr.eest[tr.mask]).any():
        raise ValueError(f"error_regularizer: {sol.solver!r} has no error estimate (eest is NaN)")
    return _reduce(tr.eest, tr.dt, tr.mask, reduction, with_dt)


def stiffness_regularizer(sol, reduction: str = "sum", with_dt: bool = True,
                          ratio: bool = False) -> torch.Tensor:
    """R_S = Σ_j S_j·|dt_j| with S the eigenvalue estimate; `ratio=True` divides by the method's
    stability size. The paper's released MNIST code used reduction="max", with_dt=False, ratio=True."""
    tr = sol.trace
    s = tr.stiffness / tr.stability_size if ratio else tr.stiffness
    return _reduce(s, tr.dt, tr.mask, reduction, with_dt)


def local_error_step(rhs, method, tau_reg, y_reg, atol, rtol, norm, dtmax):
    """r = EEst·dt of one fresh step from the detached state y_reg at tau_reg (2023 paper).

    u(t_reg), the start step dt and k1 are detached; the gradient reaches the parameters through
    the stages k2…k_s only. Returns (B,) values.
    """
    from .torch_engine.controller import error_norm, initial_step

    y = y_reg.detach()
    with torch.no_grad():
        k1 = rhs(tau_reg, y)
        dt = initial_step(rhs, tau_reg, y, k1, method.order, atol, rtol, norm, dtmax)
    step = method.step(rhs, tau_reg, y, dt, k1)
    if step.err is None:
        raise ValueError("local regularization needs a method with an error estimate")
    eest = error_norm(norm, step.err, y, step.y1, atol, rtol)
    return eest * dt
