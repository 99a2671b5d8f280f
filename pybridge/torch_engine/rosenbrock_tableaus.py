"""Rosenbrock (Rosenbrock–Wanner) tableaus, stepped by the one generic routine in ``rosenbrock.py``.

Every method is stored in OrdinaryDiffEq's *transformed* form (Hairer & Wanner, Solving ODEs II,
§IV.7, eq. 7.25): with the per-sample matrix ``M = I − γhJ`` and stage increments ``U_i``,

    u_i  = y0 + Σ_{j<i} A_ij U_j                                   (stage argument, time t + c_i h)
    M U_i = γ · ( h f(t + c_i h, u_i) + h² d_i ∂f/∂t + Σ_{j<i} C_ij U_j )
    y1   = y0 + Σ_i b_i U_i,     err = Σ_i btilde_i U_i,
    y(t0 + θh) = y0 + Σ_m θ^m Σ_i dense[m-1][i] U_i                (dense output)

This is OrdinaryDiffEq's ``W \\ -linsolve_tmp`` with ``W = J − I/(γh)`` multiplied through by h,
so no coefficient is divided by h (a zero step of a finished sample stays exactly zero).

Relation to the textbook form (Γ lower triangular with diagonal γ, α strictly lower):
``A = αΓ⁻¹``, ``C = diag(1/γ) − Γ⁻¹``, ``b = b_stdΓ⁻¹``. Rodas methods are stiffly accurate, so
``y1 = u_s + U_s`` and ``err = U_s``. Their dense output is OrdinaryDiffEq's
``(1−θ)y0 + θ(y1 + (1−θ)(k1 + θ(k2 + θ k3)))`` with ``k_j = Σ_i H_ji U_i``, expanded into powers
of θ by ``_dense_from_h``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

_ODE = "SciML/OrdinaryDiffEq.jl"


@dataclass(frozen=True)
class RosenbrockTableau:
    name: str
    gamma: float
    A: Sequence[Sequence[float]]      # (s, s), strictly lower
    C: Sequence[Sequence[float]]      # (s, s), strictly lower
    b: Sequence[float]
    btilde: Sequence[float]
    c: Sequence[float]                # time nodes
    d: Sequence[float]                # coefficients of h²·∂f/∂t
    dense: Sequence[Sequence[float]]  # (D, s): coefficient of θ^(m+1) on U_i
    order: int
    dense_order: int
    fsal: bool = False                # the last stage is f(t + h, y1): it starts the next step
    source: str = ""
    beta1: Optional[float] = None     # PI exponents; None: OrdinaryDiffEq's 7/(10p), 2/(5p)
    beta2: Optional[float] = None

    @property
    def stages(self) -> int:
        return len(self.c)


def _square(rows, s):
    """Pad a ragged or (s, s-1) coefficient list to an (s, s) array."""
    out = np.zeros((s, s))
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out


def _dense_from_h(b, H):
    """Expand y0 + θ(y1 − y0) + θ(1−θ)Σ_j θ^(j−1) H_j·U into powers θ^1 … θ^(q+1)."""
    H = np.asarray(H, dtype=float)
    q = H.shape[0]
    D = np.zeros((q + 1, H.shape[1]))
    D[0] = np.asarray(b) + H[0]
    for m in range(1, q):
        D[m] = H[m] - H[m - 1]
    D[q] = -H[q - 1]
    return D.tolist()


def rodas(name, gamma, A, C, c, d, H, order, dense_order, source):
    """A stiffly accurate Rodas method as OrdinaryDiffEq stores it (A with its last row, C, c, d, H)."""
    s = len(c)
    A = _square(A, s)
    C = _square(C, s)
    e_s = np.eye(s)[-1]
    b = A[-1] + e_s   # y1 = u_s + U_s
    return RosenbrockTableau(name=name, gamma=gamma, A=A.tolist(), C=C.tolist(), b=b.tolist(),
                             btilde=e_s.tolist(), c=list(c), d=list(d), dense=_dense_from_h(b, H),
                             order=order, dense_order=dense_order, source=source)


def from_standard(name, gamma, alpha, Gamma, b, btilde, c, d, dense_k, order, dense_order, fsal, source):
    """Transform a method given in the textbook (α, Γ) form on K_i = h·k_i to the stored form."""
    Gamma = np.asarray(Gamma, dtype=float)
    Gi = np.linalg.inv(Gamma)
    s = Gamma.shape[0]
    A = np.asarray(alpha, dtype=float) @ Gi
    C = np.diag(np.full(s, 1 / gamma)) - Gi
    np.fill_diagonal(C, 0.0)
    to_u = lambda w: (np.asarray(w, dtype=float) @ Gi).tolist()
    return RosenbrockTableau(name=name, gamma=gamma, A=A.tolist(), C=C.tolist(), b=to_u(b),
                             btilde=to_u(btilde), c=list(c), d=list(d),
                             dense=[to_u(row) for row in dense_k], order=order,
                             dense_order=dense_order, fsal=fsal, source=source)


# ---------------------------------------------------------------------------------------------
# Rosenbrock23 (Shampine & Reichelt's ode23s; OrdinaryDiffEq lib/OrdinaryDiffEqRosenbrock/src/
# rosenbrock_tableaus.jl: c₃₂ = 6 + √2, d = 1/(2 + √2); perform_step in rosenbrock_perform_step.jl).
# OrdinaryDiffEq writes it with derivatives k_i and W̃ = I − dhJ:
#   W̃k1 = f0 + dh·T;  f1 = f(t + h/2, y0 + h/2·k1);  W̃k2 = f1 − k1 + W̃k1 (k2 = W̃⁻¹(f1−k1) + k1);
#   y1 = y0 + h·k2;  f2 = f(t + h, y1);  W̃k3 = f2 − c₃₂(k2 − f1) − 2(k1 − f0) + dh·T;
#   err = h/6·(k1 − 2k2 + k3);  dense y0 + h(c1 k1 + c2 k2), c1 = θ(1−θ)/(1−2d), c2 = θ(θ−2d)/(1−2d).
# Eliminating f0 and f1 with the first two stage equations gives the textbook form on K = h·k:
#   Γ = [[d, 0, 0], [−d, d, 0], [d(c₃₂−2), −c₃₂d, d]], α rows (0,0,0), (½,0,0), (0,1,0),
#   time-derivative coefficients (d, 0, −d).
# The k3 equation's last term is dh·T as in Shampine & Reichelt (SIAM J. Sci. Comput. 18, 1997,
# the ode23s formula), not OrdinaryDiffEq's h·T: for y' = g(t) (J = 0) the estimate is then
# h/6·(g0 − 2g½ + g1) = O(h³), whereas h·T leaves (1 − d)h²T/6 = O(h²) and on a non-autonomous
# stiff problem (y' = −10⁵(y − cos t)) rejects steps ~10⁴× too small (tests/test_stiff.py).
# ---------------------------------------------------------------------------------------------
def _rosenbrock23():
    d = 1 / (2 + math.sqrt(2))
    c32 = 6 + math.sqrt(2)
    w = 1 / (1 - 2 * d)
    return from_standard(
        "Rosenbrock23", gamma=d,
        alpha=[[0, 0, 0], [0.5, 0, 0], [0, 1, 0]],
        Gamma=[[d, 0, 0], [-d, d, 0], [d * (c32 - 2), -c32 * d, d]],
        b=[0, 1, 0], btilde=[1 / 6, -2 / 6, 1 / 6],
        c=[0.0, 0.5, 1.0], d=[d, 0.0, -d],
        dense_k=[[w, -2 * d * w, 0], [-w, w, 0]],   # θ¹ and θ² coefficients on K1, K2
        order=2, dense_order=2, fsal=True,
        source=f"{_ODE} lib/OrdinaryDiffEqRosenbrock/src/rosenbrock_tableaus.jl (Rosenbrock23Tableau), "
        "rosenbrock_perform_step.jl, rosenbrock_interpolants.jl")


ROSENBROCK23 = _rosenbrock23()

# Rodas4 (Hairer & Wanner), OrdinaryDiffEq lib/OrdinaryDiffEqRosenbrockTableaus/src/
# rosenbrock_tableaus.jl (RODAS4A, RODAS4C, RODAS4c, RODAS4d, RODAS4H), γ = 1/4.
RODAS4 = rodas(
    "Rodas4", gamma=0.25,
    A=[[],
       [1.544],
       [0.9466785280815826, 0.2557011698983284],
       [3.314825187068521, 2.896124015972201, 0.9986419139977817],
       [1.221224509226641, 6.019134481288629, 12.53708332932087, -0.687886036105895],
       [1.221224509226641, 6.019134481288629, 12.53708332932087, -0.687886036105895, 1.0]],
    C=[[],
       [-5.6688],
       [-2.430093356833875, -0.2063599157091915],
       [-0.1073529058151375, -9.594562251023355, -20.47028614809616],
       [7.496443313967647, -10.24680431464352, -33.99990352819905, 11.7089089320616],
       [8.083246795921522, -7.981132988064893, -31.52159432874371, 16.31930543123136, -6.058818238834054]],
    c=[0.0, 0.386, 0.21, 0.63, 1.0, 1.0],
    d=[0.25, -0.1043, 0.1035, -0.0362, 0.0, 0.0],
    H=[[10.12623508344586, -7.487995877610167, -34.80091861555747, -7.992771707568823, 1.025137723295662, 0.0],
       [-0.6762803392801253, 6.087714651680015, 16.43084320892478, 24.76722511418386, -6.594389125716872, 0.0]],
    order=4, dense_order=3,
    source=f"{_ODE} lib/OrdinaryDiffEqRosenbrockTableaus/src/rosenbrock_tableaus.jl (Rodas4Tableau)")

# Rodas5P (Steinebach 2023), OrdinaryDiffEq lib/OrdinaryDiffEqRosenbrock/src/rosenbrock_tableaus.jl
# (Rodas5PTableau), γ = 0.21193756319429014. c holds the time nodes and d the ∂f/∂t coefficients
# (d_1 = γ); both are re-derived from A and C in tests/test_stiff.py.
RODAS5P = rodas(
    "Rodas5P", gamma=0.21193756319429014,
    A=[[],
       [3.0],
       [2.849394379747939, 0.45842242204463923],
       [-6.954028509809101, 2.489845061869568, -10.358996098473584],
       [2.8029986275628964, 0.5072464736228206, -0.3988312541770524, -0.04721187230404641],
       [-7.502846399306121, 2.561846144803919, -11.627539656261098, -0.18268767659942256, 0.030198172008377946],
       [-7.502846399306121, 2.561846144803919, -11.627539656261098, -0.18268767659942256, 0.030198172008377946, 1.0],
       [-7.502846399306121, 2.561846144803919, -11.627539656261098, -0.18268767659942256, 0.030198172008377946, 1.0, 1.0]],
    C=[[],
       [-14.155112264123755],
       [-17.97296035885952, -2.859693295451294],
       [147.12150275711716, -1.41221402718213, 71.68940251302358],
       [165.43517024871676, -0.4592823456491126, 42.90938336958603, -5.961986721573306],
       [24.854864614690072, -3.0009227002832186, 47.4931110020768, 5.5814197821558125, -0.6610691825249471],
       [30.91273214028599, -3.1208243349937974, 77.79954646070892, 34.28646028294783, -19.097331116725623,
        -28.087943162872662],
       [37.80277123390563, -3.2571969029072276, 112.26918849496327, 66.9347231244047, -40.06618937091002,
        -54.66780262877968, -9.48861652309627]],
    c=[0.0, 0.6358126895828704, 0.4095798393397535, 0.9769306725060716, 0.4288403609558664, 1.0, 1.0, 1.0],
    d=[0.21193756319429014, -0.42387512638858027, -0.3384627126235924, 1.8046452872882734,
       2.325825639765069, 0.0, 0.0, 0.0],
    H=[[25.948786856663858, -2.5579724845846235, 10.433815404888879, -2.3679251022685204, 0.524948541321073,
        1.1241088310450404, 0.4272876194431874, -0.17202221070155493],
       [-9.91568850695171, -0.9689944594115154, 3.0438037242978453, -24.495224566215796, 20.176138334709044,
        15.98066361424651, -6.789040303419874, -6.710236069923372],
       [11.419903575922262, 2.8879645146136994, 72.92137995996029, 80.12511834622643, -52.072871366152654,
        -59.78993625266729, -0.15582684282751913, 4.883087185713722]],
    order=5, dense_order=4,
    source=f"{_ODE} lib/OrdinaryDiffEqRosenbrock/src/rosenbrock_tableaus.jl (Rodas5PTableau)")

ROSENBROCK_TABLEAUS = {t.name: t for t in (ROSENBROCK23, RODAS4, RODAS5P)}
