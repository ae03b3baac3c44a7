"""Error feedback and Deep Gradient Compression's corrections, kept on the device.

A lossy codec leaves part of every update behind. Error feedback keeps that part, the residual,
on the device and adds it to the next update, so that what the codec drops is delayed rather
than lost: Stich, Cordonnier and Jaggi, "Sparsified SGD with Memory" (NeurIPS 2018);
Karimireddy, Rebjock, Stich and Jaggi, "Error Feedback Fixes SignSGD and other Gradient
Compression Schemes" (ICML 2019). Our updates are local-training deltas rather than gradients;
accumulating their residual is what Sattler et al. do in federated learning ("Sparse Ternary
Compression", IEEE TNNLS 2019).

From Deep Gradient Compression (Lin, Han, Mao, Wang and Dally, ICLR 2018), per update:

1. local clipping: the delta is scaled down to an L2 norm of at most ``clip``;
2. momentum correction: a velocity ``u = momentum * u + delta`` is what joins the residual, so
   that values sent late still carry the momentum they would have had;
3. the codec sends part of ``residual + u`` (DGC's sparsity warm-up is the topk codec's);
4. the residual becomes what was not sent (for a sent value, its quantisation error), and
   momentum factor masking clears ``u`` where values were sent.

The state survives a restart: it is a MessagePack file in the device's state directory (raw
float32 bytes, never pickle), replaced atomically (write, fsync, rename) once the update it
belongs to is about to be published. An update that is never published (late, superseded)
leaves the state as it was, as if the round had not happened.

A device that misses rounds keeps its state: the residual is still an update the model has not
had. It is dropped when it can no longer be right: built on a model more than
``max_staleness`` versions before the one the new update builds on, on a newer model than that
(the aggregator was reset), or for another model (tensor names or shapes differ). A file that
cannot be read is dropped with a warning; it never stops the agent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np

from edgefl.atomic import write_atomic
from edgefl.compression import ModelSpec, PackedCodec, num_values, spec_tag
from edgefl.config import CodecConfig

log = logging.getLogger(__name__)

FILE_NAME = "error_feedback.msgpack"
FORMAT_VERSION = 1
DEFAULT_MAX_STALENESS = CodecConfig().max_staleness


@dataclass
class FeedbackState:
    """What a device carries from one update to the next."""

    base_version: int  # the model the last published update was built on
    round: int
    residual: np.ndarray | None  # float32, one per model value; None: nothing left behind
    velocity: np.ndarray | None  # DGC momentum; None: momentum is off


class ErrorFeedback:
    """The residual and velocity of one device, for one model, persisted in ``path``."""

    def __init__(self, path: str | Path, spec: ModelSpec) -> None:
        self.path = Path(path)
        self.spec = dict(spec)
        self.n = num_values(spec)
        self.tag = spec_tag(spec)
        self.state = self._load()
        self._staged: FeedbackState | None = None
        self._has_staged = False

    # -- the pipeline ---------------------------------------------------------------------------

    def compress(
        self,
        delta: np.ndarray,
        codec: PackedCodec,
        *,
        base_version: int,
        round_: int,
        rng: np.random.Generator,
    ) -> bytes:
        """The packed payload for ``delta`` (flat, float32) with clipping, momentum correction
        and error feedback as ``codec`` says; the new state waits for :meth:`commit`."""
        residual, velocity = self._carried(base_version, codec.max_staleness)
        g = np.asarray(delta, dtype=np.float32)
        if codec.clip > 0:
            norm = float(np.linalg.norm(g))
            if norm > codec.clip:
                g = g * np.float32(codec.clip / norm)
        if codec.momentum > 0:
            velocity = g.copy() if velocity is None else np.float32(codec.momentum) * velocity + g
            acc = velocity.copy()
        else:
            velocity = None
            acc = g.copy()
        if codec.error_feedback and residual is not None:
            acc += residual
        payload, idx, sent = codec.compress(acc, self.spec, rng, round_)
        new_residual = None
        if codec.error_feedback:
            new_residual = acc
            new_residual[idx] -= sent
        if velocity is not None:
            velocity[idx] = 0.0  # momentum factor masking
        self._stage(FeedbackState(base_version, round_, new_residual, velocity))
        return payload

    def flush(self, delta: np.ndarray, *, base_version: int, round_: int) -> np.ndarray:
        """For a lossless codec: ``delta`` plus whatever residual is still valid, which is then
        spent (a device the scheduler moves from topk to dense sends what topk held back)."""
        residual, _ = self._carried(base_version, DEFAULT_MAX_STALENESS)
        self._stage(FeedbackState(base_version, round_, None, None))
        out = np.asarray(delta, dtype=np.float32)
        return out + residual if residual is not None else out.copy()

    def commit(self) -> None:
        """The staged state becomes the device's: called just before the update is published."""
        if not self._has_staged:
            return
        self.state, self._staged, self._has_staged = self._staged, None, False
        self._save()

    def _stage(self, state: FeedbackState) -> None:
        self._staged, self._has_staged = state, True

    def _carried(
        self, base_version: int, max_staleness: int
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The residual and velocity to build on, after the staleness policy."""
        s = self.state
        if s is None:
            return None, None
        if base_version < s.base_version:
            log.info(
                "error feedback built on model v%d dropped: the update builds on v%d (the "
                "aggregator was reset)",
                s.base_version,
                base_version,
            )
            return None, None
        if base_version - s.base_version > max_staleness:
            log.info(
                "error feedback built on model v%d dropped: %d versions old, the limit is %d",
                s.base_version,
                base_version - s.base_version,
                max_staleness,
            )
            return None, None
        return s.residual, s.velocity

    # -- persistence ----------------------------------------------------------------------------

    def _save(self) -> None:
        s = self.state
        if s is None or (s.residual is None and s.velocity is None):
            self.path.unlink(missing_ok=True)
            return
        body = msgpack.packb(
            {
                "v": FORMAT_VERSION,
                "tag": self.tag,
                "n": self.n,
                "base": s.base_version,
                "round": s.round,
                "residual": None if s.residual is None else _raw(s.residual),
                "velocity": None if s.velocity is None else _raw(s.velocity),
            },
            use_bin_type=True,
        )
        write_atomic(self.path, body)

    def _load(self) -> FeedbackState | None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("error feedback state %s unreadable (%s); starting without", self.path, e)
            return None
        try:
            state = self._parse(raw)
        except (ValueError, TypeError, KeyError, msgpack.UnpackException) as e:
            log.warning("error feedback state %s dropped: %s", self.path, e)
            return None
        if state is not None:
            log.info(
                "error feedback restored from %s (built on model v%d, round %d)",
                self.path,
                state.base_version,
                state.round,
            )
        return state

    def _parse(self, raw: bytes) -> FeedbackState | None:
        obj = msgpack.unpackb(raw, raw=False, strict_map_key=True, ext_hook=_no_ext)
        if not isinstance(obj, dict) or obj.get("v") != FORMAT_VERSION:
            raise ValueError("not an error feedback file of this version")
        if obj.get("tag") != self.tag or obj.get("n") != self.n:
            log.info("error feedback state %s is for another model; dropped", self.path)
            return None
        base, rnd = obj["base"], obj["round"]
        if not (_is_int(base) and _is_int(rnd)) or base < 0 or rnd < 0:
            raise ValueError("bad model version or round")
        return FeedbackState(
            base, rnd, self._vector(obj["residual"]), self._vector(obj["velocity"])
        )

    def _vector(self, data: object) -> np.ndarray | None:
        if data is None:
            return None
        if not isinstance(data, bytes) or len(data) != 4 * self.n:
            raise ValueError("a stored vector has the wrong size")
        arr = np.frombuffer(data, dtype="<f4").astype(np.float32)
        if not np.isfinite(arr).all():
            raise ValueError("a stored vector holds NaN or Inf")
        return arr


def _raw(arr: np.ndarray) -> bytes:
    return np.ascontiguousarray(arr, dtype="<f4").tobytes()


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _no_ext(code: int, data: bytes) -> object:
    raise ValueError(f"MessagePack extension type {code} in the state file")
