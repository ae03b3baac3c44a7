"""The MQTT topic namespace of docs/architecture.md, in one place.

edgefl/{fleet}/devices/{id}/status      device -> all         QoS 1, retained (birth, Will)
edgefl/{fleet}/devices/{id}/telemetry   device -> aggregator  QoS 0, retained (the latest)
edgefl/{fleet}/devices/{id}/task        aggregator -> device  QoS 1
edgefl/{fleet}/devices/{id}/update      device -> aggregator  QoS 1
edgefl/{fleet}/devices/{id}/reply       device -> aggregator  QoS 1 (no update: declined, late)
edgefl/{fleet}/model/global             aggregator -> devices QoS 1, retained
edgefl/{fleet}/model/delta              aggregator -> devices QoS 1 (downlink "delta" only)
edgefl/{fleet}/model/onnx               aggregator -> devices QoS 1, retained
edgefl/{fleet}/aggregator/status        aggregator -> all     QoS 1, retained

A message too large for one packet goes on its topic as a manifest, its chunks on
``{topic}/blob/{id}/{i}`` (edgefl/chunking.py, edgefl/messages/blob.py): model/global/blob/...
and model/delta/blob/... retained, devices/{id}/update/blob/... not.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgefl.chunking import ID_LEN, MAX_CHUNKS
from edgefl.config import NAME_RE, check_name

DEVICE_KINDS = ("status", "telemetry", "task", "update", "reply")


@dataclass(frozen=True)
class Topics:
    fleet: str

    def __post_init__(self) -> None:
        check_name("fleet", self.fleet)

    @property
    def root(self) -> str:
        return f"edgefl/{self.fleet}"

    def device(self, device_id: str, kind: str) -> str:
        check_name("device id", device_id)
        if kind not in DEVICE_KINDS:
            raise ValueError(f"unknown device topic kind {kind!r}")
        return f"{self.root}/devices/{device_id}/{kind}"

    def status(self, device_id: str) -> str:
        return self.device(device_id, "status")

    def telemetry(self, device_id: str) -> str:
        return self.device(device_id, "telemetry")

    def task(self, device_id: str) -> str:
        return self.device(device_id, "task")

    def update(self, device_id: str) -> str:
        return self.device(device_id, "update")

    def reply(self, device_id: str) -> str:
        """Where a device says it sends no update for a task (edgefl.messages.Reply)."""
        return self.device(device_id, "reply")

    def all_devices(self, kind: str) -> str:
        """Subscription filter for one kind of message from every device."""
        if kind not in DEVICE_KINDS:
            raise ValueError(f"unknown device topic kind {kind!r}")
        return f"{self.root}/devices/+/{kind}"

    @property
    def all_update_chunks(self) -> str:
        """Subscription filter for the chunks of every device's chunked updates."""
        return f"{self.root}/devices/+/update/blob/+/+"

    def parse_update_chunk(self, topic: str) -> tuple[str, str, int] | None:
        """``(device_id, blob_id, index)`` for the topic of an update's chunk, else None (never
        raises)."""
        parts = topic.split("/")
        if (
            len(parts) != 8
            or parts[:3] != ["edgefl", self.fleet, "devices"]
            or parts[4:6] != ["update", "blob"]
            or not NAME_RE.match(parts[3])
            or len(parts[6]) != ID_LEN
            or any(c not in "0123456789abcdef" for c in parts[6])
            or not parts[7].isascii()
            or not parts[7].isdigit()
            or len(parts[7]) > 4
            or int(parts[7]) >= MAX_CHUNKS
        ):
            return None
        return parts[3], parts[6], int(parts[7])

    @property
    def model_global(self) -> str:
        return f"{self.root}/model/global"

    @property
    def model_delta(self) -> str:
        """The change from one global model version to the next (QoS 1, not retained), when
        the aggregator's downlink is ``delta`` (aggregator/broadcast.py)."""
        return f"{self.root}/model/delta"

    @property
    def model_onnx(self) -> str:
        return f"{self.root}/model/onnx"

    @property
    def model_onnx_canary(self) -> str:
        """A candidate model for the canary devices it names (retained while the canary runs)."""
        return f"{self.root}/model/onnx/canary"

    @property
    def aggregator_status(self) -> str:
        return f"{self.root}/aggregator/status"

    def parse_device_topic(self, topic: str) -> tuple[str, str] | None:
        """``(device_id, kind)`` for a device topic of this fleet, else None (never raises)."""
        parts = topic.split("/")
        if (
            len(parts) != 5
            or parts[0] != "edgefl"
            or parts[1] != self.fleet
            or parts[2] != "devices"
            or parts[4] not in DEVICE_KINDS
            or not NAME_RE.match(parts[3])
        ):
            return None
        return parts[3], parts[4]
