"""The aggregator's list of enrolled devices."""

from __future__ import annotations

import os

import pytest

from aggregator.enrolled import EnrolledDevices, add_ids, read_ids


def test_without_a_list_everyone_is_enrolled() -> None:
    assert "anyone" in EnrolledDevices(None)


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


def test_a_missing_list_is_an_error_at_start(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        EnrolledDevices(tmp_path / "nope.txt")
