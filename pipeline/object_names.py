"""Values from the stream that become parts of S3 object names, checked against their documented shape first.

Shard ids and sequence numbers come from the service, and an object name is a path: a value holding `/`, `..` or
anything unexpected would put an object somewhere else. They are checked where they become names, so a value of
the wrong shape is refused (its record dead-lettered with the reason) instead of being written anywhere.
"""

from __future__ import annotations

import hashlib
import re

SHARD_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,64}$")
"""DynamoDB Streams documents shard ids as at most 65 characters (shardId-<20 digits>-<8 hex>). The documented
minimum length (28) is not enforced: what matters for a name is the characters, and test streams use short ids."""
SEQUENCE_NUMBER = re.compile(r"^[0-9]{1,40}$")
"""Sequence numbers are documented as decimal digits, at most 40 (at least 21 on AWS; not enforced, as above)."""
_SEGMENT = re.compile(r"^[A-Za-z0-9_.=-]{1,100}$")


class UnsafeNameError(ValueError):
    """A value from the stream does not have the documented shape, so it cannot be part of an object name."""


def checked_shard_id(shard_id: str) -> str:
    if not SHARD_ID.match(shard_id) or ".." in shard_id:
        raise UnsafeNameError(f"shard id {shard_id[:80]!r} is not up to 65 letters, digits, '-', '_' or '.'")
    return shard_id


def checked_sequence_number(sequence_number: str) -> str:
    if not SEQUENCE_NUMBER.match(sequence_number):
        raise UnsafeNameError(f"sequence number {sequence_number[:80]!r} is not up to 40 decimal digits")
    return sequence_number


def key_segment(text: str) -> str:
    """`text` as one path segment: itself when plainly safe, otherwise a digest of it (names chosen in a config,
    such as a sink's name, may hold anything)."""
    if _SEGMENT.match(text) and ".." not in text:
        return text
    return "x" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def normalized_prefix(prefix: str) -> str:
    """An S3 key prefix as the archive writes it: no leading '/', one trailing '/' unless empty."""
    prefix = prefix.lstrip("/")
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"
