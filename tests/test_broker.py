"""The broker tier against a real Mosquitto: accounts, ACL, limits, reload, persistence.

Negative checks ("X does not receive Y") use a sentinel rather than a sleep: after the message
that must not arrive, a message that must arrive is sent on the same path; once the sentinel is
in, the broker has already dealt with the first one.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from broker import (
    Account,
    MosquittoSettings,
    PrivateBroker,
    add_account,
    enroll,
    free_port,
    hash_password,
    mqtt_login_ok,
    prepare,
    read_password_file,
    render_acl,
    render_config,
    serve,
    verify_password,
    write_password_file,
)
from broker.limits import DEFAULT_LIMITS, MIN_PACKET_BYTES, limits_for_model
from edgefl.config import BrokerConfig, ConfigError
from tests.conftest import wait_until

pytestmark = pytest.mark.broker

FLEET = "testfleet"
TIMEOUT = 5.0
NOT_AUTHORIZED = 0x87
PACKET_TOO_LARGE = 0x95


def topic(rest: str) -> str:
    return f"edgefl/{FLEET}/{rest}"


class Peer:
    """One MQTT 5 client with what a test needs to wait on."""

    _count = 0

    def __init__(self, config: BrokerConfig, name: str = "peer") -> None:
        Peer._count += 1
        self.config = config
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"{name}-{os.getpid()}-{Peer._count}",
            protocol=mqtt.MQTTv5,
        )
        # A refused client must stay refused, not retry in the background during other tests.
        self.client.reconnect_delay_set(60, 60)
        if config.username is not None:
            self.client.username_pw_set(config.username, config.password)
        self.connack: ReasonCode | None = None
        self.connack_props: object = None
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.disconnect_rc: ReasonCode | None = None
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.acks: dict[int, ReasonCode] = {}
        self.acked = threading.Condition()
        self.subacks: dict[int, list[ReasonCode]] = {}
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe

    def _on_connect(self, client, userdata, flags, rc, props) -> None:
        self.connack, self.connack_props = rc, props
        self.connected.set()

    def _on_disconnect(self, client, userdata, flags, rc, props) -> None:
        self.disconnect_rc = rc
        self.disconnected.set()
        self.connected.set()  # wake a connect() that is waiting on a dropped connection

    def _on_publish(self, client, userdata, mid, rc, props) -> None:
        with self.acked:
            self.acks[mid] = rc
            self.acked.notify_all()

    def _on_subscribe(self, client, userdata, mid, rcs, props) -> None:
        with self.acked:
            self.subacks[mid] = list(rcs)
            self.acked.notify_all()

    def connect(self, will: tuple[str, bytes] | None = None) -> ReasonCode:
        if will:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.client.connect(self.config.host, self.config.port, keepalive=30)
        self.client.loop_start()
        assert self.connected.wait(TIMEOUT), "no CONNACK"
        assert self.connack is not None
        return self.connack

    def subscribe(self, *filters: str) -> list[ReasonCode]:
        _, mid = self.client.subscribe([(f, 1) for f in filters])
        with self.acked:
            assert self.acked.wait_for(lambda: mid in self.subacks, TIMEOUT), "no SUBACK"
            return self.subacks[mid]

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> ReasonCode:
        """Publish at QoS 1 and return the PUBACK's reason code."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        with self.acked:
            assert self.acked.wait_for(lambda: info.mid in self.acks, TIMEOUT), "no PUBACK"
            return self.acks[info.mid]

    def receive(self, timeout: float = TIMEOUT) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=timeout)

    def receive_until(self, payload: bytes) -> list[mqtt.MQTTMessage]:
        """Every message up to and including the one carrying ``payload``."""
        got = []
        while True:
            msg = self.receive()
            got.append(msg)
            if msg.payload == payload:
                return got

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(scope="module")
def broker() -> Iterator[PrivateBroker]:
    # Shared by the tests that neither restart the broker nor change its limits.
    with PrivateBroker(FLEET, device_ids=["dev-a", "dev-b"]) as b:
        yield b


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    made: list[Peer] = []
    yield made
    for p in made:
        p.close()


def peer(peers: list[Peer], b: PrivateBroker, account: Account | None, name: str) -> Peer:
    p = Peer(b.broker_config(account), name)
    peers.append(p)
    return p


def online(peers: list[Peer], b: PrivateBroker, account: Account, name: str) -> Peer:
    p = peer(peers, b, account, name)
    rc = p.connect()
    assert not rc.is_failure, f"{name} refused: {rc}"
    return p


# -- logging in -------------------------------------------------------------------------------


def test_starts_on_a_free_port_and_the_aggregator_logs_in(
    broker: PrivateBroker, peers: list[Peer]
) -> None:
    assert broker.running and broker.host == "127.0.0.1"
    assert broker.port != 1883
    agg = online(peers, broker, broker.aggregator, "agg")
    # MQTT 5 clients learn the packet limit from CONNACK; edgefl's chunking relies on it. It is
    # derived from the model (broker/limits.py): a rollout chunk with margin, not 1 MiB.
    assert agg.connack_props.MaximumPacketSize == broker.max_packet_size
    assert 128 * 1024 < broker.max_packet_size < 256 * 1024


def test_anonymous_client_is_refused(broker: PrivateBroker, peers: list[Peer]) -> None:
    rc = peer(peers, broker, None, "anon").connect()
    assert rc.is_failure


def test_wrong_password_is_refused(broker: PrivateBroker, peers: list[Peer]) -> None:
    rc = peer(peers, broker, Account("dev-a", "not-the-password"), "wrong").connect()
    assert rc.is_failure
    assert not mqtt_login_ok(broker.host, broker.port, "dev-a", "not-the-password")


def test_device_enrolled_while_running_can_log_in(broker: PrivateBroker, peers: list[Peer]) -> None:
    account = broker.device_account("dev-late")
    assert broker.device_account("dev-late") == account  # asking again changes nothing
    online(peers, broker, account, "late")
    # Accounts that were there before the reload still work.
    online(peers, broker, broker.device_account("dev-a"), "a")


def test_reserved_and_malformed_device_ids_are_rejected(broker: PrivateBroker) -> None:
    for bad in ("aggregator", "monitor", "Dev-A", "dev/a", "+", ""):
        with pytest.raises(ConfigError):
            broker.device_account(bad)


# -- what each account may do -----------------------------------------------------------------


def test_device_update_reaches_the_aggregator(broker: PrivateBroker, peers: list[Peer]) -> None:
    agg = online(peers, broker, broker.aggregator, "agg")
    agg.subscribe(
        topic("devices/+/update"), topic("devices/+/status"), topic("devices/+/telemetry")
    )
    dev = online(peers, broker, broker.device_account("dev-a"), "a")
    for kind in ("status", "telemetry", "update"):
        assert not dev.publish(topic(f"devices/dev-a/{kind}"), kind.encode()).is_failure
        msg = agg.receive()
        assert (msg.topic, msg.payload) == (topic(f"devices/dev-a/{kind}"), kind.encode())


def test_update_chunks_reach_the_aggregator_from_their_own_device_only(
    broker: PrivateBroker, peers: list[Peer]
) -> None:
    agg = online(peers, broker, broker.aggregator, "agg")
    agg.subscribe(topic("devices/+/update/blob/+/+"))
    dev_a = online(peers, broker, broker.device_account("dev-a"), "a")
    chunk = "update/blob/0123456789abcdef/0"
    assert dev_a.publish(topic(f"devices/dev-b/{chunk}"), b"forged").value == NOT_AUTHORIZED
    # only the chunk levels: nothing deeper or elsewhere under the update topic
    assert dev_a.publish(topic(f"devices/dev-a/{chunk}/x"), b"deep").value == NOT_AUTHORIZED
    assert dev_a.publish(topic("devices/dev-a/update/other"), b"x").value == NOT_AUTHORIZED
    assert not dev_a.publish(topic(f"devices/dev-a/{chunk}"), b"chunk").is_failure
    got = agg.receive_until(b"chunk")
    assert [m.topic for m in got] == [topic(f"devices/dev-a/{chunk}")]


def test_device_cannot_publish_as_another_device(broker: PrivateBroker, peers: list[Peer]) -> None:
    agg = online(peers, broker, broker.aggregator, "agg")
    agg.subscribe(topic("devices/+/update"))
    dev_a = online(peers, broker, broker.device_account("dev-a"), "a")
    assert dev_a.publish(topic("devices/dev-b/update"), b"forged").value == NOT_AUTHORIZED
    assert not dev_a.publish(topic("devices/dev-a/update"), b"sentinel").is_failure
    got = agg.receive_until(b"sentinel")
    assert [m.topic for m in got] == [topic("devices/dev-a/update")]


@pytest.mark.parametrize(
    "target",
    [
        "devices/dev-b/status",
        "devices/dev-b/telemetry",
        "devices/dev-a/task",
        "model/global",
        "model/onnx",
        "aggregator/status",
    ],
)
def test_device_writes_outside_its_own_topics_are_denied(
    broker: PrivateBroker, peers: list[Peer], target: str
) -> None:
    dev = online(peers, broker, broker.device_account("dev-a"), "a")
    assert dev.publish(topic(target), b"x").value == NOT_AUTHORIZED


def test_device_cannot_read_another_devices_task(broker: PrivateBroker, peers: list[Peer]) -> None:
    dev_a = online(peers, broker, broker.device_account("dev-a"), "a")
    dev_b = online(peers, broker, broker.device_account("dev-b"), "b")
    # Mosquitto 2.0.11 grants the SUBACK; the ACL acts when it delivers, so test delivery.
    dev_a.subscribe(topic("devices/dev-b/task"), topic("devices/+/task"))
    dev_b.subscribe(topic("devices/dev-b/task"))
    agg = online(peers, broker, broker.aggregator, "agg")
    assert not agg.publish(topic("devices/dev-b/task"), b"task-b").is_failure
    assert not agg.publish(topic("devices/dev-a/task"), b"task-a").is_failure
    assert dev_b.receive().payload == b"task-b"
    got = dev_a.receive_until(b"task-a")
    assert {m.payload for m in got} == {b"task-a"}


def test_device_reads_models_and_aggregator_status(
    broker: PrivateBroker, peers: list[Peer]
) -> None:
    agg = online(peers, broker, broker.aggregator, "agg")
    assert not agg.publish(topic("model/global"), b"weights-v1", retain=True).is_failure
    assert not agg.publish(topic("aggregator/status"), b"online", retain=True).is_failure
    dev = online(peers, broker, broker.device_account("dev-b"), "b")
    dev.subscribe(topic("model/#"), topic("aggregator/status"))
    got = {dev.receive().payload, dev.receive().payload}
    assert got == {b"weights-v1", b"online"}


def test_monitor_reads_everything_and_writes_nothing(
    broker: PrivateBroker, peers: list[Peer]
) -> None:
    mon = online(peers, broker, broker.monitor, "mon")
    mon.subscribe(topic("#"))
    assert mon.publish(topic("model/global"), b"x").value == NOT_AUTHORIZED
    dev = online(peers, broker, broker.device_account("dev-a"), "a")
    dev.publish(topic("devices/dev-a/update"), b"seen-by-monitor")
    got = mon.receive_until(b"seen-by-monitor")
    assert got[-1].topic == topic("devices/dev-a/update")


def test_last_will_marks_a_lost_device_offline(broker: PrivateBroker, peers: list[Peer]) -> None:
    agg = online(peers, broker, broker.aggregator, "agg")
    agg.subscribe(topic("devices/dev-b/status"))
    dev = peer(peers, broker, broker.device_account("dev-b"), "b")
    dev.connect(will=(topic("devices/dev-b/status"), b"offline"))
    dev.publish(topic("devices/dev-b/status"), b"online", retain=True)
    agg.receive_until(b"online")
    # MQTT 5 reason 0x04 asks the broker to publish the Will as if the link had been lost.
    with_will = ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message")
    dev.client.disconnect(reasoncode=with_will)
    assert agg.receive_until(b"offline")[-1].topic == topic("devices/dev-b/status")


def test_the_aggregator_can_consume_through_a_shared_subscription(
    broker: PrivateBroker, peers: list[Peer]
) -> None:
    # The ACL names devices/+/update; Mosquitto checks deliveries against that real topic, so
    # the same rule lets the aggregator consume through a shared subscription. (Several workers
    # sharing it need an account each: the broker names a connection by its account.)
    workers = [online(peers, broker, broker.aggregator, "worker0")]
    for w in workers:
        rc = w.subscribe(f"$share/workers/{topic('devices/+/update')}")
        assert not rc[0].is_failure
    dev = online(peers, broker, broker.device_account("dev-a"), "a")
    sent = {f"u{i}".encode() for i in range(6)}
    for payload in sorted(sent):
        assert not dev.publish(topic("devices/dev-a/update"), payload).is_failure
    got: list[bytes] = []
    deadline = time.monotonic() + TIMEOUT
    while len(got) < len(sent) and time.monotonic() < deadline:
        for w in workers:
            try:
                got.append(w.messages.get(timeout=0.05).payload)
            except queue.Empty:
                pass
    assert sorted(got) == sorted(sent)  # each update once
    assert all(w.messages.qsize() == 0 for w in workers)


# -- limits, restart --------------------------------------------------------------------------


def test_message_over_max_packet_size_drops_the_connection(peers: list[Peer]) -> None:
    limit = 64 * 1024
    with PrivateBroker(FLEET, device_ids=["dev-a"], max_packet_size=limit) as b:
        agg = online(peers, b, b.aggregator, "agg")
        assert agg.connack_props.MaximumPacketSize == limit
        agg.subscribe(topic("devices/+/update"))
        dev = online(peers, b, b.device_account("dev-a"), "a")
        below = b"s" * (limit - 1024)
        assert not dev.publish(topic("devices/dev-a/update"), below).is_failure
        assert agg.receive().payload == below
        dev.client.publish(topic("devices/dev-a/update"), b"x" * (limit + 1), qos=1)
        assert dev.disconnected.wait(TIMEOUT), "oversized publish did not drop the connection"
        assert dev.disconnect_rc is not None and dev.disconnect_rc.value == PACKET_TOO_LARGE
        assert agg.messages.empty()


def test_the_broker_limit_can_be_capped_and_is_unchanged_otherwise() -> None:
    # the default (B1) is what it always was: the dense model fits one packet
    assert limits_for_model("mlp_digits") == DEFAULT_LIMITS
    assert DEFAULT_LIMITS.max_packet_size == 164 * 1024
    mnist = limits_for_model("mlp_mnist")
    assert mnist.max_packet_size > 4 * 101_770  # 407 KB dense
    capped = limits_for_model("mlp_mnist", max_packet_bytes=256 * 1024)
    assert capped.max_packet_size == 256 * 1024
    assert capped.max_queued_bytes == mnist.max_queued_bytes  # the same bytes, in more packets
    # a cap above the derived limit changes nothing
    assert limits_for_model("mlp_digits", max_packet_bytes=1 << 20) == DEFAULT_LIMITS
    with pytest.raises(ConfigError, match="too small"):
        limits_for_model("mlp_digits", max_packet_bytes=MIN_PACKET_BYTES - 1)


def test_restart_keeps_port_and_retained_messages(peers: list[Peer]) -> None:
    with PrivateBroker(FLEET, device_ids=["dev-a"]) as b:
        port = b.port
        agg = online(peers, b, b.aggregator, "agg")
        assert not agg.publish(topic("model/global"), b"weights-v7", retain=True).is_failure
        agg.close()
        b.restart(down_s=0.1)
        assert b.running and b.port == port
        dev = online(peers, b, b.device_account("dev-a"), "a")
        dev.subscribe(topic("model/global"))
        msg = dev.receive()
        assert (msg.payload, msg.retain) == (b"weights-v7", True)


def test_stop_removes_its_temporary_workdir_but_not_a_given_one(tmp_path: Path) -> None:
    b = PrivateBroker(FLEET)
    b.start()
    workdir = b.workdir
    b.stop()
    assert not b.running and not workdir.exists()
    given = tmp_path / "broker"
    with PrivateBroker(FLEET, workdir=given) as b:
        pass
    assert (given / "mosquitto.log").exists()


def test_start_failure_reports_the_log(tmp_path: Path) -> None:
    # A port someone else holds: Mosquitto exits, and the error carries its reason.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        b = PrivateBroker(FLEET, workdir=tmp_path, port=s.getsockname()[1])
        with pytest.raises(RuntimeError, match="Address already in use"):
            b.start()
        b.stop()


# -- files ------------------------------------------------------------------------------------


def test_password_hash_format() -> None:
    encoded = hash_password("s3cret", salt=bytes(12))
    assert encoded.startswith("$7$101$AAAAAAAAAAAAAAAA$")
    assert verify_password("s3cret", encoded)
    assert not verify_password("S3cret", encoded)
    assert hash_password("s3cret") != hash_password("s3cret")  # salted


def test_password_file_is_private_and_entries_are_replaced(tmp_path: Path) -> None:
    path = tmp_path / "passwords"
    write_password_file(path, {"dev-a": "one", "dev-b": "two"})
    add_account(path, "dev-a", "three")
    entries = read_password_file(path)
    assert list(entries) == ["dev-a", "dev-b"]
    assert verify_password("three", entries["dev-a"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(ValueError):
        add_account(path, "bad:name", "x")


def test_tls_listener_only_with_certificates() -> None:
    base = dict(password_file="/p", acl_file="/a", persistence_location="/d", log_file="/l")
    plain = render_config(MosquittoSettings(**base))
    assert "cafile" not in plain and "listener 1883 0.0.0.0" in plain
    assert "persistence_location /d/" in plain
    tls = render_config(
        MosquittoSettings(**base, tls_cafile="/ca", tls_certfile="/c", tls_keyfile="/k")
    )
    assert "listener 8883 0.0.0.0" in tls and "keyfile /k" in tls
    with pytest.raises(ValueError):
        render_config(MosquittoSettings(**base, tls_cafile="/ca"))


def test_acl_names_the_fleet() -> None:
    acl = render_acl("fleet-1")
    rules = [line for line in acl.splitlines() if line and not line.startswith("#")]
    assert "user aggregator" in rules and "user monitor" in rules
    assert "pattern write edgefl/fleet-1/devices/%u/update" in rules
    assert all("{" not in r for r in rules)
    # every rule is about this fleet's topics, but the quarantine's control topic
    control = "topic readwrite $CONTROL/dynamic-security/#"
    assert all("edgefl/fleet-1/" in r or r.startswith("user") or r == control for r in rules)
    assert rules.count(control) == 2  # the aggregator's and the admin's, no one else's
    assert rules.index("user admin") > rules.index(control)
    with pytest.raises(ConfigError):
        render_acl("Fleet/1")


# -- a deployment -----------------------------------------------------------------------------


def test_deployment_serve_and_enroll() -> None:
    # Not under pytest's tmp_path: that is 0700 root's, and a root-started Mosquitto drops to
    # user "mosquitto", which prepare() refuses with a clear error when it cannot get in.
    workdir = Path(tempfile.mkdtemp(prefix="edgefl-deploy-"))
    try:
        port = free_port()
        prepare(FLEET, workdir, port=port, bind="127.0.0.1")
        secret = (workdir / "aggregator.secret").read_text().strip()
        assert stat.S_IMODE((workdir / "aggregator.secret").stat().st_mode) == 0o600
        # Preparing again keeps the aggregator's password.
        prepare(FLEET, workdir, port=port, bind="127.0.0.1")
        assert (workdir / "aggregator.secret").read_text().strip() == secret

        result: list[int] = []
        runner = threading.Thread(
            target=lambda: result.append(serve(FLEET, workdir, port=port, bind="127.0.0.1"))
        )
        runner.start()
        try:
            _wait_for(lambda: mqtt_login_ok("127.0.0.1", port, "aggregator", secret))
            device = enroll(workdir, "dev-new")
            # serve() wrote a pid file, so enroll() made the broker reload.
            _wait_for(lambda: mqtt_login_ok("127.0.0.1", port, "dev-new", device.password))
        finally:
            pid = int((workdir / "mosquitto.pid").read_text())
            os.kill(pid, signal.SIGTERM)
            runner.join(TIMEOUT)
        assert result == [0]
        assert not (workdir / "mosquitto.pid").exists()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_for(check) -> None:
    wait_until(check, TIMEOUT, "the broker", retry_on=(OSError,))
