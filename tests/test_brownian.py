"""Statistical and structural tests of the virtual Brownian tree.

Statistical checks use 5-standard-error bounds on fixed seeds, so they are deterministic.
"""
import math

import numpy as np
import pytest
import torch

from pybridge.torch_engine.brownian import VirtualBrownianTree, _mix, _mix_py, _s64

N = 8000  # samples for the statistical tests
Z = 5.0  # standard errors allowed


def _check_mean_var(x, var, z=Z):
    x = x.double().flatten()
    n = x.numel()
    assert abs(x.mean().item()) < z * math.sqrt(var / n)
    assert abs(x.var().item() - var) < z * var * math.sqrt(2.0 / (n - 1))


def _corr(x, y):
    return torch.corrcoef(torch.stack([x.double().flatten(), y.double().flatten()]))[0, 1].item()


@pytest.fixture(scope="module")
def bm():
    return VirtualBrownianTree(0.0, 2.0, (N, 2), seed=1)


@pytest.fixture(scope="module")
def bml():
    return VirtualBrownianTree(-1.0, 3.0, (N, 2), seed=2, levy_area=True)


def test_hash_matches_uint64_reference():
    # torch int64 multiply must wrap exactly like uint64 arithmetic
    vals = [0, 1, 2**31 - 1, 2**32, 2**63 - 1, 2**64 - 1, 0x123456789ABCDEF0, 0xDEADBEEFCAFEBABE]
    got = _mix(torch.tensor([_s64(v) for v in vals], dtype=torch.int64)).tolist()
    assert got == [_s64(_mix_py(v)) for v in vals]
    a = np.array([v & (2**64 - 1) for v in vals], dtype=np.uint64)  # numpy uint64 as 2nd reference
    with np.errstate(over="ignore"):
        a = (a ^ (a >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        a = (a ^ (a >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        a = a ^ (a >> np.uint64(31))
    assert [_s64(int(v)) for v in a] == got


@pytest.mark.parametrize("s,t", [(0.0, 2.0), (0.3, 1.1), (0.5, 0.5 + 1e-3), (1.9999, 2.0)])
def test_increment_mean_variance(bm, s, t):
    _check_mean_var(bm(s, t), t - s)


def test_independent_increments(bm):
    a, b, c = bm(0.1, 0.7), bm(0.7, 1.3), bm(1.5, 1.6)
    for x, y in [(a, b), (a, c), (b, c)]:
        assert abs(_corr(x, y)) < Z / math.sqrt(x.numel())
    # covariance of overlapping increments: Cov(W(0,t1), W(0,t2)) = min(t1, t2)
    u, v = bm(0.0, 0.9), bm(0.0, 1.4)
    cov = ((u * v).mean() - u.mean() * v.mean()).item()
    assert abs(cov - 0.9) < Z * math.sqrt((0.9 * 1.4 + 0.9**2) / u.numel())


def test_dimensions_and_samples_independent(bm):
    w = bm(0.0, 2.0)
    assert abs(_corr(w[:, 0], w[:, 1])) < Z / math.sqrt(N)
    assert abs(_corr(w[0::2], w[1::2])) < Z / math.sqrt(w.numel() / 2)
    w4 = torch.stack([bm(k * 0.5, (k + 1) * 0.5) for k in range(4)])  # kurtosis ≈ 3 (Gaussian)
    w4 = w4 / math.sqrt(0.5)
    assert abs((w4**4).mean().item() - 3.0) < Z * math.sqrt(96.0 / w4.numel())


def test_additivity():
    bm = VirtualBrownianTree(0.0, 2.0, (256, 2), seed=1)
    bml = VirtualBrownianTree(-1.0, 3.0, (256, 2), seed=2, levy_area=True)
    for b in (bm, bml):
        s, t, u = -0.3 if b is bml else 0.2, 0.61, 1.77
        assert torch.allclose(b(s, u), b(s, t) + b(t, u), rtol=0, atol=1e-12)
        assert torch.allclose(b(s, u), b.evaluate(u) - b.evaluate(s), rtol=0, atol=1e-12)


def test_levy_area_chen_relation():
    bml = VirtualBrownianTree(-1.0, 3.0, (256, 2), seed=2, levy_area=True)
    s, t, u = -0.3, 0.61, 1.77
    w_su, h_su = bml.increment_and_area(s, u)
    w_st, h_st = bml.increment_and_area(s, t)
    w_tu, h_tu = bml.increment_and_area(t, u)
    a, b = t - s, u - t
    rhs = a * h_st + b * h_tu + 0.5 * (b * w_st - a * w_tu)
    assert torch.allclose((u - s) * h_su, rhs, rtol=0, atol=1e-12)


def test_reproducible_and_order_independent():
    mk = lambda seed: VirtualBrownianTree(0.0, 1.0, (64, 2), seed=seed, levy_area=True)  # noqa
    b1, b2 = mk(7), mk(7)
    x1 = [b1.increment_and_area(0.1, 0.4), b1.increment_and_area(0.55, 0.9)]
    x2 = [b2.increment_and_area(0.55, 0.9), b2.increment_and_area(0.1, 0.4)][::-1]
    for (w1, h1), (w2, h2) in zip(x1, x2):
        assert torch.equal(w1, w2) and torch.equal(h1, h2)
    assert torch.equal(b1(0.1, 0.4), x1[0][0])  # re-query after other queries: unchanged
    assert not torch.allclose(mk(8)(0.1, 0.4), x1[0][0])
    plain = VirtualBrownianTree(0.0, 1.0, (64, 2), seed=7)
    assert torch.equal(plain(0.1, 0.4), VirtualBrownianTree(0.0, 1.0, (64, 2), seed=7)(0.1, 0.4))
    # a sample's path depends on its index only, not on the batch size
    small = VirtualBrownianTree(0.0, 1.0, (8, 2), seed=7)
    assert torch.equal(small(0.1, 0.4), plain(0.1, 0.4)[:8])


def test_per_sample_times(bm):
    B = 16
    b = VirtualBrownianTree(0.0, 2.0, (B, 2), seed=1)
    s = torch.linspace(0.0, 1.0, B, dtype=torch.float64)
    t = s + torch.linspace(0.01, 0.9, B, dtype=torch.float64)
    w = b(s, t)
    for i in range(B):
        assert torch.equal(w[i], b(float(s[i]), float(t[i]))[i])
    # per-sample spans: sample i lives on [t0_i, t1_i]; increments still have variance t - s
    t0 = torch.linspace(-1.0, 1.0, N, dtype=torch.float64)
    t1 = t0 + torch.linspace(0.5, 4.0, N, dtype=torch.float64)
    bs = VirtualBrownianTree(t0, t1, (N, 2), seed=4, levy_area=True)
    s, t = t0 + 0.1, t0 + 0.1 + 0.4 * (t1 - t0)
    w, h = bs.increment_and_area(s, t)
    scale = (t - s).sqrt()[:, None]
    _check_mean_var(w / scale, 1.0)
    _check_mean_var(h / scale, 1.0 / 12)
    assert torch.allclose(bs(t0, t1), bs.evaluate(t1), atol=1e-12, rtol=0)


def test_reverse_query():
    M = 256
    bm = VirtualBrownianTree(0.0, 2.0, (M, 2), seed=1)
    bml = VirtualBrownianTree(-1.0, 3.0, (M, 2), seed=2, levy_area=True)
    assert torch.equal(bm(1.3, 0.2), -bm(0.2, 1.3))
    w, h = bml.increment_and_area(2.5, 0.1)
    w2, h2 = bml.increment_and_area(0.1, 2.5)
    assert torch.equal(w, -w2) and torch.equal(h, h2)
    s = torch.full((M,), 0.5, dtype=torch.float64)
    t = torch.where(torch.arange(M) % 2 == 0, 1.5, -0.5).double()  # mixed directions per sample
    w = bml(s, t)
    assert torch.equal(w[0::2], bml(0.5, 1.5)[0::2]) and torch.equal(w[1::2], -bml(-0.5, 0.5)[1::2])
    assert torch.equal(bm(0.7, 0.7), torch.zeros(M, 2, dtype=torch.float64))


@pytest.mark.parametrize("s,t", [(-1.0, 3.0), (0.2, 0.9), (0.99, 1.01), (1.0, 1.0 + 4.0 * 2**-21)])
def test_levy_area_distribution(bml, s, t):
    # H ~ N(0, h/12) independent of W ~ N(0, h); (0.99, 1.01) straddles the root midpoint,
    # the last interval is shorter than a leaf (depth 20 → leaf = 4 * 2^-20).
    h = t - s
    w, H = bml.increment_and_area(s, t)
    _check_mean_var(w, h)
    _check_mean_var(H, h / 12)
    assert abs(_corr(w, H)) < Z / math.sqrt(w.numel())


def test_levy_area_adjacent_intervals_independent(bml):
    w1, h1 = bml.increment_and_area(0.0, 0.8)
    w2, h2 = bml.increment_and_area(0.8, 1.3)
    for x, y in [(h1, h2), (h1, w2), (w1, h2)]:
        assert abs(_corr(x, y)) < Z / math.sqrt(x.numel())
    # implied iterated integral I_(1,0) = h (W/2 + H): variance h^3/3, covariance with W h^2/2
    hh = 0.8
    i10 = hh * (w1 / 2 + h1)
    _check_mean_var(i10, hh**3 / 3)
    cov = (i10 * w1).mean().item()
    assert abs(cov - hh**2 / 2) < Z * math.sqrt((hh**3 / 3 * hh + (hh**2 / 2) ** 2) / w1.numel())


def test_float32_matches_float64():
    kw = dict(shape=(4096, 2), seed=5, levy_area=True)
    b64 = VirtualBrownianTree(0.0, 10.0, dtype=torch.float64, **kw)
    b32 = VirtualBrownianTree(0.0, 10.0, dtype=torch.float32, **kw)
    for s, t in [(0.0, 10.0), (3.3, 3.4), (5.0 - 1e-4, 5.0 + 1e-4)]:
        w64, h64 = b64.increment_and_area(s, t)
        w32, h32 = b32.increment_and_area(s, t)
        assert w32.dtype == h32.dtype == torch.float32
        scale = math.sqrt(t - s)
        # same path; short intervals keep relative accuracy (no cancellation against W(t))
        assert (w32.double() - w64).abs().max().item() < 1e-4 * scale
        assert (h32.double() - h64).abs().max().item() < 1e-4 * scale
    w = VirtualBrownianTree(0.0, 1.0, (N, 2), seed=6, dtype=torch.float32)(0.25, 0.75)
    _check_mean_var(w, 0.5)


def test_tol_and_shapes():
    b = VirtualBrownianTree(0.0, 1.0, (5,), seed=0, tol=1e-3)
    assert b.depth == 10 and b(0.0, 1.0).shape == (5,)
    b0 = VirtualBrownianTree(0.0, 1.0, (3, 2), seed=0, tol=2.0, levy_area=True)  # depth 0 works
    w, h = b0.increment_and_area(0.2, 0.7)
    assert b0.depth == 0 and w.shape == h.shape == (3, 2) and torch.isfinite(h).all()
    # coarser trees agree with finer ones at their dyadic points (shared top of the tree)
    fine = VirtualBrownianTree(0.0, 1.0, (8, 2), seed=3, tol=2**-12)
    coarse = VirtualBrownianTree(0.0, 1.0, (8, 2), seed=3, tol=2**-6)
    assert torch.allclose(fine(0.25, 0.625), coarse(0.25, 0.625), atol=1e-12, rtol=0)
    with pytest.raises(ValueError):
        b(0.0, 1.5)
    with pytest.raises(ValueError):
        VirtualBrownianTree(1.0, 1.0, (2, 2))
    with pytest.raises(ValueError):
        VirtualBrownianTree(0.0, 1.0, (2, 2))(0.0, torch.zeros(3))
    with pytest.raises(ValueError):
        VirtualBrownianTree(0.0, 1.0, (2, 2)).increment_and_area(0.0, 1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_matches_cpu():
    for dtype in (torch.float64, torch.float32):
        kw = dict(shape=(512, 3), seed=9, levy_area=True, dtype=dtype)
        cpu = VirtualBrownianTree(0.0, 1.0, **kw)
        gpu = VirtualBrownianTree(0.0, 1.0, device="cuda", **kw)
        s = torch.rand(512, dtype=torch.float64)
        w, h = cpu.increment_and_area(s, s * 0.5 + 0.4)
        wg, hg = gpu.increment_and_area(s.cuda(), s.cuda() * 0.5 + 0.4)
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        assert torch.allclose(wg.cpu(), w, atol=tol, rtol=0)
        assert torch.allclose(hg.cpu(), h, atol=tol, rtol=0)


@pytest.mark.parametrize("levy", [False, True])
@pytest.mark.parametrize("B", [3, 64, 300])
def test_intervals_equal_single_queries(levy, B):
    """bm.intervals (one batched query, including the shared-point 'chain' path for consecutive
    intervals and the dyadic depth cut) gives exactly the values of one query per interval."""
    bm = VirtualBrownianTree(-1.0, 3.0, (B, 2), seed=9, levy_area=levy)
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.rand(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    per_sample = -1.0 + 4.0 * rand(41, B).sort(0).values
    grids = [-1.0 + 4.0 * torch.arange(65, dtype=torch.float64) / 64,  # dyadic: depth cut to 6 levels
             torch.linspace(-1.0, 3.0, 51, dtype=torch.float64), per_sample]
    for grid in grids:
        g2 = grid if grid.dim() == 2 else grid[:, None].expand(-1, B)
        cases = [(g2[:-1], g2[1:]),                            # a chain
                 (-1.0 + 4.0 * rand(17, B), -1.0 + 4.0 * rand(17, B))]  # arbitrary, some reversed
        for s, t in cases:
            W, H = bm.intervals(s, t, area=levy)
            assert W.shape == (s.shape[0], B, 2) and (H is None) != levy
            for k in range(s.shape[0]):
                if levy:
                    w, h = bm.increment_and_area(s[k], t[k])
                    assert torch.equal(W[k], w) and torch.equal(H[k], h)
                else:
                    assert torch.equal(W[k], bm(s[k], t[k]))


def test_intervals_shapes_and_errors():
    bm = VirtualBrownianTree(0.0, 1.0, (2,), seed=1, levy_area=True)  # unbatched: (K, m)
    s = torch.tensor([0.1, 0.2], dtype=torch.float64)
    W, H = bm.intervals(s, s + 0.05, area=True)
    assert W.shape == (2, 2) and torch.equal(W[1], bm(0.2, s[1] + 0.05))
    with pytest.raises(ValueError, match="levy_area=True"):
        VirtualBrownianTree(0.0, 1.0, (2, 2)).intervals(s, s, area=True)
    with pytest.raises(ValueError, match="interval times"):
        VirtualBrownianTree(0.0, 1.0, (2, 2)).intervals(torch.zeros(2, 3), torch.zeros(2, 3))


def test_dyadic_depth_cut_changes_only_rounding():
    """Queries whose points all lie on a coarse dyadic grid stop descending there (exact: below it the
    points sit on node edges); the values agree with the full descent to rounding, and deep
    non-dyadic queries are unaffected."""
    bm = VirtualBrownianTree(0.0, 1.0, (64, 2), seed=5, levy_area=True)
    full = VirtualBrownianTree(0.0, 1.0, (64, 2), seed=5, levy_area=True)
    full._query_depth = lambda r: full.depth  # the uncut descent
    for s, t in [(0.25, 0.5), (0.0, 2.0**-9), (3 * 2.0**-9, 4 * 2.0**-9), (0.0, 1.0)]:
        (w, h), (w0, h0) = bm.increment_and_area(s, t), full.increment_and_area(s, t)
        assert torch.allclose(w, w0, rtol=1e-12, atol=1e-14) and torch.allclose(h, h0, rtol=1e-10, atol=1e-14)
    depth = lambda *r: bm._query_depth(torch.tensor(r, dtype=torch.float64)[:, None])  # noqa: E731
    assert depth(0.25, 0.5 + 1e-9) == depth(0.25, 0.5 + 2.0**-21) == bm.depth
    assert depth(0.25, 0.375) == 3 and depth(0.0, 1.0) == 0 and depth(0.0, 2.0**-20) == 20


@pytest.mark.parametrize("levy", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_grid_intervals_dyadic_cells(levy, dtype):
    """Fixed-step grids of span/2^k are built breadth-first from the tree's nodes (grid_intervals);
    they agree with one query per interval to rounding, and other grids take the general route."""
    B = 5
    bm = VirtualBrownianTree(-1.0, 3.0, (B, 2), seed=2, levy_area=levy, dtype=dtype)
    tol = dict(rtol=0, atol=1e-13) if dtype == torch.float64 else dict(rtol=0, atol=1e-6)
    for k, j0, K in [(0, 0, 1), (3, 0, 8), (9, 37, 100), (20, 12345, 7)]:
        h = 4.0 * 2.0**-k
        s = -1.0 + h * torch.arange(j0, j0 + K, dtype=torch.float64)
        t = -1.0 + h * torch.arange(j0 + 1, j0 + K + 1, dtype=torch.float64)
        assert bm._as_dyadic_cells(s, t) == (k, j0, K)
        W, H = bm.grid_intervals(s, t, area=levy)
        assert W.shape == (K, B, 2) and W.dtype == dtype and (H is None) != levy
        for i in range(K):
            if levy:
                w, a = bm.increment_and_area(s[i], t[i])
                torch.testing.assert_close(H[i], a, **tol)
            else:
                w = bm(s[i], t[i])
            torch.testing.assert_close(W[i], w, **tol)
    # not cells of one level: uneven, misaligned, per-sample grids
    grid = -1.0 + 4.0 * torch.arange(9, dtype=torch.float64) / 8
    assert bm._as_dyadic_cells(grid[:-2] + 0.1, grid[1:-1] + 0.1) is None  # not dyadic
    assert bm._as_dyadic_cells(grid[:-2] + 0.25, grid[1:-1] + 0.25) is None  # dyadic, half a cell off
    assert bm._as_dyadic_cells(grid[[0, 1, 3]], grid[[1, 3, 4]]) is None
    assert bm._as_dyadic_cells(grid[1:-1:2], grid[3::2]) is None  # width 2 cells starting at odd cell
    per_sample = grid[:, None] + torch.linspace(0, 0.5, B, dtype=torch.float64)
    assert bm._as_dyadic_cells(per_sample[:-1].clamp(max=3.0), per_sample[1:].clamp(max=3.0)) is None
    W, _ = bm.grid_intervals(grid[:-2] + 0.1, grid[1:-1] + 0.1)
    assert torch.equal(W, bm.intervals(grid[:-2] + 0.1, grid[1:-1] + 0.1)[0])


def test_dyadic_cells_from_per_sample_rows():
    """The fixed-step loop passes its grid as (K, B) rows (expanded views, or equal columns): the
    cells are found from one column when the tree has one span, and every sample is still checked
    otherwise (a differing sample, or per-sample spans, take the general route)."""
    B = 4
    s = 0.5 * torch.arange(6, dtype=torch.float64)
    t = s + 0.5
    shared = VirtualBrownianTree(0.0, 4.0, (B, 2), seed=1)
    rows = [(s[:, None].expand(6, B), t[:, None].expand(6, B)),                  # stride 0
            (s[:, None].repeat(1, B), t[:, None].repeat(1, B))]                  # equal columns
    for rs, rt in rows:
        assert shared._as_dyadic_cells(rs, rt) == (3, 0, 6)
        W, _ = shared.grid_intervals(rs, rt)
        assert torch.equal(W, shared.grid_intervals(s, t)[0])
    odd = s[:, None].repeat(1, B)
    odd[2, 1] += 0.25
    assert shared._as_dyadic_cells(odd, t[:, None].repeat(1, B)) is None
    with pytest.raises(ValueError, match="outside"):
        shared._as_dyadic_cells(s[:, None].expand(6, B) + 4.0, t[:, None].expand(6, B) + 4.0)
    # per-sample spans: the same times are different cells for different samples
    spans = VirtualBrownianTree(torch.zeros(B), torch.tensor([4.0, 4.0, 8.0, 4.0]), (B, 2), seed=1)
    assert spans._as_dyadic_cells(*rows[0]) is None
    equal_spans = VirtualBrownianTree(torch.zeros(B), torch.full((B,), 4.0), (B, 2), seed=1)
    assert equal_spans._as_dyadic_cells(*rows[0]) == (3, 0, 6)
