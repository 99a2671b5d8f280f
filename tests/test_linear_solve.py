"""The stiff methods' batched LU (linear_solve.py): the unrolled factorisation used inside compiled
graphs agrees with LAPACK's (pivots, solutions, singular samples) and is differentiable."""
import pytest
import torch

from pybridge.torch_engine import linear_solve

SIZES = range(1, linear_solve.UNROLLED_MAX_N + 1)


def batch(n, B=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(B, n, n, dtype=torch.float64, generator=g) + 2 * torch.eye(n, dtype=torch.float64)
    M[1, :, 0] = (torch.arange(n) + 1.0) * 0.5  # the first column needs a row swap (n > 1)
    M[2] = 0                                    # singular
    M[3, n // 2] = 0                            # singular: a zero row
    return M


@pytest.mark.parametrize("n", SIZES)
def test_unrolled_lu_agrees_with_lapack(n):
    M = batch(n)
    r = torch.randn(M.shape[0], n, dtype=torch.float64)
    lapack, unrolled = linear_solve._lapack(M), linear_solve._unrolled(M)
    assert torch.equal(unrolled.ok, lapack.ok)
    assert not unrolled.ok[2] and not unrolled.ok[3] and unrolled.ok[[0, 1]].all()
    # The same row interchanges as LAPACK's partial pivoting (its pivots are 1-based).
    torch.testing.assert_close(torch.stack(unrolled.pivots, -1) + 1, lapack.piv.long(), rtol=0, atol=0)
    ok = lapack.ok
    expected = torch.linalg.solve(M[ok], r[ok])
    torch.testing.assert_close(unrolled.solve(r)[ok], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lapack.solve(r)[ok], expected, rtol=1e-12, atol=1e-12)
    # A singular sample is factored as the identity by both.
    torch.testing.assert_close(unrolled.solve(r)[~ok], r[~ok], rtol=0, atol=0)
    torch.testing.assert_close(lapack.solve(r)[~ok], r[~ok], rtol=0, atol=0)


@pytest.mark.parametrize("n", SIZES)
def test_unrolled_lu_gradients(n):
    M = batch(n, B=4)[[0, 1]].requires_grad_()
    r = torch.randn(2, n, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda M, r: linear_solve._unrolled(M).solve(r), (M, r))


def test_singular_sample_keeps_gradients_finite():
    M = batch(3, B=4).requires_grad_()
    r = torch.ones(4, 3, dtype=torch.float64)
    linear_solve._unrolled(M).solve(r).sum().backward()
    assert torch.isfinite(M.grad).all()
    assert (M.grad[2] == 0).all()


def test_factor_uses_lapack_outside_compiled_graphs():
    assert isinstance(linear_solve.factor(batch(2)), linear_solve.LapackLU)
    assert isinstance(linear_solve.factor(batch(linear_solve.UNROLLED_MAX_N + 1)), linear_solve.LapackLU)


def test_factor_unrolls_inside_compiled_graphs():
    def kind(M):
        return isinstance(linear_solve.factor(M), linear_solve.UnrolledLU)
    compiled = torch.compile(kind, backend="eager", fullgraph=True)
    assert compiled(batch(linear_solve.UNROLLED_MAX_N))
    assert not compiled(batch(linear_solve.UNROLLED_MAX_N + 1))
