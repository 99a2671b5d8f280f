"""Batched LU factorisations of the stiff methods' matrices (B, n, n), with the singular fallback.

A sample whose matrix is singular is factored as the identity instead (its ``ok`` is False), so
that nothing in the graph, forward or backward, becomes non-finite; the method turns that sample's
proposal into NaN and the loop rejects it.

Three implementations of one contract: ``factor(M)`` returns factors with ``.solve(r)``, ``.ok`` and
``.detach()``:

- LAPACK (``torch.linalg.lu_factor_ex`` / ``lu_solve``): every size and device, eager or compiled.
- native_lu.py's C kernels, on the CPU for n ≤ ``NATIVE_MAX_N`` where a C compiler is at hand:
  one call per factorisation and per solve for the whole batch, with the batch as the vectorised
  inner loop, where LAPACK makes one call per matrix (3× faster factorisation, 3.5× faster solves
  for 256 systems of 20).
- Unrolled Gaussian elimination with partial pivoting, on one (B,) tensor per matrix entry. Used
  inside a compiled graph for n ≤ ``UNROLLED_MAX_N``: there the whole factorisation and every solve
  become pointwise arithmetic that inductor fuses with the step's other kernels, where LAPACK
  costs one ``lu_factor_ex`` and one ``lu_solve`` per stage, each a separate call with its own
  pivot checks (~30 µs for a 2×2 system). A compiled Rodas5P step on VDPOL (n = 2) went from ~490
  to ~330 µs. The pivot choice is LAPACK's (the first entry of largest magnitude), so the factors
  agree with LAPACK's to rounding.
"""
from __future__ import annotations

from typing import List, NamedTuple

import torch
import torch.autograd.forward_ad as forward_ad

from . import native_lu

# Above this size the unrolled code (~n³ pointwise operations) compiles slowly and no longer beats
# LAPACK's calls. Compiled Rodas5P steps, one sample of a stiff nonlinear system (2026-12-03):
# n = 4: 260 µs unrolled against 520 µs with LAPACK; n = 6: even; n = 8: 385 against 312 µs, with
# four times the compilation time.
UNROLLED_MAX_N = 4


# Above this size LAPACK's blocked factorisation wins, first for small batches. Factor + 2 solves,
# one thread (2026-12-06, a busy machine): B = 1: n = 32 86 µs native against 125 µs LAPACK, n = 64
# 427 against 208 µs; B = 256: n = 8 59 against 595 µs, n = 32 4.3 against 5.0 ms.
NATIVE_MAX_N = 32


class LapackLU(NamedTuple):
    LU: torch.Tensor      # (B, n, n)
    piv: torch.Tensor     # (B, n)
    ok: torch.Tensor      # (B,) bool

    def solve(self, r: torch.Tensor) -> torch.Tensor:
        """M⁻¹ r for r (B, n)."""
        return torch.linalg.lu_solve(self.LU, self.piv, r[..., None])[..., 0]

    def detach(self) -> "LapackLU":
        return LapackLU(self.LU.detach(), self.piv, self.ok)


class UnrolledLU(NamedTuple):
    L: List[List[torch.Tensor]]       # L[i][j] for j < i: the multipliers, each (B,)
    U: List[List[torch.Tensor]]       # U[i][j] for j ≥ i, each (B,)
    pivots: List[torch.Tensor]        # pivots[k]: the row swapped with row k at column k, (B,) long
    ok: torch.Tensor                  # (B,) bool

    def solve(self, r: torch.Tensor) -> torch.Tensor:
        x = list(r.unbind(-1))
        n = len(x)
        for k, p in enumerate(self.pivots):   # P r, in the order the rows were swapped
            for i in range(k + 1, n):
                swap = p == i
                x[k], x[i] = torch.where(swap, x[i], x[k]), torch.where(swap, x[k], x[i])
        for i in range(n):                    # L z = P r (unit lower)
            for j in range(i):
                x[i] = x[i] - self.L[i][j] * x[j]
        for i in reversed(range(n)):          # U x = z
            for j in range(i + 1, n):
                x[i] = x[i] - self.U[i][j] * x[j]
            x[i] = x[i] / self.U[i][i]
        return torch.stack(x, -1)

    def detach(self) -> "UnrolledLU":
        d = lambda rows: [[v.detach() for v in row] for row in rows]  # noqa: E731
        return UnrolledLU(d(self.L), d(self.U), self.pivots, self.ok)


def prepare(device: torch.device) -> None:
    """Build or load the native library now, outside any compiled graph: tracing its file-system
    calls would break the graph (engine.build_method calls this for the stiff methods)."""
    if torch.device(device).type == "cpu":
        native_lu.library()


def factor(M: torch.Tensor):
    """LU factors of M (B, n, n): unrolled inside a compiled graph for small n, else native on the
    CPU where it could be built, else LAPACK."""
    if M.shape[-1] <= UNROLLED_MAX_N and torch.compiler.is_compiling():
        return _unrolled(M)
    # (Forward-mode AD: the native ops have no tangent rule, so dual numbers go through LAPACK.)
    if M.shape[-1] <= NATIVE_MAX_N and native_lu.available(M) and forward_ad._current_level < 0:
        return native_lu.factor(M)
    return _lapack(M)


def factor_shifted(J: torch.Tensor, scale: torch.Tensor):
    """LU factors of I − scale·J for J (B, n, n) and scale (B,): the stiff methods' matrix."""
    eye = torch.eye(J.shape[-1], dtype=J.dtype, device=J.device)
    return factor(eye - scale[:, None, None] * J)


def _lapack(M: torch.Tensor) -> LapackLU:
    n = M.shape[-1]
    LU, piv, info = torch.linalg.lu_factor_ex(M)
    ok = info == 0
    eye = torch.eye(n, dtype=M.dtype, device=M.device)
    LU = torch.where(ok[:, None, None], LU, eye)
    piv = torch.where(ok[:, None], piv, torch.arange(1, n + 1, dtype=piv.dtype, device=piv.device))
    return LapackLU(LU, piv, ok)


def _unrolled(M: torch.Tensor) -> UnrolledLU:
    n = M.shape[-1]
    a = [list(row.unbind(-1)) for row in M.unbind(-2)]
    pivots = []
    for k in range(n):
        # LAPACK's choice: the first row (from k) whose entry in column k has the largest magnitude
        best, p = a[k][k].abs(), torch.full_like(a[k][k], k, dtype=torch.long)
        for i in range(k + 1, n):
            bigger = a[i][k].abs() > best
            best, p = torch.where(bigger, a[i][k].abs(), best), torch.where(bigger, i, p)
        for i in range(k + 1, n):
            swap = p == i
            for j in range(n):
                a[k][j], a[i][j] = torch.where(swap, a[i][j], a[k][j]), torch.where(swap, a[k][j], a[i][j])
        pivots.append(p)
        # A zero pivot (singular sample) divides by 1: its factors are discarded below, and a
        # division by zero would make even the discarded branch's gradient NaN.
        pivot = torch.where(a[k][k] == 0, torch.ones_like(a[k][k]), a[k][k])
        for i in range(k + 1, n):
            a[i][k] = a[i][k] / pivot
            for j in range(k + 1, n):
                a[i][j] = a[i][j] - a[i][k] * a[k][j]
    ok = torch.stack([a[i][i] != 0 for i in range(n)], -1).all(-1)
    # Singular samples: the identity (no swaps, L = 0, U = I), as the LAPACK path does.
    one, zero = torch.ones_like(a[0][0]), torch.zeros_like(a[0][0])
    L = [[torch.where(ok, a[i][j], zero) for j in range(i)] for i in range(n)]
    U = [[None] * i + [torch.where(ok, a[i][j], one if i == j else zero) for j in range(i, n)] for i in range(n)]
    pivots = [torch.where(ok, p, k) for k, p in enumerate(pivots)]
    return UnrolledLU(L, U, pivots, ok)
