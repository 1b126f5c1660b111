"""The header the store keeps with every value, and the check every read makes.

A stored page is its value (an opaque coded blob, stored as given, so writes and reads copy
it only once) plus a 24-byte header kept in the page's ``meta`` entry (storage/tier.py),
little-endian:

    offset  size  field
    0       4     magic  b"SKVR"
    4       1     version (RECORD_VERSION)
    5       3     zero
    8       8     value length in bytes
    16      8     checksum: XXH3-64 of (store key || header bytes 0..15 || value)

The checksum covers the key, so a value that ends up under the wrong key (a damaged
B-tree, a bad copy) fails too, not only flipped bytes. XXH3-64 rather than the older XXH64:
the same 64-bit xxHash family, but ~38 GB/s against XXH64's ~7 GB/s on this project's
machines (a memcpy: ~10-20 GB/s), which is what lets a verified read from the RAM tier
cost under 2x a memcpy (examples/bench_store.py).

A page that fails any check is never returned: the store deletes it and reports a miss.
"""

from __future__ import annotations

import struct

import xxhash

MAGIC = b"SKVR"
RECORD_VERSION = 1
_HEAD = struct.Struct("<4sB3xQ")  # magic, version, value length: the checksummed prefix
_SUM = struct.Struct("<Q")
HEADER_SIZE = _HEAD.size + _SUM.size  # 24


def _checksum(key: bytes, head: bytes, value) -> int:
    h = xxhash.xxh3_64()
    h.update(key)
    h.update(head)
    h.update(value)
    return h.intdigest()


def seal(key: bytes, value) -> bytes:
    """The header for ``value`` (a C-contiguous bytes-like object) stored under ``key``."""
    value = memoryview(value).cast("B")
    head = _HEAD.pack(MAGIC, RECORD_VERSION, len(value))
    return head + _SUM.pack(_checksum(key, head, value))


def recorded_length(header) -> int | None:
    """The value length ``header`` records (None if it is not a header of this version):
    what a removal subtracts from the tier's byte counter, whatever the stored value became."""
    if len(header) != HEADER_SIZE:
        return None
    magic, version, length = _HEAD.unpack_from(header)
    return length if magic == MAGIC and version == RECORD_VERSION else None


def verify(key: bytes, header, value) -> bool:
    """True iff ``header`` is an intact header of this version for ``value`` under ``key``."""
    if len(header) != HEADER_SIZE:
        return False
    magic, version, length = _HEAD.unpack_from(header)
    if magic != MAGIC or version != RECORD_VERSION or length != len(value):
        return False
    return _SUM.unpack_from(header, _HEAD.size)[0] == _checksum(key, header[: _HEAD.size], value)
