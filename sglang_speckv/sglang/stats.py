"""The backend's counters: what ``stats()``, the stats file and SGLang's storage metrics say.

Thread-safe (SGLang's threads count concurrently). The stats file (config ``stats_file``)
is rewritten atomically at most every STATS_FILE_INTERVAL_S and never lags the counters by
more than that: a write that comes too soon schedules one deferred write.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from typing import Callable

# Writes of the stats file are at least this far apart: a batch takes milliseconds, and
# readers (tests, tools, `speckv replay`) poll at about this rate.
STATS_FILE_INTERVAL_S = 1.0

# The counters ``snapshot`` always reports (0 until counted).
COUNTERS = (
    "pages_written", "pages_already_stored", "pages_with_tokens", "raw_bytes_written",
    "coded_bytes_written", "pages_read", "pages_missed", "verify_failures", "raw_bytes_read",
    "pages_recoded", "exists_queried", "exists_found", "encode_failures", "store_errors",
)


class Stats:
    """Counters, coder seconds and per-call samples for SGLang's metrics. ``extra()`` adds
    fields to every snapshot (the predictors, the store's occupancy)."""

    def __init__(self, path: str | None, extra: Callable[[], dict]):
        self.path = path
        self._extra = extra
        self._lock = threading.Lock()  # guards everything below
        self._counts: Counter = Counter()
        self._seconds: Counter = Counter()
        self._samples = {"prefetch_pgs": [], "backup_pgs": [], "prefetch_bandwidth": [], "backup_bandwidth": []}
        self._written = 0.0  # time.monotonic() of the last stats file write
        self._timer: threading.Timer | None = None  # a pending deferred write

    def add(self, **counts: int) -> None:
        with self._lock:
            self._counts.update(counts)
        self.write_file()

    def time(self, backup=None, prefetch=None, **seconds: float) -> None:
        """Coder seconds (``encode_s``, ``decode_s`` and the raw bytes they coded), and
        per-call samples ``backup`` / ``prefetch`` = (pages, raw bytes, elapsed s)."""
        with self._lock:
            self._seconds.update(seconds)
            for name, sample in (("backup", backup), ("prefetch", prefetch)):
                if sample and sample[0]:
                    pages, raw, elapsed = sample
                    self._samples[f"{name}_pgs"].append(pages)
                    self._samples[f"{name}_bandwidth"].append(raw / max(elapsed, 1e-9) / 1e9)

    def snapshot(self) -> dict:
        """Counters since start-up, ratios, coder throughput and ``extra()``."""
        with self._lock:
            c, s = dict(self._counts), dict(self._seconds)
        raw_w, coded_w = c.get("raw_bytes_written", 0), c.get("coded_bytes_written", 0)
        asked = c.get("pages_read", 0) + c.get("pages_missed", 0)
        return {
            **{k: c.get(k, 0) for k in COUNTERS},
            "compression_ratio": raw_w / coded_w if coded_w else None,
            "read_hit_rate": c.get("pages_read", 0) / asked if asked else None,
            "encode_GBps": s.get("encode_raw_bytes", 0) / s["encode_s"] / 1e9 if s.get("encode_s") else None,
            "decode_GBps": s.get("decode_raw_bytes", 0) / s["decode_s"] / 1e9 if s.get("decode_s") else None,
            **self._extra(),
        }

    def take_samples(self) -> dict[str, list]:
        """The per-call samples since the last call (SGLang's StorageMetrics fields)."""
        with self._lock:
            samples, self._samples = self._samples, {k: [] for k in self._samples}
        return samples

    def write_file(self, force: bool = False) -> None:
        """Rewrite the stats file: now if the last write is STATS_FILE_INTERVAL_S old (or
        ``force``), else once that interval is over (one pending timer at most)."""
        if not self.path:
            return
        with self._lock:
            wait = self._written + STATS_FILE_INTERVAL_S - time.monotonic()
            if wait > 0 and not force:
                if self._timer is None:
                    self._timer = threading.Timer(wait, self.write_file, kwargs={"force": True})
                    self._timer.daemon = True
                    self._timer.start()
                return
            self._written = time.monotonic()
            self._timer = None
        text = json.dumps(self.snapshot(), indent=1)
        tmp = f"{self.path}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, self.path)  # readers see the old or the new file, never half of one
        except OSError:  # a full or missing directory must not fail SGLang's call
            pass

    def close(self) -> None:
        """Cancel a pending write and write the final figures."""
        with self._lock:
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        self.write_file(force=True)
