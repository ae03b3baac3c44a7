"""Tensor codecs: how a model delta (or the model itself) becomes bytes on the wire and back.

=================  ==========================================================================
module             what it holds
=================  ==========================================================================
``base``           :class:`WireError`, the :class:`Codec` interface, the model's flat layout
``dense``          ``dense_fp32`` and ``fp16``: every value, one record per tensor
``sparse``         ``int8``, ``prune`` and ``topk``: kept values, quantised, in one packed format
``indices``        position coding: bitmap, varint gaps or Rice gaps, whichever is smallest
``quantize``       2/4/8-bit levels with per-tensor or per-block scales, stochastic rounding
``frame``          zstd over a whole envelope, bounded on decode
=================  ==========================================================================

:func:`make_codec` builds a codec from the spec a task or an envelope carries;
:func:`codec_from_config` from the ``[codec]`` table of a configuration.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from edgefl.compression.base import (
    Codec,
    ModelSpec,
    WireError,
    check_finite,
    flatten,
    num_values,
    spec_tag,
    unflatten,
)
from edgefl.compression.dense import DenseCodec, DenseFp16Codec
from edgefl.compression.sparse import Int8Codec, PackedCodec, PruneCodec, TopKCodec
from edgefl.config import CodecConfig, ConfigError

__all__ = [
    "CODECS",
    "CODECS_BY_WIRE_ID",
    "Codec",
    "DenseCodec",
    "DenseFp16Codec",
    "Int8Codec",
    "ModelSpec",
    "PackedCodec",
    "PruneCodec",
    "TopKCodec",
    "WireError",
    "check_finite",
    "codec_from_config",
    "flatten",
    "make_codec",
    "num_values",
    "spec_tag",
    "unflatten",
]

CODECS: dict[str, type[Codec]] = {
    c.name: c for c in (DenseCodec, DenseFp16Codec, Int8Codec, PruneCodec, TopKCodec)
}
CODECS_BY_WIRE_ID: dict[int, type[Codec]] = {c.wire_id: c for c in CODECS.values()}


def make_codec(spec: Mapping[str, Any] | str, *, complete: bool = False) -> Codec:
    """The codec a spec names (``{"name": ..., **params}``); WireError if unknown or invalid.

    A spec from configuration may leave parameters out (their defaults are the ``[codec]``
    table's); one from the wire (``complete``) must give every parameter the codec takes."""
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping):
        raise WireError("codec", "codec spec must be a map")
    name = spec.get("name")
    cls = CODECS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise WireError("codec", f"unknown codec {name!r}; known: {', '.join(sorted(CODECS))}")
    params = {k: v for k, v in spec.items() if k != "name"}
    if not all(isinstance(k, str) for k in params):
        raise WireError("codec", f"bad parameters for codec {name!r}: names must be strings")
    missing = [p for p in cls.PARAMS if p not in params] if complete else []
    if missing:
        raise WireError("codec", f"codec {name!r} without {', '.join(missing)}")
    try:
        return cls(**params)
    except (TypeError, ValueError) as e:
        raise WireError("codec", f"bad parameters for codec {name!r}: {e}") from None


def codec_from_config(cfg: CodecConfig) -> Codec:
    """The codec the ``[codec]`` table selects, with the parameters that codec takes."""
    cls = CODECS.get(cfg.name)
    if cls is None:
        raise ConfigError(f"codec.name {cfg.name!r} is not one of {', '.join(sorted(CODECS))}")
    params = {p: getattr(cfg, p) for p in cls.PARAMS}
    try:
        return cls(**params)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"[codec] {cfg.name}: {e}") from None
