"""pybridge: neural differential equations with DifferentialEquations.jl-grade solvers in PyTorch,
whose internal error and stiffness estimates are differentiable training signals."""
from .adjoint import Adjoint, BacksolveAdjoint, DiscreteAdjoint, InterpolatingAdjoint, QuadratureAdjoint
from .odeint import odeint
from .problem import ODEProblem
from .regularization import error_regularizer, stiffness_regularizer
from .solution import ReturnCode, Solution, Stats, Trace
from .solve import SolveError, solve
from .solvers import BS3, DP5, RK4, Euler, Heun, Midpoint, Rodas4, Rodas5P, Rosenbrock23, Solver, Tsit5, Vern7

__version__ = "0.1.0"

__all__ = [
    "Adjoint", "DiscreteAdjoint", "BacksolveAdjoint", "InterpolatingAdjoint", "QuadratureAdjoint",
    "error_regularizer", "stiffness_regularizer",
    "ODEProblem", "solve", "odeint", "Solution", "Stats", "Trace", "ReturnCode", "SolveError",
    "Solver", "Euler", "Midpoint", "Heun", "RK4", "BS3", "DP5", "Tsit5", "Vern7",
    "Rosenbrock23", "Rodas4", "Rodas5P",
]
