"""How gradients of a solve are computed. The default backpropagates through the solver's operations."""
from __future__ import annotations


class Adjoint:
    """Base class. A continuous adjoint implements `solve(prob, solver, params, options) -> Solution`
    whose `ys` are differentiable through a torch.autograd.Function."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class DiscreteAdjoint(Adjoint):
    """Backpropagation through every operation of the solve: the exact gradient of what was computed.
    Memory grows with the number of steps. The only adjoint under which the trace (eest, stiffness)
    is differentiable, so global regularizers need it."""
