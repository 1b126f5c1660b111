"""Codec benchmark on real KV: bits per scalar and speed of the torch (CPU) coder, next to
zstd and constriction on the same bytes, in the same run.

    speckv prepare-model
    speckv dump-kv --model ~/.cache/sglang-speckv/SmolLM2-135M-Instruct --text FILE... --out kv.safetensors
    python examples/bench_codec.py --dump kv.safetensors [--tokens 256] [--page-tokens 64]

For K and V separately, in bf16 and in fp8 e4m3 (per-layer absmax scale, derived from the
bf16 dump), the KV is cut into pages of ``--page-tokens`` tokens (as SGLang pages it) and
coded with the page-statistics predictor, all pages in one batch. A K (or V) page is coded
on its own as a [1, layers, tokens, 1, heads * head_dim] page (per-channel statistics are
the same as in the full [2, ...] page). Columns:

* bits/scalar, ratio: whole blobs (header, lane table, side info, streams) vs raw bytes;
* ideal: the sum of -log2 q of the same model (no side info, no lane overhead);
* enc/dec MB/s: raw bytes per second of encode_pages / decode_pages (torch reference on
  this CPU; the decode is verified bit-exact);
* zstd -3: ratio on the raw bytes, and on byte planes (high and low bytes apart; 16-bit);
* constriction: its ANS coder under the same (mu, sigma) mixture evaluated in float64 (a
  CustomModel over the keys; boundaries at value midpoints), on the first page only
  (Python callbacks per symbol make it slow: its speed is not constriction's native one).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time

import numpy as np
import torch
import zstandard
from tqdm import tqdm

from sglang_speckv import codec
from sglang_speckv.kernels import entropy_model as em
from sglang_speckv.predictors.base import PageMeta
from sglang_speckv.predictors.page_stats import PageStatsPredictor

FP8_MAX = 448.0  # largest finite e4m3fn value


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores visible, torch {torch.__version__} with {torch.get_num_threads()} threads"


def load_dump(path: str, tokens: int):
    from safetensors.torch import safe_open

    with safe_open(path, framework="pt") as f:
        k, v = f.get_tensor("k"), f.get_tensor("v")
        kv_dtype = (f.metadata() or {}).get("kv_dtype", "bf16")
    if k.dtype == torch.uint8:
        k, v = k.view(em.TORCH_DTYPES[kv_dtype]), v.view(em.TORCH_DTYPES[kv_dtype])
    return k[:, :, :tokens], v[:, :, :tokens]  # [layers, kv_heads, tokens, head_dim]


def to_fp8(x: torch.Tensor) -> torch.Tensor:
    """Per-layer absmax scale into e4m3 (as SGLang's fp8 KV with a per-layer scale)."""
    scale = x.float().abs().amax(dim=(1, 2, 3), keepdim=True).clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def pages_of(x: torch.Tensor, page_tokens: int) -> list[torch.Tensor]:
    """[layers, heads, tokens, dim] -> pages [1, layers, page_tokens, 1, heads * dim]."""
    layers, heads, tokens, dim = x.shape
    rows = x.permute(0, 2, 1, 3).reshape(layers, tokens, heads * dim)  # [L, T, H * D]
    return [
        rows[:, t : t + page_tokens].reshape(1, layers, -1, 1, heads * dim).contiguous()
        for t in range(0, tokens - page_tokens + 1, page_tokens)
    ]


def zstd_ratios(raw: bytes, item_size: int) -> tuple[float, float | None]:
    cctx = zstandard.ZstdCompressor(level=3)
    plain = len(raw) / len(cctx.compress(raw))
    if item_size == 1:
        return plain, None
    planes = np.frombuffer(raw, dtype=np.uint8).reshape(-1, item_size).T  # [bytes, scalars]
    split = len(raw) / sum(len(cctx.compress(p.tobytes())) for p in planes)
    return plain, split


def constriction_run(page: torch.Tensor, meta: PageMeta, predictor) -> tuple[float, float, float]:
    """(bits/scalar, encode MB/s, decode MB/s) of constriction's ANS under the float mixture."""
    import constriction
    from scipy.special import ndtr, ndtri

    dtype = meta.dtype
    b = em.symbol_bits(dtype)
    keys = em.keys_from_bits(em.storage_bits(page).reshape(-1), dtype).numpy().astype(np.int32)
    values = page.to(torch.float32)
    mu, sigma = predictor.predict(meta, predictor.side_info(values, meta), values, 0)
    mu_q, e, r = em.quantize_params(mu, sigma)  # the same regularised parameters as ours
    mu64 = (mu_q.double() * em.pow2_f64(e - em.F)).numpy()
    sigma64 = (r.double() * em.pow2_f64(e - em.R)).numpy()
    # value of every key, and the boundary below each key (midpoint to its predecessor)
    all_keys = torch.arange(1 << b)
    bits = em.bits_from_keys(all_keys, dtype)
    raw = (bits - ((bits >> 15) << 16)).to(torch.int16) if b == 16 else bits.to(torch.uint8)
    vals = raw.view(em.TORCH_DTYPES[dtype]).double()
    huge = torch.where(all_keys < (1 << (b - 1)), -1.0, 1.0).double() * 1e300  # NaNs sit at the ends
    vals = torch.where(torch.isfinite(vals), vals, huge).numpy()
    lower = np.concatenate([[-np.inf], (vals[1:] + vals[:-1]) / 2])
    w, spread = em.W_WIDE / em.W_TOTAL, float(2**em.KAPPA)

    def cdf(k, m, s):
        z = (lower[int(k)] - m) / s if k < (1 << b) else math.inf
        return (1 - w) * ndtr(z) + w * ndtr(z / spread)

    def ppf(q, m, s):
        return float(np.searchsorted(lower, m + s * ndtri(min(max(q, 1e-12), 1 - 1e-12)))) - 0.5

    model = constriction.stream.model.CustomModel(cdf, ppf, 0, (1 << b) - 1)
    start = time.perf_counter()
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(keys, model, mu64, sigma64)
    compressed = coder.get_compressed()
    encoded = time.perf_counter()
    decoded = constriction.stream.stack.AnsCoder(compressed).decode(model, mu64, sigma64)
    done = time.perf_counter()
    assert np.array_equal(decoded, keys), "constriction round trip failed"
    raw_mb = page.numel() * page.element_size() / 1e6
    return 32 * len(compressed) / keys.size, raw_mb / (encoded - start), raw_mb / (done - encoded)


def bench_row(name: str, x: torch.Tensor, dtype: str, args) -> dict:
    predictor = PageStatsPredictor()
    pages = pages_of(x, args.page_tokens)
    metas = [PageMeta(dtype, tuple(p.shape), position=i * args.page_tokens) for i, p in enumerate(pages)]
    raw_bytes = sum(p.numel() * p.element_size() for p in pages)
    scalars = sum(p.numel() for p in pages)

    start = time.perf_counter()
    blobs = codec.encode_pages(pages, metas, predictor, num_lanes=args.lanes or None)
    encoded = time.perf_counter()
    out, errors = codec.decode_pages(blobs, predictor, metas=metas)
    decoded = time.perf_counter()
    assert errors == [None] * len(pages) and all(
        torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(pages, out)
    ), "round trip failed"

    ideal = 0.0
    for page, meta in zip(pages, metas):
        values = page.to(torch.float32)
        mu, sigma = predictor.predict(meta, predictor.side_info(values, meta), values, 0)
        keys = em.keys_from_bits(em.storage_bits(page).reshape(-1), dtype)
        ideal += em.ideal_bits(keys, mu, sigma, dtype)
    raw = b"".join(p.view(torch.uint8).numpy().tobytes() for p in pages)
    zstd_plain, zstd_split = zstd_ratios(raw, pages[0].element_size())
    c_bits, c_enc, c_dec = constriction_run(pages[0], metas[0], predictor)
    coded = sum(map(len, blobs))
    return {
        "row": f"{name} {dtype}",
        "bits": 8 * coded / scalars,
        "ideal": ideal / scalars,
        "ratio": raw_bytes / coded,
        "enc": raw_bytes / (encoded - start) / 1e6,
        "dec": raw_bytes / (decoded - encoded) / 1e6,
        "zstd": zstd_plain,
        "zstd_split": zstd_split,
        "c_bits": c_bits,
        "c_enc": c_enc,
        "c_dec": c_dec,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dump", required=True, help="KV dump from `speckv dump-kv` (bf16 or fp8)")
    parser.add_argument("--tokens", type=int, default=256, help="tokens of the dump to use (default %(default)s)")
    parser.add_argument("--page-tokens", type=int, default=64, help="tokens per page (default %(default)s)")
    parser.add_argument(
        "--lanes",
        type=int,
        default=256,
        help="lanes per page (default %(default)s: the torch decoder's speed grows with lanes; "
        "0 = codec.default_lanes, what a GPU would use)",
    )
    args = parser.parse_args()
    k, v = load_dump(args.dump, args.tokens)
    if k.shape[2] < args.page_tokens:
        raise SystemExit(f"{args.dump} has {k.shape[2]} tokens, fewer than one page of {args.page_tokens}")
    if k.dtype == torch.bfloat16:
        variants = [("bf16", k, v), ("fp8_e4m3", to_fp8(k), to_fp8(v))]
    elif k.dtype == torch.float8_e4m3fn:
        variants = [("fp8_e4m3", k, v)]
    else:
        raise SystemExit(f"{args.dump}: expected a bf16 or fp8 e4m3 dump, got {k.dtype}")

    layers, heads, tokens, dim = k.shape
    print(f"machine: {machine()}")
    print(
        f"KV: {args.dump}, {layers} layers x {heads} kv heads x {dim} dims, {tokens} tokens in pages of "
        f"{args.page_tokens}; predictor page_stats; lanes per page: {args.lanes or 'default'}"
    )
    jobs = [(name, x, dtype) for dtype, kk, vv in variants for name, x in (("K", kk), ("V", vv))]
    rows = [bench_row(name, x, dtype, args) for name, x, dtype in tqdm(jobs, desc="rows")]
    header = (
        "| | bits/scalar | ideal | ratio | enc MB/s | dec MB/s | zstd -3 | zstd -3 planes "
        "| constriction bits | constriction enc/dec MB/s |"
    )
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for r in rows:
        split = f"{r['zstd_split']:.3f}x" if r["zstd_split"] else "-"
        print(
            f"| {r['row']} | {r['bits']:.3f} | {r['ideal']:.3f} | {r['ratio']:.3f}x | {r['enc']:.2f} | "
            f"{r['dec']:.2f} | {r['zstd']:.3f}x | {split} | {r['c_bits']:.3f} | {r['c_enc']:.2f}/{r['c_dec']:.2f} |"
        )


if __name__ == "__main__":
    main()
