"""Run configuration: every number a user may want to change, with its default, in one place.

A configuration file is TOML. Its tables match the dataclasses below (``[broker]``,
``[train]``, ``[rounds]`` ...); a key that is not known is an error rather than being ignored,
so a typo cannot silently leave a default in force.

One module, about 560 lines, on purpose: the defaults live in one place (STYLE), most of it is
commented fields, and the loader that checks them is the rest.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

# \Z, not $: $ also matches before a trailing newline, which would let "dev\n" through
NAME_RE = re.compile(r"^[a-z0-9_-]{1,64}\Z")


class ConfigError(ValueError):
    """A configuration file or value is wrong; the message says where and how."""


def check_name(kind: str, value: str) -> str:
    """Fleet and device names become MQTT topic levels, so they are kept to ``[a-z0-9_-]``."""
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ConfigError(
            f"{kind} {value!r} is not a valid name: use 1-64 characters from a-z, 0-9, '_' and '-'"
        )
    return value


@dataclass
class BrokerConfig:
    """How to reach the MQTT broker."""

    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    # CA certificate that signed the broker's certificate; setting it turns TLS on.
    tls_ca: str | None = None
    keepalive_s: int = 30
    # How long the broker keeps our subscriptions and queued QoS 1 messages while we are away.
    session_expiry_s: int = 3600
    connect_timeout_s: float = 10.0
    # The largest MQTT packet the broker accepts, in bytes; 0 = what the broker announces (MQTT
    # 5 CONNACK, as Mosquitto does), else no limit. Set it for a broker that caps messages
    # without saying so (managed brokers: 128-256 KB). Whatever would not fit the smaller of
    # the two travels in chunks (edgefl/chunking.py): the global model, deltas, updates, ONNX.
    max_packet_bytes: int = 0


@dataclass
class ModelConfig:
    name: str = "mlp_digits"


# The data sets and partitions a local run knows (edgefl/data/).
DATASETS = ("digits", "fashion_mnist", "watch")
PARTITIONS = ("dirichlet", "iid", "shards", "natural")


@dataclass
class DataConfig:
    """The fleet's data in a local run (demo, tests, benchmarks): a data set split across the
    simulated devices (README, "Data sets and partitions")."""

    # digits (sklearn's 8x8), fashion_mnist (Debian's dataset-fashion-mnist), watch (seglearn's
    # smartwatch exercises, converted by `make setup`)
    dataset: str = "digits"
    # dirichlet (label skew), iid, shards (McMahan et al. 2017: sorted by label, shards_per_device
    # label shards each), natural (one device per subject; watch only, demo.devices = subjects)
    partition: str = "dirichlet"
    alpha: float = 0.5
    shards_per_device: int = 2
    seed: int = 0
    min_samples: int = 10
    # digits: the stratified fraction held out for testing
    test_fraction: float = 0.2
    # fashion_mnist: a stratified subset of the 60,000 training / 10,000 test images; 0 = all
    train_samples: int = 0
    test_samples: int = 0
    # watch: the subjects (1-10) held out as the test set (leave-subjects-out)
    test_subjects: list[int] = field(default_factory=lambda: [9, 10])

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ConfigError(
                f"data.dataset {self.dataset!r} is not one of {', '.join(DATASETS)}"
            )
        if self.partition not in PARTITIONS:
            raise ConfigError(
                f"data.partition {self.partition!r} is not one of {', '.join(PARTITIONS)}"
            )
        if self.partition == "natural" and self.dataset != "watch":
            raise ConfigError(
                f"data.partition 'natural' splits by subject, and {self.dataset} records none: "
                "use it with dataset 'watch', or partition dirichlet, iid or shards"
            )
        if self.alpha <= 0 or self.shards_per_device < 1 or self.min_samples < 0:
            raise ConfigError("data.alpha must be > 0, shards_per_device >= 1, min_samples >= 0")
        if not 0 < self.test_fraction < 1:
            raise ConfigError("data.test_fraction must lie in (0, 1)")
        if self.train_samples < 0 or self.test_samples < 0:
            raise ConfigError("data.train_samples and test_samples must be >= 0 (0 = all)")
        if (self.train_samples or self.test_samples) and self.dataset != "fashion_mnist":
            raise ConfigError("data.train_samples and test_samples apply to fashion_mnist only")
        if not self.test_subjects or len(set(self.test_subjects)) != len(self.test_subjects):
            raise ConfigError("data.test_subjects must name one or more distinct subjects")


@dataclass
class TrainConfig:
    """Local training on a device (the defaults of B1)."""

    lr: float = 0.1
    batch_size: int = 32
    epochs: int = 5
    # FedProx (Li et al., MLSys 2020): weight mu of the proximal term mu/2 ||w - w_global||^2
    # added to every device's local loss; 0 turns it off (plain FedAvg local SGD).
    prox_mu: float = 0.0


@dataclass
class CodecConfig:
    """How devices encode their updates and how the aggregator sends the model
    (edgefl/compression/, edgefl/error_feedback.py; README, "Update compression")."""

    # dense_fp32 | fp16 | int8 | prune | topk
    name: str = "dense_fp32"
    # prune: send the values whose magnitude (error feedback included) is at least this
    threshold: float = 0.01
    # topk: send this fraction of all values, the largest in magnitude across all tensors
    fraction: float = 0.01
    # prune, topk: bits per kept value: 2, 4 or 8 (stochastically rounded levels), 16 or 32
    bits: int = 8
    # int8, prune, topk: kept values per quantisation scale; 0 = one scale per tensor
    block: int = 0
    # int8, prune, topk: what the codec left out stays on the device and joins the next update
    error_feedback: bool = True
    # Deep Gradient Compression: momentum correction (0 = off), local clipping of each delta's
    # L2 norm (0 = off), and rounds of sparsity warm-up for topk (0 = none)
    momentum: float = 0.0
    clip: float = 0.0
    warmup_rounds: int = 0
    # a device drops its error feedback when it was built on a model more versions back
    max_staleness: int = 10
    # every codec: try zstd on the whole update envelope, keep it only when it is smaller
    zstd: bool = True
    # the global model on the downlink: fp32 | fp16 | int8 | delta (the change since the version
    # devices hold, compressed; a device that lacks that version fetches the full fp32 model)
    downlink: str = "fp32"
    # delta: bits per changed value (8, 16 or 32); int8 and delta: values per scale
    downlink_bits: int = 8
    downlink_block: int = 64

    def __post_init__(self) -> None:
        # Checked here, where the file is loaded, so that a bad value names the config and not
        # the scheduler that would build the codec later; the codec itself is a frozen value
        # the scheduler builds from this table once (edgefl/compression/, imported here and not
        # at the top: compression reads these defaults, so it imports this module).
        from edgefl.compression import codec_from_config

        codec_from_config(self)


# [rounds] mode, and the staleness weightings of asynchronous mode (aggregator/staleness.py)
ROUND_MODES = ("sync", "async")
STALENESS_WEIGHTINGS = ("constant", "polynomial", "hinge")


@dataclass
class RoundsConfig:
    """Synchronous rounds, as docs/architecture.md describes them, or asynchronous buffered
    aggregation (``mode = "async"``: FedBuff, aggregator/asynchronous.py)."""

    # "sync": rounds that wait for their participants. "async": devices train all the time and
    # every buffer_size updates make a new model version; then `rounds` counts versions.
    mode: str = "sync"
    rounds: int = 30
    # Participants per round; 0 means every eligible online device.
    participants: int = 0
    # Devices that must be online before the first round starts; 0: every device on the
    # enrolled_devices list (one without a list). After wait_for_devices_s it starts anyway.
    min_devices: int = 0
    wait_for_devices_s: float = 120.0
    deadline_s: float = 60.0
    # Fraction of the round's participants that must report for the round to close at its deadline.
    quorum: float = 0.5
    # A device whose telemetry is older than this is not picked.
    telemetry_max_age_s: float = 60.0
    # A round stops waiting for devices that have been offline (Last Will) this long, rather
    # than until its deadline; shorter offline spells are often a broker or network blip.
    offline_grace_s: float = 5.0
    # A device on battery below this level is not picked unless it is charging.
    battery_floor_pct: float = 20.0
    # Pick this fraction more participants than the round needs and close it once the needed
    # number reported, so that the slowest few do not stall it (0 = wait for everyone) ...
    overcommit: float = 0.0
    # ... after waiting for the rest a little longer: this fraction of the time that took.
    overcommit_grace: float = 0.1
    # -- async mode only (participants, quorum and overcommit do not apply there) --
    # Devices training at once; 0 = every eligible device.
    concurrency: int = 0
    # Updates folded into the buffer before the server optimiser makes a new model version.
    buffer_size: int = 10
    # How an update's delta is scaled by its staleness s (versions published since its base):
    # "constant" (1), "polynomial" ((1 + s) ** -staleness_exponent; FedAsync, Xie et al. 2019)
    # or "hinge" (1 up to hinge_grace versions, then 1 / (hinge_slope * (s - hinge_grace) + 1)).
    staleness: str = "polynomial"
    staleness_exponent: float = 0.5
    hinge_slope: float = 10.0
    hinge_grace: int = 4
    # Updates staler than this are rejected ("stale") and counted.
    max_staleness: int = 20
    # At most this share of one buffer's updates from one device, while others can fill it.
    max_tasks_share: float = 0.25

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """ConfigError unless the values make sense (also for values set after construction)."""
        if self.mode not in ROUND_MODES:
            raise ConfigError(
                f"rounds.mode {self.mode!r} is not one of {', '.join(ROUND_MODES)}"
            )
        if self.staleness not in STALENESS_WEIGHTINGS:
            raise ConfigError(
                f"rounds.staleness {self.staleness!r} is not one of "
                f"{', '.join(STALENESS_WEIGHTINGS)}"
            )
        if self.concurrency < 0:
            raise ConfigError("rounds.concurrency must be >= 0 (0 = every eligible device)")
        if self.min_devices < 0:
            raise ConfigError("rounds.min_devices must be >= 0 (0 = every enrolled device)")
        if self.buffer_size < 1:
            raise ConfigError("rounds.buffer_size must be >= 1")
        if self.max_staleness < 0:
            raise ConfigError("rounds.max_staleness must be >= 0")
        if self.staleness_exponent < 0 or self.hinge_slope < 0 or self.hinge_grace < 0:
            raise ConfigError(
                "rounds.staleness_exponent, hinge_slope and hinge_grace must be >= 0"
            )
        if not 0.0 < self.max_tasks_share <= 1.0:
            raise ConfigError("rounds.max_tasks_share must be in (0, 1]")


@dataclass
class ScheduleConfig:
    """How the scheduler sizes each participant's work (aggregator/scheduler.py; README,
    "Scheduling and battery policy")."""

    # "uniform": every participant gets the [train] workload and the [codec] codec.
    # "adaptive": each gets the work it can finish within the round's time budget, judged from
    # its measured throughput, link and battery, and a codec that suits its link.
    workload: str = "uniform"
    # The round's time budget is the time in which this fraction of the eligible devices could
    # finish the full [train] workload (by their measured speed), capped by rounds.deadline_s.
    budget_quantile: float = 0.5
    # A fixed time budget per round instead, in seconds (0 = from budget_quantile).
    budget_s: float = 0.0
    # A device that is fast enough may do up to this many times the [train] epochs.
    max_work_factor: float = 2.0
    # A device that cannot do this fraction of the [train] epochs within the budget (time or
    # battery) is left out of the round.
    min_work_fraction: float = 0.1
    # A device on battery may spend at most this fraction of the energy it holds above the
    # floor in one round, so that it keeps contributing (less and less) instead of working
    # flat out until it reaches the floor and then not at all.
    battery_share: float = 0.2
    # Work for a device whose speed is not known yet (it has never reported), in epochs.
    probe_epochs: int = 1
    # Codecs from least to most compressed (names or specs that make_codec accepts); each
    # device gets the least compressed one whose upload takes at most upload_share of the
    # budget, else the most compressed. Empty: [codec] name only.
    codecs: list[Any] = field(default_factory=list)
    upload_share: float = 0.3
    # The round's deadline is budget * (1 + deadline_slack) after it opens, at most
    # rounds.deadline_s; a round with a device of unknown speed gets rounds.deadline_s.
    deadline_slack: float = 0.5
    # Adaptive batch size: the [train] batch size (at most the device's samples), halved down
    # to min_batch_size while training's estimated memory (aggregator/scheduler.py,
    # training_memory_bytes) exceeds memory_share of the free memory the device reports; a
    # device that cannot hold even min_batch_size sits the round out.
    min_batch_size: int = 8
    memory_share: float = 0.5


@dataclass
class StrategyConfig:
    """The server optimiser applied to the round's averaged delta."""

    name: str = "fedavg"  # fedavg | fedavgm | fedadam
    server_lr: float = 1.0
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    # FedNova (Wang et al., NeurIPS 2020): divide each update by its number of local steps and
    # rescale the mean by the average number of steps, so that devices that did more local
    # work do not pull the model towards their own optimum (useful with adaptive workloads).
    fednova: bool = False
    # How a round's deltas combine (aggregator/robust.py): "mean" (sample-weighted, FedAvg),
    # "norm_clip", "screened_clip" (drops deltas opposed to the coordinate-wise median, then
    # clips), "median" or "trimmed_mean". All but mean and a fixed norm_clip keep every delta
    # of the round in memory.
    aggregation: str = "mean"
    # trimmed_mean: fraction of the largest and of the smallest values dropped per coordinate
    trim_fraction: float = 0.2
    # norm_clip: a fixed L2 bound for every delta; 0 = clip_multiplier x the round's median norm
    clip_norm: float = 0.0
    clip_multiplier: float = 2.0


@dataclass
class LimitsConfig:
    """Limits on what the aggregator accepts from the wire."""

    max_update_bytes: int = 8 * 1024 * 1024
    # Updates with any value larger than this in absolute terms are rejected: a model's
    # weights move by far less in one round, and an absurd value could push the global model
    # past what float32 holds.
    max_delta_abs: float = 1e4


@dataclass
class QuarantineConfig:
    """When the aggregator cuts a device off at the broker (aggregator/guard.py; README,
    "Reliability and security"). An honest device sends a status when it connects, telemetry
    every few seconds and one update or reply per round: far below these."""

    enabled: bool = True
    # Messages per second one device may keep up, and how many above that it may send at once
    # (a token bucket): a device that reconnects sends a burst of what it queued.
    rate_per_s: float = 50.0
    burst: int = 500
    # Invalid messages (malformed, oversized, for another device or model, absurd values; not
    # late or duplicate updates, which honest devices send) within window_s that quarantine it.
    max_invalid: int = 20
    window_s: float = 60.0
    # After a quarantine, what is still queued from that device is dropped for this long; what
    # comes later means an operator re-admitted it (edgefl readmit).
    hold_s: float = 10.0
    # Rejections are logged once per device per interval, with counts by reason: a flood must
    # not fill a Pi's SD card with one line per message.
    log_interval_s: float = 10.0


@dataclass
class DeployConfig:
    """Exporting the global model to ONNX and rolling it out to the fleet."""

    # also export (into the model store) every K rounds; 0 = only the final model
    export_every: int = 0
    # also make an int8 variant with ONNX Runtime's quantisation tools
    int8: bool = True
    # which variant the fleet serves: "fp32" (exact) or "int8" (a third of the bytes)
    variant: str = "fp32"
    # An export whose fp32 logits differ from PyTorch's by more than this (largest absolute
    # difference on the held-out data) is never rolled out. Float32 rounding alone gives 0 to
    # about 1e-5 (the B1 model, logits of order 10: 0 to 5.7e-6 depending on the CPU's
    # kernels); a real export fault (wrong weights, a lost layer, a transposed matrix) moves
    # logits by 1e-2 or more. Deep models with large logits accumulate more rounding: raise it
    # for them rather than turn the check off.
    parity_tolerance: float = 1e-4
    # The int8 variant's logits differ from PyTorch's by tenths to units by design, so it is
    # judged by accuracy instead: it is not rolled out if its held-out accuracy is more than this
    # below the fp32 model's (and never if the fp32 export it was made from failed parity).
    int8_margin: float = 0.02
    # A model with convolutions is quantised to int8 statically: each activation's range is
    # fixed in advance from this many rows of the held-out data (eval_data; none: no int8
    # variant of such a model). The calibrator holds all their activations at once.
    calibration_samples: int = 256
    # publish the final model to the fleet when training ends
    rollout: bool = True
    # try a new model on this fraction of the online devices first; 0 = everyone at once
    canary_fraction: float = 0.0
    # a canary fails if its accuracy on its own data drops by more than this
    canary_margin: float = 0.02
    canary_timeout_s: float = 60.0
    rollout_timeout_s: float = 60.0
    # ONNX files travel in chunks of at most this size (managed brokers cap messages at 128 KB)
    chunk_bytes: int = 128 * 1024


# [personal] methods (device/personal/, one module each; README, "Personalised models")
PERSONAL_METHODS = ("none", "local", "finetune", "fedper", "fedrep", "ditto", "apfl", "perfedavg")
# the methods that keep their last personal_layers layers on the device: those layers are
# never sent, and the aggregator aggregates the rest of the model only
LAYER_METHODS = ("fedper", "fedrep")
HOLDOUT_SPLITS = ("random", "latest")


@dataclass
class PersonalConfig:
    """Personalised models: every device also keeps a model fitted to its own data, and
    reports its accuracy, and the global model's, on a held-out share of that data. The whole
    table travels with every task (edgefl/messages/control.py), so devices need no setting."""

    # none (plain FedAvg) | local (a model trained on the device's data alone: the baseline) |
    # finetune (the global model fine-tuned locally) | fedper, fedrep (the last personal_layers
    # layers stay on the device; Arivazhagan et al. 2019, Collins et al. 2021) | ditto (a
    # personal model regularised towards the global one; Li et al. 2021) | apfl (a learned mix
    # of a local and the global model; Deng et al. 2020) | perfedavg (first-order
    # meta-learning; Fallah et al. 2020)
    method: str = "none"
    # share of each device's data kept out of its training to evaluate on (any method but none)
    holdout: float = 0.2
    # how that share is chosen: "random" (a draw seeded by the device's id, for samples that
    # are independent of one another) | "latest" (the last share of each class in the order of
    # the device's data file: its newest data where the file is in the order it was recorded)
    holdout_split: str = "random"
    # "latest": samples of each class used by neither part, between its training and its
    # held-out ones, so that no held-out sample shares readings with a training one (1 for
    # windows that overlap their neighbour by half, as the watch set's do)
    holdout_gap: int = 0
    # fedper, fedrep: the last N layers with parameters stay on the device
    personal_layers: int = 1
    # personal training per task: finetune's epochs, ditto's personal model's, fedrep's head's,
    # local's; lr 0 = the task's
    epochs: int = 1
    lr: float = 0.0
    # ditto: weight of the proximal term lambda/2 ||v - w_global||^2 of the personal model
    ditto_lambda: float = 0.1
    # apfl: the initial mixing weight of the local model, learned per device afterwards
    apfl_alpha: float = 0.5
    # perfedavg: the inner (adaptation) step size, and the steps that adapt the global model
    # to the device's data to make its personal model
    perfedavg_alpha: float = 0.01
    adapt_steps: int = 5

    def __post_init__(self) -> None:
        if self.method not in PERSONAL_METHODS:
            raise ConfigError(
                f"personal.method {self.method!r} is not one of {', '.join(PERSONAL_METHODS)}"
            )
        if not 0.0 < self.holdout < 1.0:
            raise ConfigError("personal.holdout must lie in (0, 1)")
        if self.holdout_split not in HOLDOUT_SPLITS:
            raise ConfigError(
                f"personal.holdout_split {self.holdout_split!r} is not one of "
                f"{', '.join(HOLDOUT_SPLITS)}"
            )
        if not 0 <= self.holdout_gap <= 1000:
            raise ConfigError("personal.holdout_gap must be in 0..1000")
        if not 1 <= self.personal_layers <= 64:
            raise ConfigError("personal.personal_layers must be in 1..64")
        if not 0 <= self.epochs <= 1000 or not 0 <= self.adapt_steps <= 100_000:
            raise ConfigError("personal.epochs must be in 0..1000, adapt_steps in 0..100000")
        if not 0.0 <= self.lr <= 100.0 or not 0.0 <= self.perfedavg_alpha <= 100.0:
            raise ConfigError("personal.lr and perfedavg_alpha must be in [0, 100]")
        if not 0.0 <= self.ditto_lambda <= 1e4:
            raise ConfigError("personal.ditto_lambda must be in [0, 10000]")
        if not 0.0 <= self.apfl_alpha <= 1.0:
            raise ConfigError("personal.apfl_alpha must be in [0, 1]")

    @property
    def device_layers(self) -> int:
        """Layers that never leave the device (0 unless the method keeps some there)."""
        return self.personal_layers if self.method in LAYER_METHODS else 0


@dataclass
class FederationConfig:
    """What the aggregator of a deployment and a local run both set: the fleet, the model, the
    training each task asks for, and how rounds, aggregation and deployment go."""

    fleet: str = "demo"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    rounds: RoundsConfig = field(default_factory=RoundsConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    quarantine: QuarantineConfig = field(default_factory=QuarantineConfig)
    deploy: DeployConfig = field(default_factory=DeployConfig)
    personal: PersonalConfig = field(default_factory=PersonalConfig)
    seed: int = 0

    def federation(self) -> dict[str, Any]:
        """The shared settings, for building one configuration from another."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(FederationConfig)}


@dataclass
class AggregatorConfig(FederationConfig):
    broker: BrokerConfig = field(default_factory=lambda: BrokerConfig(username="aggregator"))
    # A file listing the enrolled device ids, one per line (edgefl enroll adds to it:
    # enrolled-devices.txt in the broker's directory, or its --registry FILE); anything from a
    # device not on it is ignored and counted. Unset: any device the broker lets in (warned).
    enrolled_devices: str | None = None
    # Held-out data (.npz with X and y) to evaluate the global model on after every round.
    eval_data: str | None = None
    # Where checkpoints, metrics and the exported ONNX model go.
    state_dir: str = "aggregator-state"


@dataclass
class ProfileConfig:
    """A device's hardware (device/profiles.py): its power model, and, for a simulated device,
    its speed, battery and link. A real device reads its battery and load from the machine."""

    # Power model for energy estimates: watts drawn while training and while uploading, and
    # the battery's capacity (turns energy into battery percent: the drain per unit of work).
    compute_w: float = 3.0
    radio_w: float = 1.0
    battery_wh: float = 10.0
    # Simulate the rest; simulated slowness and bandwidth take real wall time (the agent sleeps).
    simulated: bool = False
    # Training takes this many times as long as on the reference device.
    slowdown: float = 1.0
    # The reference device's training speed in samples/s; 0 = this machine's real speed.
    base_sps: float = 0.0
    # Battery level at the start; unset = on mains power.
    battery_pct: float | None = None
    charging: bool = False
    # Net power into the battery while charging (a simulated device; a real one cannot tell its
    # charger's power, so a real device on its charger counts as not draining). Work that draws
    # more than this drains a charging battery too.
    charge_w: float = 2.0
    # Upload bandwidth in kbit/s. Simulated: the link's bandwidth, 0 = no limit beyond the real
    # network. Real device: 0 = measure it (bytes of each update over the time to its PUBACK,
    # smoothed) and report that; a positive value is reported as it is instead.
    link_kbps: float = 0.0
    # A real device learns its bandwidth only from updates at least this large: the time to
    # the PUBACK of a small one is mostly round trip, which would make a fast link look slow.
    link_min_bytes: int = 16384
    # Simulated: the free memory it reports, in MB; 0 = this machine's.
    mem_available_mb: float = 0.0


@dataclass
class DeviceConfig:
    fleet: str = "demo"
    device_id: str = "device-0"
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    # Local training data: an .npz file with X (float32, samples x features) and y (int labels).
    data: str = "data.npz"
    model: ModelConfig = field(default_factory=ModelConfig)
    telemetry_interval_s: float = 10.0
    # Where the agent keeps what must survive a restart (models, error-feedback state).
    state_dir: str = "device-state"
    torch_threads: int = 1
    # local inference over HTTP on 127.0.0.1 (POST /predict); 0 = off
    http_port: int = 0
    # The agent declines work that would take its battery below this level (unless charging).
    battery_floor_pct: float = 20.0
    profile: ProfileConfig = field(default_factory=ProfileConfig)


@dataclass
class DemoConfig:
    """What `edgefl demo` and the benchmarks start locally."""

    devices: int = 20
    # Agents are spread over this many processes; each agent keeps its own MQTT connection.
    device_processes: int = 2
    # Also run one agent alone in its own process, to measure what one real device uses.
    solo_device: bool = True
    runs_dir: str = "runs"
    telemetry_interval_s: float = 10.0
    # Cap the private broker's packet limit (bytes; 0 = derived from the model, broker/limits.py)
    # like a managed broker's, e.g. 262144: then every model, delta, dense update and ONNX file
    # larger than that travels in chunks, as it must on such a broker.
    max_packet_bytes: int = 0


@dataclass
class RunConfig(FederationConfig):
    """A whole local run: the aggregator's settings plus the simulated fleet and its data."""

    data: DataConfig = field(default_factory=DataConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    # Hardware profiles of the simulated fleet: device i gets profiles[i % len(profiles)]
    # (none: every device is this machine as it is).
    profiles: list[ProfileConfig] = field(default_factory=list)


T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from a dict, checking key names and value types."""
    if not isinstance(data, dict):
        raise ConfigError(f"[{where or cls.__name__}] must be a table")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown key {unknown[0]!r} in [{where or 'top level'}]; known keys: "
            + ", ".join(sorted(names))
        )
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        kwargs[key] = _convert(hints[key], value, f"{where}.{key}" if where else key)
    obj = cls(**kwargs)
    if hasattr(obj, "fleet"):
        check_name("fleet", obj.fleet)
    if hasattr(obj, "device_id"):
        check_name("device id", obj.device_id)
    return obj


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _convert(options[0], value, where)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} should be a list, got {value!r}")
        (item,) = typing.get_args(hint) or (Any,)
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise ConfigError(f"{where} should be {hint.__name__}, got {value!r}")
        return value
    return value


def load(cls: type[T], path: str | Path, overrides: dict[str, Any] | None = None) -> T:
    """Read a TOML file into ``cls``; ``overrides`` (same shape) win over the file."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    if overrides:
        data = merge(data, overrides)
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """Write a (nested) dict as TOML; enough for the configuration files edgefl generates."""
    lines: list[str] = []
    for k, v in data.items():
        if not isinstance(v, dict) and v is not None:
            lines.append(f"{k} = {_toml_value(v)}")
    for k, v in data.items():
        if isinstance(v, dict):
            name = f"{prefix}.{k}" if prefix else k
            lines.append("")
            lines.append(f"[{name}]")
            lines.append(to_toml(v, name).rstrip("\n"))
    return "\n".join(line for line in lines).strip() + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        escaped = v.replace("\\", "\\\\").replace('"', '\\"')
        # TOML basic strings may not hold control characters (tab aside) unescaped
        escaped = re.sub(r"[\x00-\x08\x0a-\x1f\x7f]", lambda m: f"\\u{ord(m[0]):04x}", escaped)
        return f'"{escaped}"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # an inline table; TOML has no null, so None values are left out
        items = (f"{k} = {_toml_value(x)}" for k, x in v.items() if x is not None)
        return "{" + ", ".join(items) + "}"
    raise ConfigError(f"cannot write {v!r} as TOML")
