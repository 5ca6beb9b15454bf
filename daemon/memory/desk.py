"""The memory desk: what clients ask of the daemon's memory besides questions: `history.search`, `timeline` and
the alert rules (`alert.list`, `alert.add`, `alert.remove`). It receives the history store (None without one) and
the alert engine; rules added or removed here are kept in the store, so they survive a restart."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ..delivery.events import AlertAdded, AlertRemoved, AlertRules, HistoryResults, TimelineData
from ..delivery.protocol import AlertAdd, AlertList, AlertRemove, HistorySearch, ProtocolError, Timeline
from ..delivery.wire import ErrorCode
from .alerts import AlertEngine, RuleLimit
from .store import RuleChange, Store


class MemoryDesk:
    def __init__(self, store: Store | None, alerts: AlertEngine, changed: Callable[[], None] | None = None) -> None:
        """`changed()` is called after a rule was added or removed (MQTT re-announces its entities)."""
        self.store, self.alerts, self.changed = store, alerts, changed

    async def search(self, msg: HistorySearch) -> HistoryResults:
        if self.store is None:
            raise ProtocolError(
                ErrorCode.HISTORY_DISABLED, "this daemon keeps no history (store.enabled = false)", msg.id
            )
        hits, mode = await asyncio.to_thread(
            self.store.search,
            msg.query,
            since=msg.since,
            until=msg.until,
            streams=msg.streams,
            limit=msg.limit,
            mode=msg.mode,
        )
        return HistoryResults(re=msg.id, hits=hits, mode=mode)

    async def timeline(self, msg: Timeline) -> TimelineData:
        if self.store is None:
            raise ProtocolError(
                ErrorCode.HISTORY_DISABLED, "this daemon keeps no history (store.enabled = false)", msg.id
            )
        streams = await asyncio.to_thread(self.store.timeline, msg.since, msg.until, msg.streams, msg.buckets)
        return TimelineData(
            re=msg.id,
            since=msg.since,
            until=msg.until,
            bucket_s=round((msg.until - msg.since) / msg.buckets, 3),
            streams=streams,
        )

    def rules(self, msg: AlertList) -> AlertRules:
        return AlertRules(re=msg.id, rules=self.alerts.info())

    def add(self, msg: AlertAdd) -> AlertAdded:
        rule = msg.rule
        if self.alerts.source(rule.name) == "config":
            raise ProtocolError(
                ErrorCode.RULE_EXISTS, f"{rule.name!r} is a rule of the config file; change it there", msg.id
            )
        try:
            self.alerts.add(rule)
        except RuleLimit:
            raise ProtocolError(
                ErrorCode.RULE_LIMIT,
                f"this daemon keeps at most {self.alerts.max_runtime} rules added by clients "
                "(alerts.max_runtime_rules): remove one with alert.remove first",
                msg.id,
            ) from None
        if self.store is not None:
            self.store.put(RuleChange(rule, rule.name))
        if self.changed is not None:
            self.changed()
        return AlertAdded(re=msg.id, name=rule.name)

    def remove(self, msg: AlertRemove) -> AlertRemoved:
        source = self.alerts.source(msg.name)
        if source != "runtime":
            why = "a rule of the config file; remove it there" if source else "no such rule"
            raise ProtocolError(ErrorCode.UNKNOWN_RULE, f"{msg.name!r}: {why}", msg.id)
        self.alerts.remove(msg.name)
        if self.store is not None:
            self.store.put(RuleChange(None, msg.name))
        if self.changed is not None:
            self.changed()
        return AlertRemoved(re=msg.id, name=msg.name)
