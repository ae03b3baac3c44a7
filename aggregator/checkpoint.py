"""Checkpoints of the aggregator's state, in MessagePack (no pickle, even on our own disk).

Each save writes a new file and renames it over the current checkpoint, after moving the current
one aside as ``.prev``; a SHA-256 footer lets the loader tell a whole file from a torn one.

- A crashed or killed process (``kill -9``) never leaves half a checkpoint: renames are atomic,
  and what was written reaches the disk with the page cache even though the process is gone.
- A power cut may lose writes the disk had not flushed. The flush (fsync) runs in the background
  right after each save, so it does not hold up the round; if the newest file did not make it,
  the loader falls back to ``.prev``, which was flushed a round earlier. What must wait for the
  disk (acknowledging a round's updates to the broker, which then forgets them) is handed to
  :meth:`Checkpointer.when_flushed`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from edgefl.atomic import fsync_path, replacing

log = logging.getLogger(__name__)

ARRAY_TAG = "__ndarray__"
DIGEST = 32


def _encode_array(obj: Any) -> Any:
    """msgpack's hook for what it cannot pack itself: numpy arrays and scalars."""
    if isinstance(obj, np.ndarray):
        arr = np.ascontiguousarray(obj)
        return {ARRAY_TAG: True, "dtype": arr.dtype.str, "shape": list(arr.shape),
                "data": arr.tobytes()}
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot checkpoint a {type(obj).__name__}")


def _decode_array(obj: dict) -> Any:
    if obj.get(ARRAY_TAG) is True:
        arr = np.frombuffer(obj["data"], dtype=np.dtype(obj["dtype"]))
        return arr.reshape(obj["shape"]).copy()
    return obj


def _pack(state: Mapping[str, Any]) -> bytes:
    # msgpack walks the structure in C and calls back only for arrays: a checkpoint is written
    # every round, and a Python walk over the registry and ledger cost more than the write
    return msgpack.packb(state, default=_encode_array, use_bin_type=True)


def _unpack(body: bytes) -> Any:
    return msgpack.unpackb(body, raw=False, strict_map_key=False, object_hook=_decode_array)


class Checkpointer:
    """Saves and loads one checkpoint file (plus its ``.prev``)."""

    def __init__(self, path: str | Path, background_flush: bool = True) -> None:
        self.path = Path(path)
        self.prev = self.path.with_name(self.path.name + ".prev")
        self._background = background_flush
        self._flusher: threading.Thread | None = None
        self._lock = threading.Lock()
        self._flushing = False
        self._after_flush: list[Callable[[], None]] = []

    def save(self, state: Mapping[str, Any]) -> None:
        body = _pack(state)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.wait_flushed()  # never move a file aside that is not yet on the disk
        # flushed in the background (below), not by the rename: a round need not wait for it
        with replacing(self.path, durable=False) as tmp:
            tmp.write_bytes(body + hashlib.sha256(body).digest())
            if self.path.exists():
                os.replace(self.path, self.prev)
        with self._lock:
            self._flushing = True
        if self._background:
            flusher = threading.Thread(target=self._flush, name="checkpoint-flush")
            flusher.start()
            # published only once started: stop() may wait on it from another thread
            with self._lock:
                self._flusher = flusher
        else:
            self._flush()

    def when_flushed(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` once the newest checkpoint is on the disk: now if it already is, else
        from the flushing thread when it is."""
        with self._lock:
            if self._flushing:
                self._after_flush.append(fn)
                return
        fn()

    def _flush(self) -> None:
        try:
            fsync_path(self.path)
            fsync_path(self.path.parent)
        except OSError as e:  # the next save tries again; the loader has .prev
            log.warning("could not flush checkpoint %s: %s", self.path, e)
        with self._lock:
            self._flushing = False
            waiting, self._after_flush = self._after_flush, []
        for fn in waiting:
            try:
                fn()
            except Exception:  # one failed callback must not keep the others from running
                log.exception("after a checkpoint flush")

    def wait_flushed(self) -> None:
        # the finished thread is kept, not cleared: two threads may wait on the same flush
        with self._lock:
            flusher = self._flusher
        if flusher is not None:
            flusher.join()

    def load(self) -> dict[str, Any] | None:
        """The newest whole checkpoint, or None if there is none."""
        for path in (self.path, self.prev):
            state = self._read(path)
            if state is not None:
                if path == self.prev:
                    log.warning(
                        "checkpoint %s is torn or missing; resuming from %s", self.path, path
                    )
                return state
        return None

    @staticmethod
    def _read(path: Path) -> dict[str, Any] | None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        body, digest = data[:-DIGEST], data[-DIGEST:]
        if len(data) <= DIGEST or hashlib.sha256(body).digest() != digest:
            log.warning("checkpoint %s fails its checksum; ignored", path)
            return None
        return _unpack(body)
