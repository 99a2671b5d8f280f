"""Stochastic differential equations: dy = f(t, y) dt + g(t, y) dW."""
from __future__ import annotations

from typing import Callable, Optional

from .problem import ODEProblem

NOISE_TYPES = ("diagonal", "scalar", "additive", "general")
INTERPRETATIONS = ("ito", "stratonovich")


class SDEProblem(ODEProblem):
    """dy = f(t, y) dt + g(t, y) dW (Itô; ∘dW with interpretation="stratonovich"), y(t[0]) = y0, saved at the times t (increasing).

    f is the drift (as ODEProblem's f; for interpretation="stratonovich" the Stratonovich drift).
    g's output depends on `noise`:
      "diagonal"  g(t, y) has y's shape; one independent Brownian motion per component.
      "scalar"    g(t, y) has y's shape; one Brownian motion shared by all components.
      "additive"  g does not depend on y. Either y's shape (one Brownian motion per component) or
                  y's shape plus a trailing dimension m (g(t)·dW with m Brownian motions).
      "general"   g(t, y) has y's shape plus a trailing dimension m: g(t, y)·dW with m Brownian
                  motions (EM, EulerHeun, ReversibleHeun: strong order 0.5 without Lévy areas).
    y0 (batched as in ODEProblem) and t as in ODEProblem; t must increase.
    """

    def __init__(self, f: Callable, g: Callable, y0, t, noise: str = "diagonal",
                 interpretation: str = "ito", batched: Optional[bool] = None):
        if not callable(g):
            raise TypeError(f"g must be callable g(t, y) -> diffusion; got {type(g).__name__}")
        if noise not in NOISE_TYPES:
            raise ValueError(f"noise must be one of {NOISE_TYPES}; got {noise!r}")
        if interpretation not in INTERPRETATIONS:
            raise ValueError(f"interpretation must be one of {INTERPRETATIONS}; got {interpretation!r}")
        super().__init__(f, y0, t, batched=batched)
        if not (self.t.diff(dim=-1) > 0).all():
            raise ValueError("t must be strictly increasing for an SDEProblem (the Brownian path runs forwards)")
        self.g = g
        self.noise = noise
        self.interpretation = interpretation

    def __repr__(self):
        return (f"SDEProblem(y0={tuple(self.y0.shape)}, t={tuple(self.t.shape)}, noise={self.noise!r}, "
                f"interpretation={self.interpretation!r}, batched={self.batched})")
