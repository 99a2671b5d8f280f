"""Pure mappings between pybridge's names/options and DifferentialEquations.jl's (no Julia needed).

Solvers are recognised by `type(solver).__name__` (solvers.py is shared with the torch engine and
its classes are not imported here). The composite `AutoTsit5` / `AutoVern7` descriptors are assumed
to carry their stiff inner solver in the attribute `.stiff` (e.g. `AutoTsit5(Rosenbrock23())`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from ..solution import ReturnCode

# name → (Julia family, needs a Jacobian). The Julia side (julia/src/PyBridge.jl, `make_alg`) turns
# the same names into constructors; implicit ones get autodiff=AutoFiniteDiff() so that Julia never
# pushes dual numbers into the Python right-hand side, and they receive `jac`/`tgrad` from torch.
EXPLICIT = {"Euler", "Midpoint", "Heun", "RK4", "BS3", "DP5", "Tsit5", "Vern7"}
IMPLICIT = {"Rosenbrock23", "Rodas4", "Rodas5P", "Kvaerno5", "KenCarp4", "TRBDF2"}
COMPOSITE = {"AutoTsit5", "AutoVern7"}
# Methods that only make sense for SDEs (StochasticDiffEq); the Julia engine solves ODEs only.
SDE_ONLY = {"EulerHeun", "EM", "EulerMaruyama", "SRIW1", "SOSRI", "SOSRA", "SRA1", "SRA3",
            "SRIW2", "SOSRI2", "SOSRA2", "RKMil", "ImplicitEM", "ReversibleHeun", "SKenCarp"}
# pybridge adjoints that have a SciMLSensitivity counterpart of the same name.
SENSEALGS = {"GaussAdjoint", "InterpolatingAdjoint", "QuadratureAdjoint", "BacksolveAdjoint"}
DEFAULT_SENSEALG = "GaussAdjoint"


@dataclass(frozen=True)
class AlgSpec:
    """What the Julia side needs to build the algorithm."""

    name: str                    # Julia constructor name
    stiff: Optional[str] = None  # inner stiff method of a composite (AutoTsit5(Rosenbrock23()))

    @property
    def implicit(self) -> bool:
        return self.name in IMPLICIT or self.stiff is not None

    @property
    def julia_expr(self) -> str:
        """The constructor call as a Julia user would write it (for messages and docs)."""
        if self.stiff:
            return f"{self.name}({self.stiff}(autodiff=AutoFiniteDiff()))"
        return f"{self.name}(autodiff=AutoFiniteDiff())" if self.implicit else f"{self.name}()"


def solver_spec(solver) -> AlgSpec:
    """Map a pybridge solver descriptor to the DifferentialEquations.jl method of the same name."""
    name = type(solver).__name__
    if name in EXPLICIT or name in IMPLICIT:
        return AlgSpec(name)
    if name in COMPOSITE:
        inner = getattr(solver, "stiff", None)
        if inner is None:
            raise ValueError(f"{solver!r}: a composite {name} needs its stiff method in `.stiff`, "
                             f"e.g. {name}(Rosenbrock23())")
        inner_name = type(inner).__name__
        if inner_name not in IMPLICIT:
            raise ValueError(f"{solver!r}: the stiff method of {name} must be one of "
                             f"{sorted(IMPLICIT)}; got {inner_name}")
        return AlgSpec(name, inner_name)
    if name in SDE_ONLY:
        raise ValueError(f"{name} is an SDE method; engine='julia' solves ODEs only "
                         "(use engine='torch' for SDEs)")
    known = sorted(EXPLICIT | IMPLICIT | COMPOSITE)
    raise ValueError(f"{name} has no DifferentialEquations.jl counterpart on engine='julia'; "
                     f"choose one of {known} or use engine='torch'")


def sensealg_name(adjoint) -> str:
    """The SciMLSensitivity algorithm used for gradients.

    Backpropagating through Julia's solver internals is impossible from torch, so the default
    DiscreteAdjoint (and any adjoint without a Julia counterpart) becomes GaussAdjoint: a
    continuous adjoint whose VJPs come from torch (see engine.py).
    """
    name = type(adjoint).__name__ if adjoint is not None else DEFAULT_SENSEALG
    return name if name in SENSEALGS else DEFAULT_SENSEALG


def solve_options(*, rtol, atol, dt, adaptive, dtmin, dtmax, max_steps, dense, t0: float,
                  t1: float) -> dict:
    """pybridge's solve options → keyword arguments of PyBridge.solve_ode (= `solve` kwargs).

    Tolerances may be tensors (per component); those are passed as buffers by the engine, so
    here they are only checked to be scalars or left as they are. `dt=0` asks Julia to choose
    the first step itself; dtmax defaults to the whole span, as in OrdinaryDiffEq.
    """
    span = abs(t1 - t0)
    return dict(
        reltol=rtol, abstol=atol,
        dt=0.0 if dt is None else float(dt),
        adaptive=bool(adaptive),
        dtmin=float(dtmin),
        dtmax=span if dtmax is None or not math.isfinite(dtmax) else min(float(dtmax), span),
        maxiters=int(max_steps),
        dense=bool(dense),
    )


# SciMLBase.ReturnCode names → pybridge ReturnCode. Anything not listed is a failure that pybridge
# has no finer name for; it becomes Unstable and the Julia name is kept in sol.extras.
RETCODES = {
    "Success": ReturnCode.Success,
    "Default": ReturnCode.Success,
    "Terminated": ReturnCode.Success,
    "MaxIters": ReturnCode.MaxIters,
    "DtLessThanMin": ReturnCode.DtLessThanMin,
    "Unstable": ReturnCode.Unstable,
    "DtNaN": ReturnCode.Unstable,
    "InitialFailure": ReturnCode.Unstable,
    "ConvergenceFailure": ReturnCode.ConvergenceFailure,
}


def map_retcode(julia_name: str) -> ReturnCode:
    return RETCODES.get(str(julia_name), ReturnCode.Unstable)
