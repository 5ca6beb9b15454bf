"""The one way results come back from worker threads: a `Reply` is a callback bound to the event loop.

A stage that hands work to a thread (ASR, the model) puts a `Reply` in the job. The thread calls it with the
typed result; the bound function then runs on the loop, where all state that clients see lives. Nothing else
crosses from a thread to the loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class Reply(Generic[T]):
    """`fn(value)` scheduled on `loop`, callable from any thread (and from the loop itself). What `fn` returns is
    ignored."""

    __slots__ = ("_fn", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, fn: Callable[[T], object]) -> None:
        self._loop, self._fn = loop, fn

    @classmethod
    def here(cls, fn: Callable[[T], object]) -> Reply[T]:
        """Bound to the running loop (call on the loop)."""
        return cls(asyncio.get_running_loop(), fn)

    def __call__(self, value: T) -> None:
        try:
            self._loop.call_soon_threadsafe(self._fn, value)
        except RuntimeError:  # the loop has closed (shutdown after a crash): nobody is left to receive it
            log.debug("result dropped: the event loop is closed")
