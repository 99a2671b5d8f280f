"""The native explicit Runge–Kutta iteration (torch_engine/native_rk.py, rk_step.c).

It runs eager CPU solves that record no gradients; loop.Advance (torch ops) is the reference. The
tests compare the two on the same solves, and re-run the explicit solvers' own tests (accuracy,
step control, batches, float32 far from t = 0, per-sample failures) on the native path.
"""
import contextlib
import math
import warnings

import pytest
import torch

import pybridge as pb
from pybridge.solution import ReturnCode as RC
from pybridge.torch_engine import native_rk
from tests import test_explicit, test_failures_and_errors

needs_library = pytest.mark.skipif(native_rk._LIB.get() is None, reason="no C compiler (the native step is not built)")


@contextlib.contextmanager
def native_path(expected=True):
    """Counts NativeAdvance iterations inside the block; checks that some ran (or none)."""
    calls = []
    original = native_rk.NativeAdvance.__call__

    def counted(self, *args):
        calls.append(1)
        return original(self, *args)
    native_rk.NativeAdvance.__call__ = counted
    try:
        yield calls
    finally:
        native_rk.NativeAdvance.__call__ = original
    assert bool(calls) == expected, f"native iterations: {len(calls)}"


def solve_both(prob, solver, **kw):
    """(native, torch) solutions of one problem, both without gradients."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with native_path():
            native = pb.solve(prob, solver, **kw)
        with native_rk.torch_loop_only():
            reference = pb.solve(prob, solver, **kw)
    return native, reference


def assert_same_solve(native, reference, ys_tol, steps_equal=True, samples=slice(None)):
    """Same return codes and values; with steps_equal, the same steps and trace for `samples`."""
    assert native.retcode.tolist() == reference.retcode.tolist()
    torch.testing.assert_close(native.ys, reference.ys, rtol=ys_tol, atol=ys_tol, equal_nan=True)
    if steps_equal:
        for name in ("naccept", "nreject", "nfe"):
            assert torch.equal(getattr(native.stats, name)[samples], getattr(reference.stats, name)[samples]), name
        tn, tr = native.trace, reference.trace
        N = min(tn.mask.shape[1], tr.mask.shape[1])   # (the trace is as wide as the longest sample's)
        assert not tn.mask[samples][:, N:].any() and not tr.mask[samples][:, N:].any()
        assert torch.equal(tn.mask[samples][:, :N], tr.mask[samples][:, :N])
        close = lambda a, b, **tol: torch.testing.assert_close(a[samples][:, :N], b[samples][:, :N], **tol)  # noqa: E731
        close(tn.t, tr.t, rtol=1e-6, atol=1e-9)
        # EEst is a sum of stages that cancel to ~1e-8 of their size: rounding moves it by ~1e-5.
        close(tn.eest, tr.eest, rtol=1e-3, atol=1e-9)
        close(tn.dt, tr.dt, rtol=1e-3, atol=1e-12)
        close(tn.stiffness, tr.stiffness, rtol=1e-3, atol=1e-9)


def mixed_batch(dtype=torch.float64, B=12):
    """Rotations with decay and a cubic term, one frequency per sample: samples take their own steps."""
    g = torch.Generator().manual_seed(3)
    w = torch.linspace(0.5, 3.0, B, dtype=dtype)[:, None]
    y0 = torch.randn(B, 3, generator=g, dtype=dtype)

    def f(t, y):
        x, v, z = y.unbind(-1)
        return torch.stack([v, -(w[:, 0] ** 2) * x - 0.1 * v, -z ** 3 + torch.sin(x)], -1)
    return f, y0


@needs_library
@pytest.mark.parametrize("batch", ["independent", "lockstep"])
@pytest.mark.parametrize("solver", test_explicit.ADAPTIVE + [pb.Heun, pb.Midpoint], ids=lambda s: s.__name__)
def test_native_iterations_agree_with_torch_ones(solver, batch):
    """(Heun and Midpoint: adaptive on request, without FSAL, saved through cubic Hermite.)"""
    f, y0 = mixed_batch()
    prob = pb.ODEProblem(f, y0, torch.linspace(0, 4, 17, dtype=torch.float64))
    kw = dict(adaptive=True) if solver in (pb.Heun, pb.Midpoint) else {}
    native, reference = solve_both(prob, solver(), rtol=1e-6, atol=1e-8, batch=batch, **kw)
    assert native.success
    assert_same_solve(native, reference, ys_tol=1e-9)


@needs_library
@pytest.mark.parametrize("solver", [pb.Tsit5, pb.Vern7], ids=lambda s: s.__name__)
def test_native_float32_agrees_with_torch_to_rounding(solver):
    f, y0 = mixed_batch(torch.float32)
    prob = pb.ODEProblem(f, y0, torch.linspace(0, 4, 17))
    native, reference = solve_both(prob, solver(), rtol=1e-5, atol=1e-7)
    # (float32 rounding decides some acceptances differently, so the steps may differ)
    assert_same_solve(native, reference, ys_tol=1e-4, steps_equal=False)
    assert abs(native.stats.nfe.sum().item() / reference.stats.nfe.sum().item() - 1) < 0.05


@needs_library
@pytest.mark.parametrize("case", ["nan_sample", "max_steps", "dtmin", "backward_per_sample_times",
                                  "per_component_tolerances", "lockstep_diverging", "dtmax_first_step",
                                  "non_contiguous_f"])
def test_native_failures_and_options_agree_with_torch(case):
    f, y0 = mixed_batch()
    t = torch.linspace(0, 4, 9, dtype=torch.float64)
    kw = dict(rtol=1e-6, atol=1e-8)
    if case == "nan_sample":        # sample 2's f turns NaN at t > 1.7: Unstable there, NaN after
        base = f
        f = lambda t, y: torch.where((torch.arange(y.shape[0]) == 2)[:, None] & (t[:, None] > 1.7), math.nan,  # noqa: E731
                                     base(t, y))
    elif case == "max_steps":
        kw["max_steps"] = 20
    elif case == "dtmin":
        kw["dtmin"] = 0.3
    elif case == "backward_per_sample_times":   # (y0 small: z' = z³ backwards blows up in 1/(2 z0²))
        y0 = 0.2 * y0
        t = torch.stack([torch.linspace(3.0, 1.0 - 0.1 * b, 9, dtype=torch.float64) for b in range(y0.shape[0])])
    elif case == "per_component_tolerances":
        kw["atol"] = torch.tensor([1e-9, 1e-6, 1e-8], dtype=torch.float64)
        kw["rtol"] = torch.full_like(y0, 1e-5)
    elif case == "lockstep_diverging":
        base = f
        f = lambda t, y: torch.cat([torch.log(y[:1] - 10), base(t, y)[1:]])  # noqa: E731
        kw["batch"] = "lockstep"
    elif case == "dtmax_first_step":
        kw.update(dtmax=0.05, dt=0.01, dense=True)
    elif case == "non_contiguous_f":    # f's output is a transposed view
        base = f
        f = lambda t, y: base(t, y).T.contiguous().T  # noqa: E731
    native, reference = solve_both(pb.ODEProblem(f, y0, t), pb.Tsit5(), **kw)
    # (a failing sample's last steps, shrinking to nothing, differ with rounding: its values do not)
    healthy = native.retcode == RC.Success if case == "nan_sample" else slice(None)
    assert_same_solve(native, reference, ys_tol=1e-9, samples=healthy)
    expected = {"nan_sample": [RC.Unstable if b == 2 else RC.Success for b in range(12)],
                "max_steps": None, "dtmin": None, "lockstep_diverging": [RC.Unstable] + [RC.Success] * 11}
    if expected.get(case):
        assert native.retcode.tolist() == expected[case]
    if case == "max_steps":
        assert (native.retcode == RC.MaxIters).any()
    if case == "dtmin":
        assert (native.retcode == RC.DtLessThanMin).any()
    if case == "nan_sample":     # values kept up to the failure, NaN after
        assert torch.isfinite(native.ys[:4, 2]).all() and torch.isnan(native.ys[4:, 2]).all()
    if case == "dtmax_first_step":
        ts = torch.linspace(0.1, 3.9, 7, dtype=torch.float64)
        torch.testing.assert_close(native(ts), reference(ts), rtol=1e-9, atol=1e-9)


@needs_library
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("lockstep", [False, True], ids=["independent", "lockstep"])
def test_native_first_step_is_hairers(lockstep, dtype):
    """NativeAdvance.first_step against controller.initial_step: a batch with a sample whose f is
    NaN, one at rest (f = 0: the 1e-6 fallbacks), t0 far from zero and a dtmax that binds."""
    from pybridge.torch_engine.controller import Norm, PIController, initial_step
    from pybridge.torch_engine.engine import build_method
    from pybridge.torch_engine.loop import LoopOptions
    f, y0 = mixed_batch(dtype)
    y0[3] = 0.0
    rhs = lambda t, y: torch.where((torch.arange(y.shape[0]) == 1)[:, None], math.nan, f(t, y))  # noqa: E731
    tau_save = torch.stack([torch.full((12,), 1e4, dtype=dtype), torch.full((12,), 1e4 + 5, dtype=dtype)], 1)
    tau_save[5:, 1] = 1e4 + 0.001                           # (dtmax = the span binds for these)
    dtmax, tau, f0 = tau_save[:, 1] - tau_save[:, 0], tau_save[:, 0].clone(), rhs(tau_save[:, 0], y0)
    method = build_method(pb.Tsit5(), dtype, torch.device("cpu"))
    opts = LoopOptions(lockstep=lockstep)
    atol, rtol = torch.full((3,), 1e-8, dtype=dtype), 1e-6
    native = native_rk.NativeAdvance(rhs, method, PIController.for_order(5), opts, atol, rtol, tau_save, dtmax, y0)
    expected = initial_step(rhs, tau, y0, f0, method.order, atol, rtol, Norm(lockstep), dtmax)
    torch.testing.assert_close(native.first_step(tau, y0, f0), expected,
                               rtol=1e-12 if dtype == torch.float64 else 1e-5, atol=0)


@needs_library
def test_what_f_was_given_is_never_written_again():
    """f may keep the times and states it is given (a closure logging them): the kernels write every
    stage time and argument into memory of its own, never over one that f has seen (the initial
    step's kernel wrote a norm over the time it had passed to f)."""
    seen = []
    f0, y0 = mixed_batch()

    def f(t, y):
        seen.append((t, t.clone(), y, y.clone()))
        return f0(t, y)
    with torch.no_grad(), native_path():
        pb.solve(pb.ODEProblem(f, y0, torch.linspace(0, 2, 5, dtype=torch.float64)), pb.DP5())
    assert len(seen) > 20
    assert all(torch.equal(t, t_copy) and torch.equal(y, y_copy) for t, t_copy, y, y_copy in seen)


@needs_library
def test_native_stage_times_and_arguments_round_as_torchs():
    """torch's addcmul rounds t + c·h and y + h·Σ once (a fused multiply-add); with two roundings the
    stage times of float32 at t ~ 1e5 were an ulp (0.0078) off, and the solution 24× rtol."""
    y0 = torch.randn(4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([1e5, 1e5 + 2], dtype=torch.float32)
    times = {True: [], False: []}

    def solve(native):
        f = lambda tt, y: (times[native].append(tt.clone()), torch.cos(tt) * y)[1]  # noqa: E731
        return pb.solve(pb.ODEProblem(f, y0, t), pb.DP5(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        with native_path():
            native = solve(True)
        with native_rk.torch_loop_only():
            reference = solve(False)
    assert len(times[True]) == len(times[False])
    assert all(torch.equal(a, b) for a, b in zip(times[True], times[False]))
    torch.testing.assert_close(native.ys, reference.ys, rtol=0, atol=1e-6)


@needs_library
def test_a_method_first_built_inside_a_functorch_transform_still_runs_natively():
    """The engine caches methods; one first built inside torch.func.grad holds coefficient tensors
    without storage, whose data pointer the native step asked for."""
    from pybridge.torch_engine import engine
    engine._build_method.cache_clear()
    y0 = torch.tensor([[1.0, 0.5], [0.3, -0.2]], dtype=torch.float64)
    t = torch.linspace(0, 1, 5, dtype=torch.float64)
    run = lambda p: pb.solve(pb.ODEProblem(lambda tt, y: -p * y, y0, t), pb.Tsit5()).ys  # noqa: E731
    p = torch.tensor(0.7, dtype=torch.float64)
    torch.func.grad(lambda p: run(p).sum())(p)
    with torch.no_grad(), native_path():
        ys = run(p)
    torch.testing.assert_close(ys[-1], y0 * math.exp(-0.7), rtol=1e-5, atol=0)


@needs_library
def test_native_step_is_used_exactly_where_it_applies(monkeypatch):
    from pybridge.torch_engine.controller import PIController
    from pybridge.torch_engine.engine import build_method
    from pybridge.torch_engine.loop import LoopOptions
    f, y0 = mixed_batch()
    prob = pb.ODEProblem(f, y0, torch.linspace(0, 1, 3, dtype=torch.float64))
    with torch.no_grad(), native_path():
        pb.solve(prob, pb.Tsit5())
    with native_path(expected=False):                        # gradients recorded
        pb.solve(prob, pb.Tsit5())
    with torch.no_grad(), native_path(expected=False):
        pb.solve(prob, pb.Rodas5P())                         # not an explicit RK method
        pb.solve(prob, pb.Tsit5(), adaptive=False, dt=0.1)   # fixed steps
    # Each condition alone, from a case that qualifies.
    cpu = torch.device("cpu")
    tsit5, controller = build_method(pb.Tsit5(), torch.float64, cpu), PIController.for_order(5)
    with torch.no_grad():
        assert native_rk.usable(tsit5, LoopOptions(), y0, controller)
        assert not native_rk.usable(build_method(pb.Rodas5P(), torch.float64, cpu), LoopOptions(), y0, controller)
        for opts in (LoopOptions(adaptive=False), LoopOptions(compile=True), LoopOptions(stop_at_saves=True),
                     LoopOptions(probe=("unbiased", torch.zeros(12)))):
            assert not native_rk.usable(tsit5, opts, y0, controller), opts
        other_controller = type("OtherController", (), {"propose": PIController.propose})()
        assert not native_rk.usable(tsit5, LoopOptions(), y0, other_controller)
        assert not native_rk.usable(tsit5, LoopOptions(), y0.half(), controller)
        assert not native_rk.usable(tsit5, LoopOptions(), y0.to(torch.complex128), controller)

        class Subclass(torch.Tensor):
            pass
        assert not native_rk.usable(tsit5, LoopOptions(), y0.as_subclass(Subclass), controller)
        import torch.autograd.forward_ad as fwAD
        with fwAD.dual_level():
            assert not native_rk.usable(tsit5, LoopOptions(), y0, controller)
    assert not native_rk.usable(tsit5, LoopOptions(), y0, controller)     # (gradients recorded)
    monkeypatch.setattr(native_rk._LIB, "_tried", False)
    monkeypatch.setattr(native_rk._LIB, "_library", None)
    monkeypatch.setenv("PYBRIDGE_NATIVE_STEP", "0")
    with torch.no_grad(), native_path(expected=False):
        pb.solve(prob, pb.Tsit5())


# The explicit solvers' own tests, on the native path (they solve with gradients recorded, hence
# on loop.Advance, where they are collected in their own modules).
REUSED = [
    test_explicit.test_exp_problem_within_tolerance,
    test_explicit.test_linear_reference_all_save_points,
    test_explicit.test_step_control_matches_specification,
    test_explicit.test_dtmax_and_first_step_respected,
    test_explicit.test_independent_samples_take_their_own_steps,
    test_explicit.test_per_sample_times_and_directions,
    test_explicit.test_time_dependent_f_gets_per_sample_time,
    test_explicit.test_unbatched_state_of_any_shape_is_one_sample,
    test_explicit.test_dense_output_accuracy,
    test_explicit.test_trace_stiffness_estimates_dominant_eigenvalue,
    test_explicit.test_float32_works,
    test_explicit.test_float32_far_from_zero_time,
    test_explicit.test_float32_far_from_zero_steps_down_to_one_ulp_and_never_length_zero,
    test_failures_and_errors.test_one_failing_sample_keeps_its_values_and_spares_the_others,
    test_failures_and_errors.test_max_iters_per_sample,
    test_failures_and_errors.test_non_finite_rhs_is_unstable,
    test_failures_and_errors.test_lockstep_stops_a_diverging_sample_and_finishes_the_others,
    test_failures_and_errors.test_lockstep_sample_whose_f_is_nan_at_y0_changes_nothing_for_the_others,
    test_failures_and_errors.test_dtmin_bounds_the_automatic_first_step_and_dense_queries_stay_in_the_span,
]


def _cases():
    """(test, arguments) pairs: each reused test with its own parametrisations."""
    out = []
    for test in REUSED:
        marks = [m for m in getattr(test, "pytestmark", []) if m.name == "parametrize"]
        assert len(marks) <= 1, f"{test.__name__}: one parametrize mark is expanded here"
        if not marks:
            out.append(pytest.param(test, {}, id=test.__name__))
            continue
        names, values = marks[0].args[0], marks[0].args[1]
        names = [n.strip() for n in names.split(",")]
        for v in values:
            v = v if len(names) > 1 else (v,)
            label = "-".join(getattr(x, "__name__", getattr(x, "name", str(x))) for x in v)
            out.append(pytest.param(test, dict(zip(names, v)), id=f"{test.__name__}[{label}]"))
    return out


@needs_library
@pytest.mark.parametrize("test,kwargs", _cases())
def test_explicit_solver_tests_pass_on_the_native_path(test, kwargs):
    stiff = any(getattr(v, "family", "explicit_rk") != "explicit_rk" for v in kwargs.values())
    with torch.no_grad(), native_path(expected=not stiff):   # (a stiff solver's case: the torch loop)
        test(**kwargs)
