"""Main job (`make demo`): train a neural ODE on the spiral of torchdiffeq's ode_demo with
pybridge Tsit5 — vanilla, error-regularized (global, 2021) and locally regularized (2023, unbiased
and biased) — plus torchdiffeq dopri5 as an outside reference, then print test loss / NFE /
train time / predict time side by side (with ratios to the pybridge vanilla run) and save a plot.

Data: dy/dt = (y³) A, A = [[-0.1, 2], [-2, -0.1]], y0 = (2, 0), 1000 points on [0, 25]; training
batches are random windows of the trajectory (torchdiffeq's example), every configuration sees the
same windows (same seed). Test: one solve of the whole trajectory from y0 (L1 error, NFE, wall time).

Regularizers (REGULARIZATION.md): R_E = Σ_j EEst_j·|dt_j| over the window's accepted steps
(reduction "sum", discrete adjoint), averaged over windows; local r = EEst·dt of one extra step at a
random time (unbiased: uniform in the window; biased: one of the solver's step times). Their weights
decay exponentially over training, λ(it) = λ0·(λ1/λ0)^(it/(iters-1)), as in the papers.
"""
from __future__ import annotations

import argparse
import math
import pathlib
import time

import torch

import pybridge as pb
from experiments.common import run_stamp, schedule

TRUE_A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]])


def spiral_data(n=1000, t1=25.0, dtype=torch.float64):
    t = torch.linspace(0.0, t1, n, dtype=dtype)
    y0 = torch.tensor([2.0, 0.0], dtype=dtype)
    A = TRUE_A.to(dtype)
    ys = pb.solve(pb.ODEProblem(lambda t, y: (y ** 3) @ A, y0, t), pb.Vern7(), rtol=1e-10, atol=1e-10).ys
    return t, y0, ys


class Field(torch.nn.Module):
    def __init__(self, hidden=50):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(2, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 2))

    def forward(self, t, y):
        return self.net(y ** 3)


def windows(t, ys, batch, length, gen):
    start = torch.randint(0, len(t) - length, (batch,), generator=gen)
    idx = start[:, None] + torch.arange(length)
    return ys[start], t[idx], ys[idx].transpose(0, 1)  # y0 (B,2), t (B,L), targets (L,B,2)


def train(config, t, ys, iters, seed, rtol, atol, progress=None, batch=20, length=10, lr=1e-2,
          curve_every=25):
    """Adam with cosine decay of the learning rate (lr → lr/20); returns (field, train seconds,
    [(iteration, NFE of a full-trajectory prediction)]). Curve points are not counted in the time."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    f = Field().double()
    opt = torch.optim.Adam(f.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda it: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * it / iters)))
    nfe_curve = []
    train_s = 0.0
    for it in range(iters):
        start = time.process_time()
        y0, tb, target = windows(t, ys, batch, length, gen)
        opt.zero_grad()
        if config["engine"] == "torchdiffeq":
            from torchdiffeq import odeint
            # torchdiffeq shares one time grid: use each window's offsets (autonomous field).
            pred = odeint(f, y0, tb[0] - tb[0, 0], rtol=rtol, atol=atol, method="dopri5")
            loss = (pred - target).abs().mean()
        else:
            sol = pb.solve(pb.ODEProblem(f, y0, tb), pb.Tsit5(), rtol=rtol, atol=atol,
                           local_regularizer=config.get("local"), seed=seed * 1_000_003 + it)
            loss = (sol.ys - target).abs().mean()
            if config.get("lambda_error"):
                loss = loss + schedule(config["lambda_error"], it, iters) * pb.error_regularizer(sol)
            if config.get("local"):
                loss = loss + schedule(config["lambda_local"], it, iters) * sol.local_regularizer
        loss.backward()
        opt.step()
        sched.step()
        train_s += time.process_time() - start
        if curve_every and (it % curve_every == 0 or it == iters - 1):
            nfe_curve.append((it, predict(f, t, ys, rtol, atol)[1]))
        if progress is not None:
            progress.update(1)
    return f, train_s, nfe_curve


def predict(f, t, ys, rtol, atol):
    """Solve the whole trajectory once; returns (L1 loss, NFE, wall seconds, prediction)."""
    with torch.no_grad():
        start = time.process_time()
        sol = pb.solve(pb.ODEProblem(f, ys[0], t), pb.Tsit5(), rtol=rtol, atol=atol)
        wall = time.process_time() - start
    return (sol.ys - ys).abs().mean().item(), int(sol.stats.nfe), wall, sol.ys


def window_loss(f, t, ys, rtol, atol, n=200, length=10):
    """L1 on a fixed draw of held-out length-10 windows: the task the models were trained on."""
    gen = torch.Generator().manual_seed(12345)
    y0, tb, target = windows(t, ys, n, length, gen)
    with torch.no_grad():
        pred = pb.solve(pb.ODEProblem(f, y0, tb), pb.Tsit5(), rtol=rtol, atol=atol).ys
    return (pred - target).abs().mean().item()


def trivial_baselines(t, ys, n=200, length=10):
    """(window L1 of y(t) = y(t_start), full-trajectory L1 of y(t) = 0): what 'no model' scores."""
    gen = torch.Generator().manual_seed(12345)
    y0, _, target = windows(t, ys, n, length, gen)
    return (y0[None] - target).abs().mean().item(), ys.abs().mean().item()


VANILLA = "pybridge Tsit5 (vanilla)"
CONFIGS = {
    "torchdiffeq dopri5 (vanilla)": {"engine": "torchdiffeq"},
    VANILLA: {"engine": "pybridge"},
    "pybridge Tsit5 + error reg": {"engine": "pybridge", "lambda_error": (100.0, 10.0)},
    # λ for the local regularizer: r = EEst·dt of one step at the automatic initial dt is ~10^-8 here,
    # and its gradient (through every stage) is that small too. One-seed probe at 300 iterations
    # (λ0 → λ1: test L1, NFE, window L1): 1e2→10: 0.388, 1544, 0.0123 (no effect); 1e4→1e3: 0.904,
    # 1322, 0.0277; 1e6→1e5: 0.681, 338, 0.0853 — the same NFE-for-fit trade as R_E on this task.
    "pybridge Tsit5 + local reg (unbiased)": {"engine": "pybridge", "local": "unbiased", "lambda_local": (1e6, 1e5)},
    "pybridge Tsit5 + local reg (biased)": {"engine": "pybridge", "local": "biased", "lambda_local": (1e6, 1e5)},
}
TARGET_NFE = 0.6       # issue #3: prediction NFE ≤ 0.6× vanilla ...
TARGET_LOSS = 1.10     # ... at (near-)equal loss: test L1 ≤ 1.1× vanilla's (stated here, not the paper's)


def _describe(cfg):
    parts = []
    for key, name in (("lambda_error", "R_E sum"), ("lambda_local", "r " + str(cfg.get("local")))):
        if key in cfg:
            lam = cfg[key]
            parts.append(f"{name}, λ {lam[0]:g}→{lam[1]:g}" if isinstance(lam, (tuple, list)) else f"{name}, λ {lam:g}")
    return "; ".join(parts) or "-"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rtol", type=float, default=1e-6)
    ap.add_argument("--atol", type=float, default=1e-8)
    ap.add_argument("--quick", action="store_true", help="smoke run: 20 iterations, results not saved")
    ap.add_argument("--out", default="experiments/results")
    args = ap.parse_args(argv)
    if args.quick:
        args.iters = 20
    torch.set_num_threads(1)
    from tqdm import tqdm

    t, y0, ys = spiral_data()
    rows, curves, preds = [], {}, {}
    wall0, cpu0 = time.perf_counter(), time.process_time()
    with tqdm(total=args.iters * len(CONFIGS), desc="training", unit="it") as bar:
        for name, cfg in CONFIGS.items():
            bar.set_postfix_str(name)
            f, train_s, curve = train(cfg, t, ys, args.iters, args.seed, args.rtol, args.atol, bar,
                                      curve_every=0 if args.quick else 25)
            loss, nfe, _, pred = predict(f, t, ys, args.rtol, args.atol)
            walls = [predict(f, t, ys, args.rtol, args.atol)[2] for _ in range(3 if args.quick else 5)]
            wloss = window_loss(f, t, ys, args.rtol, args.atol)
            rows.append((name, cfg, loss, nfe, train_s, sorted(walls)[len(walls) // 2], wloss))
            curves[name], preds[name] = curve, pred
    total, total_cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    base = next(r for r in rows if r[0] == VANILLA)
    triv = trivial_baselines(t, ys)
    header = (f"{'configuration':38s} {'window L1':>9s} {'test L1':>8s} {'NFE':>6s} {'train CPU s':>11s} {'predict CPU ms':>14s}"
              f" {'L1/van':>7s} {'NFE/van':>7s} {'train/van':>9s} {'pred speedup':>12s}  regularizer")
    lines = [header, "-" * len(header)]
    verdicts = []
    for name, cfg, loss, nfe, train_s, wall, wloss in rows:
        lines.append(f"{name:38s} {wloss:9.4f} {loss:8.4f} {nfe:6d} {train_s:11.1f} {wall * 1e3:14.1f}"
                     f" {loss / base[2]:7.2f} {nfe / base[3]:7.2f} {train_s / base[4]:9.2f} {base[5] / wall:11.2f}x  {_describe(cfg)}")
        if "lambda_error" in cfg or "local" in cfg:
            ok_nfe, ok_loss = nfe <= TARGET_NFE * base[3], loss <= TARGET_LOSS * base[2]
            ok_w = wloss <= TARGET_LOSS * base[6]
            verdicts.append(f"  {name}: NFE {nfe / base[3]:.2f}x vanilla ({'met' if ok_nfe else 'MISSED'}), "
                            f"window L1 {wloss / base[6]:.2f}x ({'met' if ok_w else 'MISSED'}), "
                            f"test L1 {loss / base[2]:.2f}x vanilla ({'met' if ok_loss else 'MISSED'})")
    stamp = (f"{run_stamp()} · "
             f"{args.iters} iterations, seed {args.seed}, Tsit5 rtol {args.rtol:g}, atol {args.atol:g} (float64)")
    notes = [f"Target (issue #3): NFE ≤ {TARGET_NFE}× vanilla with L1 ≤ {TARGET_LOSS}× vanilla's (both L1s judged). One seed "
             "(--seed): the long-horizon L1 of window-trained models varies much between seeds, so read single-seed "
             "ratios with care. On this trajectory-fitting task the fit constrains the dynamics: in a λ sweep "
             "(R_E sum, 2 seeds) NFE fell below 0.8× only when the window L1 rose ≥ 1.4×; the classification "
             "tasks (tests/test_training.py, experiments/mnist_node.py) are where the papers' claim holds.",
             *verdicts,
             f"No-model references: window L1 of y(t) = y(t_start) {triv[0]:.4f}; test L1 of y(t) = 0 {triv[1]:.4f}. "
             "A test L1 near or above the latter means the long-horizon trajectory is not fitted (see the plot) — "
             "phase drift alone makes even a good spiral score badly there, and a regularized model that "
             "collapses to a slow, smooth curve scores about the same as 'predict 0'.",
             "window L1 = the trained loss on 200 held-out length-10 windows (fixed draw); test L1 = mean |y_pred - y| over the whole trajectory (1000 points, t ∈ [0, 25]) solved from y0; "
             "NFE and predict time from that solve (median of 5). Times are CPU seconds of this 1-thread process "
             "(time.process_time: on a dedicated core they equal wall time; this machine's 2 cores are shared, "
             "so wall time would measure the neighbours). Train time excludes the NFE-curve evaluations.",
             f"whole run: {total:.0f} s wall, {total_cpu:.0f} s CPU (wall exceeds CPU when other jobs share the cores)"]
    print(stamp)
    print("\n".join(lines + notes))
    if args.quick:
        return rows
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "spiral_demo.txt").write_text(stamp + "\n" + "\n".join(lines + notes) + "\n")
    _plot(t, ys, preds, curves, out / "spiral_demo.png")
    print(f"saved {out / 'spiral_demo.png'} and {out / 'spiral_demo.txt'}")
    return rows


def _plot(t, ys, preds, curves, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    ax1.plot(ys[:, 0], ys[:, 1], "k-", lw=3, alpha=0.3, label="data")
    for name, p in preds.items():
        ax1.plot(p[:, 0], p[:, 1], lw=1, label=name)
    ax1.set_title("trajectories")
    ax1.legend(fontsize=7)
    for name, c in curves.items():
        if c:
            it, nfe = zip(*c)
            ax2.plot(it, nfe, label=name)
    ax2.set_xlabel("iteration")
    ax2.set_ylabel("NFE of a full-trajectory prediction")
    ax2.set_title("NFE over training")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
