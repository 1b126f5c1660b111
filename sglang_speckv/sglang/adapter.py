"""``SpecKVStorage``: SGLang HiCache's L3 storage backend, entropy-coding every KV page.

SGLang constructs it as its dynamic loader does, ``SpecKVStorage(storage_config, kwargs)``
(kwargs is empty), then hands it the host (L2) pool with ``register_mem_pool_host``. Two
ways to start it (``speckv serve`` adds the flags and defaults, sglang_speckv/sglang/serve.py):

    # by name, registered by our plugin (installed with the package):
    python -m sglang.launch_server --model-path M --enable-hierarchical-cache \\
        --hicache-storage-backend speckv --hicache-storage-prefetch-policy wait_complete \\
        --hicache-storage-backend-extra-config '{"hicache_storage_pass_prefix_keys": true,
                                                 "config_file": "/abs/tiers.toml"}'
    # SGLang's own dynamic loader (no plugin involved); "interface_v1": 1 selects the
    # zero-copy path, without it SGLang uses the generic flat-page path:
    python -m sglang.launch_server ... --hicache-storage-backend dynamic \\
        --hicache-storage-backend-extra-config '{"backend_name": "speckv",
            "module_path": "sglang_speckv.sglang.adapter", "class_name": "SpecKVStorage",
            "interface_v1": 1, "hicache_storage_pass_prefix_keys": true}'

This file only translates SGLang's calls; the rooms it uses:
- configuration: sglang_speckv/config.py (``storage_config.extra_config`` on top of the
  TOML file named by its ``config_file`` key), validated at start-up;
- page geometry (SGLang's host layouts -> canonical pages): geometry.py;
- page coding (predictors, encode/decode/recode on a device, the stored value): page_coder.py;
- counters, the stats file and SGLang's storage metrics: stats.py;
- the tiered LMDB store: storage/.

Contract with SGLang (its threads call concurrently; the store is thread-safe and coding
runs outside any lock):
- start-up errors (configuration, unsupported pool, a predictor that does not fit the
  pool) raise with a message that says what to do;
- after start-up no call raises: a failure is a False / a miss, logged (once per cause);
- writes copy the pages out of host memory (which SGLang reuses) and code them before
  returning; pages already stored are not coded again;
- reads return True only for pages whose record, value, blob and decoded checksum all
  verify, and stop at the first failure: anything wrong is a miss, never wrong bytes.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from typing import Any

import numpy as np
import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig, HiCacheStorageExtraInfo

from sglang_speckv.codec import FORMAT_VERSION, VALUE_HEAD, max_compressed_size, token_tuple
from sglang_speckv.config import ConfigError, load_config
from sglang_speckv.predictors.base import PageMeta
from sglang_speckv.sglang.geometry import PageGeometry, sglang_kv_cache_dtype, sglang_model_path
from sglang_speckv.sglang.page_coder import PageCoder
from sglang_speckv.sglang.stats import Stats
from sglang_speckv.storage import TieredStore, chain_parents, namespace

logger = logging.getLogger(__name__)


def _never_raises(failed: Any):
    """Decorator for SGLang-facing calls after start-up: an exception is logged (once per
    method and exception type) and turned into ``failed(args)``, never raised into SGLang."""

    def wrap(method):
        @functools.wraps(method)
        def call(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except Exception as e:  # noqa: BLE001 - HiCache's threads are not restarted
                self.coder.warn_once(f"{method.__name__}:{type(e).__name__}",
                                     "speckv: %s failed, answered as a miss: %s: %s (logged once)",
                                     method.__name__, type(e).__name__, e)
                self._stats.add(store_errors=1)
                return failed(*args, **kwargs)

        return call

    return wrap


def _all_false(keys, *args, **kwargs) -> list[bool]:
    return [False] * len(keys)


class SpecKVStorage(HiCacheStorage):
    """See the module docstring."""

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: dict | None = None):
        extra = dict(storage_config.extra_config or {})
        config_file = extra.pop("config_file", None)
        try:
            self.config = load_config(config_file, extra)
        except ConfigError as e:
            raise ConfigError(f"speckv configuration: {e}") from None
        if storage_config.should_split_heads:
            raise ValueError("speckv: tp_lcm_size head splitting is not supported; drop tp_lcm_size "
                             "from --hicache-storage-backend-extra-config")
        self.storage_config = storage_config
        self.coder = PageCoder(self.config.predictor, [t.predictor for t in self.config.tiers if t.predictor],
                               self.config.coding_batch_bytes)
        self._stats = Stats(self.config.stats_file, self._stats_extra)
        self.store: TieredStore | None = None
        self.geometry: PageGeometry | None = None
        self._buffer: torch.Tensor | None = None
        self._read_buffers = threading.local()  # per calling thread: reused value buffers

    # --- set-up --------------------------------------------------------------------------

    def register_mem_pool_host(self, mem_pool_host) -> None:
        """Learn the page geometry from SGLang's host pool and open the store. Raises
        ValueError / ConfigError for unsupported pools and predictors that do not fit."""
        super().register_mem_pool_host(mem_pool_host)
        fp8 = mem_pool_host.dtype == torch.uint8  # only then is SGLang's --kv-cache-dtype needed
        geometry = PageGeometry.of_pool(mem_pool_host, sglang_kv_cache_dtype() if fp8 else None)
        self.open(geometry, mem_pool_host.kv_buffer, _device_of(mem_pool_host), sglang_model_path())

    def open(self, geometry: PageGeometry, buffer: torch.Tensor | None, device: torch.device,
             model_path: str | None = None) -> None:
        """Open the store (namespaced by model, shard, dtype, page size, format and the
        configured predictors' calibrations: another configuration's pages are not this
        one's; the live calibration is not part of it) for pages of ``geometry`` kept in
        ``buffer`` (the host pool's ``kv_buffer``; None for the flat-page path only).
        ``device``: where coding runs; ``model_path``: the served model (SGLang's
        --model-path), which ``calibrate = "auto"`` needs."""
        self.coder.open(geometry, device, self._live_calibration(geometry, model_path))
        sc = self.storage_config
        ns = namespace(
            sc.model_name or "",
            kv_dtype=geometry.dtype, layout=geometry.kind, page_size=geometry.page_size,
            format_version=FORMAT_VERSION, tp_rank=sc.tp_rank, tp_size=sc.tp_size,
            kv_replicated=sc.is_mla_model, pp_rank=sc.pp_rank, pp_size=sc.pp_size,
            cp_rank=sc.attn_cp_rank, cp_size=sc.attn_cp_size, dcp_rank=sc.dcp_rank, dcp_size=sc.dcp_size,
            coding=self.coder.identity(),
        )
        self.close()
        self.store = TieredStore(self.config, ns)
        self.geometry, self._buffer = geometry, buffer
        for tier in self.config.tiers:
            if tier.predictor:
                self.store.set_recode(tier.name, functools.partial(self._recode, tier.predictor))
        logger.info("speckv: %s pages %s %s, predictor %s%s, coding on %s, tiers %s", geometry.kind,
                    geometry.shape, geometry.dtype, self.coder.writer().name,
                    f" (live calibration {self.coder.live.status()['state']})" if self.coder.live else "",
                    device, [t.name for t in self.config.tiers])

    def _live_calibration(self, geometry: PageGeometry, model_path: str | None):
        """The live calibration (config ``calibrate = "auto"``) of the served model, its
        file in the first tier's directory; None when off. ConfigError, naming the
        architecture and what is missing, for a model or pool it does not cover."""
        if self.config.calibrate != "auto":
            return None
        from sglang_speckv.predictors.live import for_served_model

        if not model_path:
            raise ConfigError("calibrate: 'auto' fits to the served model and needs its config.json; "
                              "the model path is unknown here (start the backend from SGLang)")
        try:
            return for_served_model(self.config.tiers[0].path, model_path, geometry.dtype, geometry.shape,
                                    sample_tokens=self.config.calibrate_sample_tokens,
                                    on_done=self._stats.write_file)
        except (ValueError, OSError) as e:
            raise ConfigError(f"calibrate = 'auto': {e}; set calibrate = 'off' (page_stats codes any model)") from None

    # --- zero-copy path (SGLang interface v1) --------------------------------------------

    @_never_raises(lambda keys, *a, **k: 0)
    def batch_exists(self, keys: list[str], extra_info: HiCacheStorageExtraInfo | None = None) -> int:
        n = self.store.exists_prefix(keys)
        self._stats.add(exists_queried=len(keys), exists_found=n)
        return n

    @_never_raises(_all_false)
    def batch_set_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:
        pages = [self.geometry.page(self._buffer, s) for s in self._page_starts(host_indices, len(keys))]
        return self._write(keys, pages, extra_info)

    @_never_raises(_all_false)
    def batch_get_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:
        targets = [self.geometry.page(self._buffer, s) for s in self._page_starts(host_indices, len(keys))]
        return self._read(keys, targets)

    def _page_starts(self, host_indices: torch.Tensor, n: int) -> list[int]:
        t = self.geometry.page_size
        if host_indices.numel() != n * t:
            raise ValueError(f"speckv: {host_indices.numel()} host indices for {n} pages of {t} tokens")
        return host_indices[::t].tolist()

    # --- generic path (flat pages) -------------------------------------------------------

    @_never_raises(lambda keys, *a, **k: False)
    def batch_set(self, keys, values=None, target_locations=None, target_sizes=None) -> bool:
        return all(self._write(keys, [self.geometry.from_flat(v) for v in values], None))

    @_never_raises(lambda keys, *a, **k: [None] * len(keys))
    def batch_get(self, keys, target_locations=None, target_sizes=None):
        ok = self._read(keys, [self.geometry.from_flat(t) for t in target_locations])
        return [t if good else None for t, good in zip(target_locations, ok)]

    def set(self, key, value=None, target_location=None, target_sizes=None) -> bool:
        return self.batch_set([key], [value])

    def get(self, key, target_location=None, target_sizes=None):
        target = target_location if target_location is not None else self.mem_pool_host.get_dummy_flat_data_page()
        return self.batch_get([key], [target])[0]

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    # --- writes and reads ----------------------------------------------------------------

    def _write(self, keys: list[str], pages: list[torch.Tensor],
               extra_info: HiCacheStorageExtraInfo | None) -> list[bool]:
        """Code and store ``pages`` (canonical views) under ``keys`` (one chain, in order)."""
        from sglang_speckv.sglang.plugin import PAGE_TOKENS

        start = time.perf_counter()
        g = self.geometry
        prefix = extra_info.prefix_keys if extra_info is not None else None
        if prefix is None:
            # SGLang passes them only with "hicache_storage_pass_prefix_keys": true in the
            # extra config, which it keeps to itself: the first write tells.
            flag = ("Add \"hicache_storage_pass_prefix_keys\": true to --hicache-storage-backend-extra-config "
                    "(speckv serve does). Logged once.")
            if self.coder.writer().uses_position:
                self.coder.warn_once("no-prefix-keys", "speckv: writes come without prefix keys, so predictor %s, "
                                     "which depends on page positions, codes each write as if it started at "
                                     "position 0: correct but larger pages. %s", self.coder.writer().name, flag)
            if self.coder.live is not None:
                self.coder.warn_once("no-prefix-keys-live", "speckv: writes come without prefix keys, so their pages' "
                                     "positions are unknown and the live calibration (calibrate = 'auto') samples "
                                     "none of them. %s", flag)
        first_position = len(prefix) * g.page_size if prefix is not None else 0
        have = self.store.exists_prefix(keys)  # chains are re-put from their head: skip the known part
        new = range(have, len(keys))
        if not new:
            self._stats.add(pages_already_stored=len(keys))
            return [True] * len(keys)
        tokens = [PAGE_TOKENS.get(keys[i]) for i in new]
        prefix_ids = self._prefix_ids(prefix or [], keys[:have])
        metas = []
        for i, tok in zip(new, tokens):
            ids = token_tuple(tok)
            metas.append(PageMeta(g.dtype, g.shape, position=first_position + i * g.page_size, token_ids=ids,
                                  prefix_ids=prefix_ids))
            prefix_ids = prefix_ids + ids if prefix_ids is not None and ids is not None else None
        staged = torch.stack([pages[i] for i in new])  # a copy: SGLang reuses host memory
        if prefix is not None:  # positions known: a sample for the live calibration
            self.coder.feed(staged, metas)
        coding_start = time.perf_counter()
        values = self.coder.encode(staged, metas)
        coding_s = time.perf_counter() - coding_start
        coded = [i for i, v in zip(new, values) if v is not None]
        parents = chain_parents(keys, prefix[-1] if prefix else None)
        stored = self.store.put([keys[i] for i in coded], [v for v in values if v is not None],
                                raw_sizes=[g.page_bytes] * len(coded), parents=[parents[i] for i in coded])
        ok = dict(zip(coded, stored))
        raw = g.page_bytes * len(new)
        self._stats.add(pages_written=sum(stored), pages_already_stored=have, raw_bytes_written=g.page_bytes * len(coded),
                       coded_bytes_written=sum(len(v) for v in values if v is not None),
                       pages_with_tokens=sum(t is not None for t in tokens), encode_failures=len(new) - len(coded))
        self._stats.time(encode_s=coding_s, encode_raw_bytes=raw, backup=(len(keys), raw, time.perf_counter() - start))
        return [True] * have + [ok.get(i, False) for i in new]

    def _prefix_ids(self, prefix_keys: list[str], known_keys: list[str]) -> tuple[int, ...] | None:
        """The tokens of the pages before a write's first new page (SGLang's prefix keys,
        then the write's pages already stored), if some predictor needs them and the side
        channel still holds all of them; else None."""
        from sglang_speckv.sglang.plugin import PAGE_TOKENS

        if not self.coder.wants_prefix:
            return None
        parts = [PAGE_TOKENS.get(k) for k in (*prefix_keys, *known_keys)]
        if any(p is None for p in parts):
            return None
        return token_tuple(b"".join(parts)) or ()

    def _read(self, keys: list[str], targets: list[torch.Tensor]) -> list[bool]:
        """Fill ``targets`` (canonical views) with the pages under ``keys``, in order, up
        to the first page that is absent or fails any check; True for those filled."""
        start = time.perf_counter()
        values = []
        for value in self.store.get(keys, out=self._value_buffers(len(keys))):
            if value is None:
                break
            values.append(value)
        coding_start = time.perf_counter()
        hits = self.coder.decode_into(keys, values, targets)
        g = self.geometry
        if values:
            self._stats.time(decode_s=time.perf_counter() - coding_start, decode_raw_bytes=g.page_bytes * len(values))
        raw = hits * g.page_bytes
        # A stored page that failed a check cuts the read there: one verify failure.
        self._stats.add(pages_read=hits, pages_missed=len(keys) - hits, verify_failures=int(len(values) > hits),
                       raw_bytes_read=raw)
        self._stats.time(prefetch=(hits, raw, time.perf_counter() - start))
        return [i < hits for i in range(len(keys))]

    def _value_buffers(self, n: int) -> list[np.ndarray]:
        """``n`` buffers, each large enough for any stored value of this geometry (header,
        token ids with the longest prefix a predictor stores, the largest blob), reused by
        this thread's reads: no allocation per page.
        Decoding finishes before the call returns, so a thread never needs them twice."""
        g = self.geometry
        tokens = g.page_size + self.coder.max_prefix_tokens
        size = VALUE_HEAD.size + 4 * tokens + max_compressed_size(PageMeta(g.dtype, g.shape))
        buffers = getattr(self._read_buffers, "list", [])
        if buffers and buffers[0].size != size:
            buffers = []
        while len(buffers) < n:
            buffers.append(np.empty(size, dtype=np.uint8))
        self._read_buffers.list = buffers
        return buffers[:n]

    def _recode(self, spec: str, value: memoryview) -> bytes | memoryview:
        """The store's demotion hook (page_coder.PageCoder.recode) for a tier whose
        predictor is ``spec``, counted."""
        new = self.coder.recode(self.coder.tier_predictor(spec), value)
        if new is not value:
            self._stats.add(pages_recoded=1)
        return new

    # --- stats and lifecycle -------------------------------------------------------------

    def _stats_extra(self) -> dict:
        out = {
            "predictor": self.coder.writer().name,  # what codes new pages now
            "tier_predictors": {t.name: t.predictor for t in self.config.tiers if t.predictor},
            "device": str(self.coder.device),
            **self.coder.stats(),  # written_by_predictor, live_calibration
        }
        if self.store is not None:
            try:
                out["store"] = self.store.stats()
                for tier in out["store"]["tiers"]:  # raw / stored: what the tier's coding buys
                    raw, stored = tier.get("raw_bytes"), tier.get("bytes")  # a remote tier may not know
                    tier["ratio"] = round(raw / stored, 3) if raw and stored else None
            except Exception as e:  # noqa: BLE001 - stats must never fail SGLang's metrics call
                out["store"] = {"error": f"{type(e).__name__}: {e}"}
        return out

    def stats(self) -> dict:
        """Counters since start-up (pages, bytes raw and coded, hit rates, coder
        throughput, failures), the predictors and the store's per-tier occupancy."""
        return self._stats.snapshot()

    def get_stats(self):
        """SGLang's storage metrics (``--enable-storage-metrics``): the pages and bandwidth
        (GB/s) of each read and write since the last call; ``.speckv`` holds the counters."""
        from sglang.srt.observability.metrics_collector import StorageMetrics

        out = StorageMetrics(**self._stats.take_samples())
        out.speckv = self._stats.snapshot()
        return out

    @_never_raises(lambda *a, **k: None)
    def clear(self) -> None:
        """Remove every page of this server's namespace from every tier."""
        if self.store is not None:
            self.store.clear()

    def close(self) -> None:
        """Write the final stats and release the store. Idempotent."""
        if self.store is not None:
            self._stats.close()
            self.store.close()
            self.store = None


def _device_of(pool) -> torch.device:
    """Coding runs where SGLang keeps its KV cache: a CUDA device, or the CPU."""
    device = getattr(getattr(pool, "_transfer_device", None), "type", "cpu")
    if device == "cuda" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")

