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
    automatic differentiation of f (jacobian.py), or from the problem's `jac` when given."""

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


class ESDIRK(Solver):
    """An ESDIRK method (explicit first stage, singly diagonally implicit Runge–Kutta) for stiff
    problems: per step and sample one Jacobian (automatic differentiation, or the problem's `jac`) and one
    LU of I − γhJ, then a simplified Newton iteration per implicit stage (κ = 1/100, at most 10
    iterations, divergence when the rate exceeds 2). A step whose Newton iteration fails (or
    whose matrix is singular) is rejected and retried with dt halved; below dtmin the sample ends
    ConvergenceFailure. Gradients through converged stages are implicit-function-theorem ones."""

    family = "esdirk"


class Kvaerno5(ESDIRK):
    """Kværnø's ESDIRK 5(4): 7 stages, L-stable, stiffly accurate; a good stiff method at tight
    tolerances when the Jacobian is expensive relative to f (Hermite dense output, so the
    solver steps onto the save points)."""


class KenCarp4(ESDIRK):
    """The implicit ESDIRK 4(3) half of Kennedy & Carpenter's ARK4(3)6L[2]SA: 6 stages,
    L-stable, stiffly accurate (used as a plain ODE method, no IMEX splitting)."""


class TRBDF2(ESDIRK):
    """TR-BDF2 (trapezoidal stage then BDF2), order 2 with a 3rd-order error estimate, L-stable;
    robust at loose tolerances."""


ESDIRK_SOLVERS = (Kvaerno5, KenCarp4, TRBDF2)


class AutoSwitch(Solver):
    """An explicit method that hands each sample to `stiff` while that sample is stiff, and back
    (OrdinaryDiffEq's AutoSwitch; SOLVERS.md "Automatic switching"). `stiff` is a Rosenbrock or
    ESDIRK solver, e.g. AutoTsit5(Rosenbrock23()). `Solution.trace.method` records which method
    took each step (0 explicit, 1 stiff)."""

    family = "auto"

    def __init__(self, stiff: Solver):
        if not isinstance(stiff, Solver) or stiff.family not in ("rosenbrock", "esdirk"):
            raise TypeError(f"{type(self).__name__}(stiff): stiff must be a Rosenbrock or ESDIRK solver "
                            f"such as pb.Rosenbrock23() or pb.Rodas5P(); got {stiff!r}")
        if not stiff.adaptive:
            raise ValueError(f"{type(self).__name__}(stiff): stiff must be adaptive; got {stiff!r}")
        self.stiff = stiff

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.stiff!r})"

    def __hash__(self):
        return hash((type(self).__name__, self.stiff))


class AutoTsit5(AutoSwitch):
    """Tsit5 while non-stiff, `stiff` while stiff: AutoTsit5(Rosenbrock23()), AutoTsit5(Rodas5P())."""


class AutoVern7(AutoSwitch):
    """Vern7 while non-stiff, `stiff` while stiff: AutoVern7(Rodas5P())."""


class SDESolver(Solver):
    """A stochastic Runge–Kutta method for SDEProblems (torch engine). `order` is the strong order,
    which the step-size controller uses; `interpretations` the SDE calculi it converges for;
    `noise` the noise types it supports (SOLVERS.md, "SDEs")."""

    family = "sde"
    order = 0.5
    interpretations = ("ito",)
    noise = ("diagonal", "scalar", "additive")


class EM(SDESolver):
    """Euler–Maruyama: strong order 0.5, fixed step; any noise, general (g of shape (..., n, m)) included."""
    adaptive = False
    noise = SDESolver.noise + ("general",)


class LambaEM(SDESolver):
    """Euler–Maruyama with Lamba's error estimate (drift and Milstein-term), adaptive."""


class EulerHeun(SDESolver):
    """Stochastic Heun (Stratonovich), strong order 0.5 (1.0 for commutative noise), fixed step;
    general noise included."""
    adaptive = False
    interpretations = ("stratonovich",)
    noise = SDESolver.noise + ("general",)


class RKMil(SDESolver):
    """Derivative-free Milstein (Kloeden–Platen 11.1.5), strong order 1.0, diagonal or scalar noise;
    Itô or Stratonovich (follows the problem); adaptive."""
    order = 1.0
    interpretations = ("ito", "stratonovich")
    noise = ("diagonal", "scalar")


class SRIW1(SDESolver):
    """Rößler's SRI method SRIW1: strong order 1.5 for diagonal/scalar Itô noise, adaptive (δ = 1/6)."""
    order = 1.5
    noise = ("diagonal", "scalar")


class SOSRI(SDESolver):
    """Rackauckas & Nie's stability-optimized SRI (DifferentialEquations.jl's default): strong order 1.5
    for diagonal/scalar Itô noise, adaptive."""
    order = 1.5
    noise = ("diagonal", "scalar")


class SRA1(SDESolver):
    """Rößler's SRA1 for additive noise: strong order 1.5 (2.0 deterministic), adaptive."""
    order = 1.5
    interpretations = ("ito", "stratonovich")  # identical for additive noise
    noise = ("additive",)


class ReversibleHeun(SDESolver):
    """Kidger et al.'s reversible Heun (Stratonovich): algebraically reversible, so
    pb.ReversibleAdjoint() recovers the forward states exactly backwards (O(1) memory); fixed step;
    general noise included."""
    adaptive = False
    interpretations = ("stratonovich",)
    noise = SDESolver.noise + ("general",)


SDE_SOLVERS = (EM, LambaEM, EulerHeun, RKMil, SRIW1, SOSRI, SRA1, ReversibleHeun)
