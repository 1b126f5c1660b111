"""A tier on a Mooncake Store cluster: pages shared by every server configured with it.

Mooncake Store (https://github.com/kvcache-ai/Mooncake) is the distributed KV store SGLang's
own ``mooncake_store`` L3 backend uses: a master (``mooncake_master``) keeps the object
index, clients lend memory segments and move bytes over TCP or RDMA. This tier stores the
same thing the LMDB tiers store, one Mooncake object per page:

    object key   "speckv_" + namespace (16 hex) + "_" + SGLang's page key   (storage/keys.py)
    object value raw size u64 LE | parent length u16 LE | record header (24 B, storage/record.py)
                 | parent store key | value (the coded blob, as given)

so a page of another model, dtype, page size or calibration is never read as one's own (its
namespace differs, and its header checksum covers the full store key), and every read is
verified by the store exactly as for LMDB (anything wrong is a miss, and the object is
removed).

The store writes new pages through to this tier (storage/store.py): whatever one server
computes, every other server can restore. Mooncake evicts by itself (when its memory passes
``eviction_high_watermark_ratio``); an evicted page is a miss.

Failures never raise into the caller. At start-up an unreachable master or metadata server is
a StoreError naming ``tiers[i].master_address`` / ``metadata_server``, or, with
``on_unreachable = "degraded"``, a warning and a tier that answers "miss" until it connects.
At run time a failed call (the master gone, a timeout) is a miss or a failed write, logged
once per incident; the tier then stops calling Mooncake (calls to a dead master block ~4 s)
and a background thread probes the master with exponential backoff (1 s to 30 s), connects
the client if it never was, and logs once when the cluster is back. The Mooncake client
itself re-registers with a restarted master; pages the old master indexed are gone (misses).
"""

from __future__ import annotations

import logging
import re
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

from .env import StoreError
from .tier import Page

logger = logging.getLogger(__name__)

INSTALL_HINT = ("pip install mooncake-transfer-engine-non-cuda==0.3.13.post1 (CPU machines; "
                "mooncake-transfer-engine on CUDA ones) and apt-get install libibverbs1, or "
                "run examples/install.sh")
_PREFIX = struct.Struct("<QH")  # raw size, parent key length; then header, parent, value
_HEADER_SIZE = 24  # storage/record.py
_PROBE_KEY = "speckv_probe"
_CONNECT_TIMEOUT_S = 2.0
_BACKOFF_MIN_S, _BACKOFF_MAX_S = 1.0, 30.0
# Mooncake's result code for "could not talk to the master" (RPC_FAIL): the tier goes down
# until a probe succeeds. Other negative codes (e.g. -600: the batch did not fit the
# client's transfer buffer) fail one call.
_UNREACHABLE = {-900}
# One put or get call moves at most this share of local_buffer_size: SGLang's threads call
# concurrently, and each call stages its bytes in that buffer.
_BATCH_SHARE = 0.5
_FAILURE_LOG_S = 60.0  # other failed calls: at most one log line per this many seconds


def object_key(skey: bytes) -> str:
    """The Mooncake key of a store key (namespace || SGLang's page key, storage/keys.py)."""
    return f"speckv_{skey[:8].hex()}_{skey[8:].decode()}"


def _reachable_tcp(address: str) -> str | None:
    """None if ``host:port`` accepts a TCP connection, else why not."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=_CONNECT_TIMEOUT_S):
            return None
    except (OSError, ValueError) as e:
        return str(e)


def _reachable_http(url: str) -> str | None:
    """None if ``url`` answers HTTP at all (the metadata server says 404 for unknown keys)."""
    try:
        urllib.request.urlopen(url, timeout=_CONNECT_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return None
    except (OSError, ValueError) as e:
        return str(e)
    return None


def cluster_metrics(url: str) -> dict | None:
    """Occupancy of the whole cluster (every namespace and user) from the master's metrics
    page, or None if it cannot be read."""
    try:
        with urllib.request.urlopen(url, timeout=_CONNECT_TIMEOUT_S) as r:
            text = r.read().decode()
    except (OSError, ValueError):
        return None
    names = {"master_allocated_bytes": "cluster_bytes", "master_total_capacity_bytes":
             "cluster_capacity", "master_key_count": "cluster_objects",
             "master_evicted_key_count": "cluster_evicted_objects"}
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in names:
            out[names[name]] = int(float(value))
    return out


class MooncakeTier:
    """The tier, connected in this process. ``config`` is a TierConfig of kind 'mooncake',
    ``index`` its position in ``tiers`` (for error messages)."""

    def __init__(self, config, index: int) -> None:
        self.config = config
        self.name: str = config.name
        self.capacity: int = config.capacity
        self.where = f"tiers[{index}]"
        try:
            from mooncake.store import MooncakeDistributedStore
        except ImportError as e:  # the wheel, or its shared libraries
            raise StoreError(f"{self.where}.kind: 'mooncake' needs the Mooncake client, which "
                             f"does not import here ({e}): {INSTALL_HINT}") from None
        self._client = MooncakeDistributedStore()
        self._lock = threading.Lock()  # guards the state below
        self._set_up = False
        self._up = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._batch_bytes = max(1, int(config.local_buffer_size * _BATCH_SHARE))
        self._last_failure_log = -_FAILURE_LOG_S
        self._largest = 1 << 20  # bytes of the largest object seen: sizes read batches
        problem = self._unreachable()
        if problem is None:
            problem = self._setup()
        if problem is None:
            self._up = True
            return
        if config.on_unreachable == "error":
            self.close()
            raise StoreError(f"{problem}; start the cluster, fix the address, or set "
                             f"{self.where}.on_unreachable = \"degraded\" to start without it")
        logger.warning("speckv store: tier %r starts degraded (misses until the cluster is "
                       "reachable): %s", self.name, problem)
        self._go_down()

    # --- the tier API (storage/store.py) ---------------------------------------------------

    def present(self, skeys: Sequence[bytes]) -> list[bool]:
        if not skeys or not self._up:
            return [False] * len(skeys)
        found = self._call("exists", self._client.batch_is_exist, [object_key(k) for k in skeys])
        if found is None or any(f < 0 for f in found):
            self._incident("exists", None if found is None else min(found))
            return [False] * len(skeys)
        return [f == 1 for f in found]

    def read(self, skeys: Sequence[bytes], out: Sequence | None = None) -> list[Page | None]:
        """Pages under ``skeys`` (None: absent, evicted, unreachable, or too short to parse),
        values copied into ``out[i]`` as storage/tier.py's ``read`` does. Not verified."""
        if not skeys or not self._up:
            return [None] * len(skeys)
        keys = [object_key(k) for k in skeys]
        objects: list = []
        per_call = max(1, self._batch_bytes // self._largest)
        for start in range(0, len(keys), per_call):
            got = self._call("get", self._client.get_batch, keys[start:start + per_call])
            if got is None or len(got) != len(keys[start:start + per_call]):
                self._incident("get", None)
                return [None] * len(skeys)
            objects.extend(got)
        if len(keys) > 1:  # b"" is absent, evicted, or did not fit the buffer: ask alone
            for i, obj in enumerate(objects):
                if not obj:
                    objects[i] = (self._call("get", self._client.get_batch, [keys[i]]) or [b""])[0]
        self._largest = max(self._largest, *(len(o) for o in objects))
        pages: list[Page | None] = []
        for i, (skey, obj) in enumerate(zip(skeys, objects)):
            page = self._parse(skey, obj, None if out is None else out[i])
            pages.append(page)
        return pages

    def write(self, pages: Sequence[Page]) -> list[bool]:
        """Store ``pages`` (one batch); per page, True iff stored."""
        if not pages or not self._up:
            return [False] * len(pages)
        keys = [object_key(p.key) for p in pages]
        values = []
        for page in pages:
            parent = page.parent or b""
            values.append(b"".join((_PREFIX.pack(page.raw_size, len(parent)), page.header,
                                    parent, memoryview(page.value).cast("B"))))
        self._largest = max(self._largest, *(len(v) for v in values))
        stored = [False] * len(pages)
        start = 0
        while start < len(pages) and self._up:
            end, size = start + 1, len(values[start])  # at least one page per call
            while end < len(pages) and size + len(values[end]) <= self._batch_bytes:
                size += len(values[end])
                end += 1
            rc = self._call("put", self._client.put_batch, keys[start:end], values[start:end])
            if rc == 0:
                stored[start:end] = [True] * (end - start)
            else:
                self._incident("put", rc)
            start = end
        return stored

    def remove(self, skeys: Sequence[bytes]) -> None:
        if skeys and self._up:
            self._call("remove", self._client.batch_remove, [object_key(k) for k in skeys], True)

    def remove_namespace(self, namespace: bytes) -> None:
        """Remove every page of ``namespace`` from the cluster."""
        if self._up:
            self._call("remove", self._client.remove_by_regex,
                       f"^speckv_{re.escape(namespace.hex())}_", True)

    def counters(self) -> dict:
        """The cluster's occupancy (all namespaces) if ``metrics_url`` is set and answers."""
        metrics = cluster_metrics(self.config.metrics_url) if self.config.metrics_url and self._up else None
        return {"reachable": self._up, **(metrics or {})}

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            set_up, self._set_up, self._up = self._set_up, False, False
        self._wake.set()
        if set_up:
            try:
                self._client.close()
            except Exception as e:  # closing a client whose master is gone: nothing to do
                logger.warning("speckv store: closing the Mooncake client of tier %r: %s", self.name, e)

    # --- internals -------------------------------------------------------------------------

    @staticmethod
    def _parse(skey: bytes, obj, buffer) -> Page | None:
        if not obj or len(obj) < _PREFIX.size + _HEADER_SIZE:
            return None  # b"": absent or evicted
        raw_size, parent_len = _PREFIX.unpack_from(obj)
        start = _PREFIX.size + _HEADER_SIZE + parent_len
        if len(obj) < start:
            return None
        header = bytes(obj[_PREFIX.size:_PREFIX.size + _HEADER_SIZE])
        parent = bytes(obj[_PREFIX.size + _HEADER_SIZE:start]) or None
        value = memoryview(obj)[start:]
        if buffer is None:
            value = bytearray(value)
        else:
            target = memoryview(buffer).cast("B")
            if len(value) > len(target):
                return None
            target[:len(value)] = value
            value = target[:len(value)]
        return Page(skey, header, value, raw_size, parent)

    def _unreachable(self) -> str | None:
        """Why the cluster cannot be reached now (naming the setting), or None."""
        why = _reachable_tcp(self.config.master_address)
        if why is not None:
            return (f"{self.where}.master_address: no Mooncake master answers at "
                    f"{self.config.master_address!r} ({why})")
        why = _reachable_http(self.config.metadata_server)
        if why is not None:
            return (f"{self.where}.metadata_server: no metadata server answers at "
                    f"{self.config.metadata_server!r} ({why})")
        return None

    def _setup(self) -> str | None:
        c = self.config
        try:
            rc = self._client.setup(c.local_hostname, c.metadata_server, c.global_segment_size,
                                    c.local_buffer_size, c.protocol, "", c.master_address)
        except Exception as e:  # the binding raises on bad arguments
            rc = str(e)
        if rc != 0:
            return (f"{self.where}: the Mooncake client did not connect (setup returned {rc}; "
                    f"master_address {c.master_address!r}, metadata_server "
                    f"{c.metadata_server!r}, local_hostname {c.local_hostname!r}, protocol "
                    f"{c.protocol!r})")
        with self._lock:
            self._set_up = True
        return None

    def _call(self, what: str, fn, *args):
        try:
            return fn(*args)
        except Exception as e:  # whatever the binding raises is a failed call, never the caller's
            logger.debug("speckv store: Mooncake %s raised %r", what, e)
            return None

    def _incident(self, what: str, rc) -> None:
        """A failed call: log it unless the tier is already down, and go down if the cluster
        is unreachable (or the call raised)."""
        if rc is not None and rc not in _UNREACHABLE:
            now = time.monotonic()
            if now - self._last_failure_log >= _FAILURE_LOG_S:  # one line per burst
                self._last_failure_log = now
                logger.warning("speckv store: Mooncake %s on tier %r failed (code %s; -600: "
                               "the batch did not fit local_buffer_size); pages not stored or "
                               "read are misses", what, self.name, rc)
            return
        with self._lock:
            was_up, self._up = self._up, False
        if was_up:
            logger.error("speckv store: tier %r unreachable (Mooncake %s returned %s); misses "
                         "until it is back", self.name, what, rc)
            self._go_down()

    def _go_down(self) -> None:
        with self._lock:
            self._up = False
            if self._closed or (self._thread is not None and self._thread.is_alive()):
                return
            self._thread = threading.Thread(target=self._reconnect, daemon=True,
                                            name=f"speckv-mooncake-{self.name}")
            self._thread.start()

    def _reconnect(self) -> None:
        """Probe with exponential backoff until the cluster answers; then the tier is up."""
        delay = _BACKOFF_MIN_S
        while not self._wake.wait(delay):
            with self._lock:
                set_up = self._set_up
            problem = self._unreachable()
            if problem is None and not set_up:
                problem = self._setup()
            if problem is None:
                found = self._call("exists", self._client.batch_is_exist, [_PROBE_KEY])
                if found is not None and found[0] >= 0:
                    with self._lock:
                        if self._closed:
                            return
                        self._up = True
                    logger.warning("speckv store: tier %r is reachable again", self.name)
                    return
            delay = min(delay * 2, _BACKOFF_MAX_S)
