"""The page hash: the checksum of a raw KV page that every device computes in place.

A blob's header records ``raw_hash``, the page hash of the page it codes (docs/FORMAT.md);
the decoder recomputes it on the decoded page, on the device that decoded it, and refuses
the page if they differ. Definition (the one source of truth; FORMAT.md repeats it in words):

    bytes  the page's storage bytes in C order (each element little-endian), n bytes
    w_j    the little-endian u64 of bytes [8j, 8j + 8), zero bytes past n; j < ceil(n / 8)
    k_j    SEED + (j + 1) * GAMMA                       (mod 2^64: splitmix64's state sequence)
    fmix   z ^= z >> 30; z *= MIX1; z ^= z >> 27; z *= MIX2; z ^= z >> 31   (mod 2^64)
    hash   sum over j of fmix(w_j ^ k_j)                 (mod 2^64)

fmix is splitmix64's finaliser (Stafford's Mix13), a bijection of u64 with full avalanche.
The sum does not depend on the order of its terms, so threads, lanes and programs each add
up any subset of words and the partial sums are added at the end: the same u64 on every
device and any number of threads.

Why it detects corruption (and what it is not):

* Any change confined to one 8-byte word (one flipped bit, one wrong symbol, two symbols of
  the same word swapped) is ALWAYS detected: for a fixed j, w -> fmix(w ^ k_j) is a
  bijection, so that word's term changes and no other term does.
* Changes spread over several words (a burst, a swapped pair of words or symbols in
  different words, a garbage page) change the sum by a sum of differences of fmix outputs,
  which behave like independent random u64s: a collision has probability ~2^-64 per pair
  of pages. k_j ties each term to its position, so moving data between positions changes
  the terms as much as changing it does.
* It is an error-detecting checksum, not a MAC: anyone can compute it, and someone who
  wants a collision can make one (the sum is easy to steer). The store's records have
  their own checksums (docs/STORAGE.md); nothing here defends against an adversary.

Why 8-byte words rather than one term per element: fmix costs two 64-bit multiplies; per
u64 word that is as many as xxh64 spends on the same bytes (docs/BENCHMARKS.md has the
CPU figures), per bf16 element it would be four times as many (eight for fp8). The word
view is also the same for every dtype: the hash is a function of the page's bytes.

Implementations (the same u64 on the same page; tests/test_page_hash.py pins a golden one):
``reference`` here (int64 torch ops, any device), the Triton kernel in page_hash_triton.py
(CUDA), and ``page_hash`` in rans_cpu.cpp (CPU, at::parallel_for). ``page_hash(page)``
below picks one by the page's device.
"""

from __future__ import annotations

import torch

SEED = 0x243F6A8885A308D3  # pi's fraction bits: any fixed value; part of the format
GAMMA = 0x9E3779B97F4A7C15  # 2^64 / golden ratio, odd (splitmix64's increment)
MIX1 = 0xBF58476D1CE4E5B9  # splitmix64 finaliser multipliers
MIX2 = 0x94D049BB133111EB
MASK64 = (1 << 64) - 1

# The reference hashes this many words per step: its int64 temporaries are a few of
# [CHUNK_WORDS] (512 KiB each), whatever the page's size.
CHUNK_WORDS = 1 << 16


def signed(u: int) -> int:
    """A u64 as the int64 with the same bits (how torch and pybind carry it)."""
    return u - (1 << 64) if u >> 63 else u


def page_bytes(page: torch.Tensor) -> torch.Tensor:
    """The page's storage bytes, C order: uint8 [n] on the page's device (a view when the
    page is contiguous; else a contiguous copy of this one page, e.g. a page decoded in
    place into a strided view of SGLang's host buffer: one page's bytes, never a batch's)."""
    flat = page.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8)


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical z >> s of int64 bit patterns (torch's >> on int64 is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def reference(page: torch.Tensor) -> int:
    """The page hash with int64 torch ops, on the page's device (CPU or CUDA).

    int64 products wrap mod 2^64 in torch on CPU and CUDA (two's complement; CUDA's mul.lo
    is defined to); tests/test_page_hash.py checks this function against Python integers
    and the other implementations, so a platform where it did not would fail there."""
    data = page_bytes(page)  # uint8 [n]
    n = data.numel()
    total = 0
    # One aligned, zero-padded scratch buffer, reused: uint8 [8 * CHUNK_WORDS].
    buf = torch.empty(8 * min(CHUNK_WORDS, -(-n // 8)), dtype=torch.uint8, device=data.device)
    for start in range(0, n, 8 * CHUNK_WORDS):
        chunk = data[start : start + 8 * CHUNK_WORDS]
        num_words = -(-chunk.numel() // 8)
        buf[: chunk.numel()].copy_(chunk)
        buf[chunk.numel() : 8 * num_words].zero_()  # the last word's padding
        w = buf[: 8 * num_words].view(torch.int64)  # [num_words] little-endian words
        j = torch.arange(start // 8, start // 8 + num_words, dtype=torch.int64, device=data.device)
        z = w ^ ((j + 1) * signed(GAMMA) + signed(SEED))  # w_j ^ k_j
        z = (z ^ _shr(z, 30)) * signed(MIX1)
        z = (z ^ _shr(z, 27)) * signed(MIX2)
        z = z ^ _shr(z, 31)
        total += int(z.sum())  # int64 sum: exact mod 2^64, which is all that is kept
    return total & MASK64


def page_hash(page: torch.Tensor) -> int:
    """The page hash (u64) of a page in any dtype and strides, computed on its device:
    the Triton kernel on CUDA, the C++ loop on the CPU (the reference if it cannot build)."""
    if page.device.type == "cuda":
        from sglang_speckv.kernels import page_hash_triton  # imports triton: only when needed

        return page_hash_triton.page_hash(page)
    from sglang_speckv.kernels import rans_cpu

    return rans_cpu.page_hash(page)
