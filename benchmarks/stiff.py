"""Stiff work–precision and batch throughput (issue 4).

    python -m benchmarks.stiff [--quick] [--repeats 3] [--batch 256] [--ref-samples 8] [--no-write]
    python -m benchmarks.stiff --problems rober --no-write --json-out /tmp/rober.json   # one problem
    python -m benchmarks.stiff --merge /tmp/rober.json,/tmp/vdpol_mu.json,/tmp/kin20.json  # render + write
Options for shorter runs: --problems, --solvers (name fragments), --rtols, --rtol-min, --ref-rtol.

Problems (float64):
  rober     Robertson kinetics (Bari IVP test set), n = 3, t ∈ [0, 1e11], k = (0.04, 1e4, 3e7).
  vdpol_mu  van der Pol, mu = 1000, n = 2, t ∈ [0, 2000], y0 = (2, 0).
  kin20     a 20-species stiff mass-action network written for this benchmark (`kin20_network`):
            a reversible chain y_i ⇌ y_{i+1} (i = 0..18) with forward rates spread over
            0.1 … 1e4 (kf_i = 10^(-1 + 5·((7i) mod 19)/18), kb_i = 0.3·kf_i), catalysed conversions
            y_i + y_{i+3} → y_{i+1} + y_{i+3} (i = 0, 2, …, 16; k = 100), a fast ROBER-like
            autocatalytic pair 2·y_9 → y_9 + y_10 (k = 3e5) and y_10 + y_12 → y_9 + y_12 (k = 1e4),
            and a slow recycle y_19 → y_0 (k = 0.05). Every reaction converts one molecule into
            another, so Σ y = 1 is conserved. y0 = e_0, t ∈ [0, 5] (still transient: the slowest
            non-zero mode decays at ~0.2). The Jacobian's eigenvalues
            span ~1e-2 … ~1e4 (stiffness ratio ~1e6).
Single problem: the nominal parameters. Batch: B parameter sets, every rate constant (mu for
vdpol_mu) multiplied by exp(0.1·N(0, 1)) (numpy default_rng(1234)).

Contenders: pybridge Rosenbrock23 / Rodas4 / Rodas5P (and Kvaerno5 when `pb.Kvaerno5` exists),
Jacobians by pybridge's automatic differentiation (reverse mode, batched), batch = "independent" (every sample its own steps);
pybridge Rosenbrock23 / Rodas5P with solve(compile=True) (each loop iteration one torch.compile'd
graph, Jacobian by torch.func.jacrev inside it; compiled in the untimed warm-up, which is logged);
pybridge "(jac…)" contenders: Rodas5P eager and Rosenbrock23 / Rodas5P compiled, given the analytic
Jacobian through ODEProblem(jac=...) (`Problem.torch_jac`, the batched twin of the `jac_np` SciPy gets);
SciPy solve_ivp Radau / BDF / LSODA with the analytic Jacobian, looped over the samples; diffrax
Kvaerno5 (jax.jit; jax.vmap over the batch; tolerances are traced arguments so each problem
compiles once; compile time excluded). One thread everywhere (torch.set_num_threads(1),
OMP_NUM_THREADS=1, XLA_FLAGS=--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1).

Accuracy: error = max_i |y_i(t1) − ref_i| / (|ref_i| + floor) at the final time (max also over
the reference samples for the batch); floor: rober 1e-30 (plain relative error, the solution is
resolved down to y2 ~ 1e-13), vdpol_mu 1e-3, kin20 1e-8. atol = rtol × ratio (rober 1e-6,
vdpol_mu 1e-3, kin20 1e-6). References: rober and vdpol_mu single from tests/data/reference.json
(a copy of ../shared/problems/reference.json); kin20 single and every batch reference sample from
SciPy Radau at rtol 1e-12 (its agreement with reference.json on the nominal rober / vdpol_mu is printed). For the
batch, errors are measured on the first K samples (--ref-samples), and SciPy's loop is timed on
those K samples; throughput = samples / wall (pybridge and diffrax solve all B at once).

Targets (issue 4): batch throughput ≥ 10× SciPy (the fastest SciPy method at equal achieved error,
log-log interpolated), and single problem within 2× of SciPy Radau's wall at equal error.
Writes the `stiff` block of benchmarks/RESULTS.md and benchmarks/plots/stiff.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import report

report.single_thread_env()

import numpy as np  # noqa: E402
import torch  # noqa: E402

import pybridge as pb  # noqa: E402

REFERENCE = Path(__file__).resolve().parents[1] / "tests" / "data" / "reference.json"  # copy of ../shared/problems
SECTION = "stiff"
SIGMA = 0.1
SEED = 1234
REF_RTOL = 1e-12


# ---------------------------------------------------------------------------------------------
# Problems, written once for torch / numpy / jax through a tiny backend shim

class _Ops:
    def __init__(self, xp, name):
        self.xp, self.name = xp, name

    def stack(self, xs):
        return self.xp.stack(xs, -1) if self.name == "torch" else self.xp.stack(xs, axis=-1)


def kin20_network():
    """Reactions (src, dst, a, b, k): rate k·y_a·y_b converts one src into one dst (index 20 = 1)."""
    n, one = 20, 20
    rx = []
    for i in range(n - 1):
        kf = 10.0 ** (-1 + 5 * ((7 * i) % 19) / 18)
        rx.append((i, i + 1, i, one, kf))
        rx.append((i + 1, i, i + 1, one, 0.3 * kf))
    for i in range(0, 17, 2):
        rx.append((i, i + 1, i, i + 3, 100.0))
    rx.append((9, 10, 9, 9, 3e5))
    rx.append((10, 9, 10, 12, 1e4))
    rx.append((19, 0, 19, one, 0.05))
    src, dst, a, b, k = (np.array(c) for c in zip(*rx))
    S = np.zeros((n, len(rx)))
    S[src, np.arange(len(rx))] -= 1
    S[dst, np.arange(len(rx))] += 1
    return S, a.astype(int), b.astype(int), k.astype(float)


KIN_S, KIN_A, KIN_B, KIN_K = kin20_network()


def kin20_jacobian_entries():
    """∂f/∂y as sparse entries: J[i, j] += S[i, r]·k_r·y_ext[o] for every reaction r, every factor
    y_j (j < 20) of its rate k_r·y_a·y_b, o the other factor, and every species i that r changes.
    Returns (flat index i·n + j, S[i, r], r, o) arrays (a rate y_9·y_9 gives two entries, 2·k·y_9)."""
    n, out = KIN_S.shape[0], []
    for r, (a, b) in enumerate(zip(KIN_A, KIN_B)):
        for j, o in ((a, b), (b, a)):
            out += [(i * n + j, KIN_S[i, r], r, o) for i in np.flatnonzero(KIN_S[:, r]) if j < n]
    return tuple(np.array(c) for c in zip(*out))


@dataclass
class Problem:
    name: str
    title: str
    n: int
    t1: float
    y0: np.ndarray
    k: np.ndarray
    floor: float
    atol_ratio: float
    ref: np.ndarray = None          # nominal reference (None: computed with Radau)
    consts: dict = field(default_factory=dict)

    def f(self, ops, t, y, k, c):
        if self.name == "rober":
            y1, y2, y3 = y[..., 0], y[..., 1], y[..., 2]
            k1, k2, k3 = k[..., 0], k[..., 1], k[..., 2]
            return ops.stack([-k1 * y1 + k2 * y2 * y3, k1 * y1 - k2 * y2 * y3 - k3 * y2 ** 2, k3 * y2 ** 2])
        if self.name == "vdpol_mu":
            y1, y2 = y[..., 0], y[..., 1]
            return ops.stack([y2, k[..., 0] * (1 - y1 ** 2) * y2 - y1])
        # kin20: rates = k ⊙ y_ext[a] ⊙ y_ext[b], dy = rates Sᵀ
        if ops.name == "torch":
            yext = torch.cat([y, torch.ones_like(y[..., :1])], -1)
        else:
            yext = ops.xp.concatenate([y, ops.xp.ones_like(y[..., :1])], axis=-1)
        rates = k * yext[..., c["a"]] * yext[..., c["b"]]
        return rates @ c["ST"]

    def jac_np(self, t, y, k):
        if self.name == "rober":
            k1, k2, k3 = k
            return np.array([[-k1, k2 * y[2], k2 * y[1]],
                             [k1, -k2 * y[2] - 2 * k3 * y[1], -k2 * y[1]],
                             [0.0, 2 * k3 * y[1], 0.0]])
        if self.name == "vdpol_mu":
            mu = k[0]
            return np.array([[0.0, 1.0], [-2 * mu * y[0] * y[1] - 1, mu * (1 - y[0] ** 2)]])
        yext = np.append(y, 1.0)
        R = len(k)
        dR = np.zeros((R, self.n + 1))
        np.add.at(dR, (np.arange(R), KIN_A), k * yext[KIN_B])
        np.add.at(dR, (np.arange(R), KIN_B), k * yext[KIN_A])
        return KIN_S @ dR[:, :self.n]

    # backends
    def torch_f(self, k):
        kt = torch.as_tensor(k, dtype=torch.float64)
        c = dict(a=torch.as_tensor(KIN_A), b=torch.as_tensor(KIN_B),
                 ST=torch.as_tensor(KIN_S.T.copy(), dtype=torch.float64))
        ops = _Ops(torch, "torch")
        return lambda t, y: self.f(ops, t, y, kt, c)

    def torch_jac(self, k):
        """The analytic ∂f/∂y, jac(t, y) -> (..., n, n) for ODEProblem(jac=...), batched over y's and
        k's leading dimensions: the torch twin of jac_np (tests/test_benchmarks_smoke.py checks it
        against autodiff)."""
        kt = torch.as_tensor(k, dtype=torch.float64)
        rows = lambda *r: torch.stack([torch.stack(torch.broadcast_tensors(*x), -1) for x in r], -2)
        if self.name == "rober":
            k1, k2, k3 = kt[..., 0], kt[..., 1], kt[..., 2]
            return lambda t, y: rows((-k1, k2 * y[..., 2], k2 * y[..., 1]),
                                     (k1, -k2 * y[..., 2] - 2 * k3 * y[..., 1], -k2 * y[..., 1]),
                                     (0 * k1, 2 * k3 * y[..., 1], 0 * k1))
        if self.name == "vdpol_mu":
            mu = kt[..., 0]
            return lambda t, y: rows((0 * mu, 1 + 0 * mu),
                                     (-2 * mu * y[..., 0] * y[..., 1] - 1, mu * (1 - y[..., 0] ** 2)))
        flat, coef, rx, other = (torch.as_tensor(x) for x in kin20_jacobian_entries())
        kc = kt[..., rx] * coef.double()       # the constant factor of every entry, per sample
        n = self.n

        def jac(t, y):
            yext = torch.cat([y, torch.ones_like(y[..., :1])], -1)
            val = kc * yext[..., other]
            return y.new_zeros(val.shape[:-1] + (n * n,)).index_add(-1, flat, val).view(val.shape[:-1] + (n, n))
        return jac

    def np_f(self):
        c = dict(a=KIN_A, b=KIN_B, ST=KIN_S.T.copy())
        ops = _Ops(np, "numpy")
        return lambda t, y, k: self.f(ops, t, y, k, c)

    def jax_f(self):
        import jax.numpy as jnp
        c = dict(a=jnp.asarray(KIN_A), b=jnp.asarray(KIN_B), ST=jnp.asarray(KIN_S.T.copy()))
        ops = _Ops(jnp, "jax")
        return lambda t, y, k: self.f(ops, t, y, k, c)

    def perturbed(self, B):
        rng = np.random.default_rng(SEED)
        return self.k[None, :] * np.exp(SIGMA * rng.standard_normal((B, len(self.k))))

    def error(self, y, ref):
        y, ref = np.atleast_2d(y), np.atleast_2d(ref)
        return float(np.max(np.abs(y - ref) / (np.abs(ref) + self.floor)))


def make_problems():
    refs = json.loads(REFERENCE.read_text()) if REFERENCE.exists() else {}
    get = lambda name: np.array(refs[name]["y_t1"]) if name in refs else None
    y0k = np.zeros(20)
    y0k[0] = 1.0
    return {
        "rober": Problem("rober", "ROBER (n = 3, t ∈ [0, 1e11])", 3, 1e11, np.array([1.0, 0.0, 0.0]),
                         np.array([0.04, 1e4, 3e7]), 1e-30, 1e-6, get("rober")),
        "vdpol_mu": Problem("vdpol_mu", "VDPOL-mu (mu = 1000, t ∈ [0, 2000])", 2, 2000.0, np.array([2.0, 0.0]),
                            np.array([1000.0]), 1e-3, 1e-3, get("vdpol_mu")),
        "kin20": Problem("kin20", "kin20 (20-species stiff kinetics, t ∈ [0, 5])", 20, 5.0, y0k,
                         KIN_K.copy(), 1e-8, 1e-6, None),
    }


# ---------------------------------------------------------------------------------------------
# Contenders: each run(prob, ks (B, p) or (p,), rtol) -> dict(y, nfe, njac, steps)

def pybridge_solvers():
    out = [("Rosenbrock23", pb.Rosenbrock23), ("Rodas4", pb.Rodas4), ("Rodas5P", pb.Rodas5P)]
    if hasattr(pb, "Kvaerno5"):
        out.append(("Kvaerno5", pb.Kvaerno5))
    return out


def run_pybridge(cls, compile=False, jac=False):
    def go(prob, ks, rtol):
        f = prob.torch_f(ks)
        jac_fn = prob.torch_jac(ks) if jac else None
        y0 = torch.as_tensor(prob.y0, dtype=torch.float64)
        if ks.ndim == 2:
            y0 = y0.expand(ks.shape[0], -1).clone()
        t = torch.tensor([0.0, prob.t1], dtype=torch.float64)
        sol = pb.solve(pb.ODEProblem(f, y0, t, jac=jac_fn), cls(), rtol=rtol, atol=rtol * prob.atol_ratio, compile=compile)
        bad = int((sol.retcode.reshape(-1) != 0).sum())
        if bad:
            raise RuntimeError(f"{bad} samples did not succeed")
        st = sol.stats
        steps = (st.naccept + st.nreject).reshape(-1).double()
        njac = st.njac.reshape(-1).double().mean().item() if st.njac is not None else None
        return dict(y=sol.ys[-1].numpy(), nfe=st.nfe.reshape(-1).double().mean().item(), njac=njac,
                    steps=steps.mean().item())
    return go


def run_scipy(method):
    from scipy.integrate import solve_ivp

    def go(prob, ks, rtol):
        f = prob.np_f()
        ks2 = np.atleast_2d(ks)
        ys, nfe, njac, steps = [], [], [], []
        for k in ks2:
            sol = solve_ivp(f, (0.0, prob.t1), prob.y0, method=method, rtol=rtol, atol=rtol * prob.atol_ratio,
                            jac=prob.jac_np, args=(k,))
            if sol.status != 0:
                raise RuntimeError(f"solve_ivp {method}: {sol.message}")
            ys.append(sol.y[:, -1])
            nfe.append(sol.nfev)
            njac.append(sol.njev)
            steps.append(len(sol.t) - 1)  # accepted steps
        y = np.array(ys) if ks.ndim == 2 else ys[0]
        return dict(y=y, nfe=float(np.mean(nfe)), njac=float(np.mean(njac)), steps=float(np.mean(steps)))
    return go


_JAX_CACHE = {}


def diffrax_available():
    import importlib.util
    return importlib.util.find_spec("diffrax") is not None and importlib.util.find_spec("jax") is not None


def run_diffrax(prob, ks, rtol):
    import diffrax as dfx
    import jax
    import jax.numpy as jnp
    jax.config.update("jax_enable_x64", True)
    batched = ks.ndim == 2
    key = (prob.name, batched)
    if key not in _JAX_CACHE:
        f = prob.jax_f()
        term = dfx.ODETerm(f)

        def one(y0, k, t1, rtol, atol):
            sol = dfx.diffeqsolve(term, dfx.Kvaerno5(), 0.0, t1, None, y0, args=k,
                                  stepsize_controller=dfx.PIDController(rtol=rtol, atol=atol),
                                  max_steps=200_000, throw=False)
            return sol.ys[-1], sol.stats["num_steps"], sol.stats["num_accepted_steps"], sol.result == dfx.RESULTS.successful

        fn = jax.jit(jax.vmap(one, in_axes=(None, 0, None, None, None)) if batched else one)
        _JAX_CACHE[key] = fn
        jax.block_until_ready(fn(jnp.asarray(prob.y0), jnp.asarray(ks), prob.t1, 1e-4,
                                 1e-4 * prob.atol_ratio))  # compile (t1 and tolerances are traced)
    fn = _JAX_CACHE[key]
    y, steps, _, ok = jax.block_until_ready(fn(jnp.asarray(prob.y0), jnp.asarray(ks), prob.t1, rtol,
                                               rtol * prob.atol_ratio))
    if not bool(np.all(np.asarray(ok))):
        raise RuntimeError("diffrax: some samples did not succeed")
    return dict(y=np.asarray(y), nfe=None, njac=None, steps=float(np.mean(np.asarray(steps))))


def rtol_lists(quick, override=None, rtol_min=0.0):
    out = _rtol_lists(quick, override)
    return {k: [r for r in v if r >= rtol_min] or v[:1] for k, v in out.items()}


def _rtol_lists(quick, override=None):
    if override:
        return {"default": override}
    if quick:
        return {"Rosenbrock23": [1e-3], "default": [1e-3, 1e-5]}
    # Rodas5P one decade further each way: at 1e-8 it lands just short of Radau's 1e-7 error on ROBER,
    # which left the comparison there to a slower method; at 1e-3 it is already ~50x more accurate
    # than SciPy's loosest points on kin20, where only an upper bound could be given.
    return {"Rosenbrock23": [1e-2, 1e-3, 1e-4, 1e-5], "Rodas5P": [1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9],
            "default": [1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8]}


def contenders(only=None):
    """All contenders, or those whose name contains one of the comma-separated words in `only` (and
    none of its words written with a leading '-')."""
    out = [(f"pybridge {n}", run_pybridge(c), "pybridge", n) for n, c in pybridge_solvers()]
    # solve(compile=True): one compiled graph per loop iteration; compiled in the untimed warm-up
    # (as diffrax's jit), the compile time is logged.
    out += [(f"pybridge {n} (compile=True)", run_pybridge(c, compile=True), "pybridge", n)
            for n, c in (("Rosenbrock23", pb.Rosenbrock23), ("Rodas5P", pb.Rodas5P))]
    # The analytic Jacobian SciPy's methods get, through ODEProblem(jac=...) instead of AD.
    out += [(f"pybridge {n} (jac{', compile=True' * c})", run_pybridge(cls, compile=c, jac=True), "pybridge", n)
            for n, cls, c in (("Rodas5P", pb.Rodas5P, False), ("Rosenbrock23", pb.Rosenbrock23, True),
                              ("Rodas5P", pb.Rodas5P, True))]
    out += [(f"SciPy {m}", run_scipy(m), "scipy", m) for m in ("Radau", "BDF", "LSODA")]
    if diffrax_available():
        out.append(("diffrax Kvaerno5 (jit; vmap on the batch)", run_diffrax, "diffrax", "Kvaerno5"))
    if only:
        words = [w.strip().lower() for w in only.split(",") if w.strip()]
        keep = [w for w in words if not w.startswith("-")]
        drop = [w[1:] for w in words if w.startswith("-")]
        out = [c for c in out if (not keep or any(w in c[0].lower() for w in keep))
               and not any(w in c[0].lower() for w in drop)]
    return out


# ---------------------------------------------------------------------------------------------

def references(prob, ks_batch, K, ref_rtol=REF_RTOL):
    """Nominal reference and the first K batch samples' references (SciPy Radau, rtol 1e-12)."""
    start = time.perf_counter()
    nominal_radau = _tight(prob, prob.k, ref_rtol)
    check = None
    if prob.ref is not None:
        check = prob.error(nominal_radau, prob.ref)
        nominal = prob.ref
    else:
        nominal = nominal_radau
    batch_ref = np.array([_tight(prob, k, ref_rtol) for k in ks_batch[:K]])
    return nominal, batch_ref, check, time.perf_counter() - start


def _tight(prob, k, ref_rtol=REF_RTOL):
    from scipy.integrate import solve_ivp
    sol = solve_ivp(prob.np_f(), (0.0, prob.t1), prob.y0, method="Radau", rtol=ref_rtol,
                    atol=ref_rtol * prob.atol_ratio, jac=prob.jac_np, args=(k,))
    if sol.status != 0:
        raise RuntimeError(f"reference solve failed: {sol.message}")
    return sol.y[:, -1]


def run_problem(prob, B, K, repeats, quick, log, only=None, rtols=None, ref_rtol=REF_RTOL, rtol_min=0.0):
    ks_batch = prob.perturbed(B)
    nominal, batch_ref, check, t_ref = references(prob, ks_batch, K, ref_rtol)
    log(f"[{prob.name}] references in {t_ref:.1f} s; Radau({ref_rtol:g}) vs reference.json: {check}")
    rt = rtol_lists(quick, rtols, rtol_min)
    res = {"single": {}, "batch": {}}
    short = dataclasses.replace(prob, t1=prob.t1 * 1e-3)
    for name, go, lib, meth in contenders(only):
        for mode in ("single", "batch"):
            warm = time.perf_counter()
            try:  # warm-up (first-call costs of torch.func, imports, JIT, compile) on a short span, untimed
                go(short, prob.k if mode == "single" else ks_batch[:K if lib == "scipy" else B], 1e-2)
            except Exception:
                pass
            log(f"[{prob.name}/{mode}] {name:28s} warm-up (untimed) {time.perf_counter() - warm:.1f} s")
            pts = []
            for rtol in rt.get(meth if lib == "pybridge" else "default", rt["default"]):
                try:
                    if mode == "single":
                        ks = prob.k
                        wall, nrep, out = report.timed(lambda: go(prob, ks, rtol), repeats)
                        err = prob.error(out["y"], nominal)
                        per_sample = wall
                        nsamp = 1
                    else:
                        ks = ks_batch[:K] if lib == "scipy" else ks_batch
                        wall, nrep, out = report.timed(lambda: go(prob, ks, rtol), repeats)
                        err = prob.error(np.asarray(out["y"])[:K], batch_ref)
                        nsamp = ks.shape[0]
                        per_sample = wall / nsamp
                    pts.append(dict(rtol=rtol, err=err, wall=wall, per_sample=per_sample, nsamp=nsamp, nrep=nrep,
                                    nfe=out["nfe"], njac=out["njac"], steps=out["steps"]))
                except Exception as exc:  # report, do not hide
                    pts.append(dict(rtol=rtol, error=f"{type(exc).__name__}: {str(exc)[:120]}"))
                p = pts[-1]
                log(f"[{prob.name}/{mode}] {name:28s} rtol {rtol:.0e} " +
                    (f"err {p['err']:.2e} wall {p['wall']:.3f}s ({p['nrep']}x) nfe {p['nfe']} steps {p['steps']}"
                     if "error" not in p else f"FAILED {p['error']}"))
            res[mode][name] = pts
    return res, check


# ---------------------------------------------------------------------------------------------

def compare(curves, lib_of, mode):
    """At each SciPy point's achieved error: best SciPy per-sample time vs best pybridge."""
    ok = lambda pts: [p for p in pts if "error" not in p]
    scipy = {n: ok(p) for n, p in curves.items() if lib_of[n] == "scipy"}
    pyb = {n: ok(p) for n, p in curves.items() if lib_of[n] == "pybridge"}
    rows = []
    for sname, spts in scipy.items():
        if mode == "single" and sname != "SciPy Radau":
            continue
        for p in spts:
            if mode == "batch":  # the fastest SciPy method at this error
                cand = [report.interp_at(v, p["err"], "per_sample") for v in scipy.values()]
                cand = [c for c in cand if c is not None] + [p["per_sample"]]
                cand += [q["per_sample"] for v in scipy.values() for q in v if q["err"] <= p["err"]]
                s_best = min(cand)
            else:
                s_best = p["per_sample"]
            best, best_name, bound = None, None, False
            for n, v in pyb.items():
                # log-log interpolation, or the cheapest point at least as accurate (an upper bound)
                c, b = report.interp_at(v, p["err"], "per_sample"), False
                c2 = min((q["per_sample"] for q in v if q["err"] <= p["err"]), default=None)
                if c2 is not None and (c is None or c2 < c):
                    c, b = c2, True
                if c is not None and (best is None or c < best):
                    best, best_name, bound = c, n, b
            rows.append(dict(ref=sname, rtol=p["rtol"], err=p["err"], scipy=s_best, pyb=best, pyb_name=best_name,
                             bound=bound))
    return rows


def render(results, args, total, checks, merged=0):
    run = (f"(whole run {total:.0f} s); {report.load_note()} at the end of the run" if not merged else
           f"from {merged} result files merged with --merge (when, with which code and under what load each "
           "ran: the note on load below)")
    L = ["## Stiff work–precision and batch throughput (issue 4)", "",
         f"Generated by `python -m benchmarks.stiff{' --quick' if args.quick else ''}` on {report.now()} "
         + run
         + (" — **quick smoke run: tiny sizes, numbers are not meaningful**" if args.quick else "") + ".", "",
         f"Machine: {report.machine()}.", "",
         f"Batch: {args.batch} perturbed parameter sets (every rate ×exp({SIGMA}·N(0,1))); errors on the first "
         f"{args.ref_samples} samples against SciPy Radau rtol {args.ref_rtol:g}; SciPy is looped over those "
         f"{args.ref_samples} samples and its throughput extrapolated per sample; pybridge and diffrax solve "
         f"all {args.batch}. Wall = median of up to {args.repeats} runs (one run when the first took > 2 s; "
         "the count is in brackets). NFE: right-hand-side evaluations per sample (mean), Jacobians in "
         "brackets (pybridge: reverse-mode AD, or the analytic one for the '(jac…)' contenders, not counted in "
         "NFE; SciPy: analytic); diffrax reports steps "
         "only. Error: max_i |y_i(t1) − ref_i| / (|ref_i| + floor), see the module docstring.", ""]
    if args.load_note:
        L += [f"Note on load: {args.load_note}", ""]
    verdicts = []
    for pname, (title, res, lib_of) in results.items():
        check = checks.get(pname)
        L += [f"### {title}", ""]
        if check is not None:
            L += [f"SciPy Radau at rtol {args.ref_rtol:g} against reference.json: error {check:.1e}.", ""]
        for mode in ("single", "batch"):
            curves = res[mode]
            L += [f"**{mode}**" + (" (per-sample wall = wall / samples)" if mode == "batch" else ""), "",
                  "| solver | rtol | error | wall | per sample | NFE (Jac) | steps |", "|---|---:|---:|---:|---:|---:|---:|"]
            for name, pts in curves.items():
                for p in pts:
                    if "error" in p:
                        L.append(f"| {name} | {p['rtol']:.0e} | — | — | — | — | failed: `{p['error']}` |")
                        continue
                    nfe = "—" if p["nfe"] is None else f"{p['nfe']:.0f}" + ("" if p["njac"] is None else f" ({p['njac']:.0f})")
                    L.append(f"| {name} | {p['rtol']:.0e} | {p['err']:.2e} | {report.fmt_s(p['wall'])} ({p['nrep']}) | "
                             f"{report.fmt_s(p['per_sample'])} | {nfe} | {p['steps']:.0f} |")
            rows = compare(curves, lib_of, mode)
            L.append("")
            if mode == "single":
                L += ["Target: pybridge (best method, log-log interpolated at Radau's achieved error; '≤': no pybridge "
                      "points bracket that error, so the cheapest pybridge point at least as accurate, an upper bound) "
                      "within 2× of SciPy Radau's wall.", "",
                      "| Radau rtol | error | Radau wall | best pybridge wall (method) | ratio | ≤ 2× |", "|---:|---:|---:|---:|---:|---|"]
                for r in rows:
                    if r["pyb"] is None:
                        L.append(f"| {r['rtol']:.0e} | {r['err']:.2e} | {report.fmt_s(r['scipy'])} | — (outside pybridge's range) | — | — |")
                        continue
                    ratio = r["pyb"] / r["scipy"]  # with a bound, the true ratio is at most this
                    hit = ratio <= 2
                    verdicts.append((pname, mode, hit))
                    L.append(f"| {r['rtol']:.0e} | {r['err']:.2e} | {report.fmt_s(r['scipy'])} | {'≤ ' * r['bound']}{report.fmt_s(r['pyb'])} "
                             f"({r['pyb_name']}) | {ratio:.1f}× | {'**hit**' if hit else '**MISSED**'} |")
            else:
                L += ["Target: throughput (samples/s) ≥ 10× the fastest SciPy method at equal achieved error "
                      "('≤' as above).", "",
                      "| at SciPy point | error | best SciPy per sample | best pybridge per sample (method) | speed-up | ≥ 10× |",
                      "|---|---:|---:|---:|---:|---|"]
                for r in rows:
                    if r["pyb"] is None:
                        L.append(f"| {r['ref']} {r['rtol']:.0e} | {r['err']:.2e} | {report.fmt_s(r['scipy'])} | — (outside pybridge's range) | — | — |")
                        continue
                    sp = r["scipy"] / r["pyb"]
                    hit = sp >= 10
                    verdicts.append((pname, mode, hit))
                    L.append(f"| {r['ref']} {r['rtol']:.0e} | {r['err']:.2e} | {report.fmt_s(r['scipy'])} | "
                             f"{'≤ ' * r['bound']}{report.fmt_s(r['pyb'])} ({r['pyb_name']}) | {sp:.2f}× | {'**hit**' if hit else '**MISSED**'} |")
            L.append("")
    L += ["### Verdicts", ""]
    for pname in results:
        for mode, target in (("single", "within 2× of Radau"), ("batch", "≥ 10× SciPy throughput")):
            v = [h for p, m, h in verdicts if p == pname and m == mode]
            if not v:
                L.append(f"- {pname} {mode} ({target}): no comparable accuracy range — **not measured**")
            else:
                L.append(f"- {pname} {mode} ({target}): {'**hit**' if all(v) else '**MISSED**'} "
                         f"({sum(v)} of {len(v)} comparable accuracy levels)")
    L += ["", "Plot: `benchmarks/plots/stiff.png` (per-sample wall against achieved error)."]
    return "\n".join(L) + "\n"


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(results), 2, figsize=(11, 3.6 * len(results)), squeeze=False)
    styles = {"pybridge": "-o", "scipy": "--s", "diffrax": ":^"}
    for i, (pname, (title, res, lib_of)) in enumerate(results.items()):
        for j, mode in enumerate(("single", "batch")):
            ax = axes[i][j]
            for name, pts in res[mode].items():
                pts = [p for p in pts if "error" not in p and p["err"] > 0]
                if pts:
                    ax.loglog([p["err"] for p in pts], [p["per_sample"] for p in pts], styles[lib_of[name]],
                              label=name, ms=4)
            report.finish_loglog_axes(ax, f"{title}: {mode}", "achieved error", "wall per sample (s)")
    report.save_figure(fig, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny batch, two tolerances")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--ref-samples", type=int, default=None)
    ap.add_argument("--problems", default="rober,vdpol_mu,kin20")
    ap.add_argument("--solvers", default="", help="comma-separated name fragments to keep, '-fragment' to drop "
                    "(default: all)")
    ap.add_argument("--rtols", default="", help="comma-separated rtols for every solver (default: per method)")
    ap.add_argument("--ref-rtol", type=float, default=REF_RTOL, help="rtol of the Radau references (smoke tests)")
    ap.add_argument("--rtol-min", type=float, default=0.0, help="drop tolerances below this (shorter runs)")
    ap.add_argument("--json-out", default="", help="also dump the raw results here (e.g. one problem per process)")
    ap.add_argument("--merge", default="", help="comma-separated --json-out files: render and write them, run nothing")
    ap.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md and plots alone")
    ap.add_argument("--load-note", default="", help="free text on machine load, printed in the section")
    args = ap.parse_args(argv)
    args.batch = args.batch or (4 if args.quick else 256)
    args.ref_samples = min(args.batch, args.ref_samples or (2 if args.quick else 8))
    if args.quick:
        args.repeats = 1
    torch.set_num_threads(1)
    start = time.perf_counter()
    if args.merge:
        results, checks, total = {}, {}, 0.0
        for path in args.merge.split(","):
            d = json.loads(Path(path).read_text())
            results.update({k: tuple(v) for k, v in d["results"].items()})
            checks.update(d["checks"])
            total += d.get("total", 0.0)
            kept = ("batch", "ref_samples", "ref_rtol", "repeats") + (() if args.load_note else ("load_note",))
            vars(args).update({k: v for k, v in d.get("args", {}).items() if k in kept})
        text = render(results, args, total, checks, merged=len(args.merge.split(",")))
        print(text)
        if not args.no_write:
            plot(results, report.PLOTS / "stiff.png")
            report.write_section(SECTION, text)
            (report.PLOTS / "stiff.json").write_text(json.dumps(dict(results=results, checks=checks), indent=1))
        return results
    probs = make_problems()
    results, checks = {}, {}
    lib_of = {name: lib for name, _, lib, _ in contenders()}
    rtols = [float(x) for x in args.rtols.split(",") if x.strip()] or None
    for pname in args.problems.split(","):
        prob = probs[pname]
        res, check = run_problem(prob, args.batch, args.ref_samples, args.repeats, args.quick,
                                 lambda s: print(s, flush=True), args.solvers, rtols, args.ref_rtol, args.rtol_min)
        results[pname] = (prob.title, res, lib_of)
        checks[pname] = check
    text = render(results, args, time.perf_counter() - start, checks)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(dict(results=results, checks=checks, total=time.perf_counter() - start,
                                                       args=vars(args)), indent=1, default=str))
    if not args.no_write:
        plot(results, report.PLOTS / "stiff.png")
        report.write_section(SECTION, text)
        (report.PLOTS / "stiff.json").write_text(json.dumps(dict(results=results, checks=checks), indent=1, default=str))
        print(f"wrote {report.RESULTS}, {report.PLOTS / 'stiff.png'} and the raw numbers in stiff.json")
    return results


if __name__ == "__main__":
    main()
