"""Keeping strangers out: TLS with the fleet's own CA, and devices the aggregator never enrolled.

Accounts and the ACL (anonymous, wrong password, one device posing as another) are tested
against the broker itself in tests/test_broker.py.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest

from broker import PrivateBroker
from broker.certs import make_certificates
from device.agent import DeviceAgent
from edgefl.config import BrokerConfig, DeviceConfig
from edgefl.mqtt import BrokerUnavailable, MqttLink
from tests.conftest import FLEET

pytestmark = pytest.mark.broker


@pytest.fixture
def tls_broker(tmp_path: Path):
    with PrivateBroker(FLEET, workdir=tmp_path / "broker", tls=True, device_ids=["dev-0"]) as b:
        yield b


def test_device_over_tls_verifies_the_broker_and_trains(tls_broker, tmp_path, digits) -> None:
    b = tls_broker
    train, test = digits
    cfg = DeviceConfig(
        fleet=FLEET,
        device_id="dev-0",
        broker=b.broker_config(b.device_account("dev-0"), tls=True),
        state_dir=str(tmp_path / "dev-0"),
    )
    assert cfg.broker.port == b.tls_port and cfg.broker.tls_ca
    from aggregator.service import Aggregator
    from edgefl.config import AggregatorConfig

    agent = DeviceAgent(cfg, train).start()
    try:
        agg_cfg = AggregatorConfig(
            fleet=FLEET,
            broker=b.broker_config(b.aggregator, tls=True),
            state_dir=str(tmp_path / "agg"),
        )
        agg_cfg.rounds.rounds = 1
        agg_cfg.deploy.rollout = False
        with Aggregator(agg_cfg, eval_data=test) as agg:
            (m,) = agg.run()
        assert m.reported == 1 and m.applied
    finally:
        agent.stop()


def test_a_broker_with_a_certificate_from_another_ca_is_refused(tls_broker, tmp_path) -> None:
    b = tls_broker
    stranger = make_certificates(tmp_path / "other-ca", ["127.0.0.1"])
    cfg = b.broker_config(b.device_account("dev-0"), tls=True)
    cfg.tls_ca = str(stranger["ca.crt"])  # the device trusts a CA that did not sign the broker
    cfg.connect_timeout_s = 3.0
    with pytest.raises(BrokerUnavailable, match="certificate"):
        MqttLink("test-wrong-ca", cfg).start()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_a_broker_certificate_for_another_host_is_refused(tmp_path, host: str) -> None:
    """The fleet's own CA signed it, but for "other.example": a device connecting to ``host``
    must not take it, or one stolen broker key would do for every broker of that CA."""
    b = PrivateBroker(FLEET, workdir=tmp_path / "broker", tls=True, device_ids=["dev-0"])
    b.tls_files = make_certificates(tmp_path / "certs", ["other.example"])  # served from start
    with b:
        # the chain is good: without the host-name check the handshake goes through, so the
        # refusal below can only come from the name
        context = ssl.create_default_context(cafile=str(b.tls_files["ca.crt"]))
        context.check_hostname = False
        raw = socket.create_connection((b.host, b.tls_port), timeout=5)
        with context.wrap_socket(raw) as tls:
            assert "other.example" in str(tls.getpeercert()["subjectAltName"])
        cfg = b.broker_config(b.device_account("dev-0"), tls=True)
        cfg.host = host
        cfg.connect_timeout_s = 3.0
        with pytest.raises(BrokerUnavailable, match="certificate"):
            MqttLink("test-wrong-host", cfg).start()


def test_plain_mqtt_to_the_tls_port_does_not_connect(tls_broker) -> None:
    b = tls_broker
    acct = b.device_account("dev-0")
    cfg = BrokerConfig(
        host=b.host,
        port=b.tls_port,
        username=acct.username,
        password=acct.password,
        connect_timeout_s=2.0,
    )
    with pytest.raises(BrokerUnavailable):
        MqttLink("test-plain-on-tls", cfg).start()


def test_the_aggregator_ignores_devices_it_has_not_enrolled(make_fleet, broker, tmp_path) -> None:
    from aggregator.enrolled import add_ids
    from edgefl.compression import DenseCodec
    from edgefl.messages import Update, encode_compact_update
    from tests.conftest import wait_until
    from tests.test_federation import Scripted

    fleet = make_fleet(devices=1)
    fleet.start_agent(0)
    add_ids(tmp_path / "enrolled.txt", ["dev-0"])
    cfg = fleet.aggregator_config(rounds=1, deadline_s=5.0)
    cfg.enrolled_devices = str(tmp_path / "enrolled.txt")
    with fleet.aggregator(cfg) as agg:
        # a device with a broker account, but not on the aggregator's list
        stranger = Scripted(broker, "dev-x")
        try:
            delta = {k: v * 0 + 1.0 for k, v in agg.weights.items()}
            update = Update("dev-x", 1, 0, 10, delta)
            stranger.send(encode_compact_update(update, DenseCodec(), agg.spec))
            wait_until(lambda: agg.rejected["not_enrolled"] == 1, what="the rejection")
            assert agg.registry.get("dev-x") is None  # its birth was ignored too
            (m,) = agg.run()
        finally:
            stranger.link.stop()
    assert m.participants == 1 and m.reported == 1
