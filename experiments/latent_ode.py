"""Latent ODE on irregularly sampled series (Rubanova et al. 2019; the PhysioNet experiment of Pal et
al. 2021 / 2023), scaled down to a 2-core CPU: vanilla vs error-regularized (global R_E) vs local
regularization (unbiased, biased), on the same seeds.

Data (PhysioNet 2012 is not available offline here — ../shared/design/DATA.md): a synthetic
PhysioNet-like generator. Every subject has a hidden 2-d nonlinear oscillator (van der Pol with its
own stiffness μ, frequency and initial state) over a 48 h window; `--channels` observed channels
are fixed random tanh read-outs of it plus noise. Each channel is observed at Poisson times
(channel rate 2–12 per 48 h, i.e. 4–25 % of the hourly slots), quantized to the hour as the
PhysioNet preprocessing of Rubanova et al. does, so a batch shares a 49-point time grid with a
per-entry observation mask; time is rescaled to [0, 1]. 80:20 train/test split.

Model: a GRU recognition network reads (values·mask, mask) backwards in time and gives q(z0) =
N(μ, σ²) with a `--latent`-d z0; the decoder is dz/dt = MLP(z) (tanh, `--hidden` units) solved by
Tsit5 (float64, lockstep batch) on the grid, and a linear read-out; the loss is the Gaussian
negative log-likelihood of the observed entries (σ_obs = 0.1) plus the KL to N(0, I) with an
annealed weight (interpolation task: reconstruct all observed entries). Regularizer weights follow
REGULARIZATION.md: R_E (mean reduction) λ 1000 → 100; local r λ 100 → 10, decaying exponentially.

Reported (mean ± sd over seeds): test MSE on observed entries (decoding from the posterior mean),
NFE of the test decoding solve, training CPU time, prediction CPU time (encode + decode of the
whole test set, median of 3). CPU seconds of this 1-thread process (time.process_time).
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import platform
import statistics
import time

import numpy as np
import torch

import pybridge as pb
from experiments.common import add_regularizers, mean_sd, paper_lines, plot

PAPER = [  # REGULARIZATION.md (PhysioNet, means)
    ("2021", "vanilla", "3.55e-3", 733, "1.75 h", "0.53 s"),
    ("2021", "error-reg", "3.57e-3", 287, "0.94 h", "0.21 s"),
    ("2023", "vanilla", "3.41e-3", 758, "", ""),
    ("2023", "local unbiased", "3.64e-3", 422, "", ""),
    ("2023", "local biased", "3.63e-3", 463, "", ""),
]

CONFIGS = {
    "vanilla": {},
    "error-reg (global)": {"lambda_error": (1000.0, 100.0)},
    "local unbiased": {"local": "unbiased", "lambda_local": (100.0, 10.0)},
    "local biased": {"local": "biased", "lambda_local": (100.0, 10.0)},
}


def physionet_like(n_subjects=500, channels=5, hours=48, seed=0):
    """Returns t (hours+1,) in [0, 1], values (N, T, C) with NaN where unobserved, mask (N, T, C)."""
    rng = np.random.default_rng(seed)
    T = hours + 1
    grid = np.linspace(0.0, 1.0, T)
    fine = np.linspace(0.0, 1.0, 20 * hours + 1)
    read_w = rng.normal(0, 1.0, (2, channels))
    read_b = rng.normal(0, 0.3, channels)
    values = np.zeros((n_subjects, T, channels))
    for i in range(n_subjects):
        mu = rng.uniform(0.5, 2.0)
        omega = rng.uniform(4.0, 10.0)  # radians per unit time (48 h): 0.6–1.6 cycles
        x = rng.normal(0, 1.0, 2)
        path = np.zeros((len(fine), 2))
        dt = fine[1] - fine[0]
        for k in range(len(fine)):  # RK4 on the fine grid
            path[k] = x
            def f(s):
                return np.array([omega * s[1], omega * (mu * (1 - s[0] ** 2) * s[1] - s[0])])
            k1 = f(x); k2 = f(x + dt / 2 * k1); k3 = f(x + dt / 2 * k2); k4 = f(x + dt * k3)
            x = x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        z = path[::20]
        values[i] = np.tanh(z @ read_w + read_b) + rng.normal(0, 0.05, (T, channels))
    rates = rng.uniform(2, 12, channels)  # Poisson observations per 48 h, per channel
    mask = np.zeros_like(values, dtype=bool)
    for i in range(n_subjects):
        for c in range(channels):
            times = rng.uniform(0, hours, rng.poisson(rates[c]) + 1)  # at least one observation
            mask[i, np.round(times).astype(int), c] = True
    values[~mask] = np.nan
    return torch.from_numpy(grid), torch.from_numpy(values), torch.from_numpy(mask)


class LatentODE(torch.nn.Module):
    def __init__(self, channels, latent, hidden, rec_hidden=32):
        super().__init__()
        self.gru = torch.nn.GRU(2 * channels + 1, rec_hidden, batch_first=True)
        self.to_q = torch.nn.Linear(rec_hidden, 2 * latent)
        self.f = torch.nn.Sequential(torch.nn.Linear(latent, hidden), torch.nn.Tanh(),
                                     torch.nn.Linear(hidden, hidden), torch.nn.Tanh(),
                                     torch.nn.Linear(hidden, latent))
        self.readout = torch.nn.Linear(latent, channels)

    def encode(self, t, x, m):
        dt = torch.diff(t, prepend=t[:1]).expand(x.shape[0], -1)[..., None]
        inp = torch.cat([torch.nan_to_num(x) * m, m.to(x.dtype), dt], -1).flip(1)  # backwards in time
        _, h = self.gru(inp)
        mu, logsig = self.to_q(h[-1]).chunk(2, -1)
        return mu, logsig.clamp(-6, 2).exp()

    def decode(self, t, z0, rtol, atol, **kw):
        sol = pb.solve(pb.ODEProblem(lambda s, z: self.f(z), z0, t), pb.Tsit5(), rtol=rtol, atol=atol,
                       batch="lockstep", **kw)
        return sol, self.readout(sol.ys).transpose(0, 1)  # (B, T, C)


OBS_STD = 0.1




def train(cfg, data, seed, args, bar=None):
    t, (x, m), _ = data
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = LatentODE(x.shape[-1], args.latent, args.hidden).double()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    per_epoch = math.ceil(len(x) / args.batch)
    steps, step, train_s, curve = args.epochs * per_epoch, 0, 0.0, []
    for epoch in range(args.epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(per_epoch):
            idx = perm[i * args.batch:(i + 1) * args.batch]
            start = time.process_time()
            xb, mb = x[idx], m[idx]
            mu, sig = model.encode(t, xb, mb)
            z0 = mu + sig * torch.randn(mu.shape, generator=gen, dtype=mu.dtype)
            sol, pred = model.decode(t, z0, args.rtol, args.atol, local_regularizer=cfg.get("local"),
                                     seed=seed * 1_000_003 + step)
            nll = (0.5 * ((pred - torch.nan_to_num(xb)) / OBS_STD) ** 2 * mb).sum() / mb.sum()
            kl = (0.5 * (mu ** 2 + sig ** 2 - 1) - sig.log()).sum(-1).mean() / mb[0].numel()
            loss = nll + min(1.0, step / (0.5 * steps)) * kl  # KL annealing over the first half
            loss = add_regularizers(loss, cfg, sol, step, steps)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            train_s += time.process_time() - start
            curve.append(int(sol.stats.nfe.max()))
            step += 1
            if bar is not None:
                bar.update(1)
    return model, train_s, curve


def evaluate(model, data, args, repeats=3):
    t, _, (x, m) = data
    walls = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.process_time()
            mu, _ = model.encode(t, x, m)
            sol, pred = model.decode(t, mu, args.rtol, args.atol)
            walls.append(time.process_time() - start)
    mse = (((pred - torch.nan_to_num(x)) ** 2) * m).sum().item() / m.sum().item()
    return mse, int(sol.stats.nfe.max()), sorted(walls)[len(walls) // 2]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--subjects", type=int, default=500)
    ap.add_argument("--channels", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--latent", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--rtol", type=float, default=1e-7)
    ap.add_argument("--atol", type=float, default=1e-7)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 2 epochs on 100 subjects, not saved")
    ap.add_argument("--out", default="experiments/results")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from tqdm import tqdm

    if args.quick:
        args.seeds, args.epochs, args.subjects = args.seeds[:1], 2, 100
    t, values, mask = physionet_like(args.subjects, args.channels)
    n_train = int(0.8 * len(values))
    data = (t, (values[:n_train], mask[:n_train]), (values[n_train:], mask[n_train:]))
    steps = args.epochs * math.ceil(n_train / args.batch)
    results = {n: [] for n in args.configs}
    curves = {n: [] for n in args.configs}
    wall0 = time.perf_counter()
    with tqdm(total=steps * len(args.configs) * len(args.seeds), desc="latent_ode", unit="step") as bar:
        for seed in args.seeds:
            for name in args.configs:
                bar.set_postfix_str(f"seed {seed} · {name}")
                model, train_s, curve = train(CONFIGS[name], data, seed, args, bar)
                mse, nfe, pred_s = evaluate(model, data, args)
                results[name].append(dict(seed=seed, mse=mse, nfe=nfe, train_s=train_s, predict_s=pred_s))
                curves[name].append(curve)
                tqdm.write(f"seed {seed} {name:20s} test MSE {mse:.4g}  NFE {nfe:4d}  train {train_s:6.1f} s  predict {pred_s * 1e3:6.1f} ms")
    total = time.perf_counter() - wall0
    text = report(results, args, total, n_train, len(values) - n_train, mask)
    print(text)
    if args.quick:
        return results
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latent_ode.txt").write_text(text)
    (out / "latent_ode.json").write_text(json.dumps(dict(results=results, args=vars(args)), indent=1))
    plot(results, curves, out / "latent_ode.png", "mse", "test MSE",
         "NFE of the training decode (mean over seeds)")
    print(f"saved {out / 'latent_ode.txt'}, {out / 'latent_ode.json'} and {out / 'latent_ode.png'}")
    return results




def report(results, args, total, n_train, n_test, mask):
    stamp = (f"{time.strftime('%Y-%m-%d %H:%M')} · {platform.node()} · {platform.platform()} · "
             f"{platform.processor() or platform.machine()} · torch {torch.__version__} · 1 thread")
    setup = (f"synthetic PhysioNet-like: {n_train} train / {n_test} test subjects, {args.channels} channels, 49 hourly "
             f"slots, {100 * mask.double().mean():.0f} % observed; latent {args.latent}, hidden {args.hidden}, "
             f"{args.epochs} epochs, batch {args.batch}, Adam lr {args.lr:g}, Tsit5 rtol {args.rtol:g} atol {args.atol:g} "
             f"float64 lockstep, seeds {args.seeds}; whole run {total / 60:.1f} min wall. Times: CPU seconds.")
    header = (f"{'method':20s} {'test MSE':>20s} {'NFE at test':>14s} {'train CPU s':>14s} {'predict CPU ms':>14s}"
              f" {'MSE/van':>8s} {'NFE/van':>8s} {'train/van':>9s} {'pred speedup':>12s}")
    lines = [stamp, setup, "", "measured here (mean ± sd over seeds):", header, "-" * len(header)]
    base = {k: statistics.mean(r[k] for r in results["vanilla"]) for k in ("mse", "nfe", "train_s", "predict_s")} \
        if "vanilla" in results else None
    for name, rs in results.items():
        mse, nfe, tr, pr = (mean_sd([r[k] for r in rs]) for k in ("mse", "nfe", "train_s", "predict_s"))
        row = (f"{name:20s} {mse[0]:9.3e} ± {mse[1]:8.1e} {nfe[0]:7.1f} ± {nfe[1]:4.1f} {tr[0]:7.1f} ± {tr[1]:4.1f}"
               f" {pr[0] * 1e3:7.1f} ± {pr[1] * 1e3:4.1f}")
        if base:
            row += (f" {mse[0] / base['mse']:8.2f} {nfe[0] / base['nfe']:8.2f} {tr[0] / base['train_s']:9.2f}"
                    f" {base['predict_s'] / pr[0]:11.2f}x")
        lines.append(row)
    lines += ["", "per seed:"]
    for name, rs in results.items():
        lines.append(f"  {name:20s} " + "; ".join(
            f"seed {r['seed']}: MSE {r['mse']:.3g}, NFE {r['nfe']}, {r['train_s']:.0f} s, {r['predict_s'] * 1e3:.0f} ms" for r in rs))
    lines += paper_lines("paper (REGULARIZATION.md; real PhysioNet 2012, GPU, Tsit5 at 1.4e-8; means):", "test MSE", PAPER)
    return "\n".join(lines) + "\n"




if __name__ == "__main__":
    main()
