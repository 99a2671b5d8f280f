"""Vern7's own 7th-order interpolant (OrdinaryDiffEq's lazy extra stages k11..k16).

Truth: y' = A y with A = Q B Qᵀ, B a decaying rotation plus a decay, so exp(At) = Q exp(Bt) Qᵀ in
closed form (torch.linalg.matrix_exp is only ~1e-11 accurate for some small ‖At‖: too coarse
to measure a 7th-order interpolant).
"""
from __future__ import annotations

import math

import pytest
import torch

import pybridge as pb
from pybridge.torch_engine.engine import build_method
from pybridge.torch_engine.explicit_rk import hermite

F64 = torch.float64
_Q = torch.linalg.qr(torch.tensor([[1.0, 0.3, -0.2], [0.4, 1.0, 0.5], [-0.3, 0.2, 1.0]], dtype=F64))[0]
_a, _w, _c = 0.1, 2.0, 0.7
A = _Q @ torch.tensor([[-_a, _w, 0.0], [-_w, -_a, 0.0], [0.0, 0.0, -_c]], dtype=F64) @ _Q.T
Y0 = torch.tensor([[1.0, 0.5, -0.3], [-0.4, 0.2, 0.9]], dtype=F64)


def expA(t: float, scale: float = 1.0):
    """exp(scale·A·t)."""
    t = scale * t
    e = math.exp(-_a * t)
    E = torch.tensor([[e * math.cos(_w * t), e * math.sin(_w * t), 0.0],
                      [-e * math.sin(_w * t), e * math.cos(_w * t), 0.0],
                      [0.0, 0.0, math.exp(-_c * t)]], dtype=F64)
    return _Q @ E @ _Q.T


def exact(y0, ts, scale=1.0):
    """(T, B, n) for ts (T,), or per-sample times ts (B, T)."""
    if ts.dim() == 2:
        return torch.stack([torch.stack([y0[b] @ expA(float(t), scale).T for t in ts[b]]) for b in range(len(y0))], 1)
    return torch.stack([y0 @ expA(float(t), scale).T for t in ts])


def f(t, y):
    return y @ A.T


def test_method_metadata():
    m = build_method(pb.Vern7(), F64, "cpu")
    assert m.extra_stages == 6 and m.interpolation_order == 7
    # The engine no longer steps onto save points for Vern7, nor for AutoVern7(Rodas5P()) (whose
    # stiff method has a 4th-order interpolant for its 5th order).
    assert not m.interpolation_order < m.order - 1
    auto = build_method(pb.AutoVern7(pb.Rodas5P()), F64, "cpu")
    assert auto.extra_stages == 6 and not auto.interpolation_order < auto.order - 1


def _single_step_errors(hs, with_hermite=False):
    out, herm = [], []
    y0 = Y0[:1]
    for h in hs:
        sol = pb.solve(pb.ODEProblem(f, y0, torch.tensor([0.0, h], dtype=F64)), pb.Vern7(), adaptive=False, dt=h,
                       dense=True)
        assert int(sol.stats.naccept) == 1
        tq = torch.linspace(0, h, 21, dtype=F64)[1:-1]
        truth = exact(y0, tq)
        out.append((sol(tq) - truth).abs().max().item())
        if with_hermite:
            d = sol._interpolant.data
            theta = (tq / h)[None]
            y1 = d["y1"][:, 0]
            vals = hermite(d["y0"][:, 0], y1, d["ks"][:, 0, 0], d["f1"][:, 0], d["h"][:, 0], theta)
            herm.append((vals.transpose(0, 1) - truth).abs().max().item())
    return out, herm


def _slope(hs, errs):
    x = torch.log(torch.tensor(hs, dtype=F64))
    y = torch.log(torch.tensor(errs, dtype=F64))
    x = x - x.mean()
    return float((x * (y - y.mean())).sum() / (x * x).sum())


def test_interpolant_order():
    """Local interpolation error of an order-7 interpolant is O(h^8) (measured slope ≈ 8.2)."""
    hs = [0.4, 0.28, 0.2, 0.14, 0.1]
    errs, herm = _single_step_errors(hs, with_hermite=True)
    slope, slope_h = _slope(hs, errs), _slope(hs, herm)
    assert 7.5 < slope < 8.5, (slope, errs)
    assert slope_h < 4.5 and slope > slope_h + 3, (slope_h, herm)
    assert max(errs) < 1e-6


def test_many_save_points_fewer_evaluations(monkeypatch):
    """200 save points at rtol 1e-10: accurate, with far fewer steps and evaluations than stepping
    onto every save point (what a Hermite-interpolating Vern7 had to do)."""
    t = torch.linspace(0, 10, 200, dtype=F64)
    prob = pb.ODEProblem(f, Y0[:1], t)
    sol = pb.solve(prob, pb.Vern7(), rtol=1e-10, atol=1e-10)
    err = (sol.ys - exact(Y0[:1], t)).abs().max().item()
    assert err < 1e-9, err
    # Before: interpolation_order 3 made the engine stop at save points.
    m = build_method(pb.Vern7(), F64, "cpu")
    monkeypatch.setattr(m, "interpolation_order", 3)
    before = pb.solve(prob, pb.Vern7(), rtol=1e-10, atol=1e-10)
    nfe, nfe_before = int(sol.stats.nfe), int(before.stats.nfe)
    assert int(sol.stats.naccept) < int(before.stats.naccept) // 2
    assert nfe < 0.7 * nfe_before, (nfe, nfe_before)   # measured 2272 vs 3992


def test_nfe_counts_lazy_stages():
    """Fixed steps of 0.25 on [0, 1] with save points inside steps 1 and 3 only: 6 lazy evaluations
    for each of those two steps; a save point on a step's end needs none."""
    t = torch.tensor([0.0, 0.1, 0.2, 0.5, 0.6, 1.0], dtype=F64)
    sol = pb.solve(pb.ODEProblem(f, Y0[:1], t), pb.Vern7(), adaptive=False, dt=0.25)
    assert int(sol.stats.naccept) == 4
    # 1 (f(t0)) + 4 steps × (9 stages + f(t1, y1)) + 2 steps × 6 lazy stages
    assert int(sol.stats.nfe) == 1 + 4 * 10 + 2 * 6
    assert torch.allclose(sol.ys, exact(Y0[:1], t), atol=1e-9)


@pytest.mark.parametrize("lockstep", [False, True])
def test_dense_output_accuracy(lockstep):
    sol = pb.solve(pb.ODEProblem(f, Y0, torch.tensor([0.0, 10.0], dtype=F64)), pb.Vern7(), rtol=1e-10, atol=1e-10,
                   dense=True, batch="lockstep" if lockstep else "independent")
    g = torch.Generator().manual_seed(3)
    tq = torch.sort(10 * torch.rand(60, generator=g, dtype=F64)).values
    err = (sol(tq) - exact(Y0, tq)).abs().max().item()
    assert err < 1e-9, err
    # A second call without gradients reuses the kept lazy stages and gives the same values.
    with torch.no_grad():
        a = sol(tq)
        b = sol(tq)
    assert torch.equal(a, b) and torch.allclose(a, sol(tq), rtol=0, atol=1e-15)


def test_batch_modes_per_sample_times():
    """Independent samples with their own time grids (and speeds), and a lockstep batch."""
    scale = torch.tensor([1.0, 2.5], dtype=F64)

    def g(t, y):
        return scale[:, None] * (y @ A.T)

    ts = torch.stack([torch.linspace(0, 4, 37, dtype=F64), torch.linspace(0.5, 3, 37, dtype=F64)])
    y0 = Y0
    sol = pb.solve(pb.ODEProblem(g, y0, ts), pb.Vern7(), rtol=1e-10, atol=1e-10, dense=True)
    truth = torch.stack([exact(y0[b:b + 1], ts[b] - ts[b, 0], scale=float(scale[b]))[:, 0] for b in range(2)], 1)
    assert (sol.ys - truth).abs().max().item() < 1e-9
    # Per-sample nfe differ (each sample's own steps and lazy stages).
    assert sol.stats.nfe[0] != sol.stats.nfe[1]
    tq = torch.stack([torch.linspace(0.1, 3.9, 11, dtype=F64), torch.linspace(0.6, 2.9, 11, dtype=F64)])
    dense_truth = torch.stack([exact(y0[b:b + 1], tq[b] - ts[b, 0], scale=float(scale[b]))[:, 0]
                               for b in range(2)], 1)
    assert (sol(tq) - dense_truth).abs().max().item() < 1e-9

    t = torch.linspace(0, 4, 37, dtype=F64)
    lock = pb.solve(pb.ODEProblem(f, y0, t), pb.Vern7(), rtol=1e-10, atol=1e-10, batch="lockstep", dense=True)
    assert (lock.ys - exact(y0, t)).abs().max().item() < 1e-9
    assert lock.stats.nfe[0] == lock.stats.nfe[1]


def test_gradcheck_through_interpolant():
    """Saved values between steps and sol(t) are differentiable (w.r.t. y0 and the matrix)."""
    t = torch.tensor([0.0, 0.3, 0.65, 1.0], dtype=F64)   # save points inside steps of 0.25
    tq = torch.tensor([0.1, 0.55, 0.9], dtype=F64)

    def run(y0, M):
        sol = pb.solve(pb.ODEProblem(lambda t, y: torch.tanh(y @ M.T), y0, t), pb.Vern7(), adaptive=False,
                       dt=0.25, dense=True)
        return sol.ys, sol(tq)

    y0 = torch.tensor([[0.3, -0.2]], dtype=F64, requires_grad=True)
    M = torch.tensor([[-0.5, 1.0], [-1.0, 0.2]], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(run, (y0, M))


def test_unbiased_probe_is_the_interpolant():
    """The local regularizer's probe state (Vern7: interpolated once after the loop) is sol(t_reg):
    the regularizer equals a hand-taken step from sol(t_reg)."""
    y0 = Y0[:1]
    sol = pb.solve(pb.ODEProblem(f, y0, torch.tensor([0.0, 3.0], dtype=F64)), pb.Vern7(), rtol=1e-9, atol=1e-9,
                   dense=True, local_regularizer="unbiased", seed=2)
    t_reg = sol.extras["t_reg"]
    assert 0 < float(t_reg) < 3
    u = sol(t_reg[:, None])[0].detach()
    assert torch.allclose(u, exact(y0, t_reg)[0], atol=1e-8)
    ref = pb.solve(pb.ODEProblem(f, u, torch.cat([t_reg, t_reg + 1])), pb.Vern7(), rtol=1e-9, atol=1e-9)
    first = ref.trace.eest[0, 0] * ref.trace.dt[0, 0]
    assert sol.local_regularizer.item() == pytest.approx(first.item(), rel=1e-6)


def test_autovern7_mixed_modes_interpolate_per_method():
    """AutoVern7: a stiff sample (switched to Rodas5P) beside a non-stiff one (Vern7 with its lazy
    stages) in one batch, save points between steps and sol(t), against exp(-λt)."""
    lam = torch.tensor([0.7, 3000.0], dtype=F64)
    y0 = torch.tensor([[1.0, -0.5], [0.8, 0.3]], dtype=F64)
    t = torch.linspace(0, 3, 41, dtype=F64)
    sol = pb.solve(pb.ODEProblem(lambda t, y: -lam[:, None] * y + 0.0 * y ** 2, y0, t), pb.AutoVern7(pb.Rodas5P()),
                   rtol=1e-8, atol=1e-10, dense=True)
    assert sol.success
    assert bool(sol.trace.method[1].any()) and not bool(sol.trace.method[0].any())
    truth = y0[None] * torch.exp(-lam[None, :, None] * t[:, None, None])
    assert (sol.ys[:, 0] - truth[:, 0]).abs().max() < 1e-8        # Vern7 + its interpolant
    assert (sol.ys[1:, 1] - truth[1:, 1]).abs().max() < 1e-6      # Rodas5P's interpolant (decayed)
    tq = torch.linspace(0.05, 2.95, 17, dtype=F64)
    dense_truth = y0[None] * torch.exp(-lam[None, :, None] * tq[:, None, None])
    assert (sol(tq)[:, 0] - dense_truth[:, 0]).abs().max() < 1e-8
