"""Regularizers built from the solver's own heuristics (Pal et al., ICML 2021 and 2023).

Global ones are functions of `sol.trace` and need the discrete adjoint (the trace's eest and
stiffness carry the graph of the stages that produced them). The local one is a single extra step
taken at a random time (see `local_error_step`), usable with any adjoint.
"""
from __future__ import annotations

import math

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
    if ratio and not (tr.stability_size > 0):   # NaN: not characterized (BS3, SDE methods); inf: implicit
        raise ValueError(f"stiffness_regularizer(ratio=True) divides by the method's stability size, which "
                         f"{sol.solver!r} does not have (it is {tr.stability_size}); use ratio=False")
    if ratio and math.isinf(tr.stability_size):
        raise ValueError(f"stiffness_regularizer(ratio=True): {sol.solver!r} is A-stable (stability size inf), "
                         "so the ratio would be 0; use ratio=False")
    s = tr.stiffness / tr.stability_size if ratio else tr.stiffness
    return _reduce(s, tr.dt, tr.mask, reduction, with_dt)


# local_regularizer= values: (how t_reg is drawn, whether k1 is detached). The default variants
# differentiate k1 = f(t_reg, u_r) too. With k1 held fixed (the 2023 paper's released code), the
# error estimate's gradient is dominated by the mismatch between the fixed k1 and the re-evaluated
# stages k2…k_s, a term of order dt·∂f/∂θ instead of the truncation error's own sensitivity: on the
# tests' 2-d tanh field its norm is 3·10^4× r's finite-difference slope along it at rtol 1e-3
# (9·10^6× at 1e-6, 3·10^8× at 1e-8), and minimizing r alone on a 2→32→2 MLP took NFE 134 → 170,
# where the k1-differentiated r took it 134 → 68 (tests/test_regularization.py).
LOCAL_KINDS = {"unbiased": ("unbiased", False), "biased": ("biased", False),
               "unbiased-detached-k1": ("unbiased", True), "biased-detached-k1": ("biased", True)}


def parse_local_regularizer(kind):
    """(time kind, detach_k1) of a local_regularizer= value; a clear error for anything else."""
    if kind not in LOCAL_KINDS:
        raise ValueError(f"local_regularizer must be None or one of {', '.join(map(repr, LOCAL_KINDS))}; "
                         f"got {kind!r}")
    return LOCAL_KINDS[kind]


def local_error_step(rhs, method, tau_reg, y_reg, atol, rtol, norm, dtmax, detach_k1=False, dt=None, valid=None):
    """r = EEst·dt of one fresh step from the detached state y_reg at tau_reg (2023 paper).

    u(t_reg) and the step dt (the automatic initial step there unless given) are detached; the
    gradient reaches the parameters through every stage, k1 = f(t_reg, u_r) included unless
    detach_k1 (the paper's code: through k2…k_s only; see LOCAL_KINDS for why that is not the
    default). Returns (B,) values. valid (B,): the samples that count; the others step with dt = 0
    (no error, no gradient) and stay out of a lockstep norm.
    """
    from .torch_engine.controller import error_norm, initial_step

    y = y_reg.detach()
    with torch.set_grad_enabled(torch.is_grad_enabled() and not detach_k1):
        k1 = rhs(tau_reg, y)
    if dt is None:
        with torch.no_grad():
            dt = initial_step(rhs, tau_reg, y, k1.detach(), method.order, atol, rtol, norm, dtmax)
            dt = (tau_reg + dt) - tau_reg   # the time the step advances, as the loop's steps (loop.Advance.aim)
    if valid is not None:
        dt = torch.where(valid, dt, torch.zeros_like(dt))
    step = method.step(rhs, tau_reg, y, dt, k1)
    if step.err is None:
        raise ValueError("local regularization needs a method with an error estimate")
    eest = error_norm(norm, step.err, y, step.y1, atol, rtol, valid=valid)
    return eest * dt
