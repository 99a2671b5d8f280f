"""The Python callbacks Julia calls during a solve, over zero-copy views of Julia's arrays.

Each callback receives `(address, length)` pairs of contiguous Julia arrays (see
julia/src/PyBridge.jl) and the address of a one-element time buffer. Nothing here imports Julia:
the callbacks work on any memory, which is how they are tested without a Julia runtime.
"""
from __future__ import annotations

import torch

from .views import ViewCache


class Bridge:
    """Right-hand side, Jacobian, ∂f/∂t and VJPs of one problem, for Julia.

    f(t, y) sees y of shape `fshape` ((m, *S) for a batch of m samples, S for one unbatched
    sample) and t of shape `tshape` (() shared time, or (1,) for a sample solved on its own, as
    pybridge's independent batching passes it). The Julia state is n × m over the same memory.
    Exceptions raised by f are kept in `error` so that the engine re-raises the original one
    after Julia unwinds.
    """

    def __init__(self, f, fshape, tshape, dtype, samples: int, n: int, params=(), jac=None):
        self.f = f
        self.user_jac = jac
        self.fshape = tuple(fshape)
        self.samples, self.n = samples, n  # the Julia state is n × samples
        self.params = list(params)
        self.state = ViewCache(dtype, lambda length: self.fshape)
        self.time = ViewCache(dtype, lambda length: tuple(tshape))
        self.flat = ViewCache(dtype, lambda length: (length,))
        self.error = None
        self.checked = False
        self._pending = None  # (t, u, λ, param grads) of the last vjp_u, reused by vjp_p

    def _check(self, out):
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"f must return a torch.Tensor; got {type(out).__name__}")
        if tuple(out.shape) != self.fshape:
            raise ValueError(f"f returned shape {tuple(out.shape)}; expected {self.fshape} (the shape of y)")
        self.checked = True

    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except BaseException as e:  # kept for the engine, then re-raised into Julia to unwind it
            if self.error is None:
                self.error = e
            raise

    # ---- callbacks (the names are what PyBridge.jl calls) ---------------------------------
    def rhs(self, du, du_len, u, u_len, t):
        # The hot path (every step, every stage): no extra call layers, one grad-mode switch.
        try:
            prev = torch.is_grad_enabled()
            torch.set_grad_enabled(False)
            try:
                out = self.f(self.time(t, 1), self.state(u, u_len))
                if not self.checked:
                    self._check(out)
                self.state(du, du_len).copy_(out)
            finally:
                torch.set_grad_enabled(prev)
        except BaseException as e:
            if self.error is None:
                self.error = e
            raise

    def jac(self, J, J_len, u, u_len, t):
        self._guard(self._jac, J, J_len, u, u_len, t)

    def _jac(self, J, J_len, u, u_len, t):
        """Per-sample Jacobians (m, n, n) into Julia's dense n×n, or the nonzeros of its
        block-diagonal sparse matrix: both store block b's entry (i, j) at b·n² + j·n + i."""
        tt, y = self.time(t, 1), self.state(u, u_len)
        with torch.no_grad():
            if self.user_jac is not None:
                Jb = self.user_jac(tt, y)
            else:
                Jb = blockwise_jacobian(self.f, tt, y, self.samples, self.n)
            self.flat(J, J_len).view(self.samples, self.n, self.n).copy_(
                Jb.reshape(self.samples, self.n, self.n).transpose(1, 2))

    def tgrad(self, dT, dT_len, u, u_len, t):
        self._guard(self._tgrad, dT, dT_len, u, u_len, t)

    def _tgrad(self, dT, dT_len, u, u_len, t):
        tt, y = self.time(t, 1), self.state(u, u_len)
        with torch.no_grad():
            _, dfdt = torch.func.jvp(lambda s: self.f(s, y), (tt.clone(),), (torch.ones_like(tt),))
            self.state(dT, dT_len).copy_(dfdt)

    def vjp_u(self, out, out_len, lam, lam_len, u, u_len, t):
        self._guard(self._vjp_u, out, out_len, lam, lam_len, u, u_len, t)

    def _vjp_u(self, out, out_len, lam, lam_len, u, u_len, t):
        tt, y, lv = self.time(t, 1), self.state(u, u_len), self.state(lam, lam_len)
        gy, gp = self._vjp(tt, y, lv, want_params=bool(self.params))
        self.state(out, out_len).copy_(gy)
        # Julia asks for vjp_p at the same (λ, u, t) next: keep the parameter part of this pass.
        self._pending = (float(tt), y.clone(), lv.clone(), gp) if self.params else None

    def vjp_p(self, out, out_len, v, v_len, u, u_len, t):
        self._guard(self._vjp_p, out, out_len, v, v_len, u, u_len, t)

    def _vjp_p(self, out, out_len, v, v_len, u, u_len, t):
        target = self.flat(out, out_len)
        if not self.params:
            target.zero_()
            return
        tt, y, vv = self.time(t, 1), self.state(u, u_len), self.state(v, v_len)
        pend = self._pending
        if pend is not None and pend[0] == float(tt) and torch.equal(pend[1], y) and torch.equal(pend[2], vv):
            gp = pend[3]
        else:
            _, gp = self._vjp(tt, y, vv, want_params=True)
        target.copy_(gp)

    def _vjp(self, t, y, lam, want_params):
        """(∂f/∂y)ᵀλ and, if asked, (∂f/∂θ)ᵀλ flattened over `params`, by torch autograd."""
        with torch.enable_grad():
            yg = y.detach().clone().requires_grad_(True)
            out = self.f(t.detach().clone(), yg)
            inputs = [yg] + (self.params if want_params else [])
            grads = torch.autograd.grad(out, inputs, grad_outputs=lam.reshape(out.shape),
                                        allow_unused=True)
        gy = grads[0] if grads[0] is not None else torch.zeros_like(y)
        gp = None
        if want_params:
            gp = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).to(y.dtype)
                            for g, p in zip(grads[1:], self.params)])
        return gy, gp


def blockwise_jacobian(f, t, y, samples: int, n: int) -> torch.Tensor:
    """∂f_b/∂y_b for every sample b, shape (samples, n, n), by forward mode (torch.func.jacfwd).

    Samples are assumed independent under f (the batch contract); the full Jacobian's diagonal
    blocks are taken, which works for any f torch.func can trace, vmap-compatible or not.
    """
    J = torch.func.jacfwd(lambda z: f(t, z))(y)
    J = J.reshape(samples, n, samples, n)
    return torch.diagonal(J, dim1=0, dim2=2).permute(2, 0, 1)
