"""Training time to a fixed loss with and without error regularization (issue 7).

    python -m benchmarks.training [--quick] [--seeds 3] [--target 0.05] [--max-iters 600] [--no-write] [--load-note TEXT]

Task: sklearn's 8×8 digits (1797 images, 10 classes; 80 % train / 20 % test, fixed split), a neural
ODE classifier in float32: Linear(64 → H) → ODE block dy/dt = MLP(y) (H → 2H → H, tanh) on t ∈ [0, 1]
→ Linear(H → 10); cross-entropy; Adam (lr 1e-2), mini-batches of 128 drawn with a fixed seed (the
same batches for every contender). Tight tolerance rtol = atol = 1e-6. Contenders:
  pybridge Tsit5 vanilla        pb.solve(..., pb.Tsit5(), batch="lockstep"), loss = CE
  pybridge Tsit5 error-reg.     loss = CE + λ_k · pb.error_regularizer(sol, reduction="mean"),
                                λ_k = λ0 · decay^k (k = iteration), the 2021 paper's global R_E
  torchdiffeq dopri5 vanilla    torchdiffeq.odeint(..., method="dopri5"), loss = CE
  pybridge Tsit5 ..., compile=True   the two pybridge contenders with solve(compile=True); their wall
                                time includes the compilations (the first training iteration, and
                                the first test-set evaluation: another shape, without gradients)
The batch steps in lockstep for all three (one step size per mini-batch), so NFE are comparable:
one NFE = one evaluation of the field on the whole mini-batch (forward solve only; backpropagation
goes through the solver's operations, it does not call the field again).
"Reached" = the exponential moving average (factor 0.9) of the training mini-batch cross-entropy
(the fit term, without the regularizer) falls to --target. Reported: iterations, wall time and
process CPU time to reach it, mean forward NFE per iteration over those iterations, NFE of the last
one, and test accuracy of the model at that point; medians over --seeds runs (seed = initialization
and mini-batch order, shared by the contenders).
"""
from __future__ import annotations

import argparse
import statistics
import time

from benchmarks import report

report.single_thread_env()

import torch  # noqa: E402

import pybridge as pb  # noqa: E402

SECTION = "training"
TOL = 1e-6


def load_digits(seed=0):
    from sklearn.datasets import load_digits as _load

    X, y = _load(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    n = int(0.8 * len(X))
    return (X[perm[:n]], y[perm[:n]]), (X[perm[n:]], y[perm[n:]])


class Field(torch.nn.Module):
    def __init__(self, h):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(h, 2 * h), torch.nn.Tanh(), torch.nn.Linear(2 * h, h))
        self.calls = 0

    def forward(self, t, y):
        self.calls += 1
        return self.net(y)


class Classifier(torch.nn.Module):
    def __init__(self, h):
        super().__init__()
        self.inp = torch.nn.Linear(64, h)
        self.field = Field(h)
        self.out = torch.nn.Linear(h, 10)


SPAN = torch.tensor([0.0, 1.0])


def forward(model, x, engine):
    """(logits, forward NFE, solution or None)."""
    y0 = model.inp(x)
    if engine == "torchdiffeq":
        from torchdiffeq import odeint

        model.field.calls = 0
        ys = odeint(model.field, y0, SPAN, rtol=TOL, atol=TOL, method="dopri5")
        return model.out(ys[-1]), model.field.calls, None
    sol = pb.solve(pb.ODEProblem(model.field, y0, SPAN), pb.Tsit5(), rtol=TOL, atol=TOL, batch="lockstep",
                   compile=engine == "pybridge-compiled")
    return model.out(sol.ys[-1]), float(sol.stats.nfe.double().mean()), sol


def accuracy(model, data, engine):
    with torch.no_grad():
        logits, _, _ = forward(model, data[0], engine)
    return (logits.argmax(-1) == data[1]).double().mean().item()


def train(name, engine, lam0, decay, train_data, test_data, args, log, seed=0):
    torch.manual_seed(seed)
    model = Classifier(args.hidden)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1000 + seed)
    X, y = train_data
    ema, nfes, reached = None, [], None
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for k in range(args.max_iters):
        idx = torch.randint(len(X), (args.batch,), generator=gen)
        logits, nfe, sol = forward(model, X[idx], engine)
        fit = torch.nn.functional.cross_entropy(logits, y[idx])
        loss = fit
        lam = lam0 * decay ** k
        if lam > 0:
            loss = loss + lam * pb.error_regularizer(sol, reduction="mean")
        opt.zero_grad()
        loss.backward()
        opt.step()
        nfes.append(nfe)
        ema = fit.item() if ema is None else 0.9 * ema + 0.1 * fit.item()
        if k % 20 == 0:
            log(f"  {name}: iter {k:4d}  CE {fit.item():.4f}  EMA {ema:.4f}  NFE {nfe:.0f}  λ {lam:.3g}  "
                f"{time.perf_counter() - wall0:.1f} s")
        if ema <= args.target:
            reached = k + 1
            break
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    row = dict(name=name, seed=seed, reached=reached, iters=len(nfes), wall=wall, cpu=cpu,
               nfe_mean=sum(nfes) / len(nfes), nfe_last=nfes[-1], ema=ema,
               test_acc=accuracy(model, test_data, engine))
    log(f"  {name} (seed {seed}): {'reached' if reached else 'NOT reached'} after {row['iters']} iterations, "
        f"{wall:.1f} s wall, {cpu:.1f} s CPU, NFE/iter {row['nfe_mean']:.1f}, test acc {row['test_acc']:.3f}")
    return row


def render(rows, args, total):
    L = ["## Training time to a fixed loss, with and without error regularization (issue 7)", "",
         f"Generated by `python -m benchmarks.training{' --quick' if args.quick else ''}` on {report.now()} "
         f"(whole run {total:.0f} s); {report.load_note()} at the end of the run"
         + (f"; {args.load_note}" if args.load_note else "")
         + (" — **quick smoke run: loose target, numbers are not meaningful**" if args.quick else "") + ".", "",
         f"Machine: {report.machine(('torch', 'torchdiffeq', 'sklearn', 'numpy'))}.", "",
         f"Task: sklearn digits 8×8 (1437 train / 360 test), neural ODE classifier Linear(64→{args.hidden}) → "
         f"ODE block MLP({args.hidden}→{2 * args.hidden}→{args.hidden}, tanh) on [0, 1] → Linear({args.hidden}→10), "
         f"float32, Adam lr 1e-2, mini-batch {args.batch} (same batches for all), rtol = atol = {TOL:g}, "
         f"lockstep batch (NFE = evaluations of the field on the whole mini-batch, forward solve). Target: EMA(0.9) of "
         f"the mini-batch cross-entropy ≤ {args.target:g}, at most {args.max_iters} iterations. Error-regularized: "
         f"λ_k = {args.lam:g}·{args.decay:g}^k · R_E (reduction=\"mean\"). Wall and process CPU time cover the "
         "training loop only (one thread).", "",
         "| contender | iterations to target (per seed) | wall to target | CPU to target | NFE / iter (mean) | NFE last iter "
         "| test acc. |",
         "|---|---:|---:|---:|---:|---:|---:|"]
    agg = aggregate(rows)
    for a in agg:
        its = ", ".join(str(r["reached"]) if r["reached"] else f">{r['iters']}" for r in a["runs"])
        L.append(f"| {a['name']} | {a['reached']} ({its}) | {report.fmt_s(a['wall'])} | {report.fmt_s(a['cpu'])} | "
                 f"{a['nfe_mean']:.1f} | {a['nfe_last']:.0f} | {a['test_acc']:.3f} |")
    L += ["", f"Medians over {args.seeds} seed(s) (seed = model initialization and mini-batch order; the same seeds "
              "for every contender); the per-seed iterations are in parentheses (`>N`: target not reached in N, "
              "then the median counts the N iterations run)."]
    base = next((a for a in agg if a["name"].startswith("pybridge") and "vanilla" in a["name"]), None)
    reg = next((a for a in agg if "regularized" in a["name"]), None)
    if base and reg and all(r["reached"] for r in base["runs"] + reg["runs"]):
        L += ["", f"Error regularization vs vanilla (pybridge, medians): {reg['wall'] / base['wall']:.2f}× the wall "
                  f"time to the target, {reg['reached'] / base['reached']:.2f}× the iterations, "
                  f"{reg['nfe_mean'] / base['nfe_mean']:.2f}× the mean NFE per iteration."]
    compiled = next((a for a in agg if a["name"] == "pybridge Tsit5 vanilla, compile=True"), None)
    if base and compiled:
        first = max(r["wall"] for r in compiled["runs"])  # the run that paid the compilations
        L += ["", f"compile=True vs eager (pybridge vanilla, medians): {compiled['wall'] / base['wall']:.2f}× the wall "
                  f"time to the target, {compiled['reached'] / base['reached']:.2f}× the iterations. The compilations "
                  f"fall in the first run of the process (its wall: {first:.1f} s), which the median leaves out."]
    return "\n".join(L)


def aggregate(rows):
    out = []
    for name in dict.fromkeys(r["name"] for r in rows):
        runs = [r for r in rows if r["name"] == name]
        med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
        out.append(dict(name=name, runs=runs, reached=statistics.median(r["reached"] or r["iters"] for r in runs),
                        wall=med("wall"), cpu=med("cpu"), nfe_mean=med("nfe_mean"), nfe_last=med("nfe_last"),
                        test_acc=med("test_acc")))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: loose target, few iterations")
    ap.add_argument("--target", type=float, default=None, help="target EMA cross-entropy (default 0.05; quick 1.5)")
    ap.add_argument("--max-iters", type=int, default=None, help="give up after this many iterations (default 600)")
    ap.add_argument("--seeds", type=int, default=None, help="training runs per contender (default 3; quick 1)")
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lam", type=float, default=100.0, help="λ0 of the error regularizer")
    ap.add_argument("--decay", type=float, default=0.99, help="λ_k = λ0 · decay^k")
    ap.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    ap.add_argument("--load-note", default="", help="free text on machine load, printed in the section")
    args = ap.parse_args(argv)
    args.target = args.target if args.target is not None else (1.5 if args.quick else 0.05)
    args.max_iters = args.max_iters or (25 if args.quick else 600)
    args.seeds = args.seeds or (1 if args.quick else 3)
    torch.set_num_threads(1)
    train_data, test_data = load_digits()
    log = lambda s: print(s, flush=True)  # noqa: E731
    contenders = [("pybridge Tsit5 vanilla", "pybridge", 0.0),
                  (f"pybridge Tsit5 error-regularized (λ0={args.lam:g})", "pybridge", args.lam),
                  ("pybridge Tsit5 vanilla, compile=True", "pybridge-compiled", 0.0),
                  (f"pybridge Tsit5 error-regularized (λ0={args.lam:g}), compile=True", "pybridge-compiled", args.lam)]
    try:
        import torchdiffeq  # noqa: F401
        contenders.append(("torchdiffeq dopri5 vanilla", "torchdiffeq", 0.0))
    except ImportError:
        log("torchdiffeq not installed: skipped")
    start = time.perf_counter()
    rows = [train(name, engine, lam, args.decay, train_data, test_data, args, log, seed)
            for seed in range(args.seeds) for name, engine, lam in contenders]
    text = render(rows, args, time.perf_counter() - start)
    print(text)
    if not args.no_write:
        report.write_section(SECTION, text)
        print(f"wrote {report.RESULTS}")
    return rows


if __name__ == "__main__":
    main()
