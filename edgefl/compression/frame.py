"""zstd over a whole envelope, used only where it pays, and decompressed within a bound.

The sender compresses the envelope and keeps the result only if it is smaller (dense fp32
deltas shrink a little; a packed top-k payload is close to random and does not). The receiver
refuses a frame that does not state its decompressed size, that states more than the limit, or
that holds anything after the frame; zstd itself stops a frame that produces more than it
stated, so a decompression bomb costs at most the limit in memory.
"""

from __future__ import annotations

import threading

import zstandard

from edgefl.compression.base import WireError

LEVEL = 3
_UNKNOWN = zstandard.CONTENTSIZE_UNKNOWN
# A zstd context costs about as much to set up as compressing a dense update of a small model
# takes; one per thread (a context may not be shared by threads at once), kept for the next.
_contexts = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    c = getattr(_contexts, "compressor", None)
    if c is None:
        c = _contexts.compressor = zstandard.ZstdCompressor(
            level=LEVEL, write_checksum=False, write_content_size=True, write_dict_id=False
        )
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_contexts, "decompressor", None)
    if d is None:
        d = _contexts.decompressor = zstandard.ZstdDecompressor()
    return d


def compress_if_smaller(body: bytes) -> bytes | None:
    """The zstd frame of ``body`` if that is shorter than ``body``, else None."""
    if len(body) < 32:  # a frame costs about 10 bytes; it cannot pay on so little
        return None
    frame = _compressor().compress(body)
    return frame if len(frame) < len(body) else None


def decompress(frame: bytes, max_bytes: int) -> bytes:
    """The body of a zstd frame, at most ``max_bytes`` long; WireError otherwise."""
    try:
        size = zstandard.get_frame_parameters(frame).content_size
    except zstandard.ZstdError:
        raise WireError("malformed", "not a zstd frame") from None
    if size == _UNKNOWN:
        raise WireError("malformed", "the zstd frame does not state its size")
    if size > max_bytes:
        raise WireError(
            "too_large", f"the zstd frame decompresses to {size} bytes, the limit is {max_bytes}"
        )
    try:
        dobj = _decompressor().decompressobj()
        body = dobj.decompress(frame)
    except zstandard.ZstdError as e:
        raise WireError("malformed", f"zstd frame does not decompress ({e})") from None
    if not dobj.eof or dobj.unused_data:
        raise WireError("malformed", "the zstd frame is truncated or followed by other bytes")
    if len(body) != size:
        raise WireError("malformed", f"the zstd frame gave {len(body)} bytes, it states {size}")
    return body
