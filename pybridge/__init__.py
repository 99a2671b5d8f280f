"""pybridge: neural differential equations with DifferentialEquations.jl-grade solvers in PyTorch,
whose internal error and stiffness estimates are differentiable training signals."""
from .adjoint import Adjoint, BacksolveAdjoint, DiscreteAdjoint, InterpolatingAdjoint, QuadratureAdjoint
from .odeint import odeint, odeint_adjoint, odeint_event
from . import plotting  # matplotlib is imported only when a plot is drawn
from .problem import ODEProblem
from .sde_problem import SDEProblem
from .sde_adjoint import ReversibleAdjoint
from .solvers import EM, SOSRI, SRA1, SRIW1, EulerHeun, LambaEM, ReversibleHeun, RKMil
from .torch_engine.brownian import VirtualBrownianTree
from .regularization import error_regularizer, stiffness_regularizer
from .solution import ReturnCode, Solution, Stats, Trace
from .solve import SolveError, solve
from .solvers import BS3, DP5, RK4, Euler, Heun, Midpoint, Rodas4, Rodas5P, Rosenbrock23, Solver, Tsit5, Vern7
from .solvers import AutoSwitch, AutoTsit5, AutoVern7
from .solvers import KenCarp4, Kvaerno5, TRBDF2

__version__ = "0.1.0"

__all__ = [
    "Adjoint", "DiscreteAdjoint", "BacksolveAdjoint", "InterpolatingAdjoint", "QuadratureAdjoint",
    "error_regularizer", "stiffness_regularizer",
    "ODEProblem", "solve", "odeint", "odeint_adjoint", "odeint_event", "Solution", "Stats", "Trace", "ReturnCode", "SolveError",
    "Solver", "Euler", "Midpoint", "Heun", "RK4", "BS3", "DP5", "Tsit5", "Vern7",
    "Rosenbrock23", "Rodas4", "Rodas5P",
    "SDEProblem", "VirtualBrownianTree", "ReversibleAdjoint",
    "EM", "LambaEM", "EulerHeun", "RKMil", "SRIW1", "SOSRI", "SRA1", "ReversibleHeun",
    "Kvaerno5", "KenCarp4", "TRBDF2",
    "AutoSwitch", "AutoTsit5", "AutoVern7",
]
