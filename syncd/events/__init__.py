"""Decoders: one Kafka message value -> ProfileChange, or DecodeError with a bounded reason.

`decode(raw, input_format)` picks the format named by `kafka.input_format`: "canonical"
(syncd's own JSON, its fields listed in canonical.py) or "segment" (Segment Engage audience
events, see segment.py).
"""

from __future__ import annotations

from syncd.events.canonical import DEFAULT_MAX_BYTES, DecodeError, decode_canonical
from syncd.events.segment import decode_segment
from syncd.model import ProfileChange

__all__ = ["DecodeError", "decode"]

_DECODERS = {"canonical": decode_canonical, "segment": decode_segment}


def decode(raw: bytes, input_format: str, max_bytes: int = DEFAULT_MAX_BYTES) -> ProfileChange:
    """Decode one message value. Raises DecodeError (never anything else) for unusable input."""
    try:
        decoder = _DECODERS[input_format]
    except KeyError:
        raise ValueError(f"unknown input format {input_format!r}") from None
    return decoder(raw, max_bytes)
