"""engine="julia": what can be checked without Julia, and the conformance tests that need it.

No machine of this project has a Julia runtime (JULIA.md). Tested here: every .jl file parses, the
Julia environment files agree, and the Python side's pure logic (name/option/return-code mapping,
zero-copy views over foreign memory, the callbacks Julia calls — run on numpy-owned memory — and
assembling a Solution from the arrays Julia returns). The conformance tests at the bottom solve
with engine="julia" and skip with a reason when juliacall cannot start Julia. Julia is never mocked.
"""
import ctypes
import functools
import importlib.util
import json
import pathlib
import subprocess
import sys
import tomllib

import numpy as np
import pytest
import torch

import pybridge as pb
from pybridge.julia_engine import bridge as jbridge
from pybridge.julia_engine import engine as jengine
from pybridge.julia_engine import mapping, runtime, views
from pybridge.solution import ReturnCode

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ Julia sources and environment
def julia_files():
    return sorted((ROOT / "julia").rglob("*.jl"))


def test_julia_files_parse_without_error_nodes():
    ts = pytest.importorskip("tree_sitter", reason="pip install tree-sitter tree-sitter-julia")
    tsj = pytest.importorskip("tree_sitter_julia", reason="pip install tree-sitter-julia")
    parser = ts.Parser(ts.Language(tsj.language()))
    files = julia_files()
    assert files, "no .jl files under julia/"
    problems = []
    for path in files:
        tree = parser.parse(path.read_bytes())
        stack = [tree.root_node]
        while stack:
            node = stack.pop()
            if node.type == "ERROR" or node.is_missing:
                kind = "missing " + node.type if node.is_missing else "syntax error"
                problems.append(f"{path.relative_to(ROOT)}:{node.start_point[0] + 1}: {kind}")
            elif node.has_error:
                stack.extend(node.children)
    assert not problems, "\n".join(problems)


def test_parser_check_catches_a_syntax_error():
    ts = pytest.importorskip("tree_sitter")
    tsj = pytest.importorskip("tree_sitter_julia")
    tree = ts.Parser(ts.Language(tsj.language())).parse(b"function f(x)\n  x +\n")
    assert tree.root_node.has_error


def test_environment_files_agree():
    root = tomllib.loads((ROOT / "Project.toml").read_text())
    pkg = tomllib.loads((ROOT / "julia" / "Project.toml").read_text())
    jpkg = json.loads((ROOT / "pybridge" / "juliapkg.json").read_text())
    assert pkg["name"] == "PyBridge"
    deps = dict(root["deps"])
    assert deps.pop("Test") == pkg["extras"]["Test"]
    assert deps == pkg["deps"], "Project.toml and julia/Project.toml list different dependencies"
    assert {k: v["uuid"] for k, v in jpkg["packages"].items()} == deps
    for name in deps:
        assert root["compat"][name] == pkg["compat"][name] == jpkg["packages"][name]["version"], name
    assert root["compat"]["julia"] == jpkg["julia"]
    # every package the Julia module loads is a dependency, and vice versa
    src = (ROOT / "julia" / "src" / "PyBridge.jl").read_text()
    used = {w for line in src.splitlines() if line.startswith(("using ", "import "))
            for w in [line.split()[1].rstrip(":,")]}
    assert used == set(deps)


def test_wheel_ships_the_julia_side(tmp_path):
    """A pip-installed pybridge (no repository checkout) must still find PyBridge.jl and juliapkg.json."""
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if rel.startswith("pybridge/") or rel in ("pyproject.toml", "README.md"):
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_bytes((ROOT / rel).read_bytes())
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    import zipfile
    (wheel,) = (tmp_path / "dist").glob("pybridge-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "pybridge/julia_engine/PyBridge.jl" in names and "pybridge/juliapkg.json" in names
    assert runtime.JULIA_SOURCE.is_file()
    # the Julia package's source is the same file (a link), so the two cannot drift apart
    assert (ROOT / "julia" / "src" / "PyBridge.jl").resolve() == runtime.JULIA_SOURCE


# ------------------------------------------------------------------ solver names and options
def _named(name, **attrs):
    return type(name, (), attrs)()


@pytest.mark.parametrize("name", sorted(mapping.EXPLICIT | mapping.IMPLICIT))
def test_solver_names_map_one_to_one(name):
    spec = mapping.solver_spec(_named(name))
    assert spec.name == name and spec.stiff is None
    assert spec.implicit == (name in mapping.IMPLICIT)


def test_pybridge_solver_classes_map():
    for cls in pb.solvers.EXPLICIT:
        assert mapping.solver_spec(cls()).julia_expr == f"{cls.__name__}()"


def test_composite_reads_stiff_attribute():
    spec = mapping.solver_spec(_named("AutoTsit5", stiff=_named("Rosenbrock23")))
    assert (spec.name, spec.stiff, spec.implicit) == ("AutoTsit5", "Rosenbrock23", True)
    assert spec.julia_expr == "AutoTsit5(Rosenbrock23(autodiff=AutoFiniteDiff()))"
    assert mapping.solver_spec(_named("AutoVern7", stiff=_named("Rodas5P"))).stiff == "Rodas5P"
    with pytest.raises(ValueError, match="stiff method"):
        mapping.solver_spec(_named("AutoTsit5", stiff=_named("Tsit5")))
    with pytest.raises(ValueError, match=r"\.stiff"):
        mapping.solver_spec(_named("AutoVern7"))


def test_unknown_and_sde_solvers_are_refused_clearly():
    with pytest.raises(ValueError, match="SDE method.*engine='torch'"):
        mapping.solver_spec(_named("SOSRI"))
    with pytest.raises(ValueError, match="no DifferentialEquations.jl counterpart.*Tsit5"):
        mapping.solver_spec(_named("MyHomemadeRK"))


def test_options_map_to_solve_kwargs():
    o = mapping.solve_options(rtol=1e-5, atol=1e-7, dt=None, adaptive=True, dtmin=1e-9, dtmax=None,
                              max_steps=123, dense=True, t0=0.0, t1=-2.0)
    assert o == dict(reltol=1e-5, abstol=1e-7, dt=0.0, adaptive=True, dtmin=1e-9, dtmax=2.0,
                     maxiters=123, dense=True)
    o = mapping.solve_options(rtol=1e-3, atol=1e-6, dt=0.1, adaptive=False, dtmin=0.0, dtmax=0.5,
                              max_steps=10, dense=False, t0=0.0, t1=1.0)
    assert (o["dt"], o["adaptive"], o["dtmax"], o["maxiters"]) == (0.1, False, 0.5, 10)


def test_sensealg_names():
    assert mapping.sensealg_name(None) == "GaussAdjoint"
    assert mapping.sensealg_name(pb.adjoint.DiscreteAdjoint()) == "GaussAdjoint"
    assert mapping.sensealg_name(_named("QuadratureAdjoint")) == "QuadratureAdjoint"


def test_return_codes_map():
    assert mapping.map_retcode("Success") == ReturnCode.Success
    assert mapping.map_retcode("MaxIters") == ReturnCode.MaxIters
    assert mapping.map_retcode("DtLessThanMin") == ReturnCode.DtLessThanMin
    assert mapping.map_retcode("DtNaN") == ReturnCode.Unstable
    assert mapping.map_retcode("ConvergenceFailure") == ReturnCode.ConvergenceFailure
    assert mapping.map_retcode("SomethingNew") == ReturnCode.Unstable


# ------------------------------------------------------------------ zero-copy views
def test_view_writes_through_to_foreign_memory():
    buf = (ctypes.c_double * 6)(*range(6))
    cache = views.ViewCache(torch.float64, lambda n: (2, 3))
    v = cache(ctypes.addressof(buf), 6)
    assert v.shape == (2, 3) and v[1, 2] == 5
    v[0, 1] = 42.0
    assert buf[1] == 42.0
    assert cache(ctypes.addressof(buf), 6) is v and cache.created == 1  # cached, no new view


def test_batch_is_a_column_major_matrix_over_the_same_memory():
    n, B = 3, 4
    julia_matrix = np.asfortranarray(np.arange(n * B, dtype=np.float64).reshape(n, B))  # n × B
    cache = views.ViewCache(torch.float64, lambda length: (B, n))
    v = cache(julia_matrix.ctypes.data, julia_matrix.size)
    assert torch.equal(v, torch.from_numpy(np.ascontiguousarray(julia_matrix.T)))  # sample b = column b
    v[2].fill_(-1.0)
    assert (julia_matrix[:, 2] == -1).all()
    f32 = np.zeros(5, dtype=np.float32)
    assert views.ViewCache(torch.float32, lambda k: (k,))(f32.ctypes.data, 5).dtype == torch.float32


def test_returned_julia_array_reads_time_first_without_copy():
    n, B, T = 2, 3, 4
    ys = np.asfortranarray(np.random.rand(n, B, T))  # as Julia returns values: n × B × T
    t = views.from_julia_array(ys, torch.float64)
    assert t.shape == (T, B, n) and t.is_contiguous()
    assert t.data_ptr() == ys.ctypes.data
    assert t[3, 1, 0] == ys[0, 1, 3]


# ------------------------------------------------------------------ the callbacks Julia calls
class Lin(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.lin = torch.nn.Linear(n, n).double()

    def forward(self, t, y):
        return torch.tanh(self.lin(y)) * (1 + t[..., None] if t.dim() else 1 + t)


def _buffers(*shapes):
    return [np.asfortranarray(np.random.rand(*s)) for s in shapes]


def _addr(a):
    return a.ctypes.data, a.size


def test_rhs_callback_writes_f_into_julia_memory():
    n, B = 3, 2
    f = Lin(n)
    br = jbridge.Bridge(f, (B, n), (), torch.float64, B, n, list(f.parameters()))
    u, du = _buffers((n, B), (n, B))
    tbuf = np.array([0.3])
    br.rhs(*_addr(du), *_addr(u), tbuf.ctypes.data)
    expect = f(torch.tensor(0.3, dtype=torch.float64), torch.from_numpy(u.T.copy())).detach()
    assert np.allclose(du.T, expect.numpy())


def test_jacobian_callback_fills_block_diagonal_nonzeros():
    n, B = 2, 3
    f = Lin(n)
    br = jbridge.Bridge(f, (B, n), (), torch.float64, B, n)
    u = _buffers((n, B))[0]
    nz = np.zeros(B * n * n)  # nonzeros of the sparse block-diagonal J, column-major per block
    tbuf = np.array([0.1])
    br.jac(*_addr(nz), *_addr(u), tbuf.ctypes.data)
    y = torch.from_numpy(u.T.copy())
    for b in range(B):
        Jb = torch.func.jacfwd(lambda z: f(torch.tensor(0.1, dtype=torch.float64), z))(y[b:b + 1])
        Jb = Jb.reshape(n, n)
        block = nz[b * n * n:(b + 1) * n * n].reshape(n, n, order="F")  # Julia's n×n block
        assert np.allclose(block, Jb.detach().numpy())


def test_tgrad_and_vjp_callbacks_match_autograd():
    n, B = 3, 2
    f = Lin(n)
    params = list(f.parameters())
    br = jbridge.Bridge(f, (B, n), (), torch.float64, B, n, params)
    u, lam, out = _buffers((n, B), (n, B), (n, B))
    tbuf = np.array([0.4])
    P = sum(p.numel() for p in params)
    outp = np.zeros(P)
    br.vjp_u(*_addr(out), *_addr(lam), *_addr(u), tbuf.ctypes.data)
    br.vjp_p(*_addr(outp), *_addr(lam), *_addr(u), tbuf.ctypes.data)
    y = torch.from_numpy(u.T.copy()).requires_grad_(True)
    fx = f(torch.tensor(0.4, dtype=torch.float64), y)
    gy, *gp = torch.autograd.grad(fx, [y] + params, torch.from_numpy(lam.T.copy()))
    assert np.allclose(out.T, gy.numpy())
    assert np.allclose(outp, torch.cat([g.reshape(-1) for g in gp]).numpy())
    dT = np.zeros((n, B), order="F")
    br.tgrad(*_addr(dT), *_addr(u), tbuf.ctypes.data)
    h = 1e-6
    fd = (f(torch.tensor(0.4 + h, dtype=torch.float64), y) - f(torch.tensor(0.4 - h, dtype=torch.float64), y)) / (2 * h)
    assert np.allclose(dT.T, fd.detach().numpy(), atol=1e-7)


def test_callback_errors_are_kept_for_the_engine():
    br = jbridge.Bridge(lambda t, y: y[:, :1], (2, 3), (), torch.float64, 2, 3)
    u, du = _buffers((3, 2), (3, 2))
    with pytest.raises(ValueError, match="f returned shape"):
        br.rhs(*_addr(du), *_addr(u), np.zeros(1).ctypes.data)
    assert isinstance(br.error, ValueError)


# ------------------------------------------------------------------ from Julia's arrays to a Solution
def _raw(ys, steps, retcode="Success"):
    k = len(steps)
    return dict(ys=ys, retcode=retcode, nf=6 * k + 1, naccept=k, nreject=1, njacs=0, nw=0, nsolve=0,
                trace_t=np.asarray(steps, float), trace_dt=np.diff([0.0] + list(steps)),
                trace_eest=np.full(k, 0.5), trace_stiffness=np.full(k, np.nan),
                t_final=steps[-1], dt_final=steps[-1] - (steps[-2] if k > 1 else 0))


def test_assemble_lockstep_solution():
    B, n, T = 3, 2, 4
    prob = pb.ODEProblem(lambda t, y: -y, torch.ones(B, n, dtype=torch.float64), torch.linspace(0, 1, T))
    groups = jengine.make_groups(prob, lockstep=True, rtol=1e-3, atol=1e-6)
    assert len(groups) == 1 and groups[0].y0.shape == (B, n)
    ys = np.asfortranarray(np.random.rand(n, B, T))
    sol = jengine.assemble(prob, pb.Tsit5(), groups, [_raw(ys, [0.3, 0.7, 1.0])])
    assert sol.ys.shape == (T, B, n) and sol.ys[2, 1, 0] == ys[0, 1, 2]
    assert sol.retcode.tolist() == [0, 0, 0] and sol.success
    assert sol.stats.naccept.tolist() == [3, 3, 3] and sol.stats.nfe.shape == (B,)
    assert sol.trace.t.shape == (B, 3) and sol.trace.mask.all()
    assert sol.extras["engine"] == "julia"


def test_assemble_independent_solution_pads_trace_and_keeps_failures():
    B, n, T = 2, 1, 3
    t = torch.tensor([[0.0, 0.5, 1.0], [0.0, 1.0, 2.0]], dtype=torch.float64)
    prob = pb.ODEProblem(lambda t, y: -y, torch.ones(B, n, dtype=torch.float64), t)
    groups = jengine.make_groups(prob, lockstep=False, rtol=torch.full((n,), 1e-4, dtype=torch.float64),
                                 atol=1e-6)
    assert [g.rows for g in groups] == [slice(0, 1), slice(1, 2)]
    assert torch.equal(groups[1].ts, t[1]) and groups[0].rtol.shape == (1, n)
    y_a = np.asfortranarray(np.ones((n, 1, T)))
    y_b = np.asfortranarray(np.array([1.0, 0.5, np.nan]).reshape(n, 1, T))
    sol = jengine.assemble(prob, pb.Tsit5(), groups,
                           [_raw(y_a, [0.4, 1.0]), _raw(y_b, [0.6, 1.1, 1.2, 1.3], "MaxIters")])
    assert sol.retcode.tolist() == [ReturnCode.Success, ReturnCode.MaxIters]
    assert torch.isnan(sol.ys[2, 1, 0]) and sol.ys[1, 1, 0] == 0.5
    assert sol.trace.mask.tolist() == [[True, True, False, False], [True] * 4]
    assert sol.trace.t[0, 2] == 0 and sol.extras["julia_retcode"] == ["Success", "MaxIters"]


def test_unbatched_solution_has_no_batch_axis():
    prob = pb.ODEProblem(lambda t, y: -y, torch.ones(2, dtype=torch.float64), torch.linspace(0, 1, 3))
    groups = jengine.make_groups(prob, lockstep=False, rtol=1e-3, atol=1e-6)
    sol = jengine.assemble(prob, pb.Tsit5(), groups, [_raw(np.asfortranarray(np.ones((2, 1, 3))), [1.0])])
    assert sol.ys.shape == (3, 2) and sol.retcode.shape == () and sol.trace.t.shape == (1,)


# ------------------------------------------------------------------ without juliacall
def test_missing_juliacall_gives_install_instructions():
    if importlib.util.find_spec("juliacall") is not None:
        pytest.skip("juliacall is installed here")
    prob = pb.ODEProblem(lambda t, y: -y, torch.ones(2), torch.linspace(0, 1, 3))
    with pytest.raises(ImportError) as e:
        pb.solve(prob, pb.Tsit5(), engine="julia")
    msg = str(e.value)
    assert isinstance(e.value, runtime.JuliaUnavailableError)
    assert 'pip install "pybridge[julia]"' in msg
    assert "PYTHON_JULIACALL_EXE" in msg and "PYTHON_JULIACALL_PROJECT" in msg


# ------------------------------------------------------------------ conformance (needs Julia)
@functools.lru_cache(maxsize=None)
def julia_unavailable_reason():
    if importlib.util.find_spec("juliacall") is None:
        return "juliacall is not installed; no Julia runtime on this machine"
    code = "import juliacall; from juliacall import Main as jl; jl.seval('1+1')"
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=600)
    except subprocess.TimeoutExpired:
        return "juliacall did not start Julia within 600 s"
    if r.returncode != 0:
        return "juliacall cannot start Julia: " + r.stderr.decode(errors="replace")[-300:]
    return None


@pytest.fixture
def julia():
    reason = julia_unavailable_reason()
    if reason:
        pytest.skip(reason)


def test_julia_exp_decay_matches_exact(julia):
    t = torch.linspace(0, 2, 5, dtype=torch.float64)
    prob = pb.ODEProblem(lambda t, y: -0.5 * y, torch.tensor([1.0, 2.0], dtype=torch.float64), t)
    sol = pb.solve(prob, pb.Tsit5(), engine="julia", rtol=1e-8, atol=1e-10)
    exact = torch.exp(-0.5 * t)[:, None] * torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert sol.success and torch.allclose(sol.ys, exact, rtol=1e-6)
    assert sol.trace.mask.sum() == sol.stats.naccept and (sol.trace.eest[sol.trace.mask] <= 1).all()


@pytest.mark.parametrize("batch", ["independent", "lockstep"])
def test_julia_batch(julia, batch):
    y0 = torch.tensor([[1.0], [3.0]], dtype=torch.float64)
    t = torch.linspace(0, 1, 4, dtype=torch.float64)
    sol = pb.solve(pb.ODEProblem(lambda t, y: -y, y0, t), pb.DP5(), engine="julia", batch=batch,
                   rtol=1e-8, atol=1e-10, dense=True)
    assert sol.ys.shape == (4, 2, 1) and sol.retcode.shape == (2,)
    assert torch.allclose(sol.ys[-1, :, 0], y0[:, 0] * torch.exp(torch.tensor(-1.0)), rtol=1e-6)
    assert torch.allclose(sol(torch.tensor([0.5], dtype=torch.float64))[0, :, 0],
                          y0[:, 0] * torch.exp(torch.tensor(-0.5)), rtol=1e-6)


def test_julia_gradient_through_adjoint(julia):
    theta = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([1.5], dtype=torch.float64, requires_grad=True)
    t = torch.linspace(0, 2, 5, dtype=torch.float64)
    sol = pb.solve(pb.ODEProblem(lambda t, y: -theta * y, y0, t), pb.Tsit5(), engine="julia",
                   rtol=1e-9, atol=1e-11, adjoint_params=[theta])
    sol.ys.sum().backward()
    assert torch.allclose(y0.grad, torch.exp(-0.7 * t).sum().reshape(1), rtol=1e-5)
    assert torch.allclose(theta.grad, -(t * 1.5 * torch.exp(-0.7 * t)).sum(), rtol=1e-5)
