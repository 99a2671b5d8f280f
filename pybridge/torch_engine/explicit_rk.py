"""One generic routine for every explicit Runge–Kutta tableau."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .controller import Norm, _safe_sqrt
from .stand_in import taking_part
from .tableau import ButcherTableau, StageWeights, combine, combine_rows


class RKStep(NamedTuple):
    y1: torch.Tensor                  # (B, n) proposed solution
    err: Optional[torch.Tensor]       # (B, n) local error vector, None without an embedded method
    ks: torch.Tensor                  # (B, s, n) stage derivatives (for the interpolant)
    stage_args: tuple                 # arguments of the stiffness pair's stages that are not y1
    nfe: int                          # evaluations made by this call
    # What other families' steps carry, which an explicit step never has (class attributes: the loop
    # reads them every iteration, and a missing attribute costs a raised and caught exception).
    failed = None
    stats = None
    extra_trace = None


class ExplicitRK:
    """Steps a ButcherTableau on (B, n) states. `k1 = f(t, y)` is passed in (FSAL or reused)."""

    plain_steps = True  # no step fails by itself or reports counters: fixed steps may use fixed_loop

    def __init__(self, tableau: ButcherTableau, dtype: torch.dtype, device: torch.device):
        self.tableau = tableau
        self.order = tableau.order
        self.fsal = tableau.fsal
        self.adaptive = tableau.adaptive
        self.stability_size = tableau.stability_size
        as_tensor = lambda v: torch.tensor(v, dtype=dtype, device=device)
        s = tableau.stages
        self.c = [float(ci) for ci in tableau.c]
        self.c_col = as_tensor(self.c)[:, None]  # (s, 1): stage times for a (B,) batch as one (s, B) op
        # Row i combines the i previous stages (tableau.combine).
        self.a_rows = [StageWeights(list(tableau.a[i]), dtype, device) for i in range(s)]
        weights = [list(tableau.b)] + ([list(tableau.b_error)] if tableau.b_error is not None else [])
        self.weights = StageWeights(weights, dtype, device)  # solution and error sums at once
        self.dense = as_tensor([list(r) for r in tableau.dense]) if tableau.dense is not None else None
        self.stiffness_pair = tableau.stiffness_pair
        self.interpolation_order = tableau.dense_order if tableau.dense is not None else 3
        # Lazy stages (the Verner interpolants): evaluated only to interpolate, by `extend_stages`
        # (which calls the right-hand side); `interpolate` then takes the extended stages.
        self.extra_stages = tableau.extra_stages
        self.extra_c = [float(ci) for ci in tableau.extra_c]
        self.extra_a_rows = [as_tensor(list(r)) for r in tableau.extra_a]
        self._dense_T = self.dense.T.contiguous() if self.dense is not None else None

    def stages(self, rhs, t, y, h, k1, stage_argument, times=None):
        """(ks, args): the s stage derivatives (k1 first) and the arguments y_i of the stages the
        stiffness pair names and, for FSAL, of the last (which is y1). stage_argument(i, ks) gives
        y_i = y + h Σ_j a_ij ks[j] from the i stages so far (torch ops, or native_rk's kernel);
        times, the stage times t + c_i·h, if at hand."""
        s = len(self.c)
        # t + c_i·h for every stage in one op (none needed for a one-stage method: Euler)
        if times is None and s > 1:
            times = torch.addcmul(t, h, self.c_col).unbind(0)
        ks = [k1]
        args = {0: y}
        keep = set(self.stiffness_pair)
        for i in range(1, s):
            yi = stage_argument(i, ks)
            if i in keep or (self.fsal and i == s - 1):
                args[i] = yi
            ks.append(rhs(times[i], yi))
        return ks, args

    def step(self, rhs, t, y, h, k1) -> RKStep:
        # Few, fused tensor ops: on small problems each op's dispatch costs as much as its work.
        # (Stacking the stage list per stage stays: a strided prefix of a preallocated buffer
        # would change the matrix-vector product's rounding, hence the accepted steps.)
        hcol = h[:, None]
        s = len(self.c)
        ks, args = self.stages(rhs, t, y, h, k1, lambda i, ks: torch.addcmul(y, hcol, combine(ks, self.a_rows[i])))
        K = torch.stack(ks, 1) if s > 1 else k1[:, None]  # (B, s, n)
        combo = combine_rows(ks, self.weights, K.mT)
        # FSAL: the last stage is evaluated at y1, so its argument *is* the solution.
        y1 = args[s - 1] if self.fsal else torch.addcmul(y, hcol, combo[0])
        err = hcol * combo[1] if self.adaptive else None
        stage_args = tuple(args.get(i) for i in self.stiffness_pair)
        return RKStep(y1, err, K, stage_args, s - 1)

    def end_derivative(self, step: RKStep):
        """f(t1, y1) when the method has it already (FSAL), else None."""
        return step.ks[:, -1] if self.fsal else None

    def stiffness(self, step: RKStep, y1, f1, norm):
        """|λ| ≈ ‖k_j − k_i‖ / ‖g_j − g_i‖ over the stiffness pair (index s = the step's end)."""
        dk, dg = self.stiffness_terms(step, y1, f1)
        if not isinstance(norm, Norm):
            num, den = norm(dk), norm(dg)
            ok = den > 0
            return torch.where(ok, num / torch.where(ok, den, 1.0), 0.0)
        return self.stiffness_from_terms(dk, dg, norm)

    def stiffness_terms(self, step: RKStep, y1, f1):
        """The two differences the estimate is the norm ratio of, (B, n) each."""
        ks = step.ks
        (k_i, k_j), (g_i, g_j) = self.stiffness_operands(lambda m: ks[:, m], ks.shape[1], step.stage_args, y1, f1)
        return k_j - k_i, g_j - g_i

    def stiffness_operands(self, stage, s, pair_args, y1, f1):
        """((k_i, k_j), (g_i, g_j)) of the stiffness pair (i, j): stage(m) gives stage m of the s, the
        pair's stage arguments are None where not kept; index s is the step's end (f1 at y1)."""
        k = lambda m: f1 if m == s else stage(m)  # noqa: E731
        g = lambda m, arg: y1 if (m == s or arg is None) else arg  # noqa: E731
        i, j = self.stiffness_pair
        return (k(i), k(j)), (g(i, pair_args[0]), g(j, pair_args[1]))

    @staticmethod
    def stiffness_from_terms(dk, dg, norm: Norm):
        """The estimate from stiffness_terms, for (..., B, n) stacks of them (the loop computes the
        estimates of many steps at once); both RMS norms in one reduction."""
        pair = torch.stack([dk, dg])  # (2, ..., B, n)
        if norm.lockstep:
            # A stopped sample whose f was not finite would make the batch's means NaN (hence 0):
            # its rows count as zeros, which cancel in the ratio of the two means.
            finite = (pair.abs() < math.inf).all(-1).all(0, keepdim=True)
            pair = torch.where(finite[..., None], pair, 0.0)
        sq = pair.square()
        ms = sq.mean((-2, -1), keepdim=True)[..., 0] if norm.lockstep else sq.mean(-1)
        num, den = _safe_sqrt(ms).unbind(0)
        ok = den > 0
        est = torch.where(ok, num / torch.where(ok, den, 1.0), 0.0)
        return est.expand(dk.shape[:-1]) if norm.lockstep else est

    def extend_stages(self, rhs, t0, y0, h, ks, use=None):
        """The step's stages (B, s, n) extended by the tableau's lazy ones → (B, s + e, n).

        Each lazy stage is one call of rhs on the whole (B, n) batch at times t0 + c·h (B,). Rows
        where `use` (B,) is False are evaluated at y0 instead (their values are not wanted; the
        step there may be a rejected or padded one whose stages are not finite)."""
        if not self.extra_stages or ks.shape[1] > len(self.c):
            return ks
        if use is not None:
            rhs = taking_part(rhs, use)
        hcol = h[:, None]
        stages = list(ks.unbind(1))
        for c, a in zip(self.extra_c, self.extra_a_rows):
            yi = torch.addcmul(y0, hcol, torch.stack(stages, -1) @ a)
            if use is not None:
                yi = torch.where(use[:, None], yi, y0)
            stages.append(rhs(t0 + c * h, yi))
        return torch.stack(stages, 1)

    def interpolate(self, y0, h, ks, y1, f1, theta):
        """y at t0 + θh for θ of shape (B, K) → (B, K, n); the tableau's own dense output or Hermite.

        A tableau with lazy stages needs ks extended by `extend_stages`; given the step's own stages
        only, it returns cubic Hermite (the loop does so only where the value is discarded: save
        points on a step's end, whose value is y1)."""
        if self.dense is not None and ks.shape[1] == self.dense.shape[0]:
            # θ, θ², …, θ^D as a running product: one op (a power with a tensor of exponents costs ~5x more)
            powers = theta[..., None].expand(*theta.shape, self.dense.shape[1]).cumprod(-1)  # (B, K, D)
            w = powers @ self._dense_T  # (B, K, s)
            return torch.addcmul(y0[:, None], h[:, None, None], w @ ks)
        return hermite(y0, y1, ks[:, 0], f1, h, theta)


def hermite(y0, y1, f0, f1, h, theta):
    """Cubic Hermite interpolation on (y0, f0) and (y1, f1); θ (B, K) → (B, K, n)."""
    th = theta[..., None]
    y0, y1, f0, f1 = (v[:, None] for v in (y0, y1, f0, f1))
    hh = h[:, None, None]
    return ((1 - th) * y0 + th * y1
            + th * (th - 1) * ((1 - 2 * th) * (y1 - y0) + (th - 1) * hh * f0 + th * hh * f1))
