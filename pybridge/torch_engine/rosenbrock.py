"""One generic routine for every Rosenbrock tableau (batched, per-sample linear algebra).

Per step and sample: the Jacobian J = ∂f/∂y and T = ∂f/∂t at (t0, y0) by AD (jacobian.py; or the
user's ``jac``), one LU of ``M = I − γhJ`` (linear_solve.py), then one triangular
solve per stage. No iteration and no host synchronisation: a singular M (a zero pivot) turns that
sample's proposal into NaN, which the loop treats as a rejection (dt shrinks, so M → I).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import linear_solve
from .jacobian import AutodiffJacobian, inf_norm
from .rosenbrock_tableaus import RosenbrockTableau
from .tableau import StageWeights, combine, combine_rows


class RosenbrockStep(NamedTuple):
    y1: torch.Tensor                  # (B, n)
    err: Optional[torch.Tensor]       # (B, n)
    ks: torch.Tensor                  # (B, s, n) stage increments U_i (for the interpolant)
    stage_args: tuple
    nfe: int
    stats: dict                       # per-call counts the loop adds to Stats (njac, nlu, nsolve)
    f_end: Optional[torch.Tensor]     # f(t1, y1) when the last stage evaluated it (FSAL)
    jac_norm: torch.Tensor            # (B,) ‖J‖∞, the stiffness estimate


class Rosenbrock:
    """Steps a RosenbrockTableau on (B, n) states."""

    qsteady_max = 1.2   # implicit-method controller: keep dt when 1 ≤ q ≤ 1.2 (OrdinaryDiffEq)
    counter_names = ("njac", "nlu", "nsolve")   # what its steps' stats count (Stats has them, 0 or more)

    def __init__(self, tableau: RosenbrockTableau, dtype: torch.dtype, device: torch.device):
        self.tableau = tableau
        self.order = tableau.order
        self.fsal = tableau.fsal
        self.adaptive = True
        self.stability_size = float("inf")  # A-stable: ‖J‖∞·dt has no explicit-method bound
        self.interpolation_order = tableau.dense_order
        as_tensor = lambda v: torch.tensor(v, dtype=dtype, device=device)
        self.gamma = float(tableau.gamma)
        self.c = [float(x) for x in tableau.c]
        self.d = [float(x) for x in tableau.d]
        s = tableau.stages
        self.A_rows = [StageWeights(list(tableau.A[i][:i]), dtype, device) for i in range(s)]
        self.C_rows = [StageWeights(list(tableau.C[i][:i]), dtype, device) for i in range(s)]
        self.uses_A = [any(x != 0 for x in tableau.A[i][:i]) for i in range(s)]
        self.weights = StageWeights([list(tableau.b), list(tableau.btilde)], dtype, device)
        self.dense = as_tensor([list(r) for r in tableau.dense])            # (D, s)
        self.jacobian = AutodiffJacobian()

    # -- the step ------------------------------------------------------------------------------
    def step(self, rhs, t, y, h, k1) -> RosenbrockStep:
        J, dT = self.jacobian(rhs, t, y, with_time=True)
        hcol = h[:, None]
        # A singular sample solves with the identity; its proposal is replaced by NaN below.
        lu = linear_solve.factor_shifted(J, self.gamma * h)
        ok = lu.ok
        solve = lambda r: self.gamma * lu.solve(r)

        h2T = (h * h)[:, None] * dT
        Us, f_last, u_last = [], k1, y
        s = len(self.c)
        compiling = torch.compiler.is_compiling()  # (the stage sums: see tableau.combine)
        for i in range(s):
            if i == 0:
                fi, ui = k1, y
            else:
                Ustack = None if compiling else torch.stack(Us, -1)  # (B, n, i)
                ui = y + combine(Us, self.A_rows[i], Ustack) if self.uses_A[i] else y
                fi = rhs(t + self.c[i] * h, ui)
            r = hcol * fi
            if self.d[i] != 0:
                r = r + self.d[i] * h2T
            if i > 0:
                r = r + combine(Us, self.C_rows[i], Ustack)
            Us.append(solve(r))
            f_last, u_last = fi, ui
        U = torch.stack(Us, -1)             # (B, n, s)
        sol_sum, err = combine_rows(Us, self.weights, U)
        # FSAL (Rosenbrock23): the last stage was evaluated at y1 itself; use exactly that point.
        y1 = u_last if self.fsal else y + sol_sum
        nan = torch.full_like(y1, float("nan"))
        y1 = torch.where(ok[:, None], y1, nan)
        err = torch.where(ok[:, None], err, nan)
        jac_norm = inf_norm(J)
        stats = {"njac": 1, "nlu": 1, "nsolve": s}
        return RosenbrockStep(y1, err, U.transpose(1, 2), (), s - 1, stats,
                              f_last if self.fsal else None, jac_norm)

    def end_derivative(self, step: RosenbrockStep):
        return step.f_end

    def stiffness(self, step: RosenbrockStep, y1, f1, norm):
        """‖J‖∞ at the step's start (SOLVERS.md: Rosenbrock/implicit methods)."""
        return step.jac_norm

    def interpolate(self, y0, h, ks, y1, f1, theta):
        """y0 + Σ_m θ^m (dense_m · U); θ (B, K) → (B, K, n)."""
        powers = torch.stack([theta ** (m + 1) for m in range(self.dense.shape[0])], -1)  # (B, K, D)
        w = powers @ self.dense  # (B, K, s)
        return y0[:, None] + w @ ks
