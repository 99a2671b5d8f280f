"""Automatic stiffness switching (AutoTsit5(Rosenbrock23()) and friends), per sample.

OrdinaryDiffEq's AutoSwitch rule (SOLVERS.md "Automatic switching"): after every iteration,
accepted or rejected, the stiffness ratio |λ|·dt / S (λ the estimate of the method that just
stepped, dt the step the controller now proposes, S the *explicit* method's stability size) is
compared with 0.9. Successive stiff checks count up, successive non-stiff checks count down (a
change of sign restarts the count at ±1). More than 10 stiff checks switch an explicit sample to
the stiff method (dt ×2), more than 3 non-stiff checks switch a stiff sample back (dt ÷2). The
explicit method's λ is its stage-difference estimate, the stiff method's is ‖J‖∞.

Every sample has its own mode and count, as (B,) tensors. Objects here come in two kinds:
- ``AutoSwitch``: built once per (solver, dtype, device) and cached by the engine, like every
  other method; it holds only the two sub-methods and is never stepped itself.
- ``AutoSwitchRun`` (``AutoSwitch.for_solve()``): one per solve, holding the per-sample state.
  The loop talks to it as to any method, and to its ``controller`` (passed as
  ``LoopOptions.controller``) which applies each sample's own method's PI parameters and then
  makes the switching decision with the proposed dt.

Cost: when every running sample is in one mode only that method is computed. When modes are
mixed both methods run on the whole batch (a batched right-hand side cannot be evaluated on a
subset of samples) and the results are selected per sample with ``torch.where``; each method then
steps with h = 0 on the samples it does not serve, so that it cannot overflow there and poison
gradients through the unselected branch. Deciding which case applies costs one small host read
per step (two booleans), on top of the loop's own.

On a switch OrdinaryDiffEq re-evaluates f(t, y) to start the new method; here the loop already
carries exactly that value (both methods' first stage is f(t, y)), so no evaluation is repeated
and nfe is one lower per switch than Julia's. The error memory of the PI controller (errold) is
shared by the two methods, as OrdinaryDiffEq's is.

Stats.nfe counts, per sample, the evaluations of the method that sample used. In a mixed batch
whose stiff method lacks FSAL (e.g. Rodas5P), the loop evaluates f at every accepted step's end
for all samples, and counts it for all samples (FSAL explicit samples included).
"""
from __future__ import annotations

import copy
from typing import NamedTuple, Optional

import torch

from .controller import PIController

# Composite solver name → its explicit method (OrdinaryDiffEq's AutoTsit5 / AutoVern7).
NONSTIFF = {"AutoTsit5": "Tsit5", "AutoVern7": "Vern7"}


class AutoStep(NamedTuple):
    y1: torch.Tensor
    err: Optional[torch.Tensor]
    ks: torch.Tensor                  # (B, R + 1, n): the used method's stages, zero-padded; last row = mode
    nfe: torch.Tensor                 # (B,) evaluations of the method each sample used
    stats: dict
    failed: Optional[torch.Tensor]
    extra_trace: dict                 # {"method": (B,) 0 = explicit, 1 = stiff}
    f_end: Optional[torch.Tensor]
    stiff_mask: torch.Tensor          # (B,) which samples the stiff method served
    explicit: Optional[tuple]         # the sub-methods' own step results (None when not computed)
    implicit: Optional[tuple]


def _controller_for(method) -> PIController:
    # The same construction as the loop's default controller, for one sub-method.
    tab = getattr(method, "tableau", None)
    return PIController.for_order(method.order, getattr(tab, "beta1", None), getattr(tab, "beta2", None),
                                  qsteady_max=getattr(method, "qsteady_max", 1.0))


def _stage_rows(method) -> int:
    tab = getattr(method, "tableau", None)
    return int(getattr(tab, "stages", None) or len(method.c))


class AutoSwitch:
    """An explicit method and a stiff one with OrdinaryDiffEq's switching thresholds (cached, stateless)."""

    def __init__(self, explicit, stiff, *, nonstifftol=0.9, stifftol=0.9, maxstiffstep=10,
                 maxnonstiffstep=3, dtfac=2.0):
        self.explicit, self.stiff = explicit, stiff
        # The stiff method's counters, 0 for a sample that never used it (not absent: a batch's
        # Stats would otherwise have them or not depending on its other samples).
        self.counter_names = getattr(stiff, "counter_names", ())
        self.nonstifftol, self.stifftol = nonstifftol, stifftol
        self.maxstiffstep, self.maxnonstiffstep, self.dtfac = maxstiffstep, maxnonstiffstep, dtfac
        # The initial step is the explicit method's (the solve starts non-stiff, as OrdinaryDiffEq).
        self.order = explicit.order
        self.tableau = explicit.tableau
        self.adaptive = explicit.adaptive and stiff.adaptive
        # Stiffness ratios (switching and Trace.stability_size) are against the explicit method's region.
        self.stability_size = explicit.stability_size
        # The engine steps onto save points when order - interpolation_order > 1; do so if either method needs it.
        self.interpolation_order = self.order + min(m.interpolation_order - m.order for m in (explicit, stiff))
        self.rows = max(_stage_rows(explicit), _stage_rows(stiff))
        # The explicit method's lazy interpolation stages (Vern7's), see extend_stages.
        self.extra_stages = getattr(explicit, "extra_stages", 0)

    def for_solve(self) -> "AutoSwitchRun":
        return AutoSwitchRun(self)

    def with_tolerances(self, atol, rtol, lockstep: bool):
        """Bind the solve's tolerances into an implicit stiff method (its Newton norm uses them)."""
        if hasattr(self.stiff, "with_tolerances"):
            self.stiff = self.stiff.with_tolerances(atol, rtol, lockstep)
        return self

    def step(self, *args, **kw):
        raise RuntimeError("AutoSwitch keeps per-sample state: step the object returned by for_solve()")


class AutoSwitchRun(AutoSwitch):
    """The per-solve switcher: the loop's method, with `controller` for LoopOptions.controller."""

    def __init__(self, template: AutoSwitch):
        self.__dict__.update(copy.copy(template.__dict__))
        self.mode = None        # (B,) bool, True = stiff method
        self.count = None       # (B,) long, + successive stiff / − successive non-stiff checks
        self._flags = (False, True)
        self._est = None        # (B,) the last step's λ estimate, detached, for the decision
        self.controller = _SwitchingController(self)

    def _state(self, like):
        B = like.shape[0]
        if self.mode is None or self.mode.shape[0] != B:
            self.mode = torch.zeros(B, dtype=torch.bool, device=like.device)
            self.count = torch.zeros(B, dtype=torch.long, device=like.device)
        return self.mode

    def step(self, rhs, t, y, h, k1) -> AutoStep:
        mode = self._state(y)
        active = h > 0
        # The one extra host read per step: which methods the running samples need.
        any_stiff, any_explicit = torch.stack([(active & mode).any(), (active & ~mode).any()]).tolist()
        if not (any_stiff or any_explicit):
            any_explicit = True
        self._flags = (any_stiff, any_explicit)
        both = any_stiff and any_explicit
        zero = torch.zeros_like(h)
        se = si = None
        if any_explicit:
            se = self.explicit.step(rhs, t, y, torch.where(mode, zero, h) if both else h, k1)
        if any_stiff:
            si = self.stiff.step(rhs, t, y, torch.where(mode, h, zero) if both else h, k1)

        m1 = mode[:, None]
        pick = lambda a, b: b if a is None else (a if b is None else torch.where(m1, b, a))
        y1 = pick(se and se.y1, si and si.y1)
        err = pick(se and se.err, si and si.err) if self.adaptive else None
        ks = torch.where(m1[..., None], self._pad(si, y), self._pad(se, y)) if both else self._pad(se or si, y)
        mode_row = mode.to(y.dtype)[:, None, None].expand(-1, 1, y.shape[1])
        ks = torch.cat([ks, mode_row], 1)
        nfe_e = torch.full_like(mode, se.nfe if se is not None else 0, dtype=torch.long)
        nfe_s = si.nfe if si is not None else 0
        nfe = torch.where(mode, torch.as_tensor(nfe_s, device=y.device), nfe_e)
        stats = {}
        if si is not None:
            for key, val in (getattr(si, "stats", None) or {}).items():
                stats[key] = mode * val
        failed = getattr(si, "failed", None) if si is not None else None
        if failed is not None:
            failed = mode & failed
        fe = self.explicit.end_derivative(se) if se is not None else None
        fs = self.stiff.end_derivative(si) if si is not None else None
        if both:
            f_end = torch.where(m1, fs, fe) if (fe is not None and fs is not None) else None
        else:
            f_end = fe if se is not None else fs
        return AutoStep(y1, err, ks, nfe, stats, failed, {"method": mode.long()}, f_end, mode, se, si)

    def _pad(self, sub, y):
        if sub is None:
            return y.new_zeros(y.shape[0], self.rows, y.shape[1])
        ks = sub.ks
        if ks.shape[1] > self.rows:
            raise RuntimeError(f"AutoSwitch: a sub-method returned {ks.shape[1]} stages, more than {self.rows}")
        if ks.shape[1] < self.rows:
            ks = torch.cat([ks, ks.new_zeros(ks.shape[0], self.rows - ks.shape[1], ks.shape[2])], 1)
        return ks

    def end_derivative(self, step: AutoStep):
        return step.f_end

    def stiffness(self, step: AutoStep, y1, f1, norm):
        """The estimate of the method that stepped (stage differences, or ‖J‖∞ when stiff)."""
        est_e = est_s = None
        if step.explicit is not None:
            est_e = self.explicit.stiffness(step.explicit, step.explicit.y1, f1, norm)
        if step.implicit is not None:
            est_s = self.stiff.stiffness(step.implicit, step.implicit.y1, f1, norm)
        if est_e is not None and est_s is not None:
            est = torch.where(step.stiff_mask, est_s, est_e)
        else:
            est = est_e if est_e is not None else est_s
        decide = est.detach()
        if norm.lockstep and est_s is not None:
            # One step size for the batch needs one mode for the batch: ‖J‖∞ becomes the batch max
            # (the explicit estimate already is a batch norm in lockstep).
            decide = torch.where(step.stiff_mask, est_s.detach().max(), decide)
        self._est = decide
        return est

    def extend_stages(self, rhs, t0, y0, h, ks, use=None):
        """ks (B, rows + 1, n) → (B, rows + 1 + e, n): the explicit method's lazy stages appended
        after the mode row, evaluated where the step was explicit (y0 stands in elsewhere)."""
        if not self.extra_stages or ks.shape[1] > self.rows + 1:
            return ks
        explicit_rows = ks[:, self.rows, 0] < 0.5
        use = explicit_rows if use is None else use & explicit_rows
        s = _stage_rows(self.explicit)
        ext = self.explicit.extend_stages(rhs, t0, y0, h, ks[:, :s], use=use)
        return torch.cat([ks, ext[:, s:]], 1)

    def interpolate(self, y0, h, ks, y1, f1, theta):
        """Each step's own method's interpolant; the step's mode is row `rows` of ks (the last one
        unless extend_stages appended the explicit method's lazy stages after it)."""
        stiff = (ks[:, self.rows, 0] > 0.5)[:, None, None]
        s = _stage_rows(self.explicit)
        ke = ks[:, :s] if ks.shape[1] == self.rows + 1 else torch.cat([ks[:, :s], ks[:, self.rows + 1:]], 1)
        ve = self.explicit.interpolate(y0, h, ke, y1, f1, theta)
        vs = self.stiff.interpolate(y0, h, ks[:, :_stage_rows(self.stiff)], y1, f1, theta)
        return torch.where(stiff, vs, ve)


class _SwitchingController:
    """Each sample's own method's PI controller, then the switching decision with the proposed dt."""

    def __init__(self, run: AutoSwitchRun):
        self.run = run
        self.explicit = _controller_for(run.explicit)
        self.stiff = _controller_for(run.stiff)

    def initial_errold(self, like):
        return self.explicit.initial_errold(like)

    def propose(self, dt, eest, errold, accept):
        run = self.run
        mode = run.mode                      # the mode that took this step
        any_stiff, any_explicit = run._flags
        if any_stiff and any_explicit:
            dt_e, old_e = self.explicit.propose(dt, eest, errold, accept)
            dt_s, old_s = self.stiff.propose(dt, eest, errold, accept)
            dt_prop, errold = torch.where(mode, dt_s, dt_e), torch.where(mode, old_s, old_e)
        else:
            dt_prop, errold = (self.stiff if any_stiff else self.explicit).propose(dt, eest, errold, accept)

        active = dt > 0
        est = run._est if run._est is not None else torch.zeros_like(dt)
        ratio = est * dt_prop.detach() / run.stability_size
        is_stiff = ratio > torch.full_like(ratio, run.nonstifftol).masked_fill(mode, run.stifftol)
        c = run.count
        c_new = torch.where(is_stiff, torch.where(c < 0, torch.ones_like(c), c + 1),
                            torch.where(c > 0, -torch.ones_like(c), c - 1))
        c = torch.where(active, c_new, c)
        to_stiff = active & ~mode & (c > run.maxstiffstep)
        to_explicit = active & mode & (c < -run.maxnonstiffstep)
        dt_new = torch.where(to_stiff, dt_prop * run.dtfac, torch.where(to_explicit, dt_prop / run.dtfac, dt_prop))
        run.mode = (mode | to_stiff) & ~to_explicit
        run.count = c
        run._est = None
        return dt_new, errold
