"""Writing a file so that a crash, a kill -9 or a power cut leaves the old file or the new one,
never half of either. The one way edgefl writes state (checkpoints, error feedback, models,
accounts, configurations).

The new content goes to a temporary file beside the target, is flushed to the disk (fsync),
renamed over the target (atomic on POSIX), and the directory is flushed too, so the rename itself
survives a power cut. If anything fails the temporary file is removed and the target is untouched.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def fsync_path(path: str | Path) -> None:
    """Flush a file's (or a directory's) data and metadata to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(
    path: str | Path, *, mode: int | None = None, durable: bool = True, owner_of: Path | None = None
) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; when the block ends without an
    exception, that file replaces ``path``.

    ``mode`` sets its permissions (the default of a temporary file is 0600); ``owner_of``, when
    root rewrites a file another user reads (Mosquitto's password file), hands the new file to
    that file's owner. ``durable=False`` leaves the flushing to the caller (the aggregator's
    checkpoint flushes in the background so as not to hold up a round).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if mode is not None:
            os.chmod(tmp, mode)
        if owner_of is not None and os.geteuid() == 0:
            with contextlib.suppress(FileNotFoundError):
                st = owner_of.stat()
                os.chown(tmp, st.st_uid, st.st_gid)
        if durable:
            fsync_path(tmp)
        os.replace(tmp, path)
        if durable:
            fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)  # still there only if something failed


def write_atomic(
    path: str | Path,
    data: bytes | str,
    *,
    mode: int | None = None,
    durable: bool = True,
    owner_of: Path | None = None,
) -> Path:
    """Replace ``path`` with ``data`` (text is written as UTF-8); see :func:`replacing`."""
    path = Path(path)
    with replacing(path, mode=mode, durable=durable, owner_of=owner_of) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path
