"""edgefl/data/split.py and `edgefl split`: a data set into devices' data.npz and test.npz."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from edgefl.config import RunConfig
from edgefl.data import (
    PartitionError,
    dirichlet_partition,
    iid_partition,
    load_npz,
    shard_partition,
)
from edgefl.data.dataset import Dataset
from edgefl.data.split import (
    SUMMARY_ROWS,
    SplitError,
    load_source,
    numbered_ids,
    split_fleet,
    summary,
    write_split,
)
from launch.cli import main as edgefl
from launch.local import prepare_data


def marked(n: int, classes: int = 4, features: int = 5, seed: int = 0) -> Dataset:
    """Samples whose first feature is their index, so every file can be traced back."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, features)).astype(np.float32)
    X[:, 0] = np.arange(n)
    return Dataset(X, rng.integers(0, classes, n).astype(np.int64))


def indices(path: Path) -> np.ndarray:
    return load_npz(path).X[:, 0].astype(np.int64)


def write_user_npz(path: Path, data: Dataset, **extra: np.ndarray) -> Path:
    np.savez(path, X=data.X, y=data.y, **extra)
    return path


def test_every_sample_lands_in_exactly_one_file(tmp_path):
    data = marked(500)
    source = load_source(str(write_user_npz(tmp_path / "mine.npz", data)))
    split = split_fleet(source, ["pi-a", "pi-b", "pi-c"], "dirichlet")
    write_split(split, tmp_path / "out")
    held = [indices(tmp_path / "out" / d / "data.npz") for d in ("pi-a", "pi-b", "pi-c")]
    test = indices(tmp_path / "out" / "test.npz")
    everything = np.concatenate([*held, test])
    assert len(everything) == 500 and set(everything.tolist()) == set(range(500))
    assert len(test) == 100  # the default fifth held out
    # labels travel with their samples
    for d in ("pi-a", "pi-b", "pi-c"):
        got = load_npz(tmp_path / "out" / d / "data.npz")
        np.testing.assert_array_equal(got.y, data.y[got.X[:, 0].astype(int)])
    manifest = json.loads((tmp_path / "out" / "split.json").read_text())
    assert list(manifest["devices"]) == ["pi-a", "pi-b", "pi-c"]
    assert [manifest["devices"][d]["samples"] for d in ("pi-a", "pi-b", "pi-c")] == [
        len(h) for h in held
    ]
    assert (manifest["features"], manifest["classes"], manifest["test_samples"]) == (5, 4, 100)


def test_the_test_set_is_stratified_and_stays_whatever_the_seed(tmp_path):
    data = marked(400, classes=4)
    path = write_user_npz(tmp_path / "mine.npz", data)
    a, b = load_source(str(path)), load_source(str(path))
    np.testing.assert_array_equal(a.test.X, b.test.X)
    share = np.bincount(a.test.y, minlength=4) / np.bincount(data.y, minlength=4)
    assert np.all(np.abs(share - 0.2) < 0.02), share
    parts0 = split_fleet(a, numbered_ids(4), "iid", seed=0).parts
    parts1 = split_fleet(a, numbered_ids(4), "iid", seed=1).parts
    assert any(not np.array_equal(parts0[d], parts1[d]) for d in parts0)


def test_numbered_ids_and_given_ids(tmp_path):
    assert numbered_ids(3) == ["dev-1", "dev-2", "dev-3"]
    assert (
        edgefl(["split", "digits", "--device-ids", "pi-kitchen,pi-garage", "--out", str(tmp_path)])
        == 0
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "pi-garage", "pi-kitchen", "split.json", "test.npz",
    ]  # fmt: skip


def test_digits_split_is_the_demos(tmp_path):
    # the same data set, partitioner and defaults as `edgefl demo`: the same devices' data
    ids = numbered_ids(5)
    prepare_data(RunConfig(), tmp_path / "demo", ids)
    write_split(split_fleet(load_source("digits"), ids), tmp_path / "split")
    for d in ids:
        demo, mine = (
            load_npz(tmp_path / "demo" / f"{d}.npz"),
            load_npz(tmp_path / "split" / d / "data.npz"),
        )
        np.testing.assert_array_equal(demo.X, mine.X)
        np.testing.assert_array_equal(demo.y, mine.y)
    np.testing.assert_array_equal(
        load_npz(tmp_path / "demo" / "test.npz").y, load_npz(tmp_path / "split" / "test.npz").y
    )


@pytest.mark.parametrize("kind", ["dirichlet", "iid", "shards"])
def test_partitions_are_the_partitioners(tmp_path, kind):
    source = load_source(str(write_user_npz(tmp_path / "mine.npz", marked(600, classes=6))))
    split = split_fleet(source, numbered_ids(6), kind, alpha=0.3, seed=4, min_samples=5)
    parts = list(split.parts.values())
    y = source.train.y
    expected = {
        "dirichlet": lambda: dirichlet_partition(y, 6, 0.3, seed=4, min_samples=5),
        "iid": lambda: iid_partition(len(y), 6, seed=4),
        "shards": lambda: shard_partition(y, 6, 2, seed=4),
    }[kind]()
    assert all(np.array_equal(a, b) for a, b in zip(parts, expected, strict=True))
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(y)))


def test_natural_gives_one_device_per_subject(tmp_path):
    data = marked(300)
    subjects = np.repeat([7, 3, 5], 100)
    source = load_source(str(write_user_npz(tmp_path / "mine.npz", data, subjects=subjects)))
    split = split_fleet(source, ["a", "b", "c"], "natural")
    write_split(split, tmp_path / "out")
    for device_id, subject in zip("abc", (3, 5, 7), strict=True):
        held = indices(tmp_path / "out" / device_id / "data.npz")
        assert set(subjects[held].tolist()) == {subject}
    manifest = json.loads((tmp_path / "out" / "split.json").read_text())
    assert manifest["devices"]["a"]["subjects"] == [3]  # subjects in the order of their ids
    with pytest.raises(ValueError, match="3 subjects .* so it needs 3 devices, not 2"):
        split_fleet(source, ["a", "b"], "natural")
    without = load_source(str(write_user_npz(tmp_path / "plain.npz", data)))
    with pytest.raises(SplitError, match="plain.npz records none: .* --subject-column"):
        split_fleet(without, ["a", "b"], "natural")


def test_csv_with_text_labels_and_subjects(tmp_path):
    path = tmp_path / "readings.csv"
    lines = ["temp,person,activity,hum"]
    for i in range(60):
        lines.append(f"{i},{['ann', 'bob'][i % 2]},{['walk', 'run', 'sit'][i % 3]},{i * 0.5}")
    path.write_text("\n".join(lines) + "\n\n")
    source = load_source(str(path), label_column="activity", subject_column="person")
    assert source.label_names == ["run", "sit", "walk"]
    assert source.train.X.shape[1] == 2 and len(source.train) + len(source.test) == 60
    # the label of each row follows its text: temp i was activity i % 3
    all_rows = np.concatenate([source.train.X[:, 0], source.test.X[:, 0]]).astype(int)
    all_y = np.concatenate([source.train.y, source.test.y])
    names = np.array(source.label_names)[all_y]
    assert all(names[k] == ["walk", "run", "sit"][i % 3] for k, i in enumerate(all_rows))
    split = split_fleet(source, ["ann-watch", "bob-watch"], "natural", min_samples=1)
    write_split(split, tmp_path / "out")
    ann = load_npz(tmp_path / "out" / "ann-watch" / "data.npz")
    assert set((ann.X[:, 0].astype(int) % 2).tolist()) == {0}
    manifest = json.loads((tmp_path / "out" / "split.json").read_text())
    assert [manifest["devices"][d]["subjects"] for d in ("ann-watch", "bob-watch")] == [
        ["ann"],
        ["bob"],
    ]
    text = "\n".join(summary(split, tmp_path / "out"))
    assert re.search(r"^  ann-watch .* subject ann$", text, re.M), text
    assert "0 = run, 1 = sit, 2 = walk" in text
    assert "no built-in model takes 2 features" in text


@pytest.mark.parametrize("sep", [";", "\t"])
def test_csv_split_by_semicolons_or_tabs(tmp_path, sep):
    path = tmp_path / "d.csv"
    path.write_text(
        f"a{sep}b{sep}label\n" + "".join(f"{i}{sep}{-i}{sep}{i % 2}\n" for i in range(20))
    )
    source = load_source(str(path))
    assert source.train.X.shape[1] == 2
    rows = np.concatenate([source.train.X, source.test.X])
    np.testing.assert_array_equal(rows[:, 1], -rows[:, 0])


def test_csv_integer_labels_are_class_ids(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,label\n" + "".join(f"{i},{i % 3 + 4}\n" for i in range(50)))
    source = load_source(str(path))
    assert source.label_names is None
    assert set(np.concatenate([source.train.y, source.test.y]).tolist()) == {4, 5, 6}


@pytest.mark.parametrize(
    ("text", "options", "match"),
    [
        ("a,b\n1,2\n", {}, r"no column 'label' \(columns: a, b\); name the label column"),
        ("a,label\n", {}, "needs a header row and at least one sample"),
        ("a,label\n1,0\nx,1\n", {}, r"d.csv:3: column 'a' is not a number"),
        ("a,label\n1,0\n2\n", {}, r"d.csv:3: 1 values, the header has 2"),
        ("a,label\n1,-1\n2,0\n", {}, "labels must be 0 or more"),
        ("label\n1\n2\n", {}, "no feature columns"),
        ("a,label\n1,0\n", {"subject_column": "who"}, "no column 'who' for --subject-column"),
        ("a,label\nnan,0\n1,1\n", {}, "NaN or Inf"),
    ],
)
def test_bad_csv_files_say_what_is_wrong(tmp_path, text, options, match):
    path = tmp_path / "d.csv"
    path.write_text(text)
    with pytest.raises(SplitError, match=match):
        load_source(str(path), **options)


def test_bad_sources_and_options(tmp_path):
    (tmp_path / "junk.npz").write_text("not an archive")
    with pytest.raises(ValueError, match="not an .npz archive holding arrays X and y"):
        load_source(str(tmp_path / "junk.npz"))
    np.savez(tmp_path / "nox.npz", y=np.zeros(3, np.int64))
    with pytest.raises(ValueError, match=r"missing arrays \['X'\]"):
        load_source(str(tmp_path / "nox.npz"))
    with pytest.raises(SplitError, match="no such file, and not a bundled data set"):
        load_source(str(tmp_path / "missing.csv"))
    with pytest.raises(SplitError, match="is a directory"):
        load_source(str(tmp_path))
    (tmp_path / "d.json").write_text("{}")
    with pytest.raises(SplitError, match="give an .npz"):
        load_source(str(tmp_path / "d.json"))
    with pytest.raises(SplitError, match="fashion_mnist keeps its own test set"):
        load_source("fashion_mnist", test_fraction=0.1)
    path = write_user_npz(tmp_path / "mine.npz", marked(50))
    with pytest.raises(SplitError, match="between 0 and 1"):
        load_source(str(path), test_fraction=1.0)
    with pytest.raises(SplitError, match="too few to hold out"):
        load_source(str(write_user_npz(tmp_path / "two.npz", marked(2))), test_fraction=0.1)
    source = load_source(str(path))
    with pytest.raises(SplitError, match="more than once: a"):
        split_fleet(source, ["a", "b", "a"])
    with pytest.raises(ValueError, match="device id 'B' is not a valid name"):
        split_fleet(source, ["a", "B"])
    with pytest.raises(SplitError, match="at least one device"):
        numbered_ids(0)


def test_too_few_samples_and_an_impossible_dirichlet_draw(tmp_path):
    source = load_source(str(write_user_npz(tmp_path / "mine.npz", marked(100))))
    with pytest.raises(PartitionError, match="80 samples cannot give 9 devices at least 10 each: "
                       "use at most 8 devices"):  # fmt: skip
        split_fleet(source, numbered_ids(9))
    one_class = Dataset(marked(30).X, np.zeros(30, np.int64))
    source = load_source(str(write_user_npz(tmp_path / "one.npz", one_class)))
    with pytest.raises(PartitionError, match=r"no Dirichlet\(alpha=1e-06\) draw .* raise alpha"):
        split_fleet(source, numbered_ids(2), alpha=1e-6)


def test_the_command_prints_a_summary(tmp_path, capsys):
    assert edgefl(["split", "digits", "--devices", "3", "--out", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert (
        out[0]
        == "digits: 1,437 samples over 3 devices (dirichlet partition); 64 features, 10 classes"
    )
    rows = {line.split()[0]: line.split() for line in out if line.startswith("  ")}
    for d in ("dev-1", "dev-2", "dev-3"):
        assert int(rows[d][1].replace(",", "")) == len(load_npz(tmp_path / "d" / d / "data.npz"))
        assert sum(int(n) for n in rows[d][3:]) == int(rows[d][1].replace(",", ""))
    assert rows["test.npz"][1] == "360"
    assert out[-1] == "models that take this data ([model] name): mlp_digits"


def test_a_large_fleet_summary_fits_a_screen(tmp_path):
    split = split_fleet(load_source("digits"), numbered_ids(60), "iid")
    lines = summary(split, tmp_path)
    assert len(lines) == SUMMARY_ROWS + 7
    assert "  ... and 40 more devices (all in split.json)" in lines


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["digits", "--devices", "200"], r"use at most 143 devices.*\(options: --alpha"),
        (["nothere.npz", "--devices", "2"], "no such file"),
        (["digits", "--device-ids", "a,Bad"], "not a valid name"),
    ],
)
def test_the_command_fails_in_one_line(tmp_path, capsys, args, match):
    assert edgefl(["split", *args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgefl split: ") and "\n" not in err and "Traceback" not in err
    assert re.search(match, err), err
    assert not (tmp_path / "out").exists()  # nothing half written


@pytest.mark.slow
def test_a_hundred_devices_of_digits_say_which_alpha_to_try(tmp_path, capsys):
    # the case: Dirichlet(0.5) cannot give 100 devices 10 of 1,437 digits each
    out = str(tmp_path / "out")
    assert edgefl(["split", "digits", "--devices", "100", "--out", out]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(
        r"edgefl split: no Dirichlet\(alpha=0.5\) draw .* raise alpha \(e.g. 5;.*\n", err
    )
    assert edgefl(["split", "digits", "--devices", "100", "--alpha", "5", "--out", out]) == 0


def test_write_split_refuses_a_file_as_out(tmp_path):
    split = split_fleet(load_source(str(write_user_npz(tmp_path / "m.npz", marked(60)))), ["a"])
    (tmp_path / "taken").write_text("")
    with pytest.raises(SplitError, match="not a directory"):
        write_split(split, tmp_path / "taken")
