"""speckv as the HiCache L3 tier of a real SGLang server (CPU engine, SmolLM2-135M-Instruct).

One scenario, in order, on one store (three server starts: each costs ~30-70 s on CI):

server A (``--hicache-storage-backend speckv``, through our plugin), fresh store
  1. a prompt of >= 4 pages, ``/flush_cache``, the same prompt: storage hits cover its
     full pages, greedy tokens and logprobs equal those of an uncached run; then with its
     first pages in the device cache and the rest restored from L3;
  2. four long prompts at once, and SIGKILL of the whole server once the first of their
     page batches has been stored (the others are being coded or committed);
server B (same store)
  3. hits survive the restart;
  4. the killed writes left the store consistent: the long prompts are served correctly,
     and once stored again, restored from L3 exactly;
  5. every stored record corrupted on disk: outputs still equal the uncached run (misses,
     recompute), the server stays up, the store counts the corruption;
server C (SGLang's ``dynamic`` backend route, generic flat-page path), its own store
  6. the same hit-and-equal check.

"An uncached run" is the same request with a fresh ``cache_salt``: SGLang namespaces every
cache tier by it, so that run has no hit anywhere (asserted), and is computed from scratch.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path

import lmdb
import pytest
import torch

from sglang_speckv.sglang.stats import STATS_FILE_INTERVAL_S
from sglang_speckv.sglang.serve import CPU_PAGE_SIZE
from sglang_speckv.testing import ServerError

pytestmark = pytest.mark.server

PAGE = CPU_PAGE_SIZE
# L3 prefetches only hits of at least this many tokens (SGLang's default, 256, would need
# long prompts; the CPU coder takes ~1 s per SmolLM2 page here).
PREFETCH_THRESHOLD = 2 * PAGE
# Prompts: P1 ~6 pages; four different ~20-page prompts, whose writes (one batch each, one
# after another) take long enough to kill the server between two of them.
P1 = " ".join(f"Item {i} costs {3 * i} dollars." for i in range(12))
P2 = " ".join(f"Row {i}: the value of x{i} is {i * i % 97}." for i in range(40))
LONG_PROMPTS = [f"Table {k}. " + P2 for k in range(4)]
NEW_TOKENS = 8
SETTLE_S = 3.0  # the stats file is rewritten at most once a second: 3 s without change = idle
WAIT_S = 300.0


def _tiers_toml(root: Path) -> Path:
    path = root / "tiers.toml"
    path.write_text(
        f'stats_file = "{root / "stats.json"}"\n'
        f'[[tiers]]\nname = "ram"\npath = "{root / "ram"}"\ncapacity = "512MiB"\nsync = "none"\n'
    )
    return path


def _stats(root: Path) -> dict:
    try:
        return json.loads((root / "stats.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _wait_written(root: Path, at_least: int) -> dict:
    """Wait until the backend has written at least ``at_least`` pages (new or already
    stored) and then nothing for SETTLE_S seconds; returns the stats."""
    deadline = time.monotonic() + WAIT_S
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        stats = _stats(root)
        seen = stats.get("pages_written", 0) + stats.get("pages_already_stored", 0)
        if seen != last:
            last, since = seen, time.monotonic()
        elif seen >= at_least and time.monotonic() - since >= SETTLE_S:
            return stats
        time.sleep(0.5)
    raise AssertionError(f"backend wrote {last} pages in {WAIT_S:.0f} s, expected at least {at_least}: {stats}")


def _full_pages(prompt_tokens: int) -> int:
    """Pages SGLang can restore for a prompt: full pages of all but its last token."""
    return (prompt_tokens - 1) // PAGE


def _uncached(server, prompt: str) -> dict:
    out = server.generate(prompt, NEW_TOKENS, salt=uuid.uuid4().hex)
    assert not any(out["cached"].get(tier, 0) for tier in ("device", "host", "storage")), out["cached"]
    return out


def _assert_same(out: dict, reference: dict) -> None:
    assert out["tokens"] == reference["tokens"], (out["text"], reference["text"])
    assert out["logprobs"] == reference["logprobs"]


def _speckv_args(root: Path) -> list[str]:
    return ["--hicache-storage", "speckv", "--speckv-config", str(_tiers_toml(root)),
            "--hicache-storage-backend-extra-config", json.dumps({"prefetch_threshold": PREFETCH_THRESHOLD})]


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    """State shared by the ordered tests below."""
    return {"root": tmp_path_factory.mktemp("speckv-e2e")}


def test_hits_after_flush_equal_uncached_run(scenario, sglang_server):
    root = scenario["root"]
    server = scenario["a"] = sglang_server(_speckv_args(root), name="a")
    reference = scenario["p1"] = _uncached(server, P1)
    pages = _full_pages(reference["prompt_tokens"])
    assert pages >= 4
    first = server.generate(P1, NEW_TOKENS)
    _assert_same(first, reference)
    written = _wait_written(root, at_least=2 * pages)  # the salted run's pages and these
    server.flush_cache()
    again = server.generate(P1, NEW_TOKENS)
    assert again["cached"].get("storage") == pages * PAGE, again["cached"]
    _assert_same(again, reference)
    time.sleep(STATS_FILE_INTERVAL_S + 0.5)  # the stats file trails the counters by up to this
    stats = _stats(root)
    # One prefetch, one batch_exists: SGLang asks for each page once (docs/DESIGN.md).
    assert stats["exists_queried"] - written["exists_queried"] == pages
    assert stats["pages_read"] >= pages and stats["verify_failures"] == 0
    assert stats["pages_with_tokens"] >= pages  # the token side channel reached the backend
    assert stats["compression_ratio"] > 1.0


def test_partial_device_hit_then_storage(scenario, model_dir):
    """The first pages in the device cache, the rest restored from L3 (SGLang then passes
    prefix keys that omit the device-matched node's own pages)."""
    from transformers import AutoTokenizer

    root, server = scenario["root"], scenario["a"]
    ids = AutoTokenizer.from_pretrained(model_dir)(P1)["input_ids"]
    reference = _uncached(server, ids)
    server.generate(ids, NEW_TOKENS)
    _wait_written(root, at_least=0)
    server.flush_cache()
    head = 3 * PAGE
    server.generate(ids[:head + 1], 1)  # puts the first 3 pages back into the device cache
    out = server.generate(ids, NEW_TOKENS)
    cached = out["cached"]
    assert cached.get("device", 0) + cached.get("host", 0) == head, cached
    assert cached.get("storage") == _full_pages(len(ids)) * PAGE - head, cached
    _assert_same(out, reference)


def _stored_pages(root: Path) -> int:
    """Pages in the store's first tier, counted straight from LMDB (any process)."""
    env = lmdb.open(str(root / "ram"), max_dbs=16, subdir=True, readonly=True, lock=False, map_size=1 << 34)
    try:
        with env.begin() as txn:
            return txn.stat(env.open_db(b"pages", txn=txn, create=False))["entries"]
    finally:
        env.close()


def test_sigkill_during_writes(scenario):
    """Several long prompts at once: SGLang backs their pages up one batch after another
    (one backup thread). SIGKILL the server as soon as the first batch has landed."""
    root, server = scenario["root"], scenario["a"]
    scenario["long"] = [(p, _uncached(server, p)) for p in LONG_PROMPTS]
    before = _wait_written(root, at_least=0)
    written = before["pages_written"] + before["pages_already_stored"]
    expected = sum(_full_pages(ref["prompt_tokens"]) for _, ref in scenario["long"])
    def send(prompt: str) -> None:
        try:
            server.generate(prompt, NEW_TOKENS)
        except ServerError:  # the kill below may cut the request: expected
            pass

    for prompt, _ in scenario["long"]:
        threading.Thread(target=send, args=(prompt,), daemon=True).start()
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        now = _stats(root)
        if now["pages_written"] + now["pages_already_stored"] > written:
            break
        time.sleep(0.1)
    server.kill()
    assert not server.healthy()
    stored_new = _stored_pages(root) - before["store"]["tiers"][0]["pages"]
    assert 0 < stored_new < expected, f"{stored_new} of {expected} new pages stored at the kill: not mid-write"


def test_hits_survive_restart(scenario, sglang_server):
    root = scenario["root"]
    server = scenario["b"] = sglang_server(_speckv_args(root), name="b")
    reference = scenario["p1"]
    out = server.generate(P1, NEW_TOKENS)
    assert out["cached"].get("storage") == _full_pages(reference["prompt_tokens"]) * PAGE, out["cached"]
    _assert_same(out, reference)


def test_store_is_consistent_after_the_kill(scenario):
    """What survived the kill reads back, and every read of it gives the same output.

    The long prompts' pages were written from one batched prefill of all four prompts
    (sent at once to have writes in flight at the kill); SGLang's CPU prefill rounds a
    batch of four differently from one prompt alone, so those stored pages are not the
    bits of the sequential uncached reference: greedy tokens must still agree, logprobs
    only closely. Exactness is then checked against the first restore itself."""
    root, server = scenario["root"], scenario["b"]
    first = []
    for prompt, reference in scenario["long"]:
        out = server.generate(prompt, NEW_TOKENS)  # whatever survived, it is right
        assert out["tokens"] == reference["tokens"], (out["text"], reference["text"])
        assert max(abs(a - b) for a, b in zip(out["logprobs"], reference["logprobs"])) < 0.05
        first.append(out)
    _wait_written(root, at_least=1)
    server.flush_cache()
    for (prompt, reference), before in zip(scenario["long"], first):
        out = server.generate(prompt, NEW_TOKENS)
        assert out["cached"].get("storage") == _full_pages(reference["prompt_tokens"]) * PAGE, out["cached"]
        if before["cached"].get("storage") == out["cached"]["storage"]:
            _assert_same(out, before)  # the same stored pages, the same computation


def test_corrupt_store_gives_misses_not_wrong_outputs(scenario):
    root, server, reference = scenario["root"], scenario["b"], scenario["p1"]
    _wait_written(root, at_least=0)
    corrupted = 0
    env = lmdb.open(str(root / "ram"), max_dbs=16, subdir=True, map_size=1 << 34)  # address space, not disk
    try:
        with env.begin(write=True) as txn:
            db = env.open_db(b"pages", txn=txn)
            for key, value in list(txn.cursor(db)):
                bad = bytearray(value)
                bad[len(bad) // 2] ^= 0x10
                txn.put(key, bytes(bad), db=db)
                corrupted += 1
    finally:
        env.close()
    assert corrupted > 0
    server.flush_cache()
    out = server.generate(P1, NEW_TOKENS)
    _assert_same(out, reference)
    assert server.healthy()
    time.sleep(SETTLE_S)
    store = _stats(root)["store"]
    assert store["tiers"][0]["corrupt"] > 0, store
    assert out["cached"].get("storage", 0) < _full_pages(reference["prompt_tokens"]) * PAGE


def test_dynamic_backend_route(scenario, sglang_server, tmp_path_factory):
    """``--hicache-storage-backend dynamic`` with SGLang's own loader: no plugin name needed.
    Without ``interface_v1`` SGLang uses the generic flat-page path."""
    for name in ("a", "b"):
        if name in scenario:
            scenario[name].stop()  # two servers at once would not fit CI's memory
    root = tmp_path_factory.mktemp("speckv-dynamic")
    extra = {"backend_name": "speckv", "module_path": "sglang_speckv.sglang.adapter", "class_name": "SpecKVStorage",
             "config_file": str(_tiers_toml(root)), "prefetch_threshold": PREFETCH_THRESHOLD,
             "hicache_storage_pass_prefix_keys": True}
    server = sglang_server(["--hicache-storage", "none", "--enable-hierarchical-cache",
                            "--hicache-storage-backend", "dynamic",
                            "--hicache-storage-prefetch-policy", "wait_complete",
                            "--hicache-storage-backend-extra-config", json.dumps(extra)], name="dynamic")
    reference = _uncached(server, P1)
    pages = _full_pages(reference["prompt_tokens"])
    _assert_same(server.generate(P1, NEW_TOKENS), reference)
    _wait_written(root, at_least=2 * pages)
    server.flush_cache()
    out = server.generate(P1, NEW_TOKENS)
    assert out["cached"].get("storage") == pages * PAGE, out["cached"]
    _assert_same(out, reference)
    server.stop()


def _has_amx() -> bool:
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not _has_amx(), reason="SGLang's CPU engine supports fp8 KV only with Intel AMX "
                                            "('CPU FP8 KV cache requires Intel AMX support'); this CPU has none")
def test_fp8_kv_cpu(sglang_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("speckv-fp8")
    server = sglang_server([*_speckv_args(root), "--kv-cache-dtype", "fp8_e4m3"], name="fp8")
    reference = _uncached(server, P1)
    pages = _full_pages(reference["prompt_tokens"])
    server.generate(P1, NEW_TOKENS)
    _wait_written(root, at_least=2 * pages)
    server.flush_cache()
    out = server.generate(P1, NEW_TOKENS)
    assert out["cached"].get("storage") == pages * PAGE, out["cached"]
    _assert_same(out, reference)
    server.stop()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (SGLang on the GPU, Triton coder)")
@pytest.mark.parametrize("kv_dtype", ["auto", "fp8_e4m3"])
def test_gpu_triton_coder(sglang_server, tmp_path_factory, kv_dtype):
    root = tmp_path_factory.mktemp(f"speckv-gpu-{kv_dtype}")
    server = sglang_server([*_speckv_args(root), "--no-cpu", "--kv-cache-dtype", kv_dtype,
                            "--mem-fraction-static", os.environ.get("SPECKV_TEST_MEM_FRACTION", "0.3")],
                           name=f"gpu-{kv_dtype}")
    reference = _uncached(server, P2)
    pages = (reference["prompt_tokens"] - 1) // 64
    server.generate(P2, NEW_TOKENS)
    _wait_written(root, at_least=2 * pages)
    server.flush_cache()
    out = server.generate(P2, NEW_TOKENS)
    assert out["cached"].get("storage") == pages * 64, out["cached"]
    _assert_same(out, reference)
    assert _stats(root)["device"].startswith("cuda")
    server.stop()
