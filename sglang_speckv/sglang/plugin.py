"""SGLang plugin: ``--hicache-storage-backend speckv`` and the page token-id side channel.

SGLang runs every entry point of the group ``sglang.srt.plugins`` early in each of its
processes (the launcher, which also hosts the tokenizer manager, the scheduler and the
detokenizer). Ours is ``load()`` (declared in pyproject.toml). It:

1. applies the CPU-engine fixes (sglang_speckv/sglang/cpu_compat) when SGLANG_USE_CPU_ENGINE=1;
2. makes ``speckv`` a storage backend name: accepted by the argument parser, registered in
   SGLang's ``StorageBackendFactory`` (constructed as the dynamic loader does,
   ``SpecKVStorage(storage_config, {})``), and served through the zero-copy
   ``batch_get_v1 / batch_set_v1`` path, which SGLang otherwise enables only for a fixed
   list of names;
3. records, where SGLang hashes pages for storage, each page's token ids under its key, in
   the process-local ``PAGE_TOKENS`` map that the backend reads (SGLang hands backends only
   keys, never tokens).

Every SGLang name touched is listed in ``PATCHED_NAMES`` and checked against the pinned
SGLang version by tests/test_sglang_smoke.py. ``load()`` is idempotent.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
from array import array
from collections import OrderedDict

logger = logging.getLogger(__name__)

BACKEND_NAME = "speckv"
BACKEND_MODULE = "sglang_speckv.sglang.adapter"
BACKEND_CLASS = "SpecKVStorage"

# (module, attribute) pairs that load() reads or wraps; checked by the smoke test.
PATCHED_NAMES = (
    ("sglang.srt.server_args", "ServerArgs.add_cli_args"),
    ("sglang.srt.mem_cache.storage.backend_factory", "StorageBackendFactory.register_backend"),
    ("sglang.srt.mem_cache.storage.backend_factory", "StorageBackendFactory._create_builtin_backend"),
    ("sglang.srt.managers.cache_controller", "HiCacheController.attach_storage_backend"),
    ("sglang.srt.managers.cache_controller", "HiCacheController._page_get_zero_copy"),
    ("sglang.srt.managers.cache_controller", "HiCacheController._page_set_zero_copy"),
    ("sglang.srt.managers.cache_controller", "HiCacheController.write_storage"),
    ("sglang.srt.managers.cache_controller", "HiCacheController._storage_hit_query"),
    ("sglang.srt.mem_cache.hybrid_cache.hybrid_cache_controller", "HybridCacheController.write_storage"),
    ("sglang.srt.mem_cache.hybrid_cache.hybrid_cache_controller", "HybridCacheController._storage_hit_query"),
)

# Pages whose token ids are remembered. An entry must live from the moment SGLang hashes
# a page (request arrival, or backup scheduling) until the backend reads or writes it,
# normally well under a second. 2^16 pages is 1M tokens at page size 16 (4M at 64), far
# more than SGLang keeps in flight, at 4 bytes per token (<= 16 MiB at page size 64).
PAGE_TOKENS_CAPACITY = 1 << 16


class PageTokens:
    """Thread-safe, bounded map: page key (64-hex) -> the page's token ids, as uint32
    little-endian bytes (the form stored beside the page). Oldest entries drop first."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._lock = threading.Lock()
        self._map: OrderedDict[str, bytes] = OrderedDict()

    def record(self, keys: list[str], tokens, page_size: int) -> None:
        """Remember ``tokens[i*page_size:(i+1)*page_size]`` under ``keys[i]`` for each full
        page. ``tokens``: a sequence of ints, or SGLang's RadixKey (bigram keys, whose
        pages are not plain token runs, are skipped)."""
        if getattr(tokens, "is_bigram", False):
            return
        limit = getattr(tokens, "limit", None)
        tokens = getattr(tokens, "token_ids", tokens)
        if limit is not None:
            tokens = tokens[:limit]
        n_pages = min(len(keys), len(tokens) // page_size)
        if n_pages == 0:
            return
        flat = array("I", tokens[: n_pages * page_size])  # uint32: vocab ids are < 2^32
        assert flat.itemsize == 4, "array('I') must be 32-bit"
        if sys.byteorder == "big":
            flat.byteswap()
        raw = flat.tobytes()
        step = 4 * page_size
        with self._lock:
            for i in range(n_pages):
                self._map[keys[i]] = raw[i * step : (i + 1) * step]
                self._map.move_to_end(keys[i])
            while len(self._map) > self.capacity:
                self._map.popitem(last=False)

    def get(self, key: str) -> bytes | None:
        with self._lock:
            return self._map.get(key)

    def __len__(self) -> int:
        with self._lock:
            return len(self._map)


PAGE_TOKENS = PageTokens(PAGE_TOKENS_CAPACITY)

_loaded = False


def load() -> None:
    """Entry point (``sglang.srt.plugins``): see the module docstring."""
    global _loaded
    if _loaded:
        return
    from sglang_speckv.sglang import cpu_compat

    if cpu_compat.apply():
        logger.info("sglang-speckv: SGLang CPU-engine fixes applied")
    _register_backend()
    _install_token_side_channel()
    _loaded = True


def _wrap(owner, name: str, make_wrapper) -> None:
    """Replace ``owner.name`` by ``make_wrapper(original)``; the wrapper keeps the
    original's name and docstring, and ``__wrapped__`` points at it."""
    original = owner.__dict__[name]
    func = original.__func__ if isinstance(original, (staticmethod, classmethod)) else original
    wrapper = functools.wraps(func)(make_wrapper(func))
    if isinstance(original, staticmethod):
        wrapper = staticmethod(wrapper)
    elif isinstance(original, classmethod):
        wrapper = classmethod(wrapper)
    setattr(owner, name, wrapper)


def _register_backend() -> None:
    from sglang.srt.managers.cache_controller import HiCacheController
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory
    from sglang.srt.server_args import ServerArgs

    def add_cli_args(original):
        def wrapper(parser):
            original(parser)
            for action in parser._actions:  # argparse keeps no public registry of options
                if action.dest == "hicache_storage_backend" and action.choices is not None:
                    if BACKEND_NAME not in action.choices:
                        action.choices = [*action.choices, BACKEND_NAME]

        return wrapper

    def create_builtin_backend(original):
        # The factory builds registered names through a fixed if/elif list that refuses
        # unknown names; ours is built exactly as the dynamic route builds it.
        def wrapper(cls, backend_name, backend_class, storage_config, mem_pool_host):
            if backend_name == BACKEND_NAME:
                return backend_class(storage_config, {})
            return original(cls, backend_name, backend_class, storage_config, mem_pool_host)

        return wrapper

    def attach_storage_backend(original):
        # SGLang picks the zero-copy page functions for a fixed list of backend names.
        # No storage request is in flight during attach (SGLang's documented requirement),
        # so switching the functions right after it is race-free.
        def wrapper(self, storage_backend, *args, **kwargs):
            result = original(self, storage_backend, *args, **kwargs)
            if storage_backend == BACKEND_NAME:
                self.page_get_func = self._page_get_zero_copy
                self.page_set_func = self._page_set_zero_copy
            return result

        return wrapper

    _wrap(ServerArgs, "add_cli_args", add_cli_args)
    _wrap(StorageBackendFactory, "_create_builtin_backend", create_builtin_backend)
    _wrap(HiCacheController, "attach_storage_backend", attach_storage_backend)
    StorageBackendFactory.register_backend(BACKEND_NAME, BACKEND_MODULE, BACKEND_CLASS)


def _install_token_side_channel() -> None:
    """Record page key -> token ids where SGLang hashes pages for L3: the backup request
    (``write_storage``: token ids and the node's page keys) and the prefetch query
    (``_storage_hit_query``: hashes the request's tokens, then asks ``batch_exists``;
    ``batch_get`` comes later on another thread, so recording after the query is early
    enough)."""
    from sglang.srt.managers.cache_controller import HiCacheController
    from sglang.srt.mem_cache.hybrid_cache.hybrid_cache_controller import HybridCacheController

    def write_storage(original):
        def wrapper(self, host_indices, token_ids, hash_value=None, *args, **kwargs):
            if hash_value:
                PAGE_TOKENS.record(hash_value, token_ids, self.page_size)
            return original(self, host_indices, token_ids, hash_value, *args, **kwargs)

        return wrapper

    def storage_hit_query(original):
        def wrapper(self, operation):
            result = original(self, operation)
            keys = getattr(operation, "all_hash_values", None)
            if keys:
                PAGE_TOKENS.record(keys, operation.token_ids, self.page_size)
            return result

        return wrapper

    for cls in (HiCacheController, HybridCacheController):
        _wrap(cls, "write_storage", write_storage)
        _wrap(cls, "_storage_hit_query", storage_hit_query)
