"""Logging that a flood of bad clients cannot flood: repeated warnings summarised, and the HTTP library's
tracebacks for requests that were malformed (the client's fault, not ours) turned into one throttled line."""

from __future__ import annotations

import collections
import logging
import time

log = logging.getLogger(__name__)


class EveryFew:
    """Logs the first of a kind of event, then at most once per `seconds` with how many happened meanwhile."""

    def __init__(self, logger: logging.Logger, seconds: float = 10.0, level: int = logging.WARNING) -> None:
        self.logger, self.seconds, self.level = logger, seconds, level
        self._last: dict[str, float] = {}
        self._count: collections.Counter[str] = collections.Counter()

    def warn(self, kind: str, message: str, *args: object) -> None:
        self._count[kind] += 1
        now = time.monotonic()
        if now - self._last.get(kind, -self.seconds) >= self.seconds:
            n, self._count[kind], self._last[kind] = self._count[kind], 0, now
            self.logger.log(
                self.level, message + (f" ({n} like this in the last {self.seconds:g} s)" if n > 1 else ""), *args
            )


class MalformedHttp(logging.Filter):
    """On aiohttp's server logger: a request aiohttp could not parse (`HttpProcessingError`: the client sent
    malformed HTTP, and got a 400) is logged as one info line, at most every 10 s; real errors pass untouched."""

    def __init__(self) -> None:
        super().__init__()
        self.summary = EveryFew(log, level=logging.INFO)

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
            self.summary.warn("malformed", "HTTP API: a client sent malformed HTTP (answered 400): %s", first)
            return False
        return True
