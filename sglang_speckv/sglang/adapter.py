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

Configuration (sglang_speckv/config.py, validated here at start-up): the keys of SGLang's
``storage_config.extra_config``, on top of the TOML file named by its ``config_file`` key.

Pages. A page of SGLang's host pool is viewed in its canonical shape
(sglang_speckv/predictors/base.py): MHA ``[2, layers, tokens, kv_heads, head_dim]``, MLA
``[1, layers, tokens, 1, latent_dim]``, whatever the pool's memory layout, so a stored page
does not depend on the layout (``PageGeometry``). Supported layouts: ``layer_first``,
``page_first``, ``page_first_direct`` and (MHA) ``page_head``; others are refused at start-up.

What the store holds per page (the value; the store wraps it in a checksummed record):

    offset  size     field
    0       4        magic b"SKVT"
    4       1        version (VALUE_VERSION)
    5       3        zero
    8       4        n: number of token ids (0 when SGLang's token side channel had none)
    12      4 * n    the page's token ids, uint32 little-endian
    12+4n   ...      the coded blob (kernels/format.py, docs/FORMAT.md)

Token ids come from the plugin's side channel (``sglang_plugin.PAGE_TOKENS``); they are
kept so that a token-aware predictor decodes with exactly the ids it encoded with.
Positions come from the write's ``extra_info.prefix_keys`` (SGLang passes them with
``hicache_storage_pass_prefix_keys``) and are recorded in the blob header, which reads
decode with (see ``_read``).

Contract with SGLang (its threads call concurrently; the store is thread-safe and coding
runs outside any lock):
- writes (``batch_set_v1`` / ``batch_set``) copy the pages out of host memory (which SGLang
  reuses) and code them before returning; pages already stored are not coded again;
- reads (``batch_get_v1`` / ``batch_get``) return True/the page only for pages whose record,
  value, blob and decoded checksum all verify, and stop at the first failure: anything
  wrong is a miss, never wrong bytes in the host pool;
- coding runs on the GPU (Triton kernels, one CUDA stream per calling thread, pages staged
  through device memory) when SGLang's KV lives on a GPU, else on the CPU reference.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig, HiCacheStorageExtraInfo

from sglang_speckv.config import ConfigError, load_config
from sglang_speckv import codec
from sglang_speckv.kernels.format import VERSION as BLOB_VERSION
from sglang_speckv.kernels.format import BlobError, parse_blob
from sglang_speckv.predictors.base import PageMeta, Predictor
from sglang_speckv.predictors.page_stats import PageStatsPredictor
from sglang_speckv.storage import TieredStore, chain_parents, namespace

logger = logging.getLogger(__name__)

VALUE_MAGIC = b"SKVT"
VALUE_VERSION = 1
_VALUE_HEAD = struct.Struct("<4sB3xI")  # magic, version, number of token ids
# Namespaces change with the value and blob formats: a reader never sees an older format.
FORMAT_VERSION = VALUE_VERSION * 1000 + BLOB_VERSION
# Writes of the stats file (config ``stats_file``) are at least this far apart: a batch
# takes milliseconds, and readers (tests, tools) poll at about this rate.
STATS_FILE_INTERVAL_S = 1.0

TORCH_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16",
                torch.float8_e4m3fn: "fp8_e4m3", torch.float8_e5m2: "fp8_e5m2"}
# SGLang keeps fp8 KV as uint8 in host memory; its --kv-cache-dtype names the format.
FP8_KV_CACHE_DTYPES = {"fp8_e4m3": "fp8_e4m3", "fp8_e5m2": "fp8_e5m2"}


def pack_value(token_ids: bytes | None, blob: bytes) -> bytes:
    """The stored value: header, token ids (uint32 LE bytes, or None), blob."""
    token_ids = token_ids or b""
    return b"".join((_VALUE_HEAD.pack(VALUE_MAGIC, VALUE_VERSION, len(token_ids) // 4), token_ids, blob))


def unpack_value(value) -> tuple[bytes | None, memoryview]:
    """(token ids as uint32 LE bytes or None, blob) of a stored value; BlobError if it is
    not one."""
    view = memoryview(value).cast("B")
    if len(view) < _VALUE_HEAD.size:
        raise BlobError(f"stored value of {len(view)} bytes is shorter than its header")
    magic, version, n = _VALUE_HEAD.unpack_from(view)
    if magic != VALUE_MAGIC or version != VALUE_VERSION:
        raise BlobError(f"stored value has magic {magic!r} version {version}, expected {VALUE_MAGIC!r} {VALUE_VERSION}")
    end = _VALUE_HEAD.size + 4 * n
    if end > len(view):
        raise BlobError(f"stored value claims {n} token ids but holds {len(view)} bytes")
    tokens = bytes(view[_VALUE_HEAD.size:end]) if n else None
    return tokens, view[end:]


# How a page sits in SGLang's host buffer, per (kind, layout): how to slice the page that
# starts at token slot s (T tokens per page) out of the buffer, and the permutation of that
# slice's axes ("own" order, also the order of SGLang's flat pages) into canonical order.
# MLA canonical pages then get a leading axis of 1.
_LAYOUTS = {
    # buffer [2, L, size, H, D]
    ("mha", "layer_first"): (lambda b, s, t: b[:, :, s:s + t], (0, 1, 2, 3, 4)),
    # buffer [2, size, L, H, D]
    ("mha", "page_first"): (lambda b, s, t: b[:, s:s + t], (0, 2, 1, 3, 4)),
    # buffer [2, pages, L, T, H, D]
    ("mha", "page_first_direct"): (lambda b, s, t: b[:, s // t], (0, 1, 2, 3, 4)),
    # buffer [2, pages, H, T, L, D]
    ("mha", "page_head"): (lambda b, s, t: b[:, s // t], (0, 3, 2, 1, 4)),
    # buffer [L, size, 1, D]
    ("mla", "layer_first"): (lambda b, s, t: b[:, s:s + t], (0, 1, 2, 3)),
    # buffer [size, L, 1, D]
    ("mla", "page_first"): (lambda b, s, t: b[s:s + t], (1, 0, 2, 3)),
    # buffer [pages, L, T, 1, D]
    ("mla", "page_first_direct"): (lambda b, s, t: b[s // t], (0, 1, 2, 3)),
}


@dataclass(frozen=True)
class PageGeometry:
    """How one page of a host pool maps to the canonical page shape.

    ``kind``: "mha" or "mla"; ``layout``: SGLang's host layout; ``shape``: the canonical
    shape; ``torch_dtype``: the element type of the pool's buffer (uint8 for fp8)."""

    kind: str
    layout: str
    dtype: str
    torch_dtype: torch.dtype
    page_size: int
    shape: tuple[int, int, int, int, int]

    @property
    def page_bytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.torch_dtype.itemsize

    @classmethod
    def of_pool(cls, pool: Any, kv_cache_dtype: str | None) -> PageGeometry:
        """Geometry of SGLang's host pool ``pool``; ValueError with what to do if unsupported."""
        from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
        from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost

        if type(pool) is MHATokenToKVPoolHost:
            if pool.head_dim != pool.v_head_dim:
                raise ValueError("speckv: MHA pools with different K and V head dims are not supported")
            kind, shape = "mha", (2, pool.layer_num, pool.page_size, pool.head_num, pool.head_dim)
        elif type(pool) is MLATokenToKVPoolHost:
            kind, shape = "mla", (1, pool.layer_num, pool.page_size, 1, pool.kv_cache_dim)
        else:
            raise ValueError(f"speckv: host pool {type(pool).__name__} is not supported (MHA and MLA "
                             "token pools are; hybrid, sparse and asymmetric pools are not)")
        if (kind, pool.layout) not in _LAYOUTS:
            ok = [layout for k, layout in _LAYOUTS if k == kind]
            raise ValueError(f"speckv: host layout {pool.layout!r} is not supported for {kind.upper()}; "
                             f"use --hicache-mem-layout {' / '.join(ok)}")
        return cls(kind, pool.layout, _dtype_name(pool.dtype, kv_cache_dtype), pool.dtype, pool.page_size, shape)

    def page(self, buffer: torch.Tensor, start: int) -> torch.Tensor:
        """A view, in canonical shape, of the page whose first token slot is ``start``."""
        slice_page, _ = _LAYOUTS[self.kind, self.layout]
        return self._canonical(slice_page(buffer, start, self.page_size))

    def from_flat(self, flat: torch.Tensor) -> torch.Tensor:
        """Canonical view of a flat page (SGLang's ``get_data_page(flat=True)``: the page's
        slice of the buffer, flattened in the layout's own order)."""
        _, perm = _LAYOUTS[self.kind, self.layout]
        canonical = self.shape if self.kind == "mha" else self.shape[1:]
        own = [0] * len(perm)
        for i, p in enumerate(perm):  # own axis p becomes canonical axis i
            own[p] = canonical[i]
        return self._canonical(flat.view(own))

    def _canonical(self, own: torch.Tensor) -> torch.Tensor:
        _, perm = _LAYOUTS[self.kind, self.layout]
        view = own.permute(perm)
        return view if self.kind == "mha" else view.unsqueeze(0)


def _dtype_name(torch_dtype: torch.dtype, kv_cache_dtype: str | None) -> str:
    if torch_dtype in TORCH_DTYPES:
        return TORCH_DTYPES[torch_dtype]
    if torch_dtype == torch.uint8 and kv_cache_dtype in FP8_KV_CACHE_DTYPES:
        return FP8_KV_CACHE_DTYPES[kv_cache_dtype]
    raise ValueError(f"speckv: KV cache dtype {torch_dtype} (--kv-cache-dtype {kv_cache_dtype}) is not "
                     "supported; use bf16, fp16, fp8_e4m3 or fp8_e5m2")


def _sglang_kv_cache_dtype() -> str | None:
    """SGLang's --kv-cache-dtype in this (scheduler) process, or None outside a server."""
    try:
        from sglang.srt.runtime_context import get_model

        return get_model().kv_cache_dtype
    except ValueError:  # "config namespace 'model' not published": not in a server process
        return None


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
        # The predictor new pages are coded with, and those tiers re-code demoted pages with;
        # reads pick each blob's predictor by the (id, fingerprint) in its header.
        names = dict.fromkeys([self.config.predictor, *(t.predictor for t in self.config.tiers if t.predictor)])
        self.predictors = {name: make_predictor(name) for name in names}
        self.predictor = self.predictors[self.config.predictor]
        self._by_blob = {(p.id, p.fingerprint): p for p in self.predictors.values()}
        self.store: TieredStore | None = None
        self.geometry: PageGeometry | None = None
        self.device = torch.device("cpu")
        self._buffer: torch.Tensor | None = None
        self._streams = threading.local()
        self._lock = threading.Lock()  # guards _counts, _seconds, _metrics, _stats_*
        self._counts: Counter = Counter()
        self._seconds: Counter = Counter()
        self._metrics = {"prefetch_pgs": [], "backup_pgs": [], "prefetch_bandwidth": [], "backup_bandwidth": []}
        self._stats_written = 0.0  # time.monotonic() of the last stats file write
        self._stats_timer: threading.Timer | None = None  # a pending deferred write

    # --- set-up --------------------------------------------------------------------------

    def register_mem_pool_host(self, mem_pool_host) -> None:
        """Learn the page geometry from SGLang's host pool and open the store (namespaced by
        model, shard, dtype, page size and format). Raises ValueError for unsupported pools."""
        super().register_mem_pool_host(mem_pool_host)
        fp8 = mem_pool_host.dtype == torch.uint8  # only then is SGLang's --kv-cache-dtype needed
        geometry = PageGeometry.of_pool(mem_pool_host, _sglang_kv_cache_dtype() if fp8 else None)
        self.open(geometry, mem_pool_host.kv_buffer, self._device_of(mem_pool_host))

    def open(self, geometry: PageGeometry, buffer: torch.Tensor | None, device: torch.device) -> None:
        """Open the store for pages of ``geometry`` kept in ``buffer`` (the host pool's
        ``kv_buffer``; None for the flat-page path only). ``device``: where coding runs."""
        sc = self.storage_config
        ns = namespace(
            sc.model_name or "",
            kv_dtype=geometry.dtype, layout=geometry.kind, page_size=geometry.page_size,
            format_version=FORMAT_VERSION, tp_rank=sc.tp_rank, tp_size=sc.tp_size,
            kv_replicated=sc.is_mla_model, pp_rank=sc.pp_rank, pp_size=sc.pp_size,
            cp_rank=sc.attn_cp_rank, cp_size=sc.attn_cp_size, dcp_rank=sc.dcp_rank, dcp_size=sc.dcp_size,
        )
        self.close()
        self.store = TieredStore(self.config, ns)
        self.geometry, self._buffer, self.device = geometry, buffer, device
        for tier in self.config.tiers:
            if tier.predictor:
                self.store.set_recode(tier.name, functools.partial(self._recode, self.predictors[tier.predictor]))
        logger.info("speckv: %s pages %s %s, predictor %s, coding on %s, tiers %s", geometry.kind,
                    geometry.shape, geometry.dtype, self.predictor.name, device,
                    [t.name for t in self.config.tiers])

    @staticmethod
    def _device_of(pool) -> torch.device:
        """Coding runs where SGLang keeps its KV cache: a CUDA device, or the CPU."""
        device = getattr(getattr(pool, "_transfer_device", None), "type", "cpu")
        if device == "cuda" and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # --- zero-copy path (SGLang interface v1) --------------------------------------------

    def batch_exists(self, keys: list[str], extra_info: HiCacheStorageExtraInfo | None = None) -> int:
        n = self.store.exists_prefix(keys)
        self._add(exists_queried=len(keys), exists_found=n)
        return n

    def batch_set_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:
        starts = self._page_starts(host_indices, len(keys))
        pages = [self.geometry.page(self._buffer, s) for s in starts]
        return self._write(keys, pages, extra_info)

    def batch_get_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:
        starts = self._page_starts(host_indices, len(keys))
        targets = [self.geometry.page(self._buffer, s) for s in starts]
        return self._read(keys, targets)

    def _page_starts(self, host_indices: torch.Tensor, n: int) -> list[int]:
        t = self.geometry.page_size
        if host_indices.numel() != n * t:
            raise ValueError(f"speckv: {host_indices.numel()} host indices for {n} pages of {t} tokens")
        return host_indices[::t].tolist()

    # --- generic path (flat pages) -------------------------------------------------------

    def batch_set(self, keys, values=None, target_locations=None, target_sizes=None) -> bool:
        pages = [self.geometry.from_flat(v) for v in values]
        return all(self._write(keys, pages, None))

    def batch_get(self, keys, target_locations=None, target_sizes=None):
        targets = [self.geometry.from_flat(t) for t in target_locations]
        ok = self._read(keys, targets)
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
        prefix = extra_info.prefix_keys if extra_info is not None else None
        first_position = len(prefix) * self.geometry.page_size if prefix is not None else 0
        have = self.store.exists_prefix(keys)  # chains are re-put from their head: skip the known part
        new = range(have, len(keys))
        if not new:
            self._add(pages_already_stored=len(keys))
            return [True] * len(keys)
        tokens = [PAGE_TOKENS.get(keys[i]) for i in new]
        metas = [PageMeta(self.geometry.dtype, self.geometry.shape,
                          position=first_position + i * self.geometry.page_size,
                          token_ids=_token_tuple(tok)) for i, tok in zip(new, tokens)]
        staged = torch.stack([pages[i] for i in new])  # a copy: SGLang reuses host memory
        coding_start = time.perf_counter()
        blobs = self._encode(staged, metas)
        coding_s = time.perf_counter() - coding_start
        values = [pack_value(tok, blob) for tok, blob in zip(tokens, blobs)]
        parents = chain_parents(keys, prefix[-1] if prefix else None)
        stored = self.store.put([keys[i] for i in new], values,
                                raw_sizes=[self.geometry.page_bytes] * len(new),
                                parents=[parents[i] for i in new])
        elapsed = time.perf_counter() - start
        raw = self.geometry.page_bytes * len(new)
        self._add(pages_written=sum(stored), pages_already_stored=have, raw_bytes_written=raw,
                  coded_bytes_written=sum(len(v) for v in values),
                  pages_with_tokens=sum(t is not None for t in tokens))
        self._time(encode_s=coding_s, encode_raw_bytes=raw, backup=(len(keys), raw, elapsed))
        return [True] * have + stored

    def _read(self, keys: list[str], targets: list[torch.Tensor]) -> list[bool]:
        """Fill ``targets`` (canonical views) with the pages under ``keys``, in order, up
        to the first page that is absent or fails any check; True for those filled.

        A page decodes at the position recorded in its blob, not one derived from the
        read's ``prefix_keys``: SGLang 0.5.23 passes a prefetch only the hashes of the
        matched node's ancestors (``get_prefix_hash_values``), without the node's own pages,
        so after a partial device hit the read-side count falls short. The key names the
        whole token chain from the sequence start, so it fixes the position anyway."""
        start = time.perf_counter()
        values = []
        for value in self.store.get(keys):
            if value is None:
                break
            values.append(value)
        blobs, metas, predictors = [], [], []
        for i, value in enumerate(values):
            try:
                tokens, blob = unpack_value(value)
                header = parse_blob(blob).header
                predictor = self._by_blob.get((header.predictor_id, header.fingerprint))
                if predictor is None:
                    raise BlobError(f"coded by predictor {header.predictor_id} (fingerprint "
                                    f"{header.fingerprint:#x}), which this configuration does not name")
            except BlobError as e:
                logger.warning("speckv: stored page %s is unreadable, treated as a miss: %s", keys[i], e)
                break
            blobs.append(blob)
            metas.append(PageMeta(self.geometry.dtype, self.geometry.shape, header.position, _token_tuple(tokens)))
            predictors.append(predictor)
        ok = [False] * len(keys)
        coding_start = time.perf_counter()
        start_run = 0
        while start_run < len(blobs):  # runs of pages coded by the same predictor
            end_run = start_run + 1
            while end_run < len(blobs) and predictors[end_run] is predictors[start_run]:
                end_run += 1
            run = slice(start_run, end_run)
            errors = self._decode(predictors[start_run], blobs[run], metas[run], targets[run])
            for i, error in enumerate(errors, start_run):
                if error is not None:
                    logger.warning("speckv: stored page %s failed verification, treated as a miss: %s", keys[i], error)
                    break
                ok[i] = True
            if not all(ok[:end_run]):
                break
            start_run = end_run
        if blobs:
            self._time(decode_s=time.perf_counter() - coding_start,
                       decode_raw_bytes=self.geometry.page_bytes * len(blobs))
        hits = sum(ok)
        raw = hits * self.geometry.page_bytes
        # A stored page that failed a check cuts the read there: one verify failure.
        self._add(pages_read=hits, pages_missed=len(keys) - hits, verify_failures=int(len(values) > hits),
                  raw_bytes_read=raw)
        self._time(prefetch=(hits, raw, time.perf_counter() - start))
        return ok

    # --- coding --------------------------------------------------------------------------

    def _encode(self, pages: torch.Tensor, metas: list[PageMeta], predictor: Predictor | None = None) -> list[bytes]:
        """Blobs of ``pages`` ([P, *canonical shape], storage dtype, a private copy)."""
        predictor = predictor or self.predictor
        if self.device.type != "cuda":
            return codec.encode_pages(list(pages), metas, predictor, w_wide=predictor.w_wide, kappa=predictor.kappa)
        with torch.cuda.stream(self._stream()):
            staged = pages.pin_memory().to(self.device, non_blocking=True)
            blobs = codec.encode_pages(list(staged), metas, predictor, w_wide=predictor.w_wide, kappa=predictor.kappa)
        return blobs  # encode_pages returns host bytes: the stream's work is done

    def _decode(self, predictor: Predictor, blobs: list[memoryview], metas: list[PageMeta],
                targets: list[torch.Tensor]) -> list[BlobError | None]:
        """Decode ``blobs`` into ``targets`` (host memory). A page is written only after it
        verified; the error (or None) per blob is returned."""
        if self.device.type != "cuda":
            _, errors = codec.decode_pages(blobs, predictor, metas=metas, out=targets, device=self.device)
            return errors
        with torch.cuda.stream(self._stream()):
            pages, errors = codec.decode_pages(blobs, predictor, metas=metas, device=self.device)
            for page, target in zip(pages, targets):
                if page is not None:
                    target.copy_(page)  # device -> host, in order on this stream
            self._stream().synchronize()  # host memory must hold the page before we return
        return errors

    def _recode(self, target: Predictor, value: memoryview) -> bytes:
        """The store's demotion hook for a tier with its own ``predictor``: the stored value
        re-coded with ``target``. Raises BlobError if the value does not decode (the store
        then moves it unchanged)."""
        tokens, blob = unpack_value(value)
        header = parse_blob(blob).header
        source = self._by_blob.get((header.predictor_id, header.fingerprint))
        if source is None:
            raise BlobError(f"coded by unknown predictor {header.predictor_id}")
        if source is target:
            return bytes(value)
        meta = PageMeta(header.dtype, header.shape, header.position, _token_tuple(tokens))
        pages, errors = codec.decode_pages([blob], source, metas=[meta], device=self.device)
        if errors[0] is not None:
            raise errors[0]
        (new,) = self._encode(pages[0].unsqueeze(0).cpu(), [meta], target)
        self._add(pages_recoded=1)
        return pack_value(tokens, new)

    def _stream(self) -> torch.cuda.Stream:
        """This thread's CUDA stream for coding (SGLang's threads never share one)."""
        stream = getattr(self._streams, "stream", None)
        if stream is None:
            stream = self._streams.stream = torch.cuda.Stream(self.device)
        return stream

    # --- stats and lifecycle -------------------------------------------------------------

    def _add(self, **counts: int) -> None:
        with self._lock:
            self._counts.update(counts)
        self._maybe_write_stats()

    def _time(self, backup=None, prefetch=None, **seconds: float) -> None:
        with self._lock:
            self._seconds.update(seconds)
            for name, sample in (("backup", backup), ("prefetch", prefetch)):
                if sample and sample[0]:
                    pages, raw, elapsed = sample
                    self._metrics[f"{name}_pgs"].append(pages)
                    self._metrics[f"{name}_bandwidth"].append(raw / max(elapsed, 1e-9) / 1e9)

    def stats(self) -> dict:
        """Counters since start-up (pages, bytes raw and coded, hit rates, coder throughput)
        and the store's per-tier occupancy and events."""
        with self._lock:
            c, s = dict(self._counts), dict(self._seconds)
        raw_w, coded_w = c.get("raw_bytes_written", 0), c.get("coded_bytes_written", 0)
        asked = c.get("pages_read", 0) + c.get("pages_missed", 0)
        out = {
            **{k: c.get(k, 0) for k in ("pages_written", "pages_already_stored", "pages_with_tokens",
                                        "raw_bytes_written", "coded_bytes_written", "pages_read",
                                        "pages_missed", "verify_failures", "raw_bytes_read", "pages_recoded",
                                        "exists_queried", "exists_found")},
            "compression_ratio": raw_w / coded_w if coded_w else None,
            "read_hit_rate": c.get("pages_read", 0) / asked if asked else None,
            "encode_GBps": s.get("encode_raw_bytes", 0) / s["encode_s"] / 1e9 if s.get("encode_s") else None,
            "decode_GBps": s.get("decode_raw_bytes", 0) / s["decode_s"] / 1e9 if s.get("decode_s") else None,
            "predictor": self.predictor.name,
            "tier_predictors": {t.name: t.predictor for t in self.config.tiers if t.predictor},
            "device": str(self.device),
        }
        if self.store is not None:
            out["store"] = self.store.stats()
        return out

    def get_stats(self):
        """SGLang's storage metrics (``--enable-storage-metrics``): the pages and bandwidth
        (GB/s) of each read and write since the last call; ``.speckv`` holds ``stats()``."""
        from sglang.srt.observability.metrics_collector import StorageMetrics

        with self._lock:
            metrics, self._metrics = self._metrics, {k: [] for k in self._metrics}
        out = StorageMetrics(**metrics)
        out.speckv = self.stats()
        return out

    def _maybe_write_stats(self, force: bool = False) -> None:
        """Rewrite the stats file: now if the last write is STATS_FILE_INTERVAL_S old (or
        ``force``), else once that interval is over (one pending timer at most), so the
        file never lags the counters by more than the interval."""
        path = self.config.stats_file
        if not path:
            return
        with self._lock:
            wait = self._stats_written + STATS_FILE_INTERVAL_S - time.monotonic()
            if wait > 0 and not force:
                if self._stats_timer is None:
                    self._stats_timer = threading.Timer(wait, self._maybe_write_stats, kwargs={"force": True})
                    self._stats_timer.daemon = True
                    self._stats_timer.start()
                return
            self._stats_written = time.monotonic()
            self._stats_timer = None
        text = json.dumps(self.stats(), indent=1)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)  # readers see the old or the new file, never half of one

    def clear(self) -> None:
        """Remove every page of this server's namespace from every tier."""
        if self.store is not None:
            self.store.clear()

    def close(self) -> None:
        """Write the final stats and release the store. Idempotent."""
        if self.store is not None:
            with self._lock:
                timer, self._stats_timer = self._stats_timer, None
            if timer is not None:
                timer.cancel()
            self._maybe_write_stats(force=True)
            self.store.close()
            self.store = None


def make_predictor(name: str) -> Predictor:
    """The predictor named by the configuration's ``predictor`` field: ``page_stats``, or
    ``CALIB.safetensors[:NAME]``, predictor NAME of a calibration file written by
    ``speckv calibrate`` for the served model (sglang_speckv/predictors/linear.py)."""
    if name == PageStatsPredictor.name:
        return PageStatsPredictor()
    path, _, calibrated = name.partition(":")
    if path.endswith(".safetensors"):
        from sglang_speckv.predictors import DEFAULT_CALIBRATED, predictor_from_calibration
        from sglang_speckv.predictors.calibration import CalibrationError

        try:
            return predictor_from_calibration(path, calibrated or DEFAULT_CALIBRATED)
        except CalibrationError as e:
            raise ConfigError(f"predictor: {e}") from None
    raise ConfigError(f"predictor: {name!r} is neither {PageStatsPredictor.name!r} nor a calibration "
                      "file 'CALIB.safetensors[:NAME]' (write one with `speckv calibrate`)")


def _token_tuple(raw: bytes | None) -> tuple[int, ...] | None:
    if raw is None:
        return None
    return struct.unpack(f"<{len(raw) // 4}I", raw)
