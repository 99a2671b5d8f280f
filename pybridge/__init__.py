"""pybridge: neural differential equations with DifferentialEquations.jl-grade solvers in PyTorch,
whose internal error and stiffness estimates are differentiable training signals."""
from .odeint import odeint
from .problem import ODEProblem
from .solution import ReturnCode, Solution, Stats, Trace
from .solve import SolveError, solve
from .solvers import BS3, DP5, RK4, Euler, Heun, Midpoint, Solver, Tsit5, Vern7

__version__ = "0.1.0"

__all__ = [
    "ODEProblem", "solve", "odeint", "Solution", "Stats", "Trace", "ReturnCode", "SolveError",
    "Solver", "Euler", "Midpoint", "Heun", "RK4", "BS3", "DP5", "Tsit5", "Vern7",
]
