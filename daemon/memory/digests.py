"""Digests: every `digests.every_s`, a summary per stream of its stored windows since the last one, made by the
LLM from their text (like Frigate's daily review, for what was heard)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from ..config import DigestConfig
from ..delivery.events import HistoryHit

log = logging.getLogger(__name__)

# (stream, since, until, windows) → queue one digest job
Submit = Callable[[str, float, float, list[HistoryHit]], None]


class Digests:
    def __init__(
        self,
        config: DigestConfig,
        streams: list[str],
        windows: Callable[[str, float, float, int], list[HistoryHit]],
        submit: Submit,
    ) -> None:
        """`windows(stream, since, until, limit)` reads the store (blocking: run in a thread)."""
        self.config, self.streams, self.windows, self.submit = config, streams, windows, submit
        self.made = 0

    async def run(self, stop: asyncio.Event) -> None:
        since = dict.fromkeys(self.streams, time.time())
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.config.every_s)
                return
            except TimeoutError:
                pass
            now = time.time()
            for stream in self.streams:
                hits = await asyncio.to_thread(self.windows, stream, since[stream], now, self.config.max_windows)
                if hits:
                    self.submit(stream, since[stream], now, hits)
                    self.made += 1
                else:
                    log.debug("digest for %s skipped: no stored windows since the last one", stream)
                since[stream] = now
