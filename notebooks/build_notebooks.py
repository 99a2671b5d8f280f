"""Writes the notebooks of this folder (the source of truth for their cells), without outputs.

    python notebooks/build_notebooks.py          # rewrite every notebook
    python notebooks/build_notebooks.py --check  # exit 1 if a notebook differs from this script

The tests (tests/test_notebooks.py) execute each notebook top to bottom with nbclient. Sizes are
small so that each runs in well under 30 s on a laptop core; the text says which knob to turn for
a real run. Edit here, then rebuild: committed notebooks carry no outputs.
"""
from __future__ import annotations

import pathlib
import sys

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = pathlib.Path(__file__).resolve().parent


def md(text):
    return new_markdown_cell(text.strip("\n"))


def code(text):
    return new_code_cell(text.strip("\n"))


NOTEBOOKS = {}

NOTEBOOKS["01_quickstart"] = [
    md("""
# pybridge quickstart

Solve a batch of ODEs, read the solution and its statistics, evaluate the dense output, and plot
the trajectories with the step sizes and error estimates the solver chose.
"""),
    code("""
import math
import torch
import pybridge as pb
import pybridge.plotting as pbplot

torch.manual_seed(0)
"""),
    md("""
## A batch of damped oscillators

`f(t, y)` returns dy/dt with y's shape. A `y0` of shape `(B, n)` is a batch of B samples; by default
each sample steps on its own (`batch="independent"`), so `f` receives `t` of shape `(B,)`.
Here every sample has its own damping, so the exact solution is known.
"""),
    code("""
B = 8
damping = torch.linspace(0.05, 0.8, B, dtype=torch.float64)
omega = 2.0

def field(t, y):                          # y: (B, 2) = (position, velocity)
    q, p = y[:, 0], y[:, 1]
    return torch.stack([p, -omega**2 * q - 2 * damping * p], -1)

y0 = torch.tensor([1.0, 0.0], dtype=torch.float64).repeat(B, 1)    # (B, 2)
t = torch.linspace(0.0, 10.0, 41, dtype=torch.float64)              # (T,)
prob = pb.ODEProblem(field, y0, t)
sol = pb.solve(prob, pb.Tsit5(), rtol=1e-8, atol=1e-10, dense=True)
sol
"""),
    md("""
`sol.ys` is time-first, `(T, B, 2)` (the torchdiffeq convention). Statistics and return codes are
per sample.
"""),
    code("""
print("ys:", tuple(sol.ys.shape))
print("retcodes:", sol.retcodes[:3], "... success:", sol.success)
print("NFE per sample:", sol.stats.nfe.tolist())
print("accepted / rejected:", sol.stats.naccept.tolist(), sol.stats.nreject.tolist())
"""),
    code("""
def exact(t, zeta):                      # underdamped oscillator, q(0)=1, p(0)=0
    wd = torch.sqrt(omega**2 - zeta**2)
    return torch.exp(-zeta * t) * (torch.cos(wd * t) + zeta / wd * torch.sin(wd * t))

q_exact = exact(t[:, None], damping[None, :])                       # (T, B)
err = (sol.ys[..., 0] - q_exact).abs().max().item()
print(f"max error at the save points: {err:.2e}")
assert err < 1e-6
"""),
    md("""
## Dense output

With `dense=True`, `sol(t)` evaluates the method's own interpolant (Tsit5's 4th-order one) anywhere
in the span — at shared times `(Tq,)` or per-sample times `(B, Tq)` — without solving again.
"""),
    code("""
tq = torch.linspace(0.0, 10.0, 1000, dtype=torch.float64)
dense_vals = sol(tq)                                                 # (Tq, B, 2)
dense_err = (dense_vals[..., 0] - exact(tq[:, None], damping[None, :])).abs().max().item()
print(tuple(dense_vals.shape), f"max interpolation error: {dense_err:.2e}")
assert dense_err < 1e-5
"""),
    md("""
## Per-sample times, progress bar

Each sample may have its own save times (shape `(B, T)`). `progress=True` shows a tqdm bar over the
integration span (the slowest running sample); it is read in the loop's one device transfer per
step, so it adds no synchronization.
"""),
    code("""
t_per_sample = torch.stack([torch.linspace(0.0, 2.0 + i, 25, dtype=torch.float64) for i in range(B)])  # (B, T)
sol2 = pb.solve(pb.ODEProblem(field, y0, t_per_sample), pb.Tsit5(), rtol=1e-8, atol=1e-10, progress=True)
print(tuple(sol2.ys.shape), "final times:", t_per_sample[:, -1].tolist())
"""),
    md("""
## Plots

`pybridge.plotting` draws the trajectories (`dense_points` adds the interpolant between the saved
dots), the accepted step sizes, and the scaled error estimate EEst of every accepted step.
"""),
    code("""
fig = pbplot.plot_solution(sol, samples=[0, 3, 7], components=[0], dense_points=400)
"""),
    code("""
import matplotlib.pyplot as plt
fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
pbplot.plot_step_sizes(sol, samples=[0, 7], ax=axes[0])
pbplot.plot_error_estimates(sol, samples=[0, 7], ax=axes[1])
axes[0].set_title("step sizes"); axes[1].set_title("EEst per accepted step")
fig.tight_layout()
"""),
]

NOTEBOOKS["02_regularized_training"] = [
    md("""
# Error-regularized training of a neural ODE

The solver's local error estimate EEst of every accepted step is in the autograd graph, so the
*cost* of solving the model can be trained down (Pal et al., ICML 2021): add
`λ · pb.error_regularizer(sol)` = λ · Σ EEst·|dt| to the loss. Smaller error estimates let the
step-size controller take larger steps, so the trained model needs fewer function evaluations.

Task: a neural ODE maps points x to their quarter turn at t = 1. The field starts deliberately
"wild" (weights scaled up), which makes the initial dynamics expensive to solve. We train it
vanilla (λ = 0) and regularized, and plot the NFE of the training solves over training.
Sizes are small; raise `ITERS` for a real run.
"""),
    code("""
import time
import torch
import pybridge as pb
import matplotlib.pyplot as plt

ITERS = 30        # e.g. 300 for a real run
BATCH = 16
ROT = torch.tensor([[0.0, -1.0], [1.0, 0.0]])
T = torch.tensor([0.0, 1.0])

class Field(torch.nn.Module):
    def __init__(self, hidden=32, scale=3.0):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(2, hidden), torch.nn.Tanh(),
                                       torch.nn.Linear(hidden, hidden), torch.nn.Tanh(),
                                       torch.nn.Linear(hidden, 2))
        with torch.no_grad():
            for p in self.net.parameters():
                p.mul_(scale)

    def forward(self, t, y):          # t: (B,) per-sample times, y: (B, 2)
        return self.net(y)
"""),
    code("""
def train(lam, iters=ITERS, seed=0):
    torch.manual_seed(seed)
    f = Field()
    opt = torch.optim.Adam(f.parameters(), lr=1e-2)
    history = {"fit": [], "nfe": [], "reg": []}
    start = time.perf_counter()
    for it in range(iters):
        x = torch.randn(BATCH, 2)
        sol = pb.solve(pb.ODEProblem(f, x, T), pb.Tsit5(), rtol=1e-4, atol=1e-6)
        fit = (sol.ys[-1] - x @ ROT.T).square().mean()
        reg = pb.error_regularizer(sol)                  # mean over samples of Σ EEst·|dt|
        loss = fit + lam * reg
        opt.zero_grad()
        loss.backward()
        opt.step()
        history["fit"].append(fit.item())
        history["reg"].append(reg.item())
        history["nfe"].append(sol.stats.nfe.float().mean().item())   # per-sample NFE of this solve
    history["seconds"] = time.perf_counter() - start
    return f, history

runs = {lam: train(lam) for lam in (0.0, 10.0)}
for lam, (_, h) in runs.items():
    print(f"lambda={lam:5.1f}: final fit {h['fit'][-1]:.4f}, NFE {h['nfe'][-1]:.1f}, "
          f"R_E {h['reg'][-1]:.4f}, {h['seconds']:.1f}s")
"""),
    code("""
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
for lam, (_, h) in runs.items():
    label = "vanilla" if lam == 0 else f"error-regularized (λ={lam:g})"
    axes[0].plot(h["nfe"], label=label)
    axes[1].semilogy(h["fit"], label=label)
axes[0].set_xlabel("training iteration"); axes[0].set_ylabel("NFE per sample (training solve)")
axes[1].set_xlabel("training iteration"); axes[1].set_ylabel("fit loss (MSE)")
axes[0].legend(); fig.tight_layout()
"""),
    md("""
## The trained models at test time

Solve both trained fields on fresh points, at the training tolerance, and compare cost and accuracy.
"""),
    code("""
x_test = torch.randn(256, 2, generator=torch.Generator().manual_seed(1))
for lam, (f, _) in runs.items():
    with torch.no_grad():
        sol = pb.solve(pb.ODEProblem(f, x_test, T), pb.Tsit5(), rtol=1e-4, atol=1e-6)
    mse = (sol.ys[-1] - x_test @ ROT.T).square().mean().item()
    print(f"lambda={lam:5.1f}: test MSE {mse:.4f}, mean NFE {sol.stats.nfe.float().mean().item():.1f}")
"""),
    md("""
The regularizer also comes in other forms: `pb.stiffness_regularizer(sol)` (Σ of the per-step
stiffness estimate), and the 2023 paper's *local* regularizer, one extra step at a random time:
`pb.solve(..., local_regularizer="unbiased", seed=it)` then `loss + λ * sol.local_regularizer`
(r is EEst·dt of one step at the automatic initial dt — tiny — so λ is large, ~1e7 at rtol 1e-8).
"""),
]

NOTEBOOKS["03_stiff_kinetics"] = [
    md("""
# Stiff chemical kinetics: ROBER

Robertson's reaction (three species, rate constants spanning 9 orders of magnitude) is the
classic stiff test. An explicit method's step size is bounded by stability, not accuracy: on
t ∈ [0, 10⁵] it needs millions of steps, so with a step budget it stops with `MaxIters` — as a
per-sample return code, not an exception. A Rosenbrock method (Rodas5P) solves it in a few hundred
steps.
"""),
    code("""
import warnings
import torch
import pybridge as pb
import pybridge.plotting as pbplot
import matplotlib.pyplot as plt

def rober(t, y):
    y1, y2, y3 = y[..., 0], y[..., 1], y[..., 2]
    return torch.stack([-0.04 * y1 + 1e4 * y2 * y3,
                        0.04 * y1 - 1e4 * y2 * y3 - 3e7 * y2 ** 2,
                        3e7 * y2 ** 2], -1)

def rober_jac(t, y):                      # optional: stiff solvers otherwise use autodiff
    y1, y2, y3 = y[..., 0], y[..., 1], y[..., 2]
    zero = torch.zeros_like(y1)
    return torch.stack([torch.stack([-0.04 + zero, 1e4 * y3, 1e4 * y2], -1),
                        torch.stack([0.04 + zero, -1e4 * y3 - 6e7 * y2, -1e4 * y2], -1),
                        torch.stack([zero, 6e7 * y2, zero], -1)], -2)      # (..., 3, 3)

y0 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
t = torch.cat([torch.zeros(1, dtype=torch.float64), torch.logspace(-5, 5, 40, dtype=torch.float64)])
prob = pb.ODEProblem(rober, y0, t, jac=rober_jac)
"""),
    md("## An explicit solver with a step budget"),
    code("""
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    explicit = pb.solve(prob, pb.Tsit5(), rtol=1e-6, atol=1e-10, max_steps=500)
print(explicit.retcodes, explicit.stats)
print("warning:", caught[0].message if caught else None)
t_stop = explicit.extras["t_final"].item()
print(f"stopped at t = {t_stop:.3g} of 1e5 after {int(explicit.stats.naccept)} accepted steps")
assert explicit.retcodes == [pb.ReturnCode.MaxIters]
"""),
    md("""
The values up to the failure are kept; later ones are NaN. The step sizes show why: after the
fast transient the explicit method is pinned to its stability limit, |λ·dt| ≈ its stability size.
"""),
    code("""
fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
pbplot.plot_step_sizes(explicit, ax=axes[0])
axes[0].set_xscale("log"); axes[0].set_title("Tsit5: step sizes")
tr = explicit.trace
ratio = (tr.stiffness * tr.dt / tr.stability_size)[tr.mask]
axes[1].semilogx(tr.t[tr.mask], ratio, ".", ms=2)
axes[1].set_xlabel("t"); axes[1].set_ylabel("|λ·dt| / stability size"); axes[1].set_title("Tsit5: stiffness ratio")
fig.tight_layout()
"""),
    md("## Rodas5P"),
    code("""
stiff = pb.solve(prob, pb.Rodas5P(), rtol=1e-6, atol=1e-10, dense=True)
print(stiff.retcodes, stiff.stats)
assert stiff.success
mass = stiff.ys.sum(-1)
print(f"mass conservation: max |y1+y2+y3-1| = {(mass - 1).abs().max().item():.1e}")
assert (mass - 1).abs().max() < 1e-6
y_end = stiff.ys[-1]
print("y(1e5) =", y_end.tolist())   # SciPy Radau (rtol 1e-12): y1 ~ 1.786e-2, y2 ~ 7.27e-8 at t = 1e5
assert abs(y_end[0].item() - 1.786e-2) < 1e-4
"""),
    code("""
fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
scale = torch.tensor([1.0, 1e4, 1.0], dtype=torch.float64)
for i, name in enumerate(["y1", "y2 × 1e4", "y3"]):
    axes[0].semilogx(t[1:], (stiff.ys[1:, i] * scale[i]), "o-", ms=3, label=name)
axes[0].set_xlabel("t"); axes[0].legend(); axes[0].set_title("Rodas5P on ROBER")
pbplot.plot_step_sizes(stiff, ax=axes[1])
axes[1].set_xscale("log"); axes[1].set_title(f"Rodas5P: {int(stiff.stats.naccept)} steps")
fig.tight_layout()
"""),
]

NOTEBOOKS["04_neural_sde"] = [
    md("""
# A neural SDE: adaptive SOSRI, Brownian paths, moment matching

A neural SDE dy = f_θ(y) dt + g_θ(y) dW with a drift MLP and a *diagonal* diffusion (one Brownian
motion per component) is an `pb.SDEProblem`; `pb.solve(prob, pb.SOSRI(), seed=...)` integrates it
with an adaptive strong-order-1.5 stochastic Runge–Kutta method. We

1. solve it and plot sample paths and mean ± sd,
2. reuse one Brownian path across solves with `pb.VirtualBrownianTree` (`brownian=`),
3. train it for a few steps to match the mean and variance of an Ornstein–Uhlenbeck process,
4. compare the solver's cost (NFE) of training with and without `pb.error_regularizer`.

Sizes are small; raise `ITERS` and `B` for a real run (see experiments/spiral_sde.py).
"""),
    code("""
import time
import torch
import pybridge as pb
import matplotlib.pyplot as plt

torch.manual_seed(0)
D = torch.float64
T = torch.linspace(0.0, 1.0, 11, dtype=D)            # save times
Y0 = torch.zeros(2, dtype=D)
TOL = 0.2                                              # SDE solvers run at loose tolerances (strong error)

# Target: two independent Ornstein–Uhlenbeck processes dX = θ(μ − X) dt + σ dW, X(0) = 0,
# whose mean and variance are known in closed form.
THETA = torch.tensor([1.5, 3.0], dtype=D)
MU = torch.tensor([1.0, -0.5], dtype=D)
SIGMA = torch.tensor([0.5, 0.8], dtype=D)

def ou_moments(t):
    e = torch.exp(-THETA * t[:, None])
    return MU + (Y0 - MU) * e, SIGMA ** 2 / (2 * THETA) * (1 - e ** 2)    # (T, 2) each

target_mean, target_var = ou_moments(T)
"""),
    md("""
## The model

`f(t, y)` and `g(t, y)` both return y's shape `(B, 2)` (`noise="diagonal"`, the default; Itô).
"""),
    code("""
class NeuralSDE(torch.nn.Module):
    def __init__(self, hidden=16):
        super().__init__()
        self.drift = torch.nn.Sequential(torch.nn.Linear(2, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 2))
        self.diffusion = torch.nn.Linear(2, 2)
        self.double()

    def f(self, t, y):                     # drift, (B, 2)
        return self.drift(y)

    def g(self, t, y):                     # diagonal diffusion, (B, 2), positive
        return torch.nn.functional.softplus(self.diffusion(y))

def problem(model, B):
    return pb.SDEProblem(model.f, model.g, Y0.expand(B, 2).clone(), T)

model = NeuralSDE()
B = 64
with torch.no_grad():
    sol = pb.solve(problem(model, B), pb.SOSRI(), rtol=TOL, atol=TOL, seed=0)
    again = pb.solve(problem(model, B), pb.SOSRI(), rtol=TOL, atol=TOL, seed=0)
print(sol)
print("success:", sol.success, "| mean NFE per path:", sol.stats.nfe.double().mean().item())
assert sol.success and torch.isfinite(sol.ys).all()
assert torch.equal(sol.ys, again.ys)     # same seed, same paths
"""),
    code("""
def plot_paths(ys, title, ax_row):
    m, s = ys.mean(1), ys.std(1)
    for k, ax in enumerate(ax_row):
        ax.plot(T, ys[:, :20, k], color="C0", alpha=0.25, lw=0.8)
        ax.plot(T, m[:, k], "C0", lw=2, label="model mean ± sd")
        ax.fill_between(T, m[:, k] - s[:, k], m[:, k] + s[:, k], color="C0", alpha=0.15)
        ax.plot(T, target_mean[:, k], "k--", label="OU target mean ± sd")
        ax.fill_between(T, target_mean[:, k] - target_var[:, k].sqrt(), target_mean[:, k] + target_var[:, k].sqrt(),
                        color="k", alpha=0.08)
        ax.set_title(f"{title}: y{k + 1}"); ax.set_xlabel("t")
    ax_row[0].legend(fontsize="small")

fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
plot_paths(sol.ys.detach(), "untrained", axes)
fig.tight_layout()
"""),
    md("""
## Reusing a Brownian path

`pb.VirtualBrownianTree(t0, t1, (B, m), seed=...)` is one fixed Brownian path per sample, queried at
any times; passed as `brownian=`, every solve — at any tolerance, with any rejected steps — sees the
*same* noise. So solutions at two tolerances converge to each other (a strong, pathwise
comparison), while a different tree gives different paths. SOSRI uses the space-time Lévy area
(`levy_area=True`); `tol` is the tree's time resolution (below the smallest step taken).
"""),
    code("""
Bt = 16
ou = pb.SDEProblem(lambda t, y: THETA * (MU - y), lambda t, y: SIGMA.expand_as(y), Y0.expand(Bt, 2).clone(), T)
bm = pb.VirtualBrownianTree(0.0, 1.0, (Bt, 2), seed=3, levy_area=True, tol=2.0 ** -12)
other = pb.VirtualBrownianTree(0.0, 1.0, (Bt, 2), seed=4, levy_area=True, tol=2.0 ** -12)
loose = pb.solve(ou, pb.SOSRI(), rtol=0.2, atol=0.2, brownian=bm)
tight = pb.solve(ou, pb.SOSRI(), rtol=0.05, atol=0.05, brownian=bm)
fresh = pb.solve(ou, pb.SOSRI(), rtol=0.05, atol=0.05, brownian=other)
same_path = (loose.ys - tight.ys).abs().max().item()
new_path = (fresh.ys - tight.ys).abs().max().item()
print(f"same Brownian path, tol 0.2 vs 0.05:  max |difference| = {same_path:.2e}  "
      f"(NFE {loose.stats.nfe.double().mean().item():.0f} vs {tight.stats.nfe.double().mean().item():.0f})")
print(f"another Brownian path:                max |difference| = {new_path:.2e}")
assert same_path < 0.1 * new_path
"""),
    code("""
fig, ax = plt.subplots(figsize=(6, 3.2))
ax.plot(T, tight.ys[:, :4, 0], "C0-", lw=1.5)
ax.plot(T, loose.ys[:, :4, 0], "C1o", ms=3)
ax.plot(T, fresh.ys[:, :4, 0], "C2:", lw=1)
ax.set_title("OU y1: same path tol 0.05 (lines), tol 0.2 (dots); another path (dotted)")
ax.set_xlabel("t"); fig.tight_layout()
"""),
    md("""
## Training: match the OU moments

Loss: squared error of the per-time mean and variance over B paths against the OU's. Every
iteration draws fresh noise (`seed=it`). `batch="lockstep"` steps all paths with one step size (one
error estimate per step, as in the papers). With `lam > 0` the loss adds λ · `pb.error_regularizer(sol)`
(Σ EEst·|dt| of the accepted steps), which pushes the model towards dynamics the controller can
solve in fewer steps. Both runs use the same seeds, so their first iterations coincide.
"""),
    code("""
ITERS = 10        # e.g. 200 for a real run
B = 32

def moment_loss(ys):
    return ((ys.mean(1) - target_mean) ** 2).mean() + ((ys.var(1) - target_var) ** 2).mean()

def train(lam, iters=ITERS):
    torch.manual_seed(0)
    model = NeuralSDE()
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    h = {"loss": [], "nfe": [], "reg": []}
    start = time.perf_counter()
    for it in range(iters):
        sol = pb.solve(problem(model, B), pb.SOSRI(), rtol=TOL, atol=TOL, seed=it, batch="lockstep")
        fit = moment_loss(sol.ys)
        reg = pb.error_regularizer(sol)
        loss = fit + lam * reg
        opt.zero_grad()
        loss.backward()
        opt.step()
        h["loss"].append(fit.item()); h["reg"].append(reg.item())
        h["nfe"].append(sol.stats.nfe.double().mean().item())
    h["seconds"] = time.perf_counter() - start
    return model, h

runs = {lam: train(lam) for lam in (0.0, 1.0)}
for lam, (_, h) in runs.items():
    print(f"lambda={lam:3.1f}: moment loss {h['loss'][0]:.3f} -> {h['loss'][-1]:.3f}, "
          f"NFE {h['nfe'][0]:.0f} -> {h['nfe'][-1]:.0f}, R_E {h['reg'][0]:.3f} -> {h['reg'][-1]:.3f}, {h['seconds']:.1f} s")
for lam, (_, h) in runs.items():
    assert min(h["loss"][-3:]) < 0.5 * h["loss"][0], (lam, h["loss"])
"""),
    code("""
fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
for lam, (_, h) in runs.items():
    label = "vanilla" if lam == 0 else f"error-regularized (λ={lam:g})"
    axes[0].semilogy(h["loss"], label=label)
    axes[1].plot(h["nfe"], label=label)
    axes[2].plot(h["reg"], label=label)
axes[0].set_ylabel("moment loss"); axes[1].set_ylabel("NFE per path (training solve)"); axes[2].set_ylabel("R_E")
for ax in axes:
    ax.set_xlabel("training iteration")
axes[0].legend(); fig.tight_layout()
"""),
    md("""
## The trained models on fresh noise

Both trained models, solved on the same fresh Brownian path (a seed never used in training): the
moment loss against the OU target and the mean NFE per path. With only a few iterations the NFE
difference is small and noisy; the regularizer's effect grows over a real training run.
"""),
    code("""
Be = 128
bm_test = pb.VirtualBrownianTree(0.0, 1.0, (Be, 2), seed=99, levy_area=True, tol=2.0 ** -12)
with torch.no_grad():
    results = {}
    for lam, (m, _) in runs.items():
        s = pb.solve(problem(m, Be), pb.SOSRI(), rtol=TOL, atol=TOL, brownian=bm_test, batch="lockstep")
        results[lam] = s
        print(f"lambda={lam:3.1f}: test moment loss {moment_loss(s.ys).item():.4f}, "
              f"NFE per path {s.stats.nfe.double().mean().item():.0f}, R_E {pb.error_regularizer(s).item():.3f}")
    torch.manual_seed(0)                 # the initialization both training runs started from
    s0 = pb.solve(problem(NeuralSDE(), Be), pb.SOSRI(), rtol=TOL, atol=TOL, brownian=bm_test, batch="lockstep")
print(f"untrained:  test moment loss {moment_loss(s0.ys).item():.4f}")
assert all(moment_loss(s.ys) < moment_loss(s0.ys) for s in results.values())
fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
plot_paths(results[0.0].ys, "trained (vanilla)", axes)
fig.tight_layout()
"""),
]

NOTEBOOKS["05_baselines"] = [
    md("""
# pybridge against torchdiffeq and torchode (and diffrax, when installed)

One non-stiff problem — a batch of Lotka–Volterra systems with different initial conditions — solved
by each library's 5th-order method at several tolerances. We check that they agree with a tight
reference (scipy DOP853 at 1e-13) and plot achieved error against function evaluations and wall
time. Sizes are small; the full comparison lives in `make bench` (benchmarks/).

- torchdiffeq steps the whole batch with one step size (its error norm is over the batch);
- torchode and pybridge (default `batch="independent"`) step every sample on its own;
- NFE is per sample for torchode and pybridge (mean over the batch); for torchdiffeq, every
  evaluation is a batch evaluation.
"""),
    code("""
import importlib.util
import time
import numpy as np
import torch
import matplotlib.pyplot as plt
from scipy.integrate import solve_ivp
import pybridge as pb

torch.set_num_threads(1)
HAVE = {name: importlib.util.find_spec(name) is not None for name in ("torchdiffeq", "torchode", "diffrax")}
print(HAVE)

B = 8
TOLS = [1e-4, 1e-6, 1e-8]
t = torch.linspace(0.0, 5.0, 11, dtype=torch.float64)
y0 = 1.0 + 2.0 * torch.rand(B, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

def lotka_volterra(t, y):
    x, z = y[..., 0], y[..., 1]
    return torch.stack([1.5 * x - x * z, -3.0 * z + x * z], -1)

ref = torch.from_numpy(np.stack([
    solve_ivp(lambda s, y: lotka_volterra(None, torch.from_numpy(y)).numpy(), (0.0, 5.0), y0[b].numpy(),
              method="DOP853", t_eval=t.numpy(), rtol=1e-13, atol=1e-13).y.T for b in range(B)], 1))  # (T, B, 2)
"""),
    code("""
class Counted:
    def __init__(self, f):
        self.f, self.calls = f, 0
    def __call__(self, t, y):
        self.calls += 1
        return self.f(t, y)

def run_pybridge(tol):
    sol = pb.solve(pb.ODEProblem(lotka_volterra, y0, t), pb.Tsit5(), rtol=tol, atol=tol)
    return sol.ys, sol.stats.nfe.double().mean().item()

def run_torchdiffeq(tol):
    from torchdiffeq import odeint
    f = Counted(lotka_volterra)
    return odeint(f, y0, t, rtol=tol, atol=tol, method="dopri5"), f.calls

def run_torchode(tol):
    import torchode as to
    term = to.ODETerm(lotka_volterra)
    solver = to.AutoDiffAdjoint(to.Tsit5(term=term), to.IntegralController(atol=tol, rtol=tol, term=term))
    sol = solver.solve(to.InitialValueProblem(y0=y0, t_eval=t.expand(B, -1)))
    return sol.ys.transpose(0, 1), sol.stats["n_f_evals"].double().mean().item()

runners = {"pybridge Tsit5": run_pybridge}
if HAVE["torchdiffeq"]:
    runners["torchdiffeq dopri5"] = run_torchdiffeq
if HAVE["torchode"]:
    runners["torchode Tsit5"] = run_torchode
"""),
    md("""
diffrax (JAX) is optional: it runs in float64, vmapped over the batch and jit-compiled once (the
tolerance is a traced argument, so one compilation serves all tolerances; it happens in the
warm-up call, outside the timing). Its NFE is estimated from its step count.
"""),
    code("""
if HAVE["diffrax"]:
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import diffrax

    def lv_jax(t, y, args):
        return jnp.stack([1.5 * y[0] - y[0] * y[1], -3.0 * y[1] + y[0] * y[1]])

    @jax.jit
    def solve_jax(y0, tol):
        def one(y):
            s = diffrax.diffeqsolve(diffrax.ODETerm(lv_jax), diffrax.Tsit5(), 0.0, 5.0, None, y,
                                    stepsize_controller=diffrax.PIDController(rtol=tol, atol=tol),
                                    saveat=diffrax.SaveAt(ts=jnp.asarray(t.numpy())))
            return s.ys, s.stats["num_steps"]
        return jax.vmap(one)(y0)

    def run_diffrax(tol):
        ys, steps = jax.block_until_ready(solve_jax(jnp.asarray(y0.numpy()), jnp.float64(tol)))
        # Tsit5 is FSAL: about 6 evaluations per step attempt (+ the start)
        return torch.tensor(np.asarray(ys)).transpose(0, 1), float(np.mean(6 * np.asarray(steps) + 1))

    runners["diffrax Tsit5 (JAX)"] = run_diffrax
"""),
    code("""
results = {name: [] for name in runners}
for name, run in runners.items():
    run(TOLS[0])                                    # warm-up (and JAX's compilation)
    for tol in TOLS:
        start = time.perf_counter()
        ys, nfe = run(tol)
        seconds = time.perf_counter() - start
        err = ((ys - ref).abs() / (1 + ref.abs())).max().item()
        results[name].append((tol, err, nfe, seconds))
        print(f"{name:22s} tol={tol:.0e}  error={err:.2e}  NFE={nfe:7.1f}  time={1e3 * seconds:7.1f} ms")
"""),
    md("All libraries reach errors within a small multiple of the requested tolerance:"),
    code("""
for name, rows in results.items():
    for tol, err, nfe, seconds in rows:
        assert err < 100 * tol, (name, tol, err)
print("agreement check passed for", list(results))
"""),
    code("""
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
for name, rows in results.items():
    tol, err, nfe, sec = map(np.array, zip(*rows))
    axes[0].loglog(nfe, err, "o-", label=name)
    axes[1].loglog(sec * 1e3, err, "o-", label=name)
axes[0].set_xlabel("function evaluations (per sample, or per batch for torchdiffeq)")
axes[1].set_xlabel("wall time per solve [ms]")
for ax in axes:
    ax.set_ylabel("max scaled error"); ax.grid(True, which="both", alpha=0.3)
axes[0].legend(fontsize="small"); fig.suptitle(f"Lotka–Volterra, batch {B}, float64, 1 thread")
fig.tight_layout()
"""),
]

NOTEBOOKS["06_julia_engine"] = [
    md("""
# The Julia engine (`engine="julia"`)

`pb.solve(prob, solver, engine="julia")` solves with DifferentialEquations.jl through juliacall and
returns the same `Solution`. This notebook runs where a Julia runtime is available; elsewhere it
explains how to get one and stops cleanly (every later cell checks `JULIA_READY`).

**Installing.** Online: `pip install "pybridge[julia]"`; the first solve installs Julia and the
packages of `pybridge/juliapkg.json` (minutes, once). Offline, with an existing Julia:

```bash
julia --project=/path/to/pybridge -e 'using Pkg; Pkg.instantiate()'
export PYTHON_JULIACALL_EXE=/path/to/julia
export PYTHON_JULIACALL_PROJECT=/path/to/pybridge
```

Set `ALLOW_JULIA_DOWNLOAD = True` below to let juliacall download Julia when none is found.
"""),
    code("""
import importlib.util
import os
import shutil

ALLOW_JULIA_DOWNLOAD = False

have_juliacall = importlib.util.find_spec("juliacall") is not None
julia_exe = os.environ.get("PYTHON_JULIACALL_EXE") or shutil.which("julia")
JULIA_READY = have_juliacall and (julia_exe is not None or ALLOW_JULIA_DOWNLOAD)

if JULIA_READY:
    import juliacall  # before torch: avoids loading two copies of LLVM/libstdc++ symbols
    print("juliacall found; Julia:", julia_exe or "(will be downloaded)")
else:
    missing = [] if have_juliacall else ['juliacall (pip install "pybridge[julia]")']
    if julia_exe is None:
        missing.append("a Julia binary (on PATH, or PYTHON_JULIACALL_EXE)")
    print("The Julia engine is not available here. Missing:", "; ".join(missing))
    print("See the cell above for how to install it. The remaining cells are skipped.")
"""),
    code("""
import torch
import pybridge as pb

if JULIA_READY:
    from pybridge.julia_engine import JuliaUnavailableError

    def rober(t, y):
        y1, y2, y3 = y[..., 0], y[..., 1], y[..., 2]
        return torch.stack([-0.04 * y1 + 1e4 * y2 * y3,
                            0.04 * y1 - 1e4 * y2 * y3 - 3e7 * y2 ** 2, 3e7 * y2 ** 2], -1)

    prob = pb.ODEProblem(rober, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64),
                         torch.tensor([0.0, 1e-3, 1.0, 1e2, 1e5], dtype=torch.float64))
    try:
        sol_jl = pb.solve(prob, pb.Rodas5P(), engine="julia", rtol=1e-8, atol=1e-10)
    except JuliaUnavailableError as e:
        JULIA_READY = False
        print("Julia could not be started:", e)
"""),
    code("""
if JULIA_READY:
    sol_torch = pb.solve(prob, pb.Rodas5P(), rtol=1e-8, atol=1e-10)
    print("julia:", sol_jl.retcodes, sol_jl.stats)
    print("torch:", sol_torch.retcodes, sol_torch.stats)
    diff = (sol_jl.ys - sol_torch.ys).abs().max().item()
    print(f"max |julia - torch| = {diff:.2e}")
    assert diff < 1e-6
"""),
    md("""
Gradients flow through the Julia engine too (its adjoints run in Julia, calling the torch module
back for vector–Jacobian products): a neural field trained with `engine="julia"` looks exactly like
one trained with the torch engine.
"""),
    code("""
if JULIA_READY:
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).double()
    x = torch.randn(8, 2, dtype=torch.float64)
    sol = pb.solve(pb.ODEProblem(lambda t, y: net(y), x, torch.tensor([0.0, 1.0], dtype=torch.float64)),
                   pb.Tsit5(), engine="julia", batch="lockstep")
    sol.ys[-1].square().mean().backward()
    print("gradient norm:", sum(p.grad.norm() ** 2 for p in net.parameters()).sqrt().item())
else:
    print("skipped: no Julia runtime")
"""),
]


def build(name, cells):
    for i, cell in enumerate(cells):
        cell["id"] = f"{name[:2]}-{i:02d}"  # stable ids, so that rebuilding changes nothing
    nb = new_notebook(cells=cells, metadata={
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    })
    return nbformat.writes(nb) + "\n"


def main(argv):
    check = "--check" in argv
    stale = []
    for name, cells in NOTEBOOKS.items():
        path = HERE / f"{name}.ipynb"
        text = build(name, cells)
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
            print("wrote", path.relative_to(HERE.parent))
    if stale:
        print("out of date (run python notebooks/build_notebooks.py):", ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
