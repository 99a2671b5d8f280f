"""Per-sample Jacobians of the right-hand side for the stiff methods (Rosenbrock, ESDIRK)."""
from __future__ import annotations

import torch
from torch.func import jvp, vmap


class ForwardJacobian:
    """∂f/∂y (B, n, n) and, on request, ∂f/∂t (B, n) by forward mode over basis tangents, or the
    user's `jac` for ∂f/∂y. One vmap over the tangents; an f with data-dependent Python control
    flow cannot be vmapped, and is then differentiated one tangent at a time from then on."""

    def __init__(self):
        self.vmap_ok = True

    def __call__(self, rhs, t, y, with_time: bool = False):
        user_jac = getattr(rhs, "jacobian", None)
        J = user_jac(t, y) if user_jac is not None else None
        if J is not None:
            if not with_time:
                return J, None
            return J, jvp(rhs, (t, y), (torch.ones_like(t), torch.zeros_like(y)))[1]
        B, n = y.shape
        # n tangents along the basis vectors of y (zero time tangent), then the time direction.
        eye = torch.eye(n, dtype=y.dtype, device=y.device)
        vy, vt = eye[:, None, :].expand(n, B, n), t.new_zeros(n, B)
        if with_time:
            vy, vt = torch.cat([vy, y.new_zeros(1, B, n)]), torch.cat([vt, t.new_ones(1, B)])
        cols = None
        if self.vmap_ok:
            try:
                cols = vmap(lambda a, b: jvp(rhs, (t, y), (a, b))[1])(vt, vy)
            except (RuntimeError, NotImplementedError):
                self.vmap_ok = False
        if cols is None:
            cols = torch.stack([jvp(rhs, (t, y), (vt[i], vy[i]))[1] for i in range(vt.shape[0])])
        return cols[:n].permute(1, 2, 0), (cols[n] if with_time else None)
