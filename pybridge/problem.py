"""Problem definitions: what to solve, checked once, independent of the engine."""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch


class ODEProblem:
    """dy/dt = f(t, y), y(t[0]) = y0, saved at the times t.

    f(t, y) -> dy/dt, any callable or torch.nn.Module. y0 is one sample of any shape, or a batch
    (B, *shape): by default a y0 with two or more dimensions is a batch (pass `batched=False` for a
    single matrix-valued state). t: (T,) shared times, or (B, T) per-sample times; strictly
    increasing or decreasing per sample, t[..., 0] is the initial time.
    f receives t as a 0-d tensor, except in independent batching of a batch, where every sample
    sits at its own time and t has shape (B,).
    `jac(t, y)` (optional) returns the batched Jacobian (B, n, n) for stiff solvers.

    Shapes: y0 (*shape) or (B, *shape); t (T,) or (B, T); f(t, y) returns y's shape; with B
    samples and n = prod(shape), jac(t, y) returns (B, n, n).
    """

    f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    y0: torch.Tensor
    t: torch.Tensor
    jac: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]
    batched: bool

    def __init__(self, f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], y0: torch.Tensor,
                 t: Union[torch.Tensor, Sequence[float]],
                 jac: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
                 batched: Optional[bool] = None) -> None:
        if not callable(f):
            raise TypeError(f"f must be callable f(t, y) -> dy/dt; got {type(f).__name__}")
        if jac is not None and not callable(jac):
            raise TypeError(f"jac must be callable jac(t, y) -> (B, n, n) or None; got {type(jac).__name__}")
        self.f = f
        self.jac = jac
        self.y0 = check_state(y0)
        self.batched = self.y0.dim() >= 2 if batched is None else bool(batched)
        if self.batched and self.y0.dim() < 1:
            raise ValueError("y0: a batched problem needs y0 of shape (B, *state_shape); got a 0-d tensor")
        self.t = check_times(t, self.y0, self.batched)

    @property
    def batch_size(self) -> int:
        return self.y0.shape[0] if self.batched else 1

    @property
    def state_shape(self) -> tuple:
        return tuple(self.y0.shape[1:]) if self.batched else tuple(self.y0.shape)

    def __repr__(self):
        return f"ODEProblem(y0={tuple(self.y0.shape)}, t={tuple(self.t.shape)}, batched={self.batched})"


def check_state(y0) -> torch.Tensor:
    if not isinstance(y0, torch.Tensor):
        raise TypeError(f"y0 must be a torch.Tensor; got {type(y0).__name__}")
    if not y0.is_floating_point():
        raise TypeError(f"y0 must have a floating-point dtype (float32 or float64); got {y0.dtype}")
    if y0.numel() == 0:
        raise ValueError(f"y0 must not be empty; got shape {tuple(y0.shape)}")
    bad = ~torch.isfinite(y0)
    if bad.any():
        where = tuple(int(i) for i in bad.nonzero()[0].tolist())
        raise ValueError(f"y0 has non-finite values ({int(bad.sum())} of {y0.numel()}; first at index {where})")
    return y0


def check_times(t, y0: torch.Tensor, batched: bool) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        try:
            t = torch.as_tensor(t, dtype=y0.dtype, device=y0.device)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"t must be a 1-d or 2-d tensor of times; got {type(t).__name__} ({e})") from None
    if not t.is_floating_point():
        raise TypeError(f"t must have a floating-point dtype; got {t.dtype}")
    if t.device != y0.device:
        raise ValueError(f"t is on device {t.device} but y0 is on {y0.device}; put them on the same device")
    if t.dim() not in (1, 2):
        raise ValueError(f"t must have shape (T,) or (B, T); got {tuple(t.shape)}")
    if t.dim() == 2:
        if not batched:
            raise ValueError(f"t of shape {tuple(t.shape)} gives per-sample times, but y0 of shape "
                             f"{tuple(y0.shape)} is one sample (batched=False)")
        if t.shape[0] != y0.shape[0]:
            raise ValueError(f"t of shape {tuple(t.shape)} must have one row per sample: expected "
                             f"({y0.shape[0]}, T) for y0 of shape {tuple(y0.shape)}")
    if t.shape[-1] < 2:
        raise ValueError(f"t must hold at least two times (start and end); got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError("t has non-finite values")
    _check_monotonic(t)
    cast = t.to(y0.dtype)
    if cast.dtype != t.dtype:   # distinct times can round to one in y0's precision (the solve then stood still)
        if not torch.isfinite(cast).all():
            raise ValueError(f"t overflows y0's dtype {y0.dtype}")
        _check_monotonic(cast, f" after rounding to y0's dtype {y0.dtype} (t is {t.dtype})")
    return cast


def _check_monotonic(t, context=""):
    diffs = t.diff(dim=-1)
    direction = torch.sign(diffs[..., :1])
    if not ((diffs * direction) > 0).all():
        raise ValueError(f"t must be strictly increasing or strictly decreasing (per sample){context}; "
                         f"got t = {t.tolist() if t.numel() <= 20 else tuple(t.shape)}")
