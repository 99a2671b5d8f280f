"""The batched small-matrix LU of small_lu.c, built with the system C compiler on first use.

torch.linalg's LU calls LAPACK once per matrix of the batch; for the stiff methods' many small
systems that is mostly call overhead. small_lu.c factors and solves the whole batch in loops that
run over the batch, so they vectorise. Compiled Rosenbrock step on the 20-species kinetics
benchmark, B = 256, one thread (2026-12-06): factorisation ~0.3 ms against ~1.0 ms, each solve
~35 against ~120 µs.

The library is built and loaded by native_build (once per machine, with the system C compiler).
Where there is no compiler, the build fails, or ``PYBRIDGE_NATIVE_LU=0`` (or ``PYBRIDGE_NATIVE=0``),
:func:`available` is False and the stiff methods use LAPACK: nothing but speed depends on this
module.

The two entry points are torch library ops, so a torch.compile'd step calls them as opaque kernels;
gradients come from :class:`Solve` (x = M⁻¹r: r̄ = M⁻ᵀx̄, M̄ = −r̄ xᵀ), itself differentiable.
"""
from __future__ import annotations

import ctypes
from pathlib import Path
from typing import NamedTuple

import torch

from .native_build import NativeLibrary

_SUFFIX = {torch.float64: "f64", torch.float32: "f32"}
_kernels = {}   # dtype -> (factor, solve) functions of the library


def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for dtype, suffix in _SUFFIX.items():
        factor_fn, solve_fn = getattr(lib, f"small_lu_factor_{suffix}"), getattr(lib, f"small_lu_solve_{suffix}")
        factor_fn.argtypes = [ptr, ptr, ptr, ptr, i64, i64]
        solve_fn.argtypes = [ptr, ptr, ptr, ptr, i64, i64, ctypes.c_int]
        _kernels[dtype] = (factor_fn, solve_fn)


_LIB = NativeLibrary(Path(__file__).with_name("small_lu.c"), "PYBRIDGE_NATIVE_LU", "the native batched LU",
                     "the stiff methods use LAPACK instead (slower for many small systems)", _declare)


def library():
    """The loaded library, building it on first use; None where it cannot be had."""
    return _LIB.get()


def available(M: torch.Tensor) -> bool:
    """Whether M (B, n, n) can be factored here: a CPU float32/float64 batch and a built library."""
    if not _LIB.tried and torch.compiler.is_compiling():
        return False   # (loading it here would break the graph: linear_solve.prepare loads it before)
    return M.device.type == "cpu" and M.dtype in _SUFFIX and M.dim() == 3 and library() is not None


# Plain library ops (torch.library.custom_op's wrappers cost ~12 µs more per call, ~30% of a solve).
_ops = torch.library.Library("pybridge", "DEF")
_ops.define("small_lu_factor(Tensor M) -> (Tensor, Tensor, Tensor)")
_ops.define("small_lu_solve(Tensor lu, Tensor piv, Tensor r, bool transpose) -> Tensor")


def _factor_cpu(M):
    """(lu (n, n, B), piv (n, B), ok (B,)) of M (B, n, n); a singular sample's factors are I's."""
    if M.dtype not in _kernels or M.dim() != 3:
        raise ValueError(f"the native LU takes float32/float64 batches (B, n, n) once its library is loaded; got "
                         f"{M.dtype} {tuple(M.shape)}" + ("" if _kernels else " (no library)"))
    B, n = M.shape[0], M.shape[-1]
    src = M.contiguous()
    lu = torch.empty((n, n, B), dtype=M.dtype)
    piv = torch.empty((n, B), dtype=torch.int64)
    ok = torch.empty(B, dtype=torch.bool)
    _kernels[M.dtype][0](src.data_ptr(), lu.data_ptr(), piv.data_ptr(), ok.data_ptr(), B, n)
    return lu, piv, ok


def _solve_cpu(lu, piv, r, transpose):
    """M⁻¹ r (or M⁻ᵀ r) for r (B, n), from the factors of M."""
    B, n = r.shape
    if r.dtype != lu.dtype or (n, B) != tuple(piv.shape):
        raise ValueError(f"small_lu_solve: r of dtype {r.dtype} and shape {tuple(r.shape)} does not match factors "
                         f"of dtype {lu.dtype} for a batch of {piv.shape[1]} systems of size {piv.shape[0]}")
    r = r.contiguous()
    x = torch.empty_like(r)
    _kernels[r.dtype][1](lu.data_ptr(), piv.data_ptr(), r.data_ptr(), x.data_ptr(), B, n, int(transpose))
    return x


_ops.impl("small_lu_factor", _factor_cpu, "CPU")
_ops.impl("small_lu_solve", _solve_cpu, "CPU")


@torch.library.register_fake("pybridge::small_lu_factor")
def _(M):
    B, n = M.shape[0], M.shape[-1]
    return M.new_empty((n, n, B)), M.new_empty((n, B), dtype=torch.int64), M.new_empty((B,), dtype=torch.bool)


@torch.library.register_fake("pybridge::small_lu_solve")
def _(lu, piv, r, transpose):
    return torch.empty_like(r)


small_lu_factor = torch.ops.pybridge.small_lu_factor.default
small_lu_solve = torch.ops.pybridge.small_lu_solve.default


class Solve(torch.autograd.Function):
    """x = M⁻¹ r (M⁻ᵀ r when transpose) with gradients for M and r, using M's factors."""

    @staticmethod
    def forward(M, lu, piv, ok, r, transpose):
        return small_lu_solve(lu, piv, r, transpose)

    @staticmethod
    def setup_context(ctx, inputs, output):
        M, lu, piv, ok, _, transpose = inputs
        ctx.save_for_backward(M, lu, piv, ok, output)
        ctx.transpose = transpose

    @staticmethod
    def backward(ctx, x_bar):
        M, lu, piv, ok, x = ctx.saved_tensors
        r_bar = Solve.apply(M, lu, piv, ok, x_bar, not ctx.transpose)
        # x = M⁻¹r: M̄ = −r̄ xᵀ; x = M⁻ᵀr: M̄ = −x r̄ᵀ. A singular sample's M was not used.
        outer = x[:, :, None] * r_bar[:, None, :] if ctx.transpose else r_bar[:, :, None] * x[:, None, :]
        M_bar = torch.where(ok[:, None, None], -outer, torch.zeros_like(outer))
        return M_bar, None, None, None, r_bar, None


class NativeLU(NamedTuple):
    M: torch.Tensor       # (B, n, n), kept for the gradient
    lu: torch.Tensor      # (n, n, B)
    piv: torch.Tensor     # (n, B)
    ok: torch.Tensor      # (B,) bool

    def solve(self, r: torch.Tensor) -> torch.Tensor:
        """M⁻¹ r for r (B, n)."""
        if torch.is_grad_enabled() and (self.M.requires_grad or r.requires_grad):
            return Solve.apply(self.M, self.lu, self.piv, self.ok, r, False)
        return small_lu_solve(self.lu, self.piv, r, False)

    def detach(self) -> "NativeLU":
        return NativeLU(self.M.detach(), self.lu, self.piv, self.ok)


def factor(M: torch.Tensor) -> NativeLU:
    """M's factors (B, n, n); only where available(M) (linear_solve.factor checks it)."""
    lu, piv, ok = small_lu_factor(M.detach())     # M's gradient comes from Solve
    return NativeLU(M, lu, piv, ok)
