"""Digests: every `digests.every_s`, a summary per stream of the windows stored since its last digest, made by
the LLM from their text (like Frigate's daily review, for what was heard)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from ..config import DigestConfig
from ..delivery.events import HistoryHit

log = logging.getLogger(__name__)

# (stream, since, until, windows) → queue one digest job; `since`/`until` span the windows' wall-clock times
Submit = Callable[[str, float, float, list[HistoryHit]], None]


class Digests:
    def __init__(
        self,
        config: DigestConfig,
        streams: Callable[[], list[str]],
        windows_after: Callable[[str, int, int], tuple[list[HistoryHit], int]],
        submit: Submit,
        after: int = 0,
    ) -> None:
        """`windows_after(stream, rowid, limit)` reads the store (blocking: run in a thread): the windows stored
        after a watermark, and the new one. The first digests cover what is stored after `after`. `streams()`: the
        configured streams now (a reload may add some)."""
        self.config, self.streams, self.windows_after, self.submit = config, streams, windows_after, submit
        self.after = after
        self.made = 0

    async def run(self, stop: asyncio.Event) -> None:
        after: dict[str, int] = {}
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.config.every_s)
                return
            except TimeoutError:
                pass
            for stream in self.streams():
                after.setdefault(stream, self.after)
                try:
                    hits, after[stream] = await asyncio.to_thread(
                        self.windows_after, stream, after[stream], self.config.max_windows
                    )
                except Exception:  # the store failing must not end the digests for good
                    log.exception("digest for %s: reading the store failed", stream)
                    continue
                if not hits:
                    log.debug("digest for %s skipped: nothing stored since the last one", stream)
                    continue
                since = min(h.wall_start or h.wall_end or time.time() for h in hits)
                until = max(h.wall_end or since for h in hits)
                log.info("digest for %s: %d stored windows", stream, len(hits))
                self.submit(stream, since, until, hits)
                self.made += 1
