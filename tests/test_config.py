"""Configuration (edgefl/config.py) and the topic namespace (edgefl/topics.py)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from edgefl.config import (
    AggregatorConfig,
    BrokerConfig,
    ConfigError,
    DataConfig,
    DeviceConfig,
    RoundsConfig,
    RunConfig,
    StrategyConfig,
    TrainConfig,
    check_name,
    from_dict,
    load,
    merge,
    to_dict,
    to_toml,
)
from edgefl.topics import DEVICE_KINDS, Topics

B1 = Path(__file__).resolve().parent.parent / "configs" / "b1.toml"


def write(tmp_path: Path, text: str, name: str = "run.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def round_trip(obj):
    return from_dict(type(obj), tomllib.loads(to_toml(to_dict(obj))))


# ---------------------------------------------------------------------------------------------
# loading


def test_b1_loads_into_run_config():
    cfg = load(RunConfig, B1)
    assert cfg.fleet == "demo" and cfg.seed == 0
    assert cfg.model.name == "mlp_digits"
    assert cfg.data == DataConfig(
        dataset="digits", partition="dirichlet", alpha=0.5, seed=0, min_samples=10
    )
    assert cfg.train == TrainConfig(lr=0.1, batch_size=32, epochs=5)
    assert cfg.codec.name == "dense_fp32"
    assert (cfg.rounds.rounds, cfg.rounds.participants) == (30, 0)
    assert (cfg.rounds.deadline_s, cfg.rounds.quorum) == (30.0, 0.5)
    assert cfg.rounds.wait_for_devices_s == 60.0
    assert cfg.rounds.telemetry_max_age_s == RoundsConfig().telemetry_max_age_s  # not in the file
    assert cfg.strategy == StrategyConfig(name="fedavg")
    assert (cfg.demo.devices, cfg.demo.device_processes, cfg.demo.solo_device) == (20, 2, True)


def test_an_empty_file_gives_the_defaults(tmp_path):
    assert load(RunConfig, write(tmp_path, "")) == RunConfig()
    assert load(DeviceConfig, write(tmp_path, "")) == DeviceConfig()
    agg = load(AggregatorConfig, write(tmp_path, ""))
    assert agg == AggregatorConfig() and agg.broker.username == "aggregator"


def test_unknown_top_level_key_is_named(tmp_path):
    path = write(tmp_path, 'fleet = "demo"\ncolour = "blue"\n')
    with pytest.raises(ConfigError, match=r"unknown key 'colour' in \[top level\]") as info:
        load(RunConfig, path)
    assert str(path) in str(info.value)
    assert "fleet" in str(info.value)  # the known keys are listed


def test_unknown_key_in_a_table_is_named_with_the_table(tmp_path):
    path = write(tmp_path, "[train]\nlr = 0.1\nlearning_rate = 0.2\n")
    with pytest.raises(ConfigError, match=r"unknown key 'learning_rate' in \[train\]") as info:
        load(RunConfig, path)
    assert "batch_size, epochs, lr" in str(info.value)


def test_unknown_table_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'optimizer' in \[top level\]"):
        load(RunConfig, write(tmp_path, "[optimizer]\nname = 'sgd'\n"))


def test_unknown_key_in_a_nested_table(tmp_path):
    path = write(tmp_path, "[broker]\nhost = 'x'\nport_number = 1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'port_number' in \[broker\]"):
        load(DeviceConfig, path)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('[train]\nepochs = "5"', r"train\.epochs should be int, got '5'"),
        ("[train]\nepochs = 5.5", r"train\.epochs should be int, got 5\.5"),
        ("[train]\nepochs = true", r"train\.epochs should be int, got True"),
        ('[train]\nlr = "fast"', r"train\.lr should be float, got 'fast'"),
        ("[train]\nlr = true", r"train\.lr should be float, got True"),
        ("[demo]\nsolo_device = 1", r"demo\.solo_device should be bool, got 1"),
        ("fleet = 5", r"fleet should be str, got 5"),
        ("seed = 1.0", r"seed should be int"),
        ("[model]\nname = ['mlp']", r"model\.name should be str"),
        ("train = 5", r"\[train\] must be a table"),
    ],
)
def test_wrong_types_are_rejected(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load(RunConfig, write(tmp_path, text + "\n"))


def test_wrong_type_in_an_optional_field(tmp_path):
    with pytest.raises(ConfigError, match=r"broker\.tls_ca should be str, got 5"):
        load(DeviceConfig, write(tmp_path, "[broker]\ntls_ca = 5\n"))


def test_int_is_accepted_for_a_float_field(tmp_path):
    cfg = load(RunConfig, write(tmp_path, "[train]\nlr = 1\n[rounds]\ndeadline_s = 45\n"))
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.rounds.deadline_s == 45.0 and isinstance(cfg.rounds.deadline_s, float)


@pytest.mark.parametrize(
    "name", ["Demo", "de mo", "demo/x", "demo+", "#", "", "a" * 65, "démo", "demo\n"]
)
def test_bad_fleet_names_are_rejected(tmp_path, name):
    with pytest.raises(ConfigError, match="fleet .* is not a valid name"):
        from_dict(RunConfig, {"fleet": name})
    with pytest.raises(ConfigError, match="fleet"):
        from_dict(AggregatorConfig, {"fleet": name})


@pytest.mark.parametrize("name", ["Pi-1", "pi.1", "pi/1", "pi 1", "", "x" * 65, "pi-1\n"])
def test_bad_device_ids_are_rejected(tmp_path, name):
    with pytest.raises(ConfigError, match="device id .* is not a valid name"):
        from_dict(DeviceConfig, {"device_id": name})


@pytest.mark.parametrize("name", ["a", "pi-1", "fleet_2", "0", "x" * 64, "a-b_c-9"])
def test_good_names_are_accepted(name):
    assert check_name("device id", name) == name
    assert from_dict(DeviceConfig, {"fleet": name, "device_id": name}).device_id == name


def test_missing_file_gives_config_error_with_the_path(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="nope.toml does not exist"):
        load(RunConfig, path)


@pytest.mark.parametrize("text", ["[train\nlr = 0.1", "lr = ", "a = 1\na = 2", "x = 'open"])
def test_invalid_toml_gives_config_error_with_the_path(tmp_path, text):
    path = write(tmp_path, text, name="broken.toml")
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load(RunConfig, path)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------------------------------------
# writing: to_toml loads back to an equal object


@pytest.mark.parametrize(
    "obj",
    [
        AggregatorConfig(),
        AggregatorConfig(
            fleet="plant-7",
            broker=BrokerConfig(
                host="mqtt.example.org",
                port=8883,
                username="aggregator",
                password='p"a\\ss\tw\nrd\x7f',  # quotes, backslash, tab, newline, DEL
                tls_ca="/etc/edgefl/ca.pem",
                connect_timeout_s=2.5,
            ),
            train=TrainConfig(lr=0.05, batch_size=16, epochs=1),
            rounds=RoundsConfig(rounds=100, participants=8, quorum=0.75, deadline_s=1e-3),
            strategy=StrategyConfig(name="fedadam", server_lr=0.01, tau=1e-9),
            eval_data="held out/test.npz",
            seed=12345678901,
        ),
        AggregatorConfig(broker=BrokerConfig(username=None)),
        DeviceConfig(),
        DeviceConfig(
            fleet="f",
            device_id="pi-42",
            broker=BrokerConfig(username="pi-42", password="s3cret", keepalive_s=5),
            data="/var/lib/edgefl/data.npz",
            telemetry_interval_s=0.1,
            torch_threads=4,
        ),
        RunConfig(),
        load(RunConfig, B1),
    ],
    ids=["agg-default", "agg-custom", "agg-no-user", "dev-default", "dev-custom", "run", "b1"],
)
def test_to_toml_loads_back_to_an_equal_object(tmp_path, obj):
    assert round_trip(obj) == obj
    path = write(tmp_path, to_toml(to_dict(obj)))
    assert load(type(obj), path) == obj


def test_to_toml_writes_tables_after_scalars():
    text = to_toml(to_dict(RunConfig()))
    lines = text.splitlines()
    assert lines[0] == 'fleet = "demo"'
    assert "[train]" in lines and "[demo]" in lines
    assert lines.index("seed = 0") < lines.index("[model]")
    assert text.endswith("\n")


# ---------------------------------------------------------------------------------------------
# overrides


def test_overrides_merge_over_the_file():
    cfg = load(
        RunConfig,
        B1,
        overrides={"fleet": "bench", "train": {"lr": 0.05}, "rounds": {"rounds": 3}},
    )
    assert cfg.fleet == "bench"
    assert cfg.train.lr == 0.05 and cfg.train.batch_size == 32 and cfg.train.epochs == 5
    assert cfg.rounds.rounds == 3 and cfg.rounds.deadline_s == 30.0
    assert cfg.demo.devices == 20


def test_overrides_add_tables_the_file_lacks(tmp_path):
    cfg = load(
        RunConfig,
        write(tmp_path, 'fleet = "x"\n'),
        overrides={"limits": {"max_update_bytes": 1024}},
    )
    assert cfg.limits.max_update_bytes == 1024 and cfg.fleet == "x"


def test_overrides_are_checked_like_the_file():
    with pytest.raises(ConfigError, match=r"unknown key 'lrate' in \[train\]"):
        load(RunConfig, B1, overrides={"train": {"lrate": 0.05}})
    with pytest.raises(ConfigError, match=r"train\.epochs should be int"):
        load(RunConfig, B1, overrides={"train": {"epochs": "many"}})


def test_merge_is_deep_and_leaves_its_inputs_alone():
    base = {"a": 1, "t": {"x": 1, "y": 2}, "u": {"k": 1}}
    over = {"t": {"y": 3, "z": 4}, "u": 5, "b": {"n": 1}}
    merged = merge(base, over)
    assert merged == {"a": 1, "t": {"x": 1, "y": 3, "z": 4}, "u": 5, "b": {"n": 1}}
    assert base == {"a": 1, "t": {"x": 1, "y": 2}, "u": {"k": 1}}
    assert over == {"t": {"y": 3, "z": 4}, "u": 5, "b": {"n": 1}}


# ---------------------------------------------------------------------------------------------
# topics


def test_topic_strings_of_the_architecture():
    t = Topics("plant-7")
    assert t.root == "edgefl/plant-7"
    assert t.status("pi-1") == "edgefl/plant-7/devices/pi-1/status"
    assert t.telemetry("pi-1") == "edgefl/plant-7/devices/pi-1/telemetry"
    assert t.task("pi-1") == "edgefl/plant-7/devices/pi-1/task"
    assert t.update("pi-1") == "edgefl/plant-7/devices/pi-1/update"
    assert t.model_global == "edgefl/plant-7/model/global"
    assert t.model_onnx == "edgefl/plant-7/model/onnx"
    assert t.aggregator_status == "edgefl/plant-7/aggregator/status"
    assert t.all_devices("update") == "edgefl/plant-7/devices/+/update"
    assert t.all_devices("status") == "edgefl/plant-7/devices/+/status"


def test_topics_refuse_bad_names_and_kinds():
    with pytest.raises(ConfigError, match="fleet"):
        Topics("Plant")
    with pytest.raises(ConfigError, match="fleet"):
        Topics("plant/7")
    t = Topics("demo")
    with pytest.raises(ConfigError, match="device id"):
        t.update("pi/1")
    with pytest.raises(ConfigError, match="device id"):
        t.status("+")
    with pytest.raises(ValueError, match="unknown device topic kind 'weights'"):
        t.device("pi-1", "weights")
    with pytest.raises(ValueError, match="unknown device topic kind"):
        t.all_devices("#")


@pytest.mark.parametrize("kind", DEVICE_KINDS)
@pytest.mark.parametrize("device", ["pi-1", "a", "0", "x" * 64, "node_3-b"])
def test_parse_device_topic_accepts_this_fleets_device_topics(device, kind):
    t = Topics("demo")
    assert t.parse_device_topic(f"edgefl/demo/devices/{device}/{kind}") == (device, kind)
    assert t.parse_device_topic(t.device(device, kind)) == (device, kind)


@pytest.mark.parametrize(
    "topic",
    [
        "edgefl/other/devices/pi-1/update",  # another fleet
        "edgefl/demo/devices/pi-1/update/extra",  # extra level
        "edgefl/demo/devices/pi-1/update/",  # trailing empty level
        "edgefl/demo/pi-1/update",  # missing level
        "/edgefl/demo/devices/pi-1/update",
        "edgefl/demo/devices/+/update",  # wildcards
        "edgefl/demo/devices/#",
        "edgefl/demo/devices/pi-1/#",
        "edgefl/+/devices/pi-1/update",
        "edgefl/demo/devices//update",  # empty id
        "edgefl/demo/devices/Pi-1/update",  # bad ids
        "edgefl/demo/devices/pi.1/update",
        "edgefl/demo/devices/pi 1/update",
        "edgefl/demo/devices/pi-1\n/update",
        "edgefl/demo/devices/" + "x" * 65 + "/update",
        "edgefl/demo/devices/pi-1/weights",  # unknown kinds
        "edgefl/demo/devices/pi-1/Update",
        "edgefl/demo/devices/pi-1/",
        "edgefl/demo/model/global",  # not a device topic
        "edgefl/demo/aggregator/status",
        "EDGEFL/demo/devices/pi-1/update",
        "edgefl/demo/device/pi-1/update",
        "$share/workers/edgefl/demo/devices/pi-1/update",
        "",
    ],
)
def test_parse_device_topic_rejects(topic):
    assert Topics("demo").parse_device_topic(topic) is None


@pytest.mark.parametrize(
    "table, match",
    [
        ('name = "topk"\nfraction = 2.0', r"\[codec\] topk: fraction"),
        ('name = "topk"\nbits = 3', r"\[codec\] topk: .*bits"),
        ('name = "gzip"', r"codec.name 'gzip'"),
    ],
)
def test_a_codec_the_table_cannot_build_is_refused_where_the_file_is_loaded(tmp_path, table, match):
    # not later, when the scheduler builds the codec: the error names the file
    path = write(tmp_path, f"[codec]\n{table}\n")
    with pytest.raises(ConfigError, match=match) as info:
        load(AggregatorConfig, path)
    assert str(path) in str(info.value)
