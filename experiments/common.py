"""Pieces the multi-seed experiments (mnist_node, mnist_nsde, latent_ode, latent_theoph) share: λ
schedules, reporting, and merging new configurations into saved results (`--add`)."""
from __future__ import annotations

import json
import math
import statistics
import time

import numpy as np


def schedule(lam, step, steps):
    """λ at `step`: a constant, or (λ0, λ1) changed exponentially over training (decayed, as in the
    papers, or grown when λ1 > λ0)."""
    if not isinstance(lam, (tuple, list)):
        return float(lam)
    lam0, lam1 = lam
    return lam0 * (lam1 / lam0) ** (step / max(steps - 1, 1))


def add_run_arguments(ap, configs, quick_help):
    """The options every multi-seed experiment shares: seeds, configurations, smoke run, output, --add."""
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--configs", nargs="+", default=list(configs), choices=list(configs))
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--out", default="experiments/results")
    ap.add_argument("--add", action="store_true",
                    help="train only --configs and merge them into the saved results (same settings)")


def load_saved(path, args, keys):
    """The saved results file at `path`; refuses one made with other settings (`keys` of args)."""
    saved = json.loads(path.read_text())
    if any(saved["args"].get(k) != getattr(args, k) for k in keys):
        raise SystemExit(f"{path} was made with other settings: {saved['args']}")
    return saved


def merge_saved(path, results, curves, args, total, keys, order):
    """Saved results (other configurations) plus the ones just trained, in `order` (the script's
    CONFIGS); a configuration trained now replaces its saved runs. The wall time becomes the sum of
    both runs, and args.configs the merged list. Refuses to merge runs made with other settings.
    Returns (results, curves, wall time, the report's note saying which rows were trained now)."""
    saved = load_saved(path, args, keys)
    merged = {**saved["results"], **results}
    merged_curves = {**saved.get("curves", {}), **curves}
    names = [n for n in order if n in merged]  # configurations no longer in `order` are dropped
    args.configs = names
    return ({n: merged[n] for n in names}, {n: merged_curves[n] for n in names if n in merged_curves},
            saved.get("wall_s", 0.0) + total, merged_note(list(results)))


def merged_note(trained_now):
    """The report's note when --add merged runs made at different times."""
    return (f"\n--add: {', '.join(trained_now)} trained in a later run than the rest; the metrics and NFE are "
            "deterministic per seed, but CPU-time ratios across runs also reflect the machine's load at each time.\n")


def save_run(out_dir, name, text, payload, results, curves, metric, metric_label, curve_label, ylim_top=None):
    """Write <name>.txt (the report), <name>.json (payload) and <name>.png (plot) under out_dir."""
    import json
    import pathlib
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.txt").write_text(text)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=1))
    plot(results, curves, out / f"{name}.png", metric, metric_label, curve_label, ylim_top=ylim_top)
    print(f"saved {out / name}.txt, .json and .png")


def run_grid(args, steps, desc, run_one, name_width=20):
    """Every configuration of args.configs on every seed of args.seeds under one progress bar of
    `steps` training steps each. run_one(name, seed, bar) -> (result dict, training curve, a line
    to print). Returns (results {name: [dict(seed=..., **result)]}, curves {name: [curve]}, wall s)."""
    from tqdm import tqdm
    results = {name: [] for name in args.configs}
    curves = {name: [] for name in args.configs}
    wall0 = time.perf_counter()
    with tqdm(total=steps * len(args.configs) * len(args.seeds), desc=desc, unit="step") as bar:
        for seed in args.seeds:
            for name in args.configs:
                bar.set_postfix_str(f"seed {seed} · {name}")
                result, curve, line = run_one(name, seed, bar)
                results[name].append(dict(seed=seed, **result))
                curves[name].append(curve)
                tqdm.write(f"seed {seed} {name:{name_width}s} {line}")
    return results, curves, time.perf_counter() - wall0


def train_classifier(model, data, cfg, seed, args, bar, solve_batch):
    """Adam on cross-entropy of model.head(z(t1)) plus the configuration's regularizers, shuffled
    batches of args.batch for args.epochs. solve_batch(x, step, gen) -> Solution. Returns (model,
    training CPU seconds without evaluations, NFE of each training solve)."""
    import torch
    (xtr, ytr), _ = data
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    steps_per_epoch = math.ceil(len(ytr) / args.batch)
    steps = args.epochs * steps_per_epoch
    train_nfe, train_s, step = [], 0.0, 0
    for _ in range(args.epochs):
        perm = torch.randperm(len(ytr), generator=gen)
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch:(i + 1) * args.batch]
            start = time.process_time()
            sol = solve_batch(xtr[idx], step, gen)
            loss = torch.nn.functional.cross_entropy(model.head(sol.ys[-1]), ytr[idx])
            loss = add_regularizers(loss, cfg, sol, step, steps)
            opt.zero_grad()
            loss.backward()
            opt.step()
            train_s += time.process_time() - start
            train_nfe.append(int(sol.stats.nfe.max()))
            step += 1
            if bar is not None:
                bar.update(1)
    return model, train_s, train_nfe


def evaluate_classifier(model, data, solve_test, repeats=3):
    """(test accuracy %, the prediction Solution, median CPU seconds of `repeats` prediction solves)."""
    import torch
    _, (xte, yte) = data
    cpu = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.process_time()
            sol = solve_test(xte)
            cpu.append(time.process_time() - start)
        acc = (model.head(sol.ys[-1]).argmax(-1) == yte).double().mean().item() * 100
    return acc, sol, sorted(cpu)[len(cpu) // 2]


def run_stamp():
    """The first line of every report: when, where, with which torch, on one thread."""
    import platform
    import torch
    return (f"{time.strftime('%Y-%m-%d %H:%M')} · {platform.node()} · {platform.platform()} · "
            f"{platform.processor() or platform.machine()} · torch {torch.__version__} · 1 thread")


def vanilla_means(results, keys):
    """Mean over seeds of each key for the "vanilla" configuration (None when it was not run)."""
    if "vanilla" not in results:
        return None
    return {k: statistics.mean(r[k] for r in results["vanilla"]) for k in keys}


def mean_sd(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def paper_lines(title, metric_label, rows):
    """The papers' table (REGULARIZATION.md) beside ours."""
    lines = ["", title, f"{'paper':6s} {'method':16s} {metric_label:>9s} {'NFE':>5s} {'train':>7s} {'predict':>8s}"]
    for row in rows:
        lines.append(f"{row[0]:6s} {row[1]:16s} {row[2]:>9s} {row[3]:5d} {row[4]:>7s} {row[5]:>8s}")
    return lines


def plot(results, curves, path, metric, metric_label, curve_label, ylim_top=None):
    """Bars of the metric and test NFE (mean ± sd over seeds) and the NFE curve over training."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, key, label in ((axes[0], metric, metric_label), (axes[1], "nfe", "NFE at test")):
        means = [statistics.mean(r[key] for r in results[n]) for n in names]
        sds = [statistics.stdev(r[key] for r in results[n]) if len(results[n]) > 1 else 0 for n in names]
        ax.bar(range(len(names)), means, yerr=sds, capsize=4, color=[f"C{i}" for i in range(len(names))])
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=20, fontsize=8)
        ax.set_ylabel(label)
        if key == metric and ylim_top is not None:
            ax.set_ylim(min(means) - 3, ylim_top)
    for i, n in enumerate(names):
        if n in curves:  # runs saved before curves were kept have none
            axes[2].plot(np.array(curves[n], dtype=float).mean(0), color=f"C{i}", label=n)
    axes[2].set_xlabel("training step")
    axes[2].set_ylabel(curve_label)
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def add_regularizers(loss, cfg, sol, step, steps):
    """The configuration's regularizers (REGULARIZATION.md) added to the task loss at this step."""
    import pybridge as pb
    if cfg.get("lambda_error"):
        loss = loss + schedule(cfg["lambda_error"], step, steps) * pb.error_regularizer(sol, reduction="mean")
    if cfg.get("lambda_stiff"):
        # the released 2021 MNIST code's variant: max over steps of S_j / stability size, no dt
        loss = loss + schedule(cfg["lambda_stiff"], step, steps) * pb.stiffness_regularizer(
            sol, reduction="max", with_dt=False, ratio=True)
    if cfg.get("local"):
        loss = loss + schedule(cfg["lambda_local"], step, steps) * sol.local_regularizer
    return loss
