"""The page hash (kernels/page_hash.py, blob format 2) against the xxh64 it replaced, on one
page in one process: GB/s of raw page, median of --repeats runs (and the best run).

    python examples/bench_page_hash.py [--tokens 128] [--repeats 20]

The page is Llama-3-8B-shaped bf16 ([2, 32, tokens, 8, 128]; 128 tokens = 16 MiB). CPU rows:
xxh64 of the page's bytes as format 1's codec computed it (one thread), the C++ page hash
with torch's threads and with one, and the torch reference. On a CUDA device two more:
format 1's path for a GPU page (copy to the host, then xxh64) and the Triton page hash.
Every implementation's u64 is checked against the reference's. For scale, the last row
times one ``codec.decode_pages`` of the same page (page_stats predictor), which hashes it once.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import xxhash

from sglang_speckv import codec
from sglang_speckv.kernels import page_hash as ph
from sglang_speckv.kernels import rans_cpu
from sglang_speckv.predictors.base import PageMeta
from sglang_speckv.predictors.page_stats import PageStatsPredictor


def timed(fn, repeats: int) -> tuple[float, float, int]:
    """(median seconds, best seconds, result) of ``repeats`` calls after one warm-up."""
    result = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=128, help="page tokens (128: a 16 MiB page)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    page = torch.randn((2, 32, args.tokens, 8, 128), generator=gen).to(torch.bfloat16)  # [2, L, T, H, D]
    nbytes = page.numel() * page.element_size()
    threads = torch.get_num_threads()
    if not rans_cpu.available():
        raise SystemExit("the C++ extension did not build: nothing to compare")
    want = ph.reference(page)

    def xxh64_host(p):  # format 1's codec._xxh64
        return xxhash.xxh64_intdigest(p.detach().contiguous().cpu().view(torch.uint8).numpy())

    def cpp_threads(n):
        def run():
            before = torch.get_num_threads()
            torch.set_num_threads(n)
            try:
                return rans_cpu.page_hash(page)
            finally:
                torch.set_num_threads(before)

        return run

    rows = [
        ("xxh64 (format 1), CPU page", 1, lambda: xxh64_host(page), None),
        ("page hash, C++", threads, cpp_threads(threads), want),
        ("page hash, C++", 1, cpp_threads(1), want),
        ("page hash, torch reference", threads, lambda: ph.reference(page), want),
    ]
    if torch.cuda.is_available():
        from sglang_speckv.kernels import page_hash_triton

        gpu_page = page.cuda()
        rows += [
            ("xxh64 (format 1), GPU page: copy + hash", 1, lambda: xxh64_host(gpu_page), None),
            ("page hash, Triton on the GPU", "-", lambda: page_hash_triton.page_hash(gpu_page), want),
        ]
    print(f"one bf16 page of {nbytes / 2**20:.0f} MiB, {args.repeats} runs, torch threads: {threads}")
    print("| hash | threads | GB/s (median) | GB/s (best) | same u64 as reference |")
    print("|---|---|---|---|---|")
    for name, n, fn, expected in rows:
        median, best, got = timed(fn, args.repeats)
        same = "-" if expected is None else ("OK" if got == expected else "MISMATCH")
        print(f"| {name} | {n} | {nbytes / median / 1e9:.2f} | {nbytes / best / 1e9:.2f} | {same} |")
    predictor = PageStatsPredictor()
    (blob,) = codec.encode_pages([page], [PageMeta("bf16", tuple(page.shape))], predictor)
    t0 = time.perf_counter()
    (_,), (error,) = codec.decode_pages([blob], predictor)
    seconds = time.perf_counter() - t0
    print(f"| codec.decode_pages, page_stats (one run, for scale) | {threads} | {nbytes / seconds / 1e9:.4f} | - | "
          f"{'OK' if error is None else error} |")


if __name__ == "__main__":
    main()
