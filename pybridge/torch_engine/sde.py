"""SDE methods on the ODE integration loop (loop.py): same controller, trace, saves and failure codes.

A method object is built per solve: it holds the diffusion g, the noise mode and the Brownian path
(a VirtualBrownianTree queried with the loop's per-sample (τ, h), so a rejected and retried step sees
the same path). The drift is the loop's right-hand side, and k1 = f(t, y) is the loop's FSAL-like
reuse. Steps end exactly on save points (stop_at_saves) and `interpolate` is linear: an SDE path has
no smooth interpolant. Time always increases here (SDEProblem enforces it), so τ = t.

Noise modes (how g multiplies an increment v of shape (B, m)):
  "diag"   g (B, n), m = n: g·v elementwise (diagonal noise, or additive with y-shaped g)
  "scalar" g (B, n), m = 1: g·v broadcast
  "matrix" g (B, n, m): g @ v (additive or general noise with m Brownian motions)
"""
from __future__ import annotations

import warnings
from typing import NamedTuple, Optional

import torch

from ..regularization import parse_local_regularizer
from .brownian import VirtualBrownianTree
from .controller import Norm, PIController, step_floor
from .engine import RightHandSide, _per_component, _probe, _to_solution, attach_local_regularizer, check_output
from .loop import LoopOptions, integrate
from .sde_tableaus import SRA_TABLEAUS, SRI_TABLEAUS


class SDEStep(NamedTuple):
    y1: torch.Tensor
    err: Optional[torch.Tensor]
    ks: torch.Tensor                 # (B, 1, n): the drift at the step start (dense-output storage only)
    stage_args: tuple
    nfe: int                         # drift plus diffusion evaluations made by this call
    f_end: Optional[torch.Tensor] = None


class Diffusion:
    """g in the loop's terms: flattened states (B, n) → (B, n) or (B, n, m); checks g's first output."""

    def __init__(self, g, prob, scalar_time: bool):
        self.g = g
        self.prob = prob
        self.B = prob.batch_size
        self.shape = (self.B,) + prob.state_shape if prob.batched else prob.state_shape
        self.n = prob.y0.numel() // self.B
        self.scalar_time = scalar_time
        self.mode = None
        self.m = None

    def probe(self, t0):
        """Evaluate g once at (t0, y0) to learn (and check) the noise shape."""
        with torch.no_grad():
            out = self.g(t0[0] if self.scalar_time else t0, self.prob.y0.reshape(self.shape))
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"g must return a torch.Tensor; got {type(out).__name__}")
        noise = self.prob.noise
        state = tuple(self.shape)
        if tuple(out.shape) == state and noise != "general":
            self.mode, self.m = ("scalar", 1) if noise == "scalar" else ("diag", self.n)
        elif noise in ("additive", "general") and out.dim() == len(state) + 1 and tuple(out.shape[:-1]) == state:
            self.mode, self.m = "matrix", out.shape[-1]
        else:
            allowed = f"{state} (y's shape)" if noise != "general" else ""
            if noise in ("additive", "general"):
                allowed += (" or " if allowed else "") + f"{state + ('m',)} (m Brownian motions)"
            raise ValueError(f"g returned shape {tuple(out.shape)}, which does not match noise={noise!r}: "
                             f"expected {allowed}")
        check_output(out.reshape(state) if self.mode != "matrix" else out[..., 0], self.prob.y0, state)
        if noise == "additive":
            self._warn_if_state_dependent(t0, out)

    def _warn_if_state_dependent(self, t0, out):
        """Additive-noise methods (SRA, and Itô = Stratonovich) assume g(t, y) = g(t): one more call
        of g at a shifted state catches a g that does depend on y."""
        y0 = self.prob.y0.reshape(self.shape)
        with torch.no_grad():
            shifted = self.g(t0[0] if self.scalar_time else t0, y0 + 1.0 + y0.abs())
        if not torch.equal(torch.as_tensor(shifted).reshape(out.shape), out):
            warnings.warn("noise='additive' says g does not depend on y, but g(t0, y0) and g(t0, y0 + 1 + |y0|) "
                          "differ: with a y-dependent g, use noise='diagonal' (or 'general'); the additive-noise "
                          "methods would be solving a different SDE (a random g, such as dropout in training "
                          "mode, also triggers this)", RuntimeWarning, stacklevel=6)

    def __call__(self, tau, y):
        # (lockstep: the drift's calls make every row's time the first row's, stand_in.py; a step's
        # g calls are not wrapped, and a stopped sample's τ is behind the running samples')
        out = self.g(tau.amax() if self.scalar_time else tau, y.reshape(self.shape))
        if self.mode == "matrix":
            return out.reshape(y.shape[0], y.shape[1], self.m)
        return out.reshape(y.shape)

    def times(self, g, v):
        """The noise term g·v for an increment-like v (B, m)."""
        if self.mode == "matrix":
            return (g @ v[..., None])[..., 0]
        return g * v

    def times_vjp(self, ybar, v):
        """Cotangent of g in g·v for the output cotangent ybar (B, n)."""
        if self.mode == "matrix":
            return ybar[:, :, None] * v[:, None, :]
        return ybar * v


# Elements (interval, sample, Brownian dimension) per look-ahead query of a fixed-step solve: large
# enough to amortise the per-query kernel launches for small batches, small enough that the tree's
# per-level temporaries stay in cache (and memory stays O(1) in the number of steps).
LOOKAHEAD_ELEMENTS = 1 << 16


class StepAhead:
    """Fixed-step solves in the general loop (per-sample save times, dense output, probes; with
    shared save times fixed_loop knows the grid and fetches it directly): Brownian increments of the
    next steps from one batched tree query.

    A single VirtualBrownianTree query costs ~100 small kernels whatever the batch, so small-batch
    fixed-step solves are launch-bound. Each query here that does not match the cached look-ahead
    predicts the following steps as [s + jh, s + (j+1)h] (the loop's own sequential additions; the end
    clamped to the span like ``increments``) and fetches them with ``bm.intervals``, which also
    descends each shared grid point once. A step is served from the cache only if its (s, t) equal
    the predicted ones exactly, so the values are those of a direct query whatever the loop does
    (saves, finished samples, the adjoint's backward pass); a chunk's tree depth is shared by its
    intervals (VirtualBrownianTree._query_depth), so they can differ from a direct query by rounding.
    Chunk lengths: the first covers the steps to the end of the span, later ones double while the
    predictions hold and restart at 1 when they fail (non-aligned save points), which bounds the
    wasted work; all at most ``LOOKAHEAD_ELEMENTS`` elements."""

    def __init__(self, bm, t_end, B, m):
        self.bm, self.t_end = bm, t_end
        self.kmax = max(1, LOOKAHEAD_ELEMENTS // (B * m))
        self.i = self.n = 0
        self.S = self.T = self.W = self.H = None

    def __call__(self, s, t, h, area):
        i = self.i
        if i < self.n and (self.H is not None or not area) and torch.equal(s, self.S[i]) and torch.equal(t, self.T[i]):
            self.i += 1
            return self.W[i], (self.H[i] if area else None)
        if self.n == 0:
            k = self.kmax
        else:
            continuing = i == self.n and torch.equal(s, self.T[i - 1])
            k = min(2 * self.n, self.kmax) if continuing else 1
        self._fetch(s, h, min(k, self._steps_left(s, h)), area)
        self.i = 1
        return self.W[0], (self.H[0] if area else None)

    def _steps_left(self, s, h):
        """Steps of size h to the end of the span, most over the samples (one host sync)."""
        left = torch.where(h > 0, (self.t_end - s) / torch.where(h > 0, h, 1.0), 1.0)
        return max(1, int(torch.ceil(left).max()))

    def _fetch(self, s, h, k, area):
        S = [s]
        for _ in range(k - 1):  # s, s+h, (s+h)+h, ...: the loop's own additions, in order
            S.append(S[-1] + h)
        S = torch.stack(S)
        self.T = torch.minimum(S + h, self.t_end)
        self.S = torch.minimum(S, self.t_end)  # steps predicted past the end: empty, never matched
        self.W, self.H = self.bm.grid_intervals(self.S, self.T, area=area)
        self.n = k


class SDEMethod:
    """Shared machinery: Brownian increments, linear interpolation, no stiffness estimate."""

    interpolation_order = 1
    plain_steps = True  # see ExplicitRK.plain_steps
    needs_area = False  # the step uses the space-time Lévy area H (SRI, SRA)
    stability_size = float("nan")
    tableau = None
    adaptive = True
    order = 0.5
    delta = 1.0

    def __init__(self, g: Diffusion, bm, t_end):
        self.g = g
        self.bm = bm
        self.t_end = t_end
        self.B, self.m = g.B, g.m
        self.ahead = None

    def look_ahead(self):
        """Serve fixed steps from batched look-ahead queries (StepAhead); a no-op for Brownian
        paths other than a VirtualBrownianTree, and off the CPU (its cache checks read the device)."""
        if isinstance(self.bm, VirtualBrownianTree) and self.t_end.device.type == "cpu":
            self.ahead = StepAhead(self.bm, self.t_end, self.B, self.m)

    def increments(self, tau, h, noise=None):
        """(ΔW, H) over [τ, τ+h] per sample, in y's dtype; H the space-time Lévy area (None unless the
        method ``needs_area``). ``noise``: the same pair drawn beforehand (compiled loops draw it
        outside the graph, see loop.integrate); returned as given. The end is clamped to the span
        (a local-regularization probe may reach past it)."""
        if noise is not None:
            return noise
        area = self.needs_area
        # A Brownian path is nowhere differentiable in time: no gradient flows into the query times
        # (with differentiable_dt the step times carry a graph; through the tree it would be NaN).
        s, t = tau.detach(), torch.minimum(tau + h, self.t_end).detach()
        if self.ahead is not None:
            dW, H = self.ahead(s, t, h, area)
            return self._shape(dW, h), (None if H is None else self._shape(H, h))
        if area:
            dW, H = self.bm.increment_and_area(s, t)
            return self._shape(dW, h), self._shape(H, h)
        return self._shape(self.bm(s, t), h), None

    def _shape(self, x, h, *lead):
        """x as (*lead, B, m) in h's dtype and device."""
        return x.reshape(*lead, self.B, self.m).to(dtype=h.dtype, device=h.device)

    @staticmethod
    def safe_h(h):
        # Finished samples step with h = 0: keep divisions by h (and √h) finite for them.
        return torch.where(h > 0, h, torch.ones_like(h))[:, None]

    def end_derivative(self, step):
        return step.f_end

    def stiffness(self, step, y1, f1, norm):
        return torch.zeros(y1.shape[0], dtype=y1.dtype, device=y1.device)

    def interpolate(self, y0, h, ks, y1, f1, theta):
        th = theta[..., None]
        return y0[:, None] + th * (y1 - y0)[:, None]


class EM(SDEMethod):
    adaptive = False

    def step(self, rhs, tau, y, h, k1, noise=None):
        dW, _ = self.increments(tau, h, noise)
        y1 = y + h[:, None] * k1 + self.g.times(self.g(tau, y), dW)
        return SDEStep(y1, None, k1[:, None], (), 1)


class LambaEM(SDEMethod):
    """EM plus StochasticDiffEq.jl's LambaEM error estimate (perform_step/lamba.jl): drift part
    Ed = h (f(t+h, K) − f(t, y))/2, K = y + h f; diffusion part En = g g'·(ΔW² − h)/2 with the
    derivative-free g g' ≈ (g(K + g√h) − g)/√h. g is taken at (t, y) (plain EM; lamba.jl mixes
    (t+h, y) and (t+h, K) between its two caches)."""

    def step(self, rhs, tau, y, h, k1, noise=None):
        dW, _ = self.increments(tau, h, noise)
        hc = h[:, None]
        sq = self.safe_h(h).sqrt()
        L = self.g(tau, y)
        K = y + hc * k1
        y1 = K + self.g.times(L, dW)
        Ed = hc * (rhs(tau + h, K) - k1) / 2
        nfe = 2
        if self.g.mode == "matrix":
            En = torch.zeros_like(y)  # additive: g' = 0
        else:
            ggp = (self.g(tau, K + L * sq) - L) / sq
            En = ggp * (dW.square() - hc) / 2
            nfe += 1
        return SDEStep(y1, self.delta * Ed + En, k1[:, None], (), nfe)


class EulerHeun(SDEMethod):
    """StochasticDiffEq.jl's EulerHeun (perform_step/low_order.jl): Heun on drift and noise
    (Stratonovich)."""

    adaptive = False

    def step(self, rhs, tau, y, h, k1, noise=None):
        dW, _ = self.increments(tau, h, noise)
        hc = h[:, None]
        g0 = self.g(tau, y)
        yt = y + hc * k1 + self.g.times(g0, dW)
        y1 = y + hc / 2 * (k1 + rhs(tau + h, yt)) + self.g.times((g0 + self.g(tau + h, yt)) / 2, dW)
        return SDEStep(y1, None, k1[:, None], (), 3)


class RKMil(SDEMethod):
    """StochasticDiffEq.jl's RKMil (perform_step/low_order.jl, RKMilConstantCache), diagonal/scalar
    noise. Itô: ỹ = K + g√h, correction g g'(ΔW² − h)/2; Stratonovich: ỹ = y + g√h, g g' ΔW²/2.
    Error estimate as upstream's in-place caches (RKMilCache, RKMil_GeneralCache): Ed = h (f(t+h, K) − f)/2,
    En = ΔW³ (g g')²/6. (Its out-of-place RKMilConstantCache puts (f(t+h, K) − g)/√h, a drift minus a
    diffusion, in place of g g': O(h^-1/2), so that En shrinks like h^1/2 and steps stalled near 1e-7.)"""

    order = 1.0

    def __init__(self, g, bm, t_end, stratonovich: bool):
        super().__init__(g, bm, t_end)
        self.stratonovich = stratonovich

    def step(self, rhs, tau, y, h, k1, noise=None):
        dW, _ = self.increments(tau, h, noise)
        hc = h[:, None]
        sq = self.safe_h(h).sqrt()
        K = y + hc * k1
        L = self.g(tau, y)
        if self.stratonovich:
            ggp = (self.g(tau, y + L * sq) - L) / sq
            corr = ggp * dW.square() / 2
        else:
            ggp = (self.g(tau, K + L * sq) - L) / sq
            corr = ggp * (dW.square() - hc) / 2
        y1 = K + L * dW + corr
        du2 = rhs(tau + h, K)
        Ed = hc * (du2 - k1) / 2
        En = dW.pow(3) * ggp.square() / 6
        return SDEStep(y1, Ed + En, k1[:, None], (), 3)


class SRI(SDEMethod):
    """Rößler's SRI family for diagonal/scalar Itô noise (StochasticDiffEq.jl perform_step/sri.jl,
    SRIConstantCache); one routine for every tableau. ΔZ = 2√3·H gives I_(1,0)/h = ΔW/2 + H."""

    needs_area = True

    def __init__(self, tab, g, bm, t_end):
        super().__init__(g, bm, t_end)
        self.tableau_data = tab
        self.order = tab.order
        self.delta = tab.delta
        s = len(tab.alpha)
        col_used = lambda M, j: any(M[i][j] != 0 for i in range(j + 1, s))  # noqa: E731
        # A stage whose value nothing reads is not evaluated (SRIW1's 4th drift stage).
        self.need_f = [tab.alpha[i] != 0 or i < tab.error_terms or col_used(tab.A0, i) or col_used(tab.A1, i)
                       for i in range(s)]
        self.need_g = [any(b[i] != 0 for b in (tab.beta1, tab.beta2, tab.beta3, tab.beta4))
                       or col_used(tab.B0, i) or col_used(tab.B1, i) for i in range(s)]
        # A stage at y and time t repeats stage 1 (SRIW1's third drift stage): reuse it.
        zero_row = lambda M, i: all(v == 0 for v in M[i])  # noqa: E731
        self.same_f = [i > 0 and zero_row(tab.A0, i) and zero_row(tab.B0, i) and tab.c0[i] == tab.c0[0]
                       for i in range(s)]
        self.same_g = [i > 0 and zero_row(tab.A1, i) and zero_row(tab.B1, i) and tab.c1[i] == tab.c1[0]
                       for i in range(s)]

    def step(self, rhs, tau, y, h, k1, noise=None):
        tab = self.tableau_data
        dW, H = self.increments(tau, h, noise)
        hc = h[:, None]
        hs = self.safe_h(h)
        sq = hs.sqrt()
        chi1 = (dW.square() - hc) / (2 * sq)     # I_(1,1)/√h
        chi2 = dW / 2 + H                        # I_(1,0)/h = (ΔW + ΔZ/√3)/2
        chi3 = (dW.pow(3) - 3 * dW * hc) / (6 * hs)  # I_(1,1,1)/h
        F, G = [], []
        nfe = 0
        for i in range(len(tab.alpha)):
            fi = gi = None
            if self.need_f[i]:
                if i == 0 or self.same_f[i]:
                    fi = k1
                else:
                    H0 = _axpy(_axpy(y, hc, _comb(tab.A0[i], F)), chi2, _comb(tab.B0[i], G))
                    fi = rhs(torch.add(tau, h, alpha=tab.c0[i]), H0)
                    nfe += 1
            if self.need_g[i]:
                if self.same_g[i] and G[0] is not None:
                    gi = G[0]
                else:
                    H1 = _axpy(_axpy(y, hc, _comb(tab.A1[i], F)), sq, _comb(tab.B1[i], G)) if i > 0 else y
                    gi = self.g(torch.add(tau, h, alpha=tab.c1[i]), H1)
                    nfe += 1
            F.append(fi)
            G.append(gi)
        E2 = _comb(tab.beta3, G, chi2) + _comb(tab.beta4, G, chi3)
        y1 = y + hc * _comb(tab.alpha, F) + _comb(tab.beta1, G, dW) + _comb(tab.beta2, G, chi1) + E2
        E1 = hc * _comb([1.0] * tab.error_terms, F)
        return SDEStep(y1, self.delta * E1 + E2, k1[:, None], (), nfe)


class SRA(SDEMethod):
    """Rößler's SRA family for additive noise (StochasticDiffEq.jl perform_step/sra.jl, SRAConstantCache)."""

    needs_area = True

    def __init__(self, tab, g, bm, t_end):
        super().__init__(g, bm, t_end)
        self.tableau_data = tab
        self.order = tab.order
        self.delta = tab.delta

    def step(self, rhs, tau, y, h, k1, noise=None):
        tab = self.tableau_data
        dW, H = self.increments(tau, h, noise)
        hc = h[:, None]
        chi2 = dW / 2 + H
        F, G = [], []
        for i in range(len(tab.alpha)):
            if i == 0:
                H0 = y
            else:
                H0 = y + hc * _comb(tab.A0[i], F)
                gsum = _comb(tab.B0[i], G)
                if isinstance(gsum, torch.Tensor):
                    H0 = H0 + self.g.times(gsum, chi2)
            F.append(k1 if i == 0 else rhs(tau + tab.c0[i] * h, H0))
            G.append(self.g(tau + tab.c1[i] * h, H0))
        E2 = self.g.times(_comb(tab.beta2, G), chi2)
        y1 = y + hc * _comb(tab.alpha, F) + self.g.times(_comb(tab.beta1, G), dW) + E2
        E1 = hc * _comb([1.0] * len(F), F)
        s = len(tab.alpha)
        return SDEStep(y1, self.delta * E1 + E2, k1[:, None], (), 2 * s - 1)


class ReversibleHeun(SDEMethod):
    """Kidger, Foster, Li & Lyons (2021), "Efficient and accurate gradients for neural SDEs", §3.
    The loop's state is z = [y, ŷ] and its right-hand side is z ↦ [f(ŷ), g(ŷ)] (AugmentedRHS),
    so k1 carries (μ̂_n, σ̂_n) and the step's end derivative is (μ̂_{n+1}, σ̂_{n+1}):
        ŷ_{n+1} = 2y_n − ŷ_n + μ̂_n h + σ̂_n ΔW,  (μ̂, σ̂)_{n+1} = (f, g)(t_{n+1}, ŷ_{n+1}),
        y_{n+1} = y_n + (μ̂_n + μ̂_{n+1}) h/2 + (σ̂_n + σ̂_{n+1}) ΔW/2.
    One drift and one diffusion evaluation per step; Stratonovich, strong order 0.5 (1 for
    additive noise)."""

    adaptive = False

    def __init__(self, g, bm, t_end, n):
        super().__init__(g, bm, t_end)
        self.n = n

    def split_k(self, k):
        mu, sig = k[:, :self.n], k[:, self.n:]
        return mu, (sig.reshape(sig.shape[0], self.n, self.m) if self.g.mode == "matrix" else sig)

    def step(self, rhs, tau, z, h, k1, noise=None):
        dW, _ = self.increments(tau, h, noise)
        hc = h[:, None]
        y, yh = z[:, :self.n], z[:, self.n:]
        mu, sig = self.split_k(k1)
        yh1 = 2 * y - yh + hc * mu + self.g.times(sig, dW)
        # h = 0 (a stopped sample, for the graph's sake: loop.py) must leave the state as it is: ŷ,
        # not 2y − ŷ, whose drift may overflow and turn the discarded step's gradient NaN.
        yh1 = torch.where(hc == 0, yh, yh1)
        k_end = rhs(tau + h, torch.cat([y, yh1], 1))
        mu1, sig1 = self.split_k(k_end)
        y1 = y + hc * (mu + mu1) / 2 + self.g.times((sig + sig1) / 2, dW)
        return SDEStep(torch.cat([y1, yh1], 1), None, k1[:, None, :self.n], (), 2, f_end=k_end)


class AugmentedRHS:
    """[y, ŷ] ↦ [f(t, ŷ), g(t, ŷ) flattened]: the reversible Heun state's right-hand side."""

    def __init__(self, drift, diffusion, n):
        self.drift, self.diffusion, self.n = drift, diffusion, n

    def __call__(self, tau, z):
        yh = z[:, self.n:]
        return torch.cat([self.drift(tau, yh), self.diffusion(tau, yh).reshape(z.shape[0], -1)], 1)


def _axpy(y, a, x):
    """y + a·x in one fused op (torch.addcmul), or y when x is the empty sum 0."""
    return y if isinstance(x, float) else torch.addcmul(y, a, x)


def _comb(coeffs, vals, mult=None):
    """Σ_i c_i v_i over the nonzero coefficients, times mult (elementwise) when given; 0 if none.
    Each term is one fused multiply-add (torch.add's alpha): these steps are launch-bound."""
    acc = None
    for c, v in zip(coeffs, vals):
        if c == 0:
            continue
        if acc is None:
            acc = v if c == 1 else c * v
        else:
            acc = torch.add(acc, v, alpha=c)
    if acc is None:
        return 0.0
    return acc if mult is None else acc * mult


def build_sde_method(solver, g: Diffusion, bm, t_end, interpretation):
    name = solver.name
    if name == "EM":
        return EM(g, bm, t_end)
    if name == "LambaEM":
        return LambaEM(g, bm, t_end)
    if name == "EulerHeun":
        return EulerHeun(g, bm, t_end)
    if name == "RKMil":
        return RKMil(g, bm, t_end, stratonovich=interpretation == "stratonovich")
    if name in SRI_TABLEAUS:
        return SRI(SRI_TABLEAUS[name], g, bm, t_end)
    if name in SRA_TABLEAUS:
        return SRA(SRA_TABLEAUS[name], g, bm, t_end)
    if name == "ReversibleHeun":
        return ReversibleHeun(g, bm, t_end, g.n)
    raise ValueError(f"solver {name}() has no torch-engine SDE implementation")


def check_sde_solver(prob, solver):
    """Method/problem compatibility, with errors that name the argument at fault."""
    if prob.noise not in solver.noise:
        raise ValueError(f"{solver!r} does not support noise={prob.noise!r} (supported: {solver.noise}); "
                         "choose another solver or noise type")
    # For additive noise the Itô and Stratonovich calculi coincide.
    if prob.interpretation not in solver.interpretations and prob.noise != "additive":
        raise ValueError(f"{solver!r} solves {' or '.join(solver.interpretations)} SDEs, but the problem has "
                         f"interpretation={prob.interpretation!r}; use SDEProblem(..., interpretation="
                         f"{solver.interpretations[0]!r}) with a drift for that calculus, or another solver")


def make_brownian(prob, m, brownian, seed, dtype, device):
    """The user's Brownian path (checked), or a VirtualBrownianTree over each sample's span."""
    B = prob.batch_size
    t_rows = prob.t.expand(B, -1) if prob.t.dim() == 1 else prob.t
    if brownian is None:
        # Always with Lévy area, so one seed gives the same path whatever the method.
        return VirtualBrownianTree(t_rows[:, 0], t_rows[:, -1], shape=(B, m), seed=0 if seed is None else int(seed),
                                   levy_area=True, dtype=dtype, device=device)
    if not callable(brownian):
        raise TypeError(f"brownian must be a pb.VirtualBrownianTree (or callable bm(s, t)); got {type(brownian).__name__}")
    shape = tuple(getattr(brownian, "shape", ()))
    expected = [(B, m)] + ([(m,)] if B == 1 else [])
    if shape and shape not in expected:
        raise ValueError(f"brownian has shape {shape}; this problem needs {(B, m)} (batch, Brownian dimensions)")
    # A float32 path under a float64 problem would cap the solve at float32 accuracy unnoticed.
    tree_dtype = getattr(brownian, "dtype", dtype)
    if tree_dtype != dtype:
        raise ValueError(f"brownian has dtype {tree_dtype}; this problem's y0 is {dtype}: create the tree with "
                         f"dtype={dtype}")
    tree_device = getattr(brownian, "device", None)
    if tree_device is not None and torch.device(tree_device).type != torch.device(device).type:
        raise ValueError(f"brownian is on {tree_device}; this problem's y0 is on {device}: create the tree with "
                         f"device={device}")
    return brownian


def sde_initial_step(drift, g: Diffusion, tau, y0, atol, rtol, order, norm: Norm, dtmax, lockstep):
    """StochasticDiffEq.jl's sde_determine_initdt (src/initdt.jl): Hairer–Wanner with the diffusion
    folded in (|f ± 3g|) and the exponent 1/(order + 1/2). Two deliberate departures: f₁, g₁ are taken
    at (t + dt₀, u₁) (upstream's array branch re-evaluates at (t, u0)), and d₂ uses the change of g,
    |3(g₁ − g₀)|, where upstream adds |g₀| + |g₁| — which is not a derivative, makes d₂ ~ |g|/dt₀ and
    gives first steps of ~1e-7 (below float32's step floor; qmax = 9/8 then needs ~100 steps to recover)."""
    with torch.no_grad():
        mag = (lambda G: G.norm(dim=-1)) if g.mode == "matrix" else (lambda G: G)  # noqa: E731
        sk = atol + y0.abs() * rtol
        f0 = drift(tau, y0)
        g0 = 3 * mag(g(tau, y0))
        d0 = norm(y0 / sk)
        d1 = norm(torch.maximum((f0 + g0).abs(), (f0 - g0).abs()) / sk)
        small = (d0 < 1e-5) | (d1 < 1e-5)
        dt0 = torch.where(small, torch.full_like(d0, 1e-6), 0.01 * d0 / torch.where(small, torch.ones_like(d1), d1))
        floor = step_floor(tau)
        dt0 = torch.minimum(torch.maximum(dt0, floor), dtmax)
        u1 = y0 + dt0[:, None] * f0
        f1 = drift(tau + dt0, u1)
        dg = 3 * mag(g(tau + dt0, u1)) - g0
        d2 = norm(torch.maximum((f1 - f0 + dg).abs(), (f1 - f0 - dg).abs()) / sk) / dt0
        dmax = torch.maximum(d1, d2)
        tiny = dmax <= 1e-15
        dt1 = torch.where(tiny, torch.clamp(dt0 * 1e-3, min=1e-6),
                          (0.01 / torch.where(tiny, torch.ones_like(dmax), dmax)).pow(1.0 / (order + 0.5)))
        dt = torch.minimum(torch.minimum(100 * dt0, dt1), dtmax)
        dt = torch.where(torch.isfinite(dt), dt, torch.full_like(dt, 1e-6))
        dt = torch.minimum(torch.maximum(dt, floor), dtmax)
        return dt.min().expand_as(dt) if lockstep else dt


def solve_sde(prob, solver, *, rtol, atol, dt, adaptive, dtmin, dtmax, max_steps, dense, lockstep,
              differentiable_dt, brownian=None, seed=None, local_regularizer=None, keep_state=False,
              compile=False):
    check_sde_solver(prob, solver)
    y0 = prob.y0
    B = prob.batch_size
    n = y0.numel() // B
    t = prob.t
    t_rows = t.expand(B, -1) if t.dim() == 1 else t
    direction = torch.ones(B, dtype=y0.dtype, device=y0.device)
    tau_save = t_rows
    scalar_time = lockstep or not prob.batched
    drift = RightHandSide(prob.f, prob, direction, scalar_time)
    g = Diffusion(prob.g, prob, scalar_time)
    g.probe(t_rows[:, 0])
    if brownian is not None and seed is not None and local_regularizer is None:
        raise ValueError("seed picks the Brownian path, but brownian= already fixes it: pass one of the two "
                         "(with local_regularizer=..., seed draws the regularizer's times and may go with brownian=)")
    bm = make_brownian(prob, g.m, brownian, seed, y0.dtype, y0.device)
    if solver.name in ("SRIW1", "SOSRI", "SRA1") and not getattr(bm, "levy_area", True):
        raise ValueError(f"{solver!r} needs the space-time Lévy area: pass "
                         "pb.VirtualBrownianTree(..., levy_area=True) as brownian")
    method = build_sde_method(solver, g, bm, t_rows[:, -1], prob.interpretation)
    if adaptive and not method.adaptive:
        raise ValueError(f"{solver!r} has no error estimate, so it cannot step adaptively: pass adaptive=False with dt=...")
    if not adaptive and not differentiable_dt:  # (the look-ahead's times would not carry dt's graph)
        method.look_ahead()
    reversible = isinstance(method, ReversibleHeun)
    if reversible and dense:
        raise ValueError("dense=True is not available with ReversibleHeun (its state carries ŷ); save at t instead")
    # SOLVERS.md: SDE methods use p = strong order and qmax = 9/8.
    controller = PIController.for_order(method.order, qmax=9 / 8)
    opts = LoopOptions(adaptive=adaptive, dt=dt, dtmin=dtmin, dtmax=dtmax, max_steps=max_steps, lockstep=lockstep,
                       dense=dense, differentiable_dt=differentiable_dt, controller=controller, stop_at_saves=True,
                       compile=compile)
    if local_regularizer is not None:
        time_kind, detach_k1 = parse_local_regularizer(local_regularizer)
        opts.probe = _probe(time_kind, seed, tau_save, lockstep)
    atol_c, rtol_c = _per_component(atol, prob), _per_component(rtol, prob)
    y0_flat = y0.reshape(B, n)
    if adaptive and dt is None:
        span = tau_save[:, -1] - tau_save[:, 0]
        dtmax_t = span if dtmax is None else torch.clamp(span, max=dtmax)
        opts.dt = sde_initial_step(drift, g, tau_save[:, 0], y0_flat, atol_c, rtol_c, method.order, Norm(lockstep),
                                   dtmax_t, lockstep)
    rhs = drift
    if reversible:
        rhs = AugmentedRHS(drift, g, n)
        y0_flat = torch.cat([y0_flat, y0_flat], 1)
    res = integrate(rhs, method, tau_save, y0_flat, atol_c, rtol_c, opts)
    final_state = res.y_end   # (a failed sample's last finite state; its later saves are NaN)
    if reversible:
        res.ys = res.ys[..., :n]
    sol = _to_solution(res, prob, solver, method, direction)
    if local_regularizer is not None:
        attach_local_regularizer(sol, res, rhs, method, atol_c, rtol_c, lockstep, tau_save, direction, detach_k1)
    sol.extras["brownian"] = bm
    if keep_state:
        sol.extras["_sde_internals"] = dict(drift=drift, diffusion=g, method=method, final_state=final_state,
                                            trace=res.trace, tau_save=tau_save, n=n, status=res.status)
    return sol
