"""Tableaus of Rößler's stochastic Runge–Kutta families, as data for one SRI and one SRA routine.

Source: StochasticDiffEq.jl, src/tableaus.jl (constructSRIW1, constructSRA1) and
src/caches/rossler_caches.jl (SOSRIConstantCache = constructSRIOpt1); A. Rößler, "Runge–Kutta
methods for the strong approximation of solutions of stochastic differential equations",
SIAM J. Numer. Anal. 48 (2010), Table 5.1 (SRI1W1) and Table 6.1 (SRA1); C. Rackauckas & Q. Nie,
"Stability-optimized high order methods and stiffness detection for pathwise stiff stochastic
differential equations" (2018), SOSRI. Matrices are Butcher-style: row i = stage i, column j = the
stage it uses (StochasticDiffEq stores the transpose in its caches).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class SRITableau:
    """Stages H0_i = y + h Σ A0_ij f_j + I10/h Σ B0_ij g_j, H1_i = y + h Σ A1_ij f_j + √h Σ B1_ij g_j;
    y1 = y + h Σ α_i f_i + Σ (β1_i ΔW + β2_i I11/√h) g_i + E2, E2 = Σ (β3_i I10/h + β4_i I111/h) g_i;
    E1 = h Σ_{i < error_terms} f_i."""

    name: str
    c0: Sequence[float]
    c1: Sequence[float]
    A0: Sequence[Sequence[float]]
    A1: Sequence[Sequence[float]]
    B0: Sequence[Sequence[float]]
    B1: Sequence[Sequence[float]]
    alpha: Sequence[float]
    beta1: Sequence[float]
    beta2: Sequence[float]
    beta3: Sequence[float]
    beta4: Sequence[float]
    error_terms: int
    order: float = 1.5
    delta: float = 1.0


@dataclass(frozen=True)
class SRATableau:
    """Stages H_i = y + h Σ A0_ij f_j + Σ B0_ij g_j·I10/h; y1 = y + h Σ α_i f_i + Σ β1_i g_i ΔW + E2,
    E2 = Σ β2_i g_i·I10/h, g_i = g(t + c1_i h); E1 = h Σ_i f_i."""

    name: str
    c0: Sequence[float]
    c1: Sequence[float]
    A0: Sequence[Sequence[float]]
    B0: Sequence[Sequence[float]]
    alpha: Sequence[float]
    beta1: Sequence[float]
    beta2: Sequence[float]
    order: float = 1.5
    delta: float = 1.0


# constructSRIW1 (Rößler 2010, SRI1W1). SOLVERS.md: SRIW1 scales E1 by δ = 1/6.
SRIW1 = SRITableau(
    name="SRIW1",
    c0=(0.0, 3 / 4, 0.0, 0.0),
    c1=(0.0, 1 / 4, 1.0, 1 / 4),
    A0=((0, 0, 0, 0), (3 / 4, 0, 0, 0), (0, 0, 0, 0), (0, 0, 0, 0)),
    A1=((0, 0, 0, 0), (1 / 4, 0, 0, 0), (1, 0, 0, 0), (0, 0, 1 / 4, 0)),
    B0=((0, 0, 0, 0), (3 / 2, 0, 0, 0), (0, 0, 0, 0), (0, 0, 0, 0)),
    B1=((0, 0, 0, 0), (1 / 2, 0, 0, 0), (-1, 0, 0, 0), (-5, 3, 1 / 2, 0)),
    alpha=(1 / 3, 2 / 3, 0.0, 0.0),
    beta1=(-1.0, 4 / 3, 2 / 3, 0.0),
    beta2=(-1.0, 4 / 3, -1 / 3, 0.0),
    beta3=(2.0, -4 / 3, -2 / 3, 0.0),
    beta4=(-2.0, 5 / 3, -2 / 3, 1.0),
    error_terms=2,   # StochasticDiffEq's SRIW1 step: E1 = h (f(H0_1) + f(H0_2))
    delta=1 / 6,
)

# SOSRIConstantCache / constructSRIOpt1 ("Opti6-12-11-10-01-47"); c0 = A0·1, c1 = A1·1.
_A0 = ((0.0, 0.0, 0.0, 0.0),
       (-0.04199224421316468, 0.0, 0.0, 0.0),
       (2.842612915017106, -2.0527723684000727, 0.0, 0.0),
       (4.338237071435815, -2.8895936137439793, 2.3017575594644466, 0.0))
_A1 = ((0.0, 0.0, 0.0, 0.0),
       (0.26204282091330466, 0.0, 0.0, 0.0),
       (0.20903646383505375, -0.1502377115150361, 0.0, 0.0),
       (0.05836595312746999, 0.6149440396332373, 0.08535117634046772, 0.0))
SOSRI = SRITableau(
    name="SOSRI",
    c0=(0.0, -0.04199224421316468, 0.7898405466170333, 3.7504010171562823),
    c1=(0.0, 0.26204282091330466, 0.05879875232001766, 0.758661169101175),
    A0=_A0,
    A1=_A1,
    B0=((0.0, 0.0, 0.0, 0.0),
        (-0.21641093549612528, 0.0, 0.0, 0.0),
        (1.5336352863679572, 0.26066223492647056, 0.0, 0.0),
        (-1.0536037558179159, 1.7015284721089472, -0.20725685784180017, 0.0)),
    B1=((0.0, 0.0, 0.0, 0.0),
        (-0.5119011827621657, 0.0, 0.0, 0.0),
        (2.67767339866713, -4.9395031322250995, 0.0, 0.0),
        (0.15580956238299215, 3.2361551006624674, -1.4223118283355949, 0.0)),
    alpha=(1.140099274172029, -0.6401334255743456, 0.4736296532772559, 0.026404498125060714),
    beta1=(-1.8453464565104432, 2.688764531100726, -0.2523866501071323, 0.40896857551684956),
    beta2=(0.4969658141589478, -0.5771202869753592, -0.12919702470322217, 0.2093514975196336),
    beta3=(2.8453464565104425, -2.688764531100725, 0.2523866501071322, -0.40896857551684945),
    beta4=(0.11522663875443433, -0.57877086147738, 0.2857851028163886, 0.17775911990655704),
    error_terms=4,   # FourStageSRI step: E1 = h (k1 + k2 + k3 + k4)
)

# constructSRA1 (Rößler 2010, SRA1): g is evaluated at t + h for stage 1 and at t for stage 2.
SRA1 = SRATableau(
    name="SRA1",
    c0=(0.0, 3 / 4),
    c1=(1.0, 0.0),
    A0=((0, 0), (3 / 4, 0)),
    B0=((0, 0), (3 / 2, 0)),
    alpha=(1 / 3, 2 / 3),
    beta1=(1.0, 0.0),
    beta2=(-1.0, 1.0),
)

SRI_TABLEAUS = {"SRIW1": SRIW1, "SOSRI": SOSRI}
SRA_TABLEAUS = {"SRA1": SRA1}


def sri_order_conditions(tab: SRITableau) -> list:
    """Residuals of Rößler's strong order 1.5 conditions (StochasticDiffEq.jl's checkSRIOrder)."""
    import numpy as np

    A0, A1, B0, B1 = (np.array(m, dtype=float) for m in (tab.A0, tab.A1, tab.B0, tab.B1))
    a, b1, b2, b3, b4 = (np.array(v, dtype=float) for v in (tab.alpha, tab.beta1, tab.beta2, tab.beta3, tab.beta4))
    e = np.ones_like(a)
    B1e, B0e = B1 @ e, B0 @ e
    return [
        a @ e - 1, b1 @ e - 1, b2 @ e, b3 @ e, b4 @ e,
        b1 @ B1e, b2 @ B1e - 1, b3 @ B1e, b4 @ B1e,
        a @ A0 @ e - 0.5, a @ B0e - 1, a @ B0e ** 2 - 1.5,
        b1 @ A1 @ e - 1, b2 @ A1 @ e, b3 @ A1 @ e + 1, b4 @ A1 @ e,
        b1 @ B1e ** 2 - 1, b2 @ B1e ** 2, b3 @ B1e ** 2 + 1, b4 @ B1e ** 2 - 2,
        b1 @ B1 @ B1e, b2 @ B1 @ B1e, b3 @ B1 @ B1e, b4 @ B1 @ B1e - 1,
        0.5 * b1 @ A1 @ B0e + b3 @ A1 @ B0e / 3,
    ]


def sra_order_conditions(tab: SRATableau) -> list:
    """Residuals of the SRA conditions (StochasticDiffEq.jl's checkSRAOrder)."""
    import numpy as np

    A0, B0 = np.array(tab.A0, dtype=float), np.array(tab.B0, dtype=float)
    a, b1, b2, c1 = (np.array(v, dtype=float) for v in (tab.alpha, tab.beta1, tab.beta2, tab.c1))
    e = np.ones_like(a)
    return [a @ e - 1, b1 @ e - 1, b2 @ e, a @ B0 @ e - 1, a @ A0 @ e - 0.5, a @ (B0 @ e) ** 2 - 1.5,
            b1 @ c1 - 1, b2 @ c1 + 1]
