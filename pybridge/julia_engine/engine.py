"""engine="julia": pybridge's solve contract on DifferentialEquations.jl, through juliacall.

Batches: `lockstep` (and an unbatched problem) is one Julia solve of an n × B state, one step size
for all samples; `independent` is one Julia solve per sample, so every sample has its own steps,
error norm and return code (f then sees batches of one sample and t of shape (1,)).

Gradients: a torch.autograd.Function whose backward calls SciMLSensitivity's
`adjoint_sensitivities`; the VJPs it needs, (∂f/∂u)ᵀλ and (∂f/∂θ)ᵀλ, come from torch through
`ODEFunction(vjp=..., vjp_p=...)`, which SciMLSensitivity ≥ 7.116.2 (PR #1374) uses in preference to its own
AD (`autojacvec`) — Julia's AD cannot see through a Python right-hand side. The trace (eest,
stiffness) is returned as values: Julia's solver internals are not differentiable from torch,
so global regularizers need engine="torch"; the local regularizer is computed by the torch engine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch

from ..solution import ReturnCode, Solution, Stats, Trace
from . import mapping, runtime
from .bridge import Bridge
from .views import from_julia_array

RESULT_FIELDS = ("ys", "retcode", "nf", "naccept", "nreject", "njacs", "nw", "nsolve", "trace_t",
                 "trace_dt", "trace_eest", "trace_stiffness", "t_final", "dt_final")
FIXED_STEP_ONLY = {"Euler", "Midpoint", "RK4"}


@dataclass
class Group:
    """One Julia solve: `samples` columns of the state, saved at `ts`."""

    rows: slice          # which samples of the batch (all of them in lockstep)
    y0: torch.Tensor     # (samples, n), contiguous: an n × samples Julia matrix
    ts: torch.Tensor     # (T,), contiguous
    rtol: Optional[torch.Tensor] = None  # per-component tolerances laid out like y0
    atol: Optional[torch.Tensor] = None


def make_groups(prob, lockstep: bool, rtol, atol) -> List[Group]:
    """Split a problem into Julia solves (pure tensor logic; tested without Julia)."""
    B = prob.batch_size
    y0 = prob.y0.detach().reshape(B, -1)
    t = prob.t.detach()
    rt = _per_component(rtol, prob)
    at = _per_component(atol, prob)
    if lockstep or not prob.batched:
        ts = t if t.dim() == 1 else t[0]
        return [Group(slice(0, B), y0.contiguous(), ts.contiguous(), rt, at)]
    pick = lambda x, b: None if x is None else x[b:b + 1].contiguous()
    return [Group(slice(b, b + 1), y0[b:b + 1].contiguous(),
                  (t if t.dim() == 1 else t[b]).contiguous(), pick(rt, b), pick(at, b))
            for b in range(B)]


def _per_component(tol, prob):
    if not isinstance(tol, torch.Tensor) or tol.dim() == 0:
        return None
    B = prob.batch_size
    return tol.detach().to(prob.y0.dtype).broadcast_to(prob.y0.shape).reshape(B, -1).contiguous()


def _scalar(tol) -> float:
    return float(tol) if not isinstance(tol, torch.Tensor) or tol.dim() == 0 else 0.0


def raw_result(res) -> dict:
    """A Julia result NamedTuple → a dict of numpy arrays / Python scalars (arrays not copied)."""
    out = {}
    for k in RESULT_FIELDS:
        v = getattr(res, k)
        if k == "retcode":
            out[k] = str(v)
        elif k == "ys" or k.startswith("trace_"):
            out[k] = np.asarray(v)
        elif k in ("t_final", "dt_final"):
            out[k] = float(v)
        else:
            out[k] = int(v)
    return out


def assemble(prob, solver, groups: List[Group], raws: List[dict], interpolant=None) -> Solution:
    """Build the Solution from the plain arrays Julia returned, one dict per group.

    raws[g]["ys"] is the Julia array (n, samples, T) in column-major memory; trace_* are 1-d
    arrays of the accepted steps of that solve (shared by the samples of a lockstep group).
    """
    dtype = prob.y0.dtype
    B = prob.batch_size
    ys = [from_julia_array(r["ys"], dtype) for r in raws]          # each (T, samples, n)
    ys = ys[0] if len(ys) == 1 else torch.cat(ys, dim=1)
    ys = ys.reshape((ys.shape[0],) + tuple(prob.y0.shape))

    def per_sample(key, cast=torch.int64):
        vals = []
        for g, r in zip(groups, raws):
            vals += [r[key]] * (g.rows.stop - g.rows.start)
        return torch.tensor(vals, dtype=cast)

    codes = [mapping.map_retcode(r["retcode"]) for r in raws]
    retcode = torch.tensor([int(c) for g, c in zip(groups, codes)
                            for _ in range(g.rows.stop - g.rows.start)], dtype=torch.int64)
    stats = Stats(nfe=per_sample("nf"), naccept=per_sample("naccept"), nreject=per_sample("nreject"),
                  njac=per_sample("njacs"), nlu=per_sample("nw"), nsolve=per_sample("nsolve"))

    N = max([len(r["trace_t"]) for r in raws] + [1])
    fields = {k: torch.zeros(B, N, dtype=dtype) for k in ("t", "dt", "eest", "stiffness")}
    mask = torch.zeros(B, N, dtype=torch.bool)
    for g, r in zip(groups, raws):
        k = len(r["trace_t"])
        for name in fields:
            fields[name][g.rows, :k] = torch.as_tensor(np.asarray(r["trace_" + name]), dtype=dtype)
        mask[g.rows, :k] = True
    unbatch = (lambda x: x[0]) if not prob.batched else (lambda x: x)
    trace = Trace(t=unbatch(fields["t"]), dt=unbatch(fields["dt"]), eest=unbatch(fields["eest"]),
                  stiffness=unbatch(fields["stiffness"]), mask=unbatch(mask))
    sol = Solution(ys=ys, ts=prob.t, stats=Stats(*(unbatch(x) for x in (
        stats.nfe, stats.naccept, stats.nreject, stats.njac, stats.nlu, stats.nsolve))),
        retcode=unbatch(retcode), trace=trace, interpolant=interpolant, solver=solver,
        batched=prob.batched)
    sol.extras["t_final"] = unbatch(per_sample("t_final", dtype))
    sol.extras["dt_final"] = unbatch(per_sample("dt_final", dtype))
    sol.extras["julia_retcode"] = [r["retcode"] for g, r in zip(groups, raws)
                                   for _ in range(g.rows.stop - g.rows.start)]
    sol.extras["engine"] = "julia"
    return sol


def default_params(f, adjoint_params):
    if adjoint_params is not None:
        return [p for p in adjoint_params if isinstance(p, torch.Tensor)]
    if isinstance(f, torch.nn.Module):
        return [p for p in f.parameters() if p.requires_grad]
    return []


class JuliaRun:
    """Everything one solve needs across forward, dense output and backward."""

    def __init__(self, prob, solver, spec, groups, params, options, sensealg, dense, lockstep):
        self.prob, self.solver, self.spec, self.groups = prob, solver, spec, groups
        self.params, self.options, self.sensealg, self.dense = params, options, sensealg, dense
        B = prob.batch_size
        samples = groups[0].y0.shape[0]
        n = groups[0].y0.shape[1]
        if prob.batched:
            fshape = (samples,) + tuple(prob.state_shape)
        else:
            fshape = tuple(prob.y0.shape)
        # pybridge's contract: in independent batching f gets one time per sample, shape (B,)
        tshape = (1,) if (prob.batched and not lockstep) else ()
        self.bridge = Bridge(prob.f, fshape, tshape, prob.y0.dtype, samples, n, params, prob.jac)
        self.n, self.B = n, B
        self.p_flat = (torch.cat([p.detach().reshape(-1).to(prob.y0.dtype) for p in params])
                       if params else torch.zeros(0, dtype=prob.y0.dtype)).contiguous()
        self.results = []

    def _call(self, fn, *args, **kwargs):
        """Call Julia; if a Python callback raised, re-raise that exception, not Julia's wrapper."""
        self.bridge.error = None
        try:
            return fn(*args, **kwargs)
        except runtime.julia_error_type() as e:
            if self.bridge.error is not None:
                raise self.bridge.error from None
            raise RuntimeError(f"engine='julia': DifferentialEquations.jl raised: {e}") from e

    def _tol_kwargs(self, g: Group):
        o = self.options
        return dict(reltol=_scalar(o["reltol"]), abstol=_scalar(o["abstol"]),
                    reltol_addr=0 if g.rtol is None else g.rtol.data_ptr(),
                    abstol_addr=0 if g.atol is None else g.atol.data_ptr())

    def forward(self) -> torch.Tensor:
        jl = runtime.load()
        dtype = "Float32" if self.prob.y0.dtype == torch.float32 else "Float64"
        o = self.options
        raws = []
        for g in self.groups:
            res = self._call(jl.solve_ode, self.bridge, dtype, g.y0.data_ptr(), g.y0.shape[1],
                             g.y0.shape[0], g.ts.data_ptr(), g.ts.numel(), self.p_flat.data_ptr(),
                             self.p_flat.numel(), self.spec.name, self.spec.stiff or "",
                             dt=o["dt"], adaptive=o["adaptive"], dtmin=o["dtmin"], dtmax=o["dtmax"],
                             maxiters=o["maxiters"], dense=self.dense, implicit=self.spec.implicit,
                             **self._tol_kwargs(g))
            self.results.append(res)
            raws.append(raw_result(res))
        self.raws = raws
        self.solution = assemble(self.prob, self.solver, self.groups, raws,
                                 self.interpolate if self.options["dense"] else None)
        return self.solution.ys

    def interpolate(self, t) -> torch.Tensor:
        """sol(t) with the Julia solution's own interpolant (values only, not differentiable)."""
        jl = runtime.load()
        prob = self.prob
        t = torch.as_tensor(t, dtype=prob.y0.dtype).detach()
        if t.dim() not in (1, 2) or (t.dim() == 2 and t.shape[0] != self.B):
            raise ValueError(f"sol(t): t must have shape (Tq,) or ({self.B}, Tq); got {tuple(t.shape)}")
        if t.dim() == 2 and len(self.groups) == 1 and self.B > 1 and not bool((t == t[:1]).all()):
            raise ValueError("sol(t): a lockstep solve has one time axis; pass t of shape (Tq,)")
        outs = []
        for g, res in zip(self.groups, self.results):
            tq = (t if t.dim() == 1 else t[g.rows.start]).contiguous()
            out = torch.empty(tq.numel(), g.y0.shape[0], self.n, dtype=prob.y0.dtype)
            self._call(jl.interpolate_b, res, tq.data_ptr(), tq.numel(), out.data_ptr())
            outs.append(out)
        vals = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return vals.reshape((vals.shape[0],) + tuple(prob.y0.shape))

    def backward(self, grad_ys: torch.Tensor):
        jl = runtime.load()
        prob = self.prob
        grad = grad_ys.detach().to(prob.y0.dtype).reshape(grad_ys.shape[0], self.B, self.n)
        gy0 = torch.empty(self.B, self.n, dtype=prob.y0.dtype)
        gp = torch.zeros_like(self.p_flat)
        for g, res, raw in zip(self.groups, self.results, self.raws):
            if mapping.map_retcode(raw["retcode"]) != ReturnCode.Success:
                gy0[g.rows] = float("nan")  # no meaningful gradient through a failed solve
                gp.fill_(float("nan"))
                continue
            G = grad[:, g.rows].contiguous()  # (T, samples, n): Julia's n × samples × T
            r = self._call(jl.adjoint, res, G.data_ptr(), self.sensealg, **self._tol_kwargs(g))
            gy0[g.rows] = from_julia_array(r.du0, prob.y0.dtype)      # (samples, n)
            gp += from_julia_array(r.dp, prob.y0.dtype)
        grads, offset = [], 0
        for p in self.params:
            k = p.numel()
            grads.append(gp[offset:offset + k].view_as(p).to(p.dtype))
            offset += k
        return gy0.reshape(prob.y0.shape), grads


class _JuliaSolve(torch.autograd.Function):
    """ys = solve(y0, θ) with gradients from SciMLSensitivity's adjoint (see module docstring)."""

    @staticmethod
    def forward(ctx, run: JuliaRun, y0, *params):
        ctx.run = run
        return run.forward()

    @staticmethod
    def backward(ctx, grad_ys):
        gy0, gparams = ctx.run.backward(grad_ys)
        return (None, gy0, *gparams)


def solve_ode(prob, solver, *, adjoint=None, adjoint_params=None, rtol, atol, dt, adaptive, dtmin,
              dtmax, max_steps, dense, lockstep) -> Solution:
    spec = mapping.solver_spec(solver)
    if prob.y0.device.type != "cpu":
        raise ValueError(f"engine='julia' works on CPU tensors in this version; y0 is on "
                         f"{prob.y0.device} (use engine='torch' on GPU)")
    if prob.y0.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"engine='julia' supports float32 and float64; y0 has dtype {prob.y0.dtype}")
    if adaptive and spec.name in FIXED_STEP_ONLY:
        raise ValueError(f"{solver!r} has no error estimate, so it cannot step adaptively: "
                         "pass adaptive=False with dt=...")
    t = prob.t if prob.t.dim() == 1 else prob.t[0]
    options = mapping.solve_options(rtol=rtol, atol=atol, dt=dt, adaptive=adaptive, dtmin=dtmin,
                                    dtmax=dtmax, max_steps=max_steps, dense=dense,
                                    t0=float(t[0]), t1=float(t[-1]))
    params = default_params(prob.f, adjoint_params)
    needs_grad = torch.is_grad_enabled() and (prob.y0.requires_grad or any(p.requires_grad for p in params))
    groups = make_groups(prob, lockstep, rtol, atol)
    # The adjoint interpolates the forward solution, so a differentiable solve keeps every step.
    run = JuliaRun(prob, solver, spec, groups, params, options, mapping.sensealg_name(adjoint),
                   dense=dense or needs_grad, lockstep=lockstep)
    if needs_grad:
        ys = _JuliaSolve.apply(run, prob.y0, *params)
        run.solution.ys = ys
        return run.solution
    with torch.no_grad():
        run.forward()
    return run.solution
