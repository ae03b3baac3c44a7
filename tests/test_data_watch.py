"""The smartwatch set (edgefl/data/watch.py, edgefl/data/watch_setup.py): the set-up conversion
of seglearn's pickled dict into a plain .npz, the run-time loader that reads only that (without
pickle), the windows and the leave-subjects-out split; then the real converted set."""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from edgefl.data import DataMissingError, load_watch_split
from edgefl.data.watch import (
    ARRAYS,
    ENV_PATH,
    FEATURES,
    STEP,
    WINDOW,
    load_watch_recordings,
    watch_npz_path,
    windows,
)
from edgefl.data.watch_setup import (
    MEMBER_SHA256,
    convert_watch_pickle,
    main,
    write_watch_npz,
)
from tests.data_sets import LABELS, pickled_npy, require_installed, watch_dict

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def small(tmp_path):
    """A converted stand-in: 3 subjects x 7 exercises x 2 arms, random lengths 150-399."""
    npy, sha = pickled_npy(watch_dict(subjects=3))
    rec = convert_watch_pickle(npy, sha)
    return rec, write_watch_npz(rec, tmp_path / "watch.npz")


# ---------------------------------------------------------------------------------------------
# set-up: the conversion


def test_conversion_keeps_every_recording(small):
    rec, _path = small
    source = watch_dict(subjects=3)
    assert len(rec) == 42 and rec.signal.shape == (sum(len(x) for x in source["X"]), 6)
    for r in (0, 17, 41):
        np.testing.assert_allclose(
            rec.signal[rec.offsets[r] : rec.offsets[r + 1]], source["X"][r], rtol=1e-6
        )
    np.testing.assert_array_equal(rec.label, source["y"])
    np.testing.assert_array_equal(rec.subject, source["subject"])
    np.testing.assert_array_equal(rec.side, source["side"].astype(np.int64))
    assert rec.label_names == tuple(LABELS) and rec.channel_names[3] == "wx"


def test_converted_file_holds_no_object_arrays_and_loads_without_pickle(small):
    rec, path = small
    with np.load(path, allow_pickle=False) as z:
        assert sorted(z.files) == sorted(ARRAYS)
        kinds = {name: z[name].dtype.kind for name in z.files}
    assert set(kinds.values()) <= {"f", "i", "U"}, kinds
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    got = load_watch_recordings(path)
    np.testing.assert_array_equal(got.signal, rec.signal)
    np.testing.assert_array_equal(got.offsets, rec.offsets)
    assert got.label_names == rec.label_names


class _Trap:
    """Unpickling this creates a directory: proof that the bytes were unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_conversion_unpickles_only_the_pinned_bytes(tmp_path):
    marker = tmp_path / "unpickled"
    data = watch_dict(subjects=1)
    data["trap"] = _Trap(marker)
    npy, sha = pickled_npy(data)
    with pytest.raises(ValueError, match="not the pinned .*refusing to unpickle"):
        convert_watch_pickle(npy)  # the real file's hash: these bytes differ
    assert not marker.exists()
    convert_watch_pickle(npy, sha)  # with their own hash they are unpickled: the trap works
    assert marker.is_dir()
    assert len(MEMBER_SHA256) == 64


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda d: d.pop("subject"), r"missing \['subject'\]"),
        (lambda d: d["X"].__setitem__(3, np.zeros((200, 5))), r"\(readings, 6\)"),
        (lambda d: d.__setitem__("y", d["y"][:-1]), "y must hold one whole number per recording"),
        (lambda d: d.__setitem__("side", d["side"] + 0.5), "side must hold one whole number"),
        (lambda d: d.__setitem__("y", d["y"] + 3), r"labels must lie in \[0, 7\)"),
        (lambda d: d.__setitem__("y_labels", ["a"]), "7 label names"),
        (lambda d: d["X"][0].__setitem__((5, 2), np.nan), "NaN or Inf"),
    ],
    ids=["no-subject", "5-channels", "short-y", "half-side", "label-7", "names", "nan"],
)
def test_conversion_refuses_what_it_does_not_understand(change, match):
    data = watch_dict(subjects=1)
    change(data)
    npy, sha = pickled_npy(data)
    with pytest.raises(ValueError, match=match):
        convert_watch_pickle(npy, sha)


def test_setup_command_is_quick_when_done_and_redoes_an_unusable_file(small, tmp_path, capsys):
    _rec, path = small
    assert main(["--out", str(path)]) == 0
    assert "already converted" in capsys.readouterr().out
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"garbage")
    # unusable: it tries again, here from a wheel that is not one (no network needed)
    wheel = tmp_path / "seglearn-1.2.5-py3-none-any.whl"
    wheel.write_bytes(b"not a zip")
    assert main(["--out", str(broken), "--wheel", str(wheel)]) == 1
    out, err = capsys.readouterr()
    assert "is unusable" in out and "not a seglearn wheel" in err


# ---------------------------------------------------------------------------------------------
# run time: the loader


def test_missing_file_names_the_setup_command(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_PATH, str(tmp_path / "none.npz"))
    assert watch_npz_path() == tmp_path / "none.npz"
    with pytest.raises(DataMissingError, match=r"none.npz does not exist.*make setup"):
        load_watch_recordings()


def test_default_location_is_in_the_environment_that_runs_edgefl(monkeypatch):
    monkeypatch.delenv(ENV_PATH, raising=False)
    assert watch_npz_path() == Path(sys.prefix) / "share" / "edgefl" / "watch.npz"


def test_loader_refuses_the_original_pickle_without_unpickling(tmp_path):
    marker = tmp_path / "unpickled"
    data = watch_dict(subjects=1)
    data["trap"] = _Trap(marker)
    npy, _sha = pickled_npy(data)
    original = tmp_path / "watch_dataset.npy"
    original.write_bytes(npy)
    with pytest.raises(ValueError):
        load_watch_recordings(original)
    # an .npz holding an object array is refused too
    evil = tmp_path / "evil.npz"
    arrays = {name: np.zeros(1) for name in ARRAYS}
    arrays["label"] = np.array([_Trap(marker)], dtype=object)
    np.savez(evil, **arrays)
    with pytest.raises(ValueError, match="allow_pickle"):
        load_watch_recordings(evil)
    assert not marker.exists()


def test_loader_checks_the_arrays(small, tmp_path):
    rec, _path = small
    arrays = rec.arrays()
    arrays["offsets"] = arrays["offsets"].copy()
    arrays["offsets"][-1] += 1
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match="end at the signal's length"):
        load_watch_recordings(tmp_path / "bad.npz")
    arrays = rec.arrays()
    del arrays["subject"]
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=r"missing arrays \['subject'\]"):
        load_watch_recordings(tmp_path / "bad.npz")


def test_only_the_setup_module_unpickles():
    """No run-time code may load with allow_pickle=True; the set-up conversion is the one place."""
    found = {
        str(p.relative_to(REPO))
        for role in ("edgefl", "device", "aggregator", "broker", "monitor", "launch")
        for p in (REPO / role).rglob("*.py")
        if re.search(r"allow_pickle\s*=\s*True|pickle\.loads?\(", p.read_text())
    }
    assert found == {"edgefl/data/watch_setup.py"}


# ---------------------------------------------------------------------------------------------
# run time: windows and the leave-subjects-out split


def test_windows_per_recording_and_channel_major(small):
    rec, _path = small
    data = windows(rec)
    lengths = np.diff(rec.offsets)
    expected = (lengths - WINDOW) // STEP + 1
    assert len(data) == expected.sum() and data.X.shape[1] == FEATURES == 600
    assert data.X.dtype == np.float32 and data.y.dtype == np.int64
    # window 1 of recording 0 starts at reading STEP: X.reshape(6, 100) is (channel, time)
    w = data.X[1].reshape(6, WINDOW)
    np.testing.assert_array_equal(w, rec.signal[STEP : STEP + WINDOW].T)
    # labels and subjects follow the recordings, window by window
    np.testing.assert_array_equal(data.y, np.repeat(rec.label, expected))
    np.testing.assert_array_equal(data.subjects, np.repeat(rec.subject, expected))


def test_windows_never_span_two_recordings(small):
    rec, _path = small
    # make each recording constant at its own index: a window that spanned two would mix values
    constant = np.repeat(np.arange(len(rec), dtype=np.float32), np.diff(rec.offsets))
    marked = dataclasses.replace(rec, signal=np.repeat(constant[:, None], 6, axis=1))
    data = windows(marked)
    assert np.all(data.X.min(axis=1) == data.X.max(axis=1))
    # a recording shorter than one window gives none
    lengths = [250, 99, 100, 149, 150] + [300] * 9
    npy, sha = pickled_npy(watch_dict(subjects=1, lengths=lengths))
    short = windows(convert_watch_pickle(npy, sha), recordings=[1, 2, 3, 4])
    assert len(short) == 0 + 1 + 1 + 2


def test_leave_subjects_out(small):
    _rec, path = small
    train, test = load_watch_split([2], path)
    assert set(train.subjects.tolist()) == {1, 3} and set(test.subjects.tolist()) == {2}
    assert len(train) + len(test) == len(windows(load_watch_recordings(path)))
    assert set(test.y.tolist()) == set(range(7))
    for bad in ([4], [], [1, 2, 3]):
        with pytest.raises(ValueError, match=r"must be one or more, but not all, of the subjects"):
            load_watch_split(bad, path)


# ---------------------------------------------------------------------------------------------
# the real converted set


@pytest.fixture(scope="module")
def real():
    path = watch_npz_path()
    require_installed(path.is_file(), f"the converted watch set ({path})", "run `make setup`")
    return load_watch_recordings(path)


def test_real_watch_recordings(real):
    assert len(real) == 140 and real.signal.shape == (244_102, 6)
    assert real.channel_names == ("ax", "ay", "az", "wx", "wy", "wz")
    assert real.label_names == tuple(LABELS)
    assert np.bincount(real.label).tolist() == [20] * 7
    assert sorted(set(real.subject.tolist())) == list(range(1, 11))
    # every subject did every exercise once with each arm
    for s in range(1, 11):
        mine = real.subject == s
        assert sorted(real.label[mine].tolist()) == sorted(list(range(7)) * 2)
        for c in range(7):
            assert sorted(real.side[mine & (real.label == c)].tolist()) == [0, 1]
    lengths = np.diff(real.offsets)
    assert (lengths.min(), lengths.max()) == (947, 2618)


def test_real_watch_windows_and_split(real):
    data = windows(real)
    assert data.X.shape == (4_677, 600)
    per_subject = np.bincount(data.subjects, minlength=11)[1:].tolist()
    assert per_subject == [561, 540, 305, 295, 490, 478, 524, 482, 483, 519]
    train, test = load_watch_split()
    assert (len(train), len(test)) == (3_675, 1_002)
    assert sorted(set(test.subjects.tolist())) == [9, 10]
    assert np.bincount(test.y).tolist() == [108, 176, 176, 148, 153, 113, 128]
