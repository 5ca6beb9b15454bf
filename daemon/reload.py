"""What a configuration reload (SIGHUP) changes: the difference between the config in effect and a newly read one,
split into what applies live and what waits for a restart.

Live: streams (added, removed, changed: only a changed stream restarts its pipeline, every other stream keeps its
windows), alert rules, the MQTT bridge, the store's retention limits and the log level. Everything else (the
server's address and limits, the models, the ASR, VAD and windows settings every stream shares, the store's path,
the endpoints) is read once at start: a reload that changes it keeps the old value and says which keys need a
restart.

Pure functions of two `DaemonConfig`s: the service does the applying.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pydantic import ValidationError

from .config import ConfigError, DaemonConfig, format_errors

# store keys a reload applies (the retention the writer enforces); the others (path, queue, ...) need a restart
RETENTION_KEYS = ("retention_days", "max_mb", "clip_retention_days")
# sections applied as a whole: streams by name, the rest by replacing the part that uses them
LIVE_SECTIONS = ("streams", "alerts", "mqtt", "log")


@dataclasses.dataclass(frozen=True)
class ReloadPlan:
    """Stream names added, removed and changed (in the old order, then the new), and which live parts differ.
    `restart`: dotted keys (or sections) that differ but apply only on restart."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    rules: bool = False
    mqtt: bool = False
    retention: bool = False
    log_level: bool = False
    restart: tuple[str, ...] = ()

    @property
    def live(self) -> list[str]:
        """What applies now, for the log and `/healthz`, e.g. ["stream kitchen added", "alert rules"]."""
        out = [f"stream {n} added" for n in self.added]
        out += [f"stream {n} removed" for n in self.removed]
        out += [f"stream {n} changed" for n in self.changed]
        out += [what for what, yes in (("alert rules", self.rules), ("mqtt", self.mqtt)) if yes]
        out += [what for what, yes in (("store retention", self.retention), ("log level", self.log_level)) if yes]
        return out

    @property
    def empty(self) -> bool:
        return not self.live and not self.restart


def _differences(old: Any, new: Any, prefix: str) -> list[str]:
    """Dotted keys whose values differ between two dumps (one level into sections: `asr.beam_size`)."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [f"{prefix}.{k}" for k in keys if old.get(k) != new.get(k)]
    return [prefix] if old != new else []


def plan(old: DaemonConfig, new: DaemonConfig) -> ReloadPlan:
    """What reloading from `old` to `new` does."""
    before = {s.name: s for s in old.streams}
    after = {s.name: s for s in new.streams}
    o, n = old.model_dump(), new.model_dump()
    restart: list[str] = []
    for section in o:
        if section in LIVE_SECTIONS:
            continue
        if section == "store":
            restart += [k for k in _differences(o[section], n[section], section) if k[6:] not in RETENTION_KEYS]
            continue
        restart.extend(_differences(o[section], n[section], section))
    for key in ("tick_s", "max_runtime_rules"):
        if o["alerts"][key] != n["alerts"][key]:
            restart.append(f"alerts.{key}")
    return ReloadPlan(
        added=tuple(name for name in after if name not in before),
        removed=tuple(name for name in before if name not in after),
        changed=tuple(name for name in before if name in after and before[name] != after[name]),
        rules=old.alerts.rules != new.alerts.rules,
        mqtt=old.mqtt != new.mqtt,
        retention=any(getattr(old.store, k) != getattr(new.store, k) for k in RETENTION_KEYS),
        log_level=old.log.level != new.log.level,
        restart=tuple(restart),
    )


def in_effect(old: DaemonConfig, new: DaemonConfig) -> DaemonConfig:
    """The config the daemon runs with after the reload: `new`'s live parts on `old`'s restart-only ones.

    Raises `ConfigError` when that mix breaks a cross-check (a new stream named like the running Wyoming stream,
    say): the new config is valid only with restart-only changes of its own, so it waits for a restart."""
    store = old.store.model_copy(update={k: getattr(new.store, k) for k in RETENTION_KEYS})
    alerts = old.alerts.model_copy(update={"rules": new.alerts.rules})
    mixed = old.model_copy(
        update={"streams": new.streams, "alerts": alerts, "mqtt": new.mqtt, "log": new.log, "store": store}
    )
    try:
        return DaemonConfig.model_validate(mixed.model_dump())
    except ValidationError as e:
        raise ConfigError(
            f"the new config's live parts do not fit the running daemon's other settings (restart to apply it):\n"
            f"  {format_errors(e)}"
        ) from None
