"""The integration loop: per-sample stepping, step control, saving, trace and failure codes.

Everything is carried as (B,) or (B, n) tensors so that samples advance independently without
Python-level branching; the loop reads the device once per iteration (the termination flag and
the number of save points the step covered, in one transfer).

Time runs in τ = direction·t, so every sample integrates forwards; the caller's right-hand side
already accounts for the sign.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..solution import ReturnCode
from .controller import Norm, PIController, error_norm, initial_step

RUNNING = int(ReturnCode.Running)


@dataclass
class LoopOptions:
    adaptive: bool = True
    dt: Optional[float] = None          # fixed step, or the first step of an adaptive solve
    dtmin: float = 0.0
    dtmax: Optional[float] = None
    max_steps: int = 100_000
    lockstep: bool = False
    dense: bool = False
    differentiable_dt: bool = False
    controller: Optional[PIController] = None
    stop_at_saves: bool = False         # step exactly onto save points (no interpolation needed)
    # Local regularization (Pal et al. 2023) needs one detached state per sample at a random time:
    # ("unbiased", tau_reg (B,)) interpolates at a time drawn uniformly in the span;
    # ("biased", torch.Generator) picks uniformly among the accepted step ends (reservoir sampling).
    probe: Optional[tuple] = None


@dataclass
class LoopResult:
    ys: torch.Tensor                    # (T, B, n)
    status: torch.Tensor                # (B,) ReturnCode values
    nfe: torch.Tensor
    naccept: torch.Tensor
    nreject: torch.Tensor
    trace: dict                         # name -> (B, N) compacted, plus 'mask'
    dense: Optional[dict]               # per accepted step data for sol(t), compacted
    tau: torch.Tensor                   # (B,) where each sample stopped
    dt: torch.Tensor                    # (B,) its last step size
    probe: Optional[tuple] = None       # (tau_reg, y_reg) for local regularization, detached
    counters: Optional[dict] = None     # extra per-sample counts a method reports (njac, nlu, ...)


def integrate(rhs: Callable, method, tau_save: torch.Tensor, y0: torch.Tensor, atol, rtol,
              opts: LoopOptions) -> LoopResult:
    B, n = y0.shape
    T = tau_save.shape[1]
    dtype, device = y0.dtype, y0.device
    norm = Norm(opts.lockstep)
    controller = opts.controller or PIController.for_order(
        method.order, getattr(method.tableau, "beta1", None), getattr(method.tableau, "beta2", None),
        qsteady_max=getattr(method, "qsteady_max", 1.0))
    tau = tau_save[:, 0].clone()
    tau_end = tau_save[:, -1]
    span = tau_end - tau
    dtmax = span if opts.dtmax is None else torch.clamp(span, max=opts.dtmax)
    eps = torch.finfo(dtype).eps
    end_slack = 100 * eps * torch.clamp(tau_end.abs(), min=1.0)

    nfe = torch.ones(B, dtype=torch.long, device=device)
    y = y0
    k1 = rhs(tau, y)
    if opts.dt is not None:
        dt = torch.full_like(tau, float(opts.dt))
    else:
        nfe += 1
        dt = initial_step(rhs, tau, y0, k1, method.order, atol, rtol, norm, dtmax)
        if not opts.differentiable_dt:
            dt = dt.detach()
        if opts.lockstep:
            dt = dt.min().expand(B)
    errold = controller.initial_errold(tau)
    status = torch.full((B,), RUNNING, dtype=torch.long, device=device)
    iters = torch.zeros(B, dtype=torch.long, device=device)
    naccept = torch.zeros_like(iters)
    counters = {}

    saved_vals, saved_idx = [], []
    trace = {k: [] for k in ("t", "dt", "eest", "stiffness", "accept")}
    dense = {k: [] for k in ("tau", "h", "y0", "ks", "y1", "f1")} if opts.dense else None
    next_save = torch.ones(B, dtype=torch.long, device=device)
    nan = torch.tensor(float("nan"), dtype=dtype, device=device)
    probe_tau, probe_y = tau.clone(), y0.detach()
    probe_count = torch.zeros(B, dtype=dtype, device=device)

    # Fixed steps cannot retry; in lockstep one dt serves everyone, so a diverging sample is
    # stopped rather than allowed to shrink the batch's step. Otherwise it retries smaller.
    stop_diverged = not opts.adaptive or opts.lockstep

    while True:
        active = status == RUNNING
        # Steps never pass the end, nor, for methods without a good interpolant, the next save point.
        if opts.stop_at_saves:
            target = torch.gather(tau_save, 1, next_save.clamp(max=T - 1)[:, None])[:, 0]
        else:
            target = tau_end
        remaining = target - tau
        hit = active & (dt >= remaining - end_slack)
        h = torch.where(active, torch.where(hit, remaining, dt), torch.zeros_like(dt))
        step = method.step(rhs, tau, y, h, k1)
        nfe = nfe + active * step.nfe
        for key, count in (getattr(step, "stats", None) or {}).items():
            counters[key] = counters.get(key, 0) + active * count
        iters = iters + active

        finite_y1 = torch.isfinite(step.y1).all(-1)
        if step.err is not None:
            eest = error_norm(norm, step.err, y, step.y1, atol, rtol, valid=active)
        else:
            eest = nan.expand(B)
        # A method may reject a sample's step itself (an implicit solve that did not converge).
        failed = getattr(step, "failed", None)
        accept = active & finite_y1 if failed is None else active & finite_y1 & ~failed
        if opts.adaptive:
            accept = accept & (eest <= 1)

        tau_new = torch.where(accept, torch.where(hit, target, tau + h), tau)
        y_new = torch.where(accept[:, None], step.y1, y)
        f_end = method.end_derivative(step)
        if f_end is None:
            f_end = rhs(tau_new, y_new)
            nfe = nfe + accept
        k1 = torch.where(accept[:, None], f_end, k1)
        stiff = method.stiffness(step, step.y1, f_end, norm)

        if opts.adaptive:
            eest_ctrl = eest if opts.differentiable_dt else eest.detach()
            dt_new, errold = controller.propose(h, eest_ctrl, errold, accept)
            # A step shortened to land on a target says nothing about the size the problem allows.
            dt_new = torch.where(hit & accept, torch.maximum(dt_new, dt), dt_new)
            dt_new = torch.minimum(dt_new, dtmax)
            dtmin = torch.clamp(10 * eps * torch.clamp(tau.abs(), min=1.0), min=opts.dtmin)
            too_small = active & ~(accept & hit & (target == tau_end)) & (dt_new < dtmin)
            status = torch.where(too_small & ~torch.isfinite(eest), int(ReturnCode.Unstable), status)
            status = torch.where(too_small & torch.isfinite(eest), int(ReturnCode.DtLessThanMin), status)
            if failed is not None:
                status = torch.where(too_small & failed, int(ReturnCode.ConvergenceFailure), status)
            dt = torch.where(active, dt_new, dt)
        if stop_diverged:
            status = torch.where(active & ~finite_y1, int(ReturnCode.Unstable), status)
        status = torch.where(accept & hit & (target == tau_end), int(ReturnCode.Success), status)
        naccept = naccept + accept
        status = torch.where((status == RUNNING) & (iters >= opts.max_steps), int(ReturnCode.MaxIters), status)

        # Save points covered by accepted steps, interpolated with the method's own dense output.
        covered = (tau_save <= tau_new[:, None]).sum(1)
        nsave = torch.where(accept, covered - next_save, torch.zeros_like(covered))
        still_running, k_max = torch.stack([(status == RUNNING).any().long(), nsave.max()]).tolist()
        if k_max > 0:
            j = torch.arange(k_max, device=device)
            idx = next_save[:, None] + j
            valid = j < nsave[:, None]
            tq = torch.gather(tau_save, 1, idx.clamp(max=T - 1))
            safe_h = torch.where(accept, h, torch.ones_like(h))
            theta = torch.where(valid, (tq - tau[:, None]) / safe_h[:, None], torch.zeros_like(tq))
            vals = method.interpolate(y, h, step.ks, step.y1, f_end, theta)
            at_end = (tq >= tau_new[:, None])[..., None]
            vals = torch.where(at_end, step.y1[:, None], vals)
            saved_vals.append(vals)
            saved_idx.append(torch.where(valid, idx, T))
            next_save = next_save + nsave

        if opts.probe is not None:
            probe_tau, probe_y = _update_probe(opts.probe, method, accept, hit & (target == tau_end), tau, h,
                                               tau_new, y, step, f_end, probe_tau, probe_y, probe_count)
            probe_count = probe_count + (accept & ~(hit & (target == tau_end)))

        for key, val in (("t", tau_new), ("dt", h), ("eest", eest), ("stiffness", stiff), ("accept", accept)):
            trace[key].append(val)
        # Per-step quantities a method adds to the trace (e.g. which method an auto-switcher used).
        for key, val in (getattr(step, "extra_trace", None) or {}).items():
            trace.setdefault(key, []).append(val)
        if dense is not None:
            for key, val in (("tau", tau), ("h", h), ("y0", y), ("ks", step.ks), ("y1", step.y1), ("f1", f_end)):
                dense[key].append(val)
        tau, y = tau_new, y_new
        if not still_running:
            break

    ys = _assemble_saves(y0, saved_vals, saved_idx, T)
    return LoopResult(ys=ys, status=status, nfe=nfe, naccept=naccept, nreject=iters - naccept, counters=counters,
                      trace=_compact(trace, "accept"),
                      dense=_compact(dense, None, trace["accept"]) if dense else None, tau=tau, dt=dt,
                      probe=(probe_tau, probe_y) if opts.probe is not None else None)


def _assemble_saves(y0, vals, idx, T):
    """One scatter at the end instead of an in-place write per step (cheaper backward)."""
    B, n = y0.shape
    out = torch.full((B, T + 1, n), float("nan"), dtype=y0.dtype, device=y0.device)
    out = out.index_copy(1, torch.zeros(1, dtype=torch.long, device=y0.device), y0[:, None])
    if vals:
        V = torch.cat(vals, 1)
        I = torch.cat(idx, 1)
        out = out.scatter(1, I[..., None].expand(-1, -1, n), V)
    return out[:, :T].transpose(0, 1)


def _compact(series: dict, mask_key: Optional[str], mask_list=None) -> dict:
    """Stack per-iteration (B, ...) tensors to (B, N, ...) keeping accepted steps, left-aligned."""
    mask = torch.stack(series[mask_key] if mask_key else mask_list, 1)  # (B, N)
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
    out = {}
    for key, vals in series.items():
        if key == mask_key:
            continue
        x = torch.stack(vals, 1)
        gather_idx = order.view(order.shape + (1,) * (x.dim() - 2)).expand_as(x)
        x = torch.gather(x, 1, gather_idx)
        m = torch.gather(mask, 1, order).view(order.shape + (1,) * (x.dim() - 2))
        out[key] = torch.where(m, x, torch.zeros_like(x))
    out["mask"] = torch.gather(mask, 1, order)
    return out


def _update_probe(probe, method, accept, finished, tau, h, tau_new, y, step, f_end, probe_tau, probe_y, count):
    """Keep the detached state at the regularization time of each sample (see LoopOptions.probe)."""
    kind, arg = probe
    with torch.no_grad():
        if kind == "unbiased":
            inside = accept & (tau < arg) & (arg <= tau_new)
            theta = ((arg - tau) / torch.where(inside, h, torch.ones_like(h)))[:, None]
            theta = torch.where(inside[:, None], theta, torch.zeros_like(theta))
            val = method.interpolate(y, h, step.ks, step.y1, f_end, theta)[:, 0]
            return torch.where(inside, arg, probe_tau), torch.where(inside[:, None], val, probe_y)
        # biased: the k-th eligible step end replaces the kept one with probability 1/k.
        eligible = accept & ~finished
        k = count + 1
        u = torch.rand(accept.shape, generator=arg, dtype=tau.dtype, device="cpu").to(tau.device)
        take = eligible & (u * k < 1)
        return torch.where(take, tau_new, probe_tau), torch.where(take[:, None], step.y1.detach(), probe_y)
