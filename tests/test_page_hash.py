"""The page hash (kernels/page_hash.py): the torch reference, the C++ loop (rans_cpu) and the
Triton kernel (page_hash_triton; Triton's interpreter without a GPU, as in
tests/test_rans_triton.py) give the same u64 as the definition written out in Python
integers below, on every dtype and hostile bit pattern; a golden value pins the definition;
a flipped bit or a swapped pair changes the hash."""

from __future__ import annotations

import importlib
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the import below (see test_rans_triton.py)

import pytest  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from sglang_speckv.kernels import page_hash as ph  # noqa: E402
from sglang_speckv.kernels import page_hash_triton as pht  # noqa: E402
from sglang_speckv.kernels import rans_cpu  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not isinstance(pht._page_hash_kernel, InterpretedFunction):
    pht = importlib.reload(pht)  # another test imported it before TRITON_INTERPRET was set

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
# NaN payloads, +-inf, +-0, subnormals, extremes (storage patterns).
HOSTILE = {
    "bf16": [0x7F80, 0xFF80, 0x7FC0, 0x7F81, 0xFFFF, 0x0000, 0x8000, 0x0001, 0x807F, 0x7F7F],
    "fp16": [0x7C00, 0xFC00, 0x7E00, 0x7C01, 0xFFFF, 0x0000, 0x8000, 0x0001, 0x83FF, 0x7BFF],
    "fp8_e4m3": [0x7F, 0xFF, 0x7E, 0xFE, 0x00, 0x80, 0x01, 0x81, 0x07, 0x87],
    "fp8_e5m2": [0x7C, 0xFC, 0x7D, 0x7F, 0xFE, 0x00, 0x80, 0x01, 0x83, 0x7B],
}


def spec_hash(data: bytes) -> int:
    """kernels/page_hash.py's definition, in Python integers."""
    mask = (1 << 64) - 1
    data += bytes(-len(data) % 8)
    total = 0
    for j in range(len(data) // 8):
        z = int.from_bytes(data[8 * j : 8 * j + 8], "little") ^ ((ph.SEED + (j + 1) * ph.GAMMA) & mask)
        z ^= z >> 30
        z = (z * ph.MIX1) & mask
        z ^= z >> 27
        z = (z * ph.MIX2) & mask
        z ^= z >> 31
        total = (total + z) & mask
    return total


def make_page(dtype: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random storage patterns of ``dtype`` with the hostile ones at the front."""
    torch_dtype = DTYPES[dtype]
    bits_dtype = torch.int16 if torch_dtype.itemsize == 2 else torch.uint8
    top = 1 << (8 * torch_dtype.itemsize)
    gen = torch.Generator().manual_seed(seed)
    patterns = torch.randint(0, top, shape, generator=gen).view(-1)
    patterns[: len(HOSTILE[dtype])] = torch.tensor(HOSTILE[dtype])
    patterns = torch.where(patterns >= top // 2, patterns - top, patterns) if bits_dtype == torch.int16 else patterns
    return patterns.to(bits_dtype).view(torch_dtype).view(shape)


def all_hashes(page: torch.Tensor) -> dict[str, int]:
    return {
        "spec": spec_hash(page.contiguous().view(torch.uint8).numpy().tobytes()),
        "reference": ph.reference(page),
        "c++": rans_cpu.page_hash(page),
        "triton": pht.page_hash(page.to(DEVICE)),
        "dispatch": ph.page_hash(page),
    }


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", [(2, 1, 3, 1, 5), (2, 2, 16, 2, 64)])
def test_implementations_agree(dtype, shape):
    """Odd sizes (a zero-padded last word) and whole words, every dtype, hostile patterns."""
    page = make_page(dtype, shape, seed=len(shape) + shape[2])
    hashes = all_hashes(page)
    assert len(set(hashes.values())) == 1, {k: hex(v) for k, v in hashes.items()}


def test_implementations_agree_across_chunks_and_blocks():
    """600 KiB: several Triton programs, C++ chunks (128 KiB) and reference chunks (512 KiB),
    and a page that is not contiguous (hashed as its C-order copy)."""
    page = make_page("bf16", (2, 3, 100, 8, 128), seed=1)
    hashes = all_hashes(page)
    assert len(set(hashes.values())) == 1, {k: hex(v) for k, v in hashes.items()}
    strided = page.transpose(2, 3)
    assert rans_cpu.page_hash(strided) == ph.reference(strided) == ph.reference(strided.contiguous()) != hashes["spec"]


def test_known_answer():
    """Golden u64s (computed once by spec_hash): the definition must not drift, on any
    implementation. 37 bf16 elements = 74 bytes, so the last word is zero-padded."""
    page = (torch.arange(37, dtype=torch.int16) * 1777).view(torch.bfloat16)
    fp8 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    doc = torch.tensor([0x01, 0xF3, 0x7A, 0x80, 0x00, 0x5C, 0xC1, 0x29], dtype=torch.uint8)  # docs/FORMAT.md's
    cases = ((page, 0x2E8BE1C9C64C0A22), (fp8, 0x17602D8A4E6B20B9), (doc, 0x68C1FE622CBBD22D), (doc[:5], 0x819874E3EB6F7705))
    for tensor, golden in cases:
        assert set(all_hashes(tensor).values()) == {golden}, hex(spec_hash(tensor.view(torch.uint8).numpy().tobytes()))


def test_every_single_bit_flip_changes_the_hash():
    """Deterministic, not probabilistic: one word's term is a bijection of the word."""
    page = make_page("fp8_e5m2", (2, 1, 4, 1, 13), seed=3)  # 104 bytes
    raw = page.view(torch.uint8).reshape(-1)
    base = rans_cpu.page_hash(page)
    for i in range(raw.numel()):
        for bit in range(8):
            flipped = raw.clone()
            flipped[i] ^= 1 << bit
            assert rans_cpu.page_hash(flipped) != base, (i, bit)
    flipped = raw.clone()
    flipped[-1] ^= 0x80
    assert ph.reference(flipped) != base and pht.page_hash(flipped.to(DEVICE)) != base


def test_swapped_elements_change_the_hash():
    """Two distinct elements swapped: in the same word, in neighbouring words, far apart."""
    page = make_page("bf16", (2, 1, 8, 1, 16), seed=4).reshape(-1)
    base = ph.reference(page)
    for a, b in ((0, 1), (3, 4), (2, 200), (5, 255)):
        assert page[a].view(torch.int16) != page[b].view(torch.int16)
        swapped = page.clone()
        swapped[a], swapped[b] = page[b], page[a]
        assert rans_cpu.page_hash(swapped) != base and ph.reference(swapped) != base, (a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_gpu_large_page():
    """Compiled kernel on CUDA, a 16 MiB bf16 page (2048 programs): the reference's u64 on
    the CPU and on the GPU."""
    page = make_page("bf16", (2, 16, 64, 8, 128), seed=6)
    want = rans_cpu.page_hash(page)
    assert pht.page_hash(page.cuda()) == ph.page_hash(page.cuda()) == ph.reference(page.cuda()) == want
