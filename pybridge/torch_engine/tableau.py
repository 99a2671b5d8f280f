"""Butcher tableaus as plain data, stepped by the one generic routine in ``explicit_rk.py``; and
``combine``, the weighted sums of stages that the Runge–Kutta-type routines share."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass(frozen=True)
class ButcherTableau:
    """An explicit Runge–Kutta method.

    ``a[i]`` holds the i coefficients of stage i (row 0 is empty). The step is
    ``y1 = y0 + h * sum_i b[i] k[i]`` and the local error vector ``h * sum_i b_error[i] k[i]``
    (``b_error = b - b_hat``, OrdinaryDiffEq's ``btilde``). ``dense[i]`` holds the polynomial
    coefficients of stage i's interpolation weight, ``b_i(θ) = sum_m dense[i][m] θ^(m+1)``, so that
    ``y(t0 + θh) = y0 + h * sum_i b_i(θ) k[i]``; ``None`` means cubic Hermite on (y0, f0, y1, f1).
    Lazy stages (OrdinaryDiffEq's "extra stages" of the Verner interpolants): ``extra_c[j]`` and
    ``extra_a[j]`` (``s + j`` entries: over the s stages of the step, then the earlier extra
    stages) define stage ``s + j``, evaluated only when the interpolant is needed,
    ``k[s+j] = f(t0 + extra_c[j] h, y0 + h * sum_i extra_a[j][i] k[i])``; ``dense`` then has one row
    per stage, extra ones included.
    ``stiffness_pair = (i, j)`` names the two stages whose difference estimates the dominant
    eigenvalue, ``|k_j - k_i| / |g_j - g_i|`` with g the stages' arguments; index ``s`` (one past
    the last stage) stands for the evaluation f(t1, y1) that starts the next step.
    """

    name: str
    c: Sequence[float]
    a: Sequence[Sequence[float]]
    b: Sequence[float]
    order: int
    b_error: Optional[Sequence[float]] = None
    error_order: Optional[int] = None
    fsal: bool = False
    dense: Optional[Sequence[Sequence[float]]] = None
    dense_order: int = 3
    extra_c: Sequence[float] = ()
    extra_a: Sequence[Sequence[float]] = ()
    stability_size: float = float("nan")
    stiffness_pair: tuple = (0, 1)
    source: str = ""
    # PI-controller exponents; None means OrdinaryDiffEq's default 7/(10p), 2/(5p).
    beta1: Optional[float] = None
    beta2: Optional[float] = None

    @property
    def stages(self) -> int:
        return len(self.c)

    @property
    def extra_stages(self) -> int:
        """Lazy stages the interpolant needs on top of the step's own (0 for most methods)."""
        return len(self.extra_c)

    @property
    def adaptive(self) -> bool:
        return self.b_error is not None


class StageWeights:
    """The weights of stage sums, kept in both forms `combine` uses: a tensor for the eager product
    and Python floats for the compiled chain of multiply-adds. `weights` is one row of floats (one
    sum; tensor (j,)) or a list of rows (several sums at once; tensor (j, m), one column per row)."""

    def __init__(self, weights, dtype: torch.dtype, device: torch.device):
        several = len(weights) > 0 and isinstance(weights[0], (list, tuple))
        self.values = [[float(x) for x in row] for row in weights] if several else [float(x) for x in weights]
        tensor = torch.tensor(self.values, dtype=dtype, device=device)
        self.tensor = tensor.T if several else tensor


def combine(terms, weights: StageWeights, stacked=None):
    """Σ_j weights[j] · terms[j] for a list of (B, n) tensors (`stacked`: them as (B, n, j), if at hand).

    Eagerly, one stacked matrix-vector product: the fewest dispatched ops. Inside a compiled graph,
    a chain of multiply-adds that inductor fuses into the step's vectorised pointwise kernels: its
    code for the stacked product's short reduction is slower (7 stages of a (256, 20) batch: 108
    against 49 µs per call, 2026-12-03). Zero weights are kept, so that a non-finite term poisons
    the result in both forms alike."""
    if torch.compiler.is_compiling():
        return _chain(terms, weights.values)
    return (torch.stack(terms, -1) if stacked is None else stacked) @ weights.tensor


def combine_rows(terms, weights: StageWeights, stacked=None):
    """The sums of ``combine`` for several weight rows at once (a method's solution and error
    weights), as a tuple."""
    if torch.compiler.is_compiling():
        return tuple(_chain(terms, row) for row in weights.values)
    return ((torch.stack(terms, -1) if stacked is None else stacked) @ weights.tensor).unbind(-1)


def _chain(terms, values):
    out = values[0] * terms[0]
    for w, x in zip(values[1:], terms[1:]):
        out = out + w * x
    return out
