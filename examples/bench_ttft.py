"""Benchmark: time to first token for a long prefix restored from speckv, recomputed, or
restored from SGLang's own file backend, and the bytes each L3 tier stores.

For each mode a real SGLang server is started (``speckv serve``: the GPU when there is one,
else SGLang's CPU engine) with SmolLM2-135M-Instruct, and:
1. a prompt of --prefix-tokens token ids (seeded, fixed) plus a short suffix is sent: the
   cold run, a full prefill; its pages are written to L3 (modes speckv, file);
2. once the L3 writes settle, ``/flush_cache`` drops the device and host caches;
3. the same prefix with another suffix is sent: its TTFT is the figure. ``none`` (no L3)
   recomputes the prefix: the baseline, measured on the same machine in the same run.

TTFT is the latency of a request for one new token (prefill plus one step). Bytes stored:
speckv's tier occupancy (coded pages plus record headers, from its stats file); the file
backend's files. Runs modes one after another (one server at a time).

    .venv/bin/python examples/bench_ttft.py                         # CPU: 1024-token prefix
    .venv/bin/python examples/bench_ttft.py --prefix-tokens 16384   # GPU (docs/BENCHMARKS.md)
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import tempfile
import time
from pathlib import Path

import torch

from sglang_speckv.sglang.serve import CPU_PAGE_SIZE, GPU_PAGE_SIZE
from sglang_speckv.testing import SGLangServer

SUFFIX_TOKENS = 8
# Token ids drawn from SmolLM2's vocabulary (49152), away from the special tokens at its start.
VOCAB = (1000, 49000)
SETTLE_S = 3.0  # no new L3 bytes for this long = writes done
SETTLE_TIMEOUT_S = 1800.0


def stored(mode: str, root: Path) -> tuple[int, int]:
    """(pages, bytes) the L3 tier of ``mode`` holds now."""
    if mode == "speckv":
        try:
            tiers = json.loads((root / "stats.json").read_text())["store"]["tiers"]
        except (OSError, json.JSONDecodeError, KeyError):
            return 0, 0
        return sum(t["pages"] for t in tiers), sum(t["bytes"] for t in tiers)
    files = [f for f in (root / "files").glob("**/*") if f.is_file()]
    return len(files), sum(f.stat().st_size for f in files)


def wait_stored(mode: str, root: Path, pages: int) -> int:
    """Wait until at least ``pages`` pages are stored and nothing changed for SETTLE_S;
    returns the bytes stored."""
    last, since, start = None, time.monotonic(), time.monotonic()
    while time.monotonic() - start < SETTLE_TIMEOUT_S:
        now = stored(mode, root)
        if now != last:
            last, since = now, time.monotonic()
        elif now[0] >= pages and time.monotonic() - since >= SETTLE_S:
            return now[1]
        time.sleep(0.5)
    raise RuntimeError(f"{mode}: {last} pages/bytes stored after {SETTLE_TIMEOUT_S:.0f} s, expected {pages} pages")


def run_mode(mode: str, prefix: list[int], suffixes: list[list[int]], root: Path, threshold: int) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    args = ["--hicache-storage", mode]
    env = {}
    if mode == "speckv":
        (root / "tiers.toml").write_text(
            f'stats_file = "{root / "stats.json"}"\n[[tiers]]\nname = "ram"\npath = "{root / "ram"}"\n'
            'capacity = "8GiB"\nsync = "none"\n')
        args += ["--speckv-config", str(root / "tiers.toml")]
    if mode == "file":
        env["SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR"] = str(root / "files")
    if mode != "none":
        args += ["--hicache-storage-backend-extra-config", json.dumps({"prefetch_threshold": threshold})]
    with SGLangServer(args, log_path=root / "server.log", env=env) as server:
        t = time.perf_counter()
        cold = server.generate(prefix + suffixes[0], max_new_tokens=1)
        cold_s = time.perf_counter() - t
        page = GPU_PAGE_SIZE if torch.cuda.is_available() else CPU_PAGE_SIZE
        stored_bytes = wait_stored(mode, root, len(prefix) // page) if mode != "none" else 0
        server.flush_cache()
        t = time.perf_counter()
        warm = server.generate(prefix + suffixes[1], max_new_tokens=1)
        warm_s = time.perf_counter() - t
    return {"mode": mode, "cold_s": cold_s, "warm_s": warm_s, "storage_tokens": warm["cached"].get("storage", 0),
            "prompt_tokens": warm["prompt_tokens"], "stored_bytes": stored_bytes, "first_token": warm["tokens"],
            "cold_first_token": cold["tokens"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prefix-tokens", type=int, default=16384 if torch.cuda.is_available() else 1024)
    parser.add_argument("--modes", default="none,speckv,file", help="comma-separated: none, speckv, file")
    parser.add_argument("--workdir", default=None, help="where stores and logs go (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    prefix = [rng.randrange(*VOCAB) for _ in range(args.prefix_tokens)]
    suffixes = [[rng.randrange(*VOCAB) for _ in range(SUFFIX_TOKENS)] for _ in range(2)]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="speckv-bench-ttft-"))
    # Any hit of at least one page is worth restoring here (SGLang's default needs 256 tokens).
    threshold = 1
    results = [run_mode(m, prefix, suffixes, work / m, threshold) for m in args.modes.split(",")]

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})"
    print(f"\nTTFT, {args.prefix_tokens}-token prefix, SmolLM2-135M-Instruct, {device}; work dir {work}\n")
    print("| L3 | prefix tokens from L3 | TTFT cold (s) | TTFT after /flush_cache (s) | bytes stored | bytes / restored token |")
    print("|---|---|---|---|---|---|")
    for r in results:
        per_token = r["stored_bytes"] / r["storage_tokens"] if r["storage_tokens"] else float("nan")
        print(f"| {r['mode']} | {r['storage_tokens']} | {r['cold_s']:.2f} | {r['warm_s']:.2f} | "
              f"{r['stored_bytes']:,} | {per_token:,.0f} |")
    firsts = {tuple(r["first_token"]) for r in results}
    print(f"\nsame first token in every mode: {len(firsts) == 1}")


if __name__ == "__main__":
    main()
