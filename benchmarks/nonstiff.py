"""Non-stiff work–precision (batched) and the medium-network overhead row (issue 7).

    python -m benchmarks.nonstiff [--quick] [--repeats 5] [--batch 256] [--no-write]

Work–precision, float64, batch B (default 256), atol = rtol·1e-2, 21 save points:
  lotka      Lotka–Volterra x' = a x − b x y, y' = c x y − d y, (a, b, c, d) = (1.5, 1, 3, 1),
             y0 = (1, 1), t ∈ [0, 10]; per sample every parameter and y0 ×exp(0.1·N(0, 1)).
  arenstorf  the Arenstorf orbit of ../shared/problems (mu = 0.012277471), t ∈ [0, T] (one period);
             per sample x(0) += 1e-4·N(0, 1).
Contenders: pybridge Tsit5 / DP5 / Vern7 (batch="independent", every sample its own steps);
torchdiffeq dopri5 (the batch as one state: one step size); torchode tsit5 (IntegralController,
per-sample steps); diffrax Tsit5 (jax.jit + jax.vmap, PIDController, per-sample steps; tolerances
traced so one compile per problem, compile time excluded). Achieved error = max abs error over
save points and samples against pybridge Vern7 (lockstep) at rtol 1e-13, atol 1e-15, cross-checked
against SciPy DOP853 at the same tolerances on the first 4 samples (the difference is printed;
torchdiffeq dopri8 was tried first and is off by ~2e-8 at the save points). NFE: pybridge and torchode the
max over samples (= batched calls), torchdiffeq counted calls, diffrax estimated as
6·max(num_steps) + 2 (Tsit5 is FSAL; marked "est.").

Medium-network overhead (float32, under no_grad): dy/dt = MLP(y), MLP 2→256→2 (tanh), torch.nn.Linear
default init under torch.manual_seed(0) with all weights and biases ×2 (the recipe of
benchmarks/overhead.py with hidden 256), y0 ~ N(0, 1), batch 1024, t ∈ [0, 10], 50 save points,
rtol 1e-6, atol 1e-8. Overhead = wall / (NFE × one network call on the batch), with the network
call of the contender's own framework (torch eager, or the jitted JAX MLP with the same weights).
One thread everywhere. Writes the `nonstiff` block of benchmarks/RESULTS.md and
benchmarks/plots/nonstiff.png.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from benchmarks import report

report.single_thread_env()

import numpy as np  # noqa: E402
import torch  # noqa: E402

import pybridge as pb  # noqa: E402

SECTION = "nonstiff"
SEED = 0
ARENSTORF_T = 17.0652165601579625588917206249
ARENSTORF_Y0 = [0.994, 0.0, 0.0, -2.00158510637908252240537862224]
MU = 0.012277471


# ---------------------------------------------------------------------------------------------
# Problems: f(xp, y, p) with y (..., n) and p (..., P), for torch and jax alike

def _stack(xp, xs):
    return torch.stack(xs, -1) if xp is torch else xp.stack(xs, axis=-1)


def lotka(xp, y, p):
    x, v = y[..., 0], y[..., 1]
    return _stack(xp, [p[..., 0] * x - p[..., 1] * x * v, p[..., 2] * x * v - p[..., 3] * v])


def arenstorf(xp, y, p):
    x, v, dx, dv = y[..., 0], y[..., 1], y[..., 2], y[..., 3]
    mu, mu1 = MU, 1 - MU
    d1 = ((x + mu) ** 2 + v ** 2) ** 1.5
    d2 = ((x - mu1) ** 2 + v ** 2) ** 1.5
    return _stack(xp, [dx, dv, x + 2 * dv - mu1 * (x + mu) / d1 - mu * (x - mu1) / d2,
                       v - 2 * dx - mu1 * v / d1 - mu * v / d2])


def make_problem(name, B):
    rng = np.random.default_rng(SEED)
    if name == "lotka":
        p = np.array([1.5, 1.0, 3.0, 1.0])[None] * np.exp(0.1 * rng.standard_normal((B, 4)))
        y0 = np.ones((B, 2)) * np.exp(0.1 * rng.standard_normal((B, 2)))
        return dict(name=name, title="Lotka–Volterra (t ∈ [0, 10])", f=lotka, p=p, y0=y0, t1=10.0)
    y0 = np.array(ARENSTORF_Y0)[None].repeat(B, 0)
    y0[:, 0] += 1e-4 * rng.standard_normal(B)
    return dict(name=name, title="Arenstorf orbit (one period)", f=arenstorf, p=np.zeros((B, 1)), y0=y0,
                t1=ARENSTORF_T)


class Counted(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn, self.calls = fn, 0

    def forward(self, t, y):
        self.calls += 1
        return self.fn(t, y)


def torch_rhs(prob):
    p = torch.as_tensor(prob["p"], dtype=torch.float64)
    f = prob["f"]
    return Counted(lambda t, y: f(torch, y, p))


# Contenders: go(rhs, y0 (B, n), t (T,), rtol, atol) -> (ys (T, B, n), nfe_max, nfe_mean)

def run_pybridge(solver, batch):
    def go(f, y0, t, rtol, atol):
        sol = pb.solve(pb.ODEProblem(f, y0, t), solver, rtol=rtol, atol=atol, batch=batch)
        if (sol.retcode.reshape(-1) != 0).any():
            raise RuntimeError("some samples did not succeed")
        nfe = sol.stats.nfe.reshape(-1).double()
        return sol.ys, int(nfe.max()), float(nfe.mean())
    return go


def run_torchdiffeq(method="dopri5"):
    def go(f, y0, t, rtol, atol):
        import torchdiffeq
        f.calls = 0
        ys = torchdiffeq.odeint(f, y0, t, rtol=rtol, atol=atol, method=method)
        return ys, f.calls, float(f.calls)
    return go


def run_torchode(f, y0, t, rtol, atol):
    import torchode as to
    term = to.ODETerm(f)
    solver = to.AutoDiffAdjoint(to.Tsit5(term=term), to.IntegralController(atol=atol, rtol=rtol, term=term))
    sol = solver.solve(to.InitialValueProblem(y0=y0, t_eval=t.expand(y0.shape[0], -1)))
    if (sol.status.reshape(-1) != 0).any():
        raise RuntimeError(f"torchode status {sol.status.unique().tolist()}")
    nfe = sol.stats["n_f_evals"].reshape(-1).double()
    return sol.ys.transpose(0, 1), int(nfe.max()), float(nfe.mean())


def diffrax_available():
    import importlib.util
    return importlib.util.find_spec("diffrax") is not None and importlib.util.find_spec("jax") is not None


_JAX = {}


def diffrax_solver(key, f_jax, ts, batched=True, max_steps=100_000):
    """jit(vmap(Tsit5 solve)) over (y0, p); tolerances traced. Cached per key."""
    if key in _JAX:
        return _JAX[key]
    import diffrax as dfx
    import jax
    import jax.numpy as jnp
    jax.config.update("jax_enable_x64", True)
    ts = jnp.asarray(ts)

    def one(y0, p, rtol, atol):
        sol = dfx.diffeqsolve(dfx.ODETerm(lambda t, y, p: f_jax(y, p)), dfx.Tsit5(), ts[0], ts[-1], None, y0,
                              args=p, saveat=dfx.SaveAt(ts=ts),
                              stepsize_controller=dfx.PIDController(rtol=rtol, atol=atol),
                              max_steps=max_steps, throw=False)
        return sol.ys, sol.stats["num_steps"], sol.result == dfx.RESULTS.successful

    fn = jax.jit(jax.vmap(one, in_axes=(0, 0, None, None)) if batched else one)
    _JAX[key] = fn
    return fn


def run_diffrax_wp(prob):
    def go(_f, y0, t, rtol, atol):
        import jax
        import jax.numpy as jnp
        fn = diffrax_solver(("wp", prob["name"], y0.shape[0], t.shape[0]),
                            lambda y, p: prob["f"](jnp, y, p), t.numpy())
        ys, steps, ok = jax.block_until_ready(fn(jnp.asarray(y0.numpy()), jnp.asarray(prob["p"]), rtol, atol))
        if not bool(np.all(np.asarray(ok))):
            raise RuntimeError("diffrax: some samples did not succeed")
        nfe = 6 * int(np.max(np.asarray(steps))) + 2
        return torch.as_tensor(np.asarray(ys)).transpose(0, 1), nfe, 6 * float(np.mean(np.asarray(steps))) + 2
    return go


def wp_contenders(prob, only=None):
    out = [("pybridge Tsit5", run_pybridge(pb.Tsit5(), "independent")),
           ("pybridge DP5", run_pybridge(pb.DP5(), "independent")),
           ("pybridge Vern7", run_pybridge(pb.Vern7(), "independent")),
           ("torchdiffeq dopri5", run_torchdiffeq()),
           ("torchode tsit5", run_torchode)]
    if diffrax_available():
        out.append(("diffrax Tsit5 (jit, vmap)", run_diffrax_wp(prob)))
    if only:
        words = [w.strip().lower() for w in only.split(",") if w.strip()]
        out = [c for c in out if any(w in c[0].lower() for w in words)]
    return out


def scipy_check(prob, t, ref, k):
    """Max abs difference of the reference from SciPy DOP853 (rtol 1e-13) on the first k samples."""
    from scipy.integrate import solve_ivp
    diffs = []
    for b in range(k):
        p = prob["p"][b]
        sol = solve_ivp(lambda tt, y: prob["f"](np, y, p), (0.0, prob["t1"]), prob["y0"][b], method="DOP853",
                        rtol=1e-13, atol=1e-15, t_eval=t.numpy())
        diffs.append(np.abs(sol.y.T - ref[:, b].numpy()).max())
    return float(max(diffs))


def work_precision(name, B, rtols, repeats, only, log):
    prob = make_problem(name, B)
    f = torch_rhs(prob)
    y0 = torch.as_tensor(prob["y0"], dtype=torch.float64)
    t = torch.linspace(0.0, prob["t1"], 21, dtype=torch.float64)
    with torch.no_grad():
        ref = run_pybridge(pb.Vern7(), "lockstep")(f, y0, t, 1e-13, 1e-15)[0]
        try:
            check = scipy_check(prob, t, ref, min(4, B))
        except Exception as exc:
            check = f"{type(exc).__name__}: {exc}"
        log(f"[{name}] reference pybridge Vern7 vs SciPy DOP853 at 1e-13: {check}")
        curves = {}
        for cname, go in wp_contenders(prob, only):
            if cname.startswith("diffrax"):  # compile outside the timing
                try:
                    go(f, y0, t, 1e-4, 1e-6)
                except Exception:
                    pass
            pts = []
            for rtol in rtols:
                try:
                    wall, nrep, (ys, nfe, nfe_mean) = report.timed(lambda: go(f, y0, t, rtol, rtol * 1e-2), repeats)
                    pts.append(dict(rtol=rtol, err=float((ys - ref).abs().max()), wall=wall, nrep=nrep, nfe=nfe,
                                    nfe_mean=nfe_mean))
                except Exception as exc:  # report, do not hide
                    pts.append(dict(rtol=rtol, error=f"{type(exc).__name__}: {str(exc)[:120]}"))
                log(f"[{name}] {cname:28s} rtol {rtol:.0e} {pts[-1]}")
            curves[cname] = pts
    return dict(title=prob["title"], check=check, curves=curves)


# ---------------------------------------------------------------------------------------------
# Medium network overhead

def medium_problem(B, hidden):
    torch.manual_seed(SEED)
    net = torch.nn.Sequential(torch.nn.Linear(2, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 2))
    with torch.no_grad():
        for q in net.parameters():
            q.mul_(2.0)
    y0 = torch.randn(B, 2)
    return net, y0, torch.linspace(0.0, 10.0, 50)


def _median_call(fn, inner=50, blocks=11):
    for _ in range(inner):
        fn()
    ts = []
    for _ in range(blocks):
        s = time.perf_counter()
        for _ in range(inner):
            fn()
        ts.append((time.perf_counter() - s) / inner)
    return statistics.median(ts)


def medium_overhead(B, hidden, repeats, only, log, rtol=1e-6, atol=1e-8):
    net, y0, t = medium_problem(B, hidden)
    f = Counted(lambda t_, y: net(y))
    rows = []
    with torch.no_grad():
        t_net = _median_call(lambda: net(y0))
        cont = [("pybridge Tsit5, lockstep", run_pybridge(pb.Tsit5(), "lockstep")),
                ("pybridge Tsit5, independent", run_pybridge(pb.Tsit5(), "independent")),
                ("torchdiffeq dopri5", run_torchdiffeq()),
                ("torchode tsit5", run_torchode)]
        for name, go in cont:
            if only and not any(w.strip().lower() in name.lower() for w in only.split(",") if w.strip()):
                continue
            try:
                go(f, y0, t, rtol, atol)  # warm-up
                wall, nrep, (ys, nfe, nfe_mean) = report.timed(lambda: go(f, y0, t, rtol, atol), repeats, slow=30)
                rows.append(dict(name=name, wall=wall, nrep=nrep, nfe=nfe, nfe_mean=nfe_mean, t_net=t_net,
                                 overhead=wall / (nfe * t_net)))
            except Exception as exc:
                rows.append(dict(name=name, error=f"{type(exc).__name__}: {str(exc)[:120]}"))
            log(f"[medium] {rows[-1]}")
    if diffrax_available() and (not only or "diffrax" in only.lower()):
        rows += medium_diffrax(net, y0, t, rtol, atol, repeats, log)
    return dict(t_net=t_net, rows=rows, B=B, hidden=hidden, rtol=rtol, atol=atol)


def medium_diffrax(net, y0, t, rtol, atol, repeats, log):
    import diffrax as dfx
    import jax
    import jax.numpy as jnp
    W1, b1 = (jnp.asarray(q.detach().numpy()) for q in (net[0].weight, net[0].bias))
    W2, b2 = (jnp.asarray(q.detach().numpy()) for q in (net[2].weight, net[2].bias))
    mlp = lambda y: jnp.tanh(y @ W1.T + b1) @ W2.T + b2
    y0j, ts = jnp.asarray(y0.numpy()), jnp.asarray(t.numpy())
    call = jax.jit(mlp)
    jax.block_until_ready(call(y0j))
    t_net = _median_call(lambda: jax.block_until_ready(call(y0j)))
    rows = []

    def whole(y0, rtol, atol):  # the batch as one state (one step size, like torchdiffeq)
        sol = dfx.diffeqsolve(dfx.ODETerm(lambda t, y, a: mlp(y)), dfx.Tsit5(), ts[0], ts[-1], None, y0,
                              saveat=dfx.SaveAt(ts=ts), stepsize_controller=dfx.PIDController(rtol=rtol, atol=atol),
                              max_steps=100_000, throw=False)
        return sol.ys, sol.stats["num_steps"], sol.result == dfx.RESULTS.successful

    for name, fn in (("diffrax Tsit5 (jit, batch as one state)", jax.jit(whole)),
                     ("diffrax Tsit5 (jit, vmap)", jax.jit(jax.vmap(whole, in_axes=(0, None, None))))):
        try:
            run = lambda: jax.block_until_ready(fn(y0j, rtol, atol))
            run()  # compile
            wall, nrep, (ys, steps, ok) = report.timed(run, repeats, slow=30)
            if not bool(np.all(np.asarray(ok))):
                raise RuntimeError("diffrax: some samples did not succeed")
            steps = np.asarray(steps)
            nfe = 6 * int(steps.max()) + 2
            rows.append(dict(name=name, wall=wall, nrep=nrep, nfe=nfe, nfe_mean=6 * float(steps.mean()) + 2,
                             t_net=t_net, overhead=wall / (nfe * t_net), est=True))
        except Exception as exc:
            rows.append(dict(name=name, error=f"{type(exc).__name__}: {str(exc)[:120]}"))
        log(f"[medium] {rows[-1]}")
    return rows


# ---------------------------------------------------------------------------------------------

def render(wps, med, args, total):
    L = ["## Non-stiff work–precision and medium-network overhead (issue 7)", "",
         f"Generated by `python -m benchmarks.nonstiff{' --quick' if args.quick else ''}` on {report.now()} "
         f"(whole run {total:.0f} s); {report.load_note()} at the end of the run"
         + (" — **quick smoke run: tiny sizes, numbers are not meaningful**" if args.quick else "") + ".", "",
         f"Machine: {report.machine()}.", ""]
    if args.load_note:
        L += [f"Note on load: {args.load_note}", ""]
    L += [f"Work–precision: float64, batch {args.batch}, atol = rtol·1e-2, 21 save points; error = max abs over "
          "save points and samples against pybridge Vern7 lockstep (rtol 1e-13); wall = median of up to "
          f"{args.repeats} solves (count in brackets); NFE = max over samples (mean in brackets); problems "
          "and contenders in the module docstring.", ""]
    for name, wp in wps.items():
        chk = wp["check"]
        L += [f"### {wp['title']}", "",
              f"Reference check (pybridge Vern7 vs SciPy DOP853, both rtol 1e-13, first 4 samples): "
              + (f"{chk:.1e}" if isinstance(chk, float) else f"`{chk}`") + ".", "",
              "| rtol | " + " | ".join(f"{n}: error / NFE / wall" for n in wp["curves"]) + " |",
              "|---|" + "---:|" * len(wp["curves"])]
        rtols = [p["rtol"] for p in next(iter(wp["curves"].values()))] if wp["curves"] else []
        for i, rtol in enumerate(rtols):
            cells = []
            for cname, pts in wp["curves"].items():
                p = pts[i]
                if "error" in p:
                    cells.append(f"failed: `{p['error']}`")
                    continue
                est = " est." if cname.startswith("diffrax") else ""
                cells.append(f"{p['err']:.1e} / {p['nfe']}{est} ({p['nfe_mean']:.0f}) / {report.fmt_s(p['wall'])} ({p['nrep']})")
            L.append(f"| {rtol:.0e} | " + " | ".join(cells) + " |")
        L.append("")
        # equal-accuracy comparison against torchdiffeq's points
        base = [p for p in wp["curves"].get("torchdiffeq dopri5", []) if "error" not in p]
        others = {n: [p for p in v if "error" not in p] for n, v in wp["curves"].items() if n != "torchdiffeq dopri5"}
        if base and others:
            L += ["At torchdiffeq dopri5's achieved errors, each contender's NFE and wall log-log interpolated "
                  "(— outside its measured range):", "",
                  "| dopri5 rtol | error | dopri5 NFE / wall | " + " | ".join(f"{n} NFE / wall" for n in others) + " |",
                  "|---|---:|---:|" + "---:|" * len(others)]
            for p in base:
                cells = []
                for n, v in others.items():
                    a, w = report.interp_at(v, p["err"], "nfe"), report.interp_at(v, p["err"], "wall")
                    cells.append("—" if a is None else f"{a:.0f} / {report.fmt_s(w)}")
                L.append(f"| {p['rtol']:.0e} | {p['err']:.1e} | {p['nfe']} / {report.fmt_s(p['wall'])} | "
                         + " | ".join(cells) + " |")
            L.append("")
    if med:
        L += [f"### Medium network overhead (MLP 2→{med['hidden']}→2, batch {med['B']}, float32, rtol {med['rtol']:g}, "
              f"atol {med['atol']:g})", "",
              f"One torch network call on the batch: {med['t_net'] * 1e6:.0f} µs. Overhead = wall / (NFE × own "
              "framework's network call); diffrax NFE estimated from steps.", "",
              "| solver | wall (runs) | NFE (mean) | network call | overhead |", "|---|---:|---:|---:|---:|"]
        for r in med["rows"]:
            if "error" in r:
                L.append(f"| {r['name']} | — | — | — | failed: `{r['error']}` |")
                continue
            L.append(f"| {r['name']} | {report.fmt_s(r['wall'])} ({r['nrep']}) | {r['nfe']}{' est.' if r.get('est') else ''} "
                     f"({r['nfe_mean']:.0f}) | {r['t_net'] * 1e6:.0f} µs | {r['overhead']:.2f} |")
        L.append("")
    L += ["Plot: `benchmarks/plots/nonstiff.png` (NFE and wall against achieved error)."]
    return "\n".join(L) + "\n"


def plot(wps, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(wps), 2, figsize=(11, 3.6 * len(wps)), squeeze=False)
    for i, wp in enumerate(wps.values()):
        for j, key in enumerate(("nfe", "wall")):
            ax = axes[i][j]
            for n, pts in wp["curves"].items():
                pts = [p for p in pts if "error" not in p and p["err"] > 0]
                if pts:
                    ax.loglog([p["err"] for p in pts], [p[key] for p in pts],
                              "-o" if n.startswith("pybridge") else "--s", ms=4, label=n)
            report.finish_loglog_axes(ax, f"{wp['title']}: {key}", "achieved error (max abs)",
                                      "NFE (max over samples)" if key == "nfe" else "wall (s)")
    report.save_figure(fig, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny batch, two tolerances")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--problems", default="lotka,arenstorf")
    ap.add_argument("--solvers", default="", help="comma-separated name fragments to keep (default: all)")
    ap.add_argument("--rtols", default="")
    ap.add_argument("--medium-batch", type=int, default=None)
    ap.add_argument("--no-medium", action="store_true")
    ap.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md and plots alone")
    ap.add_argument("--load-note", default="")
    args = ap.parse_args(argv)
    args.batch = args.batch or (8 if args.quick else 256)
    if args.quick:
        args.repeats = 1
    rtols = [float(x) for x in args.rtols.split(",") if x.strip()] or \
        ([1e-4, 1e-6] if args.quick else [1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10])
    torch.set_num_threads(1)
    start = time.perf_counter()
    log = lambda s: print(s, flush=True)
    wps = {n: work_precision(n, args.batch, rtols, args.repeats, args.solvers, log) for n in args.problems.split(",") if n}
    med = None if args.no_medium else medium_overhead(args.medium_batch or (64 if args.quick else 1024), 256,
                                                      args.repeats, args.solvers, log)
    text = render(wps, med, args, time.perf_counter() - start)
    print(text)
    if not args.no_write:
        plot(wps, report.PLOTS / "nonstiff.png")
        report.write_section(SECTION, text)
        (report.PLOTS / "nonstiff.json").write_text(json.dumps(dict(work_precision=wps, medium=med), indent=1, default=str))
        print(f"wrote {report.RESULTS}, {report.PLOTS / 'nonstiff.png'} and the raw numbers in nonstiff.json")
    return wps, med


if __name__ == "__main__":
    main()
