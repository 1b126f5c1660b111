"""Deterministic token content for trace chunks, and the page keys of a prompt.

Real traces publish only the identity of each block of a prompt (Mooncake's ``hash_ids``),
not its tokens. A replayer must send tokens, and the sharing structure survives only if the
same identity always becomes the same tokens. ``chunk_tokens(key, n)`` is that function:

- deterministic in (seed, key) on every machine and numpy version (splitmix64, exact
  uint64 arithmetic; no library random stream whose algorithm could change);
- prefix-consistent: the first n tokens of a chunk do not depend on how long it is, so a
  partial last block is a prefix of the full block with the same id;
- inside a vocabulary range that is valid and free of special tokens for the models we
  serve (``DEFAULT_VOCAB``).

``page_keys`` gives the simulator what SGLang's page hashes give the store: one key per FULL
page of ``page_tokens`` tokens, chained, so two prompts share a page key exactly when they
share all tokens up to the end of that page (the partial tail page is never stored).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

import numpy as np
import xxhash

# Token ids [1000, 32000): below every vocabulary size we target (Llama-2 32000, SmolLM2
# 49152, Llama-3 128256, Qwen 151936) and above the low special ids (SmolLM2 uses 0-16,
# Llama-2 0-2); the high special ids of Llama-3 (128000+) and Qwen (151643+) are out of
# range too. One range therefore serves every model the replay may target.
DEFAULT_VOCAB = (1000, 32000)

# splitmix64 constants (Steele, Lea, Flood 2014): the golden-ratio increment and the two
# multipliers of its finaliser. Public, fixed: changing them changes every synthesised trace.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1


def key_of(*parts: object) -> int:
    """A stable 63-bit key for a tuple of ints/strings (xxh64 of its repr; Python's own
    ``hash`` of a str changes between runs)."""
    return xxhash.xxh64_intdigest(repr(parts).encode()) >> 1


def chunk_tokens(key: int, n: int, seed: int = 0, vocab: tuple[int, int] = DEFAULT_VOCAB) -> np.ndarray:
    """The first ``n`` tokens of chunk ``key`` (int64 [n]), uniform in [vocab[0], vocab[1]).

    Token i is splitmix64(base + (i + 1) * golden) mod range, with base = xxh64(seed, key):
    each token depends only on (seed, key, i), hence determinism and prefix consistency.
    The modulo bias is below range / 2^64 (< 1e-14): irrelevant.
    """
    low, high = vocab
    if not 0 <= low < high:
        raise ValueError(f"vocabulary range must satisfy 0 <= low < high, got {vocab}")
    if n < 0:
        raise ValueError(f"token count must be >= 0, got {n}")
    base = np.uint64(xxhash.xxh64_intdigest(struct.pack("<QQ", seed & _MASK64, key & _MASK64)))
    z = base + (np.arange(1, n + 1, dtype=np.uint64) * _GOLDEN)  # wraps mod 2^64, by design
    z = (z ^ (z >> np.uint64(30))) * _MUL1
    z = (z ^ (z >> np.uint64(27))) * _MUL2
    z = z ^ (z >> np.uint64(31))
    return (z % np.uint64(high - low)).astype(np.int64) + low


def page_keys(chunks: Iterable[tuple[int, int]], page_tokens: int) -> list[int]:
    """Chained keys of the full pages of a prompt given as (chunk key, token count) pairs.

    A page's key hashes the previous page's key and the (chunk key, start, end) token ranges
    the page covers, so it identifies the page's tokens and everything before them, as
    SGLang's SHA-256 page chain does. Tokens after the last full page get no key.
    """
    if page_tokens <= 0:
        raise ValueError(f"page_tokens must be > 0, got {page_tokens}")
    keys: list[int] = []
    prev = 0
    parts: list[tuple[int, int, int]] = []  # token ranges of the page being filled
    fill = 0
    for key, n in chunks:
        start = 0
        while start < n:
            take = min(page_tokens - fill, n - start)
            parts.append((key, start, start + take))
            fill += take
            start += take
            if fill == page_tokens:
                prev = xxhash.xxh64_intdigest(repr((prev, parts)).encode())
                keys.append(prev)
                parts = []
                fill = 0
    return keys
