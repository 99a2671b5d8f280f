"""Explicit Runge–Kutta tableaus transcribed from OrdinaryDiffEq.jl (SciML/OrdinaryDiffEq.jl).

Every coefficient is the Float64 literal that OrdinaryDiffEq uses for ``Float64`` (its
``CompiledFloats`` branch), so stepping with these numbers reproduces Julia's arithmetic inputs
bit for bit. Where the Julia source only gives rationals, the value is the correctly rounded
double of that rational (Python's ``p / q`` on ints is correctly rounded).

Sign convention of the error weights. ``ButcherTableau.b_error`` is ``b - b_hat`` for every
method here. OrdinaryDiffEq's own ``btilde`` is *not* consistent about this sign: for Tsit5,
DP5 and BS3 it stores ``b_hat - b``; for Vern7 it stores ``b - b_hat``. Those three are
therefore negated below. Negation is exact in IEEE arithmetic, so ``|h Σ b_error_i k_i|``
(all the step-size controller ever looks at) is bit-identical to Julia's ``|utilde|``.

Index conventions (0-based): ``a[i]`` has ``i`` entries; ``dense[i][m]`` is the coefficient of
θ^(m+1) in stage i's weight b_i(θ) (stages past ``s`` are the lazy ``extra_a`` ones, whose row j
has ``s + j`` entries); ``stiffness_pair`` index ``s`` (= number of stages) means
the evaluation f(t1, y1) that starts the next step.
"""
from __future__ import annotations

from .tableau import ButcherTableau

_ODE = "SciML/OrdinaryDiffEq.jl"

# ---------------------------------------------------------------------------------------------
# Fixed-step classics (textbook; e.g. Hairer, Nørsett & Wanner, Solving ODEs I, §II.1).
# ---------------------------------------------------------------------------------------------

# Forward Euler, order 1. No error estimate (OrdinaryDiffEq's Euler is not adaptive).
EULER = ButcherTableau(
    name="Euler",
    c=[0.0],
    a=[[]],
    b=[1.0],
    order=1,
    stiffness_pair=(0, 1),
    source="textbook (HNW I, II.1); OrdinaryDiffEq Euler",
)

# Explicit midpoint, order 2. Like OrdinaryDiffEq's Midpoint (lib/OrdinaryDiffEqLowOrderRK,
# fixed_timestep_perform_step.jl: ``utilde = dt*(fsalfirst - k)``) the embedded method is
# Euler, b_hat = [1, 0]; here b_error = b - b_hat = [-1, 1] (Julia's sign is the opposite).
MIDPOINT = ButcherTableau(
    name="Midpoint",
    c=[0.0, 0.5],
    a=[[], [0.5]],
    b=[0.0, 1.0],
    order=2,
    b_error=[-1.0, 1.0],
    error_order=1,
    stiffness_pair=(0, 2),
    source="textbook (HNW I, II.1); error estimate as OrdinaryDiffEq Midpoint "
    "(lib/OrdinaryDiffEqLowOrderRK/src/fixed_timestep_perform_step.jl)",
)

# Heun (explicit trapezoid), order 2, embedded Euler: b_error = b - [1, 0] = [-1/2, 1/2]
# (OrdinaryDiffEq: ``utilde = dt/2*(k - fsalfirst)``, same sign).
HEUN = ButcherTableau(
    name="Heun",
    c=[0.0, 1.0],
    a=[[], [1.0]],
    b=[0.5, 0.5],
    order=2,
    b_error=[-0.5, 0.5],
    error_order=1,
    stiffness_pair=(0, 1),
    source="textbook (HNW I, II.1); error estimate as OrdinaryDiffEq Heun "
    "(lib/OrdinaryDiffEqLowOrderRK/src/fixed_timestep_perform_step.jl)",
)

# Classic RK4. OrdinaryDiffEq's RK4 has a residual-based error estimate that is not an
# embedded RK pair, so no b_error here (fixed step).
RK4 = ButcherTableau(
    name="RK4",
    c=[0.0, 0.5, 0.5, 1.0],
    a=[[], [0.5], [0.0, 0.5], [0.0, 0.0, 1.0]],
    b=[1 / 6, 1 / 3, 1 / 3, 1 / 6],
    order=4,
    stiffness_pair=(1, 2),
    source="textbook (Kutta 1901; HNW I, II.1 Table 1.2)",
)

# ---------------------------------------------------------------------------------------------
# BS3: Bogacki–Shampine 3(2), FSAL. Hermite dense output in OrdinaryDiffEq.
# lib/OrdinaryDiffEqLowOrderRK/src/low_order_rk_tableaus.jl (BS3ConstantCache).
# OrdinaryDiffEq: b_hat = [7/24, 1/4, 1/3, 1/8], btilde = b_hat - b = [5/72, -1/12, -1/9, 1/8].
# ---------------------------------------------------------------------------------------------
BS3 = ButcherTableau(
    name="BS3",
    c=[0.0, 0.5, 0.75, 1.0],
    a=[
        [],
        [0.5],
        [0.0, 0.75],
        [0.2222222222222222, 0.3333333333333333, 0.4444444444444444],
    ],
    b=[0.2222222222222222, 0.3333333333333333, 0.4444444444444444, 0.0],
    order=3,
    b_error=[-0.06944444444444445, 0.08333333333333333, 0.1111111111111111, -0.125],
    error_order=2,
    fsal=True,
    dense=None,
    stiffness_pair=(2, 3),
    source=f"{_ODE} lib/OrdinaryDiffEqLowOrderRK/src/low_order_rk_tableaus.jl "
    "(BS3ConstantCache, Float64 branch)",
)

# ---------------------------------------------------------------------------------------------
# DP5: Dormand–Prince 5(4), FSAL (b = 7th row of a, b_7 = 0).
# lib/OrdinaryDiffEqLowOrderRK/src/low_order_rk_tableaus.jl (DP5ConstantCacheActual, DP5_dense_ds).
# OrdinaryDiffEq: b_hat = [5179/57600, 0, 7571/16695, 393/640, -92097/339200, 187/2100, 1/40],
# btilde = b_hat - b.
#
# Dense output. OrdinaryDiffEq (interpolants.jl, HNW I p.192) stores
#   k[1] = U = Σ b_i k_i,  k[2] = k_1 - U,  k[3] = U - k_7 - k[2],  k[4] = Σ d_i k_i
# and evaluates  y(θ) = y0 + h (θ k[1] + θ(1-θ) k[2] + θ²(1-θ) k[3] + θ²(1-θ)² k[4]).
# Expanded per stage:  b_i(θ) = δ_i1 θ + (3 b_i - 2 δ_i1 - δ_i7 + d_i) θ²
#                               + (-2 b_i + δ_i1 + δ_i7 - 2 d_i) θ³ + d_i θ⁴,
# evaluated exactly on the rationals of the generic-T branch and rounded once to double.
# ---------------------------------------------------------------------------------------------
DP5 = ButcherTableau(
    name="DP5",
    c=[0.0, 0.2, 0.3, 0.8, 0.8888888888888888, 1.0, 1.0],
    a=[
        [],
        [0.2],
        [0.075, 0.225],
        [0.9777777777777777, -3.7333333333333334, 3.5555555555555554],
        [2.9525986892242035, -11.595793324188385, 9.822892851699436, -0.2908093278463649],
        [2.8462752525252526, -10.757575757575758, 8.906422717743473, 0.2784090909090909,
         -0.2735313036020583],
        [0.09114583333333333, 0.0, 0.44923629829290207, 0.6510416666666666,
         -0.322376179245283, 0.13095238095238096],
    ],
    b=[0.09114583333333333, 0.0, 0.44923629829290207, 0.6510416666666666,
       -0.322376179245283, 0.13095238095238096, 0.0],
    order=5,
    # = -(OrdinaryDiffEq btilde1..btilde7)
    b_error=[0.0012326388888888888, 0.0, -0.0042527702905061394, 0.03697916666666667,
             -0.05086379716981132, 0.0419047619047619, -0.025],
    error_order=4,
    fsal=True,
    dense=[
        [1.0, -2.8535800653862835, 3.0717434641059005, -1.1270175653862835],
        [0.0, 0.0, 0.0, 0.0],
        [0.0, 4.023133379230305, -6.249321565289, 2.675424484351598],
        [0.0, -3.7324019615885042, 10.068970589843675, -5.685526961588504],
        [0.0, 2.5548038301849423, -6.399112377351017, 3.5219323679207912],
        [0.0, -1.3744241142186024, 3.272657752246729, -1.7672812570757455],
        [0.0, 1.3824689317781436, -3.764937863556287, 2.382468931778144],
    ],
    dense_order=4,
    stability_size=3.3066,
    stiffness_pair=(5, 6),
    source=f"{_ODE} lib/OrdinaryDiffEqLowOrderRK/src/low_order_rk_tableaus.jl "
    "(DP5ConstantCacheActual + DP5_dense_ds, Float64 branch); dense form from "
    "lib/OrdinaryDiffEqLowOrderRK/src/interpolants.jl (dp5pre0)",
    beta1=0.17,  # beta1_default(DP5) = 1/5 - 3*beta2/4
    beta2=0.04,  # beta2_default(DP5) = 4//100
)

# ---------------------------------------------------------------------------------------------
# Tsit5: Tsitouras 5(4), FSAL (b = 7th row of a, b_7 = 0).
# lib/OrdinaryDiffEqTsit5/src/tsit_tableaus.jl (Tsit5ConstantCacheActual, Tsit5Interp).
# OrdinaryDiffEq: b_hat = [0.09468075576583945, 0.009183565540343254, 0.4877705284247616,
#   1.234297566930479, -2.7077123499835256, 1.866628418170587, 1/66], btilde = b_hat - b.
# Dense: b_i(θ) = r_i1 θ + r_i2 θ² + r_i3 θ³ + r_i4 θ⁴ (r_i1 = 0 for i > 1).
# ---------------------------------------------------------------------------------------------
TSIT5 = ButcherTableau(
    name="Tsit5",
    c=[0.0, 0.161, 0.327, 0.9, 0.9800255409045097, 1.0, 1.0],
    a=[
        [],
        [0.161],
        [-0.008480655492356989, 0.335480655492357],
        [2.8971530571054935, -6.359448489975075, 4.3622954328695815],
        [5.325864828439257, -11.748883564062828, 7.4955393428898365, -0.09249506636175525],
        [5.86145544294642, -12.92096931784711, 8.159367898576159, -0.071584973281401,
         -0.028269050394068383],
        [0.09646076681806523, 0.01, 0.4798896504144996, 1.379008574103742,
         -3.290069515436081, 2.324710524099774],
    ],
    b=[0.09646076681806523, 0.01, 0.4798896504144996, 1.379008574103742,
       -3.290069515436081, 2.324710524099774, 0.0],
    order=5,
    # = -(OrdinaryDiffEq btilde1..btilde7)
    b_error=[0.00178001105222577714, 0.0008164344596567469, -0.007880878010261995,
             0.1447110071732629, -0.5823571654525552, 0.45808210592918697,
             -0.015151515151515152],
    error_order=4,
    fsal=True,
    dense=[
        [1.0, -2.763706197274826, 2.9132554618219126, -1.0530884977290216],
        [0.0, 0.13169999999999998, -0.2234, 0.1017],
        [0.0, 3.9302962368947516, -5.941033872131505, 2.490627285651253],
        [0.0, -12.411077166933676, 30.33818863028232, -16.548102889244902],
        [0.0, 37.50931341651104, -88.1789048947664, 47.37952196281928],
        [0.0, -27.896526289197286, 65.09189467479366, -34.87065786149661],
        [0.0, 1.5, -4.0, 2.5],
    ],
    dense_order=4,
    stability_size=3.5068,
    stiffness_pair=(5, 6),
    source=f"{_ODE} lib/OrdinaryDiffEqTsit5/src/tsit_tableaus.jl "
    "(Tsit5ConstantCacheActual + Tsit5Interp, Float64 branch)",
)

# ---------------------------------------------------------------------------------------------
# Vern7: Verner's "most efficient" 7(6), 10 stages, not FSAL. Stages 9 and 10 are both at
# t + h; stage 10 only feeds the error estimate (b_10 = 0, b_hat_2 = b_hat_3 = b_hat_8 =
# b_hat_9 = 0). lib/OrdinaryDiffEqVerner/src/verner_tableaus.jl (Vern7Tableau, Float64 branch).
# Here OrdinaryDiffEq's btilde already is b - b_hat; copied unchanged.
#
# Dense output: Verner's 7th-order continuous extension with six lazy stages k11..k16
# (OrdinaryDiffEq's Vern7ExtraStages, evaluated on demand in verner_addsteps.jl
# `_ode_addsteps!(…, ::Vern7Cache)`), all six needed by the order-7 interpolant. Stage 11 is at
# c = 1 with the weights b (it is f(t1, y1) up to rounding, but OrdinaryDiffEq evaluates it as a
# stage with its own a-row, and so do we). Extra stage rows use k1, k4..k9 and the earlier extra
# stages; k2, k3 and k10 never enter. The interpolant (interpolants.jl, vern7pre0) is
#   y(t0 + θh) = y0 + h Σ_i b_i(θ) k_i,  b_1(θ) = Σ_{m=1..7} r01m θ^m,  b_i(θ) = Σ_{m=2..7} rim θ^m
# for i ∈ {4..9, 11..16}, and b_2 = b_3 = b_10 = 0. Coefficients: the Float64 (CompiledFloats)
# branch of Vern7ExtraStages and Vern7InterpolationCoefficients in verner_tableaus.jl.
# ---------------------------------------------------------------------------------------------
VERN7 = ButcherTableau(
    name="Vern7",
    c=[0.0, 0.005, 0.10888888888888888, 0.16333333333333333, 0.4555, 0.6095094489978381,
       0.884, 0.925, 1.0, 1.0],
    a=[
        [],
        [0.005],
        [-1.07679012345679, 1.185679012345679],
        [0.04083333333333333, 0.0, 0.1225],
        [0.6389139236255726, 0.0, -2.455672638223657, 2.272258714598084],
        [-2.6615773750187572, 0.0, 10.804513886456137, -8.3539146573962, 0.820487594956657],
        [6.067741434696772, 0.0, -24.711273635911088, 20.427517930788895,
         -1.9061579788166472, 1.006172249242068],
        [12.054670076253203, 0.0, -49.75478495046899, 41.142888638604674,
         -4.461760149974004, 2.042334822239175, -0.09834843665406107],
        [10.138146522881808, 0.0, -42.6411360317175, 35.76384003992257,
         -4.3480228403929075, 2.0098622683770357, 0.3487490460338272,
         -0.27143900510483127],
        [-45.030072034298676, 0.0, 187.3272437654589, -154.02882369350186,
         18.56465306347536, -7.141809679295079, 1.3088085781613787, 0.0, 0.0],
    ],
    b=[0.04715561848627222, 0.0, 0.0, 0.25750564298434153, 0.26216653977412624,
       0.15216092656738558, 0.4939969170032485, -0.29430311714032503,
       0.08131747232495111, 0.0],
    order=7,
    b_error=[0.002547011879931045, 0.0, 0.0, -0.00965839487279575, 0.04206470975639691,
             -0.0666822437469301, 0.2650097464621281, -0.29430311714032503,
             0.08131747232495111, -0.02029518466335628],
    error_order=6,
    fsal=False,
    # Vern7ExtraStages (c11..c16; a-rows over k1..k10, then the earlier extra stages).
    extra_c=[1.0, 0.29, 0.125, 0.25, 0.53, 0.79],
    extra_a=[
        # a1101, 0, 0, a1104 … a1109, 0
        [0.04715561848627222, 0.0, 0.0, 0.25750564298434153, 0.2621665397741262,
         0.15216092656738558, 0.49399691700324844, -0.29430311714032503, 0.0813174723249511, 0.0],
        # a1201, 0, 0, a1204 … a1209, 0, a1211
        [0.0523222769159969, 0.0, 0.0, 0.22495861826705715, 0.017443709248776376,
         -0.007669379876829393, 0.03435896044073285, -0.0410209723009395, 0.025651133005205617, 0.0,
         -0.0160443457],
        # a1301, 0, 0, a1304 … a1309, 0, a1311, a1312
        [0.053053341257859085, 0.0, 0.0, 0.12195301011401886, 0.017746840737602496,
         -0.0005928372667681495, 0.008381833970853752, -0.01293369259698612, 0.009412056815253861, 0.0,
         -0.005353253107275676, -0.06666729992455811],
        # a1401, 0, 0, a1404 … a1409, 0, a1411, a1412, a1413
        [0.03887903257436304, 0.0, 0.0, -0.0024403203308301317, -0.0013928917214672623,
         -0.00047446291558680135, 0.00039207932413159514, -0.00040554733285128004,
         0.00019897093147716726, 0.0, -0.00010278198793179169, 0.03385661513870267,
         0.1814893063199928],
        # a1501, 0, 0, a1504 … a1509, 0, a1511, a1512, a1513, 0
        [0.05723681204690013, 0.0, 0.0, 0.22265948066761182, 0.12344864200186899,
         0.04006332526666491, -0.05269894848581452, 0.04765971214244523, -0.02138895885042213, 0.0,
         0.015193891064036402, 0.12060546716289655, -0.022779423016187374, 0.0],
        # a1601, 0, 0, a1604 … a1609, 0, a1611, a1612, a1613, 0, 0
        [0.051372038802756814, 0.0, 0.0, 0.5414214473439406, 0.350399806692184,
         0.14193112269692182, 0.10527377478429423, -0.031081847805874016, -0.007401883149519145, 0.0,
         -0.006377932504865363, -0.17325495908361865, -0.18228156777622026, 0.0, 0.0],
    ],
    # Vern7InterpolationCoefficients: row i holds the coefficients of θ¹ … θ⁷ in b_i(θ).
    dense=[
        [1.0, -8.413387198332767, 33.675508884490895, -70.80159089484886, 80.64695108301298,
         -47.19413969837522, 11.133813442539243],                                      # r011 … r017
        [0.0] * 7,
        [0.0] * 7,
        [0.0, 8.754921980674396, -88.4596828699771, 346.9017638429916, -629.2580030059837,
         529.6773755604193, -167.35886986514018],                                      # r042 … r047
        [0.0, 8.913387586637922, -90.06081846893218, 353.1807459217058, -640.6476819744374,
         539.2646279047156, -170.38809442991547],                                      # r052 … r057
        [0.0, 5.1733120298478, -52.271115900055385, 204.9853867374073, -371.8306118563603,
         312.9880934374529, -98.89290352172495],                                       # r062 … r067
        [0.0, 16.79537744079696, -169.70040000059728, 665.4937727009246, -1207.1638892336007,
         1016.1291515818546, -321.06001557237494],                                     # r072 … r077
        [0.0, -10.005997536098665, 101.1005433052275, -396.47391512378437, 719.1787707014183,
         -605.3681033918824, 191.27439892797935],                                      # r082 … r087
        [0.0, 2.764708833638599, -27.934602637390462, 109.54779186137893, -198.7128113064482,
         167.26633571640318, -52.85010499525706],                                      # r092 … r097
        [0.0] * 7,
        [0.0, -2.1696320280163506, 22.016696037569876, -86.90152427798948, 159.22388973861476,
         -135.9618306534588, 43.792401183280006],                                      # r112 … r117
        [0.0, -4.890070188793804, 22.75407737425176, -30.78034218537731, -2.797194317207249,
         31.369456637508403, -15.655927320381801],                                     # r122 … r127
        [0.0, 10.862170929551967, -50.542971417827104, 68.37148040407511, 6.213326521632409,
         -69.68006323194157, 34.776056794509195],                                      # r132 … r137
        [0.0, -11.37286691922923, 130.79058078246717, -488.65113677785604, 832.2148793276441,
         -664.7743368554426, 201.79288044241662],                                      # r142 … r147
        [0.0, -5.919778732715007, 63.27679965889219, -265.432682088738, 520.1009254140611,
         -467.412109533902, 155.3868452824017],                                        # r152 … r157
        [0.0, -10.492146197961823, 105.35538525188011, -409.43975011988937, 732.831448907654,
         -606.3044574733512, 188.0495196316683],                                       # r162 … r167
    ],
    dense_order=7,
    stability_size=4.64,
    stiffness_pair=(8, 9),
    source=f"{_ODE} lib/OrdinaryDiffEqVerner/src/verner_tableaus.jl (Vern7Tableau, Vern7ExtraStages, "
    "Vern7InterpolationCoefficients, Float64 branch); lazy stages as verner_addsteps.jl, "
    "interpolant as interpolants.jl (vern7pre0)",
)

EXPLICIT_TABLEAUS = {
    "Euler": EULER,
    "Midpoint": MIDPOINT,
    "Heun": HEUN,
    "RK4": RK4,
    "BS3": BS3,
    "DP5": DP5,
    "Tsit5": TSIT5,
    "Vern7": VERN7,
}

__all__ = ["EXPLICIT_TABLEAUS", "EULER", "MIDPOINT", "HEUN", "RK4", "BS3", "DP5", "TSIT5", "VERN7"]
