"""Smoke test of the benchmark suite (issue 7): every benchmark module imports, and the stiff and
non-stiff benchmarks run end to end on tiny sizes (one tolerance, two samples, two contenders each),
render their RESULTS.md sections and draw their plots — into a temporary directory, never into
benchmarks/. A broken benchmark fails here rather than at `make bench` time."""
from __future__ import annotations

import importlib

import pytest

pytest.importorskip("scipy")
pytest.importorskip("torchdiffeq")


def test_modules_import():
    for name in ("benchmarks.report", "benchmarks.overhead", "benchmarks.stiff", "benchmarks.nonstiff", "benchmarks.sde",
                 "benchmarks.__main__"):
        mod = importlib.import_module(name)
        assert callable(getattr(mod, "main", None)) or name == "benchmarks.report", name


def test_write_section_keeps_other_sections(tmp_path, monkeypatch):
    from benchmarks import overhead
    from benchmarks.report import write_section
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n## Overhead (issue 2)\n\nold overhead text\n")
    write_section("stiff", "## Stiff\n\nfirst", path)
    write_section("nonstiff", "## Non-stiff\n\nx", path)
    write_section("stiff", "## Stiff v2\n\nsecond", path)
    # overhead.py's own heading-delimited writer, pointed at the temporary file
    monkeypatch.setattr(overhead, "RESULTS", path)
    overhead.write_section(overhead.SECTION + "\n\nnew overhead text\n")
    text = path.read_text()
    assert "second" in text and "first" not in text and "## Stiff v2" in text and "## Stiff\n" not in text
    assert "new overhead text" in text and "old overhead text" not in text
    for key in ("stiff", "nonstiff"):
        assert text.count(f"<!-- begin: {key} -->") == 1 and text.count(f"<!-- end: {key} -->") == 1
    assert text.index("## Non-stiff") < text.index("<!-- begin: nonstiff -->") < text.index("x\n<!-- end: nonstiff")


def test_stiff_quick(tmp_path, capsys):
    from benchmarks import stiff
    results = stiff.main(["--quick", "--problems", "kin20", "--solvers", "Rodas5P,Radau,-compile,-jac", "--rtols", "1e-1",
                          "--batch", "2", "--ref-samples", "1", "--ref-rtol", "1e-6", "--no-write"])
    _, res, _ = results["kin20"]
    for mode in ("single", "batch"):
        assert set(res[mode]) == {"pybridge Rodas5P", "SciPy Radau"}
        for pts in res[mode].values():
            assert all("error" not in p and p["err"] < 1e-1 for p in pts), pts
    assert "## Stiff work–precision" in capsys.readouterr().out
    stiff.plot(results, tmp_path / "stiff.png")
    assert (tmp_path / "stiff.png").stat().st_size > 0


def test_stiff_analytic_jacobians_match_autodiff():
    """The "(jac…)" contenders' analytic Jacobians (Problem.torch_jac) equal pybridge's autodiff
    Jacobian and SciPy's jac_np, batched (per-sample rates) and for one unbatched sample."""
    import numpy as np
    import torch
    from benchmarks import stiff
    from pybridge.torch_engine.jacobian import AutodiffJacobian
    for prob in stiff.make_problems().values():
        ks = prob.perturbed(3)
        y = torch.as_tensor(np.random.default_rng(0).uniform(0.01, 1.0, (3, prob.n)))
        t = torch.zeros(3, dtype=torch.float64)
        J = prob.torch_jac(ks)(t, y)
        J_ad, _ = AutodiffJacobian()(prob.torch_f(ks), t, y)
        assert J.shape == (3, prob.n, prob.n)
        torch.testing.assert_close(J, J_ad, rtol=1e-13, atol=1e-13 * float(J_ad.abs().max()))
        J_np = np.stack([prob.jac_np(0.0, y[i].numpy(), ks[i]) for i in range(3)])
        np.testing.assert_allclose(J.numpy(), J_np, rtol=1e-13, atol=1e-13 * np.abs(J_np).max())
        torch.testing.assert_close(prob.torch_jac(prob.k)(t[0], y[0]), J_ad.new_tensor(prob.jac_np(0.0, y[0].numpy(), prob.k)),
                                   rtol=1e-13, atol=1e-13 * float(J_ad.abs().max()))


def test_nonstiff_quick(tmp_path, capsys):
    from benchmarks import nonstiff
    wps, med = nonstiff.main(["--quick", "--problems", "lotka", "--solvers", "pybridge Tsit5,torchdiffeq",
                              "--rtols", "1e-3", "--batch", "2", "--medium-batch", "4", "--no-write"])
    curves = wps["lotka"]["curves"]
    assert set(curves) == {"pybridge Tsit5", "torchdiffeq dopri5"}
    assert all("error" not in p and p["err"] < 1 for pts in curves.values() for p in pts), curves
    assert med["rows"] and all("error" not in r for r in med["rows"])
    assert "## Non-stiff work–precision" in capsys.readouterr().out
    nonstiff.plot(wps, tmp_path / "nonstiff.png")
    assert (tmp_path / "nonstiff.png").stat().st_size > 0
