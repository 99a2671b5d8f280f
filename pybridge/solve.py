"""`solve`: argument checking and engine dispatch."""
from __future__ import annotations

import contextlib
import math
import numbers
import operator
import warnings
from typing import Callable, Optional, Sequence, Union

import torch

from .problem import ODEProblem
from .sde_problem import SDEProblem
from .solution import ReturnCode, Solution, succeeded
from .adjoint import Adjoint, DiscreteAdjoint
from .regularization import parse_local_regularizer
from .solvers import SOSRI, Solver, Tsit5

ENGINES = ("torch", "julia")
BATCH_MODES = ("independent", "lockstep")


class SolveError(RuntimeError):
    """A solve failed for at least one sample and `raise_on_failure=True` was asked."""


def solve(prob: ODEProblem, solver: Optional[Solver] = None, *, engine: str = "torch",
          rtol: Union[float, torch.Tensor, None] = None, atol: Union[float, torch.Tensor, None] = None,
          dt: Optional[float] = None, adaptive: Optional[bool] = None,
          dtmin: float = 0.0, dtmax: Optional[float] = None, max_steps: int = 100_000,
          dense: bool = False, batch: str = "independent", differentiable_dt: bool = False,
          raise_on_failure: bool = False, adjoint: Optional[Adjoint] = None,
          adjoint_params: Optional[Sequence[torch.Tensor]] = None,
          local_regularizer: Optional[str] = None, seed: Optional[int] = None,
          progress: bool = False, brownian=None, compile: bool = False,
          event: Optional[Callable] = None, event_direction: int = 0) -> Solution:
    """Solve `prob` with `solver` (default Tsit5()) and return a Solution (see its docstring).

    Shapes: prob.y0 is one sample (*shape) or a batch (B, *shape); prob.t is (T,) or (B, T).
    The result's `ys` is (T, *y0.shape); `stats`, `retcode` have the batch shape (B,) (0-d for
    one sample); `trace` fields are (B, N) over
    accepted steps ((N,) for one sample).

    rtol, atol: floats, or tensors broadcastable to y0 (per-component tolerances); defaults are
    DifferentialEquations.jl's (1e-3, 1e-6; for SDEProblems 1e-2, 1e-2). dt: the fixed step (adaptive=False) or the first step.
    dtmin: a sample stops DtLessThanMin when its next step would be below max(dtmin, one ulp of
    max(|t|, 1)), or when a rejected step's retry would end at the same rounded time. batch:
    "independent" (every sample its own steps) or "lockstep" (one step size, error norm over the
    batch, as torchdiffeq). differentiable_dt keeps gradients through the step-size controller.
    adjoint: how gradients are computed (default DiscreteAdjoint: backprop through the solver);
    adjoint_params: the tensors a continuous adjoint differentiates (default: f's parameters when
    f is an nn.Module). local_regularizer: "unbiased" or "biased" adds `sol.local_regularizer`,
    the 2023 paper's one-step error regularizer (random time drawn from `seed`), differentiated
    through every stage; "unbiased-detached-k1" / "biased-detached-k1" hold k1 fixed as the
    paper's code did (see pybridge.regularization.LOCAL_KINDS for why that is not the default).
    SDEs (prob a pb.SDEProblem, solver e.g. pb.SOSRI(), the default there): `seed` picks the Brownian
    path (a pb.VirtualBrownianTree, returned as sol.extras["brownian"]), or pass your own tree as
    `brownian=`; steps land on the save times (no interpolation of the path). adjoint=
    pb.ReversibleAdjoint() with pb.ReversibleHeun() gives O(1)-memory exact gradients.
    progress: show a tqdm bar over the integration span (torch engine; the slowest running
    sample's progress; read in the loop's one host transfer per step, so no extra syncs).
    compile: run each loop iteration (step, error norm, controller, bookkeeping) as one
    torch.compile'd graph (torch engine; explicit RK, Rosenbrock and SDE solvers — an SDE step's
    Brownian increments are drawn eagerly just before it). Pays off on small problems, where
    dispatching a few hundred small ops per step costs more than the arithmetic; the first solve
    of each shape compiles (seconds to a minute).
    event: a terminal event g(t, y) -> (B,) or (B, m) (for one sample () or (m,)); t has shape (B,)
    for a batched problem in either batch mode (each sample's crossing is at its own time). A
    sample stops where a component of its g first crosses zero (event_direction 0: either way,
    1: upwards, -1: downwards; a component exactly at zero must leave it first), with retcode
    Terminated (a success); `sol.event_t` and `sol.event_y` give the crossing, located on the
    method's interpolant to the dtype's precision and differentiable, and its later save points are
    NaN. ODEs on the torch engine, with DiscreteAdjoint.
    """
    is_sde = isinstance(prob, SDEProblem)
    if solver is None:
        solver = SOSRI() if is_sde else Tsit5()
    # Defaults as DifferentialEquations.jl: 1e-3/1e-6 for ODEs, 1e-2/1e-2 for SDEs (StochasticDiffEq).
    if rtol is None:
        rtol = 1e-2 if is_sde else 1e-3
    if atol is None:
        atol = 1e-2 if is_sde else 1e-6
    if not isinstance(prob, ODEProblem):
        raise TypeError(f"prob must be a pybridge.ODEProblem; got {type(prob).__name__}")
    if not isinstance(solver, Solver):
        raise TypeError(f"solver must be a pybridge solver such as pb.Tsit5(); got {solver!r}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}; got {engine!r}")
    # SDEs (pb.SDEProblem + an SDE solver such as pb.SOSRI()): `seed` or `brownian` fixes the path.
    if is_sde != (getattr(solver, "family", None) == "sde"):
        raise TypeError(f"solver {solver!r} does not match the problem: an SDEProblem needs an SDE solver "
                        "(pb.EM(), pb.SOSRI(), ...) and an ODEProblem an ODE solver"
                        if is_sde else f"solver {solver!r} solves SDEs: pass a pb.SDEProblem")
    if brownian is not None and not is_sde:
        raise ValueError("brownian= is only for SDEProblems")
    if is_sde and engine != "torch":
        raise ValueError(f"SDEs are solved by the torch engine only; got engine={engine!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"seed must be an integer or None; got {seed!r}")
    if batch not in BATCH_MODES:
        raise ValueError(f"batch must be one of {BATCH_MODES}; got {batch!r}")
    lockstep = batch == "lockstep"
    if lockstep and prob.t.dim() == 2:
        raise ValueError("batch='lockstep' steps all samples together and needs shared times t of shape (T,); "
                         f"got per-sample t of shape {tuple(prob.t.shape)} (use batch='independent')")
    _check_tolerance("rtol", rtol, prob)
    _check_tolerance("atol", atol, prob)
    _warn_unreachable_rtol(solver, rtol, prob)
    adaptive = solver.adaptive if adaptive is None else bool(adaptive)
    if adaptive and bool((torch.as_tensor(atol) + torch.as_tensor(rtol) == 0).any()):
        # The error norm divides by atol + rtol·|y|: no step could ever be judged.
        raise ValueError("rtol and atol must not both be zero (for any component) in an adaptive solve: "
                         "the error is measured relative to atol + rtol·|y|")
    if dt is not None:
        if isinstance(dt, torch.Tensor):
            dt = float(dt)
        if not isinstance(dt, (int, float)) or not math.isfinite(dt) or dt <= 0:
            raise ValueError(f"dt must be a positive finite number; got {dt!r}")
    if not adaptive and dt is None:
        raise ValueError(f"{solver!r} with fixed steps needs a step size: pass dt=... "
                         "(or adaptive=True for a method with an error estimate)")
    if _as_integer(max_steps) is None or _as_integer(max_steps) < 1:
        raise ValueError(f"max_steps must be an integer >= 1; got {max_steps!r}")
    max_steps = _as_integer(max_steps)
    dtmin, dtmax = _as_number(dtmin), _as_number(dtmax)
    if not (isinstance(dtmin, float) and dtmin >= 0):
        raise ValueError(f"dtmin must be a number >= 0; got {dtmin!r}")
    if dtmax is not None and not (isinstance(dtmax, float) and dtmax > 0):
        raise ValueError(f"dtmax must be a positive number or None; got {dtmax!r}")
    if dtmax is not None and dtmin > dtmax:
        raise ValueError(f"dtmin ({dtmin}) must not exceed dtmax ({dtmax})")

    adjoint = DiscreteAdjoint() if adjoint is None else adjoint
    if not isinstance(adjoint, Adjoint):
        raise TypeError(f"adjoint must be a pybridge adjoint such as pb.BacksolveAdjoint(); got {adjoint!r}")
    if local_regularizer is not None:
        parse_local_regularizer(local_regularizer)
        if engine != "torch":
            # (the extra step differentiates the torch module's stages; the Julia engine does not take it)
            raise ValueError(f"local_regularizer is available on the torch engine only; got engine={engine!r}")
    local = dict(local_regularizer=local_regularizer, seed=seed) if local_regularizer else {}
    _check_event(event, event_direction, is_sde, engine, adjoint, local_regularizer)
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be True or False; got {compile!r}")
    if compile and engine != "torch":
        raise ValueError(f"compile=True is available on the torch engine only; got engine={engine!r}")
    if compile and solver.family not in ("explicit_rk", "rosenbrock", "sde"):
        # ESDIRK Newton iterations and auto-switching decide on the host how far to loop: neither
        # traces into one graph.
        raise ValueError(f"compile=True is available for the explicit Runge–Kutta, Rosenbrock and SDE solvers "
                         f"(Tsit5(), Vern7(), Rodas5P(), SOSRI(), ...); got solver={solver!r}")
    if progress and engine != "torch":
        raise ValueError(f"progress=True is available on the torch engine only; got engine={engine!r}")
    if progress:
        from .progress import progress_bar
        bar = progress_bar(desc=f"solve {solver!r}")
    else:
        bar = contextlib.nullcontext()
    options = dict(rtol=rtol, atol=atol, dt=dt, adaptive=adaptive, dtmin=dtmin, dtmax=dtmax,
                   max_steps=max_steps, dense=dense, lockstep=lockstep)
    torch_options = dict(options, compile=compile)

    if is_sde:
        from .sde_adjoint import solve_sde_dispatch
        with bar:
            sol = solve_sde_dispatch(prob, solver, adjoint, adjoint_params, torch_options, differentiable_dt=differentiable_dt,
                                     brownian=brownian, seed=seed, local_regularizer=local_regularizer)
    elif engine == "julia":
        from .julia_engine import solve_ode as julia_solve
        sol = julia_solve(prob, solver, adjoint=adjoint, adjoint_params=adjoint_params, **options)
    else:
        from .torch_engine.engine import build_method, solve_ode
        if adaptive and not build_method(solver, prob.y0.dtype, prob.y0.device).adaptive:
            raise ValueError(f"{solver!r} has no error estimate, so it cannot step adaptively: "
                             "pass adaptive=False with dt=...")
        with bar:
            if isinstance(adjoint, DiscreteAdjoint):
                sol = solve_ode(prob, solver, differentiable_dt=differentiable_dt, event=event,
                                event_direction=event_direction, **torch_options, **local)
            else:
                sol = adjoint.solve(prob, solver, adjoint_params, dict(torch_options, **local))
    _report_failures(sol, raise_on_failure)
    return sol


# float32 resolves ~1e-7 per operation; a stiff solver's Jacobian, LU and (ESDIRK) Newton
# iteration lose a couple of digits more, so about 1e-5 relative is what it can reach.
_REACHABLE_RTOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-1}


def _warn_unreachable_rtol(solver, rtol, prob):
    family = getattr(solver, "stiff", solver).family
    floor = _REACHABLE_RTOL.get(prob.y0.dtype)
    if family not in ("rosenbrock", "esdirk") or floor is None:
        return
    r = float(rtol.min()) if isinstance(rtol, torch.Tensor) else float(rtol)
    if r < floor:
        warnings.warn(f"{solver!r} with rtol={r:g} in {prob.y0.dtype}: a stiff solver in this dtype reaches "
                      f"about rtol={floor:g}, so the tolerance cannot be met (expect many rejected steps or "
                      f"Newton failures); use float64 (y0.double()) or rtol >= {floor:g}",
                      UserWarning, stacklevel=3)


def _as_integer(x):
    """x as a Python int if it is an integer of any kind (int, NumPy, 0-d integer tensor), else None."""
    if isinstance(x, bool) or (isinstance(x, torch.Tensor) and (x.dim() != 0 or x.is_floating_point())):
        return None
    try:
        return operator.index(x)
    except TypeError:
        return None


def _as_number(x):
    """A real number of any kind (int, float, NumPy, 0-d tensor) as a float; anything else unchanged."""
    if isinstance(x, bool) or x is None:
        return x
    if isinstance(x, torch.Tensor):
        return float(x) if x.dim() == 0 and not x.is_complex() else x
    return float(x) if isinstance(x, numbers.Real) else x


def _check_event(event, direction, is_sde, engine, adjoint, local_regularizer):
    if event is None:
        return
    if not callable(event):
        raise TypeError(f"event must be callable event(t, y) -> tensor, or None; got {type(event).__name__}")
    if isinstance(direction, bool) or direction not in (-1, 0, 1):
        raise ValueError(f"event_direction must be 0 (either way), 1 (upwards) or -1 (downwards); got {direction!r}")
    if is_sde:
        raise ValueError("event= is available for ODEProblems only")
    if engine != "torch":
        raise ValueError(f"event= is available on the torch engine only; got engine={engine!r}")
    if not isinstance(adjoint, DiscreteAdjoint):
        raise ValueError(f"event= needs gradients by backpropagation through the solve (DiscreteAdjoint); "
                         f"got adjoint={adjoint!r}")
    if local_regularizer is not None:
        raise ValueError("event= and local_regularizer= cannot be combined (the regularizer's random time "
                         "may lie past a sample's event)")


def _check_tolerance(name, tol, prob):
    if isinstance(tol, torch.Tensor):
        if not tol.is_floating_point():
            raise TypeError(f"{name} must be a float or a floating tensor; got dtype {tol.dtype}")
        if tol.device != prob.y0.device:
            raise ValueError(f"{name} is on {tol.device} but y0 is on {prob.y0.device}")
        try:
            torch.broadcast_shapes(tol.shape, prob.y0.shape)
            ok = torch.broadcast_shapes(tol.shape, prob.y0.shape) == prob.y0.shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"{name} has shape {tuple(tol.shape)}, which does not broadcast to y0's shape "
                             f"{tuple(prob.y0.shape)}")
        if not torch.isfinite(tol).all() or (tol < 0).any():
            raise ValueError(f"{name} must be finite and >= 0; got min {tol.min().item()}")
    elif isinstance(tol, (int, float)) and not isinstance(tol, bool):
        if not math.isfinite(tol) or tol < 0:
            raise ValueError(f"{name} must be finite and >= 0; got {tol!r}")
    else:
        raise TypeError(f"{name} must be a float or a tensor; got {type(tol).__name__}")


def _report_failures(sol: Solution, raise_on_failure: bool):
    codes = sol.retcode.reshape(-1)
    failed = (~succeeded(codes)).nonzero().flatten().tolist()
    if not failed:
        return
    t_final = sol.extras.get("t_final")
    dt_final = sol.extras.get("dt_final")
    lines = []
    for b in failed[:5]:
        where = ""
        if t_final is not None:
            where = f" at t={float(t_final.reshape(-1)[b]):.6g}, dt={float(dt_final.reshape(-1)[b]):.3g}"
        lines.append(f"sample {b}: {ReturnCode(int(codes[b])).name}{where}")
    more = f" (and {len(failed) - 5} more)" if len(failed) > 5 else ""
    msg = f"{len(failed)} of {codes.numel()} samples did not succeed: " + "; ".join(lines) + more
    if raise_on_failure:
        raise SolveError(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
