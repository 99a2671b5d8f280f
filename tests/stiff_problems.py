"""Stiff test problems shared by the stiff-solver tests (ROBER, VDPOL and the Bari accuracy measure)."""
import math

import numpy as np
import torch


def rober(t, y):
    y1, y2, y3 = y.unbind(-1)
    return torch.stack([-0.04 * y1 + 1e4 * y2 * y3,
                        0.04 * y1 - 1e4 * y2 * y3 - 3e7 * y2 ** 2,
                        3e7 * y2 ** 2], -1)


def vdpol(t, y, eps=1e-6):
    y1, y2 = y.unbind(-1)
    return torch.stack([y2, ((1 - y1 ** 2) * y2 - y1) / eps], -1)


def mescd(y, ref, rtol, atol):
    """Bari test set accuracy: -log10 max_i |y_i - ref_i| / (atol/rtol + |ref_i|)."""
    y = np.asarray(y, dtype=float)
    ref = np.asarray(ref, dtype=float)
    return -math.log10(np.max(np.abs(y - ref) / (atol / rtol + np.abs(ref))))
