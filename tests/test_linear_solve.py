"""The stiff methods' batched LU (linear_solve.py): the unrolled factorisation used inside compiled
graphs and the native C one agree with LAPACK's (pivots, solutions, singular samples) and are
differentiable."""
import shutil
import tempfile
import warnings

import pytest
import torch

from pybridge.torch_engine import linear_solve, native_lu

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


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler on this machine")
def test_native_lu_builds_where_there_is_a_compiler():
    assert native_lu.library() is not None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n", [1, 2, 5, 20])
def test_native_lu_agrees_with_lapack(n, dtype):
    M = batch(n).to(dtype)
    r = torch.randn(M.shape[0], n, dtype=dtype)
    lapack, native = linear_solve._lapack(M), native_lu.factor(M)
    assert torch.equal(native.ok, lapack.ok)
    assert not native.ok[2] and not native.ok[3] and native.ok[[0, 1]].all()
    ok = lapack.ok
    torch.testing.assert_close(native.piv.T[ok] + 1, lapack.piv.long()[ok], rtol=0, atol=0)
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    expected = torch.linalg.solve(M[ok], r[ok])
    torch.testing.assert_close(native.solve(r)[ok], expected, rtol=tol, atol=tol)
    torch.testing.assert_close(native.solve(r)[~ok], r[~ok], rtol=0, atol=0)   # the identity


@pytest.mark.parametrize("n", [1, 3, 6])
def test_native_lu_gradients(n):
    M = batch(n, B=4)[[0, 1]].requires_grad_()
    r = torch.randn(2, n, dtype=torch.float64, requires_grad=True)
    solve = lambda M, r: native_lu.factor(M).solve(r)  # noqa: E731
    assert torch.autograd.gradcheck(solve, (M, r))
    assert torch.autograd.gradgradcheck(solve, (M, r))


def test_native_singular_sample_keeps_gradients_finite():
    M = batch(5, B=4).requires_grad_()
    native_lu.factor(M).solve(torch.ones(4, 5, dtype=torch.float64)).sum().backward()
    assert torch.isfinite(M.grad).all()
    assert (M.grad[2] == 0).all() and (M.grad[3] == 0).all()


def test_factor_outside_compiled_graphs_is_native_on_the_cpu_else_lapack(monkeypatch):
    expected = native_lu.NativeLU if native_lu.library() is not None else linear_solve.LapackLU
    assert isinstance(linear_solve.factor(batch(2)), expected)
    assert isinstance(linear_solve.factor(batch(linear_solve.UNROLLED_MAX_N + 1)), expected)
    assert isinstance(linear_solve.factor(batch(3).to(torch.complex128)), linear_solve.LapackLU)
    assert isinstance(linear_solve.factor(batch(linear_solve.NATIVE_MAX_N + 1, B=4)), linear_solve.LapackLU)
    monkeypatch.setattr(native_lu._LIB, "_tried", False)
    monkeypatch.setenv("PYBRIDGE_NATIVE_LU", "0")
    assert isinstance(linear_solve.factor(batch(3)), linear_solve.LapackLU)


def test_a_failed_build_warns_and_falls_back_to_lapack(monkeypatch, tmp_path):
    monkeypatch.setattr(native_lu._LIB, "_tried", False)
    monkeypatch.setattr(native_lu._LIB, "_library", None)
    monkeypatch.setenv("PYBRIDGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")          # a "compiler" that always fails
    with pytest.warns(UserWarning, match="could not build the native batched LU"):
        assert isinstance(linear_solve.factor(batch(3)), linear_solve.LapackLU)
    with warnings.catch_warnings():
        warnings.simplefilter("error")           # warned once, not at every factorisation
        assert isinstance(linear_solve.factor(batch(3)), linear_solve.LapackLU)


def test_factor_unrolls_inside_compiled_graphs():
    def kind(M):
        return isinstance(linear_solve.factor(M), linear_solve.UnrolledLU)
    compiled = torch.compile(kind, backend="eager", fullgraph=True)
    assert compiled(batch(linear_solve.UNROLLED_MAX_N))
    assert not compiled(batch(linear_solve.UNROLLED_MAX_N + 1))


def test_an_unusable_cache_folder_falls_back_to_the_temporary_directory(monkeypatch, tmp_path):
    if shutil.which("cc") is None:
        pytest.skip("no C compiler on this machine")
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("")            # (the user's cache folder cannot be made under a file)
    monkeypatch.setattr(native_lu._LIB, "_tried", False)
    monkeypatch.setattr(native_lu._LIB, "_library", None)
    monkeypatch.delenv("PYBRIDGE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(not_a_folder))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native_lu.library() is not None
    assert list((tmp_path / "tmp").glob("pybridge-*/small_lu-*.so"))


def test_factors_refuse_a_right_hand_side_they_do_not_fit():
    """The native solve read float32 factors as float64 (past their end) and solved a batch of 1
    against factors of 4 without a word."""
    if native_lu.library() is None:
        pytest.skip("no native library on this machine")
    M = batch(5, B=4)
    with pytest.raises(ValueError, match="does not match factors of dtype torch.float32"):
        native_lu.factor(M.float()).solve(torch.ones(4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"shape \(1, 5\) does not match factors .* batch of 4 systems of size 5"):
        native_lu.factor(M).solve(torch.ones(1, 5, dtype=torch.float64))


def test_forward_mode_ad_through_a_stiff_solve():
    """Dual numbers through the native ops lost their tangents (the input tangent came back); under
    forward-mode AD the stiff methods use LAPACK, whose ops have tangent rules."""
    import pybridge as pb
    import torch.autograd.forward_ad as fwAD
    A = torch.tensor([[-50.0, 1.0], [0.5, -2.0]], dtype=torch.float64)
    v = torch.tensor([1.0, 0.0], dtype=torch.float64)
    with fwAD.dual_level():
        y0 = fwAD.make_dual(torch.ones(2, dtype=torch.float64), v)
        sol = pb.solve(pb.ODEProblem(lambda t, y: y @ A.T, y0, torch.tensor([0.0, 1.0], dtype=torch.float64)),
                       pb.Rodas5P(), rtol=1e-8, atol=1e-10)
        tangent = fwAD.unpack_dual(sol.ys[-1]).tangent
    torch.testing.assert_close(tangent, torch.linalg.matrix_exp(A) @ v, rtol=1e-6, atol=1e-9)
