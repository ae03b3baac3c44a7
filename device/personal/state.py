"""A device's personal state on its disk: what a personalisation method keeps between tasks
(a personal model, a head, a mixing weight) and the settings it was trained with, so that the
device builds the same personal model after a restart.

One file, ``personal.npz`` in the device's state directory: plain float32 arrays (``slot/key``:
a personal model's tensors) and one ``meta`` array holding UTF-8 JSON (the method, the model's
tensor names and shapes, the settings, the scalars). It is written atomically
(edgefl/atomic.py) and read with ``allow_pickle=False``: nothing in it can run code.

A state that no longer fits is dropped with a logged reason, never used: one for another
method, or for another model (tensor names or shapes differ, as after a model change), or a
file that cannot be read. The caller then starts the method afresh.
"""

from __future__ import annotations

import io
import json
import logging
import math
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgefl.atomic import write_atomic

log = logging.getLogger(__name__)

FILE_NAME = "personal.npz"
FORMAT_VERSION = 1
_META = "meta"

Weights = dict[str, np.ndarray]
Spec = Mapping[str, tuple[int, ...]]


@dataclass
class PersonalState:
    """What a method keeps, and for which method and model it holds."""

    method: str
    spec: dict[str, tuple[int, ...]]  # the model's tensor names and shapes
    settings: dict[str, Any]  # the [personal] table, lr and batch_size it trains with
    # named weight sets, each over some of the spec's tensors (a personal model: all of them;
    # a head: its layers)
    slots: dict[str, Weights] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)
    # free text the method keeps (Ditto: the digest of the global model it was pulled towards)
    notes: dict[str, str] = field(default_factory=dict)


def save(path: Path, state: PersonalState) -> None:
    """Write ``state`` to ``path`` atomically."""
    meta = {
        "v": FORMAT_VERSION,
        "method": state.method,
        "spec": [[k, list(s)] for k, s in state.spec.items()],
        "settings": state.settings,
        "scalars": state.scalars,
        "notes": state.notes,
        "slots": {name: list(weights) for name, weights in state.slots.items()},
    }
    arrays = {_META: np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
    for name, weights in state.slots.items():
        for key, value in weights.items():
            arrays[f"{name}/{key}"] = np.ascontiguousarray(value, dtype=np.float32)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_atomic(path, buf.getvalue())


def load(path: Path, spec: Spec) -> PersonalState | None:
    """The state in ``path`` if there is one and it is for this model (``spec``); else None,
    with the reason logged. The caller checks the method."""
    if not path.exists():
        return None
    try:
        state = _read(path)
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as e:
        log.warning("personal state %s dropped: it cannot be read (%s)", path, e)
        return None
    if state.spec != {k: tuple(s) for k, s in spec.items()}:
        log.warning(
            "personal state %s dropped: it is for another model shape (%s), the device trains %s",
            path,
            _describe(state.spec),
            _describe(spec),
        )
        return None
    for name, weights in state.slots.items():
        for key, value in weights.items():
            if key not in spec or value.shape != tuple(spec[key]):
                log.warning(
                    "personal state %s dropped: %s/%s does not fit the model", path, name, key
                )
                return None
    log.info("personal state restored from %s (%s)", path, state.method)
    return state


def _read(path: Path) -> PersonalState:
    with np.load(path, allow_pickle=False) as npz:
        meta = json.loads(bytes(npz[_META]).decode())
        if not isinstance(meta, dict) or meta.get("v") != FORMAT_VERSION:
            raise ValueError("not a personal state file of this version")
        slots: dict[str, Weights] = {}
        for name, keys in dict(meta["slots"]).items():
            slots[str(name)] = {str(k): _finite(npz[f"{name}/{k}"]) for k in keys}
    scalars = {str(k): float(v) for k, v in dict(meta["scalars"]).items()}
    if not all(math.isfinite(v) for v in scalars.values()):
        raise ValueError("a scalar is not finite")
    return PersonalState(
        method=str(meta["method"]),
        spec={str(k): tuple(int(n) for n in s) for k, s in meta["spec"]},
        settings=dict(meta["settings"]),
        slots=slots,
        scalars=scalars,
        notes={str(k): str(v) for k, v in dict(meta["notes"]).items()},
    )


def _finite(arr: np.ndarray) -> np.ndarray:
    if arr.dtype != np.float32:
        raise ValueError(f"an array of {arr.dtype}, not float32")
    if not np.isfinite(arr).all():
        raise ValueError("an array holds NaN or Inf")
    return np.array(arr)


def _describe(spec: Spec) -> str:
    return ", ".join(f"{k} {'x'.join(map(str, s))}" for k, s in spec.items())
