"""One MQTT 5 connection with the lifecycle both roles need (paho-mqtt 2.x underneath).

- A persistent session (``clean_start=False`` plus a session expiry), so QoS 1 messages sent
  while we were away are delivered when we come back.
- Reconnects by itself, with backoff, after losing the broker; subscriptions are renewed on every
  (re)connect, which also covers a broker that restarted without its persistence file.
- A Last Will, for the birth/death scheme of docs/architecture.md.
- Handlers run in the network thread; an exception in one is logged and counted, never allowed to
  stop the connection: what arrives over MQTT is untrusted and may trip anything.
- Counts payload bytes published and received, per topic kind, for the benchmarks.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgefl.config import BrokerConfig

log = logging.getLogger(__name__)

Handler = Callable[[str, bytes], None]
DeferredHandler = Callable[[str, bytes, Callable[[], None]], None]


class BrokerUnavailable(ConnectionError):
    """The broker could not be reached, or refused us; the message says which and what to check."""


@dataclass
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def _kind(topic: str) -> str:
    """The last level of a topic ("update", "task", "global" ...), for byte accounting; the
    chunks of a payload (``{topic}/blob/{id}/{i}``, edgefl/chunking.py) count as their topic's."""
    levels = topic.rsplit("/", 4)
    if len(levels) == 5 and levels[2] == "blob":
        return levels[1]
    return levels[-1]


def _no_delay(_client: paho.Client, _userdata: object, sock: object) -> None:
    # paho leaves Nagle's algorithm on; small packets (PUBACKs, tasks) would then wait up to
    # 40 ms for the peer's delayed ACK
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    elif hasattr(sock, "setsockopt"):  # an SSL socket wraps a TCP one
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# stands in the pending subscriptions while the SUBSCRIBE made on connect is being sent
SENDING = -1
# a timed publish not acknowledged within this long is forgotten (it went over a lost session)
ACK_WATCH_S = 600.0

AckedCallback = Callable[[float], None]


class MqttLink:
    """A connection that stays up. Use as a context manager, or ``start()`` / ``stop()``."""

    def __init__(
        self,
        client_id: str,
        broker: BrokerConfig,
        *,
        will: Will | None = None,
        on_connect: Callable[[bool], None] | None = None,
        clean_start: bool = False,
        max_inflight: int = 100,
        manual_ack: bool = False,
    ) -> None:
        # An account is one connection: broker/ makes Mosquitto take the username as the client
        # id (so no account can take over another's connection and session); asking for the
        # same here keeps logs and brokers without that setting in step. ``client_id`` names
        # anonymous connections only.
        self.client_id = broker.username or client_id
        self.broker = broker
        self._on_connect_cb = on_connect
        self._clean_start = clean_start
        self._subs: dict[str, int] = {}
        self._lock = threading.Lock()
        self.connected = threading.Event()
        # SUBSCRIBEs sent on this connection and not yet acknowledged (by packet id), and acks
        # that came before their id was recorded; start(wait=True) waits for both to settle
        self._subs_pending: set[int] = set()
        self._subs_early: set[int] = set()
        self._subs_settled = threading.Condition(self._lock)
        # timed publishes (publish(on_acked=...)) waiting for their PUBACK, by packet id; acks
        # that came while a timed publish had not yet recorded its id; how many are recording
        self._timed: dict[int, tuple[float, int, AckedCallback]] = {}
        self._timed_early: dict[int, float] = {}
        self._timing = 0
        # set once connected, or once refused for good (bad credentials): waiting longer for
        # a connection that cannot come only delays the error
        self._first_result: threading.Event = threading.Event()
        self._refused: str | None = None
        self.bytes_out: Counter[str] = Counter()
        self.bytes_in: Counter[str] = Counter()
        self.handler_errors = 0
        self.connects = 0
        self.max_packet_size: int | None = None
        self.session_present = False

        self.manual_ack = manual_ack
        c = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=paho.MQTTv5,
            reconnect_on_failure=True,
            manual_ack=manual_ack,
        )
        if broker.username is not None:
            c.username_pw_set(broker.username, broker.password)
        if broker.tls_ca:
            c.tls_set(ca_certs=broker.tls_ca, cert_reqs=ssl.CERT_REQUIRED)
        if will is not None:
            c.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        c.reconnect_delay_set(min_delay=1, max_delay=30)
        c.max_inflight_messages_set(max_inflight)
        c.max_queued_messages_set(0)  # queue without bound while offline; QoS 1 must not be lost
        c.on_socket_open = _no_delay
        c.on_connect = self._handle_connect
        c.on_subscribe = self._handle_subscribe
        c.on_disconnect = self._handle_disconnect
        c.on_publish = self._handle_acked
        self._client = c

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, wait: bool = True) -> MqttLink:
        """Connect in the background; with ``wait``, return once connected and subscribed (the
        broker acknowledged every subscription made before), or raise why not."""
        self._first_result.clear()  # a link started again waits for its new connection
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.broker.session_expiry_s
        self._client.connect_async(
            self.broker.host,
            self.broker.port,
            keepalive=self.broker.keepalive_s,
            clean_start=self._clean_start,
            properties=props,
        )
        self._client.loop_start()
        if wait:
            self.wait_connected(self.broker.connect_timeout_s)
            self.wait_subscribed(self.broker.connect_timeout_s)
        return self

    def wait_subscribed(self, timeout: float) -> bool:
        """Wait until the broker acknowledged every subscription sent so far: a message
        published to our topics after that reaches us. False if it did not within ``timeout``."""
        with self._subs_settled:
            return self._subs_settled.wait_for(lambda: not self._subs_pending, timeout)

    def _sent_subscribe(self, result: tuple[int, int | None]) -> None:
        rc, mid = result
        if rc != paho.MQTT_ERR_SUCCESS or mid is None:
            return  # not sent (the link dropped): it is sent again on the next connect
        with self._lock:
            if mid in self._subs_early:
                self._subs_early.discard(mid)
            else:
                self._subs_pending.add(mid)

    def _handle_subscribe(self, _client, _userdata, mid, _reason_codes, _properties) -> None:
        with self._subs_settled:
            if mid in self._subs_pending:
                self._subs_pending.discard(mid)
                self._subs_settled.notify_all()
            else:
                self._subs_early.add(mid)

    def wait_connected(self, timeout: float) -> None:
        self._first_result.wait(timeout)
        if self.connected.is_set():
            return
        where = f"{self.broker.host}:{self.broker.port}"
        if self._refused:
            self.stop()
            raise BrokerUnavailable(
                f"broker at {where} refused {self.client_id!r}: {self._refused}. "
                "Check the username and password in the [broker] section of the config."
            )
        self.stop()  # do not leave a thread retrying behind the caller's back
        hint = (
            f"; or the broker's certificate did not verify against {self.broker.tls_ca} (wrong "
            "CA, or a certificate that does not name this host), or that port is not TLS"
            if self.broker.tls_ca
            else ""
        )
        raise BrokerUnavailable(
            f"no connection to the broker at {where} within {timeout:.0f} s; is it running, and "
            f"are host and port right? (`edgefl broker` starts one){hint}"
        )

    def stop(self) -> None:
        """Disconnect cleanly (the broker does not publish the Will) and end the network thread."""
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()
            self.connected.clear()

    def abort(self) -> None:
        """Drop the TCP connection without an MQTT DISCONNECT, as a crash or a power cut would.

        The broker then publishes our Will. Used to inject faults in tests and benchmarks.
        """
        self._client.loop_stop()
        sock = self._client.socket()
        if sock is not None:
            sock.close()
        self.connected.clear()

    def __enter__(self) -> MqttLink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def packet_limit(self) -> int | None:
        """The largest MQTT packet this link may send: the smaller of ``[broker]
        max_packet_bytes`` and what the broker announced in its CONNACK; None if neither says."""
        known = [n for n in (self.broker.max_packet_bytes, self.max_packet_size) if n]
        return min(known) if known else None

    # -- traffic ------------------------------------------------------------------------------

    def subscribe(
        self,
        topic_filter: str,
        handler: Handler | DeferredHandler,
        qos: int = 1,
        *,
        defer_ack: bool = False,
    ) -> None:
        """Route messages matching ``topic_filter`` to ``handler(topic, payload)``.

        With ``defer_ack`` (on a link made with ``manual_ack=True``) the handler is called as
        ``handler(topic, payload, ack)`` and the broker gets the QoS 1 acknowledgement only when
        the handler calls ``ack()``: until then the broker keeps the message, and sends it again
        to our session if we die, which is how an accepted update survives a crash.
        """
        if defer_ack and not self.manual_ack:
            raise ValueError("defer_ack needs a link made with manual_ack=True")

        def callback(_client: paho.Client, _userdata: object, msg: paho.MQTTMessage) -> None:
            self._dispatch(handler, msg, defer_ack)

        self._client.message_callback_add(topic_filter, callback)
        with self._lock:
            self._subs[topic_filter] = qos
            live = self.connected.is_set()
        if live:
            self._sent_subscribe(self._client.subscribe(topic_filter, qos=qos))

    def unsubscribe(self, topic_filter: str) -> None:
        with self._lock:
            self._subs.pop(topic_filter, None)
            live = self.connected.is_set()
        self._client.message_callback_remove(topic_filter)
        if live:
            self._client.unsubscribe(topic_filter)

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        on_acked: AckedCallback | None = None,
    ) -> paho.MQTTMessageInfo:
        """Queue a message; QoS 1 messages are kept and sent once the link is back if it is down.

        ``on_acked(seconds)`` (QoS 1) is called from the network thread with the time from now
        to the broker's PUBACK, if that came on the same connection: a device's uplink estimate.
        It costs a dictionary entry, not a thread that waits."""
        sent_at = time.monotonic()
        if on_acked is not None:
            with self._lock:
                self._timing += 1
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            log.warning(
                "%s: publish to %s failed: %s", self.client_id, topic, paho.error_string(info.rc)
            )
        self.bytes_out[_kind(topic)] += len(payload)
        if on_acked is not None:
            self._watch_ack(info, sent_at, on_acked)
        return info

    def _watch_ack(
        self, info: paho.MQTTMessageInfo, sent_at: float, on_acked: AckedCallback
    ) -> None:
        with self._lock:
            self._timing -= 1
            acked_at = self._timed_early.pop(info.mid, None)
            if not self._timing:
                self._timed_early.clear()
            if acked_at is None and info.rc == paho.MQTT_ERR_SUCCESS:
                # not sent now (the link is down): it goes later, untimed
                stale = sent_at - ACK_WATCH_S
                for mid in [m for m, (t, _, _) in self._timed.items() if t < stale]:
                    del self._timed[mid]
                self._timed[info.mid] = (sent_at, self.connects, on_acked)
        if acked_at is not None:
            self._call_acked(on_acked, acked_at - sent_at)

    def _handle_acked(self, _client, _userdata, mid, reason_code, _properties) -> None:
        now = time.monotonic()
        with self._lock:
            entry = self._timed.pop(mid, None)
            if entry is None:
                if self._timing:  # its publish() may not have recorded the id yet
                    self._timed_early[mid] = now
                return
        sent_at, generation, on_acked = entry
        if generation == self.connects and not reason_code.is_failure:
            self._call_acked(on_acked, now - sent_at)

    def _call_acked(self, on_acked: AckedCallback, seconds: float) -> None:
        try:
            on_acked(seconds)
        except Exception:
            self.handler_errors += 1
            log.exception("%s: on_acked callback failed", self.client_id)

    def _dispatch(self, handler, msg: paho.MQTTMessage, defer_ack: bool = False) -> None:
        client, mid, qos, generation = self._client, msg.mid, msg.qos, self.connects

        def ack() -> None:
            # a packet id names a message only within one connection: after a reconnect the
            # broker sends the unacknowledged message again, and that copy gets the ack
            if qos > 0 and self.connects == generation and self.connected.is_set():
                client.ack(mid, qos)

        try:
            self.bytes_in[_kind(msg.topic)] += len(msg.payload)
            if defer_ack:
                handler(msg.topic, msg.payload, ack)
                return
            handler(msg.topic, msg.payload)
        except Exception:
            self.handler_errors += 1
            log.exception(
                "%s: handler for %s failed on a %d-byte message; message dropped",
                self.client_id, msg.topic[:200], len(msg.payload),
            )
        if self.manual_ack:
            ack()

    # -- paho callbacks (network thread) ---------------------------------------------------------

    def _handle_connect(self, client, _userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._refused = str(reason_code)
            log.error("%s: broker refused the connection: %s", self.client_id, reason_code)
            # bad credentials / not authorised / bad auth: at start-up, retrying with the same
            # credentials cannot succeed, so stop hammering the broker. Refused after we were
            # in, it is a quarantine (edgefl/dynsec.py) or a changed account: keep trying, with
            # paho's backoff (up to 30 s), so that a device an operator re-admits comes back
            if reason_code.value in (0x86, 0x87, 0x8C) and self.connects == 0:
                threading.Thread(target=client.disconnect, daemon=True).start()
                self._first_result.set()
            return
        self.connects += 1
        # whether the broker kept our session (subscriptions, unacknowledged messages)
        self.session_present = bool(flags.session_present)
        # the broker's packet limit (MQTT 5 CONNACK); paho does not enforce it for us
        self.max_packet_size = getattr(properties, "MaximumPacketSize", None)
        with self._lock:
            subs = list(self._subs.items())
            # packet ids name messages within one connection: what was pending is resent below
            self._subs_pending.clear()
            self._subs_early.clear()
            self._timed.clear()  # resent on this connection, or lost with the session: untimed
            if subs:  # until the SUBSCRIBE below is sent and its id recorded
                self._subs_pending.add(SENDING)
            # set under the lock: a subscribe() racing with us either is in `subs` or sees it set
            self.connected.set()
            self._first_result.set()
        if subs:
            self._sent_subscribe(client.subscribe([(f, q) for f, q in subs]))
            with self._subs_settled:
                self._subs_pending.discard(SENDING)
                self._subs_settled.notify_all()
        if self.connects > 1:
            log.info("%s: reconnected (session present: %s)", self.client_id, flags.session_present)
        if self._on_connect_cb is not None:
            try:
                self._on_connect_cb(self.connects > 1)
            except Exception:
                log.exception("%s: on_connect callback failed", self.client_id)

    def _handle_disconnect(self, _client, _userdata, _flags, reason_code, _properties) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        if was and reason_code.value != 0:
            log.warning("%s: lost the broker (%s); reconnecting", self.client_id, reason_code)
