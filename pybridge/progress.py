"""`solve(..., progress=True)`: a tqdm bar over the integration span.

The integration loop already reads one small tensor from the device per step (its termination
flag). While a bar is active, the loop adds one more integer to that same read — the fraction of
the span the slowest running sample has covered, in millionths — and hands it to the hook below,
so the bar costs no extra host-device synchronization. The hook is carried in a ContextVar set
only for the duration of the forward solve (the backward pass of an adjoint shows no bar).
"""
from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Callable, Iterator, Optional

#: Called by the loop once per iteration with the covered fraction (0..1) of the slowest running sample.
ProgressHook = Callable[[float], None]

_HOOK: ContextVar[Optional[ProgressHook]] = ContextVar("pybridge_progress_hook", default=None)

SCALE = 1_000_000  # the loop reports the fraction in millionths, as an integer


def current_hook() -> Optional[ProgressHook]:
    """The progress hook of the enclosing `progress_bar` context, or None (the default: no bar)."""
    return _HOOK.get()


@contextlib.contextmanager
def reporting_to(hook: ProgressHook) -> Iterator[ProgressHook]:
    """Solves inside the block call `hook(fraction)` once per loop iteration (for custom displays)."""
    token = _HOOK.set(hook)
    try:
        yield hook
    finally:
        _HOOK.reset(token)


@contextlib.contextmanager
def progress_bar(desc: str = "solve", **tqdm_kwargs) -> Iterator[ProgressHook]:
    """Show a tqdm bar (0-100 % of the integration span) while the block runs; the loop reports
    through `current_hook`. With per-sample spans, the percentage is the slowest running sample's.

    tqdm is imported here, lazily (`pip install tqdm`, part of the `plot` extra).
    """
    try:
        from tqdm import tqdm
    except ImportError as e:
        raise ImportError("progress=True needs tqdm: pip install tqdm (or pip install 'pybridge[plot]')") from e
    bar = tqdm(total=100.0, desc=desc, dynamic_ncols=True, leave=True,
               bar_format="{desc}: {n:5.1f}% of the span |{bar}| [{elapsed}<{remaining}{postfix}]",
               **tqdm_kwargs)
    steps = 0

    def hook(fraction: float) -> None:
        nonlocal steps
        steps += 1
        target = min(max(fraction, 0.0), 1.0) * 100.0
        if target > bar.n:
            bar.update(target - bar.n)
        if steps % 50 == 0:
            bar.set_postfix_str(f"{steps} steps", refresh=False)

    try:
        with reporting_to(hook):
            yield hook
    finally:
        bar.set_postfix_str(f"{steps} steps", refresh=False)
        bar.close()
