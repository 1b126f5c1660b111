"""Store keys: SGLang's page hash, prefixed by a namespace of everything that changes the page.

SGLang's page keys (64-hex SHA-256 chains over token ids) say nothing about the model, the
rank's shard of the KV, its dtype, layout or page size, nor about our blob format. Two
servers sharing a store must never read each other's pages, so the backend derives an
8-byte namespace from those facts and the store prefixes every key with it:

    store key = namespace(...) (8 bytes) || page key (UTF-8)

The namespace is an XXH64 digest of a canonical text; with the handful of namespaces one
store ever holds, the chance that two collide is ~k^2 / 2^65 (k namespaces). The page key
itself is kept whole, never hashed shorter: a collision there would return another
prompt's KV, which the checksums cannot catch.

What is in the namespace, and what is not:
- model, KV dtype, layout, page size, blob format version: change the bytes of a page.
- pipeline rank and size: each PP rank holds different layers.
- context-parallel rank and size (attention CP, decode CP): each holds a slice of a page.
- tensor-parallel rank and size: each holds different KV heads, unless the KV is replicated
  on every TP rank (MLA), in which case all ranks share one copy (``kv_replicated``).
- not the data-parallel rank: DP groups compute the same KV for the same prefix.
"""

from __future__ import annotations

import xxhash

NAMESPACE_SIZE = 8  # bytes; xxh64 digest


def namespace(
    model: str,
    *,
    kv_dtype: str,
    layout: str,
    page_size: int,
    format_version: int,
    tp_rank: int = 0,
    tp_size: int = 1,
    kv_replicated: bool = False,
    pp_rank: int = 0,
    pp_size: int = 1,
    cp_rank: int = 0,
    cp_size: int = 1,
    dcp_rank: int = 0,
    dcp_size: int = 1,
    coding: str = "",
) -> bytes:
    """The 8-byte key prefix for pages of this model shard and format. ``coding`` names what
    the pages are coded with (the backend: its predictors' ids and fingerprints), so that a
    server configured with another calibration neither reads nor counts them as its own."""
    tp = "replicated" if kv_replicated else f"{tp_rank}/{tp_size}"
    text = (
        f"speckv-namespace-v1|model={model}|kv_dtype={kv_dtype}|layout={layout}"
        f"|page_size={page_size}|format={format_version}|tp={tp}|pp={pp_rank}/{pp_size}"
        f"|cp={cp_rank}/{cp_size}|dcp={dcp_rank}/{dcp_size}"
    ) + (f"|coding={coding}" if coding else "")
    return xxhash.xxh64_digest(text.encode())


def store_key(ns: bytes, key: str) -> bytes:
    """The key a page is stored under: ``ns`` followed by SGLang's key in UTF-8."""
    return ns + key.encode()
