"""ESDIRK tableaus (explicit first stage, singly diagonally implicit), stepped by ``esdirk.py``.

Every method is stored in OrdinaryDiffEq's z-form: with ``z_i = h·f(t + c_i h, Y_i)``,

    Y_1 = y0,  z_1 = h·f(t, y0)                                        (explicit first stage)
    Y_i = y0 + Σ_{j<i} A_ij z_j + γ z_i                                (one nonlinear solve for z_i)
    y1  = Y_s                                                          (all three are stiffly accurate)
    err = Σ_i btilde_i z_i                                             (btilde = bhat − b)

``A`` is the full lower-triangular Butcher matrix (diagonal γ from row 2 on), ``b`` its last row.
``predictor[i]`` holds the weights of the Newton starting guess ``z_i⁰ = Σ_{j<i} predictor_ij z_j``
(OrdinaryDiffEq's ``α`` coefficients: Hermite extrapolation of the earlier stages, or the
embedded solution for Kvaerno5's last stage).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction as Fr
from typing import Optional, Sequence

_SDIRK = "SciML/OrdinaryDiffEq.jl lib/OrdinaryDiffEqSDIRK/src/"


@dataclass(frozen=True)
class ESDIRKTableau:
    name: str
    gamma: float
    A: Sequence[Sequence[float]]          # (s, s) lower triangular, A[i][i] = γ for i ≥ 1, row 0 zero
    btilde: Sequence[float]               # (s,) error weights, bhat − b
    c: Sequence[float]                    # time nodes (row sums of A)
    predictor: Sequence[Sequence[float]]  # (s, s) strictly lower: Newton starting guesses
    order: int
    error_order: int                      # order of the embedded solution
    source: str = ""
    beta1: Optional[float] = None         # PI exponents; None: OrdinaryDiffEq's 7/(10p), 2/(5p)
    beta2: Optional[float] = None

    @property
    def stages(self) -> int:
        return len(self.c)

    @property
    def b(self) -> Sequence[float]:
        return self.A[-1]


def _lower(rows, gamma):
    """Rows of strictly-lower coefficients (row i has i entries) plus γ on the diagonal."""
    s = len(rows)
    out = [[0.0] * s for _ in range(s)]
    for i, row in enumerate(rows):
        for j, v in enumerate(row):
            out[i][j] = float(v)
        if i > 0:
            out[i][i] = float(gamma)
    return out


def _square(rows, s):
    out = [[0.0] * s for _ in range(s)]
    for i, row in enumerate(rows):
        for j, v in enumerate(row):
            out[i][j] = float(v)
    return out


# ---------------------------------------------------------------------------------------------
# TRBDF2 (Bank et al. 1985; Hosea & Shampine 1996), OrdinaryDiffEq sdirk_tableaus.jl
# (TRBDF2Tableau) and sdirk_perform_step.jl:
#   c = [0, γ, 1], A = [[0,0,0],[d,d,0],[ω,ω,d]], b = [ω, ω, d], bhat = [(1−ω)/3, (3ω+1)/3, d/3],
#   γ = 2 − √2 (the node of the trapezoidal stage), d = γ/2 = 1 − √2/2 (the diagonal), ω = √2/4,
#   btilde = [(1−√2)/3, 1/3, (√2−2)/3]. Guesses (Shampine): z_γ = z_1, z = α1 z_1 + α2 z_γ with
#   α1 = −√2/2, α2 = 1 + √2/2. Order 2, embedded order 3, L-stable.
# ---------------------------------------------------------------------------------------------
def _trbdf2():
    r2 = math.sqrt(2.0)
    gam = 2 - r2
    d = 1 - r2 / 2
    w = r2 / 4
    return ESDIRKTableau(
        "TRBDF2", gamma=d,
        A=_lower([[], [d], [w, w]], d),
        btilde=[(1 - r2) / 3, 1 / 3, (r2 - 2) / 3],
        c=[0.0, gam, 1.0],
        predictor=_square([[], [1.0], [-r2 / 2, 1 + r2 / 2]], 3),
        order=2, error_order=3,
        source=_SDIRK + "sdirk_tableaus.jl (TRBDF2Tableau), sdirk_perform_step.jl")


TRBDF2 = _trbdf2()


# ---------------------------------------------------------------------------------------------
# KenCarp4: the implicit (ESDIRK) half of Kennedy & Carpenter's ARK4(3)6L[2]SA (Appl. Numer.
# Math. 44, 2003), used as a plain ODE method. Exact rationals as in OrdinaryDiffEq
# sdirk_tableaus.jl (KenCarp4Tableau): γ = 1/4, c = [0, 1/2, 83/250, 31/50, 17/20, 1], a62 = 0,
# btilde_i = bhat_i − a6i (btilde2 = 0). Guesses: kencarp_kvaerno_perform_step.jl
# (z2 = z1; α rows for stages 3–6). Order 4, embedded order 3, L-stable, stiffly accurate.
# ---------------------------------------------------------------------------------------------
def _kencarp4():
    g = Fr(1, 4)
    rows = [[], [g],
            [Fr(8611, 62500), -Fr(1743, 31250)],
            [Fr(5012029, 34652500), -Fr(654441, 2922500), Fr(174375, 388108)],
            [Fr(15267082809, 155376265600), -Fr(71443401, 120774400), Fr(730878875, 902184768),
             Fr(2285395, 8070912)],
            [Fr(82889, 524892), Fr(0), Fr(15625, 83664), Fr(69875, 102672), -Fr(2260, 8211)]]
    btilde = [-Fr(31666707, 9881966720), Fr(0), Fr(256875, 105007616), Fr(2768025, 128864768),
              -Fr(169839, 3864644), Fr(5247, 225920)]
    pred = [[], [1],
            [Fr(42, 125), Fr(83, 125)],
            [-Fr(6, 25), Fr(31, 25)],
            [Fr(914470432, 2064665255), Fr(798813, 724780), -Fr(824765625, 372971788), Fr(49640, 29791)],
            [Fr(288521442795, 954204491116), Fr(2224881, 2566456), -Fr(1074821875, 905317354),
             -Fr(3360875, 8098936), Fr(7040, 4913)]]
    c = [0, Fr(1, 2), Fr(83, 250), Fr(31, 50), Fr(17, 20), 1]
    return ESDIRKTableau(
        "KenCarp4", gamma=float(g), A=_lower(rows, g), btilde=[float(x) for x in btilde],
        c=[float(x) for x in c], predictor=_square(pred, 6), order=4, error_order=3,
        source=_SDIRK + "sdirk_tableaus.jl (KenCarp4Tableau), kencarp_kvaerno_perform_step.jl")


KENCARP4 = _kencarp4()


# ---------------------------------------------------------------------------------------------
# Kvaerno5 (Kværnø, BIT 44, 2004: ESDIRK 5(4), 7 stages), OrdinaryDiffEq sdirk_tableaus.jl
# (Kvaerno5Tableau): γ = 0.26, a62 = a72 = 0, stage 6 is the embedded 4th-order solution (so
# btilde = row 6 − row 7), c3 = 1.2303… lies past t + h. OrdinaryDiffEq passes c = γ for stage 2;
# its node is 2γ (row sum), used here (only non-autonomous problems see the difference).
# Guesses: z2 = z1; Hermite α rows for stages 3–6; stage 7 from the embedded solution.
# ---------------------------------------------------------------------------------------------
def _kvaerno5():
    g = 0.26
    a31, a32 = 0.13, 0.84033320996790809
    a41, a42, a43 = 0.22371961478320505, 0.47675532319799699, -0.06470895363112615
    a51, a52, a53, a54 = 0.16648564323248321, 0.1045001884159172, 0.03631482272098715, -0.13090704451073998
    a61, a63, a64, a65 = 0.13855640231268224, -0.04245337201752043, 0.02446657898003141, 0.61943039072480676
    a71, a73, a74, a75, a76 = (0.13659751177640291, -0.05496908796538376, -0.04118626728321046,
                               0.62993304899016403, 0.06962479448202728)
    rows = [[], [g], [a31, a32], [a41, a42, a43], [a51, a52, a53, a54],
            [a61, 0.0, a63, a64, a65], [a71, 0.0, a73, a74, a75, a76]]
    btilde = [0.00195889053627933, 0.0, 0.01251571594786333, 0.06565284626324187,
              -0.01050265826535727, 0.19037520551797272, -g]
    pred = [[], [1.0],
            [-1.366025403784441, 2.3660254037844357],
            [-0.19650552613122207, 0.8113579546496623, 0.38514757148155954],
            [0.10375304369958693, 0.937994698066431, -0.04174774176601781],
            [-0.17281112873898072, 0.6235784481025847, 0.5492326806363959],
            [a61, 0.0, a63, a64, a65, g]]
    c = [0.0, 2 * g, 1.230333209967908, 0.895765984350076, 0.436393609858648, 1.0, 1.0]
    return ESDIRKTableau(
        "Kvaerno5", gamma=g, A=_lower(rows, g), btilde=btilde, c=c, predictor=_square(pred, 7),
        order=5, error_order=4,
        source=_SDIRK + "sdirk_tableaus.jl (Kvaerno5Tableau), kencarp_kvaerno_perform_step.jl")


KVAERNO5 = _kvaerno5()

ESDIRK_TABLEAUS = {t.name: t for t in (TRBDF2, KENCARP4, KVAERNO5)}
