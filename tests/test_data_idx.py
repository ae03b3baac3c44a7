"""Fashion-MNIST (edgefl/data/idx.py, edgefl/data/fashion_mnist.py): the IDX reader on files the
test writes, including truncated and corrupt ones, and the loader on Debian's package."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from edgefl.data import DataMissingError, load_fashion_mnist, load_fashion_mnist_split
from edgefl.data.fashion_mnist import ENV_DIR, PARTS, fashion_mnist_dir, stratified_subset
from edgefl.data.idx import IDX_DTYPES, parse_idx, read_idx
from tests.data_sets import require_installed


def idx_bytes(values: np.ndarray, code: int | None = None) -> bytes:
    """An IDX file: 00 00, type code, dimensions; the sizes big-endian; the values big-endian."""
    if code is None:
        code = {np.dtype(v).newbyteorder("="): c for c, v in IDX_DTYPES.items()}[values.dtype]
    big = values.astype(np.dtype(IDX_DTYPES[code]))
    header = bytes([0, 0, code, values.ndim]) + struct.pack(f">{values.ndim}I", *values.shape)
    return header + big.tobytes()


# ---------------------------------------------------------------------------------------------
# the IDX format


@pytest.mark.parametrize(
    "values",
    [
        np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
        np.array([-128, -1, 0, 127], dtype=np.int8),
        np.array([[-30000, 2], [3, 30000]], dtype=np.int16),
        np.array([-(2**31), 1, 2**31 - 1], dtype=np.int32),
        np.array([[1.5, -2.25e-3]], dtype=np.float32),
        np.array([np.pi, -1e300], dtype=np.float64),
    ],
    ids=["u1-3d", "i1", "i2", "i4", "f4", "f8"],
)
def test_idx_reads_every_type_code_in_native_order(values):
    got = parse_idx(idx_bytes(values))
    assert got.shape == values.shape
    assert got.dtype == values.dtype and got.dtype.isnative
    np.testing.assert_array_equal(got, values)


def test_idx_header_is_big_endian():
    # 0x0102 as a big-endian int16 is 258; read little-endian it would be 513
    data = bytes([0, 0, 0x0B, 1, 0, 0, 0, 1, 0x01, 0x02])
    assert parse_idx(data).tolist() == [258]


def test_read_idx_plain_and_gzipped(tmp_path):
    values = np.arange(60, dtype=np.uint8).reshape(3, 4, 5)
    plain = tmp_path / "x-idx3-ubyte"
    plain.write_bytes(idx_bytes(values))
    packed = tmp_path / "x-idx3-ubyte.gz"
    packed.write_bytes(gzip.compress(idx_bytes(values)))
    np.testing.assert_array_equal(read_idx(plain), values)
    np.testing.assert_array_equal(read_idx(packed), values)


@pytest.mark.parametrize(
    "header",
    [
        b"",
        b"\x00\x00",
        b"\x01\x00\x08\x01",  # first byte not zero
        b"\x00\x01\x08\x01",  # second byte not zero
        b"\x00\x00\x07\x01",  # no such type code
        b"\x00\x00\x08\x00",  # no dimensions
        b"\x1f\x8b\x08\x00",  # a gzip stream read as IDX
    ],
    ids=["empty", "short", "magic-0", "magic-1", "type", "ndim-0", "gzip"],
)
def test_idx_refuses_a_wrong_magic_number(header):
    with pytest.raises(ValueError, match="not an IDX file"):
        parse_idx(header + b"\x00" * 16, "f")


def test_idx_refuses_a_truncated_header():
    with pytest.raises(ValueError, match=r"truncated in its header \(10 of 16 bytes\)"):
        parse_idx(bytes([0, 0, 8, 3]) + b"\x00\x00\x00\x02\x00\x00", "f")


@pytest.mark.parametrize("change", [-1, -100, +1], ids=["one-short", "many-short", "one-long"])
def test_idx_refuses_a_wrong_byte_count(change):
    data = idx_bytes(np.zeros((10, 28, 28), np.uint8))
    bad = data[:change] if change < 0 else data + b"\x00" * change
    with pytest.raises(ValueError, match=r"says 7856: the file is truncated or corrupt"):
        parse_idx(bad, "f")


def test_idx_refuses_a_header_that_claims_far_more_than_the_file_holds():
    # a corrupt dimension must not make the reader allocate what the header claims
    data = bytes([0, 0, 8, 2]) + struct.pack(">2I", 2**32 - 1, 2**32 - 1) + b"\x00" * 8
    with pytest.raises(ValueError, match="truncated or corrupt"):
        parse_idx(data)


def test_read_idx_refuses_a_truncated_gzip(tmp_path):
    path = tmp_path / "x-idx1-ubyte.gz"
    full = gzip.compress(idx_bytes(np.arange(1000, dtype=np.uint8) % 10))
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(ValueError, match=r"x-idx1-ubyte.gz: not a readable gzip file"):
        read_idx(path)
    path.write_bytes(b"this is not gzip")
    with pytest.raises(ValueError, match="not a readable gzip file"):
        read_idx(path)


# ---------------------------------------------------------------------------------------------
# the Fashion-MNIST loader's checks, on files the test writes


def write_part(folder: Path, part: str, images: np.ndarray, labels: np.ndarray) -> None:
    images_name, labels_name, _count = PARTS[part]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{images_name}.gz").write_bytes(gzip.compress(idx_bytes(images), compresslevel=1))
    (folder / f"{labels_name}.gz").write_bytes(gzip.compress(idx_bytes(labels), compresslevel=1))


def test_missing_package_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_DIR, str(tmp_path / "nowhere"))
    assert fashion_mnist_dir() == tmp_path / "nowhere"
    with pytest.raises(DataMissingError, match=r"sudo apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train")
    assert issubclass(DataMissingError, FileNotFoundError)


def test_default_location_is_debians(monkeypatch):
    monkeypatch.delenv(ENV_DIR, raising=False)
    assert fashion_mnist_dir() == Path("/usr/share/datasets/fashion-mnist")


def test_loader_refuses_the_wrong_number_of_images(tmp_path):
    write_part(tmp_path, "test", np.zeros((100, 28, 28), np.uint8), np.zeros(100, np.uint8))
    with pytest.raises(ValueError, match=r"expected 10000 images of 28x28 uint8, found \(100, 28"):
        load_fashion_mnist("test", tmp_path)


def test_loader_refuses_labels_out_of_range_or_miscounted(tmp_path):
    images = np.zeros((10_000, 28, 28), np.uint8)
    labels = np.arange(10_000, dtype=np.uint8) % 10
    labels[7] = 10
    write_part(tmp_path, "test", images, labels)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\), found 10"):
        load_fashion_mnist("test", tmp_path)
    write_part(tmp_path, "test", images, labels[:9_999] % 10)
    with pytest.raises(ValueError, match="expected 10000 uint8 labels"):
        load_fashion_mnist("test", tmp_path)


def test_loader_scales_flattens_and_reads_uncompressed_files(tmp_path):
    images = np.zeros((10_000, 28, 28), np.uint8)
    images[0, 0, 1], images[0, 27, 27], images[1, 3, 4] = 255, 51, 1
    labels = np.arange(10_000, dtype=np.uint8) % 10
    for name, values in zip(PARTS["test"][:2], (images, labels), strict=True):
        (tmp_path / name).write_bytes(idx_bytes(values))  # not gzipped
    data = load_fashion_mnist("test", tmp_path)
    assert data.X.shape == (10_000, 784) and data.X.dtype == np.float32
    assert data.X[0, 1] == 1.0 and data.X[0, 783] == pytest.approx(0.2)
    assert data.X[1, 3 * 28 + 4] == pytest.approx(1 / 255)  # row-major: row 3, column 4
    assert data.y.dtype == np.int64 and data.y[:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    with pytest.raises(ValueError, match="parts train, test, not 'valid'"):
        load_fashion_mnist("valid", tmp_path)


def test_stratified_subset_keeps_class_shares():
    y = np.repeat(np.arange(10), [600, 600, 600, 600, 600, 600, 600, 600, 600, 599])
    idx = stratified_subset(y, 1000, seed=0)
    assert len(idx) == 1000 and len(np.unique(idx)) == 1000 and np.all(np.diff(idx) > 0)
    counts = np.bincount(y[idx], minlength=10)
    assert np.all(np.abs(counts - 100) <= 1), counts
    np.testing.assert_array_equal(idx, stratified_subset(y, 1000, seed=0))
    assert not np.array_equal(idx, stratified_subset(y, 1000, seed=1))
    for bad in (0, len(y) + 1):
        with pytest.raises(ValueError, match="cannot take"):
            stratified_subset(y, bad)


# ---------------------------------------------------------------------------------------------
# the real files of Debian's dataset-fashion-mnist


@pytest.fixture(scope="module")
def fmnist():
    require_installed(
        (fashion_mnist_dir() / "train-images-idx3-ubyte.gz").is_file(),
        f"Fashion-MNIST ({fashion_mnist_dir()})",
        "run `make setup` or `sudo apt-get install dataset-fashion-mnist`",
    )
    return load_fashion_mnist_split()


def test_real_files_have_the_official_headers():
    require_installed(
        (fashion_mnist_dir() / "t10k-images-idx3-ubyte.gz").is_file(),
        "Fashion-MNIST",
        "run `make setup` or `sudo apt-get install dataset-fashion-mnist`",
    )
    with gzip.open(fashion_mnist_dir() / "t10k-images-idx3-ubyte.gz") as f:
        head = f.read(16)
    assert head == bytes.fromhex("00000803000027100000001c0000001c")  # 10000 x 28 x 28


def test_real_fashion_mnist(fmnist):
    train, test = fmnist
    assert train.X.shape == (60_000, 784) and test.X.shape == (10_000, 784)
    for part, per_class in ((train, 6_000), (test, 1_000)):
        assert part.X.dtype == np.float32 and part.y.dtype == np.int64
        assert part.X.min() == 0.0 and part.X.max() == 1.0
        assert np.bincount(part.y).tolist() == [per_class] * 10
        assert part.subjects is None
    # not a blank or constant file: the mean pixel of Fashion-MNIST is about 0.286
    assert 0.25 < float(train.X.mean()) < 0.32


def test_real_fashion_mnist_subset(fmnist):
    train, test = load_fashion_mnist_split(train_samples=2_000, test_samples=500, seed=3)
    assert train.X.shape == (2_000, 784) and test.X.shape == (500, 784)
    assert np.bincount(train.y).tolist() == [200] * 10
    assert np.bincount(test.y).tolist() == [50] * 10
    # the subset is made of real rows of the whole set
    full_train, _ = fmnist
    idx = stratified_subset(full_train.y, 2_000, seed=3)
    np.testing.assert_array_equal(train.X, full_train.X[idx])
