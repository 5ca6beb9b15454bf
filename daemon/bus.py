"""In-process pub/sub: typed events with per-stream sequence numbers, fanned out to bounded subscriber queues.

`publish` never blocks and never waits for a subscriber. Each subscriber has its own queue of `maxsize` events
with this overflow policy:

1. a full queue first sheds its oldest *droppable* event (`level`, `transcript.partial`): a newer one supersedes it;
2. if none is queued and the new event is droppable, the new event is shed;
3. otherwise (the queue is full of events that must not be lost, e.g. finals) the subscriber is marked `overflowed`
   and its connection is closed: the client can reconnect, and it was told how many events it lost.

Shed events are counted per type and reported to the client in a `dropped` message before the next event.
"""

from __future__ import annotations

import asyncio
import collections
import fnmatch
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

Event = dict[str, Any]

DROPPABLE = frozenset({"level", "transcript.partial"})


@dataclass
class Filter:
    """Which events a subscriber wants: stream names and event types, each a list of glob patterns (`*`,
    `transcript.*`). Events that belong to no stream match any stream filter."""

    streams: list[str] = field(default_factory=lambda: ["*"])
    events: list[str] = field(default_factory=lambda: ["*"])

    def matches(self, event: Event) -> bool:
        stream = event.get("stream")
        if stream is not None and not any(fnmatch.fnmatchcase(stream, p) for p in self.streams):
            return False
        return any(fnmatch.fnmatchcase(event["type"], p) for p in self.events)


class Subscriber:
    """One consumer's bounded queue; see the module docstring for the overflow policy."""

    def __init__(self, maxsize: int, flt: Filter) -> None:
        self.maxsize = maxsize
        self.filter = flt
        self._queue: collections.deque[Event] = collections.deque()
        self._wakeup = asyncio.Event()
        self.dropped: collections.Counter[str] = collections.Counter()
        self.overflowed = False
        self.delivered = 0

    def __len__(self) -> int:
        return len(self._queue)

    def offer(self, event: Event, *, force: bool = False) -> None:
        """Queue `event` if it passes the filter (`force`: replies to this client, which skip the filter)."""
        if self.overflowed or not (force or self.filter.matches(event)):
            return
        if len(self._queue) >= self.maxsize:
            victim = next((i for i, e in enumerate(self._queue) if e["type"] in DROPPABLE), None)
            if victim is not None:
                self.dropped[self._queue[victim]["type"]] += 1
                del self._queue[victim]
            elif event["type"] in DROPPABLE:
                self.dropped[event["type"]] += 1
                return
            else:
                self.overflowed = True
                self._wakeup.set()
                return
        self._queue.append(event)
        self._wakeup.set()

    async def get(self) -> Event | None:
        """The next event (a `dropped` notice first if events were shed); None once the subscriber overflowed."""
        while not self._queue and not self.overflowed:
            self._wakeup.clear()
            await self._wakeup.wait()
        if self.overflowed:
            return None
        if self.dropped:
            notice = {"type": "dropped", "counts": dict(self.dropped), "time": time.time()}
            self.dropped.clear()
            return notice
        self.delivered += 1
        return self._queue.popleft()


class EventBus:
    """Stamps events with `seq` (per stream and type, from 1) and `time`, and offers them to every subscriber."""

    def __init__(self) -> None:
        self._subs: set[Subscriber] = set()
        self._seq: collections.Counter[tuple[str | None, str]] = collections.Counter()
        self.published: collections.Counter[str] = collections.Counter()

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    def subscribe(self, maxsize: int, flt: Filter | None = None) -> Subscriber:
        sub = Subscriber(maxsize, flt or Filter())
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self._subs.discard(sub)

    def publish(self, event: Event) -> Event:
        """Stamp and fan out `event` (a dict with at least `type`, and `stream` for stream events)."""
        key = (event.get("stream"), event["type"])
        self._seq[key] += 1
        event["seq"] = self._seq[key]
        event.setdefault("time", round(time.time(), 6))
        self.published[event["type"]] += 1
        for sub in self._subs:
            sub.offer(event)
        return event

    def pending(self) -> Iterable[int]:
        return (len(s) for s in self._subs)
