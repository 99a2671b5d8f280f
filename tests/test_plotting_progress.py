"""pybridge.plotting draws what the Solution holds; solve(progress=True) reports the span covered
without extra host reads and without changing the result."""
from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

import pybridge as pb
from pybridge.progress import reporting_to

F64 = torch.float64


def oscillator(t, y):
    return torch.stack([y[..., 1], -4.0 * y[..., 0]], -1)


def batch_problem(span=6.0):
    y0 = torch.tensor([[1.0, 0.0], [0.5, 1.0], [3.0, -2.0]], dtype=F64)
    return pb.ODEProblem(oscillator, y0, torch.linspace(0.0, span, 7, dtype=F64))


class HostReads(TorchFunctionMode):
    """Counts the tensor methods that copy values to the host (real calls, nothing replaced)."""

    NAMES = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.NAMES:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_progress_adds_no_host_reads_and_changes_nothing(capsys):
    prob = batch_problem()
    with HostReads() as plain_reads:
        plain = pb.solve(prob, pb.Tsit5(), rtol=1e-8, atol=1e-8)
    with HostReads() as bar_reads:
        shown = pb.solve(prob, pb.Tsit5(), rtol=1e-8, atol=1e-8, progress=True)
    assert bar_reads.count == plain_reads.count
    torch.testing.assert_close(shown.ys, plain.ys, rtol=0, atol=0)
    assert torch.equal(shown.stats.nfe, plain.stats.nfe)
    err = capsys.readouterr().err
    assert "100.0% of the span" in err and "Tsit5" in err


def test_progress_hook_reports_the_slowest_sample():
    prob = batch_problem()
    seen = []
    with reporting_to(seen.append):
        sol = pb.solve(prob, pb.Tsit5(), rtol=1e-8, atol=1e-8)
    iterations = int((sol.stats.naccept + sol.stats.nreject).max())
    assert len(seen) == iterations                       # one report per loop iteration
    assert all(b >= a for a, b in zip(seen, seen[1:]))   # monotone
    assert seen[-1] == 1.0 and 0.0 < seen[0] < 0.5
    # The slowest sample (largest amplitude needs the most steps) sets the pace: when the first
    # sample is done, the reported fraction is still below 1.
    assert seen[int(sol.stats.naccept.min()) - 1] < 1.0
    # Outside the block nothing reports.
    pb.solve(prob, pb.Tsit5())
    assert len(seen) == iterations


def test_progress_is_off_by_default_and_torch_engine_only(capsys):
    pb.solve(batch_problem(), pb.Tsit5())
    assert "% of the span" not in capsys.readouterr().err
    with pytest.raises(ValueError, match="progress=True"):
        pb.solve(batch_problem(), pb.Tsit5(), engine="julia", progress=True)


def test_progress_with_fixed_steps_and_a_failing_sample(capsys):
    y0 = torch.tensor([[1.0], [50.0]], dtype=F64)
    prob = pb.ODEProblem(lambda t, y: y ** 2, y0, torch.tensor([0.0, 0.5], dtype=F64))
    with pytest.warns(RuntimeWarning, match="did not succeed"):
        sol = pb.solve(prob, pb.Tsit5(), max_steps=200, progress=True)
    assert sol.retcodes[1] != pb.ReturnCode.Success
    assert "100.0% of the span" in capsys.readouterr().err  # a stopped sample counts as done
    pb.solve(pb.ODEProblem(oscillator, y0.new_tensor([1.0, 0.0]), [0.0, 1.0]), pb.RK4(), dt=0.1, progress=True)
    assert "100.0% of the span" in capsys.readouterr().err


# --------------------------------------------------------------------------------------- plotting
plt = pytest.importorskip("matplotlib.pyplot", reason="matplotlib not installed: pip install 'pybridge[plot]'")
pytest.importorskip("matplotlib").use("Agg", force=True)
import pybridge.plotting as pbplot  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_step_sizes_and_eest_lines_are_the_trace():
    sol = pb.solve(batch_problem(), pb.Tsit5(), rtol=1e-6, atol=1e-8)
    tr = sol.trace
    ax = pbplot.plot_step_sizes(sol, samples=[0, 2])
    assert len(ax.lines) == 2 and ax.get_yscale() == "log"
    for line, b in zip(ax.lines, [0, 2]):
        m = tr.mask[b]
        assert list(line.get_xdata()) == tr.t[b][m].tolist()
        assert list(line.get_ydata()) == tr.dt[b][m].tolist()
    ax = pbplot.plot_error_estimates(sol, samples=1)
    data = ax.lines[0]
    assert list(data.get_ydata()) == tr.eest[1][tr.mask[1]].tolist()
    assert max(data.get_ydata()) <= 1.0


def test_trajectories_with_dense_output_and_unbatched():
    sol = pb.solve(batch_problem(), pb.Tsit5(), rtol=1e-8, atol=1e-8, dense=True)
    ax = pbplot.plot_trajectories(sol, samples=[1], components=[0, 1], dense_points=50)
    lines = ax.lines  # per (sample, component): the interpolant, then the saved values as dots
    assert len(lines) == 4
    assert len(lines[0].get_xdata()) == 50
    assert list(lines[1].get_ydata()) == sol.ys[:, 1, 0].tolist()
    exact = torch.cos(2.0 * torch.as_tensor(lines[0].get_xdata())) * 0.5 + torch.sin(
        2.0 * torch.as_tensor(lines[0].get_xdata())) * 0.5  # y0 = (0.5, 1): 0.5 cos 2t + 0.5 sin 2t
    torch.testing.assert_close(torch.as_tensor(lines[0].get_ydata()), exact, atol=1e-6, rtol=0)

    single = pb.solve(pb.ODEProblem(oscillator, torch.tensor([1.0, 0.0], dtype=F64), [0.0, 1.0, 2.0]), pb.RK4(),
                      dt=0.05)
    fig = pbplot.plot_solution(single)
    assert len(fig.axes) == 2  # no EEst panel for a method without an error estimate
    with pytest.raises(ValueError, match="no error estimate"):
        pbplot.plot_error_estimates(single)
    fig = pbplot.plot_solution(sol, samples=[0], dense_points=20)
    assert len(fig.axes) == 3
    with pytest.raises(IndexError):
        pbplot.plot_step_sizes(sol, samples=[5])
    with pytest.raises(ValueError, match="dense=True"):
        pbplot.plot_trajectories(single, dense_points=10)


def test_import_pybridge_does_not_import_matplotlib():
    code = "import sys, pybridge, pybridge.plotting; assert 'matplotlib' not in sys.modules"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=pathlib.Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr
