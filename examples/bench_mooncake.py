"""Benchmark: coded pages on Mooncake Store (the speckv "mooncake" tier) against raw pages
the way SGLang's own ``mooncake_store`` backend stores them, on one local cluster, in one run.

    speckv prepare-model
    speckv dump-kv --model ~/.cache/sglang-speckv/SmolLM2-135M-Instruct \
        --text tests/data/text/heldout.txt --out kv.safetensors --max-tokens 1024
    python examples/bench_mooncake.py --dump kv.safetensors [--page-tokens 64] [--batch 8]

The cluster is real and local (sglang_speckv/testing.py MooncakeCluster): mooncake_master
and a mooncake_client daemon lending --segment of memory, over loopback TCP; this process
is one more client. Pages are SGLang layer_first pages [2, layers, tokens, kv_heads, dim]
of the real SmolLM2 KV in the dump, bf16. Rows:

- speckv coded: ``TieredStore`` with one tier of kind "mooncake": ``put`` / ``get`` of the
  page-stats coded blobs, batches of --batch pages (each value checksummed on write and
  verified on read, as in the product). Coding itself is not timed here (see
  examples/bench_codec.py); the MB/s columns count raw page bytes moved per second, so the
  rows compare like with like: how fast pages go in and out.
- sglang raw: what SGLang's mooncake_store backend does for an MHA layer_first page with
  its zero-copy path: two objects per page, ``{key}_{rank}_k`` and ``{key}_{rank}_v``,
  written from and read into a registered host buffer (``register_buffer``,
  ``batch_put_from``, ``batch_get_into``), same batches.

Timed rounds alternate the rows; the best of --rounds counts. Between rounds every object is
removed. "pages / GiB": 2^30 over the cluster memory one page takes, measured from the
master's allocated bytes after a round's writes (what Mooncake's allocator really spent,
headers and rounding included).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import torch

from sglang_speckv import codec
from sglang_speckv.config import load_config
from sglang_speckv.predictors.base import PageMeta
from sglang_speckv.predictors.page_stats import PageStatsPredictor
from sglang_speckv.storage import TieredStore, chain_parents, namespace
from sglang_speckv.testing import MooncakeCluster

MB = 1e6


def load_pages(path: str, page_tokens: int) -> list[torch.Tensor]:
    """The dump's KV as layer_first pages [2, layers, page_tokens, kv_heads, head_dim]."""
    from safetensors.torch import safe_open

    with safe_open(path, framework="pt") as f:
        k, v = f.get_tensor("k"), f.get_tensor("v")  # [layers, kv_heads, tokens, head_dim]
    if k.dtype != torch.bfloat16:
        raise SystemExit(f"{path}: expected a bf16 dump, got {k.dtype}")
    kv = torch.stack([k, v]).permute(0, 1, 3, 2, 4)  # [2, layers, tokens, kv_heads, head_dim]
    tokens = kv.shape[2]
    return [kv[:, :, t:t + page_tokens].contiguous() for t in range(0, tokens - page_tokens + 1, page_tokens)]


def best(rounds: list[float]) -> float:
    return min(rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dump", required=True, help="bf16 KV dump from `speckv dump-kv`")
    parser.add_argument("--page-tokens", type=int, default=64, help="tokens per page (default %(default)s)")
    parser.add_argument("--batch", type=int, default=8, help="pages per put/get call (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds, best counts (default %(default)s)")
    parser.add_argument("--segment", default="1GiB", help="cluster memory (default %(default)s)")
    args = parser.parse_args()

    pages = load_pages(args.dump, args.page_tokens)
    n = len(pages)
    raw_bytes = pages[0].numel() * pages[0].element_size()
    shape = tuple(pages[0].shape)
    metas = [PageMeta("bf16", shape, position=i * args.page_tokens) for i in range(n)]
    blobs = codec.encode_pages(pages, metas, PageStatsPredictor())
    coded_bytes = sum(len(b) for b in blobs)
    keys = [f"{i:064x}" for i in range(n)]
    batches = [range(s, min(s + args.batch, n)) for s in range(0, n, args.batch)]
    ns = namespace("SmolLM2-135M-Instruct", kv_dtype="bf16", layout="layer_first",
                   page_size=args.page_tokens, format_version=1)

    with tempfile.TemporaryDirectory() as logs, MooncakeCluster(logs, segment=args.segment) as cluster:
        store = TieredStore(load_config(overrides={"tiers": [cluster.tier_config(
            local_buffer_size="256MiB")]}), ns)
        client = store.remote._client  # the same client serves the raw rows: one process
        flat = torch.stack(pages).view(torch.uint8).reshape(n, raw_bytes)  # [pages, bytes]
        readback = torch.zeros_like(flat)
        for buffer in (flat, readback):
            assert client.register_buffer(buffer.data_ptr(), buffer.numel()) == 0
        half = raw_bytes // 2  # K then V: layer_first pages split at the kv axis
        raw_keys = [[f"{k}_0_k", f"{k}_0_v"] for k in keys]

        def allocated() -> int:
            return (cluster.metrics() or {}).get("cluster_bytes", 0)

        def coded_put() -> None:
            for b in batches:
                assert all(store.put([keys[i] for i in b], [blobs[i] for i in b],
                                     raw_sizes=[raw_bytes] * len(b),
                                     parents=chain_parents([keys[i] for i in b])))

        def coded_get() -> None:
            for b in batches:
                got = store.get([keys[i] for i in b])
                assert all(g is not None for g in got)

        def raw_put() -> None:
            for b in batches:
                ks = [k for i in b for k in raw_keys[i]]
                ptrs = [flat[i].data_ptr() + off for i in b for off in (0, half)]
                assert all(rc == 0 for rc in client.batch_put_from(ks, ptrs, [half] * len(ks)))

        def raw_get() -> None:
            for b in batches:
                ks = [k for i in b for k in raw_keys[i]]
                ptrs = [readback[i].data_ptr() + off for i in b for off in (0, half)]
                assert all(rc == half for rc in client.batch_get_into(ks, ptrs, [half] * len(ks)))

        rows = {"speckv coded": (coded_put, coded_get), "sglang raw": (raw_put, raw_get)}
        times = {name: {"put": [], "get": [], "alloc": 0} for name in rows}
        for _ in range(args.rounds):
            for name, (put, get) in rows.items():
                client.remove_all(True)
                base = allocated()
                t0 = time.perf_counter()
                put()
                t1 = time.perf_counter()
                get()
                t2 = time.perf_counter()
                times[name]["put"].append(t1 - t0)
                times[name]["get"].append(t2 - t1)
                times[name]["alloc"] = allocated() - base
        assert torch.equal(readback, flat), "raw pages did not come back byte-exact"
        client.remove_all(True)
        coded_put()
        assert [bytes(v) for v in store.get(keys)] == blobs, "coded pages did not come back byte-exact"
        store.close()

    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}; "
          f"cluster: local mooncake_master + mooncake_client ({args.segment}), TCP loopback")
    print(f"pages: {n} x {shape} bf16 SmolLM2-135M KV ({raw_bytes / MB:.3f} MB raw), "
          f"coded {coded_bytes / n / MB:.3f} MB/page on average (ratio {n * raw_bytes / coded_bytes:.3f}, "
          f"page-stats predictor; coding not timed); "
          f"batches of {args.batch}, best of {args.rounds} rounds\n")
    print("| row | objects/page | put pages/s | put raw MB/s | get pages/s | get raw MB/s | cluster bytes/page | pages / GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for name in rows:
        put_s, get_s, alloc = best(times[name]["put"]), best(times[name]["get"]), times[name]["alloc"]
        per_page = alloc / n
        print(f"| {name} | {1 if name.startswith('speckv') else 2} | {n / put_s:.0f} | "
              f"{n * raw_bytes / put_s / MB:.0f} | {n / get_s:.0f} | {n * raw_bytes / get_s / MB:.0f} | "
              f"{per_page:.0f} | {2**30 / per_page:.0f} |")


if __name__ == "__main__":
    main()
