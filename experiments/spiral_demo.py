"""Main job (`make demo`): train a neural ODE on the spiral of torchdiffeq's ode_demo with
pybridge Tsit5 (vanilla, error-regularized, locally regularized) and torchdiffeq dopri5, then print
loss / NFE / train time / predict time side by side and save a plot.

Data: dy/dt = (y³) A, A = [[-0.1, 2], [-2, -0.1]], y0 = (2, 0), 1000 points on [0, 25]; training
batches are 20 random length-10 windows (as torchdiffeq's example). The regularizers follow
REGULARIZATION.md: R_E = Σ EEst·dt (discrete adjoint), local r = EEst·dt of one step at a random time.
"""
from __future__ import annotations

import argparse
import pathlib
import platform
import time

import torch

import pybridge as pb

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
        self.nfe = 0

    def forward(self, t, y):
        self.nfe += 1
        return self.net(y ** 3)


def windows(t, ys, batch, length, gen):
    start = torch.randint(0, len(t) - length, (batch,), generator=gen)
    idx = start[:, None] + torch.arange(length)
    return ys[start], t[idx], ys[idx].transpose(0, 1)  # y0 (B,2), t (B,L), targets (L,B,2)


def train(config, t, ys, iters, seed, rtol, atol, progress=None):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    f = Field().double()
    opt = torch.optim.Adam(f.parameters(), lr=3e-3)
    nfe_curve = []
    start = time.perf_counter()
    for it in range(iters):
        y0, tb, target = windows(t, ys, 20, 10, gen)
        opt.zero_grad()
        if config["engine"] == "torchdiffeq":
            from torchdiffeq import odeint
            # torchdiffeq shares one time grid: use each window's offsets (autonomous field).
            pred = odeint(f, y0, tb[0] - tb[0, 0], rtol=rtol, atol=atol, method="dopri5")
            loss = (pred - target).abs().mean()
        else:
            sol = pb.solve(pb.ODEProblem(f, y0, tb), pb.Tsit5(), rtol=rtol, atol=atol,
                           local_regularizer=config.get("local"), seed=it)
            loss = (sol.ys - target).abs().mean()
            if config.get("lambda_error"):
                loss = loss + config["lambda_error"] * pb.error_regularizer(sol)
            if config.get("local"):
                loss = loss + config["lambda_local"] * sol.local_regularizer
        loss.backward()
        opt.step()
        if it % 10 == 0 or it == iters - 1:
            nfe_curve.append((it, predict(f, t, ys, rtol, atol)[1]))
        if progress is not None:
            progress.update(1)
    return f, time.perf_counter() - start, nfe_curve


def predict(f, t, ys, rtol, atol):
    """Solve the whole trajectory once; returns (L1 loss, NFE, wall seconds, prediction)."""
    with torch.no_grad():
        start = time.perf_counter()
        sol = pb.solve(pb.ODEProblem(f, ys[0], t), pb.Tsit5(), rtol=rtol, atol=atol)
        wall = time.perf_counter() - start
    return (sol.ys - ys).abs().mean().item(), int(sol.stats.nfe), wall, sol.ys


CONFIGS = {
    "torchdiffeq dopri5 (vanilla)": {"engine": "torchdiffeq"},
    "pybridge Tsit5 (vanilla)": {"engine": "pybridge"},
    "pybridge Tsit5 + error reg": {"engine": "pybridge", "lambda_error": 0.1},
    "pybridge Tsit5 + local reg (unbiased)": {"engine": "pybridge", "local": "unbiased", "lambda_local": 10.0},
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rtol", type=float, default=1e-6)
    ap.add_argument("--atol", type=float, default=1e-8)
    ap.add_argument("--out", default="experiments/results")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from tqdm import tqdm

    t, y0, ys = spiral_data()
    rows, curves, preds = [], {}, {}
    with tqdm(total=args.iters * len(CONFIGS), desc="training", unit="it") as bar:
        for name, cfg in CONFIGS.items():
            bar.set_postfix_str(name)
            f, train_s, curve = train(cfg, t, ys, args.iters, args.seed, args.rtol, args.atol, bar)
            loss, nfe, _, pred = predict(f, t, ys, args.rtol, args.atol)
            walls = [predict(f, t, ys, args.rtol, args.atol)[2] for _ in range(5)]
            rows.append((name, loss, nfe, train_s, sorted(walls)[2]))
            curves[name], preds[name] = curve, pred
    header = f"{'configuration':40s} {'test L1':>9s} {'NFE':>6s} {'train s':>8s} {'predict ms':>10s}"
    lines = [header, "-" * len(header)]
    for name, loss, nfe, train_s, wall in rows:
        lines.append(f"{name:40s} {loss:9.4f} {nfe:6d} {train_s:8.1f} {wall * 1e3:10.1f}")
    stamp = f"{time.strftime('%Y-%m-%d')} · {platform.node()} · {platform.processor() or platform.machine()} · torch {torch.__version__} · 1 thread · {args.iters} iterations, seed {args.seed}, rtol {args.rtol}, atol {args.atol}"
    print(stamp)
    print("\n".join(lines))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "spiral_demo.txt").write_text(stamp + "\n" + "\n".join(lines) + "\n")
    _plot(t, ys, preds, curves, out / "spiral_demo.png")
    print(f"saved {out / 'spiral_demo.png'} and {out / 'spiral_demo.txt'}")


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
