"""solve(..., compile=True): the loop iteration as one torch.compile'd graph gives the eager solve's
results (values, steps, gradients) for explicit RK, Rosenbrock and SDE methods, and the other
families refuse it with a clear error.

Each compilation takes seconds, so the tests share one problem (Dynamo reuses a compiled graph
when the module, shapes and options match)."""
import math

import pytest
import torch

import pybridge as pb

torch.manual_seed(0)
NET = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).double()
Y0 = torch.randn(4, 2, dtype=torch.float64)
T = torch.linspace(0.0, 2.0, 6, dtype=torch.float64)


class Field(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = NET

    def forward(self, t, y):
        return self.net(y) * torch.cos(t)[..., None]  # uses t (per sample in independent mode)


FIELD = Field()


def _solve(solver, **kw):
    return pb.solve(pb.ODEProblem(FIELD, Y0, T), solver, rtol=1e-7, atol=1e-9, **kw)


def test_compiled_solve_matches_eager_with_gradients():
    def run(compile):
        NET.zero_grad()
        sol = _solve(pb.Tsit5(), compile=compile)
        loss = sol.ys.square().sum() + pb.error_regularizer(sol)
        loss.backward()
        return sol, [p.grad.clone() for p in NET.parameters()]

    eager, g_eager = run(False)
    compiled, g_compiled = run(True)
    # Same steps: float64 rounding differences of fused kernels do not move an accept/reject decision here.
    assert torch.equal(compiled.stats.nfe, eager.stats.nfe)
    assert torch.equal(compiled.stats.naccept, eager.stats.naccept)
    torch.testing.assert_close(compiled.ys, eager.ys, rtol=1e-10, atol=1e-12)
    # The error estimate is a small difference of O(1) stage values, so reordered sums change it at
    # ~1e-6 relative (and the steps the controller proposes with it) even in float64.
    torch.testing.assert_close(compiled.trace.dt, eager.trace.dt, rtol=1e-4, atol=0.0)
    for a, b in zip(g_compiled, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_compiled_lockstep_dense_and_backsolve_adjoint():
    with torch.no_grad():
        eager = _solve(pb.DP5(), batch="lockstep", dense=True)
        compiled = _solve(pb.DP5(), batch="lockstep", dense=True, compile=True)
    assert torch.equal(compiled.stats.nfe, eager.stats.nfe)
    torch.testing.assert_close(compiled.ys, eager.ys, rtol=1e-10, atol=1e-12)
    tq = torch.linspace(0.1, 1.9, 7, dtype=torch.float64)
    torch.testing.assert_close(compiled(tq), eager(tq), rtol=1e-10, atol=1e-12)

    # A continuous adjoint: the forward solve compiled, the backward (autograd inside f) eager.
    y0 = Y0.clone().requires_grad_()
    grads = []
    for compile in (False, True):
        sol = pb.solve(pb.ODEProblem(FIELD, y0, T), pb.DP5(), rtol=1e-7, atol=1e-9, batch="lockstep",
                       adjoint=pb.BacksolveAdjoint(), compile=compile)
        grads.append(torch.autograd.grad(sol.ys[-1].sum(), y0)[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("kw, err, match", [
    (dict(compile="yes"), TypeError, "compile must be True or False"),
    (dict(compile=True, engine="julia"), ValueError, "torch engine only"),
])
def test_compile_argument_errors(kw, err, match):
    with pytest.raises(err, match=match):
        _solve(pb.Tsit5(), **kw)


class LearnableRober(torch.nn.Module):
    """ROBER with learnable log-rates (stiffness ~1e7 at the true rates)."""

    def __init__(self):
        super().__init__()
        self.log_rates = torch.nn.Parameter(torch.tensor([0.04, 3e7, 1e4], dtype=torch.float64).log())

    def forward(self, t, y):
        k1, k2, k3 = self.log_rates.exp()
        y1, y2, y3 = y.unbind(-1)
        return torch.stack([-k1 * y1 + k3 * y2 * y3, k1 * y1 - k3 * y2 * y3 - k2 * y2 ** 2, k2 * y2 ** 2], -1)


def test_compiled_rosenbrock_matches_eager_with_gradients():
    # The Jacobian comes from torch.func.jacrev inside the compiled graph (autograd.grad does not trace).
    f = LearnableRober()
    y0 = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.0, 0.1]], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0, 10.0], dtype=torch.float64)

    def run(compile):
        f.zero_grad()
        sol = pb.solve(pb.ODEProblem(f, y0, t), pb.Rosenbrock23(), rtol=1e-6, atol=1e-10, compile=compile)
        sol.ys[-1, :, 0].sum().backward()
        return sol, f.log_rates.grad.clone()

    eager, g_eager = run(False)
    compiled, g_compiled = run(True)
    assert torch.equal(compiled.stats.naccept, eager.stats.naccept)
    assert torch.equal(compiled.stats.njac, eager.stats.njac)
    torch.testing.assert_close(compiled.ys, eager.ys, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(compiled.trace.stiffness, eager.trace.stiffness, rtol=1e-9, atol=0.0)
    torch.testing.assert_close(g_compiled, g_eager, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("n", [1, 5, 40])
def test_graph_forms_of_stage_sums_and_jacobian_norm(n):
    """Inside a compiled graph the stage sums and ‖J‖∞ are unrolled into pointwise ops (tableau.combine,
    jacobian.inf_norm); they give the eager forms' values and gradients (n = 40: the reduction again)."""
    from pybridge.torch_engine.jacobian import inf_norm
    from pybridge.torch_engine.tableau import StageWeights, combine
    g = torch.Generator().manual_seed(n)
    J = torch.randn(6, n, n, dtype=torch.float64, generator=g, requires_grad=True)
    terms = [torch.randn(6, n, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(4)]
    w = [0.5, -1.25, 0.0, 2.0]
    weights = StageWeights(w, torch.float64, torch.device("cpu"))
    both = lambda J, *terms: (inf_norm(J), combine(list(terms), weights))  # noqa: E731
    eager = both(J, *terms)
    graph = torch.compile(both, backend="eager", fullgraph=True)(J, *terms)
    for a, b in zip(graph, eager):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)
    grads = [torch.autograd.grad(sum(x.sum() for x in out), [J, *terms]) for out in (graph, eager)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("solver", [pb.Kvaerno5(), pb.TRBDF2(), pb.AutoTsit5(pb.Rosenbrock23())])
def test_compile_refuses_newton_and_switching_solvers(solver):
    with pytest.raises(ValueError, match="compile=True is available for the explicit Runge–Kutta, Rosenbrock and SDE"):
        _solve(solver, compile=True)


@pytest.mark.parametrize("solver, kw", [(pb.SRIW1(), dict(adaptive=False, dt=2.0**-5)),
                                        (pb.SOSRI(), dict(rtol=1e-2, atol=1e-2))])
def test_compiled_sde_matches_eager(solver, kw):
    """SDE steps compile with their Brownian increments drawn outside the graph (fixed steps from the
    look-ahead, adaptive ones from tree queries, rejected steps included): same path, same steps,
    same values and gradients."""
    sig = torch.tensor([0.3, 0.2], dtype=torch.float64, requires_grad=True)
    prob = pb.SDEProblem(FIELD, lambda t, y: sig * y, Y0, torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))

    def run(compile):
        sig.grad = None
        sol = pb.solve(prob, solver, seed=3, compile=compile, **kw)
        sol.ys[-1].square().sum().backward()
        return sol, sig.grad.clone()

    eager, g_eager = run(False)
    compiled, g_compiled = run(True)
    assert torch.equal(compiled.stats.naccept, eager.stats.naccept)
    assert torch.equal(compiled.stats.nreject, eager.stats.nreject)
    # Fixed steps: the same increments, so rounding-level agreement. Adaptive: the compiled graph
    # rounds step sizes differently in the last bit, and a Brownian path moved by δ in time changes
    # by ~√δ, so agreement is at ~√eps.
    tol = dict(rtol=1e-10, atol=1e-13) if "dt" in kw else dict(rtol=1e-6, atol=1e-9)
    if "dt" not in kw:
        assert int(eager.stats.nreject.sum()) > 0  # the rejected-step path was exercised
    torch.testing.assert_close(compiled.ys, eager.ys, **tol)
    torch.testing.assert_close(g_compiled, g_eager, rtol=100 * tol["rtol"], atol=100 * tol["atol"])


ODE = lambda y0, t: pb.ODEProblem(FIELD, y0, t)  # noqa: E731
SDE = lambda y0, t: pb.SDEProblem(FIELD, lambda t, y: 0.3 * y, y0, t)  # noqa: E731


@pytest.mark.parametrize("make, kw, warm_counts", [
    (ODE, dict(solver=pb.Tsit5()), (2,)),                                      # general loop
    # The fixed-step loop (ODE and SDE steps alike) compiles twice: steps that return their stages
    # (to interpolate save points), and steps that need not (save times (t0, t1) only).
    (SDE, dict(solver=pb.SRIW1(), adaptive=False, dt=2.0**-4), (2, 3)),
])
def test_later_compiled_solves_reuse_the_graph(make, kw, warm_counts):
    """A compiled iteration is compiled once per problem shape and solver: a later solve with other
    values, other tolerances, a new problem object and another number of save times runs the same
    graph (fail_on_recompile raises if any of these recompiled)."""
    kw = dict(kw)
    solver = kw.pop("solver")
    times = lambda n: torch.linspace(0.0, 1.0, n, dtype=torch.float64)  # noqa: E731
    for n in warm_counts:
        pb.solve(make(Y0, times(n)), solver, rtol=1e-6, atol=1e-8, compile=True, **kw)
    with torch.compiler.set_stance("fail_on_recompile"):
        for n in (2, 5):
            sol = pb.solve(make(Y0 + 0.1, times(n)), solver, rtol=1e-5, atol=1e-7, compile=True, **kw)
            assert sol.success


# Module globals that a vector field reads: a notebook may reassign them between solves.
RATE = -1.0
LINEAR = torch.nn.Linear(2, 2, bias=False).double()


def _field_of_globals(t, y):
    return RATE * y + LINEAR(y)


def test_compiled_solve_sees_reassigned_user_globals():
    """A compiled iteration skips the guards on torch's and pybridge's own globals (loop.py,
    _library_guards_dropped) but keeps those on the user's: a reassigned constant or network is
    used, not the one the graph was compiled with."""
    global RATE, LINEAR
    saved = RATE, LINEAR
    y0 = torch.ones(3, 2, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    try:
        for rate, scale in ((-1.0, 0.0), (-2.0, 0.0), (-2.0, 0.5)):
            RATE = rate
            LINEAR = torch.nn.Linear(2, 2, bias=False).double()
            with torch.no_grad():
                LINEAR.weight.copy_(scale * torch.eye(2))
                sol = pb.solve(pb.ODEProblem(_field_of_globals, y0, t), pb.Tsit5(), rtol=1e-9, atol=1e-12,
                               compile=True)
            torch.testing.assert_close(sol.ys[-1], y0 * math.exp(rate + scale), rtol=1e-6, atol=0.0)
    finally:
        RATE, LINEAR = saved


def test_guard_filter_drops_only_library_globals():
    from types import SimpleNamespace as G

    from pybridge.torch_engine.loop import _library_guards_dropped
    entries = [G(is_global=True, guard_type="MODULE_MATCH", name="G['torch']"),
               G(is_global=True, guard_type="ID_MATCH", name="G['___unnamed_scope_1402_c0']['_tuple_new']"),
               G(is_global=True, guard_type="BUILTIN_MATCH", name="G['torch'].where"),
               G(is_global=True, guard_type="CLOSURE_MATCH", name="G['__import_pybridge_dot_torch_engine_dot_controller'].x"),
               G(is_global=True, guard_type="BUILTIN_MATCH", name="G['__builtins_dict___0']['len']"),
               G(is_global=True, guard_type="CONSTANT_MATCH", name="G['RUNNING']"),          # loop.py's own
               G(is_global=True, guard_type="CLOSURE_MATCH", name="dict(G['Iteration'].__dict__)['__new__']"),
               G(is_global=True, guard_type="CONSTANT_MATCH", name="G['__import___main__'].SCALE"),
               G(is_global=True, guard_type="TENSOR_MATCH", name="G['__import_mylab_dot_models'].net._parameters['w']"),
               G(is_global=True, guard_type="CONSTANT_MATCH", name="G['SOMETHING_ELSE']"),  # not loop.py's
               G(is_global=True, guard_type="CONSTANT_MATCH", name="G['__import_torch_models'].SCALE"),
               G(is_global=True, guard_type="ID_MATCH", name="G['__import_pybridge_runs_dot_setup'].net"),
               G(is_global=True, guard_type="CONSTANT_MATCH", name="G['___unnamed_scope_1402_c0']['SCALE']"),
               G(is_global=True, guard_type="DUPLICATE_INPUT", name="G['torch']"),
               G(is_global=False, guard_type="TENSOR_MATCH", name="L['args'][0]"),
               G(is_global=False, guard_type="GLOBAL_STATE", name="")]
    assert _library_guards_dropped(entries) == [False] * 7 + [True] * 9


def test_each_kind_of_iteration_compiles_into_code_of_its_own():
    """Dynamo tries a code object's cache entries in turn at every call, so two solvers sharing one
    would make the later-compiled one pay for the other's failing guards (loop._compiled_call)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from pybridge.torch_engine import loop

    def code_of(solver, **kw):
        before = len(loop._compiled_kinds)
        with torch.no_grad():
            _solve(solver, compile=True, **kw)
        kind = next(k for k in loop._compiled_kinds if k[2] == solver.name and k[3] == (kw.get("batch") == "lockstep")
                    and k[4] is False)
        fn = loop._compiled_call(True, kind)._torchdynamo_orig_callable
        return fn.__code__, len(loop._compiled_kinds) - before

    entries = lambda code: len(_debug_get_cache_entry_list(code))  # noqa: E731
    tsit5, _ = code_of(pb.Tsit5())
    tsit5_entries = entries(tsit5)
    dp5, _ = code_of(pb.DP5(), batch="lockstep")
    assert dp5 is not tsit5 and entries(dp5) >= 1
    assert entries(tsit5) == tsit5_entries   # DP5's graph did not join Tsit5's cache
    tsit5_again, new_kinds = code_of(pb.Tsit5())
    assert tsit5_again is tsit5 and new_kinds == 0 and entries(tsit5) == tsit5_entries


def test_a_first_compiled_training_solve_compiles_one_graph():
    """y0 without grad, f's parameters with: from the second iteration on the state carries their
    graph, so the first iteration (y0 alone) had a graph of its own, compiled on top."""
    from torch._dynamo.utils import counters

    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    y0 = torch.randn(3, 3, dtype=torch.float64)   # (shapes no other test compiles)
    before = counters["stats"]["unique_graphs"]
    sol = pb.solve(pb.ODEProblem(lambda t, y: net(y), y0, T), pb.Tsit5(), rtol=1e-6, atol=1e-8, compile=True)
    assert counters["stats"]["unique_graphs"] - before == 1
    sol.ys.square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_a_compiled_stiff_solve_with_the_native_lu_compiles_one_graph(monkeypatch, tmp_path):
    """The native LU's library is built and loaded when the stiff method is created: found for the
    first time while tracing, its file-system calls broke the compiled step into pieces."""
    from torch._dynamo.utils import counters
    from pybridge.torch_engine import native_lu

    monkeypatch.setattr(native_lu._LIB, "_tried", False)
    monkeypatch.setattr(native_lu._LIB, "_library", None)
    monkeypatch.setenv("PYBRIDGE_CACHE_DIR", str(tmp_path))
    A = -torch.diag(torch.tensor([1.0, 10.0, 100.0, 1e3, 1e4, 2.0], dtype=torch.float64)) + 0.1
    y0 = torch.ones(4, 6, dtype=torch.float64)    # n = 6: above the unrolled LU's sizes
    prob = pb.ODEProblem(lambda t, y: y @ A.T, y0, T)
    breaks, graphs = sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]
    sol = pb.solve(prob, pb.Rodas5P(), rtol=1e-6, atol=1e-8, compile=True)
    assert sum(counters["graph_break"].values()) == breaks and counters["stats"]["unique_graphs"] - graphs == 1
    assert native_lu.library() is None or list(tmp_path.glob("small_lu-*.so"))
    torch.testing.assert_close(sol.ys, pb.solve(prob, pb.Rodas5P(), rtol=1e-6, atol=1e-8).ys, rtol=1e-12, atol=1e-12)


def test_a_compiled_lockstep_solve_with_a_stopped_sample_compiles_without_breaks():
    """After a sample stops, lockstep iterations stand in for its rows of f (stand_in.py): indexing
    with a device index read it on the host and broke the compiled step. Gradients match eager."""
    from torch._dynamo.utils import counters

    p = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)

    def f(t, y):   # sample 1 fails after t = 0.3
        return torch.where((torch.arange(3)[:, None] == 1) & (t > 0.3), torch.nan, -p * y * torch.cos(t))
    prob = pb.ODEProblem(f, torch.ones(3, 1, dtype=torch.float64), T)
    grads = []
    for compile in (True, False):
        breaks = sum(counters["graph_break"].values())
        with pytest.warns(RuntimeWarning, match="sample 1: Unstable"):
            sol = pb.solve(prob, pb.Tsit5(), batch="lockstep", rtol=1e-8, atol=1e-10, compile=compile)
        assert sum(counters["graph_break"].values()) == breaks
        grads.append(torch.autograd.grad(sol.ys[-1, [0, 2]].sum(), p)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=0)
