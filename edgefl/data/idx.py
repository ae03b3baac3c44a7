"""The IDX file format of the MNIST family (LeCun, Cortes and Burges, "The MNIST database of
handwritten digits"; Fashion-MNIST uses it unchanged).

A file is a 4-byte magic number -- two zero bytes, a type code, the number of dimensions --
then each dimension as a big-endian uint32, then the values, big-endian, in C order. Nothing in
it can run code; the reader still checks every field and that the size is exact, so a truncated
or corrupt file is refused rather than read as wrong data.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

# type code -> big-endian numpy dtype
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def parse_idx(data: bytes, name: str = "IDX data") -> np.ndarray:
    """The array an IDX file holds, in native byte order; ``name`` is used in errors."""
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in IDX_DTYPES or data[3] == 0:
        raise ValueError(
            f"{name}: not an IDX file (magic {data[:4].hex() or 'missing'}; expected 0000, a type "
            f"code of {', '.join(f'{c:02x}' for c in IDX_DTYPES)}, and 1 or more dimensions)"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{name}: truncated in its header ({len(data)} of {header} bytes)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(IDX_DTYPES[data[2]])
    expected = header + dtype.itemsize * math.prod(dims)
    if len(data) != expected:
        raise ValueError(
            f"{name}: {len(data)} bytes, but its header ({'x'.join(map(str, dims))} values of "
            f"{dtype.name}) says {expected}: the file is truncated or corrupt"
        )
    values = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return values.astype(dtype.newbyteorder("="))


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file, gunzipping it first if its name ends in ``.gz``."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: not a readable gzip file ({e})") from None
    return parse_idx(data, str(path))
