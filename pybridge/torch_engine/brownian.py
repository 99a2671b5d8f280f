"""Virtual Brownian tree: a stateless, O(1)-memory Brownian path for adaptive SDE solvers.

Design follows diffrax's ``VirtualBrownianTree`` (Li et al. 2020; Jelinčič, Foster & Kidger 2024;
Foster 2020, Thm 6.1.4/6.1.6): each sample's span ``[t0, t1]`` is rescaled to ``[0, 1]`` and
bisected to a fixed depth ``D``; the value of the path at a dyadic midpoint is drawn from the
Brownian bridge (jointly with the space-time Lévy area if requested) conditioned on the parent
interval, and a query point inside a leaf interval is filled in by one more exact conditional
draw. Every normal is a pure function of ``(seed, sample, dimension, tree node)`` through a
counter-based hash, so the path exists "virtually": any query order, any batch of per-sample
times, no stored state.

Conventions (normalised time r = (t - t0_b) / (t1_b - t0_b) of sample b):

* ``W_{s,t} = W_t - W_s``.
* Space-time Lévy area (diffrax ``SpaceTimeLevyArea``)::

      H_{s,t} = 1/h * ∫_s^t (W_u - W_s - (u-s)/h * W_{s,t}) du,     h = t - s,

  i.e. the mean deviation of the path from its chord; ``H ~ N(0, h/12)`` independent of
  ``W_{s,t}``. The iterated integral used by Rößler's SRI methods / Kloeden–Platen's ΔZ is
  ``I_(1,0) = ∫_s^t (W_u - W_s) du = h * (W_{s,t} / 2 + H_{s,t})`` (variance h³/3,
  covariance h²/2 with ``W_{s,t}``), and ``I_(0,1) = h*W_{s,t} - I_(1,0)``.
  StochasticDiffEq.jl's SRI/SRA steps write ``I_(1,0)/h = (ΔW + ΔZ/√3)/2`` with ``ΔZ ~ N(0, h)``
  independent of ΔW, so their ``ΔZ = 2√3·H``.
* Internally we carry ``bhh_{s,t} = h * H_{s,t}`` ("bar H"), which obeys Chen's relation
  ``bhh_{x,z} = bhh_{x,y} + bhh_{y,z} + ½((z-y) W_{x,y} - (y-x) W_{y,z})``.
* Reverse queries ``s > t`` return ``(-W_{t,s}, H_{t,s})``: the chord deviation does not depend
  on the direction the interval is traversed, so H is unchanged (the formula above with h < 0
  gives the same value), and ``I_(1,0) = h (ΔW/2 + H)`` stays valid with h < 0.
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = ["VirtualBrownianTree"]

Time = Union[float, torch.Tensor]

# ---------------------------------------------------------------------------------------------
# Counter-based RNG on int64 tensors. torch integer multiply wraps modulo 2^64 (two's
# complement), so splitmix64 can be written with signed int64 if right shifts are made logical
# by masking off the sign-extended bits.
# ---------------------------------------------------------------------------------------------


def _s64(c: int) -> int:
    """uint64 literal -> the int64 with the same bits (torch has no uint64 arithmetic)."""
    c &= (1 << 64) - 1
    return c - (1 << 64) if c >= (1 << 63) else c


_GOLDEN = _s64(0x9E3779B97F4A7C15)
_M1 = _s64(0xBF58476D1CE4E5B9)
_M2 = _s64(0x94D049BB133111EB)
_DIM_MUL = _s64(0xD1B54A32D192ED03)
_NODE_SALT = _s64(0x5851F42D4C957F2D)
_CHUNK = 1 << 14  # elements per level chunk of a query: small enough to stay in cache
# Up to this many (endpoint, sample, dimension) entries per level a query descends all levels at
# once (_levels: launch-bound sizes, ~2-3x faster); above it the per-level loop is as fast or
# faster (compute-bound, smaller temporaries). Both give bit-identical float64 values.
_VECTORISE_MAX = 512
_MAX_DEPTH = 52  # below 2^-52 float64 normalised times cannot be told apart


def _srl(z: torch.Tensor, k: int) -> torch.Tensor:
    return (z >> k) & ((1 << (64 - k)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser: a bijection of 64-bit words with full avalanche."""
    z = (z ^ _srl(z, 30)) * _M1
    z = (z ^ _srl(z, 27)) * _M2
    return z ^ _srl(z, 31)


def _mix_py(z: int) -> int:
    """Reference splitmix64 finaliser on Python ints (exact uint64 arithmetic)."""
    m = (1 << 64) - 1
    z &= m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def _normals(h: torch.Tensor, dtype: torch.dtype, two: bool):
    """Box–Muller on the two 32-bit halves of each hash word.

    u1 ∈ (0, 1] so log never sees 0; the 2^-32 granularity truncates |z| at ≈ 6.66.
    """
    hi = _srl(h, 32).to(dtype)
    lo = (h & 0xFFFFFFFF).to(dtype)
    rad = torch.sqrt(-2.0 * torch.log((hi + 1.0) * 2.0**-32))
    th = lo * (2.0 * math.pi * 2.0**-32)
    z1 = rad * torch.cos(th)
    return (z1, rad * torch.sin(th)) if two else (z1, None)


@functools.lru_cache(maxsize=64)
def _query_constants(D: int, dtype: torch.dtype, device: torch.device):
    """Per-level constants of a depth-D query, shared by every tree of that depth, dtype and device
    (building them costs ~0.3 ms, a noticeable part of a short fixed-step solve)."""
    f64 = dict(dtype=torch.float64, device=device)
    ks = torch.arange(D + 1, device=device)
    # Level columns with a leading root column (level "-1": node 0), so one hash covers the
    # root, every level and the leaf.
    pow2 = torch.cat([torch.zeros(1, **f64), torch.exp2(ks.double())])  # (D+2,)
    heap = torch.cat([torch.zeros(1, dtype=torch.int64, device=device), 1 << ks])
    is_a = torch.tensor([True, False], device=device)[:, None]  # (2, 1)
    half_sig = torch.tensor([-0.5, 0.5], dtype=dtype, device=device)[:, None, None]
    su = [2.0**-k for k in range(D)]  # same Python-float expressions as stepwise descent
    lv = lambda v: torch.tensor(v, **f64)  # noqa: E731
    lvl = dict(cz=lv([math.sqrt(x) / 4.0 for x in su]), cn=lv([math.sqrt(x / 12.0) for x in su]),
               q4=lv([x / 4.0 for x in su]), c15=lv([1.5 / x for x in su]),
               ch=lv([math.sqrt(x) / 2.0 for x in su]), hs=lv([0.5 * x for x in su]))
    # scan scalings by level relative to a chunk's first level k0: j = k − k0 = 0, 1, ...
    j = [float(i + 1) for i in range(D)]
    rel = dict(p8=lv([8.0**x for x in j]), m8=lv([-(8.0**x) for x in j]), i8=lv([8.0**-x for x in j]),
               p2=lv([2.0**x for x in j]), i2=lv([2.0**-x for x in j]))
    return pow2, heap, is_a, half_sig, lvl, rel


# ---------------------------------------------------------------------------------------------


class VirtualBrownianTree:
    """Brownian motion on ``[t0, t1]`` (per sample), queried as increments ``bm(s, t)``.

    Args:
        t0, t1: span start/end, floats or tensors of shape ``(B,)`` (per-sample spans).
        shape: ``(B, m)`` (B independent samples of m-dimensional noise) or ``(m,)``.
        seed: Python int; the whole path is a deterministic function of it.
        tol: resolution of the bisection (absolute time). Depth is
            ``ceil(log2(max_b (t1_b - t0_b) / tol))``; default depth 20, i.e.
            ``tol = (t1 - t0) / 2^20``.
            Each point value is exact in distribution, and so is every increment whose endpoints
            lie in different leaves (intervals longer than a leaf always do). Two points inside
            one leaf share its conditional draw (as in diffrax), so an increment over an interval
            inside a leaf is badly distributed (variance ~h²/leaf instead of h): choose
            ``tol`` below the smallest step the solver can take (``dtmin``).
        levy_area: also generate the space-time Lévy area H (see module docstring). Changes
            the path for the same seed (the bridge construction differs), as in diffrax.
        dtype: output and arithmetic dtype (float32 or float64); times are always handled in
            float64.
        device: defaults to the device of ``t0``/``t1`` if tensors, else CPU.
        compile: wrap the (fixed-shape, fixed-depth) query in ``torch.compile``. Eager queries
            are launch-bound for small batches (up to 2·B·m = 512 all levels are descended at once, ~100
            kernels a query; above that ~30 small kernels per tree level); compiled they fuse into a few
            kernels (H100, B·m = 32k: 5 ms -> 0.3 ms for W, 9 ms -> 0.6 ms with Lévy area) at
            a one-off compile cost of ~0.5-2 min. Worth it for long adaptive CUDA solves.

    Cost notes: a query whose points all lie on a dyadic grid j·2^-k stops descending at level k
    (exact up to rounding, eager CPU queries; fixed steps of 2^-k need k levels, not 20), and
    ``intervals`` answers K queries in one call, descending the shared points of consecutive
    intervals once (fixed-step solves use it to look ahead, sde.StepAhead).
    """

    def __init__(
        self,
        t0: Time,
        t1: Time,
        shape: Sequence[int],
        seed: int = 0,
        tol: Optional[Time] = None,
        levy_area: bool = False,
        dtype: torch.dtype = torch.float64,
        device: Optional[Union[str, torch.device]] = None,
        compile: bool = False,
    ):
        shape = tuple(int(x) for x in shape)
        if len(shape) == 1:
            self._batched, B, m = False, 1, shape[0]
        elif len(shape) == 2:
            self._batched, (B, m) = True, shape
        else:
            raise ValueError(f"shape must be (m,) or (B, m), got {shape}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError("dtype must be torch.float32 or torch.float64")
        if device is None:
            device = next((x.device for x in (t0, t1) if torch.is_tensor(x)), torch.device("cpu"))
        self.shape, self.B, self.m = shape, B, m
        self.dtype, self.device = dtype, torch.device(device)
        self.levy_area = bool(levy_area)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be an integer; got {seed!r}")
        self.seed = int(seed)
        # Times reach the core as (B,) float64 tensors, so a compiled core never recompiles.
        self._compiled = bool(compile)
        self._core_fn = torch.compile(self._core, dynamic=False) if compile else self._core

        f64 = dict(dtype=torch.float64, device=self.device)
        try:
            self.t0 = torch.as_tensor(t0, **f64).expand(B).contiguous()
            self.t1 = torch.as_tensor(t1, **f64).expand(B).contiguous()
        except RuntimeError:
            raise ValueError(f"t0 and t1 must be numbers or have one entry per sample ({B}); got shapes "
                             f"{tuple(torch.as_tensor(t0).shape)} and {tuple(torch.as_tensor(t1).shape)}") from None
        self._len = self.t1 - self.t0
        # One span for every sample: a query on one grid for all samples need normalise one column.
        self._uniform_span = all(not torch.is_tensor(x) or x.numel() == 1 for x in (t0, t1))
        min_len = self._len.min().item()  # one host sync, at construction only
        if not min_len > 0:
            raise ValueError("need t1 > t0 for every sample")
        self._sqrt_len = self._len.sqrt().to(dtype)[None, :]  # (1, B)
        if tol is None:
            self.depth = 20
        else:
            ratio = (self._len / torch.as_tensor(tol, **f64)).max().item()
            if not (ratio > 0 and math.isfinite(ratio)):
                raise ValueError(f"tol must be positive and finite; got {tol!r}")
            self.depth = max(0, min(_MAX_DEPTH, math.ceil(math.log2(ratio) - 1e-12)))
        self.tol = self._len * 2.0**-self.depth  # effective per-sample resolution

        (self._pow2, self._heap, self._is_a, self._half_sig, self._lvl, self._rel) = \
            _query_constants(self.depth, dtype, self.device)

        # Per-(sample, dim) stream keys; each step is a bijection so distinct (b, j) never collide
        # for a fixed seed.
        kseed = _s64(_mix_py(_mix_py(self.seed) + 0x9E3779B97F4A7C15))
        b_idx = torch.arange(B, device=self.device, dtype=torch.int64)
        j_idx = torch.arange(m, device=self.device, dtype=torch.int64)
        kb = _mix(b_idx * _GOLDEN + kseed)
        # Stored (m, B): the core keeps samples on the last (contiguous) axis, so that per-sample
        # coefficients broadcast over an outer axis (vectorised) rather than over an inner axis
        # of length m (elementwise ops ~6x slower for m = 2).
        self._base = _mix(kb[None, :] + (j_idx * _DIM_MUL)[:, None])  # (m, B)

    # -- public API ---------------------------------------------------------------------------

    def __call__(self, s: Time, t: Time) -> torch.Tensor:
        """W(t) - W(s), shape ``self.shape``."""
        return self._query(s, t, area=False)[0]

    def increment_and_area(self, s: Time, t: Time) -> Tuple[torch.Tensor, torch.Tensor]:
        """(W_{s,t}, H_{s,t}); H is the space-time Lévy area, H ~ N(0, |t-s|/12) ⊥ W_{s,t}."""
        if not self.levy_area:
            raise ValueError("construct with levy_area=True to get the space-time Lévy area")
        return self._query(s, t, area=True)

    def evaluate(self, t: Time) -> torch.Tensor:
        """W(t) - W(t0)."""
        return self(self.t0, t)

    def intervals(self, s: torch.Tensor, t: torch.Tensor, area: bool = False):
        """K queries in one: ``(W_{s_k,t_k}, H_{s_k,t_k} or None)``, each of shape ``(K, *shape)``.

        ``s``, ``t``: shape ``(K, B)`` (per-sample times) or ``(K,)``. Same arithmetic as K calls of
        ``bm(s_k, t_k)`` / ``increment_and_area`` (bit-identical in float64 on CPU), at a fraction of
        the cost for small batches, whose single queries are bound by kernel launches. Always eager
        (a compiled core would recompile for every K)."""
        if area and not self.levy_area:
            raise ValueError("construct with levy_area=True to get the space-time Lévy area")
        rs, rt = self._normalise(s, many=True), self._normalise(t, many=True)
        K = rs.shape[0]
        # Consecutive forward intervals (a fixed-step grid) share endpoints: descend each point once.
        chain = K > 1 and torch.equal(rt[:-1], rs[1:]) and bool((rs <= rt).all())
        W, H = self._core(rs.reshape(-1), rt.reshape(-1), area, *self._rows(K), chain=self.B if chain else 0)
        unflat = lambda x: None if x is None else x.reshape(K, *self.shape)  # noqa: E731
        return unflat(W), unflat(H)

    # -- internals ----------------------------------------------------------------------------
    def grid_intervals(self, s: torch.Tensor, t: torch.Tensor, area: bool = False):
        """``intervals`` for a fixed-step grid, equal to it up to rounding: when the K intervals are
        consecutive cells of one dyadic level of the tree (normalised [j 2^-k, (j+1) 2^-k], the same
        for every sample — fixed steps of span/2^k), their values are the tree's own node values,
        built breadth-first (``_dyadic_cells``: each node drawn once, ~2K + 2k node splits for all
        K cells instead of K descents of k levels). Other grids go to ``intervals``."""
        if area and not self.levy_area:
            raise ValueError("construct with levy_area=True to get the space-time Lévy area")
        cells = self._as_dyadic_cells(s, t)
        if cells is None:
            return self.intervals(s, t, area)
        W, H = self._dyadic_cells(*cells, area)
        unflat = lambda x: None if x is None else x.reshape(x.shape[0], *self.shape)  # noqa: E731
        return unflat(W), unflat(H)

    def _as_dyadic_cells(self, s, t):
        """(level k, first cell j0, count K) if [s_i, t_i] are the consecutive level-k cells j0 … j0+K−1
        for every sample; else None. CPU only (reads the times on the host)."""
        if self.device.type != "cpu":
            return None
        cs, ct = (self._shared_column(x) for x in (s, t))
        if cs is not None and ct is not None:
            rs, rt = self._normalise(cs, many=True, one_column=True), self._normalise(ct, many=True, one_column=True)
        else:
            rs, rt = self._normalise(s, many=True), self._normalise(t, many=True)
            if not (torch.equal(rs, rs[:, :1].expand_as(rs)) and torch.equal(rt, rt[:, :1].expand_as(rt))):
                return None  # per-sample grids differ
        rs, rt = rs[:, 0].numpy(), rt[:, 0].numpy()  # the rest on the host: a few small checks
        ends = np.append(rs, rt[-1]) * 2.0**self.depth  # exact: power-of-two scaling
        if not (ends == np.floor(ends)).all() or not np.array_equal(rt[:-1], rs[1:]):
            return None
        v = ends.astype(np.int64)
        width = np.diff(v)
        cell = int(width[0])
        if cell <= 0 or cell & (cell - 1) or not (width == cell).all() or int(v[0]) % cell:
            return None  # not one power-of-two cell width, or not aligned to it
        k = self.depth - (cell.bit_length() - 1)
        return k, int(v[0]) // cell, width.size

    def _shared_column(self, x):
        """Times (K,) or (K, B) as one (K, 1) column when every sample has the same span and the
        same times (a fixed-step grid): normalising one column instead of B is most of the check's
        cost. None otherwise (or for a shape _normalise will reject)."""
        if not self._uniform_span or not torch.is_tensor(x) or x.dim() not in (1, 2):
            return None
        x = x.to(torch.float64)
        if x.dim() == 1:
            return x[:, None]
        if x.shape[1] in (1, self.B) and (x.stride(1) == 0 or torch.equal(x, x[:, :1].expand_as(x))):
            return x[:, :1]
        return None

    def _dyadic_cells(self, k: int, j0: int, K: int, area: bool):
        """(W, H or None) over the level-k cells j0 … j0+K−1, each (K, B, m). From the root, each level
        splits only the ancestors of those cells (a contiguous run of nodes), with the same draws
        and the same arithmetic as one step of ``_core_stepwise``'s descent (Foster Thm 6.1.6)."""
        levy, dt = self.levy_area, self.dtype
        # The run of nodes split at level l: the level-l ancestors of the target cells. All their
        # normals (and the root's, node 0) come from one hash over the concatenated node ids.
        runs = [(j0 >> (k - l), (j0 + K - 1) >> (k - l)) for l in range(k)]
        ids = torch.cat([torch.zeros(1, dtype=torch.int64, device=self.device)]
                        + [(1 << l) + torch.arange(lo, hi + 1, device=self.device) for l, (lo, hi) in enumerate(runs)])
        Z1, Z2 = _normals(_mix(self._base[..., None] ^ _mix(ids * _GOLDEN + _NODE_SALT)), dt, levy)  # (m, B, ids)
        w = Z1[..., :1]  # W over each node of the current run, (m, B, width)
        hh = Z2[..., :1] / math.sqrt(12.0) if levy else None  # bhh over it
        at = 1  # where the current run's normals start in Z1, Z2
        for l, (lo, hi) in enumerate(runs):
            su = 2.0**-l
            z1 = Z1[..., at:at + hi - lo + 1]
            if levy:
                z = z1 * (math.sqrt(su) / 4.0)
                q = Z2[..., at:at + hi - lo + 1] * ((su / 4.0) * math.sqrt(su / 12.0))
                t2 = (1.5 / su) * hh + z
                b1 = hh / 8.0 - (su / 4.0) * z
                hh = torch.stack([b1 + q, b1 - q], -1).flatten(-2)  # children: left, right
            else:
                t2 = (math.sqrt(su) / 2.0) * z1
            w = torch.stack([0.5 * w + t2, 0.5 * w - t2], -1).flatten(-2)
            at += hi - lo + 1
            # keep the children that are ancestors of the target cells (the next run)
            first, last = (runs[l + 1] if l + 1 < k else (j0, j0 + K - 1))
            keep = slice(first - 2 * lo, last - 2 * lo + 1)
            w = w[..., keep]
            hh = hh[..., keep] if levy else None
        scale = self._sqrt_len[..., None]  # (1, B, 1)
        out = lambda x: x.permute(2, 1, 0).contiguous()  # noqa: E731  (m, B, K) -> (K, B, m)
        W = out(w * scale)
        return W, (out(hh * (2.0**k * scale)) if area else None)


    def _normalise(self, t: Time, many: bool = False, one_column: bool = False) -> torch.Tensor:
        """Normalised times (B,), or (K, B) for ``many`` (times of shape (K, B) or (K,)); (K, 1) with
        ``one_column`` (times (K, 1) shared by all samples, which share one span)."""
        t = torch.as_tensor(t, dtype=torch.float64, device=self.device)
        if many:
            if t.dim() == 1:
                t = t[:, None]
            if t.dim() != 2 or t.shape[1] not in (1, self.B):
                raise ValueError(f"interval times must have shape (K,) or (K, {self.B}), got {tuple(t.shape)}")
        elif t.dim() > 1 or (t.dim() == 1 and t.shape[0] not in (1, self.B)):
            raise ValueError(
                f"query times must be scalars or shape ({self.B},), got {tuple(t.shape)}"
            )
        if one_column:
            r = (t - self.t0[:1]) / self._len[:1]
        else:
            r = ((t - self.t0) / self._len).expand(*t.shape[:-1], self.B)
        if r.device.type == "cpu":  # range check costs a host sync elsewhere, so CPU only
            if bool(((r < -1e-6) | (r > 1 + 1e-6)).any()):
                raise ValueError("VirtualBrownianTree queried outside [t0, t1]")
        return r.clamp(0.0, 1.0)

    @staticmethod
    def _hash(base: torch.Tensor, node_ids: torch.Tensor) -> torch.Tensor:
        """Hash words for tree nodes ``node_ids`` (..., N) -> (..., m, N); ``base`` the rows' keys (m, N)."""
        return _mix(base ^ _mix(node_ids * _GOLDEN + _NODE_SALT)[..., None, :])

    @staticmethod
    def _hash_levels(base: torch.Tensor, node_ids: torch.Tensor) -> torch.Tensor:
        """Same words as ``_hash``, for node ids (2, N, L) -> (2, m, N, L) (level axis last)."""
        return _mix(base[..., None] ^ _mix(node_ids * _GOLDEN + _NODE_SALT)[:, None])

    def _rows(self, K: int = 1):
        """Per-row stream keys and √span for a query of K blocks of the B samples: (m, K·B), (1, K·B)."""
        if K == 1:
            return self._base, self._sqrt_len
        return self._base.repeat(1, K), self._sqrt_len.repeat(1, K)

    def _query(self, s: Time, t: Time, area: bool):
        W, H = self._core_fn(self._normalise(s), self._normalise(t), area, *self._rows())
        return (W, H) if self._batched else (W[0], None if H is None else H[0])

    def _core(self, rs: torch.Tensor, rt: torch.Tensor, area: bool, base: torch.Tensor, sqrt_len: torch.Tensor,
              chain: int = 0):
        """Increment (and Lévy area) of each sample over [s, t].

        ``rs``, ``rt`` are (N,) rows with stream keys ``base`` (m, N) and ``sqrt_len`` (1, N): the B
        samples, or K blocks of them (``intervals``); values are (2, m, N): endpoint, dimension, row.

        Both endpoints a <= b descend the tree together. While they sit in the same node nothing
        but that node's own (W, bhh) is tracked. Once they split at the midpoint t* of a common
        node, a accumulates the pieces between itself and t* (right siblings on its way down)
        and b the pieces between t* and itself (left siblings). Everything is thus expressed
        relative to t*, with magnitudes of order |b - a|, so short intervals suffer no
        cancellation against O(1) values of W(t) or ∫W (matters for H in float32 / deep trees).
        """
        levy, dt = self.levy_area, self.dtype
        rev = rs > rt
        r = torch.stack([torch.minimum(rs, rt), torch.maximum(rs, rt)])  # (2, N): a, b

        # Node index j_k at level k (interval [j 2^-k, (j+1) 2^-k]); points on a midpoint go left.
        # Level tensors keep the level axis last: the running sums in _levels scan along it.
        D = self._query_depth(r)
        x = r[..., None] * self._pow2[: D + 2]  # (2, N, D+2), exact (power-of-two scaling)
        Jx = (torch.ceil(x) - 1).clamp_min(0).long()
        node = self._heap[: D + 2] + Jx  # heap numbering, column 0 the root (node 0), column k+1 level k
        J = Jx[..., 1:]  # (2, N, D+1)
        right = J[..., 1:] - 2 * J[..., :-1]  # (2, N, D) 1 where the point enters the right child
        active = J[0] != J[1]  # (N, D+1) endpoints already separated at this level
        acc = active[:, :D] & (right.bool() ^ self._is_a[..., None])  # a keeps right siblings, b left

        per_level = 2 * base.numel()
        if per_level > _VECTORISE_MAX:
            return self._core_stepwise(r, rev, node, J, right, active, acc, area, base, sqrt_len, chain)
        chunk = max(1, _CHUNK // max(per_level, 1))
        one = D + 2 <= chunk  # one hash for the root, all levels and the leaf
        if one:
            Zx = _normals(self._hash_levels(base, node), dt, levy)
            z1, z2 = Zx[0][0, ..., 0], (Zx[1][0, ..., 0] if levy else None)
        else:
            z1, z2 = _normals(self._hash(base, torch.zeros_like(r[0], dtype=torch.int64)), dt, levy)
        # Root [0, 1]: W_1 ~ N(0, 1), bhh_1 = H_{0,1} ~ N(0, 1/12) independent.
        w = z1.expand(2, -1, -1)  # W over the current node of each point
        hh = (z2 / math.sqrt(12.0)).expand(2, -1, -1) if levy else None  # bhh over the node
        aw = ah = gap = None  # accumulated W, bhh and time between the point's node and t* (zero)

        # All levels of a chunk at once (few kernel launches, bounded memory); see _levels.
        for c0 in range(0, D, chunk):
            c1 = min(D, c0 + chunk)
            Z = tuple(x[..., c0 + 1 : c1 + 1] for x in Zx if x is not None) if one else \
                _normals(self._hash_levels(base, node[..., c0 + 1 : c1 + 1]), dt, levy)
            w, hh, aw, ah, gap = self._levels(c0, c1, Z, right[..., c0:c1], acc[..., c0:c1], w, hh, aw, ah, gap)
        if aw is None:  # depth 0
            aw, gap = torch.zeros_like(w), torch.zeros_like(r)
            ah = torch.zeros_like(w) if levy else None
        return self._leaf(r, rev, Zx if one else None, node, J, active, w, hh, aw, ah, gap, area, base, sqrt_len)

    def _query_depth(self, r: torch.Tensor) -> int:
        """Depth this query descends to: the first level at which every point sits on an edge of its
        node (a dyadic point j·2^-k), at most ``self.depth``. Below that level the point keeps to the
        edge, so its share of every deeper split and of the leaf draw is exactly 0 or the whole node:
        stopping there changes results by rounding only (fixed steps of 2^-k: depth k instead of 20).
        Costs a host sync, so on CPU eager queries only (like the range check)."""
        D = self.depth
        if self._compiled or r.device.type != "cpu":
            return D
        y = r * 2.0**D  # exact; an integer iff the point is an edge at level D
        if not bool((y == torch.floor(y)).all()):
            return D
        v = y.long()
        low = torch.where(v != 0, v & -v, 1 << D).min()  # lowest set bit: edge from level D - log2(low)
        return D - (int(low).bit_length() - 1)

    def _leaf(self, r, rev, Zx, node, J, active, w, hh, aw, ah, gap, area, base, sqrt_len):
        levy, dt = self.levy_area, self.dtype
        D = J.shape[-1] - 1  # the query's depth
        one = Zx is not None
        J = J[..., D]
        active = active[:, D]

        # Leaf [s, s+su]: exact conditional draw at the query point r (Foster Thm 6.1.4).
        su = 2.0**-D
        sr = (r - J * su).clamp(0.0, su)
        ru = (su - sr).clamp_min(0.0)
        x1, x2 = (Zx[0][..., D + 1], Zx[1][..., D + 1] if levy else None) if one else \
            _normals(self._hash_levels(base, node[..., D + 1 :])[..., 0], dt, levy)
        c = lambda v: v.to(dt).unsqueeze(-2)  # noqa: E731  float64 (2,N) coefficient -> (2,1,N)
        if levy:
            sr3, ru3 = sr**3, ru**3
            d = torch.sqrt(sr3 + ru3)
            dp = 1.0 / (2.0 * su * d)
            srru = torch.sqrt(sr * ru)
            ca, cb = dp * sr3 * srru, dp * ru3 * srru
            cc = torch.sqrt(3.0 * sr3 * ru3) / (6.0 * d)
            w_sr = c(sr / su) * w + c(6.0 * sr * ru / su**3) * hh + c(2.0 * (ca + cb) / su) * x1
            h_sr = c(sr3 / su**3) * hh - c(ca) * x1 + c(cc) * x2
            w_ru = w - w_sr
            h_ru = hh - h_sr - 0.5 * (c(ru) * w_sr - c(sr) * w_ru)
        else:
            w_sr = c(sr / su) * w + c(torch.sqrt(sr * ru / su)) * x1
            w_ru = w - w_sr
        is_a = self._is_a
        ia = is_a[..., None]
        pw = torch.where(ia, w_ru, w_sr)  # the leaf piece on t*'s side of the point
        plen = torch.where(is_a, ru, sr)
        g = c(gap)
        if levy:
            ph = torch.where(ia, h_ru, h_sr)
            ah = ah + ph + self._half_sig * (c(plen) * aw - g * pw)
        aw = aw + pw
        lab = gap + plen  # (t* - a, b - t*)

        same = ~active  # both endpoints in one leaf: difference of local draws
        W = torch.where(same, w_sr[1] - w_sr[0], aw[0] + aw[1])
        sign = torch.where(rev, -1.0, 1.0).to(dt)
        W = W * (sign * sqrt_len)
        if not area:
            return self._out(W), None
        bhh_same = h_sr[1] - h_sr[0] - 0.5 * (c(sr[1]) * w_sr[0] - c(sr[0]) * w_sr[1])
        bhh_div = ah[0] + ah[1] + 0.5 * (c(lab[1]) * aw[0] - c(lab[0]) * aw[1])
        h = torch.where(same, sr[1] - sr[0], lab[0] + lab[1])
        inv_h = torch.where(h > 0, 1.0 / torch.where(h > 0, h, 1.0), 0.0)
        H = torch.where(same, bhh_same, bhh_div) * c(inv_h) * sqrt_len
        return self._out(W), self._out(H)

    def _core_stepwise(self, r, rev, node, J, right, active, acc, area, base, sqrt_len, chain=0):
        """The per-level descent (same arithmetic as _levels, one level at a time), for large queries.

        Work is split by what it depends on. The hash, the normals and the node's (W, bhh) depend only
        on the point, so they run on a tensor of distinct points (m, P); the accumulations depend on
        the endpoint's role (a or b), so they run per endpoint on views of it. Endpoints are the first
        N points (a) and the N points from ``off`` (b): P = 2N in general, but for a ``chain`` of
        consecutive intervals (``intervals`` with t_k = s_{k+1}, blocks of ``chain`` rows) b_k is
        a_{k+1}, so P = N + chain and each point is descended once.
        Selections are sign flips σ = ±1 and 0/1 masks (exact, so values are bit-identical to
        ``where``-selection, and several times faster for large tensors on CPU)."""
        levy, dt, D = self.levy_area, self.dtype, right.shape[-1]
        N = r.shape[1]
        off = N - chain if chain else 0
        pts = lambda x: torch.cat([x[0], x[1][off:]])  # noqa: E731  (2, N, ...) -> (P, ...)
        ends = (slice(0, N), slice(N - off, 2 * N - off))  # the rows of a and b among the points
        base_p = torch.cat([base, base[:, off:]], 1)  # (m, P)
        z1, z2 = _normals(self._hash(base_p, torch.zeros(base_p.shape[1], dtype=torch.int64, device=r.device)),
                          dt, levy)
        w = z1
        hh = z2 / math.sqrt(12.0) if levy else None
        aw = [torch.zeros_like(w[:, :N]) for _ in ends]
        ah = [torch.zeros_like(w[:, :N]) for _ in ends] if levy else None
        gap = [torch.zeros_like(r[0]) for _ in ends]
        # A chain's points are sorted per sample, so at coarse levels runs of them share a node: draw
        # its normals once (_run_normals), a level at a time. Otherwise hash a chunk of levels at once.
        chunk = 1 if chain else max(1, (1 << 20) // base_p.numel())
        nodes = pts(node).t()[1:]  # (D+1, P) level-first
        sgns = (1 - 2 * pts(right)).to(dt).t()[:, None]  # (D, 1, P): +1 into the left child, -1 right
        accs = acc.permute(2, 0, 1)  # (D, 2, N)
        for c0 in range(0, D, chunk):
            Z = tuple(None if z is None else z[None] for z in self._run_normals(base_p, nodes[c0], chain)) if chain else \
                _normals(self._hash(base_p, nodes[c0 : min(D, c0 + chunk)]), dt, levy)
            for k in range(c0, min(D, c0 + chunk)):
                su = 2.0**-k
                hs = 0.5 * su
                sg = sgns[k]
                z1 = Z[0][k - c0]
                if levy:  # Foster Thm 6.1.6: joint midpoint draw of (W, bhh) on both halves
                    z = z1 * (math.sqrt(su) / 4.0)
                    n = Z[1][k - c0] * math.sqrt(su / 12.0)
                    t2 = (1.5 / su) * hh + z
                    b1, b2 = hh / 8.0 - (su / 4.0) * z, sg * ((su / 4.0) * n)
                    hh, sib_h = b1 + b2, b1 - b2  # the child the point enters, its sibling
                else:  # plain Brownian bridge midpoint
                    t2 = (math.sqrt(su) / 2.0) * z1
                st2 = sg * t2
                w, sib_w = 0.5 * w + st2, 0.5 * w - st2
                for e, rows in enumerate(ends):  # a keeps right siblings, b left ones
                    ac = accs[k][e]
                    acf = ac.to(dt)
                    sw = sib_w[:, rows]
                    if levy:
                        g = gap[e].to(dt)
                        ah[e] = (ah[e] + acf * sib_h[:, rows]) + acf * ((0.5 if e else -0.5) * (hs * aw[e] - g * sw))
                    aw[e] = aw[e] + acf * sw
                    gap[e] = gap[e] + ac * hs
        stack = lambda x: torch.stack([x[:, rows] for rows in ends])  # noqa: E731  points -> (2, m, N)
        return self._leaf(r, rev, None, node, J, active, stack(w), stack(hh) if levy else None, torch.stack(aw),
                          torch.stack(ah) if levy else None, torch.stack(gap), area, base, sqrt_len)

    def _run_normals(self, base_p: torch.Tensor, node_ids: torch.Tensor, block: int):
        """``_normals(self._hash(base_p, node_ids))`` for one level's nodes (P,) of a chain's points,
        laid out in blocks of ``block`` rows (one row per sample) with each sample's points in
        increasing order: a point whose node is its predecessor's copies its normals (the same hash
        word), so only the first point of each run is hashed and transformed."""
        levy, dt = self.levy_area, self.dtype
        ids = node_ids.view(-1, block)
        new = torch.ones_like(ids, dtype=torch.bool)
        new[1:] = ids[1:] != ids[:-1]
        new = new.view(-1)
        n_new = int(new.sum())  # a host sync per level (`intervals` detecting the chain syncs anyway)
        if n_new > 0.75 * new.numel():  # little to share at this level
            return _normals(self._hash(base_p, node_ids), dt, levy)
        rows = torch.arange(new.numel(), device=new.device)
        first = torch.where(new, rows, -1).view(-1, block).cummax(0).values.view(-1)  # the run's first point
        slot = (new.cumsum(0) - 1)[first]  # its place among the hashed points
        Z = _normals(self._hash(base_p[:, new], node_ids[new]), dt, levy)
        return tuple(z if z is None else z[:, slot] for z in Z)

    def _levels(self, k0, k1, Z, right, acc, w, hh, aw, ah, gap):
        """Descend levels k0 <= k < k1 for both endpoints, all levels at once.

        Per level k (su = 2^-k, σ = +1 into the left child, -1 into the right) the exact bridge
        update is (Foster Thm 6.1.6 with Lévy area; plain bridge otherwise)::

            t2 = 1.5/su·hh + z                  (plain: t2 = √su/2·z1)
            b1 = hh/8 − su/4·z
            w' = ½w + σ t2,        hh' = b1 + σ su/4·n        (the child the point enters)
            sib_w = ½w − σ t2,     sib_h = b1 − σ su/4·n      (its sibling)
            aw += sib_w,  ah += sib_h + ½ sig (hs·aw − gap·sib_w),  gap += hs   (where acc)

        The w and hh recurrences are linear with power-of-two factors (½, ⅛), so after scaling
        by 2^(k−k0) resp. 8^(k−k0) (exact in floating point) they are running sums, as are aw, ah
        and gap. Each running sum is one ``torch.cumsum`` along the level axis, which adds in
        sequence: in float64 this is bit-identical to stepping level by level (CPU; the scans
        run in float64 for float32 paths too, so float32 differs from stepwise float32
        arithmetic by rounding only)."""
        levy, dt, f64 = self.levy_area, self.dtype, torch.float64
        L = k1 - k0
        c = {k: v[k0:k1] for k, v in self._lvl.items()}  # per-level constants (L,), float64
        c.update({k: v[:L] for k, v in self._rel.items()})
        cd = {k: v.to(dt) for k, v in c.items() if k in ("cz", "cn", "q4", "c15", "ch", "hs")}
        sgn = (1 - 2 * right).to(dt)[:, None]  # (2, 1, N, L)
        accm = acc[:, None]
        shape = w.shape  # (2, m, N)

        def scan(carry, n, fill):
            """Running sum along the last axis of [carry, terms]: fill(view) writes the n terms."""
            if carry is None:  # zero carry: 0 + x = x, so the sum of the terms alone is the same
                buf = torch.empty(*shape, n, dtype=f64, device=self.device)
                fill(buf)
            else:
                buf = torch.empty(*shape, n + 1, dtype=f64, device=self.device)
                buf[..., 0] = carry
                fill(buf[..., 1:])
            return buf.cumsum_(-1) if carry is None else buf.cumsum_(-1)[..., 1:]

        if levy:
            z = Z[0] * cd["cz"]
            n = Z[1] * cd["cn"]
            q = z * cd["q4"]  # su/4·z (exact scaling)
            rr = n * cd["q4"]  # su/4·n
            srr = sgn * rr

            # hh: S_k = 8^(k−k0) hh_k obeys S_{k+1} = (S_k − 8^(k+1−k0) q_k) + 8^(k+1−k0) σ rr_k
            def fill_h(v):
                v = v.unflatten(-1, (L, 2))
                torch.mul(q, c["m8"], out=v[..., 0])
                torch.mul(srr, c["p8"], out=v[..., 1])
            cs = scan(hh, 2 * L, fill_h)  # b1 at odd, hh at even positions (levels k0+1 .. k1)
            hs8 = cs.unflatten(-1, (L, 2)) * c["i8"][:, None]
            b1 = hs8[..., 0].to(dt)
            hh1 = hs8[..., 1].to(dt)  # hh_k, k0 < k <= k1
            hhs = torch.cat([hh[..., None], hh1[..., :-1]], -1) if L > 1 else hh[..., None]
            t2 = hhs * cd["c15"] + z
        else:
            t2 = Z[0] * cd["ch"]
        # w: 2^(k−k0) w_k is a running sum of 2^(k+1−k0) σ t2_k
        st2 = sgn * t2
        cw = scan(w, L, lambda v: torch.mul(st2, c["p2"], out=v))
        ws1 = (cw * c["i2"]).to(dt)  # w_k, k0 < k <= k1
        wprev = torch.cat([w[..., None], ws1[..., :-1]], -1) if L > 1 else w[..., None]
        sib_w = 0.5 * wprev - st2
        zero = torch.zeros((), dtype=dt, device=self.device)

        def masked(x, out):  # out[...] = where(acc, x, 0); out is float64
            if dt == f64:
                torch.where(accm, x, zero, out=out)
            else:
                out.copy_(torch.where(accm, x, zero))
        caw = scan(aw, L, lambda v: masked(sib_w, v)).to(dt)  # aw after level k
        steps = acc * c["hs"]
        gaps = steps.cumsum(-1) if gap is None else torch.cat([gap[..., None], steps], -1).cumsum(-1)[..., 1:]
        if levy:
            sib_h = b1 - srr
            # aw and gap before level k: shift the inclusive sums by one level
            aw0 = torch.zeros_like(w) if aw is None else aw
            gap0 = torch.zeros_like(gaps[..., 0]) if gap is None else gap
            awp = torch.cat([aw0[..., None], caw[..., :-1]], -1)
            g = torch.cat([gap0[..., None], gaps[..., :-1]], -1).to(dt)[:, None]
            tc = self._half_sig[..., None] * (awp * cd["hs"] - g * sib_w)  # Chen's relation

            def fill_a(v):
                v = v.unflatten(-1, (L, 2))
                masked(sib_h, v[..., 0])
                masked(tc, v[..., 1])
            ah = scan(ah, 2 * L, fill_a)[..., -1].to(dt)
            hh = hh1[..., -1]
        return ws1[..., -1], hh, caw[..., -1], ah, gaps[..., -1]

    @staticmethod
    def _out(x: torch.Tensor) -> torch.Tensor:
        return x.t().contiguous()  # (m, N) -> (N, m)

    def __repr__(self) -> str:
        return (
            f"VirtualBrownianTree(shape={self.shape}, depth={self.depth}, seed={self.seed}, "
            f"levy_area={self.levy_area}, dtype={self.dtype}, device={self.device})"
        )
