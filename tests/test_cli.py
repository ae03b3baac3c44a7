"""The `edgefl` command as a user meets it, run in a subprocess: --version, the help, and the
errors a user can fix, each one line on standard error with its fix and the right exit code
(2 for usage and configuration, 1 at run time), never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgefl.config import AggregatorConfig, BrokerConfig, to_dict, to_toml

ROOT = Path(__file__).resolve().parent.parent


def edgefl(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "launch", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_error_line(result: subprocess.CompletedProcess[str], code: int) -> str:
    """The one line a failed command printed; checks the exit code and that nothing else,
    a traceback least of all, came with it."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert result.returncode == code, (result.returncode, result.stderr)
    return lines[0]


# -- version and help ---------------------------------------------------------------------------


def test_version_prints_the_package_version() -> None:
    from importlib.metadata import version

    result = edgefl("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"edgefl {version('edgefl')}"


def test_the_help_lists_every_command_with_a_description_and_no_markup() -> None:
    from launch.cli import build_parser

    result = edgefl("--help")
    assert result.returncode == 0, result.stderr
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    helps = {c.dest: c.help for c in sub._choices_actions}
    assert set(helps) == set(sub.choices)  # every command has a line of help
    lines = result.stdout.splitlines()
    for command, text in helps.items():
        assert text, f"{command} has no description"
        assert any(line.split()[:1] == [command] for line in lines), f"{command} not listed"
    assert "``" not in result.stdout and "Exit codes" in result.stdout
    for command, parser in sub.choices.items():  # and every option of every command says what
        silent = [a.dest for a in parser._actions if not a.help]
        assert not silent, f"edgefl {command}: {silent} have no help"


def test_an_unknown_log_level_is_refused_with_the_choices() -> None:
    result = edgefl("--log-level", "debugg", "certs", "--help")
    assert result.returncode == 2
    assert "DEBUG" in result.stderr and "WARNING" in result.stderr and "invalid" in result.stderr
    assert edgefl("--log-level", "debug", "certs", "--help").returncode == 0  # any case


# -- configuration files ------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["aggregator", "device"])
@pytest.mark.parametrize("case", ["directory", "missing", "not-toml", "not-utf8"])
def test_a_config_that_cannot_be_read_is_one_line_and_exit_2(
    tmp_path: Path, command: str, case: str
) -> None:
    path = tmp_path / "edgefl.toml"
    if case == "directory":
        path.mkdir()
    elif case == "not-toml":
        path.write_text("fleet = \n")
    elif case == "not-utf8":
        path.write_bytes(b"fleet = '\xff'\n")
    line = one_error_line(edgefl(command, "--config", str(path)), 2)
    assert line.startswith(f"edgefl {command}: ") and str(path) in line
    expected = {"directory": "is a directory", "missing": "does not exist"}
    assert expected.get(case, "not valid TOML") in line
    assert "configs/" in line  # where to find a good one


# -- data and models ----------------------------------------------------------------------------


def _aggregator_config(tmp_path: Path, eval_data: Path) -> Path:
    cfg = AggregatorConfig(
        fleet="test",
        # never reached: the data is checked before the aggregator connects
        broker=BrokerConfig(port=9, connect_timeout_s=1.0),
        state_dir=str(tmp_path / "state"),
        eval_data=str(eval_data),
    )
    path = tmp_path / "aggregator.toml"
    path.write_text(to_toml(to_dict(cfg)))
    return path


@pytest.mark.parametrize("case", ["missing", "not-npz", "no-labels", "wrong-features"])
def test_bad_eval_data_is_one_line_naming_the_setting(tmp_path: Path, case: str) -> None:
    data = tmp_path / "eval.npz"
    if case == "not-npz":
        data.write_text("x,y\n1,2\n")
    elif case == "no-labels":
        np.savez(data, X=np.zeros((4, 64), np.float32))
    elif case == "wrong-features":
        np.savez(data, X=np.zeros((4, 3), np.float32), y=np.zeros(4, np.int64))
    config = _aggregator_config(tmp_path, data)
    line = one_error_line(edgefl("aggregator", "--config", str(config)), 2)
    assert str(data) in line and "eval_data" in line
    expected = {
        "missing": "does not exist",
        "not-npz": "not an .npz",
        "no-labels": "missing arrays ['y']",
        "wrong-features": "3 features, the model takes 64",
    }
    assert expected[case] in line


def test_predict_without_an_installed_model_says_where_it_looked(tmp_path: Path) -> None:
    samples = tmp_path / "x.npy"
    np.save(samples, np.zeros((2, 64), np.float32))
    models = tmp_path / "models"
    line = one_error_line(edgefl("predict", str(samples), "--model-dir", str(models)), 1)
    assert f"no model installed in {models}" in line and "--model-dir" in line


def test_predict_with_a_missing_input_file_is_a_usage_error(tmp_path: Path) -> None:
    line = one_error_line(edgefl("predict", str(tmp_path / "none.npz")), 2)
    assert f"input file {tmp_path / 'none.npz'} does not exist" in line


# -- the broker ---------------------------------------------------------------------------------


@pytest.mark.broker
def test_broker_on_a_port_another_mosquitto_holds_names_it_and_the_fix(broker, tmp_path) -> None:
    # the private Mosquitto plays the system's: it listens on the port asked for
    workdir = tmp_path / "deployment"
    result = edgefl("broker", "--dir", str(workdir), "--port", str(broker.port))
    line = one_error_line(result, 1)
    assert f"port {broker.port} on 0.0.0.0 is already in use" in line
    assert "systemctl stop mosquitto" in line and "--port N" in line
    assert not (workdir / "mosquitto.pid").exists()  # no Mosquitto was started
