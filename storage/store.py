"""The tiered page store: what the backend calls.

    store = TieredStore(load_config(path), namespace(model, kv_dtype=..., ...))
    store.put(keys, blobs, raw_sizes, parents=chain_parents(keys, prefix_keys[-1]))
    n = store.exists_prefix(keys)         # SGLang's batch_exists
    blobs = store.get(keys[:n], out=bufs)  # memoryviews into bufs (or new bytearrays), None: miss
    store.stats()                         # dict: occupancy and events per tier
    store.close()

Values are opaque (coded blobs); the store keeps a checksummed header with each
(storage/record.py) and hands back only values that verify. Pages are namespaced
(storage/keys.py), so servers with different models or shards can share the tiers.

Tiers (storage/tier.py), fastest first. New pages land in the first tier, in one
transaction per ``put``. A tier over capacity evicts its coldest chain tails; they move to
the next tier (re-coded by that tier's ``recode`` hook, if set) or, from the last tier, are
dropped. A read finds a page in whichever tier holds it; with ``promote_on_hit`` a page
found below the first tier moves back up: opportunistically, the first pages of the read
first, at most a quarter of the first tier's capacity per read (at least one page), and
never growing the first tier's file past its soft bound (storage/env.py); a page that does
not fit stays where it was read. Moves copy first and delete second, so a crash
or a full destination can leave a page in two tiers, never in none, with any number of
processes: a demotion's dry run finds what a commit will evict, they are copied down, and
the commit may evict only those that landed (``_move``); a promotion writes the page into
the first tier and then removes it below only if no writer has touched it there since
(``_promote``).

Damage never escapes as an exception: LMDB errors and records that do not parse become
misses and failed writes (logged), bookkeeping records are repaired in place (counted as
``damaged``), and a tier whose file fails the open-time check is moved aside
(storage/env.py).

Recency is kept in LMDB (shared by all processes), but a read does not write: accesses are
remembered in memory and written with this process's next write to that tier, or by a read
once ``recency_flush_seconds`` have passed since the last flush. The LRU order therefore
lags reads by at most that long (or until the process next writes); accesses not yet flushed
when a process dies are forgotten. Both only make eviction slightly less exact.

A last tier of kind "mooncake" (storage/mooncake.py) is a cluster shared by several servers:
new pages are written through to it as well as into the first local tier (or only to it,
when it is the only tier); a read goes to it for pages no local tier holds, and a hit there
is copied into the first tier with ``promote_on_hit`` (the cluster keeps its copy). It never
takes demotions (it already holds what was written) and evicts by itself.

Thread-safe: SGLang's backup, prefetch and prefetch-I/O threads may share one store, and
several processes may open the same tiers (storage/env.py).

Event counters (hits, misses, corrupt, damaged, promotions, demotions, evictions) count what this
process did since it opened the store; occupancy (pages, bytes, raw bytes) is read from the
tiers and covers every process and namespace sharing them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence

import lmdb

from . import record
from .env import NoRoom
from .keys import store_key
from .mooncake import MooncakeTier
from .tier import Page, Tier

logger = logging.getLogger(__name__)

_LEAVES_PREFIX = 8  # bytes the leaves index puts before a store key (storage/tier.py)
_MAX_STORE_KEY = 511  # LMDB's default key limit, kept for every kind: a key fits any tier
_CLEAR_BATCH = 1024  # pages removed per transaction by clear(): bounds one txn's dirty pages
# Plan-copy-commit rounds of one write: one, unless another process changed the tier between
# a dry run and its commit, or a batch is larger than the tier.
_ROUNDS = 4
_NO_LIMIT = 1 << 62  # a byte limit no tier reaches: a commit that evicts nothing
# One read promotes at most 1/PROMOTE_SHARE of the first tier's capacity (and at least one
# page): promotions land before the first tier evicts, so they are what it holds over its
# capacity, and a read of a long prefix would otherwise move all of it into a small tier.
PROMOTE_SHARE = 4
# What a store operation survives as a miss or a failed write, logged: LMDB's errors (e.g. a
# damaged file, EIO), a full filesystem, a record that does not parse.
_FAILURES = (lmdb.Error, NoRoom, struct.error)
EVENTS = ("hits", "misses", "corrupt", "damaged", "promotions", "demotions", "evictions")


def chain_parents(keys: Sequence[str], prefix_key: str | None = None) -> list[str | None]:
    """Parents for consecutive pages of one chain: the page before ``keys[0]`` (SGLang's
    ``extra_info.prefix_keys[-1]``, None if unknown), then each key's predecessor."""
    return [prefix_key, *keys[:-1]] if keys else []


class TieredStore:
    """The store. ``config`` is a ``sglang_speckv.config.Config``; ``namespace`` comes from
    storage/keys.py. Raises StoreError (naming the bad ``tiers[i]`` field) when a tier
    cannot be opened."""

    def __init__(self, config, namespace: bytes = b"") -> None:
        self.config = config
        self.namespace = namespace
        self.tiers: list[Tier] = []  # the local (LMDB) tiers
        self.remote: MooncakeTier | None = None  # a last tier of kind "mooncake"
        self._open()
        self._max_key = _MAX_STORE_KEY - _LEAVES_PREFIX

    def _open(self) -> None:
        """Open the tiers in this process, with fresh in-memory state."""
        self._pid = os.getpid()
        self._lock = threading.Lock()  # guards _pending and _events
        self._pending: list[dict[bytes, None]] = [{} for _ in self.config.tiers]  # ordered sets
        self._events: list[Counter] = [Counter() for _ in self.config.tiers]
        self._last_flush = time.monotonic()
        hooks = {tier.name: tier.recode for tier in self.tiers}
        self.tiers = []
        try:
            for index, tier_config in enumerate(self.config.tiers):
                if tier_config.kind == "mooncake":  # the last (config.py checks)
                    self.remote = MooncakeTier(tier_config, index)
                    continue
                self.tiers.append(Tier(tier_config, index))
                self.tiers[-1].recode = hooks.get(tier_config.name)
        except BaseException:
            self.close()
            raise

    def _in_this_process(self) -> None:
        """After a fork, reopen the tiers: the parent's environments are not usable here
        (storage/env.py closes them in the child)."""
        if self._pid != os.getpid():
            self._open()

    def __enter__(self) -> TieredStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the API ---------------------------------------------------------------------------

    def put(
        self,
        keys: Sequence[str],
        values: Sequence,
        raw_sizes: Sequence[int] | None = None,
        parents: Sequence[str | None] | None = None,
    ) -> list[bool]:
        """Store ``values[i]`` (any C-contiguous buffer: bytes, bytearray, memoryview, numpy
        array) under ``keys[i]``, all new pages in one transaction
        of the first tier. ``raw_sizes[i]``: the page's size before coding (stats; default:
        the value's size). ``parents[i]``: the key of the page before ``keys[i]`` in its
        prefix chain (see ``chain_parents``), which lets eviction take tails first.

        A key already stored in any tier is not rewritten; it counts as an access. Returns,
        per key, True iff the page is stored; all False for the new pages when even
        evicting cannot make room on the filesystem."""
        self._in_this_process()
        n = len(keys)
        raw_sizes = raw_sizes if raw_sizes is not None else [memoryview(v).nbytes for v in values]
        parents = parents if parents is not None else [None] * n
        if not len(values) == len(raw_sizes) == len(parents) == n:
            raise ValueError(f"put: {n} keys, {len(values)} values, {len(raw_sizes)} raw sizes, "
                             f"{len(parents)} parents")
        skeys = [self._key(k) for k in keys]
        sparents = [None if p is None else self._key(p) for p in parents]
        # Parents outside the batch: the chain the batch continues is in use, wherever it is.
        batch = set(skeys)
        outside = list(dict.fromkeys(p for p in sparents if p is not None and p not in batch))
        where = self._locate(skeys + outside)
        for key, tier in zip(skeys + outside, where):
            if tier is not None:
                self._note_access(tier, key)
        new = [i for i in range(n) if where[i] is None]
        pages = []
        for i in new:
            value = memoryview(values[i]).cast("B")
            pages.append(Page(skeys[i], record.seal(skeys[i], value), value, int(raw_sizes[i]),
                              sparents[i]))
        stored = self._commit(0, inserts=pages) if pages and self.tiers else [False] * len(pages)
        if self.remote is not None and pages:  # write-through, of the pages it lacks
            there = self.remote.present([page.key for page in pages])
            absent = [j for j, p in enumerate(there) if not p]
            for j, ok in zip(absent, self.remote.write([pages[j] for j in absent])):
                there[j] = ok
            stored = [a or b for a, b in zip(stored, there)]
        result = [True] * n
        for i, ok in zip(new, stored):
            result[i] = ok
        if self.tiers and not all(stored):
            logger.warning("speckv store: no room for %d new pages in tier %r (filesystem full)",
                           len(pages), self.tiers[0].name)
        return result

    def get(self, keys: Sequence[str], out: Sequence | None = None) -> list:
        """The verified value under each key, or None (absent, or failed verification: the
        bad page is deleted and counted as ``corrupt``). Values are copied into ``out[i]``
        when given (writable buffers, e.g. numpy arrays, reused across calls: no allocation)
        and returned as memoryviews of their first bytes; else into new bytearrays. A value
        larger than its buffer is a miss (and stays stored)."""
        self._in_this_process()
        skeys = [self._key(k) for k in keys]
        values: list = [None] * len(keys)
        todo = list(range(len(keys)))
        below: list[tuple[int, int, Page]] = []  # (key index, tier, page) to promote
        for t, tier in enumerate(self.tiers):
            if not todo:
                break
            missing, corrupt = [], []
            buffers = None if out is None else [out[i] for i in todo]
            for i, found in zip(todo, self._read(tier, [skeys[i] for i in todo], buffers)):
                if found is None:
                    missing.append(i)
                elif not record.verify(skeys[i], found.header, found.value):
                    missing.append(i)
                    corrupt.append(skeys[i])
                else:
                    values[i] = found.value
                    if t > 0 and self.config.promote_on_hit:
                        below.append((i, t, found))
                    else:
                        self._note_access(t, skeys[i])
            self._count(t, hits=len(todo) - len(missing), misses=len(missing), corrupt=len(corrupt))
            if corrupt:
                logger.warning("speckv store: %d corrupt pages in tier %r deleted (first key %s)",
                               len(corrupt), tier.name, corrupt[0].hex())
                self._commit(t, removes=corrupt)
            todo = missing
        if todo and self.remote is not None:
            below += self._read_remote(todo, skeys, values, out)
        if below:
            self._promote_some(below)
        if time.monotonic() - self._last_flush >= self.config.recency_flush_seconds:
            self.flush()
        return values

    def exists_prefix(self, keys: Sequence[str]) -> int:
        """How many of ``keys``, from the first, are stored (in any tier) without a gap."""
        self._in_this_process()
        skeys = [self._key(k) for k in keys]
        present = [False] * len(keys)
        for tier in [*self.tiers, *([self.remote] if self.remote is not None else [])]:
            todo = [i for i, p in enumerate(present) if not p]
            if not todo:
                break
            for i, p in zip(todo, self._present(tier, [skeys[i] for i in todo])):
                present[i] = p
        return next((i for i, p in enumerate(present) if not p), len(keys))

    def clear(self) -> None:
        """Remove every page of this store's namespace from every tier."""
        self._in_this_process()
        for t, tier in enumerate(self.tiers):
            try:
                keys = tier.keys_with_prefix(self.namespace)
            except _FAILURES as e:
                logger.error("speckv store: reading tier %r failed: %s", tier.name, e)
                keys = []
            for start in range(0, len(keys), _CLEAR_BATCH):
                self._commit(t, removes=keys[start:start + _CLEAR_BATCH])
            with self._lock:
                self._pending[t].clear()
        if self.remote is not None:
            self.remote.remove_namespace(self.namespace)

    def flush(self) -> None:
        """Write the accesses remembered in memory into each tier's LRU order."""
        self._in_this_process()
        self._last_flush = time.monotonic()
        for t in range(len(self.tiers)):
            if self._pending[t]:
                self._commit(t)

    def set_recode(self, tier_name: str, recode: Callable[[memoryview], bytes] | None) -> None:
        """Hook for pages moving into tier ``tier_name``: their value becomes ``recode(value)``
        (e.g. re-coded with the tier's stronger ``predictor``). If it raises, the page moves
        unchanged (and the error is logged)."""
        self._in_this_process()
        for tier in self.tiers:
            if tier.name == tier_name:
                tier.recode = recode
                return
        raise ValueError(f"no tier named {tier_name!r} (tiers: {[t.name for t in self.tiers]})")

    def stats(self) -> dict:
        """Per tier: occupancy (pages, bytes with headers, raw bytes) read from the tier, for
        all processes, and this process's events: ``hits`` and ``misses`` of lookups in that
        tier, ``corrupt`` pages found, ``damaged`` bookkeeping records repaired or dropped,
        ``promotions`` out of it, ``demotions`` to the next
        tier, ``evictions`` out of the store. Top level: keys found in some tier (``hits``)
        and in none (``misses``)."""
        self._in_this_process()
        with self._lock:
            events = [dict(e) for e in self._events]
        tiers = []
        for tier, counted in zip(self.tiers, events):
            try:
                counters = tier.counters()
            except _FAILURES as e:
                logger.error("speckv store: reading tier %r failed: %s", tier.name, e)
                counters = {"pages": 0, "bytes": 0, "raw_bytes": 0}
            tiers.append({
                "name": tier.name, "path": tier.config.path, "capacity": tier.capacity,
                "pages": counters["pages"], "bytes": counters["bytes"],
                "raw_bytes": counters["raw_bytes"],
                **{event: counted.get(event, 0) for event in EVENTS},
            })
        if self.remote is not None:
            counted = events[len(self.tiers)]
            tiers.append({"name": self.remote.name, "kind": "mooncake",
                          "master_address": self.remote.config.master_address,
                          "capacity": self.remote.capacity, **self.remote.counters(),
                          **{event: counted.get(event, 0) for event in EVENTS}})
        hits = sum(t["hits"] for t in tiers)
        return {"tiers": tiers, "hits": hits, "misses": tiers[-1]["misses"] if tiers else 0}

    def close(self) -> None:
        """Flush remembered accesses and release the tiers. Idempotent."""
        if self._pid != os.getpid():
            self.tiers = []  # a parent's, inherited through fork: closed by storage/env.py
            self.remote = None  # the parent's client: its connections belong to the parent
            return
        if self.tiers:
            self.flush()
        while self.tiers:
            self.tiers.pop().close()
        if self.remote is not None:
            self.remote.close()
            self.remote = None

    # --- internals -----------------------------------------------------------------------

    def _key(self, key: str) -> bytes:
        skey = store_key(self.namespace, key)
        if len(skey) > self._max_key:
            raise ValueError(f"key of {len(skey)} bytes with its namespace; the store takes "
                             f"at most {self._max_key}")
        return skey

    def _locate(self, skeys: list[bytes]) -> list[int | None]:
        """Index of the first tier holding each key, or None."""
        where: list[int | None] = [None] * len(skeys)
        for t, tier in enumerate(self.tiers):
            todo = [i for i, w in enumerate(where) if w is None]
            if not todo:
                break
            for i, p in zip(todo, self._present(tier, [skeys[i] for i in todo])):
                if p:
                    where[i] = t
        return where

    @staticmethod
    def _read(tier: Tier, skeys: list[bytes], out: list | None) -> list:
        try:
            return tier.read(skeys, out)
        except _FAILURES as e:  # a damaged tier: its pages are misses
            logger.error("speckv store: reading tier %r failed: %s", tier.name, e)
            return [None] * len(skeys)

    @staticmethod
    def _present(tier: Tier, skeys: list[bytes]) -> list[bool]:
        try:
            return tier.present(skeys)
        except _FAILURES as e:
            logger.error("speckv store: reading tier %r failed: %s", tier.name, e)
            return [False] * len(skeys)

    def _note_access(self, t: int, skey: bytes) -> None:
        with self._lock:
            self._pending[t].pop(skey, None)
            self._pending[t][skey] = None  # now the most recent

    def _count(self, t: int, **events: int) -> None:
        with self._lock:
            self._events[t].update(events)

    def _commit(self, t: int, inserts: Sequence[Page] = (), removes: Sequence[bytes] = (),
                promoted: Sequence[tuple[bytes, int | None]] = (), evict: bool = True,
                opportunistic: bool = False) -> list[bool]:
        """Write transactions on tier t (with the accesses remembered for it): see ``_move``.
        A full filesystem makes room by evicting twice the batch's bytes and retries once; a
        failure to write (a full or failing disk, a damaged file) is logged and reported as
        False for every insert. ``evict=False``: commit without evicting (the tier may stay
        over its capacity until its next commit). ``opportunistic`` (promotions): never grow
        the file past its soft bound and never make room: a full file fails the inserts at
        once (logged at debug level only: the pages are stored elsewhere)."""
        with self._lock:
            touches = list(self._pending[t])
            self._pending[t].clear()
        tier = self.tiers[t]
        try:
            try:
                return self._move(t, inserts, touches, removes, promoted=promoted,
                                  limit=None if evict else _NO_LIMIT, opportunistic=opportunistic)
            except NoRoom:
                if not inserts or opportunistic:
                    raise
            # The file cannot grow: free twice the bytes the batch needs (a value needs a run
            # of free pages, and LMDB takes the single pages of B-tree updates out of such
            # runs), then try once more. LMDB reuses pages freed by transaction N from
            # transaction N+2 on: one more commit in between.
            need = 2 * sum(len(page.value) + record.HEADER_SIZE for page in inserts)
            limit = max(0, tier.counters()["bytes"] - need)
            self._move(t, limit=limit)
            self._move(t, limit=limit)
            return self._move(t, inserts)
        except NoRoom as e:
            logger.log(logging.DEBUG if opportunistic else logging.WARNING,
                       "speckv store: no room in tier %r: %s", tier.name, e)
        except _FAILURES as e:
            logger.error("speckv store: writing to tier %r failed: %s", tier.name, e)
        return [False] * len(inserts)

    def _move(self, t: int, inserts: Sequence[Page] = (), touches: Sequence[bytes] = (),
              removes: Sequence[bytes] = (), limit: int | None = None,
              promoted: Sequence[tuple[bytes, int | None]] = (),
              opportunistic: bool = False) -> list[bool]:
        """Commit inserts, touches and removes (and ``promoted``: see ``_promote``) on tier
        t, evicting down to ``limit`` (default: its capacity); ``opportunistic``: see
        ``_commit``. Copies first, deletes second:
        a dry run (``plan``) finds the victims, they are written to tier t+1 (recursively),
        and only then may the commit remove them from tier t (``movable``): those tier t+1
        stored, and those that failed verification (not carried down). A victim tier t+1
        refuses (its filesystem full, a failing disk) stays in tier t, which then stays over
        the limit (within its file's bounds, storage/env.py) until tier t+1 takes it. If other
        processes changed the tier meanwhile, the commit evicts no page it was not told
        about and stays over the limit; another round (plan, copy, commit) follows. The last
        tier drops its victims."""
        tier, above = self.tiers[t], self.tiers[:t]
        last = t == len(self.tiers) - 1
        stored = None
        for _ in range(_ROUNDS):
            movable, copied, refused = None, set(), 0
            if not last:
                planned = tier.plan(touches, removes, inserts, above, limit, promoted)
                movable = set()
                if planned:
                    # Hottest first: commit() gives its first insert the newest tick.
                    down = self._recoded(t, planned[::-1])
                    copied = {p.key for p, ok in zip(down, self._commit(t + 1, inserts=down)) if ok}
                    corrupt = {p.key for p in planned} - {p.key for p in down}
                    movable = copied | corrupt
                    refused = len(planned) - len(movable)
                    if refused:
                        logger.warning("speckv store: tier %r took %d of %d pages demoted from "
                                       "tier %r; the rest stay there, over its capacity",
                                       self.tiers[t + 1].name, len(copied), len(down), tier.name)
            done = tier.commit(inserts, touches, removes, above=above, movable=movable,
                               limit=limit, promoted=promoted, opportunistic=opportunistic)
            if stored is None:
                stored = done.stored
            demoted = sum(page.key in copied for page in done.victims)
            self._count(t, demotions=demoted, evictions=len(done.victims) - demoted,
                        damaged=done.damaged)
            if done.damaged:
                logger.warning("speckv store: %d damaged bookkeeping records in tier %r "
                               "repaired or dropped", done.damaged, tier.name)
            if not done.over or last or refused:  # refused: the next write tries again
                if done.over and last:
                    logger.error("speckv store: eviction in tier %r stopped over its capacity "
                                 "(damaged index?); `speckv store --check` audits it", tier.name)
                break
            inserts = touches = removes = promoted = ()
        return stored

    def _read_remote(self, todo: list[int], skeys: list[bytes], values: list,
                     out) -> list[tuple[int, int, Page]]:
        """``get`` for the keys no local tier holds: from the cluster, verified. Returns the
        hits to copy into the first tier (with ``promote_on_hit``: ``_promote_some``)."""
        t = len(self.tiers)  # the remote's index in config.tiers and _events
        buffers = None if out is None else [out[i] for i in todo]
        corrupt, copy = [], []
        for i, found in zip(todo, self.remote.read([skeys[i] for i in todo], buffers)):
            if found is None:
                continue
            if not record.verify(skeys[i], found.header, found.value):
                corrupt.append(skeys[i])
                continue
            values[i] = found.value
            copy.append((i, t, found))
        hits = len(copy)
        self._count(t, hits=hits, misses=len(todo) - hits, corrupt=len(corrupt))
        if corrupt:
            logger.warning("speckv store: %d corrupt pages in tier %r removed (first key %s)",
                           len(corrupt), self.remote.name, corrupt[0].hex())
            self.remote.remove(corrupt)
        if not (self.tiers and self.config.promote_on_hit):
            return []
        return copy

    def _promote_some(self, found: list[tuple[int, int, Page]]) -> None:
        """Promote hits below the first tier (``found``: key index in the read, tier index,
        page; the cluster's index for a mooncake tier's hits), opportunistically: the first
        pages of the read first, while they fit in a 1/PROMOTE_SHARE share of the first
        tier's capacity (the first page always, if it fits in the capacity). The first pages
        of a prefix are the ones every request extending it reads, and the first tier evicts
        chain tails first, so they are the pages it would keep; the next read of the prefix
        promotes the next share. The others stay where they were read, an access there."""
        capacity = self.tiers[0].capacity
        budget = capacity // PROMOTE_SHARE
        found = sorted(found, key=lambda f: f[0])
        chosen: dict[int, list[Page]] = {}
        n = 0  # the first n are promoted
        for _, t, page in found:
            size = len(page.value) + record.HEADER_SIZE
            if size > budget and (n or size > capacity):
                break
            budget -= size
            n += 1
            chosen.setdefault(t, []).append(page)
        for _, t, page in found[n:]:
            if t < len(self.tiers):
                self._note_access(t, page.key)
        for t, pages in sorted(chosen.items()):
            if t < len(self.tiers):
                self._promote(t, pages)
            else:
                # Copied, not moved: the cluster's copy serves the other servers. The values
                # may live in the caller's buffers: the commit copies them into LMDB first.
                stored = self._commit(0, inserts=pages, opportunistic=True)
                self._count(t, promotions=sum(stored))

    def _promote(self, t: int, pages: list[Page]) -> None:
        """Move ``pages`` (read from tier t, with their ticks there) to the first tier, copy
        first and delete second. (1) They are committed to the first tier without evicting
        and without growing its file past the soft bound (a full file fails them at once,
        without making room: they stay in tier t, as read). (2) Those it stored are removed from tier t, each only if its tick there is
        still the one read: a demotion of the page out of the first tier meanwhile (any
        process) copies it back to the next tier first, which touches it if it is still
        there, and then counts on that copy. (3) The first tier evicts down to its capacity
        (demoting into tiers that no longer hold the promoted copies, so they do not crowd
        them). A crash between steps leaves a page in two tiers (reads take the first, the
        lower copy ages out) or the first tier over capacity until its next commit, never a
        page in no tier. This process's pending accesses to these pages in tier t are
        dropped: they would change the tick, and the page is leaving."""
        with self._lock:
            for page in pages:
                self._pending[t].pop(page.key, None)
        stored = self._commit(0, inserts=pages, evict=False, opportunistic=True)
        up = [(page.key, page.tick) for page, ok in zip(pages, stored) if ok]
        if up:
            self._commit(t, promoted=up)
            self._commit(0, opportunistic=True)
        for page, ok in zip(pages, stored):
            if not ok:  # still in tier t, and just read there
                self._note_access(t, page.key)
        self._count(t, promotions=len(up))

    def _recoded(self, t: int, pages: list[Page]) -> list[Page]:
        """``pages`` leaving tier t, re-coded for tier t+1 if it has a hook."""
        tier = self.tiers[t + 1]
        if tier.recode is None:
            return pages
        out = []
        for page in pages:
            if not record.verify(page.key, page.header, page.value):
                self._count(t, corrupt=1)  # dropped rather than carried down
                continue
            try:
                new_value = tier.recode(memoryview(page.value))
            except Exception:  # a hook's failure must not fail the write that evicted the page
                logger.exception("speckv store: re-coding a page for tier %r failed; "
                                 "moving it unchanged", tier.name)
                out.append(page)
                continue
            out.append(page._replace(header=record.seal(page.key, new_value), value=new_value))
        return out


def store_command(parser: argparse.ArgumentParser):
    """``speckv store [--config FILE] [--check]``: each tier's occupancy as JSON (every
    namespace; a mooncake tier: the whole cluster's, from its ``metrics_url``, if it answers);
    ``--check`` first verifies each local tier's LMDB file in a child process (a damaged one
    is reported, exit 1, and left in place), then audits every tier's indexes and counters
    against its pages and exits 1 if any is inconsistent."""
    parser.add_argument("--config", help="TOML file (default: the built-in defaults)")
    parser.add_argument("--check", action="store_true", help="audit each tier (reads all of it)")

    def run(args: argparse.Namespace) -> int:
        from sglang_speckv.config import ConfigError, load_config

        from .env import StoreError, verify_env

        try:
            config = load_config(args.config)
        except ConfigError as e:
            print(f"speckv store: {e}", file=sys.stderr)
            return 1
        if args.check:  # walk each tier in a child process first: damage is reported, not met
            damaged = {tier.name: [f"damaged: {problem}"] for tier in config.tiers
                       if tier.path and os.path.exists(os.path.join(tier.path, "data.mdb"))
                       and (problem := verify_env(tier.path)) is not None}
            if damaged:
                print(json.dumps({"problems": damaged}, indent=1))
                return 1
        try:
            # A mooncake tier's occupancy if the cluster answers; the local tiers either way.
            config = dataclasses.replace(config, tiers=tuple(
                dataclasses.replace(t, on_unreachable="degraded") for t in config.tiers))
            store = TieredStore(config)
        except StoreError as e:
            print(f"speckv store: {e}", file=sys.stderr)
            return 1
        with store:
            report = store.stats()
            problems = {tier.name: tier.audit() for tier in store.tiers} if args.check else {}
        if args.check:
            report["problems"] = problems
        print(json.dumps(report, indent=1))
        return 1 if any(problems.values()) else 0

    return run
