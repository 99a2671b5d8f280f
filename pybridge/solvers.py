"""Solver names. A name means the same method on every engine (names follow DifferentialEquations.jl)."""
from __future__ import annotations


class Solver:
    """Base of all solver descriptors. They hold no state: the engine builds what it needs."""

    family = "explicit_rk"
    adaptive = True     # adaptive by default (fixed-step methods need dt=)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self):
        return hash(type(self).__name__)

    @property
    def name(self) -> str:
        return type(self).__name__


class ExplicitRK(Solver):
    """An explicit Runge–Kutta method given by a tableau of the same name."""


class Euler(ExplicitRK):
    """Forward Euler (order 1, fixed step)."""
    adaptive = False


class Midpoint(ExplicitRK):
    """Explicit midpoint (order 2, fixed step)."""
    adaptive = False


class Heun(ExplicitRK):
    """Heun's method / explicit trapezoid (order 2, fixed step; embedded Euler error estimate)."""
    adaptive = False


class RK4(ExplicitRK):
    """The classic fourth-order Runge–Kutta method (fixed step)."""
    adaptive = False


class BS3(ExplicitRK):
    """Bogacki–Shampine 3(2), FSAL."""


class DP5(ExplicitRK):
    """Dormand–Prince 5(4), FSAL, free 4th-order interpolant."""


class Tsit5(ExplicitRK):
    """Tsitouras 5(4), FSAL, free 4th-order interpolant. DifferentialEquations.jl's default."""


class Vern7(ExplicitRK):
    """Verner's 'most efficient' 7(6), 10 stages."""


EXPLICIT = (Euler, Midpoint, Heun, RK4, BS3, DP5, Tsit5, Vern7)


class Rosenbrock(Solver):
    """A Rosenbrock–Wanner method (linearly implicit, for stiff problems): one Jacobian and one
    LU factorization of I − γhJ per step and sample, no Newton iteration. The Jacobian comes from
    forward-mode AD of f, or from the problem's `jac` when given."""

    family = "rosenbrock"


class Rosenbrock23(Rosenbrock):
    """Shampine's ode23s / OrdinaryDiffEq's Rosenbrock23: order 2 with a 3rd-order error estimate,
    L-stable, FSAL; good at loose tolerances and for moderately stiff problems."""


class Rodas4(Rosenbrock):
    """Hairer & Wanner's Rodas4: order 4(3), 6 stages, stiffly accurate, 3rd-order dense output."""


class Rodas5P(Rosenbrock):
    """Steinebach's Rodas5P: order 5(4), 8 stages, stiffly accurate, 4th-order dense output;
    DifferentialEquations.jl's recommended stiff method at medium to tight tolerances."""


ROSENBROCK = (Rosenbrock23, Rodas4, Rodas5P)
