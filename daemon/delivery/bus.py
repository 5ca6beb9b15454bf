"""In-process pub/sub: typed stream events stamped with per-stream sequence numbers, serialised once, and fanned out
to bounded subscriber queues.

`publish` never blocks and never waits for a subscriber. Each subscriber has its own queue of `maxsize` messages
with this overflow policy:

1. a full queue first sheds its oldest *droppable* event (`level`, `transcript.partial`): a newer one supersedes it;
2. if none is queued and the new event is droppable, the new event is shed;
3. otherwise (the queue is full of messages that must not be lost: finals, replies, answers) the subscriber is
   marked `overflowed` and its connection is closed: the client can reconnect, and it was told what it lost.

Replies and answers to a client go through the same queue (`send`), skipping the filter but not the bound. Shed
events are counted per type and reported to the client in a `dropped` message before the next one it gets.
"""

from __future__ import annotations

import asyncio
import collections
import fnmatch
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from .events import Dropped, ServerMessage, StreamEvent, encode

log = logging.getLogger(__name__)

DROPPABLE = frozenset({"level", "transcript.partial"})


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One serialised message: what a subscriber queue holds (the text is shared by every subscriber)."""

    type: str
    stream: str | None
    text: str


@dataclass
class Filter:
    """Which events a subscriber wants: stream names and event types, each a list of glob patterns (`*`,
    `transcript.*`)."""

    streams: Sequence[str] = field(default_factory=lambda: ["*"])
    events: Sequence[str] = field(default_factory=lambda: ["*"])

    def matches(self, item: Outgoing) -> bool:
        if item.stream is not None and not any(fnmatch.fnmatchcase(item.stream, p) for p in self.streams):
            return False
        return any(fnmatch.fnmatchcase(item.type, p) for p in self.events)


@dataclass
class Shedding:
    """What every subscriber lost, for the metrics: events shed by type, and clients let go for overflowing."""

    shed: collections.Counter[str] = field(default_factory=collections.Counter)
    overflowed: int = 0


class Subscriber:
    """One consumer's bounded queue; see the module docstring for the overflow policy."""

    def __init__(self, maxsize: int, flt: Filter, losses: Shedding | None = None) -> None:
        self.maxsize = maxsize
        self.filter = flt
        self.losses = losses or Shedding()
        self._queue: collections.deque[Outgoing] = collections.deque()
        self._wakeup = asyncio.Event()
        self.dropped: collections.Counter[str] = collections.Counter()
        self.overflowed = False
        self.delivered = 0

    def __len__(self) -> int:
        return len(self._queue)

    def offer(self, item: Outgoing) -> None:
        """Queue a published event if it passes this subscriber's filter."""
        if self.filter.matches(item):
            self._put(item)

    def send(self, message: ServerMessage) -> None:
        """Queue a message for this client only (a reply, an answer, an error): no filter."""
        self._put(Outgoing(message.type, None, encode(message)))

    def _put(self, item: Outgoing) -> None:
        if self.overflowed:
            return
        if len(self._queue) >= self.maxsize:
            victim = next((i for i, e in enumerate(self._queue) if e.type in DROPPABLE), None)
            if victim is not None:
                self.dropped[self._queue[victim].type] += 1
                self.losses.shed[self._queue[victim].type] += 1
                del self._queue[victim]
            elif item.type in DROPPABLE:
                self.dropped[item.type] += 1
                self.losses.shed[item.type] += 1
                return
            else:
                self.overflowed = True
                self.losses.overflowed += 1
                self._wakeup.set()
                return
        self._queue.append(item)
        self._wakeup.set()

    async def get(self) -> str | None:
        """The next message's text (a `dropped` notice first if events were shed); None once overflowed."""
        while not self._queue and not self.overflowed:
            self._wakeup.clear()
            await self._wakeup.wait()
        if self.overflowed:
            return None
        if self.dropped:
            notice = Dropped(counts=dict(self.dropped))
            self.dropped.clear()
            return encode(notice)
        self.delivered += 1
        return self._queue.popleft().text


class EventBus:
    """Stamps stream events with `seq` (per stream and type, from 1 for the daemon's lifetime), serialises each
    once and offers it to every subscriber."""

    def __init__(self) -> None:
        self._subs: set[Subscriber] = set()
        self._taps: list[Callable[[StreamEvent], object]] = []
        self.losses = Shedding()
        self._seq: collections.Counter[tuple[str | None, str]] = collections.Counter()
        self.published: collections.Counter[str] = collections.Counter()

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    @property
    def shed(self) -> collections.Counter[str]:
        return self.losses.shed

    @property
    def overflowed(self) -> int:
        return self.losses.overflowed

    def subscribe(self, maxsize: int, flt: Filter | None = None) -> Subscriber:
        sub = Subscriber(maxsize, flt or Filter(), self.losses)
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self._subs.discard(sub)

    def wants(self, type: str, stream: str) -> bool:
        """Whether any subscriber would receive an event of `type` on `stream` now (work nobody reads is skipped:
        partial transcripts)."""
        probe = Outgoing(type, stream, "")
        return any(sub.filter.matches(probe) and not sub.overflowed for sub in self._subs)

    def tap(self, fn: Callable[[StreamEvent], object]) -> None:
        """Also hand every stamped event to `fn`, on the loop, after the subscribers (the store, alert rules,
        MQTT, metrics). `fn` must not block; an exception in it is logged and does not stop the others."""
        self._taps.append(fn)

    def publish(self, event: StreamEvent) -> StreamEvent:
        """Stamp `event` with its `seq`, serialise it and fan it out. Returns the stamped event."""
        key = (event.stream, event.type)
        self._seq[key] += 1
        stamped = event.model_copy(update={"seq": self._seq[key]})
        self.published[event.type] += 1
        item = Outgoing(event.type, event.stream, encode(stamped))
        for sub in self._subs:
            sub.offer(item)
        for tap in self._taps:
            try:
                tap(stamped)
            except Exception:
                log.exception("%s failed on a %s event", getattr(tap, "__qualname__", tap), event.type)
        return stamped

    def pending(self) -> Iterator[int]:
        return (len(s) for s in self._subs)
