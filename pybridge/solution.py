"""The Solution contract shared by every engine."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, Optional

import torch


class ReturnCode(enum.IntEnum):
    """Per-sample outcome, named as SciMLBase's ReturnCode."""

    Success = 0
    MaxIters = 1
    DtLessThanMin = 2
    Unstable = 3
    ConvergenceFailure = 4
    Terminated = 5   # stopped by its event (solve(..., event=...)): a success
    Running = 9  # internal: never returned by a finished solve


def succeeded(retcode: torch.Tensor) -> torch.Tensor:
    """Per sample: finished (Success) or stopped by its event (Terminated)."""
    return (retcode == ReturnCode.Success) | (retcode == ReturnCode.Terminated)


OPTIONAL_COUNTERS = ("njac", "nlu", "nsolve", "nnonliniter", "nnonlinconvfail")


@dataclass
class Stats:
    """Per-sample counters (tensors of the batch shape; 0-d for an unbatched problem).

    nfe: right-hand-side evaluations the sample needed (as if solved alone);
    naccept / nreject: accepted and rejected steps. Stiff solvers add njac, nlu, nsolve;
    implicit (ESDIRK) solvers also nnonliniter (Newton iterations) and nnonlinconvfail (Newton
    solves that did not converge), named as in SciMLBase's DEStats.
    """

    nfe: torch.Tensor
    naccept: torch.Tensor
    nreject: torch.Tensor
    njac: Optional[torch.Tensor] = None
    nlu: Optional[torch.Tensor] = None
    nsolve: Optional[torch.Tensor] = None
    nnonliniter: Optional[torch.Tensor] = None
    nnonlinconvfail: Optional[torch.Tensor] = None

    def __repr__(self) -> str:
        def fmt(x):
            return None if x is None else x.tolist()

        extra = "".join(f", {k}={fmt(getattr(self, k))}" for k in OPTIONAL_COUNTERS
                        if getattr(self, k) is not None)
        return f"Stats(nfe={fmt(self.nfe)}, naccept={fmt(self.naccept)}, nreject={fmt(self.nreject)}{extra})"


@dataclass
class Trace:
    """Every accepted step, per sample, left-aligned and padded: shape (*batch, N).

    t: the time the step reached; dt: its size |t_end - t_start|; eest: the scaled RMS error norm
    the controller used (≤ 1 on accepted adaptive steps; NaN for methods without an error
    estimate); stiffness: the dominant-eigenvalue estimate |λ| (SOLVERS.md); mask: True where a
    step exists. eest and stiffness stay in the autograd graph; padded entries are 0.
    `stability_size` is the method's, for stiffness ratios |λ·dt| / stability_size.
    """

    t: torch.Tensor
    dt: torch.Tensor
    eest: torch.Tensor
    stiffness: torch.Tensor
    mask: torch.Tensor
    stability_size: float = float("nan")
    method: Optional[torch.Tensor] = None  # index of the method that took each step (auto-switching)

    @property
    def num_steps(self) -> torch.Tensor:
        return self.mask.sum(-1)


class Solution:
    """What `pybridge.solve` returns, on either engine.

    ys       values at the requested times, time first: (T, *y0.shape). With per-sample times
             t of shape (B, T), ys[j, b] is sample b at t[b, j]. After a sample fails, or after
             its event, its later values are NaN; its earlier ones are kept.
    ts       the requested times, as given.
    stats    per-sample Stats.
    retcode  per-sample ReturnCode values as an integer tensor of the batch shape
             (compare with `pb.ReturnCode.Success`); `success` is True when all succeeded
             (Success, or Terminated: stopped by the event).
    trace    per-sample, per-accepted-step Trace (differentiable eest and stiffness).
    sol(t)   the method's own interpolant, when solved with dense=True: t of shape (Tq,) or
             (B, Tq) → values (Tq, *y0.shape).
    local_regularizer  0-d tensor when solve(..., local_regularizer=...) was asked, else None.
    event_t, event_y   with solve(..., event=g): where each sample's g crossed zero (batch shape)
             and its state there (*y0.shape); NaN for samples whose g did not cross. Both are
             differentiable (the implicit function theorem at the crossing). Otherwise None.
    Plots: `pybridge.plotting.plot_solution(sol)` (trajectories, step sizes, EEst).
    """

    ys: torch.Tensor
    ts: torch.Tensor
    stats: Stats
    retcode: torch.Tensor
    trace: Trace
    local_regularizer: Optional[torch.Tensor]
    extras: dict

    def __init__(self, ys: torch.Tensor, ts: torch.Tensor, stats: Stats, retcode: torch.Tensor, trace: Trace,
                 interpolant: Optional[Callable] = None, solver=None, batched: bool = True,
                 local_regularizer: Optional[torch.Tensor] = None, extras: Optional[dict] = None) -> None:
        self.ys = ys
        self.ts = ts
        self.stats = stats
        self.retcode = retcode
        self.trace = trace
        self._interpolant: Optional[Callable] = interpolant
        self.solver = solver
        self.batched = batched
        self.local_regularizer = local_regularizer
        self.extras = extras or {}
        self.event_t: Optional[torch.Tensor] = None
        self.event_y: Optional[torch.Tensor] = None

    @property
    def success(self) -> bool:
        return bool(succeeded(self.retcode).all())

    @property
    def retcodes(self) -> list:
        """Return codes as a flat list of ReturnCode members, one per sample."""
        return [ReturnCode(int(c)) for c in self.retcode.reshape(-1).tolist()]

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        """The dense interpolant at t of shape (Tq,) or (B, Tq): values (Tq, *y0.shape)."""
        if self._interpolant is None:
            raise ValueError("sol(t) needs dense output: solve with dense=True")
        return self._interpolant(t)

    def __repr__(self) -> str:
        codes = sorted({c.name for c in self.retcodes})
        return (f"Solution(solver={self.solver!r}, ys={tuple(self.ys.shape)}, retcode={codes}, "
                f"nfe={self.stats.nfe.sum().item()}, steps={self.stats.naccept.sum().item()})")
