"""Terminal events: each sample stops where its event function g(t, y) first crosses zero.

The loop calls `EventWatch.crossed` after every iteration: one batched call of g at each sample's
step end. The first accepted step over which a component of a sample's g changes sign (in the
direction asked) ends that sample with ReturnCode.Terminated; the loop keeps that step's data.
After the loop, `EventWatch.locate` bisects the kept steps' interpolants for the crossing (a fixed
number of batched calls of g, no host reads) and rebuilds the event time in the autograd graph by
the implicit function theorem: at the root, dτ*/dp = −(∂g/∂p along y(τ*; p)) / (dg/dτ along the
trajectory), so gradients reach the event time and the state there.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch.autograd import forward_ad

class EventWatch:
    """g in the loop's terms (τ, y (B, n)) → (B, m), and the crossings it has seen."""

    def __init__(self, g: Callable, direction: int, prob, time_direction: torch.Tensor):
        self.g, self.direction = g, direction
        self.batched = prob.batched
        self.shape = (prob.batch_size,) + prob.state_shape if prob.batched else prob.state_shape
        self.y0 = prob.y0
        self.time_direction = time_direction
        self.flip = bool((time_direction < 0).any())
        self.checked = False
        self.g_prev = None
        self.kept = {}            # ks shape -> (found (B,), τ, h, y0, ks, y1, f1, g before, g after)

    def __call__(self, tau, y):
        """g at per-sample times: each sample's crossing lies at its own time, so g always gets t of
        shape (B,) for a batched problem (also in lockstep), and 0-d for one sample."""
        t = tau * self.time_direction if self.flip else tau
        out = self.g(t if self.batched else t[0], y.reshape(self.shape))
        if not self.checked:
            self._check(out)
        return out.reshape(y.shape[0], -1)

    def _check(self, out):
        B = self.shape[0] if self.batched else 1
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"event must return a torch.Tensor; got {type(out).__name__}")
        if out.dtype != self.y0.dtype:
            raise TypeError(f"event returned dtype {out.dtype}; expected {self.y0.dtype} (the dtype of y0)")
        if out.device != self.y0.device:
            raise ValueError(f"event returned a tensor on {out.device}; expected {self.y0.device} (y0's device)")
        if out.numel() == 0 or (self.batched and (out.dim() == 0 or out.shape[0] != B)):
            want = f"(B,) or (B, m) with B = {B}" if self.batched else "() or (m,)"
            raise ValueError(f"event returned shape {tuple(out.shape)}; expected {want}: one value, or m "
                             "values, per sample (the sample stops where the first of them crosses zero)")
        self.checked = True

    def start(self, tau, y):
        self.g_prev = self(tau, y).detach()

    def _crossing(self, before, after):
        """(B, m): the component went from one side of zero to the other side (or onto zero) in the
        direction asked. A component at zero before does not count: it must leave zero first."""
        up = (before < 0) & (after >= 0)
        down = (before > 0) & (after <= 0)
        if self.direction == 0:   # (also a value that turns NaN, e.g. √height below the ground, as torchdiffeq)
            return up | down | ((before != 0) & torch.isfinite(before) & torch.isnan(after))
        return up if self.direction > 0 else down

    def crossed(self, tau_new, y_new, accept):
        """(crossed (B,), g after): samples whose accepted step crossed. Rejected and stopped samples
        did not move (τ_new = τ), so their g is the one before."""
        g_new = self(tau_new, y_new).detach()
        return accept & self._crossing(self.g_prev, g_new).any(1), g_new

    def keep(self, crossed, g_new, step_data):
        """After the iteration: keep the crossing samples' step (τ, h, y0, ks, y1, f1) — each sample
        crosses once, since it then stops — and move g on."""
        if crossed is not None:
            ks = step_data[3]
            new = (crossed,) + tuple(step_data) + (self.g_prev, g_new)
            old = self.kept.get(ks.shape)
            if old is None:
                self.kept[ks.shape] = new
            else:
                col = lambda x: crossed.view((-1,) + (1,) * (x.dim() - 1))  # noqa: E731
                self.kept[ks.shape] = (old[0] | crossed,) + tuple(torch.where(col(a), a, b)
                                                                  for a, b in zip(new[1:], old[1:]))
        self.g_prev = g_new

    def locate(self, method, B, dtype, device):
        """(τ_event (B,), y_event (B, n), found (B,)): where each sample's g crossed zero (NaN where
        it did not), differentiable through the solve and through g."""
        tau_evt = torch.full((B,), math.nan, dtype=dtype, device=device)
        y_evt = torch.full((B,) + self.y0.shape[1 if self.batched else 0:], math.nan, dtype=dtype,
                           device=device).reshape(B, -1)
        found = torch.zeros(B, dtype=torch.bool, device=device)
        for group in self.kept.values():
            f, t, y = self._locate_group(method, *group)
            tau_evt = torch.where(f, t, tau_evt)
            y_evt = torch.where(f[:, None], y, y_evt)
            found = found | f
        return tau_evt, y_evt, found

    def _locate_group(self, method, found, tau, h, y0, ks, y1, f1, g_before, g_after):
        # Rows without a crossing step here sit still at their (finite, detached) state: whatever g
        # or the interpolant does there cannot reach the gradients of what the samples share.
        col = lambda x: found.view((-1,) + (1,) * (x.dim() - 1))  # noqa: E731
        tau, h = torch.where(found, tau, tau.detach()), torch.where(found, h, 0.0)
        y0 = torch.where(col(y0), y0, y0.detach())
        ks, f1 = torch.where(col(ks), ks, 0.0), torch.where(col(f1), f1, 0.0)
        y1 = torch.where(col(y1), y1, y0.detach())
        y_at = lambda th: method.interpolate(y0, h, ks, y1, f1, th[:, None])[:, 0]  # noqa: E731
        eligible = found[:, None] & self._crossing(g_before, g_after)
        with torch.no_grad():
            # Bisection in θ for the first θ where some eligible component has crossed: after k halvings
            # the crossing is known to 2^-k of the step, past the dtype's resolution here.
            lo, hi = torch.zeros_like(h), torch.ones_like(h)
            for _ in range(int(-math.log2(torch.finfo(h.dtype).eps)) + 2):
                mid = 0.5 * (lo + hi)
                g_mid = self(tau + mid * h, y_at(mid))
                over = (eligible & self._crossing(g_before, g_mid)).any(1)
                hi, lo = torch.where(over, mid, hi), torch.where(over, lo, mid)
            theta = hi                  # the first bisection point on the far side (g changed sign there)
            g_hi = self(tau + theta * h, y_at(theta))
            which = (eligible & self._crossing(g_before, g_hi)).long().argmax(1, keepdim=True)
        # τ* stays in the graph of the step's start and size (t0, or h with differentiable_dt), at a
        # fixed θ; so does the state there.
        tau_star = tau + theta * h
        y_star = y_at(theta)
        if not torch.is_grad_enabled():
            return found, tau_star, y_star
        # Implicit function theorem at the root g(τ, y(τ)) = 0: the value stays τ*, and the
        # gradient becomes −(dg/dp at fixed τ)/(dg/dτ) (where both are finite and the slope is not 0).
        g_component = lambda t, y: self(t, y).gather(1, which)[:, 0]  # noqa: E731  (the one that crossed)
        safe_h = torch.where(found, h, 1.0)
        slope = slope_along(g_component, tau_star, y_star, self._rate(y_at, theta, safe_h))
        tau_evt = linked_root(tau_star, g_component(tau_star, y_star), slope, found)
        return found, tau_evt, y_at(theta + (tau_evt - tau_star) / safe_h)

    @staticmethod
    def _rate(y_at, theta, h):
        """dy/dτ at θ: the interpolant's own derivative (forward mode through our polynomial), detached."""
        with torch.no_grad(), forward_ad.dual_level():
            y = y_at(forward_ad.make_dual(theta, 1.0 / h))
            rate = forward_ad.unpack_dual(y).tangent
        return torch.zeros_like(y) if rate is None else rate


def slope_along(g, t, y, rate):
    """dg/dt along a trajectory through (t, y) moving at dy/dt = rate, detached: ∂g/∂t + ∂g/∂y·rate
    (0 where g depends on neither). g(t, y) gives one value per row of t ((B,), or 0-d)."""
    with torch.enable_grad():
        t_var, y_var = t.detach().requires_grad_(True), y.detach().requires_grad_(True)
        out = g(t_var, y_var)
        if not out.requires_grad:
            return torch.zeros_like(t)
        dg_dt, dg_dy = torch.autograd.grad(out.sum(), (t_var, y_var), allow_unused=True)
    slope = torch.zeros_like(t) if dg_dt is None else dg_dt.detach()
    return slope if dg_dy is None else slope + (dg_dy * rate).flatten(t.dim()).sum(-1)


def linked_root(t_star, g_star, slope, ok=True):
    """The root t* of g in value, with the gradient the implicit function theorem gives it,
    −(dg/dp at fixed t)/slope (none where the slope is 0 or a value is not finite, or not ok)."""
    ok = ok & (slope != 0) & torch.isfinite(slope) & torch.isfinite(g_star.detach())
    ratio = torch.where(ok, g_star / torch.where(ok, slope, 1.0), 0.0)
    return t_star - (ratio - ratio.detach())


def after_event(tau_save, tau_evt, found):
    """(T, B) save times past each sample's event (their values become NaN, as after a failure)."""
    return (found[:, None] & (tau_save > tau_evt.detach()[:, None])).T


def watch(event: Optional[Callable], direction: int, prob, time_direction) -> Optional[EventWatch]:
    """The watch for solve(..., event=...), or None without an event."""
    return None if event is None else EventWatch(event, direction, prob, time_direction)
