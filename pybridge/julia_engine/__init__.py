"""engine="julia": the Python side of the bridge to DifferentialEquations.jl (see JULIA.md).

Importing this package does not start Julia; the first solve does (runtime.load).
"""
from .engine import solve_ode
from .runtime import JuliaUnavailableError

__all__ = ["solve_ode", "JuliaUnavailableError"]
