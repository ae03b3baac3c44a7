"""Quarantine at the broker: commands for Mosquitto's dynamic-security plugin.

broker/ loads the plugin beside the password file and the ACL (mosquitto.conf.template). It
rules only the clients it lists; edgefl lists exactly the quarantined devices, each disabled, so
Mosquitto closes a quarantined device's connection at once and refuses its logins until an
operator re-admits it. Commands are JSON published to ``$CONTROL/dynamic-security/v1``; the
plugin answers on ``.../response``. Both the aggregator (to quarantine) and ``edgefl readmit``
(to list and lift) speak it, so it lives here.
"""

from __future__ import annotations

import json
import secrets
import threading
from typing import Any

from edgefl.config import BrokerConfig
from edgefl.mqtt import MqttLink

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = CONTROL_TOPIC + "/response"
# what the plugin's listing calls a quarantined device, so an operator can tell them apart
TEXT_NAME = "edgefl quarantine"


def _payload(*commands: dict[str, Any]) -> bytes:
    return json.dumps({"commands": list(commands)}, separators=(",", ":")).encode()


def quarantine(device_id: str, reason: str) -> bytes:
    """Disable ``device_id``: create it as a plugin client with a password no one knows (the
    plugin then answers for that username instead of the password file) and disable it, which
    also disconnects it. If it is listed already, the create fails harmlessly and the disable
    stands."""
    return _payload(
        {
            "command": "createClient",
            "username": device_id,
            "password": secrets.token_urlsafe(24),
            "textname": TEXT_NAME,
            "textdescription": reason[:200],
        },
        {"command": "disableClient", "username": device_id},
    )


def readmit(device_id: str) -> bytes:
    """Lift ``device_id``'s quarantine: delete it from the plugin, so that the password file
    and the ACL rule its logins again."""
    return _payload({"command": "deleteClient", "username": device_id})


def list_clients() -> bytes:
    return _payload({"command": "listClients", "verbose": True})


def parse_response(payload: bytes) -> list[dict[str, Any]]:
    """The plugin's answers, one per command; a malformed answer reads as none."""
    try:
        obj = json.loads(payload)
    except ValueError:
        return []
    responses = obj.get("responses") if isinstance(obj, dict) else None
    return [r for r in responses if isinstance(r, dict)] if isinstance(responses, list) else []


def quarantined(response: dict[str, Any]) -> dict[str, str]:
    """From a verbose ``listClients`` answer: device id -> the reason it was quarantined."""
    clients = (response.get("data") or {}).get("clients") or []
    return {
        c["username"]: str(c.get("textdescription", ""))
        for c in clients
        if isinstance(c, dict) and c.get("textname") == TEXT_NAME and c.get("disabled")
    }


def send(broker: BrokerConfig, payload: bytes, timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """Publish one command message with ``broker``'s account (the admin's, for operators) and
    return the plugin's answers. Raises TimeoutError if none comes: no dynamic-security plugin
    in this broker, or the account may not use it."""
    answers: list[dict[str, Any]] = []
    done = threading.Event()

    def on_response(_topic: str, body: bytes) -> None:
        answers.extend(parse_response(body))
        done.set()

    link = MqttLink("edgefl-admin", broker, clean_start=True)
    link.subscribe(RESPONSE_TOPIC, on_response, qos=0)
    with link:
        link.publish(CONTROL_TOPIC, payload, qos=1)
        if not done.wait(timeout_s):
            raise TimeoutError(
                f"no answer from the broker's dynamic-security plugin within {timeout_s:.0f} s: "
                "is it loaded (edgefl broker loads it when Mosquitto has it), and is "
                f"{broker.username!r} the admin account?"
            )
    return answers
