"""Per-sample Jacobians of the right-hand side for the stiff methods (Rosenbrock, ESDIRK).

∂f/∂y is taken in reverse mode: one forward call of f and one backward pass batched over the n
basis cotangents (`is_grads_batched`). For a square Jacobian forward mode would be the textbook
choice, but in torch 2.13 forward-mode AD of an op with a Python scalar (``0.04 * y1``) takes a
Python decomposition costing ~0.3 ms per op: on ROBER (n = 3) a forward-mode Jacobian took
4.2 ms, the reverse one 0.55 ms (f itself: 0.04 ms). Samples must be independent (as everywhere
in the batched engine), so the batch-summed cotangent e_i gives row i of every sample's J.
"""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
from torch.func import jvp


class AutodiffJacobian:
    """∂f/∂y (B, n, n) and, on request, ∂f/∂t (B, n), or the user's `jac` for ∂f/∂y.

    Differentiable: under grad mode the result stays in the graph (w.r.t. y and f's parameters),
    so gradients flow through the stiff methods' linear solves. If the batched backward fails (an
    op without a batching rule), the rows are taken one backward pass at a time from then on.
    """

    def __init__(self):
        self.batched_ok = True

    def __call__(self, rhs, t, y, with_time: bool = False):
        user_jac = getattr(rhs, "jacobian", None)
        J = user_jac(t, y) if user_jac is not None else None
        uses_time = True
        if J is None and torch.compiler.is_compiling():
            J = _functional_jacobian(rhs, t, y)  # autograd.grad does not trace; torch.func does
        elif J is None:
            J, uses_time = self._reverse(rhs, t, y)
        if not with_time:
            return J, None
        return J, (self._time_derivative(rhs, t, y) if uses_time else torch.zeros_like(y))

    def _reverse(self, rhs, t, y):
        """(J, whether f's output depends on t): the time leaf costs nothing and spares an
        autonomous f (most neural ODEs, kinetics) the forward-mode time derivative."""
        B, n = y.shape
        graph = torch.is_grad_enabled()
        with torch.enable_grad():
            # Differentiated at a detached copy of y: autograd.grad walks every node reachable from
            # its output, so with y's own history attached each step's Jacobian would cost time in
            # proportion to all the steps before it (a quadratic solve). _Reattach links J to y.
            y_in = y.detach().requires_grad_(True)
            t_in = t.detach().requires_grad_(True)
            out = rhs(t_in, y_in)
            if not out.requires_grad:  # f depends on neither y nor t (nor anything differentiable)
                return y.new_zeros(B, n, n), False
            # A graph for J only when something upstream can receive gradients (y's history or a
            # parameter of f): otherwise a no-grad user would get a solution that requires grad.
            track_y = graph and y.requires_grad
            track_t = graph and isinstance(t, torch.Tensor) and t.requires_grad  # (differentiable_dt)
            graph = graph and (track_y or track_t or _reaches_other_leaf(out, (y_in, t_in)))
            basis = torch.eye(n, dtype=y.dtype, device=y.device)[:, None, :].expand(n, B, n)
            J = None
            if self.batched_ok:
                try:
                    rows, dt_rows = torch.autograd.grad(out, (y_in, t_in), basis, create_graph=graph,
                                                        allow_unused=True, is_grads_batched=True)
                    J, uses_time = _rows_to_jacobian(rows, y), dt_rows is not None
                except (RuntimeError, NotImplementedError):
                    self.batched_ok = False
            if J is None:
                rows, uses_time = [], False
                for i in range(n):
                    r, r_t = torch.autograd.grad(out, (y_in, t_in), basis[i], create_graph=graph,
                                                 retain_graph=True, allow_unused=True)
                    rows.append(r if r is not None else torch.zeros_like(y))
                    uses_time = uses_time or r_t is not None
                J = _rows_to_jacobian(torch.stack(rows), y)
            if (track_y or track_t) and J.requires_grad:
                J = _Reattach.apply(y, t, J, y_in, t_in)
            return J, uses_time

    @staticmethod
    def _time_derivative(rhs, t, y):
        """∂f/∂t per sample by one forward-mode product along the time direction (the time may be
        passed to f as one shared scalar, which a reverse pass could not split by sample).

        Eagerly by a dual number (torch.autograd.forward_ad): an output without a tangent means f
        ignores t (an autonomous f with the user's `jac`, where no reverse pass told us), and costs
        one plain call of f; torch.func.jvp's wrappers cost about twice that (kin20, B = 256:
        0.25 vs 0.5 ms). torch.compile traces torch.func.jvp, and drops a zero tangent itself."""
        if torch.compiler.is_compiling():
            return jvp(lambda tt: rhs(tt, y), (t,), (torch.ones_like(t),))[1]
        with fwAD.dual_level():
            tangent = fwAD.unpack_dual(rhs(fwAD.make_dual(t, torch.ones_like(t)), y)).tangent
        return torch.zeros_like(y) if tangent is None else tangent


# Up to this size a compiled graph takes the row sums of |J| as n column additions (pointwise, one
# fused kernel); inductor's code for the short row reduction is slower: (256, 20, 20), 416 against
# 72 µs per call (2026-12-03). Above it the unrolled sums would bloat the graph.
INF_NORM_UNROLLED_MAX_N = 32


def inf_norm(J):
    """‖J‖∞ = max_i Σ_j |J_ij| per sample, (B, n, n) -> (B,): the stiff methods' stiffness estimate."""
    n = J.shape[-1]
    if not (torch.compiler.is_compiling() and n <= INF_NORM_UNROLLED_MAX_N):
        return J.abs().sum(-1).amax(-1)
    a = J.abs()
    rows = a[..., 0]
    for j in range(1, n):
        rows = rows + a[..., j]
    norm = rows[:, 0]
    for i in range(1, n):
        norm = torch.maximum(norm, rows[:, i])
    return norm


def _functional_jacobian(rhs, t, y):
    """The same (B, n, n) Jacobian by torch.func.jacrev of the batch-summed output (the form
    torch.compile can trace); samples are independent, so row i of Σ_b f_b is row i of every J_b."""
    rows = torch.func.jacrev(lambda yy: rhs(t, yy).sum(0))(y)  # (n, B, n)
    return rows.transpose(0, 1)


class _Reattach(torch.autograd.Function):
    """J(t_d, y_d), computed at detached copies of t and y, as a function of t and y themselves: the
    gradient that reaches J goes on into J's own graph (f's parameters) and, through ∂J/∂y_d and
    ∂J/∂t_d, to y and t (t carries gradients with differentiable_dt, and J may depend on it). That
    backward pass walks J's short graph back to y_d and t_d, never the solve's history before."""

    @staticmethod
    def forward(ctx, y, t, J, y_d, t_d):
        ctx.save_for_backward(J)
        ctx.y_d, ctx.t_d = y_d, t_d
        return J.detach().clone()

    @staticmethod
    def backward(ctx, grad_J):
        (J,) = ctx.saved_tensors
        # (grad mode is on here exactly when the caller asked for a graph of this backward)
        grad_y, grad_t = torch.autograd.grad(J, (ctx.y_d, ctx.t_d), grad_J, retain_graph=True, allow_unused=True,
                                             create_graph=torch.is_grad_enabled())
        return grad_y, grad_t, grad_J, None, None


def _reaches_other_leaf(out, own_leaves):
    """Whether out's graph reaches a tensor requiring grad other than own_leaves (stops at the first)."""
    own = {id(x) for x in own_leaves}
    todo, seen = [out.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)  # AccumulateGrad: a leaf
        if var is not None and id(var) not in own:
            return True
        todo.extend(nxt for nxt, _ in fn.next_functions)
    return False


def _rows_to_jacobian(rows, y):
    """(n, B, n) rows (None when f ignores y) → (B, n, n)."""
    if rows is None:
        return y.new_zeros(y.shape[0], y.shape[1], y.shape[1])
    return rows.transpose(0, 1)
