"""One generic routine for every explicit Runge–Kutta tableau."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .tableau import ButcherTableau


class RKStep(NamedTuple):
    y1: torch.Tensor                  # (B, n) proposed solution
    err: Optional[torch.Tensor]       # (B, n) local error vector, None without an embedded method
    ks: torch.Tensor                  # (B, s, n) stage derivatives (for the interpolant)
    stage_args: tuple                 # arguments of the stiffness pair's stages that are not y1
    nfe: int                          # evaluations made by this call


class ExplicitRK:
    """Steps a ButcherTableau on (B, n) states. `k1 = f(t, y)` is passed in (FSAL or reused)."""

    def __init__(self, tableau: ButcherTableau, dtype: torch.dtype, device: torch.device):
        self.tableau = tableau
        self.order = tableau.order
        self.fsal = tableau.fsal
        self.adaptive = tableau.adaptive
        self.stability_size = tableau.stability_size
        as_tensor = lambda v: torch.tensor(v, dtype=dtype, device=device)
        s = tableau.stages
        self.c = [float(ci) for ci in tableau.c]
        # Row i combines the i previous stages with one matrix-vector product.
        self.a_rows = [as_tensor(list(tableau.a[i])) for i in range(s)]
        weights = [list(tableau.b)] + ([list(tableau.b_error)] if tableau.b_error is not None else [])
        self.weights = as_tensor(weights).T  # (s, 1 or 2): solution and error in one product
        self.dense = as_tensor([list(r) for r in tableau.dense]) if tableau.dense is not None else None
        self.stiffness_pair = tableau.stiffness_pair
        self.interpolation_order = tableau.dense_order if tableau.dense is not None else 3

    def step(self, rhs, t, y, h, k1) -> RKStep:
        hcol = h[:, None]
        ks = [k1]
        args = {0: y}
        keep = set(self.stiffness_pair)
        s = len(self.c)
        for i in range(1, s):
            yi = y + hcol * (torch.stack(ks, -1) @ self.a_rows[i])
            if i in keep or (self.fsal and i == s - 1):
                args[i] = yi
            ks.append(rhs(t + self.c[i] * h, yi))
        K = torch.stack(ks, -1)  # (B, n, s)
        combo = K @ self.weights  # (B, n, 1 or 2)
        # FSAL: the last stage is evaluated at y1, so its argument *is* the solution.
        y1 = args[s - 1] if self.fsal else y + hcol * combo[..., 0]
        err = hcol * combo[..., 1] if self.adaptive else None
        stage_args = tuple(args.get(i) for i in self.stiffness_pair)
        return RKStep(y1, err, K.transpose(1, 2), stage_args, s - 1)

    def end_derivative(self, step: RKStep):
        """f(t1, y1) when the method has it already (FSAL), else None."""
        return step.ks[:, -1] if self.fsal else None

    def stiffness(self, step: RKStep, y1, f1, norm):
        """|λ| ≈ ‖k_j − k_i‖ / ‖g_j − g_i‖ over the stiffness pair (index s = the step's end)."""
        s = step.ks.shape[1]
        i, j = self.stiffness_pair
        k = lambda m: f1 if m == s else step.ks[:, m]
        g = lambda m, arg: y1 if (m == s or arg is None) else arg
        num = norm(k(j) - k(i))
        den = norm(g(j, step.stage_args[1]) - g(i, step.stage_args[0]))
        ok = den > 0
        return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))

    def interpolate(self, y0, h, ks, y1, f1, theta):
        """y at t0 + θh for θ of shape (B, K) → (B, K, n); the tableau's own dense output or Hermite."""
        hh = h[:, None, None]
        if self.dense is not None:
            powers = torch.stack([theta ** (m + 1) for m in range(self.dense.shape[1])], -1)  # (B,K,D)
            w = powers @ self.dense.T  # (B, K, s)
            return y0[:, None] + hh * (w @ ks)
        return hermite(y0, y1, ks[:, 0], f1, h, theta)


def hermite(y0, y1, f0, f1, h, theta):
    """Cubic Hermite interpolation on (y0, f0) and (y1, f1); θ (B, K) → (B, K, n)."""
    th = theta[..., None]
    y0, y1, f0, f1 = (v[:, None] for v in (y0, y1, f0, f1))
    hh = h[:, None, None]
    return ((1 - th) * y0 + th * y1
            + th * (th - 1) * ((1 - 2 * th) * (y1 - y0) + (th - 1) * hh * f0 + th * hh * f1))
