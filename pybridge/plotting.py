"""Plotting helpers for a `Solution`: trajectories, step sizes and error estimates along the solve.

matplotlib is an optional dependency (`pip install "pybridge[plot]"`), imported only when a helper
is called. Every helper draws on the given `ax` (or a new figure's) and returns the Axes, so they
compose with ordinary matplotlib code:

    import pybridge.plotting as pbplot
    sol = pb.solve(prob, pb.Tsit5(), dense=True)
    fig = pbplot.plot_solution(sol)            # trajectories | step sizes | EEst, side by side
    pbplot.plot_step_sizes(sol, samples=[0, 3], ax=my_ax)

Shapes (see `Solution`): `sol.ys` is (T, *y0.shape); for a batched problem the first state
dimension is the batch B, the rest are flattened into components. `sol.trace` fields are (B, N)
(or (N,) unbatched) with a mask of accepted steps; padded entries are not drawn.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .solution import Solution

Indices = Optional[Union[int, Sequence[int]]]


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - exercised only without matplotlib
        raise ImportError("pybridge.plotting needs matplotlib: pip install 'pybridge[plot]' "
                          "(or pip install matplotlib)") from e
    return plt


def _axes(ax):
    if ax is not None:
        return ax
    plt = _pyplot()
    _, ax = plt.subplots()
    return ax


def _select(n: int, which: Indices, default_max: int, what: str) -> list:
    if which is None:
        return list(range(min(n, default_max)))
    idx = [which] if isinstance(which, int) else list(which)
    for i in idx:
        if not -n <= i < n:
            raise IndexError(f"{what} index {i} out of range for {n} {what}s")
    return [i % n for i in idx]


def _batched_view(sol: Solution):
    """ys as (T, B, n), times as (B, T), trace fields as (B, N)."""
    ys = sol.ys.detach()
    T = ys.shape[0]
    if sol.batched:
        B = ys.shape[1]
        ys = ys.reshape(T, B, -1)
    else:
        B = 1
        ys = ys.reshape(T, 1, -1)
    ts = sol.ts.detach()
    ts = ts.expand(B, -1) if ts.dim() == 1 else ts
    tr = sol.trace

    def rows(x):
        x = x.detach()
        return x[None] if x.dim() == 1 else x.reshape(B, -1)

    trace = {k: rows(getattr(tr, k)) for k in ("t", "dt", "eest", "mask")}
    return ys.cpu(), ts.cpu(), {k: v.cpu() for k, v in trace.items()}, B


def plot_trajectories(sol: Solution, samples: Indices = None, components: Indices = None, ax=None,
                      dense_points: int = 0, max_samples: int = 8, max_components: int = 4, **kwargs):
    """Plot each selected sample's selected state components against time.

    samples, components: an index or a list (default: the first `max_samples` samples and the first
    `max_components` flattened components). dense_points > 0 draws the solver's own interpolant
    `sol(t)` on that many points per sample (needs a solve with dense=True) and marks the saved
    values `sol.ys` as dots. Extra keyword arguments go to `ax.plot`. Returns the Axes.
    """
    ys, ts, _, B = _batched_view(sol)
    ax = _axes(ax)
    b_idx = _select(B, samples, max_samples, "sample")
    c_idx = _select(ys.shape[2], components, max_components, "component")
    fine = None
    if dense_points > 0:
        t0, t1 = sol.ts[..., 0], sol.ts[..., -1]
        grid = torch.linspace(0, 1, dense_points, dtype=sol.ts.dtype, device=sol.ts.device)
        tq = t0[..., None] + grid * (t1 - t0)[..., None]
        with torch.no_grad():
            vals = sol(tq).detach()
        vals = vals.reshape(dense_points, B, -1).cpu()
        tq = (tq.expand(B, -1) if tq.dim() == 1 else tq).cpu()
        fine = tq, vals
    for b in b_idx:
        for c in c_idx:
            label = f"y[{c}]" if B == 1 else f"sample {b}, y[{c}]"
            if fine is not None:
                line, = ax.plot(fine[0][b], fine[1][:, b, c], label=label, **kwargs)
                ax.plot(ts[b], ys[:, b, c], "o", ms=3, color=line.get_color())
            else:
                ax.plot(ts[b], ys[:, b, c], label=label, **kwargs)
    ax.set_xlabel("t")
    ax.set_ylabel("y")
    if len(b_idx) * len(c_idx) <= 10:
        ax.legend(fontsize="small")
    return ax


def _plot_trace(sol, key, samples, ax, max_samples, ylabel, log, kwargs):
    _, _, tr, B = _batched_view(sol)
    ax = _axes(ax)
    for b in _select(B, samples, max_samples, "sample"):
        m = tr["mask"][b]
        label = None if B == 1 else f"sample {b}"
        ax.plot(tr["t"][b][m], tr[key][b][m], marker=".", ms=3, label=label, **kwargs)
    ax.set_xlabel("t (end of accepted step)")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    if B > 1 and len(_select(B, samples, max_samples, "sample")) <= 10:
        ax.legend(fontsize="small")
    return ax


def plot_step_sizes(sol: Solution, samples: Indices = None, ax=None, max_samples: int = 8, log: bool = True,
                    **kwargs):
    """Accepted step sizes |dt| against the time each step reached (from `sol.trace`), log scale."""
    return _plot_trace(sol, "dt", samples, ax, max_samples, "step size |dt|", log, kwargs)


def plot_error_estimates(sol: Solution, samples: Indices = None, ax=None, max_samples: int = 8,
                         log: bool = True, **kwargs):
    """The controller's scaled error estimate EEst of each accepted step (≤ 1 for adaptive steps),
    against the time the step reached. Methods without an error estimate have nothing to draw."""
    if bool(torch.isnan(sol.trace.eest[sol.trace.mask]).all()) and bool(sol.trace.mask.any()):
        raise ValueError(f"{sol.solver!r} has no error estimate (trace.eest is NaN)")
    ax = _plot_trace(sol, "eest", samples, ax, max_samples, "EEst (scaled error norm)", log, kwargs)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    return ax


def plot_solution(sol: Solution, samples: Indices = None, components: Indices = None, dense_points: int = 0,
                  figsize=(13, 3.6)):
    """One figure with three panels: trajectories, step sizes, and EEst (when the method has one).
    Returns the Figure."""
    plt = _pyplot()
    has_eest = not (bool(sol.trace.mask.any()) and bool(torch.isnan(sol.trace.eest[sol.trace.mask]).all()))
    fig, axes = plt.subplots(1, 3 if has_eest else 2, figsize=figsize)
    plot_trajectories(sol, samples, components, ax=axes[0], dense_points=dense_points)
    plot_step_sizes(sol, samples, ax=axes[1])
    if has_eest:
        plot_error_estimates(sol, samples, ax=axes[2])
    name = getattr(sol.solver, "name", None) or repr(sol.solver)
    fig.suptitle(f"{name}: {int(sol.stats.nfe.sum())} f evaluations, "
                 f"{int(sol.stats.naccept.sum())} accepted / {int(sol.stats.nreject.sum())} rejected steps")
    fig.tight_layout()
    return fig


__all__ = ["plot_trajectories", "plot_step_sizes", "plot_error_estimates", "plot_solution"]
