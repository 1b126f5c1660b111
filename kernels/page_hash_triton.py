"""The page hash as a Triton kernel: kernels/page_hash.py's definition, on the GPU.

Torch reference: ``page_hash.reference`` (same u64 on every page; the definition and why
it detects corruption are in page_hash.py's docstring). Each program hashes BLOCK_WORDS
consecutive 8-byte words and writes its partial sum; the launcher adds the partial sums.
The sum is order-independent mod 2^64, so the result does not depend on the block size or
on the order programs run. Integer arithmetic only (uint64 wraps mod 2^64); no float op.

A separate module from page_hash.py because it imports triton, which CPU-only installs of
torch do not have: page_hash.page_hash imports it for CUDA pages only (as the codec does
rans_triton). Under TRITON_INTERPRET=1 it runs on CPU tensors (tests/test_page_hash.py).

Run ``python -m sglang_speckv.kernels.page_hash_triton`` for the self-check (with
TRITON_INTERPRET=1 where there is no GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglang_speckv.kernels import page_hash as ph

_SEED = tl.constexpr(ph.SEED)
_GAMMA = tl.constexpr(ph.GAMMA)
_MIX1 = tl.constexpr(ph.MIX1)
_MIX2 = tl.constexpr(ph.MIX2)

BLOCK_WORDS = 1024  # words (8 KiB of page) per program


@triton.jit
def _page_hash_kernel(bytes_ptr, partial_ptr, num_bytes, BLOCK_WORDS: tl.constexpr):
    """partial[pid] = sum of fmix(w_j ^ k_j) over this program's words j (mod 2^64)."""
    pid = tl.program_id(0)
    offs_w = pid * BLOCK_WORDS + tl.arange(0, BLOCK_WORDS)  # [BLOCK_WORDS] word indices j
    offs_b = tl.arange(0, 8)  # [8] byte of the word, least significant first
    offs = offs_w[:, None] * 8 + offs_b[None, :]  # [BLOCK_WORDS, 8] byte offsets (< 2^31)
    byte = tl.load(bytes_ptr + offs, mask=offs < num_bytes, other=0)  # uint8, 0 past the page
    shift = (offs_b * 8).to(tl.uint64)[None, :]  # [1, 8]
    # w_j: the 8 bytes are disjoint bit fields, so their sum is their OR.
    w = tl.sum(byte.to(tl.uint64) << shift, axis=1)  # [BLOCK_WORDS] uint64
    k = _SEED + (offs_w.to(tl.uint64) + 1) * _GAMMA  # k_j (mod 2^64)
    z = w ^ k
    z = (z ^ (z >> 30)) * _MIX1  # uint64: >> is logical, * wraps
    z = (z ^ (z >> 27)) * _MIX2
    z = z ^ (z >> 31)
    z = tl.where(offs_w * 8 < num_bytes, z, 0)  # words past the page add nothing
    tl.store(partial_ptr + pid, tl.sum(z, axis=0).to(tl.int64, bitcast=True))


def page_hash(page: torch.Tensor) -> int:
    """The page hash (u64) of a page on a CUDA device (or any device under
    TRITON_INTERPRET=1): any dtype, any strides (a non-contiguous page is copied first)."""
    data = ph.page_bytes(page)  # uint8 [n]
    num_bytes = data.numel()
    if num_bytes > (1 << 31) - 8 * BLOCK_WORDS:  # byte offsets are int32 in the kernel
        raise ValueError(f"a page of {num_bytes} bytes is too large for the page hash kernel (blobs hold <= 1 GiB)")
    num_programs = max(1, triton.cdiv(num_bytes, 8 * BLOCK_WORDS))
    partial = torch.empty(num_programs, dtype=torch.int64, device=data.device)  # [programs]
    _page_hash_kernel[(num_programs,)](data, partial, num_bytes, BLOCK_WORDS=BLOCK_WORDS)
    return int(partial.sum()) & ph.MASK64  # int64 sum: exact mod 2^64


def _self_check() -> None:
    """Triton kernel == torch reference == C++ on pages of every dtype and awkward sizes."""
    from sglang_speckv.kernels import rans_cpu

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    sizes = (1, 3, 8, 1023, 8 * BLOCK_WORDS + 5) if device == "cpu" else (1, 3, 1 << 20, 16 << 20)
    for n in sizes:  # bytes
        raw = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen).to(device)
        for dtype in (torch.uint8, torch.float8_e4m3fn, torch.bfloat16, torch.float16):
            page = raw[: n - n % dtype.itemsize].view(dtype)
            got, want, cpp = page_hash(page), ph.reference(page), rans_cpu.page_hash(page.cpu())
            verdict = "OK" if got == want == cpp else f"MISMATCH (reference {want:#018x}, C++ {cpp:#018x})"
            print(f"{str(dtype):22} {page.numel() * dtype.itemsize:9} bytes  {got:#018x}  {verdict}")
            if verdict != "OK":
                raise SystemExit(1)


if __name__ == "__main__":
    _self_check()
