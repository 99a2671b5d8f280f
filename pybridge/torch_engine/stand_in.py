"""Calls of f in lockstep in which some rows do not take part.

In lockstep f gets one time for the whole batch (RightHandSide passes the first row's). Rows of a
call can disagree about the time: a stopped sample keeps the time it stopped at, and a lazy
interpolant's stage call includes steps (padded, or of other samples) it does not need. And a row
left out can still hurt: its f, evaluated at the batch's time, may not be finite there, and a zero
cotangent times a non-finite partial derivative is NaN in the gradients of what the samples share.
So in lockstep such calls feed every row left out the first taking-part row's time and detached
state (both finite where that row's are), and give it `fill` (or that row's value) back.

Not covered: a row whose f is not finite at that time because of its own sample's data (per-sample
constants inside f) still reaches shared gradients, since one call of f serves the whole batch
(batch="independent" keeps each sample at its own time); and an SDE's diffusion g, whose calls
come from inside the SDE step, takes the latest τ of the batch but is not stood in.
"""
from __future__ import annotations

import torch


class StandInRows:
    def __init__(self, rhs, taking_part, fill=None):
        self.rhs, self.idle, self.fill = rhs, ~taking_part, fill
        # The first taking-part row, as a (1,) index on the device (indexing with a 0-d tensor would
        # read it on the host, and break a compiled graph).
        self.lead = taking_part.long().argmax().reshape(1)

    def _inputs(self, tau, y):
        return (torch.where(self.idle, tau.index_select(0, self.lead), tau),
                torch.where(self.idle[:, None], y.index_select(0, self.lead).detach(), y))

    def __call__(self, tau, y):
        out = self.rhs(*self._inputs(tau, y))
        return out if self.fill is None else torch.where(self.idle[:, None], self.fill, out)

    def jacobian(self, tau, y):
        user_jac = getattr(self.rhs, "jacobian", None)
        J = user_jac(*self._inputs(tau, y)) if user_jac is not None else None
        return None if J is None else torch.where(self.idle[:, None, None], 0.0, J)


def taking_part(rhs, rows, fill=None):
    """rhs for a call in which only `rows` (B,) take part: stood in for (StandInRows) where f gets one
    time for a batch (lockstep), unchanged otherwise (each row then has its own time)."""
    return StandInRows(rhs, rows, fill) if getattr(rhs, "shared_time", False) else rhs
