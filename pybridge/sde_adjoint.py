"""Gradients of SDE solves: backprop through the solver (default) or, for ReversibleHeun, the
reversible adjoint (Kidger, Foster, Li & Lyons 2021, "Efficient and accurate gradients for neural
SDEs", §3): O(1) memory in the number of steps, and exact, because the backward pass recovers every
forward state by running reversible Heun's algebraic inverse instead of storing it.
"""
from __future__ import annotations

import torch

from .adjoint import (Adjoint, DiscreteAdjoint, _check_closure, _refuse_time_gradients, _unique,
                      _values_only_dense_output)
from .solution import ReturnCode


class ReversibleAdjoint(Adjoint):
    """For pb.ReversibleHeun(): the forward solve keeps no graph; backward walks the steps in reverse,
    reconstructing (y_n, ŷ_n) from (y_{n+1}, ŷ_{n+1}) and back-propagating through one step at a time
    (one drift+diffusion evaluation with a vector-Jacobian product per step). Gradients agree with
    backprop through the solver up to floating-point rounding of the reconstruction.
    adjoint_params: the tensors to differentiate (default: the parameters of f and g when they are
    nn.Modules). The trace (eest) is not differentiable under this adjoint."""


def solve_sde_dispatch(prob, solver, adjoint, adjoint_params, options, *, differentiable_dt, brownian, seed,
                       local_regularizer):
    from .torch_engine.sde import solve_sde

    kw = dict(options, differentiable_dt=differentiable_dt, brownian=brownian, seed=seed,
              local_regularizer=local_regularizer)
    if isinstance(adjoint, DiscreteAdjoint):
        return solve_sde(prob, solver, **kw)
    if not isinstance(adjoint, ReversibleAdjoint):
        raise ValueError(f"adjoint={adjoint!r} is not available for SDEs: use DiscreteAdjoint() (backprop), "
                         "or ReversibleAdjoint() with ReversibleHeun()")
    if solver.name != "ReversibleHeun":
        raise ValueError(f"ReversibleAdjoint() needs solver=pb.ReversibleHeun(); got {solver!r}")
    if local_regularizer is not None:
        raise ValueError("local_regularizer needs an adaptive method; ReversibleHeun takes fixed steps")
    params = _resolve_params(prob, adjoint_params)
    if torch.is_grad_enabled():
        _check_closure(prob, params, options["lockstep"], fns=(prob.f, prob.g))
        _refuse_time_gradients(prob, adjoint)
    holder = {}
    ys = _ReversibleFunction.apply(prob, solver, kw, holder, prob.y0, *params)
    sol = holder["sol"]
    sol.ys = ys
    _values_only_dense_output(sol, adjoint)
    return sol


def _resolve_params(prob, adjoint_params):
    if adjoint_params is not None:
        params = tuple(adjoint_params)
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"adjoint_params must be tensors; got {type(p).__name__}")
        return _unique(params)
    seen, params = set(), []
    for fn in (prob.f, prob.g):
        if isinstance(fn, torch.nn.Module):
            for p in fn.parameters():
                if id(p) not in seen and p.requires_grad:
                    seen.add(id(p))
                    params.append(p)
    return tuple(params)


class _ReversibleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, prob, solver, kw, holder, y0, *params):
        from .torch_engine.sde import solve_sde

        with torch.no_grad():
            sol = solve_sde(prob, solver, keep_state=True, **kw)
        internals = sol.extras.pop("_sde_internals")
        holder["sol"] = sol
        ctx.internals = internals
        ctx.prob = prob
        ctx.nparams = len(params)
        ctx.params = params
        return sol.ys.clone()

    @staticmethod
    def backward(ctx, grad_ys):
        st, prob, params = ctx.internals, ctx.prob, ctx.params
        drift, diff, method, n = st["drift"], st["diffusion"], st["method"], st["n"]
        trace, tau_save = st["trace"], st["tau_save"]
        B = tau_save.shape[0]
        G = grad_ys.reshape(grad_ys.shape[0], B, n).transpose(0, 1)  # (B, T, n)
        t_end, h_all, mask = trace["t"], trace["dt"], trace["mask"]  # (B, N) step ends, sizes
        N = t_end.shape[1]
        t_start = torch.cat([tau_save[:, :1], t_end[:, :-1]], 1)  # a step starts where the previous ended
        # Saves sit exactly on step ends (stop_at_saves): which saves belong to the node after step j.
        at_node = (t_end[:, :, None] == tau_save[:, None, 1:]) & mask[..., None]  # (B, N, T-1)
        # A failed sample's saves after its last step are NaN constants, with no node and no gradient.
        tau_last = t_end.gather(1, (mask.sum(1, keepdim=True) - 1).clamp(min=0))[:, 0]
        reached = tau_save[:, 1:] <= tau_last[:, None]
        if not bool(((at_node.sum(1) == 1) | ~reached).all()):
            raise RuntimeError("ReversibleAdjoint: a save time is not a step end")
        # A sample the loss does not use stays at its last node: reconstructing a failed one
        # backwards could overflow, and a zero cotangent times an infinite derivative is NaN.
        used = G.flatten(1).ne(0).any(1)
        mask = mask & used[:, None]
        # A failed sample that the loss does use cannot be walked back from its blow-up.
        failed_used = used & (st["status"] != int(ReturnCode.Success))
        if bool(failed_used.any()):
            i = int(failed_used.nonzero()[0, 0])
            raise RuntimeError(
                f"ReversibleAdjoint: sample {i} failed ({ReturnCode(int(st['status'][i])).name} at "
                f"t={float(tau_last[i]):g}) and the loss uses its values; its states cannot be reconstructed "
                "backwards from where it blew up. Use adjoint=pb.DiscreteAdjoint() (backprop), or leave "
                "the failed samples (sol.retcode != 0) out of the loss")
        save_grad = lambda j: torch.einsum("bt,btn->bn", at_node[:, j].to(G.dtype), G[:, 1:])  # noqa: E731

        def fg(tau, yh):
            """(μ̂, σ̂) at a fresh leaf ŷ, with the graph kept for one vector-Jacobian product."""
            leaf = yh.detach().requires_grad_(True)
            with torch.enable_grad():
                mu, sig = drift(tau, leaf), diff(tau, leaf)
            return leaf, mu, sig

        z = st["final_state"]
        y, yh = z[:, :n].detach(), z[:, n:].detach()
        tau_cur = tau_last
        leaf, mu, sig = fg(tau_cur, yh)
        ybar = torch.zeros_like(y)
        yhbar = torch.zeros_like(y)  # partial: the direct use of ŷ by the later step
        mubar, sigbar = torch.zeros_like(mu), torch.zeros_like(sig)
        pgrads = [torch.zeros_like(p) for p in params]

        def vjp(leaf, mu, sig, mub, sgb):
            pairs = [(o, c) for o, c in ((mu, mub), (sig, sgb)) if o.requires_grad]
            if not pairs:  # f and g independent of y and the parameters (e.g. constant additive noise)
                return torch.zeros_like(leaf)
            outs = torch.autograd.grad([o for o, _ in pairs], (leaf,) + tuple(params), [c for _, c in pairs],
                                       allow_unused=True)
            for i, g in enumerate(outs[1:]):
                if g is not None:
                    pgrads[i].add_(g)
            return outs[0] if outs[0] is not None else torch.zeros_like(leaf)

        for j in range(N - 1, -1, -1):
            act = mask[:, j]
            a = act[:, None]
            ac = act.view(-1, *([1] * (sig.dim() - 1)))
            ybar = ybar + save_grad(j) * a
            h = torch.where(act, h_all[:, j], torch.zeros_like(h_all[:, j]))
            s = torch.where(act, t_start[:, j], tau_save[:, 0])  # padded steps: an empty interval inside the span
            dW, _ = method.increments(s, h)
            hc = h[:, None]
            # Cotangents of μ̂_{j+1}, σ̂_{j+1} from y_{j+1}; then the one VJP at node j+1.
            mub = mubar + hc / 2 * ybar * a
            sgb = sigbar + diff.times_vjp(ybar, dW) / 2 * ac
            yhbar_full = yhbar + vjp(leaf, mu, sig, mub * a, sgb * ac)
            # Reconstruct node j (algebraic inverse of the step), with the graph for its VJP next.
            with torch.no_grad():
                yh_prev = 2 * y - yh - hc * mu - diff.times(sig, dW)
            tau_cur = torch.where(act, s, tau_cur)  # samples not yet started stay at their last node
            leaf_p, mu_p, sig_p = fg(tau_cur, torch.where(a, yh_prev, yh))
            with torch.no_grad():
                y_prev = y - hc * (mu_p + mu) / 2 - diff.times((sig_p + sig) / 2, dW)
            # Adjoint of ŷ_{j+1} = 2y_j − ŷ_j + h μ̂_j + σ̂_j ΔW and y_{j+1} = y_j + h(μ̂_j + μ̂_{j+1})/2 + ...
            new_ybar = ybar + 2 * yhbar_full
            new_yhbar = -yhbar_full
            new_mubar = hc / 2 * ybar + hc * yhbar_full
            new_sigbar = diff.times_vjp(ybar / 2 + yhbar_full, dW)
            ybar = torch.where(a, new_ybar, ybar)
            yhbar = torch.where(a, new_yhbar, yhbar)
            mubar = torch.where(a, new_mubar, mubar)
            sigbar = torch.where(ac, new_sigbar, sigbar)
            y = torch.where(a, y_prev, y)
            yh = torch.where(a, yh_prev, yh)
            leaf, mu, sig = leaf_p, mu_p, sig_p
        # Node 0: ŷ_0 = y_0 and (μ̂_0, σ̂_0) = (f, g)(y_0); the initial save's gradient.
        ybar = ybar + G[:, 0]
        yhbar_full = yhbar + vjp(leaf, mu, sig, mubar, sigbar)
        gy0 = (ybar + yhbar_full).reshape(prob.y0.shape)
        return (None, None, None, None, gy0, *pgrads)
