"""Fixed-step solves (adaptive=False) without the adaptive loop's per-step bookkeeping.

With fixed steps and save times shared by the batch, the whole step sequence is known before the
first step: `step_grid` computes it once on the host with the arithmetic of loop.Advance.aim (NumPy
scalars of the state's dtype round exactly as torch's ops do), so the steps, their times and hence
the Brownian increments are the ones the general loop (loop.py) takes. Each step then costs the
method's own work plus a few ops: no step choice, error-norm acceptance or controller, and no host
read at all. What the general loop does per sample still holds: a sample whose state turns
non-finite is stopped (code Unstable) with its values kept up to that step and NaN after. With
gradients, such a solve is re-run with that sample stepping with h = 0 from just before its failing
step, so that no non-finite value enters the autograd graph (see integrate_fixed). The trace,
counts, saves and return codes equal the general loop's.

Used when `grid_for` finds nothing this loop lacks (dense output, local-regularization probes, a
method whose steps report their own failures or counters, per-sample save times, a step count above
max_steps); otherwise the general loop runs. With compile=True, FixedStep (one step's tensor work)
runs as one torch.compile'd graph.
"""
from __future__ import annotations

import itertools
import math
from typing import NamedTuple, Optional

import numpy as np
import torch

from ..progress import current_hook as progress_hook
from ..solution import ReturnCode
from .brownian import VirtualBrownianTree
from .controller import Norm, constant, error_norm, rows_both_finite, rows_finite
from .stand_in import taking_part
from .loop import (SAVE_BUFFER_ELEMENTS, LoopResult, _assemble_saves, _flush_saves, _flush_stiffness, compiled,
                   as_later_iterations_state, end_saves, saves_end_only, stand_in_where_f_fails_at_start,
                   tolerance_inputs)

HOST_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
# Brownian increments fetched per batched tree query (elements: steps × samples × dimensions).
NOISE_CHUNK_ELEMENTS = 1 << 16


class StepGrid(NamedTuple):
    starts: list            # τ at each step's start (host scalars of the state's dtype)
    ends: list              # τ at each step's end
    sizes: list             # h of each step
    saves: list             # per step, the save indices its end reaches (stop_at_saves), else []


def grid_for(method, tau_save: torch.Tensor, opts) -> Optional[StepGrid]:
    """The step sequence of a fixed-step solve, or None where the general loop is needed."""
    if (opts.adaptive or opts.dense or opts.probe is not None or opts.differentiable_dt or opts.event is not None
            or not getattr(method, "plain_steps", False) or tau_save.dtype not in HOST_DTYPES
            or not isinstance(opts.dt, (int, float)) or tau_save.requires_grad):
        return None                       # (the grid is host numbers: no gradient to the times)
    row = tau_save[0]
    if tau_save.shape[0] > 1 and not bool((tau_save == row).all()):
        return None                       # per-sample save times: per-sample grids
    return step_grid(row.cpu().numpy(), opts.dt, opts.stop_at_saves, opts.max_steps)


def step_grid(row: np.ndarray, dt: float, stop_at_saves: bool, max_steps: int) -> Optional[StepGrid]:
    """loop.Advance.aim for one sample, in the state's precision: a step of dt, or the rest of the
    way to the target (the end, or the next save point when stop_at_saves) where that is within dt
    plus a slack of 100 eps. None if it takes more than max_steps steps (the general loop reports
    MaxIters then)."""
    real = row.dtype.type
    eps = np.finfo(row.dtype).eps
    slack_factor, one, h = real(100 * eps), real(1.0), real(dt)
    tau, tau_end = row[0], row[-1]
    if h <= 0 or (tau_end - tau) / h > max_steps + len(row):
        return None
    starts, ends, sizes, saves = [], [], [], []
    next_save = 1
    while True:
        target = row[next_save] if stop_at_saves else tau_end
        slack = max(abs(target), one) * slack_factor
        remaining = target - tau
        origin = row[next_save - 1] if stop_at_saves else row[0]   # steps end on origin + k·dt
        grid_end = origin + (np.round((tau - origin) / h) + one) * h
        h_grid = grid_end - tau
        hit = h_grid >= remaining - slack
        step = remaining if hit else h_grid
        tau_new = target if hit else grid_end
        starts.append(tau)
        ends.append(tau_new)
        sizes.append(step)
        covered = int(np.searchsorted(row, tau_new, side="right"))
        saves.append(list(range(next_save, covered)) if stop_at_saves else [])
        next_save = max(next_save, covered)
        tau = tau_new
        if len(starts) > max_steps:
            return None
        if hit and target == tau_end:
            return StepGrid(starts, ends, sizes, saves)


class FixedIteration(NamedTuple):
    step: tuple                         # the method's step
    h: Optional[torch.Tensor]           # (B,) the step taken (0 for stopped samples), with guard; else None (h_grid)
    eest: Optional[torch.Tensor]        # (B,) or None (no embedded estimate)
    alive: torch.Tensor                 # (B,) not stopped, this step included
    y_new: torch.Tensor                 # (B, n) the new state (the last finite one if stopped)
    tau_new: torch.Tensor               # (B,) its time
    f_end: torch.Tensor                 # (B, n) f at the step's end
    extra_eval: bool                    # f_end cost an evaluation (no FSAL)
    stiffness_terms: Optional[tuple]
    k1: torch.Tensor                    # (B, n) the next step's first stage


class FixedStep:
    """The tensor work of one fixed step; pure, so that compile=True runs it as one graph."""

    def __init__(self, rhs, method, norm, atol, rtol, guard, keep_stages, stand_in=False):
        self.rhs, self.method, self.norm, self.atol, self.rtol, self.guard = rhs, method, norm, atol, rtol, guard
        # The re-run with samples stopped (see integrate_fixed) stands in for their rows of f (stand_in.py).
        self.stand_in = stand_in
        # The stages are only kept to interpolate save points; unreturned, a compiled step need not
        # write them (or replay them as a view of its input k1, as an SDE step's are).
        self.keep_stages = keep_stages
        self.has_stiffness_terms = hasattr(method, "stiffness_terms")

    def __call__(self, tau, y, h_grid, end, k1, alive, tau_prev, noise=()) -> FixedIteration:
        method, rhs = self.method, self.rhs
        if self.guard:  # a stopped sample steps with h = 0 from its own last time and state
            h = torch.where(alive, h_grid, constant(0.0, h_grid))
            tau, end = torch.where(alive, tau, tau_prev), torch.where(alive, end, tau_prev)
            if self.stand_in:
                rhs = taking_part(rhs, alive, k1)   # (lockstep: see stand_in.py)
        else:
            h = h_grid
        step = method.step(rhs, tau, y, h, k1, *noise)
        if not self.guard:
            h = None  # h_grid itself: returning an input costs the compiled call an alias replay
        eest = None
        if step.err is not None:
            eest = error_norm(self.norm, step.err, y, step.y1, self.atol, self.rtol, valid=alive)
        # As in loop.Advance: the next step starts from (y1, f(t1, y1)), so both must be finite.
        f_end, extra_eval = method.end_derivative(step), False
        if f_end is None:
            f_end, extra_eval = rhs(end, step.y1), True
        alive = alive & rows_both_finite(step.y1, f_end)
        keep = alive[:, None]
        y_new = torch.where(keep, step.y1, y)
        tau_new = torch.where(alive, end, tau_prev)
        terms = method.stiffness_terms(step, step.y1, f_end) if self.has_stiffness_terms else None
        if not self.keep_stages:
            step = step._replace(ks=None)
        return FixedIteration(step, h, eest, alive, y_new, tau_new, f_end, extra_eval, terms,
                              torch.where(keep, f_end, k1))


def integrate_fixed(rhs, method, tau_save, y0, atol, rtol, opts, grid: StepGrid, stop_at=None) -> LoopResult:
    """stop_at (B,): stop each sample before that step (a re-run, see below); None: where it fails."""
    B, n = y0.shape
    N = len(grid.sizes)
    dtype, device = y0.dtype, y0.device
    as_rows = lambda xs: torch.tensor(np.asarray(xs), dtype=dtype, device=device)[:, None].expand(N, B)  # noqa: E731
    starts, ends, sizes = as_rows(grid.starts), as_rows(grid.ends), as_rows(grid.sizes)
    norm = Norm(opts.lockstep)
    # Stopped samples step with h = 0 (and no noise) only where it matters, for the autograd graph's
    # sake; without gradients their steps are simply discarded (FixedStep keeps the last state).
    guard = torch.is_grad_enabled()
    noise = _NoiseChunks(method, starts, sizes, B, guard)
    if opts.compile:
        atol, rtol = tolerance_inputs(atol, rtol, dtype, device)
    end_only = saves_end_only(opts, tau_save.shape[1])
    advance = FixedStep(rhs, method, norm, atol, rtol, guard, keep_stages=not (opts.stop_at_saves or end_only),
                        stand_in=stop_at is not None)
    if opts.compile:
        advance = compiled(advance, device)
    on_progress = progress_hook()
    t0, span = float(grid.starts[0]), float(grid.ends[-1] - grid.starts[0])

    y, k1, failed_at_start = stand_in_where_f_fails_at_start(rhs, starts[0], y0, rhs(starts[0], y0))
    tau = starts[0]
    if opts.compile:  # the first step's inputs in the later steps' memory layout: one graph, not two
        tau, y, k1 = (x.clone(memory_format=torch.contiguous_format) for x in (tau, y, k1))
        y = as_later_iterations_state(y, k1)
    alive = torch.ones(B, dtype=torch.bool, device=device)
    if failed_at_start is not None:
        alive = ~failed_at_start
    alive_after, step_nfes, eests, stiffness_terms, stiffness = [], [], [], [], []
    save_vals, save_alive, save_steps = [], [], []
    pending, pending_size, saved_vals, saved_idx = [], 0, [], []
    next_save = torch.ones(B, dtype=torch.long, device=device)
    lazy_evals, extra_eval = [], False
    for i in range(N):
        if stop_at is not None:
            alive = alive & (stop_at > i)
        it = advance(starts[i], y, sizes[i], ends[i], k1, alive, tau, noise.at(i, alive))
        step, alive, y_new, tau_new, f_end = it.step, it.alive, it.y_new, it.tau_new, it.f_end
        h = sizes[i] if it.h is None else it.h
        step_nfes.append(step.nfe)
        extra_eval = it.extra_eval
        if it.eest is not None:
            eests.append(it.eest)
        if it.stiffness_terms is not None:  # estimates computed many steps at once, as in loop.py
            stiffness_terms.append(it.stiffness_terms)
            stiffness.append(None)
            if len(stiffness_terms) * 2 * y.numel() > SAVE_BUFFER_ELEMENTS:
                _flush_stiffness(method, stiffness_terms, stiffness, norm)
        alive_after.append(alive)
        if opts.stop_at_saves:
            if grid.saves[i]:
                save_vals.append(y_new)
                save_alive.append(alive)
                save_steps.append(grid.saves[i])
        elif not end_only:
            size = step.ks.numel() + 3 * y.numel()
            if pending and pending_size + size > SAVE_BUFFER_ELEMENTS:
                next_save = _flush_saves(method, pending, tau_save, next_save, saved_vals, saved_idx, rhs, lazy_evals)
                pending, pending_size = [], 0
            pending.append((tau, h, y, step.ks, step.y1, f_end, tau_new))
            pending_size += size
        if on_progress is not None:
            on_progress((float(grid.ends[i]) - t0) / span)
        y, tau, k1 = y_new, tau_new, it.k1

    accepted = torch.stack(alive_after)                           # (N, B)
    naccept = accepted.sum(0)
    stopped = ~alive
    if stop_at is None and torch.is_grad_enabled() and bool(stopped.any()):
        # The failing step's overflowing values are in the autograd graph; a zero cotangent times
        # an infinite partial derivative is NaN, which would reach shared parameters' gradients.
        # Re-run with those samples stopped just before their failing step (same grid, same noise:
        # the same values everywhere else), so that no non-finite value enters the graph.
        return integrate_fixed(rhs, method, tau_save, y0, atol, rtol, opts, grid,
                               stop_at=torch.where(stopped, naccept, N))
    iters = naccept + stopped                                    # the failing step counts as a try
    cum = torch.tensor([0] + list(itertools.accumulate(step_nfes)), device=device)
    nfe = 1 + cum[iters] + (naccept if extra_eval else 0)
    if pending:
        _flush_saves(method, pending, tau_save, next_save, saved_vals, saved_idx, rhs, lazy_evals)
    if lazy_evals:
        nfe = nfe + torch.stack(lazy_evals).sum(0)
    if opts.stop_at_saves:
        ys = _stepped_saves(y0, save_vals, save_alive, save_steps, tau_save.shape[1])
    elif end_only:
        ys = end_saves(y0, y, alive)
    else:
        ys = _assemble_saves(y0, saved_vals, saved_idx, tau_save.shape[1])

    eest = torch.stack(eests) if eests else torch.full((N, B), math.nan, dtype=dtype, device=device)
    if stiffness_terms:
        _flush_stiffness(method, stiffness_terms, stiffness, norm)
    stiffness = torch.stack(stiffness) if stiffness else torch.zeros(N, B, dtype=dtype, device=device)
    # Accepted steps form a prefix of each sample's row (a stopped sample accepts nothing after),
    # so this is the general loop's compacted trace as it stands.
    mask = accepted.T
    trace = {key: torch.where(mask, val.T, torch.zeros((), dtype=dtype, device=device))
             for key, val in (("t", ends), ("dt", sizes), ("eest", eest), ("stiffness", stiffness))}
    trace["mask"] = mask
    status = torch.where(stopped, int(ReturnCode.Unstable), int(ReturnCode.Success))
    return LoopResult(ys=ys, status=status, nfe=nfe, naccept=naccept, nreject=iters - naccept, counters={},
                      trace=trace, dense=None, tau=tau, dt=torch.full((B,), float(opts.dt), dtype=dtype, device=device),
                      y_end=y)


def _stepped_saves(y0, vals, alive, steps, T):
    """ys (T, B, n) from the states at the steps that end on save points; NaN from a sample's stop on."""
    out = [y0]
    nan = torch.tensor(math.nan, dtype=y0.dtype, device=y0.device)
    for val, ok, indices in zip(vals, alive, steps):
        out.extend([torch.where(ok[:, None], val, nan)] * len(indices))
    return torch.stack(out)


class _NoiseChunks:
    """An SDE method's Brownian increments for the grid's steps, fetched many steps per tree query
    (VirtualBrownianTree.grid_intervals) and handed to the step; () for ODE methods, and for other
    Brownian paths (the step then queries them itself). The grid being known, no prediction is needed
    (the general loop's fixed steps predict theirs: sde.StepAhead)."""

    def __init__(self, method, starts, sizes, B, mask_stopped):
        self.method, self.mask_stopped = method, mask_stopped
        bm = getattr(method, "bm", None)
        self.active = hasattr(method, "increments") and isinstance(bm, VirtualBrownianTree)
        if self.active:
            self.starts = starts
            self.ends = torch.minimum(starts + sizes, method.t_end)  # as SDEMethod.increments clamps
            self.chunk = max(1, NOISE_CHUNK_ELEMENTS // (B * method.m))
            self.first, self.W, self.H = 0, None, None

    def at(self, i, alive) -> tuple:
        """The extra arguments of step i's method.step: ((ΔW, H),), or () (none)."""
        if not self.active:
            return ()
        if self.W is None or i >= self.first + len(self.W):
            self.first = i
            sl = slice(i, i + self.chunk)
            W, H = self.method.bm.grid_intervals(self.starts[sl], self.ends[sl], area=self.method.needs_area)
            # Shaped for the step once per chunk, then one view per step.
            like = self.starts[i]
            self.W = self.method._shape(W, like, W.shape[0]).unbind(0)
            self.H = None if H is None else self.method._shape(H, like, H.shape[0]).unbind(0)
        j = i - self.first
        dW, H = self.W[j], None if self.H is None else self.H[j]
        if self.mask_stopped:  # a stopped sample steps with h = 0, hence with no noise either
            zero = constant(0.0, dW)
            dW = torch.where(alive[:, None], dW, zero)
            H = None if H is None else torch.where(alive[:, None], H, zero)
        return ((dW, H),)
