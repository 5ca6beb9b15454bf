"""MQTT out (paho-mqtt) with Home Assistant discovery.

Topics (`mqtt.prefix`, default `ltu`):

    <prefix>/availability                 online / offline, retained; `offline` is also the last will
    <prefix>/<stream>/transcript          each final transcript (JSON, `event_type: transcript`)
    <prefix>/<stream>/scene               each scene description (JSON, retained: the last one)
    <prefix>/<stream>/level               RMS / peak dBFS, at most every `mqtt.level_every_s` (retained)
    <prefix>/<stream>/digest              each digest (JSON)
    <prefix>/alerts/<rule>                each alert and its clearing (JSON)
    <prefix>/alerts/<rule>/state          ON while the rule has an active alert on any stream, else OFF (retained;
                                          republished for every rule on each connect, so a state a crash left
                                          ON is corrected at start; cleared when the rule is removed)

Home Assistant discovery (`<discovery_prefix>/<component>/<node>/<object>/config`, retained): a device per
stream with a sensor for the last scene, a sensor for the level and an event entity for transcripts; a device
for the daemon with a binary_sensor per alert rule. Announced on every connect and whenever Home Assistant says
`online` on `<discovery_prefix>/status`; a removed rule's entity is removed (empty retained config).

paho's network thread owns the connection and reconnects with backoff. The event loop publishes; while the broker
is away, messages wait in a bounded queue of `mqtt.queue` (overflow policy: the oldest is dropped and counted)
and go out in order on reconnect.
"""

from __future__ import annotations

import collections
import json
import logging
import ssl
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from ..config import MqttConfig
from .events import AlertClearedEvent, AlertEvent, DigestEvent, FinalEvent, LevelEvent, RuleInfo, SceneEvent

log = logging.getLogger(__name__)


class MqttBridge:
    def __init__(
        self, config: MqttConfig, streams: list[str], rules: Callable[[], list[RuleInfo]], version: str
    ) -> None:
        """`streams`: the configured stream names; `rules()`: the alert rules now (for discovery)."""
        self.config, self.streams, self.rules, self.version = config, streams, rules, version
        p = config.prefix
        self.availability = f"{p}/availability"
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=config.client_id, clean_session=True)
        self._client.will_set(self.availability, "offline", qos=1, retain=True)
        self._client.reconnect_delay_set(1, 30)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        url = urlparse(config.url)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or (8883 if url.scheme == "mqtts" else 1883)
        if config.username:
            self._client.username_pw_set(config.username, config.resolved_password())
        if url.scheme == "mqtts":
            self._client.tls_set(
                ca_certs=str(config.tls_ca) if config.tls_ca else None,
                cert_reqs=ssl.CERT_NONE if config.tls_insecure else ssl.CERT_REQUIRED,
            )
            self._client.tls_insecure_set(config.tls_insecure)
        self._lock = threading.Lock()
        self._pending: collections.deque[tuple[str, str, bool, int]] = collections.deque()
        self._connected = False
        self._stopping = False
        self._rule_names = {info.rule.name for info in rules()}
        self._announced: set[str] = set()  # discovery topics announced (a gone one is removed)
        self._active: dict[str, set[str]] = {}  # rule → streams with an active alert
        self._level_at: dict[str, float] = {}
        self.published = 0
        self.dropped = 0
        self.connects = 0

    @property
    def connected(self) -> bool:
        return self._connected

    # --- lifecycle ---

    def start(self) -> None:
        log.info("MQTT: connecting to %s:%d as %s", self.host, self.port, self.config.client_id)
        self._client.connect_async(self.host, self.port, keepalive=self.config.keepalive_s)
        self._client.loop_start()

    def stop(self, timeout: float = 3.0) -> None:
        """Say `offline` (retained) if connected, then disconnect."""
        self._stopping = True
        if self._connected:
            info = self._client.publish(self.availability, "offline", qos=1, retain=True)
            info.wait_for_publish(timeout)
        self._client.disconnect()
        self._client.loop_stop()

    # --- paho's thread ---

    def _on_connect(
        self, client: paho.Client, _userdata: object, _flags: object, reason: Any, _props: object = None
    ) -> None:
        if reason.is_failure:
            log.warning("MQTT: %s:%d refused the connection: %s", self.host, self.port, reason)
            return
        self.connects += 1
        log.info("MQTT: connected to %s:%d", self.host, self.port)
        client.subscribe(f"{self.config.discovery_prefix}/status", qos=1)
        client.publish(self.availability, "online", qos=1, retain=True)
        for info in self.rules():  # what a crash left retained (an alert ON that never cleared) is corrected now
            state = "ON" if info.active else "OFF"
            client.publish(f"{self.config.prefix}/alerts/{info.rule.name}/state", state, qos=1, retain=True)
        if self.config.discovery:
            self._announce()
        with self._lock:
            self._connected = True
            waiting, self._pending = self._pending, collections.deque()
        for topic, payload, retain, qos in waiting:
            self._send(topic, payload, retain, qos)
        if waiting:
            log.info("MQTT: sent %d messages queued while the broker was away", len(waiting))

    def _on_disconnect(
        self, _client: paho.Client, _userdata: object, _flags: object, reason: Any, _props: object = None
    ) -> None:
        with self._lock:
            self._connected = False
        if self._stopping:
            log.info("MQTT: disconnected from %s:%d", self.host, self.port)
        else:
            log.warning("MQTT: disconnected from %s:%d (%s); reconnecting with backoff", self.host, self.port, reason)

    def _on_message(self, _client: paho.Client, _userdata: object, msg: paho.MQTTMessage) -> None:
        if msg.topic == f"{self.config.discovery_prefix}/status" and msg.payload == b"online":
            log.info("MQTT: Home Assistant is back: announcing again")
            self._announce()

    # --- publishing ---

    def publish(self, topic: str, payload: Any, *, retain: bool = False, qos: int = 1) -> None:
        """Publish now if connected, else queue (bounded; the oldest goes first when full)."""
        text = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
        with self._lock:
            if not self._connected:
                if len(self._pending) >= self.config.queue:
                    self._pending.popleft()
                    self.dropped += 1
                self._pending.append((topic, text, retain, qos))
                return
        self._send(topic, text, retain, qos)

    def _send(self, topic: str, text: str, retain: bool, qos: int) -> None:
        info = self._client.publish(topic, text, qos=qos, retain=retain)
        if info.rc == paho.MQTT_ERR_SUCCESS:
            self.published += 1
        else:  # lost the connection in between: keep it for the reconnect
            with self._lock:
                self._connected = False
                self._pending.appendleft((topic, text, retain, qos))

    def on_event(self, event: object) -> None:
        """A bus tap: the events MQTT carries, to their topics."""
        p = self.config.prefix
        if isinstance(event, FinalEvent):
            if event.text:
                self.publish(f"{p}/{event.stream}/transcript", {"event_type": "transcript", **_fields(event)})
        elif isinstance(event, SceneEvent):
            self.publish(
                f"{p}/{event.stream}/scene",
                {"text": event.text, "window": event.window.id, "time": event.time},
                retain=True,
            )
        elif isinstance(event, LevelEvent):
            if event.time - self._level_at.get(event.stream, 0.0) >= self.config.level_every_s:
                self._level_at[event.stream] = event.time
                self.publish(
                    f"{p}/{event.stream}/level",
                    {"rms_dbfs": event.rms_dbfs, "peak_dbfs": event.peak_dbfs, "time": event.time},
                    retain=True,
                    qos=0,
                )
        elif isinstance(event, DigestEvent):
            self.publish(f"{p}/{event.stream}/digest", _fields(event))
        elif isinstance(event, AlertEvent):
            self._active.setdefault(event.rule, set()).add(event.stream)
            self.publish(f"{p}/alerts/{event.rule}", {"state": "ON", **_fields(event)})
            self.publish(f"{p}/alerts/{event.rule}/state", "ON", retain=True)
        elif isinstance(event, AlertClearedEvent):
            streams = self._active.setdefault(event.rule, set())
            streams.discard(event.stream)
            self.publish(f"{p}/alerts/{event.rule}", {"state": "OFF", **_fields(event)})
            if not streams:
                self.publish(f"{p}/alerts/{event.rule}/state", "OFF", retain=True)

    def rules_changed(self) -> None:
        """Alert rules were added or removed: announce the new ones, remove the entities and the retained states
        of the gone ones."""
        names = {info.rule.name for info in self.rules()}
        for gone in sorted(self._rule_names - names):
            self._active.pop(gone, None)
            self.publish(f"{self.config.prefix}/alerts/{gone}/state", "", retain=True)  # empty: no retained state
        for new in sorted(names - self._rule_names):  # a state from the start, not "unknown" until it first fires
            self.publish(f"{self.config.prefix}/alerts/{new}/state", "OFF", retain=True)
        self._rule_names = names
        if self.config.discovery and self._connected:
            self._announce()

    def set_streams(self, streams: list[str]) -> None:
        """The configured streams changed (a reload): announce the new ones' entities, remove the gone ones'."""
        self.streams = list(streams)
        if self.config.discovery and self._connected:
            self._announce()

    # --- Home Assistant discovery ---

    def discovery(self) -> dict[str, dict[str, Any]]:
        """Every discovery config this daemon announces now: topic → payload."""
        d, p, cid = self.config.discovery_prefix, self.config.prefix, _slug(self.config.client_id)
        avail = {
            "availability_topic": self.availability,
            "payload_available": "online",
            "payload_not_available": "offline",
        }
        out: dict[str, dict[str, Any]] = {}
        for s in self.streams:
            device = {
                "identifiers": [f"{cid}_{s}"],
                "name": f"ltu {s}",
                "manufacturer": "ltu-daemon",
                "model": "LTU-AS audio stream",
                "sw_version": self.version,
                "via_device": cid,
            }
            node = f"{cid}_{s}"
            out[f"{d}/sensor/{node}/scene/config"] = {
                "name": "Scene",
                "unique_id": f"{node}_scene",
                "state_topic": f"{p}/{s}/scene",
                "value_template": "{{ value_json.text[:255] }}",
                "json_attributes_topic": f"{p}/{s}/scene",
                "icon": "mdi:waveform",
                "device": device,
                **avail,
            }
            out[f"{d}/sensor/{node}/level/config"] = {
                "name": "Level",
                "unique_id": f"{node}_level",
                "state_topic": f"{p}/{s}/level",
                "value_template": "{{ value_json.rms_dbfs }}",
                "unit_of_measurement": "dB",
                "state_class": "measurement",
                "icon": "mdi:volume-high",
                "device": device,
                **avail,
            }
            out[f"{d}/event/{node}/transcript/config"] = {
                "name": "Transcript",
                "unique_id": f"{node}_transcript",
                "state_topic": f"{p}/{s}/transcript",
                "event_types": ["transcript"],
                "icon": "mdi:account-voice",
                "device": device,
                **avail,
            }
        daemon = {
            "identifiers": [cid],
            "name": "ltu-daemon",
            "manufacturer": "ltu-daemon",
            "model": "LTU-AS audio understanding",
            "sw_version": self.version,
        }
        for info in self.rules():
            name = info.rule.name
            out[f"{d}/binary_sensor/{cid}/alert_{_slug(name)}/config"] = {
                "name": f"Alert {name}",
                "unique_id": f"{cid}_alert_{_slug(name)}",
                "state_topic": f"{p}/alerts/{name}/state",
                "payload_on": "ON",
                "payload_off": "OFF",
                "json_attributes_topic": f"{p}/alerts/{name}",
                "icon": "mdi:bell-alert",
                "device": daemon,
                **avail,
            }
        return out

    def _announce(self) -> None:
        configs = self.discovery()
        for topic, payload in configs.items():
            self._client.publish(topic, json.dumps(payload, separators=(",", ":")), qos=1, retain=True)
        for gone in sorted(self._announced - set(configs)):
            self._client.publish(gone, "", qos=1, retain=True)  # an empty retained config removes the entity
        self._announced = set(configs)
        log.info("MQTT: announced %d Home Assistant entities", len(configs))

    def stats(self) -> dict[str, Any]:
        return {
            "connected": self._connected,
            "queue": len(self._pending),
            "published": self.published,
            "dropped": self.dropped,
            "connects": self.connects,
            "broker": f"{self.host}:{self.port}",
        }


def _fields(event: Any) -> dict[str, Any]:
    d = event.model_dump(mode="json")
    d.pop("type", None)
    d.pop("seq", None)
    return dict(d)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in text)
