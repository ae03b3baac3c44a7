"""edgefl/atomic.py: the one way state is written."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from edgefl.atomic import replacing, write_atomic


def test_write_replaces_the_file_whole_and_leaves_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "state.json"
    write_atomic(target, "old")
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["state.json"]


def test_mode_is_applied(tmp_path: Path) -> None:
    target = write_atomic(tmp_path / "secret", "pw\n", mode=0o600)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    write_atomic(target, "conf", mode=0o644)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_a_failure_while_writing_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "model.onnx"
    write_atomic(target, b"v1")
    with pytest.raises(RuntimeError), replacing(target) as tmp:
        tmp.write_bytes(b"half of v2")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"v1"
    assert os.listdir(tmp_path) == ["model.onnx"]


def test_the_block_may_write_the_temporary_path_itself(tmp_path: Path) -> None:
    # tools that take a file name (ONNX Runtime's quantiser, numpy) write to the path given
    with replacing(tmp_path / "out.bin") as tmp, open(tmp, "wb") as f:
        f.write(b"x" * 10)
    assert (tmp_path / "out.bin").read_bytes() == b"x" * 10
