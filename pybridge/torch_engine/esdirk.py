"""One generic routine for every ESDIRK tableau (batched, per-sample Newton and linear algebra).

Per step and sample: J = ∂f/∂y at (t0, y0) by AD (jacobian.py; or the user's ``jac``), one LU of
``W = I − γhJ`` (linear_solve.py), then for each implicit stage a simplified Newton
iteration on ``G(z) = z − h f(t + c_i h, tmp_i + γ z) = 0`` with that W (Hairer & Wanner, Solving
ODEs II, §IV.8): stop when ``η·‖Δz‖ ≤ κ`` (κ = 1/100, ‖·‖ the RMS scaled by atol + rtol·|y|, so the
tolerance is inside the norm), η = θ/(1−θ) with θ the contraction rate; divergence when θ > 2; at
most 10 iterations. Every sample iterates until it has converged or failed; samples already done
stop changing. The only host synchronisation is one ``.any()`` per Newton iteration (to leave the
loop when the whole batch is done).

A singular W (``info != 0``) or a Newton solve that does not converge marks the sample's step as
failed: ``step.failed`` makes the loop reject it; the proposal is y itself and the error is set so
that the PI controller halves dt (SOLVERS.md: "on failure dt ÷ 2"); below dtmin the sample ends
with ReturnCode.ConvergenceFailure. Everything stays finite, so no NaN reaches autograd. A Newton
iterate that turns non-finite instead makes the proposal a NaN constant: the loop then handles the
sample as it does a diverging explicit step (in lockstep, that sample alone stops, as Unstable).

Gradients: the Newton iterations run detached. When anything in the step requires grad, each
converged stage gets one extra Newton correction with the graph attached, using the *exact*
Jacobian at the converged point, ``z = z* − M⁻¹G(z*)`` with ``M = I − γh·J(Y*)`` detached; it
enters as ``z* + (g − g.detach())`` so the value stays the Newton iterate (identical with and
without grad) while the gradient is the implicit-function-theorem one, ``dz = −(∂G/∂z)⁻¹ ∂G/∂θ``.
That costs one f evaluation, one Jacobian and one LU per stage, only when gradients are needed.

Error estimate: ``err = W⁻¹ Σ btilde_i z_i`` — Shampine's filter with the intended scaling
(OrdinaryDiffEq divides by its W = J − I/(γh), off by a factor −γh).
Dense output: cubic Hermite on (y0, f0, y1, f1), f1 = z_s/h (the last stage is at y1).
"""
from __future__ import annotations

import copy
import math
from typing import NamedTuple, Optional

import torch

from . import linear_solve
from .esdirk_tableaus import ESDIRKTableau
from .explicit_rk import hermite
from .jacobian import AutodiffJacobian, inf_norm


class ESDIRKStep(NamedTuple):
    y1: torch.Tensor                  # (B, n); y itself where the step failed
    err: Optional[torch.Tensor]       # (B, n) filtered error estimate
    ks: torch.Tensor                  # (B, 2, n): f0, f1 (for the Hermite interpolant)
    stage_args: tuple
    nfe: torch.Tensor                 # (B,) evaluations of f each sample needed
    stats: dict                       # njac, nlu, nsolve, nnonliniter, nnonlinconvfail
    f_end: torch.Tensor               # f(t1, y1) ≈ z_s / h (the last stage sits at y1)
    jac_norm: torch.Tensor            # (B,) ‖J‖∞, the stiffness estimate
    failed: torch.Tensor              # (B,) bool: singular W or Newton did not converge


class ESDIRK:
    """Steps an ESDIRKTableau on (B, n) states (see the module docstring)."""

    qsteady_max = 1.2   # implicit-method controller: keep dt when 1 ≤ q ≤ 1.2 (OrdinaryDiffEq)
    kappa = 0.01        # Newton stopping criterion η·‖Δz‖ ≤ κ (scaled norm)
    max_iters = 10
    fast_convergence = 1e-5   # OrdinaryDiffEq: a first correction below this converges at once
    counter_names = ("njac", "nlu", "nsolve", "nnonliniter", "nnonlinconvfail")   # (its steps' stats)

    def __init__(self, tableau: ESDIRKTableau, dtype: torch.dtype, device: torch.device):
        self.tableau = tableau
        self.order = tableau.order
        self.fsal = True
        self.adaptive = True
        self.stability_size = float("inf")   # A-stable: no explicit-method bound on ‖J‖·dt
        self.interpolation_order = 3          # Hermite
        as_tensor = lambda v: torch.tensor(v, dtype=dtype, device=device)
        s = tableau.stages
        self.gamma = float(tableau.gamma)
        self.c = [float(x) for x in tableau.c]
        self.A_rows = [as_tensor(tableau.A[i][:i]) for i in range(s)]
        self.P_rows = [as_tensor(tableau.predictor[i][:i]) for i in range(s)]
        self.btilde = as_tensor(list(tableau.btilde))
        self.eps = torch.finfo(dtype).eps
        # A failed step reports EEst = c with c^β1 / 0.9 = 2, so the PI controller halves dt.
        beta1 = tableau.beta1 if tableau.beta1 is not None else 7 / (10 * tableau.order)
        self.fail_eest = 1.8 ** (1 / beta1)
        # Tolerances of the Newton norm; solve_ode binds the solve's own (with_tolerances).
        self.atol, self.rtol, self.lockstep = 1e-6, 1e-3, False
        self.jacobian = AutodiffJacobian()

    def with_tolerances(self, atol, rtol, lockstep: bool) -> "ESDIRK":
        """A shallow copy (sharing the coefficient tensors) whose Newton norm uses atol/rtol."""
        bound = copy.copy(self)
        bound.atol, bound.rtol, bound.lockstep = atol, rtol, lockstep
        return bound

    # -- Newton ------------------------------------------------------------------------------
    def _newton(self, rhs, ti, tmp, z, h, solve, done, eta, y0abs):
        """Simplified Newton for G(z) = z − h f(ti, tmp + γz) = 0, all detached. Returns the
        iterate, per-sample failure, those failures whose iterate turned non-finite, the
        iteration count and the last rate estimate η."""
        gamma, kappa = self.gamma, self.kappa
        conv = done.clone()
        fail = torch.zeros_like(done)
        blew = torch.zeros_like(done)
        iters = torch.zeros(done.shape, dtype=torch.long, device=done.device)
        ndz_prev = torch.ones_like(h)
        eta = torch.clamp(eta, min=self.eps) ** 0.8   # Hairer's first-iteration rate estimate
        hcol = h[:, None]
        limit = 100 * math.sqrt(self.eps)
        for it in range(self.max_iters):
            running = ~(conv | fail)
            Y = tmp + gamma * z
            dz = -solve(z - hcol * rhs(ti, Y))
            z_new = z + dz
            scale = self.atol + self.rtol * torch.maximum(y0abs, (tmp + gamma * z_new).abs())
            ndz = (dz / scale).square().mean(-1).sqrt()
            iters = iters + running
            finite = torch.isfinite(ndz)
            if it == 0:
                converged = (ndz < self.fast_convergence) | (eta * ndz <= kappa)
                diverged = torch.zeros_like(fail)
                eta_new = eta
            else:
                theta = ndz / ndz_prev
                diverged = theta > 2
                below = theta < 1
                eta_new = torch.where(below, theta / torch.where(below, 1 - theta, torch.ones_like(theta)),
                                      torch.full_like(theta, float("inf")))
                # θ ≈ 1: the iteration no longer moves (round-off level); judge by ndz alone.
                at_limit = ((theta - 1).abs() <= limit) & (ndz <= 1)
                converged = (eta_new * ndz <= kappa) | at_limit | (ndz == 0)
            converged = converged & finite & ~diverged
            failing = ~finite | diverged | (~converged & (it == self.max_iters - 1))
            z = torch.where((running & finite)[:, None], z_new, z)
            eta = torch.where(running, eta_new, eta)
            ndz_prev = torch.where(running, ndz, ndz_prev)
            conv = conv | (running & converged)
            fail = fail | (running & failing)
            blew = blew | (running & ~finite)
            if not bool((~(conv | fail)).any()):   # the one host sync per iteration
                break
        return z, fail, blew, iters, eta

    def _attach(self, rhs, ti, tmp, zstar, h):
        """z* + (g − g.detach()), g = −M⁻¹G(z*) with the exact Jacobian at the converged point."""
        Y = tmp + self.gamma * zstar
        G = zstar - h[:, None] * rhs(ti, Y)
        with torch.no_grad():
            Jstar = self.jacobian(rhs, ti.detach(), Y.detach())[0]
            lu = linear_solve.factor_shifted(Jstar, self.gamma * h.detach())
        g = -lu.solve(G)
        return zstar + (g - g.detach())

    # -- the step ------------------------------------------------------------------------------
    def step(self, rhs, t, y, h, k1) -> ESDIRKStep:
        B = y.shape[0]
        s = len(self.c)
        device = y.device
        J = self.jacobian(rhs, t, y)[0]
        lu = linear_solve.factor_shifted(J, self.gamma * h)   # W; a singular sample solves with the identity
        singular = ~lu.ok
        solve_d = lu.detach().solve

        need_grad = torch.is_grad_enabled() and any(
            x.requires_grad for x in (t, y, h, k1))
        hd, td, y0abs = h.detach(), t.detach(), y.detach().abs()
        inactive = h == 0            # finished samples: z ≡ 0, nothing to solve
        failed = singular & ~inactive
        zero_long = torch.zeros(B, dtype=torch.long, device=device)
        iters, newton_fail, blew = zero_long, torch.zeros_like(failed), torch.zeros_like(failed)
        eta = torch.ones_like(hd)
        zs = [h[:, None] * k1]
        for i in range(1, s):
            Z = torch.stack(zs, -1)                                   # (B, n, i)
            tmp = y + Z @ self.A_rows[i]
            ti = t + self.c[i] * h
            with torch.no_grad():
                guess = Z.detach() @ self.P_rows[i]
                guess = torch.where((failed | inactive)[:, None], torch.zeros_like(guess), guess)
                zi, fail_i, blew_i, its, eta = self._newton(rhs, td + self.c[i] * hd, tmp.detach(), guess, hd,
                                                            solve_d, failed | inactive, eta, y0abs)
            newton_fail = newton_fail | fail_i
            blew = blew | blew_i
            failed = failed | fail_i
            # Failed samples carry zeros from here on: finite stage values for every later f call.
            zi = torch.where(failed[:, None], torch.zeros_like(zi), zi)
            iters = iters + its
            if need_grad:
                zi = self._attach(rhs, ti, tmp, zi, h)
            zs.append(zi)
        Z = torch.stack(zs, -1)                                       # (B, n, s)
        y1 = tmp + self.gamma * zs[-1]
        err = lu.solve(Z @ self.btilde)

        if self.lockstep:   # one step size for the batch: a failure anywhere fails everyone ...
            failed = (failed & ~blew).any().expand(B) & ~inactive | blew
        ok = ~failed
        safe_h = torch.where(inactive, torch.ones_like(h), h)
        f_end = torch.where(inactive[:, None], k1, zs[-1] / safe_h[:, None])
        f_end = torch.where(ok[:, None], f_end, k1)
        y1 = torch.where(ok[:, None], y1, y)
        fail_err = self.fail_eest * (self.atol + self.rtol * y0abs)
        err = torch.where(ok[:, None], err, fail_err.expand_as(err))
        # ... except a sample whose Newton iterate turned non-finite (f NaN or overflowing there): its
        # proposal is NaN, so the loop treats it as a diverging sample of an explicit method
        # (lockstep: stopped as Unstable rather than shrinking everyone's step; independent: retried
        # smaller). The NaN is a constant: nothing non-finite enters the autograd graph.
        y1 = torch.where(blew[:, None], torch.full_like(y1, float("nan")), y1)

        extra = (s - 1) if need_grad else 0
        nfe = iters + extra
        stats = {"njac": 1 + extra, "nlu": 1 + extra, "nsolve": iters + 1 + extra,
                 "nnonliniter": iters, "nnonlinconvfail": newton_fail.long()}
        jac_norm = inf_norm(J)
        ks = torch.stack([k1, f_end], 1)
        return ESDIRKStep(y1, err, ks, (), nfe, stats, f_end, jac_norm, failed)

    def end_derivative(self, step: ESDIRKStep):
        return step.f_end

    def stiffness(self, step: ESDIRKStep, y1, f1, norm):
        """‖J‖∞ at the step's start (SOLVERS.md: Rosenbrock/implicit methods)."""
        return step.jac_norm

    def interpolate(self, y0, h, ks, y1, f1, theta):
        """Cubic Hermite on (y0, f0, y1, f1); θ (B, K) → (B, K, n)."""
        return hermite(y0, y1, ks[:, 0], ks[:, 1], h, theta)
