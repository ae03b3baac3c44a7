"""Turn one data set into a fleet's device files: what ``edgefl split`` does.

The source is a bundled data set by name (``digits``, ``fashion_mnist``, ``watch``) or a user's
own file: an ``.npz`` with ``X`` (samples x features) and integer ``y`` (and, optionally,
``subjects``: who each sample came from, for the natural partition), or a ``.csv`` with a header
row, one sample a line, a label column and numeric features. Its test set is held out for the
aggregator's ``eval_data``; the rest is spread over the devices by a partitioner
(edgefl/data/partition.py), the same code the demo uses.

What is written::

    OUT/<device id>/data.npz    one device's data (X float32, y int64): what load_npz reads
    OUT/test.npz                the held-out set, for the aggregator's eval_data
    OUT/split.json              who holds how many samples of which class, and the label names

A folder per device rather than ``OUT/<id>.npz``: on a device the file is always
``data.npz`` (``edgefl enroll``'s ``--data`` default, /var/lib/edgefl/data.npz), so a folder is
exactly what one device receives; on one machine, each device's state can live beside its data
(``edgefl enroll --data 'OUT/{id}/data.npz' --state-dir 'OUT/{id}/state'``).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgefl.atomic import write_atomic
from edgefl.config import DATASETS, DataConfig, check_name
from edgefl.data import load_split
from edgefl.data.dataset import Dataset, load_npz, save_npz
from edgefl.data.fashion_mnist import stratified_subset
from edgefl.data.partition import partition
from edgefl.models import MODELS  # the catalogue; it imports no torch

DEVICE_FILE = "data.npz"
TEST_FILE = "test.npz"
MANIFEST_FILE = "split.json"
DEFAULTS = DataConfig()  # the demo's defaults: one place for alpha, seed, min_samples, ...
# The test set is the same draw whatever --seed says, so the aggregator's yardstick stays put
# while the devices' shares change (the demo holds digits out the same way).
HOLD_OUT_SEED = 0
SUMMARY_ROWS = 20  # devices listed in the summary; split.json has them all


class SplitError(ValueError):
    """The source or the options cannot make a split; the message says what to change."""


@dataclass
class Source:
    """A data set ready to split: the training part, the held-out test part, and how."""

    name: str
    train: Dataset
    test: Dataset
    held_out: str  # how the test set was chosen, for the summary
    label_names: list[str] | None = None  # a CSV's text labels, by class id


@dataclass
class Split:
    source: Source
    partition: str
    parts: dict[str, np.ndarray]  # device id -> indices into source.train, in the ids' order

    def devices(self) -> Iterator[tuple[str, Dataset]]:
        """Each device's data, copied out one at a time (a large set is not held twice)."""
        train = self.source.train
        for device_id, idx in self.parts.items():
            yield device_id, Dataset(train.X[idx], train.y[idx])

    @property
    def classes(self) -> int:
        return int(max(self.source.train.y.max(), self.source.test.y.max())) + 1


def numbered_ids(count: int) -> list[str]:
    """``dev-1`` ... ``dev-N``: the ids a walkthrough enrols when it makes up its own."""
    if count < 1:
        raise SplitError(f"need at least one device, not {count}")
    return [f"dev-{i}" for i in range(1, count + 1)]


def check_ids(device_ids: Sequence[str]) -> list[str]:
    """Device ids as ``edgefl enroll`` accepts them, each once."""
    ids = list(device_ids)
    if not ids:
        raise SplitError("need at least one device id")
    for device_id in ids:
        check_name("device id", device_id)
    dup = sorted({d for d in ids if ids.count(d) > 1})
    if dup:
        raise SplitError(f"device ids given more than once: {', '.join(dup)}")
    return ids


# -- reading the source -----------------------------------------------------------------------


def load_source(
    source: str,
    *,
    test_fraction: float | None = None,
    label_column: str = "label",
    subject_column: str | None = None,
) -> Source:
    """A bundled data set by name, or a user's ``.npz`` / ``.csv`` file, with its test set.

    ``test_fraction`` (default the demo's 0.2) is held out, stratified by class, from digits
    and from a user's file; fashion_mnist and watch keep their own test sets (the official
    10,000 images; wearers 9 and 10) and refuse it.
    """
    if source in DATASETS:
        return _bundled(source, test_fraction)
    path = Path(source)
    if not path.exists():
        raise SplitError(
            f"{source}: no such file, and not a bundled data set ({', '.join(DATASETS)})"
        )
    if path.is_dir():
        raise SplitError(f"{source} is a directory: give an .npz or .csv file")
    fraction = _fraction(test_fraction)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        if subject_column is not None:
            raise SplitError("--subject-column is for .csv files; an .npz holds `subjects`")
        data, names = _read_npz(path), None
    elif suffix == ".csv":
        data, names = _read_csv(path, label_column, subject_column)
    else:
        raise SplitError(f"{source}: give an .npz (X and y) or a .csv file, not {suffix or 'this'}")
    train, test = _hold_out(data, fraction, str(path))
    how = f"{fraction:.0%} held out, stratified by class"
    return Source(path.name, train, test, how, names)


def _fraction(test_fraction: float | None) -> float:
    fraction = DEFAULTS.test_fraction if test_fraction is None else test_fraction
    if not 0 < fraction < 1:
        raise SplitError(f"the test fraction must lie between 0 and 1, not {fraction:g}")
    return fraction


_own_test = {
    "fashion_mnist": "the official 10,000 test images",
    "watch": "wearers 9 and 10, whom no device holds",
}


def _bundled(name: str, test_fraction: float | None) -> Source:
    if name != "digits" and test_fraction is not None:
        raise SplitError(
            f"{name} keeps its own test set ({_own_test[name]}); --test-fraction applies to "
            "digits and your own files"
        )
    fraction = _fraction(test_fraction)
    try:
        train, test = load_split(DataConfig(dataset=name, test_fraction=fraction))
    except ModuleNotFoundError as e:  # digits come with scikit-learn, an aggregator extra
        raise SplitError(
            f"{name} needs the Python package {e.name}: pip install 'edgefl[aggregator]'"
        ) from None
    how = f"{fraction:.0%} held out, stratified by class" if name == "digits" else _own_test[name]
    return Source(name, train, test, how)


def _read_npz(path: Path) -> Dataset:
    data = load_npz(path)  # X 2-D and finite, y integer: the checks a device makes
    if data.y.min() < 0:
        raise SplitError(f"{path}: labels must be 0 or more (class ids), found {data.y.min()}")
    with np.load(path, allow_pickle=False) as z:
        if "subjects" not in z.files:
            return data
        try:
            subjects = np.asarray(z["subjects"])
        except ValueError as e:  # an object array
            raise SplitError(f"{path}: subjects: {e}") from None
    if subjects.shape != data.y.shape:
        raise SplitError(f"{path}: subjects must hold one value per sample, like y")
    return Dataset(data.X, data.y, subjects)


def _read_csv(
    path: Path, label_column: str, subject_column: str | None
) -> tuple[Dataset, list[str] | None]:
    """A header row, then one sample a line. Every column but the label (and the subject)
    is a numeric feature. Labels that are all whole numbers are class ids; otherwise each
    distinct text is a class, numbered in sorted order."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            header_line = f.readline()
            f.seek(0)
            rows = list(csv.reader(f, delimiter=_delimiter(header_line)))
    except (OSError, UnicodeDecodeError) as e:
        raise SplitError(f"{path}: cannot read it as text ({e})") from None
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if len(rows) < 2:
        raise SplitError(f"{path}: needs a header row and at least one sample")
    header = [h.strip() for h in rows[0]]
    if label_column not in header:
        raise SplitError(
            f"{path}: no column {label_column!r} (columns: {', '.join(header[:12])}"
            f"{', ...' if len(header) > 12 else ''}); name the label column with --label-column"
        )
    if subject_column is not None and subject_column not in header:
        raise SplitError(f"{path}: no column {subject_column!r} for --subject-column")
    label_at = header.index(label_column)
    subject_at = header.index(subject_column) if subject_column is not None else None
    feature_at = [i for i in range(len(header)) if i not in (label_at, subject_at)]
    if not feature_at:
        raise SplitError(f"{path}: no feature columns besides {label_column!r}")
    X = np.empty((len(rows) - 1, len(feature_at)), dtype=np.float32)
    labels, subjects = [], []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise SplitError(f"{path}:{line}: {len(row)} values, the header has {len(header)}")
        try:
            X[line - 2] = [float(row[i]) for i in feature_at]
        except ValueError:
            bad = next(header[i] for i in feature_at if not _is_number(row[i]))
            raise SplitError(f"{path}:{line}: column {bad!r} is not a number") from None
        labels.append(row[label_at].strip())
        if subject_at is not None:
            subjects.append(row[subject_at].strip())
    if not np.isfinite(X).all():
        raise SplitError(f"{path}: features hold NaN or Inf")
    y, names = _class_ids(labels, path)
    # kept as text: the natural partition and split.json need only tell subjects apart
    return Dataset(X, y, np.array(subjects) if subject_at is not None else None), names


def _delimiter(header: str) -> str:
    """Comma, unless the header row is split by semicolons (spreadsheets in locales with a
    decimal comma write those) or tabs instead."""
    counts = {d: header.count(d) for d in (",", ";", "\t")}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] else ","


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _class_ids(labels: list[str], path: Path) -> tuple[np.ndarray, list[str] | None]:
    try:
        y = np.array([int(v) for v in labels], dtype=np.int64)
    except ValueError:
        names, y = np.unique(np.array(labels), return_inverse=True)
        return y.astype(np.int64), [str(n) for n in names]
    if y.min() < 0:
        raise SplitError(f"{path}: labels must be 0 or more (class ids), found {y.min()}")
    return y, None


def _hold_out(data: Dataset, fraction: float, where: str) -> tuple[Dataset, Dataset]:
    size = round(len(data) * fraction)
    if size < 1 or size >= len(data):
        raise SplitError(
            f"{where}: {len(data)} samples are too few to hold out {fraction:.0%} for testing "
            "and keep the rest for the devices"
        )
    test_idx = stratified_subset(data.y, size, HOLD_OUT_SEED)
    keep = np.ones(len(data), dtype=bool)
    keep[test_idx] = False

    def take(idx: np.ndarray) -> Dataset:
        subjects = data.subjects[idx] if data.subjects is not None else None
        return Dataset(data.X[idx], data.y[idx], subjects)

    return take(np.flatnonzero(keep)), take(test_idx)


# -- splitting and writing --------------------------------------------------------------------


def split_fleet(
    source: Source,
    device_ids: Sequence[str],
    kind: str = DEFAULTS.partition,
    *,
    alpha: float = DEFAULTS.alpha,
    seed: int = DEFAULTS.seed,
    min_samples: int = DEFAULTS.min_samples,
    shards_per_device: int = DEFAULTS.shards_per_device,
) -> Split:
    """Spread the training part over ``device_ids`` (each sample to exactly one device)."""
    ids = check_ids(device_ids)
    if alpha <= 0 or min_samples < 0 or shards_per_device < 1:
        raise SplitError("alpha must be > 0, the minimum per device >= 0, shards per device >= 1")
    train = source.train
    if kind == "natural" and train.subjects is None:
        raise SplitError(
            f"the natural partition gives one device per subject, and {source.name} records "
            "none: use the watch set, a .csv with --subject-column, an .npz with a `subjects` "
            "array, or partition dirichlet, iid or shards"
        )
    parts = partition(
        train.y,
        len(ids),
        kind,
        alpha,
        seed,
        min_samples,
        subjects=train.subjects,
        shards_per_device=shards_per_device,
    )
    return Split(source, kind, dict(zip(ids, parts, strict=True)))


def device_table(
    parts: dict[str, np.ndarray], y: np.ndarray, classes: int, subjects: np.ndarray | None
) -> dict[str, dict[str, Any]]:
    """Per device: samples, samples per class and (where recorded) whose they are; the
    ``devices`` of split.json and of the demo's partition.json."""
    table: dict[str, dict[str, Any]] = {}
    for device_id, idx in parts.items():
        table[device_id] = {
            "samples": len(idx),
            "per_class": np.bincount(y[idx], minlength=classes).tolist(),
        }
        if subjects is not None:
            table[device_id]["subjects"] = sorted(set(subjects[idx].tolist()))
    return table


def write_split(split: Split, out: str | Path) -> Path:
    """Write every device's file, the test file and the manifest (each atomically); the
    manifest's path."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SplitError(f"{out} exists and is not a directory")
    for device_id, data in split.devices():
        save_npz(out / device_id / DEVICE_FILE, data)
    save_npz(out / TEST_FILE, split.source.test)
    write_atomic(out / MANIFEST_FILE, json.dumps(manifest(split), indent=1) + "\n")
    return out / MANIFEST_FILE


def manifest(split: Split) -> dict[str, Any]:
    src = split.source
    classes = split.classes
    table = device_table(split.parts, src.train.y, classes, src.train.subjects)
    return {
        "source": src.name,
        "partition": split.partition,
        "train_samples": len(src.train),
        "test_samples": len(src.test),
        "test": src.held_out,
        "features": int(src.train.X.shape[1]),
        "classes": classes,
        "label_names": src.label_names,
        "devices": table,
    }


def fitting_models(features: int, classes: int) -> list[str]:
    """The built-in models that take this many features and at least this many classes."""
    return [
        name
        for name, info in MODELS.items()
        if int(np.prod(info.input_shape)) == features and info.num_classes >= classes
    ]


def summary(split: Split, out: str | Path) -> list[str]:
    """One screen: the split, then samples and classes per device, and the model that fits."""
    src, classes, out = split.source, split.classes, Path(out)
    features = int(src.train.X.shape[1])
    lines = [
        f"{src.name}: {len(src.train):,} samples over {len(split.parts)} devices "
        f"({split.partition} partition); {features} features, {classes} classes",
        f"test set: {len(src.test):,} samples ({src.held_out})",
    ]
    per_class = classes <= 12  # wider would not fit a line
    width = max(12, *(len(d) for d in split.parts))
    # a column per class, as wide as a count can be (a class's whole training or test part)
    most = max(np.bincount(src.train.y).max(), np.bincount(src.test.y).max())
    cw = max(4, len(str(most)))
    lines.append(
        f"  {'device':<{width}} {'samples':>8} {'classes':>7}"
        + ("   per class " + " ".join(f"{c:>{cw}}" for c in range(classes)) if per_class else "")
    )

    def row(name: str, y: np.ndarray, whose: str = "") -> str:
        counts = np.bincount(y, minlength=classes)
        line = f"  {name:<{width}} {len(y):>8,} {int((counts > 0).sum()):>7}"
        line += " " * 13 + " ".join(f"{n:>{cw}}" for n in counts) if per_class else ""
        return line + whose

    def subject(idx: np.ndarray) -> str:
        # which subject each device stands for, when the split is by subject
        if split.partition != "natural" or src.train.subjects is None:
            return ""
        return f"   subject {', '.join(str(v) for v in np.unique(src.train.subjects[idx]))}"

    rows = list(split.parts.items())
    lines += [row(d, src.train.y[idx], subject(idx)) for d, idx in rows[:SUMMARY_ROWS]]
    if len(rows) > SUMMARY_ROWS:
        lines.append(f"  ... and {len(rows) - SUMMARY_ROWS} more devices (all in split.json)")
    lines.append(row(TEST_FILE, src.test.y))
    if src.label_names:
        names = ", ".join(f"{i} = {n}" for i, n in enumerate(src.label_names[:10]))
        lines.append(f"labels: {names}{', ...' if len(src.label_names) > 10 else ''}")
    first = next(iter(split.parts))
    lines.append(
        f"wrote {out / first / DEVICE_FILE} (one per device), {out / TEST_FILE} "
        f"(the aggregator's eval_data), {out / MANIFEST_FILE}"
    )
    models = fitting_models(features, classes)
    if models:
        lines.append(f"models that take this data ([model] name): {', '.join(models)}")
    else:
        lines.append(
            f"warning: no built-in model takes {features} features and {classes} classes "
            "(edgefl/models.py lists them)"
        )
    return lines
