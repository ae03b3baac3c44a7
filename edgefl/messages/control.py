"""The control messages, JSON so that ``mosquitto_sub`` shows them readably: the task (aggregator
-> device), telemetry, a device's status (birth with its capabilities and power model, or Last
Will), the aggregator's status, and a device's reply when it sends no update."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from edgefl.compression import Codec, WireError, make_codec
from edgefl.config import ConfigError, PersonalConfig
from edgefl.messages import checks
from edgefl.messages.checks import FORMAT_VERSION, MAX_COUNT, MAX_SAMPLES, MAX_TIME
from edgefl.messages.deployment import VARIANTS

MAX_CODECS = 16


@dataclass
class Task:
    """What the aggregator asks of one device in one round."""

    round: int
    base_version: int
    epochs: int
    batch_size: int
    lr: float
    # the codec the update must be encoded with: one typed value, built once on each side (from
    # configuration on the aggregator, from the task on the device), carried with every
    # parameter written out; a spec (a dict or a name) given here is built into one
    codec: Codec
    deadline: float  # unix time by which the update must have arrived
    max_steps: int = 0  # 0 = no cap beyond the epochs
    issued: float = field(default_factory=time.time)
    prox_mu: float = 0.0  # FedProx proximal term weight; 0 = none
    # the [personal] table (edgefl.config.PersonalConfig) with every field written out; a
    # PersonalConfig or a partial dict given here is completed with the defaults
    personal: dict[str, Any] = field(default_factory=lambda: asdict(PersonalConfig()))

    def __post_init__(self) -> None:
        if not isinstance(self.codec, Codec):
            self.codec = make_codec(self.codec)
        self.personal = personal_spec(self.personal)

    def to_payload(self) -> bytes:
        # field by field, not asdict (a deep copy): one task per participant per round; the
        # codec with every parameter written out, so that it does not depend on the receiver's
        # defaults
        fields = {k: getattr(self, k) for k in _TASK_FIELDS}
        fields["codec"] = self.codec.spec()
        return checks.dump_json({"v": FORMAT_VERSION, **fields})

    @classmethod
    def from_payload(cls, payload: bytes) -> Task:
        what = "task"
        obj = checks.read_json(payload, what)
        # refuse a codec this build cannot produce, or one whose parameters are not all given
        codec = make_codec(obj.get("codec"), complete=True)
        return cls(
            round=checks.count(obj, "round", what),
            base_version=checks.count(obj, "base_version", what),
            epochs=checks.count(obj, "epochs", what, 0, 1000),
            batch_size=checks.count(obj, "batch_size", what, 1, 1 << 16),
            lr=checks.number(obj, "lr", what, 0.0, 100.0),
            codec=codec,
            deadline=checks.number(obj, "deadline", what, 0.0),
            # every field, always: a task means what its sender meant, whatever the receiver's
            # defaults
            max_steps=checks.count(obj, "max_steps", what, 0, 10_000_000),
            issued=checks.number(obj, "issued", what, 0.0),
            prox_mu=checks.number(obj, "prox_mu", what, 0.0, 100.0),
            personal=personal_spec(obj.get("personal"), complete=True),
        )


_TASK_FIELDS = tuple(f.name for f in fields(Task))
_PERSONAL_FIELDS = {f.name: f.type for f in fields(PersonalConfig)}


def personal_spec(spec: Any, *, complete: bool = False) -> dict[str, Any]:
    """A task's [personal] table, every field present and valid, as a plain dict; WireError
    (reason ``personal``) otherwise. ``complete``: every field must be given (a received task:
    it means what its sender meant, whatever this build's defaults); else the missing ones take
    the defaults (a task built here)."""
    what = "task.personal"
    if isinstance(spec, PersonalConfig):
        return asdict(spec)
    if not isinstance(spec, dict):
        raise WireError("personal", f"{what} must be an object")
    unknown = sorted(str(k)[:40] for k in spec if k not in _PERSONAL_FIELDS)
    if unknown:
        raise WireError("personal", f"{what}: unknown field {unknown[0]!r}")
    missing = [k for k in _PERSONAL_FIELDS if k not in spec]
    if complete and missing:
        raise WireError("personal", f"{what}: field {missing[0]!r} is missing")
    values = {}
    for key, kind in _PERSONAL_FIELDS.items():
        if key not in spec:
            continue
        value = spec[key]
        # JSON has one kind of number: an integral float is not an int, a bool is neither
        if kind == "int" and (type(value) is not int):
            raise WireError("personal", f"{what}.{key} must be an integer")
        if kind == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise WireError("personal", f"{what}.{key} must be a number")
        if kind == "str" and not isinstance(value, str):
            raise WireError("personal", f"{what}.{key} must be a string")
        values[key] = float(value) if kind == "float" else value
    try:
        return asdict(PersonalConfig(**values))
    except (ConfigError, OverflowError) as e:
        raise WireError("personal", f"{what}: {str(e)[:200]}") from None


@dataclass
class Telemetry:
    """A device's resources right now; None where the hardware cannot say."""

    cpu_percent: float
    mem_available_mb: float
    samples: int
    battery_percent: float | None = None
    charging: bool | None = None
    temperature_c: float | None = None
    link_kbps: float | None = None
    # the agent's own process, beside the whole machine's cpu_percent (100 = one core busy,
    # as psutil counts it) and its resident memory; None from an agent that does not say
    agent_cpu_percent: float | None = None
    agent_rss_mb: float | None = None
    ts: float = field(default_factory=time.time)

    def to_payload(self) -> bytes:
        return checks.dump_json({"v": FORMAT_VERSION, **asdict(self)})

    @classmethod
    def from_payload(cls, payload: bytes) -> Telemetry:
        return cls.from_dict(checks.read_json(payload, "telemetry"))

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Telemetry:
        """The fields of a telemetry message or of the reading a status carries (whose header
        the status's own covers)."""
        what = "telemetry"
        checks.only_keys(obj, TELEMETRY_KEYS, what)
        return cls(
            cpu_percent=checks.number(obj, "cpu_percent", what, 0.0, 100.0 * 1024),
            mem_available_mb=checks.number(obj, "mem_available_mb", what, 0.0, 1e9),
            samples=checks.count(obj, "samples", what, 0, MAX_SAMPLES),
            battery_percent=checks.optional_number(obj, "battery_percent", what, 0.0, 100.0),
            charging=checks.flag(obj, "charging", what, None),
            temperature_c=checks.optional_number(obj, "temperature_c", what, -100.0, 200.0),
            link_kbps=checks.optional_number(obj, "link_kbps", what, 0.0, 1e9),
            agent_cpu_percent=checks.optional_number(
                obj, "agent_cpu_percent", what, 0.0, 100.0 * 1024
            ),
            agent_rss_mb=checks.optional_number(obj, "agent_rss_mb", what, 0.0, 1e9),
            ts=checks.number(obj, "ts", what, 0.0, MAX_TIME),
        )


TELEMETRY_KEYS = frozenset(
    {"v", "cpu_percent", "mem_available_mb", "samples", "battery_percent", "charging",
     "temperature_c", "link_kbps", "agent_cpu_percent", "agent_rss_mb", "ts"}
)


@dataclass
class Status:
    """A device's birth certificate or its Last Will.

    A birth (``online``) carries the device's capabilities, a first telemetry reading (so the
    aggregator can schedule it before its first periodic report) and the ONNX model version it
    serves, if any. The Will is a bare ``offline``.
    """

    state: str  # "online" | "offline"
    agent_version: str = ""
    capabilities: dict[str, Any] = field(default_factory=dict)
    telemetry: Telemetry | None = None
    serving: int | None = None  # version of the ONNX model the device serves
    serving_accuracy: float | None = None  # that model's accuracy on the device's own data
    serving_seq: int | None = None  # the deployment (rollout or rollback) it came with
    previous_accuracy: float | None = None  # the model served before, on the same data
    # which model answers: the fleet's file ("fp32", "int8") or the device's own personalised
    # model built on the ``serving`` version ("personal", fp32 always; device/personal/serving.py)
    serving_variant: str | None = None
    ts: float = field(default_factory=time.time)

    def to_payload(self) -> bytes:
        return checks.dump_json({"v": FORMAT_VERSION, **asdict(self)})

    @classmethod
    def from_payload(cls, payload: bytes) -> Status:
        what = "status"
        obj = checks.read_json(payload, what)
        checks.only_keys(obj, STATUS_KEYS, what)
        state = obj.get("state")
        if state not in ("online", "offline"):
            raise WireError("malformed", f"status state {str(state)[:20]!r}")
        telemetry = obj.get("telemetry")
        if telemetry is not None:
            if not isinstance(telemetry, dict):
                raise WireError("malformed", "telemetry in a status must be an object")
            telemetry = Telemetry.from_dict(telemetry)
        variant = obj.get("serving_variant")
        if variant is not None and variant not in SERVING_VARIANTS:
            raise WireError("malformed", f"status serving_variant {str(variant)[:20]!r}")
        return cls(
            state=state,
            agent_version=checks.text(obj, "agent_version", what, 64, token=True),
            capabilities=capabilities_from(obj.get("capabilities", {})),
            telemetry=telemetry,
            serving=checks.optional_count(obj, "serving", what),
            serving_accuracy=checks.optional_number(obj, "serving_accuracy", what, 0.0, 1.0),
            serving_seq=checks.optional_count(obj, "serving_seq", what),
            previous_accuracy=checks.optional_number(obj, "previous_accuracy", what, 0.0, 1.0),
            serving_variant=variant,
            ts=checks.number(obj, "ts", what, 0.0, MAX_TIME) if "ts" in obj else 0.0,
        )


STATUS_KEYS = frozenset(
    {"v", "state", "agent_version", "capabilities", "telemetry", "serving", "serving_accuracy",
     "serving_seq", "previous_accuracy", "serving_variant", "ts"}
)
SERVING_VARIANTS = (*VARIANTS, "personal")


@dataclass(frozen=True)
class PowerModel:
    """What a device draws, for energy estimates; carried in its birth as capabilities.power."""

    compute_w: float  # while training
    radio_w: float  # while uploading
    battery_wh: float  # battery capacity (what turns joules into battery percent)

    @classmethod
    def from_capabilities(cls, capabilities: Mapping[str, Any]) -> PowerModel | None:
        """The power model in a birth's capabilities; None if there is none; WireError if bad."""
        obj = capabilities.get("power")
        if obj is None:
            return None
        if not isinstance(obj, dict):
            raise WireError("malformed", "capabilities.power must be an object")
        what = "power model"
        return cls(
            compute_w=checks.number(obj, "compute_w", what, 0.0, 10_000.0),
            radio_w=checks.number(obj, "radio_w", what, 0.0, 10_000.0),
            battery_wh=checks.number(obj, "battery_wh", what, 1e-6, 1e6),
        )


def _codec_names(obj: Mapping[str, Any], key: str, what: str) -> list[str]:
    names = obj[key]
    if not isinstance(names, list) or len(names) > MAX_CODECS:
        raise WireError("malformed", f"{what}: {key!r} must be a list of at most {MAX_CODECS}")
    return [checks.name({"codec": n}, "codec", what) for n in names]


# A birth's capabilities, key by key: what each must be. The registry keeps them and checkpoints
# them, so nothing else gets in (a number beyond 64 bits once stopped every checkpoint).
CAPABILITIES: dict[str, Any] = {
    "cpu_count": lambda o, k, w: checks.count(o, k, w, 1, 1 << 16),
    "mem_total_mb": lambda o, k, w: checks.count(o, k, w, 0, 1 << 40),
    "machine": lambda o, k, w: checks.text(o, k, w, 32, token=True),
    "python": lambda o, k, w: checks.text(o, k, w, 32, token=True),
    "samples": lambda o, k, w: checks.count(o, k, w, 0, MAX_SAMPLES),
    "model": lambda o, k, w: checks.name(o, k, w),
    "codecs": _codec_names,
    "power": lambda o, k, w: asdict(PowerModel.from_capabilities(o)),
    "simulated": lambda o, k, w: checks.flag(o, k, w, False),
    "charge_w": lambda o, k, w: checks.number(o, k, w, 0.0, 10_000.0),
    # false: a serve-only device (no torch), which the scheduler never asks to train
    "trains": lambda o, k, w: checks.flag(o, k, w, True),
}


def capabilities_from(obj: Any) -> dict[str, Any]:
    """A birth's capabilities, every key known and every value within its bounds."""
    what = "capabilities"
    if not isinstance(obj, dict):
        raise WireError("malformed", f"{what} must be an object")
    checks.only_keys(obj, frozenset(CAPABILITIES), what)
    return {key: CAPABILITIES[key](obj, key, what) for key in obj if obj[key] is not None}


# What the aggregator's status lists at most, so that it stays one small retained message
# however large the fleet: waited-for devices, per-device figures (the rest are counted in
# missing_more / devices_more), rejection reasons (a fixed set of codes, far fewer than this).
MAX_STATUS_MISSING = 64
MAX_STATUS_DEVICES = 256
MAX_STATUS_REASONS = 64
# what the aggregator waits for next: nothing yet, devices to come online before the first
# round, any eligible device, the open round's (or buffer's) updates, nothing (it finished)
AGGREGATOR_WAITS = ("", "devices", "eligible", "updates", "nothing")
# a device's figures in the status: rounds (or async tasks) it contributed an accepted update
# to, rounds it was asked to work in, and its updates rejected
DEVICE_FIGURES = ("rounds", "assigned", "rejected")


@dataclass
class AggregatorStatus:
    """Retained on aggregator/status: alive or not, and where the training stands; enough for
    ``edgefl status`` and a dashboard (docs/architecture.md, "Operators"), bounded in size."""

    state: str  # "online" | "offline" | "finished"
    round: int = 0  # the open (or last) round; in async mode the buffer being filled
    model_version: int = 0
    reported: int = 0
    expected: int = 0
    accuracy: float | None = None  # the newest evaluation's, kept until the next one
    # devices cut off at the broker (aggregator/guard.py), for operators
    quarantined: list[str] = field(default_factory=list)
    mode: str = "sync"  # "sync" | "async"
    rounds: int = 0  # rounds (async: model versions) the run is to make; 0 = not said
    waiting_for: str = ""  # one of AGGREGATOR_WAITS
    deadline: float | None = None  # unix time by which the open round closes at the latest
    # the devices waited for (an open round's participants that have not reported, or the
    # enrolled devices not online yet), at most MAX_STATUS_MISSING of them, and how many more
    missing: list[str] = field(default_factory=list)
    missing_more: int = 0
    online: int = 0  # devices online, as the aggregator sees them
    uplink_bytes: int = 0  # update bytes received in the closed rounds so far
    downlink_bytes: int = 0  # task and model bytes sent to devices in them
    energy_j: float = 0.0  # the devices' estimated energy over those rounds (telemetry's model)
    rejected: dict[str, int] = field(default_factory=dict)  # updates and replies, by reason
    # {device: {"rounds", "assigned", "rejected"}} for at most MAX_STATUS_DEVICES devices
    devices: dict[str, dict[str, int]] = field(default_factory=dict)
    devices_more: int = 0
    ts: float = field(default_factory=time.time)

    def to_payload(self) -> bytes:
        return checks.dump_json({"v": FORMAT_VERSION, **asdict(self)})

    @classmethod
    def from_payload(cls, payload: bytes) -> AggregatorStatus:
        what = "aggregator status"
        obj = checks.read_json(payload, what)
        state = obj.get("state")
        if state not in ("online", "offline", "finished"):
            raise WireError("malformed", f"aggregator state {str(state)[:20]!r}")
        mode = obj.get("mode", "sync")
        if mode not in ("sync", "async"):
            raise WireError("malformed", f"aggregator mode {str(mode)[:20]!r}")
        waiting = obj.get("waiting_for", "")
        if waiting not in AGGREGATOR_WAITS:
            raise WireError("malformed", f"aggregator waiting_for {str(waiting)[:20]!r}")

        def count(key: str) -> int:
            return checks.count(obj, key, what) if key in obj else 0

        missing = checks.device_ids(obj, "missing", what)
        if len(missing) > MAX_STATUS_MISSING:
            raise WireError("malformed", f"{what}: more than {MAX_STATUS_MISSING} missing")
        return cls(
            state=state,
            round=count("round"),
            model_version=count("model_version"),
            reported=count("reported"),
            expected=count("expected"),
            accuracy=checks.optional_number(obj, "accuracy", what, 0.0, 1.0),
            quarantined=checks.device_ids(obj, "quarantined", what),
            mode=mode,
            rounds=count("rounds"),
            waiting_for=waiting,
            deadline=checks.optional_number(obj, "deadline", what, 0.0, MAX_TIME),
            missing=missing,
            missing_more=count("missing_more"),
            online=count("online"),
            uplink_bytes=count("uplink_bytes"),
            downlink_bytes=count("downlink_bytes"),
            energy_j=checks.optional_number(obj, "energy_j", what, 0.0, 1e15) or 0.0,
            rejected=_counts_by_name(obj.get("rejected", {}), f"{what}: rejected",
                                     MAX_STATUS_REASONS),
            devices=_device_figures(obj.get("devices", {}), what),
            devices_more=count("devices_more"),
            ts=checks.number(obj, "ts", what, 0.0) if "ts" in obj else 0.0,
        )


def _counts_by_name(obj: Any, what: str, most: int) -> dict[str, int]:
    """``{name: count}``, every name a valid name (edgefl.config.NAME_RE), at most ``most``."""
    if not isinstance(obj, dict) or len(obj) > most:
        raise WireError("malformed", f"{what} must be an object of at most {most} counts")
    return {checks.name({"key": k}, "key", what): checks.count(obj, k, what) for k in obj}


def _device_figures(obj: Any, what: str) -> dict[str, dict[str, int]]:
    if not isinstance(obj, dict) or len(obj) > MAX_STATUS_DEVICES:
        raise WireError(
            "malformed", f"{what}: devices must be an object of at most {MAX_STATUS_DEVICES}"
        )
    out = {}
    for device_id, figures in obj.items():
        checks.name({"device": device_id}, "device", what)
        if not isinstance(figures, dict):
            raise WireError("malformed", f"{what}: devices.{device_id} must be an object")
        checks.only_keys(figures, frozenset(DEVICE_FIGURES), f"{what}: devices.{device_id}")
        out[device_id] = {k: checks.count(figures, k, what) for k in DEVICE_FIGURES
                          if k in figures}
    return out


REPLY_FORMAT = "edgefl.reply"
REPLY_KINDS = ("declined", "late", "superseded")
MAX_REASON = 200


@dataclass
class Reply:
    """A device's answer to a task when it sends no update, on its reply topic (JSON).

    ``declined``: it refused the work before starting (``reason`` says why: its battery, say);
    ``late``: it gave up at the task's deadline; ``superseded``: a newer task arrived while it
    worked. ``metrics`` hold what the work cost so far (cpu_s, train_s, samples_seen, and the
    battery level), so energy and speed are accounted for even when no update comes.
    """

    device_id: str
    round: int
    kind: str
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    ts: float = field(default_factory=time.time)

    def to_payload(self) -> bytes:
        return checks.dump_json(
            {
                "fmt": REPLY_FORMAT,
                "v": FORMAT_VERSION,
                "device": self.device_id,
                "round": self.round,
                "kind": self.kind,
                "reason": self.reason[:MAX_REASON],
                "metrics": self.metrics,
                "ts": self.ts,
            }
        )

    @classmethod
    def from_payload(cls, payload: bytes, *, topic_device_id: str) -> Reply:
        what = "reply"
        obj = checks.read_json(payload, what, REPLY_FORMAT)
        device_id = checks.name(obj, "device", what)
        if device_id != topic_device_id:
            raise WireError(
                "device_mismatch",
                f"reply says device {device_id!r}, topic says {topic_device_id!r}",
            )
        kind = obj.get("kind")
        if kind not in REPLY_KINDS:
            raise WireError("malformed", f"reply kind {str(kind)[:40]!r}")
        return cls(
            device_id=device_id,
            round=checks.count(obj, "round", what, 0, MAX_COUNT),
            kind=kind,
            reason=checks.text(obj, "reason", what, MAX_REASON),
            metrics=checks.metrics(obj.get("metrics", {}), what),
            ts=checks.number(obj, "ts", what, 0.0, MAX_TIME) if "ts" in obj else 0.0,
        )
