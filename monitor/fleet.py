"""A live, read-only picture of one fleet, for every operator tool (``edgefl status``, a
dashboard).

:class:`FleetView` subscribes to the device status (birth and Last Will, retained), device
telemetry and the aggregator's status (retained) of one fleet; nothing else: it never sees a
model or an update, let alone decodes one (docs/architecture.md, "Operators"). Every message
goes through the typed decoders of edgefl.messages: what fails them is counted by reason and
skipped, never raised, since anything on the broker is untrusted.

The view is a snapshot, plain JSON-able data (:meth:`FleetView.snapshot`), and a change counter
that a caller can wait on (:meth:`FleetView.wait_change`) or be called back from
(:meth:`FleetView.add_listener`).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from edgefl.compression import WireError
from edgefl.config import BrokerConfig, check_name
from edgefl.messages import AggregatorStatus, Status, Telemetry
from edgefl.mqtt import MqttLink
from edgefl.topics import Topics

log = logging.getLogger(__name__)

# Devices tracked at most: only accounts the broker admits can publish on device topics, but a
# view must not grow without bound whatever it is sent; devices beyond this are counted.
MAX_DEVICES = 100_000

Listener = Callable[[], None]


@dataclass
class _Device:
    state: str = "unknown"  # of the latest status: "online" (a birth) or "offline" (a Will)
    birth: Status | None = None  # the latest birth: what the device said of itself
    telemetry: Telemetry | None = None  # the latest report, or the birth's reading
    received_at: float = 0.0  # our clock: when we last heard of it


class FleetView:
    """The retained state of fleet ``fleet`` on the broker, kept up to date while started.

    ``broker`` is how to reach the broker (host, port, TLS, the account: operator tools use
    the broker's read-only ``monitor`` account, see broker/acl.template). ``enrolled`` names
    the devices that should be there (the aggregator's enrolled_devices list): they appear in
    the snapshot even before they ever spoke. Use as a context manager, or ``start()`` /
    ``stop()``; :meth:`start` raises :class:`edgefl.mqtt.BrokerUnavailable` when the broker
    cannot be reached or refuses the account.
    """

    def __init__(
        self, fleet: str, broker: BrokerConfig, *, enrolled: Iterable[str] = ()
    ) -> None:
        self.topics = Topics(fleet)
        self.fleet = fleet
        self._enrolled = frozenset(check_name("device id", d) for d in enrolled)
        self._devices: dict[str, _Device] = {d: _Device() for d in self._enrolled}
        self._aggregator: AggregatorStatus | None = None
        self._aggregator_at = 0.0
        # messages that failed validation (or came on a topic no device can have), by reason
        self.invalid: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._generation = 0
        self._listeners: list[Listener] = []
        # a viewer keeps no session: nothing should queue at the broker for it while it is away
        self.link = MqttLink(
            f"edgefl-{fleet}-monitor",
            dataclasses.replace(broker, session_expiry_s=0),
            clean_start=True,
            on_connect=lambda _reconnect: self._bump(),
        )
        self.link.subscribe(self.topics.all_devices("status"), self._on_status)
        self.link.subscribe(self.topics.all_devices("telemetry"), self._on_telemetry, qos=0)
        self.link.subscribe(self.topics.aggregator_status, self._on_aggregator)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, wait: bool = True) -> FleetView:
        """Connect and subscribe; with ``wait``, return once the broker acknowledged the
        subscriptions (the retained messages are then on their way), or raise why not."""
        self.link.start(wait=wait)
        return self

    def stop(self) -> None:
        self.link.stop()

    def __enter__(self) -> FleetView:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def connected(self) -> bool:
        return self.link.connected.is_set()

    # -- being told of changes ------------------------------------------------------------------

    @property
    def generation(self) -> int:
        """Counts changes (a message taken in, a reconnect); a snapshot is as new as it."""
        with self._lock:
            return self._generation

    def wait_change(self, after: int, timeout: float) -> int:
        """Block until the generation is past ``after`` or ``timeout`` passes; the generation
        then. ``g = view.generation; ...; g = view.wait_change(g, 5.0)`` loops over changes."""
        with self._changed:
            self._changed.wait_for(lambda: self._generation > after, timeout)
            return self._generation

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener()`` after every change, from the MQTT network thread (so it must be
        quick: set an event, queue a redraw); returns a function that removes it. An exception
        in it is logged, never passed on."""
        with self._lock:
            self._listeners.append(listener)

        def remove() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return remove

    def _bump(self) -> None:
        with self._changed:
            self._generation += 1
            self._changed.notify_all()
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener()
            except Exception:
                log.exception("a fleet view listener failed")

    # -- the network thread -----------------------------------------------------------------------

    def _device(self, topic: str, kind: str) -> _Device | None:
        """The entry of the device a message is from, created if new; None (counted) if the
        topic names no device of this fleet or the view is full."""
        parsed = self.topics.parse_device_topic(topic)
        if parsed is None or parsed[1] != kind:
            self.invalid["topic"] += 1
            return None
        device_id = parsed[0]
        entry = self._devices.get(device_id)
        if entry is None:
            if len(self._devices) >= MAX_DEVICES:
                self.invalid["too_many_devices"] += 1
                return None
            entry = self._devices[device_id] = _Device()
        return entry

    def _on_status(self, topic: str, payload: bytes) -> None:
        if not payload:  # a retained status cleared: nothing to show, not an error
            return
        try:
            status = Status.from_payload(payload)
        except WireError as e:
            self._reject("status", topic, e)
            return
        with self._lock:
            entry = self._device(topic, "status")
            if entry is None:
                return
            entry.state, entry.received_at = status.state, time.time()
            if status.state == "online":
                entry.birth = status
            # a birth carries a reading; a newer report is kept over it
            if status.telemetry is not None and (
                entry.telemetry is None or entry.telemetry.ts <= status.telemetry.ts
            ):
                entry.telemetry = status.telemetry
        self._bump()

    def _on_telemetry(self, topic: str, payload: bytes) -> None:
        if not payload:
            return
        try:
            telemetry = Telemetry.from_payload(payload)
        except WireError as e:
            self._reject("telemetry", topic, e)
            return
        with self._lock:
            entry = self._device(topic, "telemetry")
            if entry is None:
                return
            entry.telemetry, entry.received_at = telemetry, time.time()
        self._bump()

    def _on_aggregator(self, topic: str, payload: bytes) -> None:
        if not payload:
            return
        try:
            status = AggregatorStatus.from_payload(payload)
        except WireError as e:
            self._reject("aggregator status", topic, e)
            return
        with self._lock:
            self._aggregator, self._aggregator_at = status, time.time()
        self._bump()

    def _reject(self, what: str, topic: str, e: WireError) -> None:
        with self._lock:
            self.invalid[e.reason] += 1
        log.warning("skipped an invalid %s on %s: %s", what, topic[:200], str(e)[:200])
        self._bump()

    # -- the picture ------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The whole fleet as plain data (json.dumps takes it as it is):

        - ``fleet``, ``taken_at`` (unix time), ``connected`` (to the broker, now);
        - ``aggregator``: its latest retained status (edgefl.messages.AggregatorStatus, every
          field) plus ``received_at``, or None if it never published one;
        - ``devices``: by id, sorted, each with ``state`` ("online", "offline", or "unknown":
          enrolled but never heard of), ``enrolled`` (on the list given, if one was), and
          ``last_seen`` (the newest time the device stamped on its birth or telemetry, its
          clock), ``online_since`` (its birth's time while online), ``received_at`` (ours,
          when this view last heard of it); the fields of its latest birth (agent_version,
          serving, serving_variant, serving_accuracy, capabilities ...; empty if the view saw
          none) and ``telemetry`` (its latest reading, every field of
          edgefl.messages.Telemetry, or None); ``training``: what the aggregator's status says
          of it ({"rounds": contributed to, "assigned", "rejected": updates refused}), None
          if it does not list it (it lists MAX_STATUS_DEVICES at most);
        - ``counts``: devices online, offline, unknown;
        - ``invalid``: messages skipped as invalid, by reason.
        """
        with self._lock:
            agg = None
            known = dict(self._devices)
            if self._aggregator is not None:
                agg = asdict(self._aggregator) | {"received_at": self._aggregator_at}
                # devices the aggregator knows of but this view never heard from (offline
                # since before it started, say) are shown too, as unknown
                for device_id in (*self._aggregator.devices, *self._aggregator.missing):
                    known.setdefault(device_id, _Device())
            figures = agg["devices"] if agg else {}
            devices = {
                d: self._describe(d, e) | {"training": figures.get(d)}
                for d, e in sorted(known.items())
            }
            invalid = dict(self.invalid)
        counts = Counter(d["state"] for d in devices.values())
        return {
            "fleet": self.fleet,
            "taken_at": time.time(),
            "connected": self.connected,
            "aggregator": agg,
            "devices": devices,
            "counts": {s: counts.get(s, 0) for s in ("online", "offline", "unknown")},
            "invalid": invalid,
        }

    def _describe(self, device_id: str, entry: _Device) -> dict[str, Any]:
        birth, telemetry = entry.birth, entry.telemetry
        out: dict[str, Any] = {
            "state": entry.state,
            "enrolled": device_id in self._enrolled if self._enrolled else None,
        }
        # the Will is a bare "offline": what the device said of itself comes from its last
        # birth, if this view saw one (a device offline since before the view started: none)
        fields = asdict(birth) if birth is not None else asdict(Status("offline", ts=0.0))
        out |= {k: v for k, v in fields.items() if k not in ("state", "telemetry", "ts")}
        out["online_since"] = birth.ts if birth is not None and entry.state == "online" else None
        stamps = [t for t in (birth and birth.ts, telemetry and telemetry.ts) if t]
        out["last_seen"] = max(stamps) if stamps else None
        out["telemetry"] = asdict(telemetry) if telemetry is not None else None
        out["received_at"] = entry.received_at or None
        return out
