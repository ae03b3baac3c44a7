"""The aggregator's list of enrolled devices."""

from __future__ import annotations

import logging
import os

import pytest

from aggregator.enrolled import EnrolledDevices, add_ids, read_ids
from edgefl.config import ConfigError


def test_without_a_list_everyone_is_enrolled_and_a_warning_says_so_once(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="aggregator.enrolled"):
        enrolled = EnrolledDevices(None)
        assert "anyone" in enrolled and "someone-else" in enrolled
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "every device the broker admits will be accepted" in warning.getMessage()


def test_with_a_list_there_is_no_warning(tmp_path, caplog) -> None:
    add_ids(tmp_path / "devices.txt", ["dev-0"])
    with caplog.at_level(logging.WARNING, logger="aggregator.enrolled"):
        EnrolledDevices(tmp_path / "devices.txt")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_list_is_read_with_comments_and_bad_ids_skipped(tmp_path) -> None:
    path = tmp_path / "devices.txt"
    path.write_text("# kitchen\npi-kitchen\n\npi-garage  # by the door\nNot Valid\n")
    assert read_ids(path) == {"pi-kitchen", "pi-garage"}
    enrolled = EnrolledDevices(path)
    assert "pi-kitchen" in enrolled and "pi-garage" in enrolled
    assert "stranger" not in enrolled


def test_a_device_added_later_is_accepted_without_restart(tmp_path) -> None:
    path = tmp_path / "devices.txt"
    add_ids(path, ["dev-0"])
    enrolled = EnrolledDevices(path, recheck_s=0.0)
    assert "dev-1" not in enrolled
    add_ids(path, ["dev-0", "dev-1"])
    os.utime(path, (1, 1))  # a new mtime, whatever the file system's resolution
    assert "dev-1" in enrolled
    assert path.read_text().splitlines() == ["dev-0", "dev-1"]


def test_a_missing_list_is_a_configuration_error_at_start(tmp_path) -> None:
    # a configuration error: `edgefl aggregator` exits 2 with the message, and systemd does
    # not restart it every 5 s (RestartPreventExitStatus=2)
    with pytest.raises(ConfigError, match="edgefl enroll") as error:
        EnrolledDevices(tmp_path / "nope.txt")
    assert str(tmp_path / "nope.txt") in str(error.value)
