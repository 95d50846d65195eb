"""Interruption points inside long model work.

A denoising step of a large request can take minutes; a deadline or a cancel checked only
between steps would wait for it. The models call :func:`point` between their units of work
(every block of the DiT, every stage or chunk of a VAE decode). Outside :func:`checking`
it does nothing (one context-variable read); inside, it calls the installed check, which
raises to stop the work (the device worker installs trio's ``check_cancelled``, so a
cancelled job stops within one block).

The check lives in a context variable, so each thread (and each task) has its own: a
worker thread's check never fires inside another thread's model call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_check: ContextVar[Callable[[], None] | None] = ContextVar("chaid_interrupt_check",
                                                           default=None)


def point() -> None:
    """Run the installed check, if any; whatever it raises propagates."""
    check = _check.get()
    if check is not None:
        check()


@contextmanager
def checking(check: Callable[[], None]) -> Iterator[None]:
    """Install ``check`` for the :func:`point` calls made inside the ``with`` block."""
    token = _check.set(check)
    try:
        yield
    finally:
        _check.reset(token)
