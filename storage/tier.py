"""One storage tier: an LMDB environment with a byte capacity and an LRU over chain tails.

Named databases of the environment (opened by storage/env.py):

    pages     store key -> value (the caller's bytes, as given)
    meta      store key -> tick u64 LE | raw size u64 LE | header (storage/record.py, 24 B)
              | parent store key (may be empty)
    leaves    tick u64 BE || store key -> b""    pages with no child in this tier, by recency
    children  parent store key -> child store key  (dupsort; one row per stored page that has
              a parent, whether or not the parent is stored in this tier)
    state     b"tick", b"pages", b"bytes", b"raw_bytes" -> u64 LE; b"schema" -> version

Every change is one write transaction (``Tier.commit``): a crash leaves the tier as it was
before or after, never in between, and the counters in ``state`` always match the pages
(``bytes`` counts each value plus its header). ``audit`` checks all of this.

Recency. A write transaction takes ticks from the tier's counter ``tick``, so all processes
share one order. Inserting or touching a page gives it a new tick; within one batch of
inserts the later pages (chain tails) get the older ticks. Reads do not write: the store
remembers accesses in memory and passes them here as ``touches`` later (storage/store.py).

Eviction takes chain tails before heads. SGLang's keys form chains (page i's hash covers
page i-1's), and a page is only reachable through all its predecessors, so evicting a head
strands its whole tail. Only *leaves* (pages no stored page names as parent) are eviction
candidates, coldest first: ``leaves`` is the LRU. Removing a leaf that was its parent's last
child makes the parent a leaf, entering ``leaves`` at its own (old) tick, so a cold chain is
eaten from its tail. A chain can span tiers (its head demoted, its tail written later into
the first tier), so a candidate that has a child in a tier above (that tier's ``children``
index, read in the same pass) is not evicted but touched, as in use, and the search goes
on; if every leaf turns out to be such a page, the coldest goes anyway. Every insert,
touch and removal is a constant number of B-tree operations, O(log n). Should no leaf exist
while over capacity (only possible with a cycle of parent links, i.e. bad input), pages go
in key order, so capacity always holds.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Collection, Sequence
from typing import NamedTuple

import lmdb

from .env import DB_NAMES, NoRoom, close_env, open_env
from .record import HEADER_SIZE

_META = struct.Struct(f"<QQ{HEADER_SIZE}s")  # tick, raw size, header; then the parent key
_TICK = struct.Struct(">Q")  # big-endian, so the leaves index sorts by tick
_U64 = struct.Struct("<Q")
COUNTERS = (b"tick", b"pages", b"bytes", b"raw_bytes")


class Page(NamedTuple):
    """A page as the store moves it between tiers."""

    key: bytes  # store key (storage/keys.py)
    header: bytes  # storage/record.py
    value: object  # bytes-like; b"" for a dropped victim
    raw_size: int  # bytes of the page before coding (stats only)
    parent: bytes | None  # store key of the previous page of its chain, if known


class Meta(NamedTuple):
    """A page's entry in ``meta``, parsed."""

    tick: int | None  # None: the entry is damaged (too short to parse)
    raw_size: int
    header: bytes
    parent: bytes


def _parse_meta(mv) -> Meta:
    if len(mv) < _META.size:
        return Meta(None, 0, b"", b"")
    tick, raw_size, header = _META.unpack_from(mv)
    return Meta(tick, raw_size, header, bytes(mv[_META.size:]))


class Tier:
    """A tier opened in this process. ``recode`` is the demotion hook: when set, pages moving
    into this tier have their value replaced by ``recode(value)`` (storage/store.py)."""

    def __init__(self, config, index: int) -> None:
        self.config = config
        self.name: str = config.name
        self.capacity: int = config.capacity
        self.env = open_env(config.path, sync=config.sync, capacity=config.capacity,
                            where=f"tiers[{index}]")
        self._pages, self._meta, self._leaves, self._children, self._state = (
            self.env.dbs[name] for name in DB_NAMES)
        self.recode = None

    def close(self) -> None:
        close_env(self.env)

    # --- reads (one read transaction each; they never block writers) ---------------------

    def read(self, keys: Sequence[bytes], out: Sequence | None = None) -> list[Page | None]:
        """The pages under ``keys`` (None where absent), values copied out of LMDB into
        ``out[i]`` (a writable buffer; the page's value is then a memoryview of its first
        bytes) or into new bytearrays. A value larger than its ``out`` buffer reads as absent.
        Not verified: see record.verify."""
        pages: list[Page | None] = []
        with self.env.read() as txn:
            for i, key in enumerate(keys):
                value = txn.get(key, db=self._pages)
                meta = txn.get(key, db=self._meta)
                if value is None or meta is None:
                    pages.append(None)
                    continue
                meta = _parse_meta(meta)
                header = meta.header
                if out is None:
                    copy = bytearray(value)
                else:
                    buffer = memoryview(out[i]).cast("B")
                    if len(value) > len(buffer):
                        pages.append(None)
                        continue
                    copy = buffer[: len(value)]
                    copy[:] = value
                pages.append(Page(key, header, copy, meta.raw_size, meta.parent or None))
        return pages

    def present(self, keys: Sequence[bytes]) -> list[bool]:
        with self.env.read() as txn:
            return [txn.get(key, db=self._pages) is not None for key in keys]

    def keys_with_prefix(self, prefix: bytes) -> list[bytes]:
        keys = []
        with self.env.read() as txn:
            cursor = txn.cursor(db=self._pages)
            if cursor.set_range(prefix):
                for key in cursor.iternext(keys=True, values=False):
                    if not bytes(key[: len(prefix)]) == prefix:
                        break
                    keys.append(bytes(key))
        return keys

    def counters(self) -> dict[str, int]:
        with self.env.read() as txn:
            return {name.decode(): _get_u64(txn, name, self._state) for name in COUNTERS}

    def audit(self) -> list[str]:
        """Problems found by checking every invariant above against the files (empty list:
        consistent). Reads the whole tier: for tests and ``speckv store --check``."""
        problems = []
        with self.env.read() as txn:
            counters = {name: _get_u64(txn, name, self._state) for name in COUNTERS}
            sizes = {bytes(k): len(v) for k, v in txn.cursor(db=self._pages)}
            meta = {bytes(k): _parse_meta(v) for k, v in txn.cursor(db=self._meta)}
            leaves = {bytes(k) for k, _ in txn.cursor(db=self._leaves)}
            children = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=self._children)]
        if set(meta) != set(sizes):
            problems.append(f"{len(set(meta) ^ set(sizes))} keys in only one of pages/meta")
        if any(m.tick is None for m in meta.values()):
            problems.append("damaged meta entries")
        found = {b"pages": len(sizes), b"bytes": sum(sizes.values()) + HEADER_SIZE * len(sizes),
                 b"raw_bytes": sum(m.raw_size for m in meta.values())}
        for name, value in found.items():
            if counters[name] != value:
                problems.append(f"counter {name.decode()} = {counters[name]}, pages hold {value}")
        if any((m.tick or 0) > counters[b"tick"] for m in meta.values()):
            problems.append("a page's tick is ahead of the tick counter")
        expected_children = sorted((m.parent, k) for k, m in meta.items() if m.parent)
        if sorted(children) != expected_children:
            problems.append("children index does not match the pages' parent links")
        parents = {p for p, _ in children}
        expected_leaves = {_TICK.pack(m.tick or 0) + k for k, m in meta.items() if k not in parents}
        if leaves != expected_leaves:
            problems.append(f"leaves index: {len(leaves - expected_leaves)} extra, "
                            f"{len(expected_leaves - leaves)} missing")
        return problems

    # --- writes ------------------------------------------------------------------------

    def commit(
        self,
        inserts: Sequence[Page] = (),
        touches: Sequence[bytes] = (),
        removes: Sequence[bytes] = (),
        keep_victims: bool = False,
        above: Sequence[Tier] = (),
        copied: Collection[bytes] = (),
    ) -> tuple[list[bool], list[Page]]:
        """One write transaction: remove ``removes``, touch ``touches`` (oldest access first),
        insert ``inserts`` (in chain order; a key already here is touched instead), then evict
        coldest leaves until the tier is within capacity. ``above``: the tiers above this one,
        whose children indexes keep a chain's pages here from being evicted.

        Returns (stored, victims): ``stored[i]`` is True iff inserts[i] is in the tier after
        the commit (False: the filesystem has no room even after evicting as many bytes as
        the batch needs); ``victims`` are the evicted pages, with copies of their values if
        ``keep_victims`` and their key is not in ``copied`` (already moved down, see
        ``plan``), else with empty values.
        """

        def body(txn: lmdb.Transaction) -> tuple[list[bool], list[Page]]:
            with contextlib.ExitStack() as stack:
                w = _Writer(txn, self, [(stack.enter_context(t.env.read()), t._children)
                                        for t in above])
                for key in removes:
                    w.remove(key, keep=False)
                for key in touches:
                    w.touch(key)
                for page in reversed(inserts):  # reversed: a chain's head gets the newest tick
                    w.insert(page)
                victims = w.evict(self.capacity, keep_victims, copied)
                w.save()
                return [True] * len(inserts), victims

        try:
            return self.env.write(body)
        except NoRoom:
            if not inserts:
                raise
        # The file cannot grow: free twice the bytes the batch needs (a value needs a run of
        # free pages, and LMDB takes the single pages of B-tree updates out of such runs),
        # then try once more. LMDB reuses pages freed by transaction N from transaction N+2
        # on (snapshot N-1, which still uses them, stays valid until then): one more commit
        # in between.
        need = 2 * sum(len(page.value) + HEADER_SIZE for page in inserts)
        freed: list[Page] = []
        try:
            _, freed = self.env.write(lambda txn: _evict_only(txn, self, need, keep_victims))
            self.env.write(lambda txn: _evict_only(txn, self, 0, keep_victims))
            stored, victims = self.env.write(body)
        except NoRoom:  # not even room to evict (the filesystem is full to the last byte)
            return [False] * len(inserts), freed
        return stored, freed + victims

    def plan(self, touches: Sequence[bytes], incoming: int, above: Sequence[Tier] = ()) -> list[Page]:
        """The pages (with copies of their values) that a commit of ``touches`` and
        ``incoming`` more bytes would evict, found by a dry run (an aborted write
        transaction). The store copies them into the next tier before that commit, so a
        crash between the two leaves a page in both tiers, never in neither."""
        if self.counters()["bytes"] + incoming <= self.capacity:
            return []

        def body(txn: lmdb.Transaction) -> list[Page]:
            with contextlib.ExitStack() as stack:
                w = _Writer(txn, self, [(stack.enter_context(t.env.read()), t._children)
                                        for t in above])
                for key in touches:
                    w.touch(key)
                return w.evict(self.capacity - incoming, keep=True)

        return self.env.write(body, commit=False)


def _get_u64(txn: lmdb.Transaction, name: bytes, db) -> int:
    value = txn.get(name, db=db)
    return 0 if value is None else _U64.unpack(value)[0]


def _evict_only(txn: lmdb.Transaction, tier: Tier, free: int, keep: bool) -> tuple[list[bool], list[Page]]:
    w = _Writer(txn, tier, [])
    victims = w.evict(w.counters[b"bytes"] - free, keep)
    w.save()
    return [], victims


class _Writer:
    """The operations of one write transaction on one tier, keeping its counters."""

    def __init__(self, txn: lmdb.Transaction, tier: Tier, above: list[tuple]) -> None:
        self.txn = txn
        self.t = tier
        self.above = above  # [(read txn, children db)] of the tiers above
        self.counters = {name: _get_u64(txn, name, tier._state) for name in COUNTERS}

    def save(self) -> None:
        for name, value in self.counters.items():
            self.txn.put(name, _U64.pack(value), db=self.t._state)

    def _tick(self) -> int:
        self.counters[b"tick"] += 1
        return self.counters[b"tick"]

    def _meta(self, key: bytes) -> Meta | None:
        mv = self.txn.get(key, db=self.t._meta)
        return None if mv is None else _parse_meta(mv)

    def _has_children(self, key: bytes) -> bool:
        return self.txn.cursor(db=self.t._children).set_key(key)

    def insert(self, page: Page) -> None:
        txn, t = self.txn, self.t
        if txn.get(page.key, db=t._pages) is not None:
            self.touch(page.key)
            return
        tick = self._tick()
        parent = page.parent if page.parent and page.parent != page.key else b""
        txn.put(page.key, page.value, db=t._pages)
        txn.put(page.key, _META.pack(tick, page.raw_size, page.header) + parent, db=t._meta)
        if not self._has_children(page.key):
            txn.put(_TICK.pack(tick) + page.key, b"", db=t._leaves)
        if parent:
            txn.put(parent, page.key, db=t._children)
            parent_meta = self._meta(parent)
            if parent_meta is not None and parent_meta.tick is not None:
                # The parent is stored here: no longer a leaf.
                txn.delete(_TICK.pack(parent_meta.tick) + parent, db=t._leaves)
        self.counters[b"pages"] += 1
        self.counters[b"bytes"] += len(page.value) + HEADER_SIZE
        self.counters[b"raw_bytes"] += page.raw_size

    def touch(self, key: bytes) -> None:
        meta = self._meta(key)
        if meta is None or meta.tick is None:
            return
        tick = self._tick()
        self.txn.put(key, _META.pack(tick, meta.raw_size, meta.header) + meta.parent, db=self.t._meta)
        if self.txn.delete(_TICK.pack(meta.tick) + key, db=self.t._leaves):
            self.txn.put(_TICK.pack(tick) + key, b"", db=self.t._leaves)

    def remove(self, key: bytes, keep: bool) -> Page | None:
        """Remove the page under ``key`` (None if absent), with a copy of its value if
        ``keep``. A damaged meta entry (tick None) leaves its leaves entry behind (evict
        drops such entries) and the raw-bytes counter off by the page's raw size."""
        txn, t = self.txn, self.t
        meta = self._meta(key)
        stored = txn.get(key, db=t._pages)
        if meta is None or stored is None:  # absent (or half there: cannot happen, cleaned)
            txn.delete(key, db=t._pages)
            txn.delete(key, db=t._meta)
            return None
        size = len(stored)
        value = bytes(stored) if keep else b""  # copy before the delete invalidates the view
        txn.delete(key, db=t._pages)
        txn.delete(key, db=t._meta)
        if meta.tick is not None:
            txn.delete(_TICK.pack(meta.tick) + key, db=t._leaves)
        if meta.parent:
            txn.delete(meta.parent, key, db=t._children)
            parent_meta = self._meta(meta.parent)
            if (parent_meta is not None and parent_meta.tick is not None
                    and not self._has_children(meta.parent)):
                txn.put(_TICK.pack(parent_meta.tick) + meta.parent, b"", db=t._leaves)
        self.counters[b"pages"] -= 1
        self.counters[b"bytes"] -= size + HEADER_SIZE
        self.counters[b"raw_bytes"] = max(0, self.counters[b"raw_bytes"] - meta.raw_size)
        return Page(key, meta.header, value, meta.raw_size, meta.parent or None)

    def evict(self, limit: int, keep: bool, copied: Collection[bytes] = ()) -> list[Page]:
        """Remove coldest leaves until the tier holds at most ``limit`` bytes; ``keep``: copy
        the values of those not in ``copied``."""
        victims, in_use = [], set()
        while self.counters[b"bytes"] > limit:
            cursor = self.txn.cursor(db=self.t._leaves)
            if cursor.first():
                entry = bytes(cursor.key())
                key = entry[_TICK.size:]
                if key not in in_use and any(txn.cursor(db=db).set_key(key) for txn, db in self.above):
                    in_use.add(key)  # its chain goes on in a tier above
                    self.touch(key)
                    continue
            else:  # no leaf: only a cycle of parent links (bad input) is left
                cursor = self.txn.cursor(db=self.t._meta)
                if not cursor.first():
                    break
                entry, key = None, bytes(cursor.key())
            victim = self.remove(key, keep and key not in copied)
            if victim is None or victim.header == b"":
                # A leftover of a damaged meta entry: drop its leaves entry and the page.
                if entry is not None:
                    self.txn.delete(entry, db=self.t._leaves)
                continue
            victims.append(victim)
        return victims
