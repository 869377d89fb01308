"""The slot where a mod changes the model update before the handler encodes it.

A Flower mod sees the message going in and the reply coming out, and nothing between. That is
enough for what happens to a reply (a fault that breaks the upload), but not for what must
happen to the float update itself: local DP noises it *before* quantisation (so rounding is
post-processing of a private value and error feedback keeps the rounding residual, not the
noise), and the stochastic rounding draws continue the local-training stream, so the encoding
cannot move out of the handler without changing every run. Flower's own ``LocalDpMod`` noises
the reply's float parameters afterwards, which fedkd's quantised replies do not have.

So a mod hands the handler a function instead: it calls ``call_next`` inside
``with update_step(fn):``, and the handler passes the update through :func:`finish` just
before encoding. Steps compose like the reply does: the mod nearest the handler acts first,
as in pfl-research's chain of postprocessors. The steps live in a ``ContextVar``, so they
belong to the message being handled (one per thread), not to the process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np

Update = dict[str, np.ndarray]
Step = Callable[[Mapping[str, np.ndarray]], Update]

_steps: ContextVar[tuple[Step, ...]] = ContextVar("fedkd_update_steps", default=())


@contextmanager
def update_step(step: Step) -> Iterator[None]:
    """While the block runs, updates that reach :func:`finish` also pass through ``step``."""
    token = _steps.set(_steps.get() + (step,))
    try:
        yield
    finally:
        _steps.reset(token)


def finish(update: Update) -> Update:
    """The update as every enclosing mod wants it sent, innermost mod first."""
    for step in reversed(_steps.get()):
        update = step(update)
    return update
