"""Restore vs recompute: is an L3 hit cheaper than the prefill it saves?

    python examples/bench_restore.py [--tokens N] [--layers L] [--hidden H] [--page-tokens 64] [--kv-dtype fp8_e4m3]

A Llama-shaped model built from its config with random bf16 weights (no download): the
default on a GPU is Llama-3-8B (32 layers, hidden 4096, 8 KV heads of 128, 16,384 tokens);
on a CPU a small shape with the same KV head layout (4 layers, hidden 1024, 512 tokens),
so that CI can smoke-test it. It prints, for the same KV volume:

- prefill: the model's forward pass over N tokens (best of 2);
- start-up warm-up: codec.warm_up on one page per predictor, as a server's PageCoder does
  at start-up (the coder's kernels compiled or loaded, each predictor's tables and device
  parameters built);
- restore: decoding that prefix's pages from coded host bytes into device pages with
  sglang_speckv.codec.decode_pages, once per predictor: page_stats, and the calibrated
  `static` predictor fitted on two other random-token prefills; the first restore after
  the warm-up, and the best of 2 after it;
- raw copy: the raw page bytes from a (pinned, on CUDA) host buffer to the device.

Columns: seconds, restore / prefill, GB/s of raw KV, peak scratch (CUDA: peak allocated
during the restore beyond the output pages; CPU: only growth of the process's peak RSS
shows, the model's build usually set it higher: docs/BENCHMARKS.md has the CLI's CPU
memory figures), bits per scalar.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from sglang_speckv import codec
from sglang_speckv.predictors.base import PageMeta
from sglang_speckv.predictors.linear import LinearGaussianPredictor
from sglang_speckv.predictors.page_stats import PageStatsPredictor

KV_DTYPES = {"bf16": torch.bfloat16, "fp8_e4m3": torch.float8_e4m3fn}


def build_model(layers: int, hidden: int, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=hidden, intermediate_size=int(hidden * 3.5), num_hidden_layers=layers,
        num_attention_heads=hidden // 128, num_key_value_heads=8, head_dim=128, vocab_size=32000,
        max_position_embeddings=131072, rope_theta=500000.0, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(torch.bfloat16).to(device).eval()


def prefill_kv(model, tokens: int, seed: int):
    """(seconds, k, v [L, H, T, D]) of one prefill of random token ids."""
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=g).to(model.device)
    cache = DynamicCache(config=model.config)
    sync(model.device)
    t = time.perf_counter()
    with torch.inference_mode():
        model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    sync(model.device)
    seconds = time.perf_counter() - t
    k = torch.stack([layer.keys[0] for layer in cache.layers])
    v = torch.stack([layer.values[0] for layer in cache.layers])
    return seconds, k, v


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def best_of(fn, repeats: int = 2) -> float:
    best = float("inf")
    for _ in range(repeats):
        best = min(best, fn())
    return best


def main() -> None:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16384 if gpu else 512)
    p.add_argument("--layers", type=int, default=32 if gpu else 4)
    p.add_argument("--hidden", type=int, default=4096 if gpu else 1024)
    p.add_argument("--page-tokens", type=int, default=64)
    p.add_argument("--no-calibrated", action="store_true", help="page_stats only (skips two calibration prefills)")
    p.add_argument("--kv-dtype", default="bf16", choices=list(KV_DTYPES),
                   help="stored KV: bf16, or fp8_e4m3 (the bf16 KV cast, scale 1, as SGLang's fp8 cache stores it)")
    args = p.parse_args()
    kv_dtype, torch_kv = args.kv_dtype, KV_DTYPES[args.kv_dtype]
    device = "cuda" if gpu else "cpu"
    model = build_model(args.layers, args.hidden, device)
    name = torch.cuda.get_device_name() if gpu else f"CPU ({torch.get_num_threads()} threads; no GPU here)"
    print(f"device: {name}; Llama-shaped: {args.layers} layers, hidden {args.hidden}, 8 KV heads x 128, "
          f"{args.tokens} tokens, KV stored as {kv_dtype}")

    prefill_kv(model, min(args.tokens, 64), seed=9)  # warm-up
    runs = [prefill_kv(model, args.tokens, seed=1) for _ in range(2)]
    t_prefill = min(r[0] for r in runs)
    _, k, v = runs[0]
    pt = args.page_tokens
    pages = [torch.stack([k[:, :, s : s + pt], v[:, :, s : s + pt]]).permute(0, 1, 3, 2, 4).to(torch_kv).contiguous().cpu()
             for s in range(0, args.tokens - pt + 1, pt)]  # fmt: skip
    metas = [PageMeta(kv_dtype, tuple(page.shape), i * pt) for i, page in enumerate(pages)]
    raw_bytes = sum(page.numel() * page.element_size() for page in pages)
    scalar_bits = 8 * pages[0].element_size()

    predictors = [PageStatsPredictor()]
    if not args.no_calibrated:
        from sglang_speckv.tools import calibrate as cal
        from sglang_speckv.tools.dump_kv import kv_layout

        seqs = [cal.to_pages(*(t.cpu() for t in prefill_kv(model, min(args.tokens, 512), seed=s)[1:])).to(torch_kv)
                for s in (2, 3)]  # fmt: skip
        calib = cal.calibrate(seqs, model="random", layout=kv_layout(model), kv_dtype=kv_dtype, names=("static",), progress=False)
        predictors.append(LinearGaussianPredictor(calib, "static"))

    # What a server does at start-up (PageCoder.open): one page per predictor, page_stats first.
    sync(device)
    t = time.perf_counter()
    for pred in predictors:
        codec.warm_up(kv_dtype, pages[0].shape, device, pred)
    sync(device)
    t_warm_up = time.perf_counter() - t

    print("| what | seconds | / prefill | GB/s raw KV | peak scratch | bits/scalar |")
    print("|---|---|---|---|---|---|")
    print(f"| prefill {args.tokens} tokens (best of 2) | {t_prefill:.3f} | 1.00 | - | - | {scalar_bits} |")
    print(f"| start-up warm-up (codec.warm_up: one page per predictor; compiles the coder) | {t_warm_up:.3f} "
          "| - | - | - | - |")
    out = [torch.empty(page.shape, dtype=page.dtype, device=device) for page in pages]
    for pred in predictors:
        blobs = codec.encode_pages(pages, metas, pred, w_wide=pred.w_wide, kappa=pred.kappa)
        bits = 8 * sum(len(b) for b in blobs) / sum(page.numel() for page in pages)

        def restore() -> float:
            sync(device)
            t = time.perf_counter()
            _, errors = codec.decode_pages(blobs, pred, metas=metas, out=out, device=device)
            sync(device)
            assert not any(errors), errors
            return time.perf_counter() - t

        if gpu:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        t_first = restore()  # the first restore after start-up (issue #10: within 2x a warm one)
        t_restore = best_of(restore)
        if gpu:
            scratch = torch.cuda.max_memory_allocated() - base
            peak = f"{scratch / 1e6:.0f} MB ({scratch / raw_bytes:.1f}x)"
        else:  # the model's build already set the peak RSS: only growth beyond it shows
            scratch = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
            peak = f"<= {scratch / 1e6:.0f} MB above the process peak" if scratch > 0 else "below the process peak"
        assert all(torch.equal(o.cpu().view(torch.uint8), p.view(torch.uint8)) for o, p in zip(out, pages))
        print(
            f"| first restore after start-up, {pred.name} | {t_first:.3f} | {t_first / t_prefill:.2f} "
            f"| {raw_bytes / t_first / 1e9:.3f} | ({t_first / t_restore:.2f}x the warm restore) | {bits:.2f} |"
        )
        print(
            f"| restore, {pred.name} | {t_restore:.3f} | {t_restore / t_prefill:.2f} | {raw_bytes / t_restore / 1e9:.3f} "
            f"| {peak} | {bits:.2f} |"
        )
    host = [page.pin_memory() if gpu else page.clone() for page in pages]

    def copy() -> float:
        sync(device)
        t = time.perf_counter()
        for o, h in zip(out, host):
            o.copy_(h, non_blocking=True)
        sync(device)
        return time.perf_counter() - t

    t_copy = best_of(copy)
    print(f"| raw copy host -> {device} | {t_copy:.4f} | {t_copy / t_prefill:.3f} | {raw_bytes / t_copy / 1e9:.2f} | 0 | {scalar_bits} |")
    print(f"{len(pages)} pages of {pt} tokens, {raw_bytes / 1e6:.1f} MB raw")


if __name__ == "__main__":
    main()
