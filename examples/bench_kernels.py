"""Coder throughput over batch sizes: GB/s of raw KV through the value-level entry points
(encode_values / Decoder.decode_values: float32 (mu, sigma) and storage patterns in).

    python examples/bench_kernels.py [--pages 1 4 16] [--tokens 16] [--dtype bf16 fp8_e4m3]
                                     [--models exact table]

Pages are Llama-3-8B-shaped ([2, 32, tokens, 8, 128]) with mu, sigma per scalar and values
drawn around them. On a CUDA device the Triton kernels are timed with
triton.testing.do_bench; without one the script says so and times the C++ CPU coder
(wall and CPU seconds: a shared machine's load shows as the gap) against the torch
reference in the same process (smallest batch only: it is slow). Every run checks the
round trip. Every 16-bit dtype runs under both entropy models (the table model the codec
uses for it, and the exact model as the baseline); fp8 has the exact model only. Defaults
are small so that CI can smoke-test the script.
"""

from __future__ import annotations

import argparse
import time

import torch

from sglang_speckv.kernels import entropy_model as em
from sglang_speckv.kernels import rans_reference as ref
from sglang_speckv.kernels import table_model as tm
from sglang_speckv.kernels.rans_reference import default_lanes


def make_batch(pages: int, tokens: int, dtype: str, device: str):
    g = torch.Generator().manual_seed(0)
    shape = (pages, 2 * 32 * tokens * 8 * 128)
    scale = 16.0 if dtype.startswith("fp8") else 1.0
    mu = torch.randn(shape, generator=g) * scale
    sigma = (torch.rand(shape, generator=g) * 0.5 + 0.05) * scale
    values = (mu + sigma * torch.randn(shape, generator=g)).to(em.TORCH_DTYPES[dtype])
    bits = values.view(torch.int16 if em.symbol_bits(dtype) == 16 else torch.uint8)
    return bits.to(device), mu.to(device), sigma.to(device)


def run(coder, bits, mu, sigma, dtype, model):
    """(encode, decode) closures of one coder over a batch, a round-trip check, and the
    number of coded words."""
    n = bits.shape[1]
    lanes = default_lanes(n)
    state = {}

    def encode():
        state["coded"] = coder.encode_values(bits, mu, sigma, dtype, lanes, model=model)

    def decode():
        words, lane_words = state["coded"]
        dec = coder.Decoder(words, lane_words, n, dtype, model=model)
        state["out"] = torch.empty_like(bits)
        dec.decode_values(mu, sigma, state["out"])
        state["ok"] = bool(dec.finish().all())

    def check():
        return state["ok"] and torch.equal(state["out"], bits)

    return encode, decode, check, lambda: state["coded"][0].numel()


def timed_cpu(fn, repeats: int = 2):
    """Best of ``repeats``: (wall seconds, CPU seconds of this process)."""
    best = (float("inf"), float("inf"))
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        best = min(best, (time.perf_counter() - w, time.process_time() - c))
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pages", type=int, nargs="+", default=[1, 4])
    p.add_argument("--tokens", type=int, default=4, help="tokens per page (Llama-3-8B: 128 KiB of bf16 per token)")
    p.add_argument("--dtype", nargs="+", default=["bf16", "fp8_e4m3"], choices=sorted(em.DTYPE_SPECS))
    p.add_argument("--models", nargs="+", default=list(tm.MODELS), choices=tm.MODELS, help="entropy models (table: 16-bit dtypes)")
    args = p.parse_args()
    gpu = torch.cuda.is_available()
    if gpu:
        import triton.testing

        from sglang_speckv.kernels import rans_triton as coder

        print(f"device: {torch.cuda.get_device_name()} (Triton kernels, triton.testing.do_bench)")
    else:
        from sglang_speckv.kernels import rans_cpu as coder

        print(f"device: CPU, {torch.get_num_threads()} threads -- no CUDA device here: timing the C++ coder "
              f"({'built' if coder.available() else 'NOT built: torch reference fallback'})")
    print("| dtype | model | pages | raw MB | coder | encode GB/s | decode GB/s | encode MB/cpu-s | decode MB/cpu-s | bits/scalar | round trip |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for dtype in args.dtype:
        models = [m for m in args.models if m == tm.MODEL_EXACT or em.symbol_bits(dtype) == 16]
        for pages in args.pages:
            batch = make_batch(pages, args.tokens, dtype, "cuda" if gpu else "cpu")
            raw_mb = batch[0].numel() * batch[0].element_size() / 1e6
            candidates = [("triton" if gpu else "C++", coder)]
            if not gpu and pages == min(args.pages):
                candidates.append(("torch reference", ref))
            for (name, impl), model in ((c, m) for c in candidates for m in models):
                encode, decode, check, words = run(impl, *batch, dtype, model)
                if gpu:
                    t_enc = triton.testing.do_bench(encode) / 1e3
                    t_dec = triton.testing.do_bench(decode) / 1e3
                    c_enc = c_dec = float("nan")
                else:
                    t_enc, c_enc = timed_cpu(encode)
                    t_dec, c_dec = timed_cpu(decode)
                bits = 32 * words() / batch[0].numel()
                print(
                    f"| {dtype} | {model} | {pages} | {raw_mb:.1f} | {name} | {raw_mb / t_enc / 1e3:.3f} | {raw_mb / t_dec / 1e3:.3f} "
                    f"| {raw_mb / c_enc:.1f} | {raw_mb / c_dec:.1f} | {bits:.3f} | {'OK' if check() else 'FAILED'} |"
                )


if __name__ == "__main__":
    main()
