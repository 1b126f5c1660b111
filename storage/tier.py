"""One storage tier: an LMDB environment with a byte capacity and an LRU over chain tails.

Named databases of the environment (opened by storage/env.py):

    pages     store key -> value (the caller's bytes, as given)
    meta      store key -> tick u64 LE | raw size u64 LE | header (storage/record.py, 24 B)
              | parent store key (may be empty)
    leaves    tick u64 BE || store key -> b""    pages with no child in this tier, by recency
    children  parent store key -> child store key  (dupsort; one row per stored page that has
              a parent, whether or not the parent is stored in this tier)
    state     b"tick", b"pages", b"bytes", b"raw_bytes" -> u64 LE; b"check" -> XXH3-64 of those
              four; b"schema" -> version

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
in key order. A commit may be told which pages it may evict (``movable``: those the store
has copied to the next tier); it then evicts no other and may stay over capacity.

Damage. Every record read from the file is untrusted: counters that do not parse or do not
fit the tree are rebuilt from the pages, index entries naming no page or the wrong tick are
dropped or put right, a removal subtracts the length its header recorded (and rebuilds the
counters if the stored value disagrees), and the eviction walk has a step budget, so a
damaged index ends it instead of looping inside a write transaction. What was repaired is
counted (``Commit.damaged``). A damaged B-tree itself is caught at open (storage/env.py).
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Collection, Sequence
from typing import NamedTuple

import lmdb
import xxhash

from . import record
from .env import DB_NAMES, close_env, open_env
from .record import HEADER_SIZE

_META = struct.Struct(f"<QQ{HEADER_SIZE}s")  # tick, raw size, header; then the parent key
_TICK = struct.Struct(">Q")  # big-endian, so the leaves index sorts by tick
_U64 = struct.Struct("<Q")
COUNTERS = (b"tick", b"pages", b"bytes", b"raw_bytes")
# Bounds no intact meta entry reaches (one tick per page write or access; a page's raw size
# is MiBs): past them a tick or raw size is damage, read as a damaged entry, so that counters
# rebuilt from the entries cannot outgrow their 64 bits (a write would then fail, every time).
_MAX_TICK = 1 << 62
_MAX_RAW_SIZE = 1 << 40


class Page(NamedTuple):
    """A page as the store moves it between tiers."""

    key: bytes  # store key (storage/keys.py)
    header: bytes  # storage/record.py
    value: object  # bytes-like; b"" for a dropped victim
    raw_size: int  # bytes of the page before coding (stats only)
    parent: bytes | None  # store key of the previous page of its chain, if known
    tick: int | None = None  # its recency in the tier it was read from (Tier.read), if any


class Meta(NamedTuple):
    """A page's entry in ``meta``, parsed."""

    tick: int | None  # None: the entry is damaged (too short, or a tick or size past its bound)
    raw_size: int
    header: bytes
    parent: bytes


def _parse_meta(mv) -> Meta:
    if len(mv) < _META.size:
        return Meta(None, 0, b"", b"")
    tick, raw_size, header = _META.unpack_from(mv)
    if tick >= _MAX_TICK or raw_size >= _MAX_RAW_SIZE:  # damage: a flipped high bit
        return Meta(None, 0, header, bytes(mv[_META.size:]))
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
        max_key = self.env.lmdb.max_key_size()
        with self.env.read() as txn:
            for i, key in enumerate(keys):
                value = txn.get(key, db=self._pages)
                meta = txn.get(key, db=self._meta)
                if value is None or meta is None:
                    pages.append(None)
                    continue
                meta = _parse_meta(meta)
                if len(meta.parent) > max_key:  # damaged: no such key exists
                    meta = meta._replace(parent=b"")
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
                pages.append(Page(key, header, copy, meta.raw_size, meta.parent or None, meta.tick))
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
        """The counters as stored (a damaged one reads 0; the next write rebuilds it)."""
        with self.env.read() as txn:
            return {name.decode(): value or 0
                    for name, value in _read_counters(txn, self._state, verify=False).items()}

    def audit(self) -> list[str]:
        """Problems found by checking every invariant above against the files (empty list:
        consistent). Reads the whole tier: for tests and ``speckv store --check``."""
        problems = []
        with self.env.read() as txn:
            counters = _read_counters(txn, self._state, verify=False)
            if None not in counters.values() and None in _read_counters(txn, self._state).values():
                problems.append("counters do not match their checksum")
            sizes = {bytes(k): len(v) for k, v in txn.cursor(db=self._pages)}
            meta = {bytes(k): _parse_meta(v) for k, v in txn.cursor(db=self._meta)}
            leaves = {bytes(k) for k, _ in txn.cursor(db=self._leaves)}
            children = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=self._children)]
        problems += [f"counter {name.decode()} is damaged" for name, v in counters.items() if v is None]
        if set(meta) != set(sizes):
            problems.append(f"{len(set(meta) ^ set(sizes))} keys in only one of pages/meta")
        if any(m.tick is None for m in meta.values()):
            problems.append("damaged meta entries")
        found = {b"pages": len(sizes), b"bytes": sum(sizes.values()) + HEADER_SIZE * len(sizes),
                 b"raw_bytes": sum(m.raw_size for m in meta.values())}
        for name, value in found.items():
            if counters[name] is not None and counters[name] != value:
                problems.append(f"counter {name.decode()} = {counters[name]}, pages hold {value}")
        if any((m.tick or 0) > (counters[b"tick"] or 0) for m in meta.values()):
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
        above: Sequence[Tier] = (),
        movable: Collection[bytes] | None = None,
        limit: int | None = None,
        promoted: Sequence[tuple[bytes, int | None]] = (),
        opportunistic: bool = False,
    ) -> Commit:
        """One write transaction: remove ``removes`` and each of ``promoted`` (key, tick read
        with it) whose tick is still the one read, touch ``touches`` (oldest access first),
        insert ``inserts`` (in chain order; a key already here is touched instead), then evict
        coldest leaves until the tier holds at most ``limit`` bytes (default: its capacity).
        ``above``: the tiers above this one, whose children indexes keep a chain's pages here
        from being evicted. ``movable``: if given, only these keys may be evicted (copies
        first, deletes second: the store passes the pages it has already copied to the next
        tier); the tier may then stay over ``limit`` (``Commit.over``). Raises NoRoom when the
        filesystem cannot hold the transaction, or (``opportunistic``: a promotion) when it
        would grow the file past its soft bound (storage/env.py)."""

        def body(txn: lmdb.Transaction) -> Commit:
            with contextlib.ExitStack() as stack:
                w = _Writer(txn, self, [(stack.enter_context(t.env.read()), t._children)
                                        for t in above], inserts)
                for key in removes:
                    w.remove(key)
                for key, tick in promoted:
                    w.remove_if_unchanged(key, tick)
                for key in touches:
                    w.touch(key)
                for page in reversed(inserts):  # reversed: a chain's head gets the newest tick
                    w.insert(page)
                bound = self.capacity if limit is None else limit
                victims = w.evict(bound, movable)
                w.save()
                return Commit([True] * len(inserts), victims, w.counters[b"bytes"] > bound,
                              w.damaged)

        return self.env.write(body, batch=sum(len(page.value) for page in inserts),
                              opportunistic=opportunistic)

    def plan(self, touches: Sequence[bytes], removes: Sequence[bytes], inserts: Sequence[Page],
             above: Sequence[Tier] = (), limit: int | None = None,
             promoted: Sequence[tuple[bytes, int | None]] = ()) -> list[Page]:
        """The pages (with copies of their values) that a commit of ``removes``, ``promoted``,
        ``touches`` and ``inserts`` would evict (inserts counted by their bytes only), found by a dry run (an aborted write
        transaction). The store copies them into the next tier and then lets the commit
        evict only those (``movable``), so a crash leaves a page in both tiers, never in
        neither."""
        bound = self.capacity if limit is None else limit
        incoming = sum(len(page.value) + HEADER_SIZE for page in inserts)
        if self.counters()["bytes"] + incoming <= bound:
            return []

        def body(txn: lmdb.Transaction) -> list[Page]:
            with contextlib.ExitStack() as stack:
                w = _Writer(txn, self, [(stack.enter_context(t.env.read()), t._children)
                                        for t in above], inserts)
                for key in removes:
                    w.remove(key)
                for key, tick in promoted:
                    w.remove_if_unchanged(key, tick)
                for key in touches:
                    w.touch(key)
                return w.evict(bound - incoming, keep=True)

        return self.env.write(body, commit=False)


class Commit(NamedTuple):
    """What ``Tier.commit`` did."""

    stored: list[bool]  # per insert: in the tier after the commit
    victims: list[Page]  # evicted pages (values empty: the store copied them before)
    over: bool  # still over the limit: eviction was restricted to ``movable`` or stopped
    damaged: int  # damaged bookkeeping records found and repaired or dropped


def _u64(value) -> int | None:
    """A counter's value, or None if the record is damaged (not 8 bytes)."""
    return _U64.unpack(value)[0] if value is not None and len(value) == _U64.size else None


def _counters_check(counters: dict[bytes, int]) -> bytes:
    return xxhash.xxh3_64_digest(b"".join(_U64.pack(counters[name]) for name in COUNTERS))


def _read_counters(txn: lmdb.Transaction, db, verify: bool = True) -> dict[bytes, int | None]:
    """The counters in ``state``: 0 if absent (a new tier), None if damaged: not 8 bytes, or
    (``verify``) not matching the checksum saved with them (``b"check"``)."""
    counters = {}
    for name in COUNTERS:
        value = txn.get(name, db=db)
        counters[name] = 0 if value is None else _u64(value)
    if verify and None not in counters.values():
        check = txn.get(b"check", db=db)
        if (check is None and any(counters.values())) or (
                check is not None and bytes(check) != _counters_check(counters)):
            return dict.fromkeys(COUNTERS)
    return counters


class _Writer:
    """The operations of one write transaction on one tier, keeping its counters.

    Every record read from the file is untrusted: a counter, index entry or meta entry that
    does not parse or does not match the rest is repaired or dropped and counted in
    ``damaged``; eviction makes progress or stops (``stuck``) on any input."""

    def __init__(self, txn: lmdb.Transaction, tier: Tier, above: list[tuple],
                 inserts: Sequence[Page] = ()) -> None:
        self.txn = txn
        self.t = tier
        self.above = above  # [(read txn, children db)] of the tiers above
        # Pages coming down from the tier above: they are still there (copies first), but
        # as children they do not keep their parents here in use.
        self.arriving = {page.key for page in inserts}
        self.max_key = tier.env.lmdb.max_key_size()
        self.damaged = 0
        self.stuck = False
        self.new_leaf: bytes | None = None  # leaves entry the last removal created
        self.recount = False  # rebuild the counters before saving them
        counters = _read_counters(txn, tier._state)
        pages = self._entries(tier._pages)
        # Counters that match their checksum, the tree's entry count, and the file (the
        # values counted must fit into it), or they are rebuilt.
        if (None in counters.values() or counters[b"pages"] != pages
                or not HEADER_SIZE * pages <= counters[b"bytes"]
                <= HEADER_SIZE * pages + tier.env.lmdb.info()["map_size"]):
            self._recount()
        else:
            self.counters = counters

    def _entries(self, db) -> int:
        return self.txn.stat(db)["entries"]

    def _recount(self) -> None:
        """Counters rebuilt from the pages (their records were damaged): O(pages), rare."""
        self.damaged += not self.recount
        self.recount = False
        pages = self.txn.cursor(db=self.t._pages)
        sizes = [len(value) for _, value in pages]
        tick = raw = 0
        for _, mv in self.txn.cursor(db=self.t._meta):
            meta = _parse_meta(mv)
            tick, raw = max(tick, meta.tick or 0), raw + meta.raw_size
        self.counters = {b"tick": tick, b"pages": len(sizes),
                         b"bytes": sum(sizes) + HEADER_SIZE * len(sizes), b"raw_bytes": raw}

    def save(self) -> None:
        if self.recount or min(self.counters.values()) < 0:
            self._recount()
        for name, value in self.counters.items():
            self.txn.put(name, _U64.pack(value), db=self.t._state)
        self.txn.put(b"check", _counters_check(self.counters), db=self.t._state)

    def _tick(self) -> int:
        self.counters[b"tick"] += 1
        return self.counters[b"tick"]

    def _key_ok(self, key: bytes) -> bool:
        return 0 < len(key) <= self.max_key

    def _meta(self, key: bytes) -> Meta | None:
        mv = self.txn.get(key, db=self.t._meta) if self._key_ok(key) else None
        if mv is None:
            return None
        meta = _parse_meta(mv)
        if meta.parent and not self._key_ok(meta.parent):
            self.damaged += 1
            return meta._replace(tick=None, parent=b"")  # links unknown: treat as damaged
        return meta

    def _unlink_damaged(self, key: bytes) -> None:
        """Delete the index rows of ``key``, whose meta entry (tick, parent) was damaged: a
        scan of both indexes (O(pages); only on damage)."""
        parents = []
        for db, mine in ((self.t._leaves, lambda k, v: k[_TICK.size:] == key),
                         (self.t._children, lambda k, v: v == key)):
            cursor = self.txn.cursor(db=db)
            found = cursor.first()
            while found:
                if mine(bytes(cursor.key()), bytes(cursor.value())):
                    if db == self.t._children:
                        parents.append(bytes(cursor.key()))
                    found = _delete_here(cursor)
                else:
                    found = cursor.next()
        for parent in parents:  # a parent here whose last child this was is a leaf now
            meta = self._meta(parent)
            if meta is not None and meta.tick is not None and not self._has_children(parent):
                self.txn.put(_TICK.pack(meta.tick) + parent, b"", db=self.t._leaves)

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

    def remove(self, key: bytes, keep: bool = False) -> Page | None:
        """Remove the page under ``key`` (None if absent), with a copy of its value if
        ``keep``. The byte counter goes down by the length recorded at insert (the header's);
        if the stored value's length differs (damage), the counters are rebuilt at ``save``,
        as they are after removing a page half there (value or meta entry only)."""
        txn, t = self.txn, self.t
        self.new_leaf = None
        if not self._key_ok(key):
            return None
        meta = self._meta(key)
        stored = txn.get(key, db=t._pages)
        if meta is None or stored is None:
            if txn.delete(key, db=t._pages) | txn.delete(key, db=t._meta):
                self.damaged += 1
                self.recount = True
            return None
        length = record.recorded_length(meta.header)
        if length != len(stored):  # damage: which length was counted is unknown, so recount
            self.damaged += 1
            self.recount = True
            length = len(stored) if length is None else length
        value = bytes(stored) if keep else b""  # copy before the delete invalidates the view
        txn.delete(key, db=t._pages)
        txn.delete(key, db=t._meta)
        if meta.tick is not None:
            txn.delete(_TICK.pack(meta.tick) + key, db=t._leaves)
        else:
            self._unlink_damaged(key)
            self.recount = True
        if meta.parent:
            txn.delete(meta.parent, key, db=t._children)
            parent_meta = self._meta(meta.parent)
            if (parent_meta is not None and parent_meta.tick is not None
                    and not self._has_children(meta.parent)):
                self.new_leaf = _TICK.pack(parent_meta.tick) + meta.parent
                txn.put(self.new_leaf, b"", db=t._leaves)
        self.counters[b"pages"] -= 1
        self.counters[b"bytes"] -= length + HEADER_SIZE
        self.counters[b"raw_bytes"] -= meta.raw_size  # below 0 (damage): rebuilt at save
        return Page(key, meta.header, value, meta.raw_size, meta.parent or None)

    def remove_if_unchanged(self, key: bytes, tick: int | None) -> None:
        """Remove the page under ``key`` if its tick is still ``tick``: the copy a promotion
        read here, now committed in the first tier. Any write of the page here since (a
        demotion copying it back down touches it; so does another process's access) keeps
        it: that writer may count on this copy."""
        meta = self._meta(key)
        if tick is not None and meta is not None and meta.tick == tick:
            self.remove(key)

    def _in_use_above(self, key: bytes) -> bool:
        """A child of ``key`` is stored in a tier above (and is not coming down now)."""
        for txn, db in self.above:
            cursor = txn.cursor(db=db)
            if cursor.set_key(key) and any(bytes(child) not in self.arriving
                                           for child in cursor.iternext_dup()):
                return True
        return False

    def evict(self, limit: int, movable: Collection[bytes] | None = None,
              keep: bool = False) -> list[Page]:
        """Remove coldest leaves until the tier holds at most ``limit`` bytes, only keys in
        ``movable`` if given; ``keep``: with copies of their values.

        A walk over the leaves index in tick order. Its entries are checked against the
        meta entries they name: a stale or damaged one is dropped (or put back where it
        belongs). Each step removes a page, drops an entry or moves on, and the walk has a
        budget proportional to the index sizes, so a damaged index (entries out of order,
        keys a search cannot find) ends it (``stuck``) instead of looping forever."""
        victims: list[Page] = []
        in_use: set[bytes] = set()
        budget = 4 * (self._entries(self.t._leaves) + self._entries(self.t._meta)) + 64
        for by_key in (False, True):
            # First the leaves (tails first); then, should none be left while over the limit
            # (only a cycle of parent links, i.e. bad input), pages in key order.
            db = self.t._meta if by_key else self.t._leaves
            cursor = self.txn.cursor(db=db)
            found = cursor.first()
            while self.counters[b"bytes"] > limit and found:
                budget -= 1
                if budget < 0:
                    self.stuck = True
                    return victims
                entry = bytes(cursor.key())
                key = entry if by_key else entry[_TICK.size:]
                meta = self._meta(key)
                if meta is None or meta.tick is None:
                    self.damaged += 1  # an entry naming no page, or a page's damaged meta
                    if meta is not None:
                        self.remove(key)  # the page goes too: it cannot be verified
                    found = cursor.set_range(entry)
                    if found and bytes(cursor.key()) == entry:
                        found = _delete_here(cursor)
                    continue
                if not by_key and _TICK.pack(meta.tick) != entry[:_TICK.size]:
                    self.damaged += 1  # a stale entry: put the right one back if a leaf
                    found = _delete_here(cursor)
                    if not self._has_children(key):
                        right = _TICK.pack(meta.tick) + key
                        self.txn.put(right, b"", db=db)
                        found = cursor.set_range(min(entry, right))
                    continue
                if movable is not None and key not in movable:
                    found = cursor.next()
                    continue
                if not by_key and key not in in_use and self._in_use_above(key):
                    in_use.add(key)  # its chain goes on in a tier above: refreshed, for now
                    self.touch(key)
                    found = cursor.set_range(entry)
                    continue
                victim = self.remove(key, keep)
                if victim is not None:
                    victims.append(victim)
                restart = min(entry, self.new_leaf) if self.new_leaf and not by_key else entry
                found = cursor.set_range(restart)
                if found and bytes(cursor.key()) == entry:  # the delete missed it: damage
                    self.damaged += 1
                    found = cursor.next()
            if found:  # stopped by the limit, not by the end of the index
                break
        return victims


def _delete_here(cursor: lmdb.Cursor) -> bool:
    """Delete the entry under the cursor (no search: works where a damaged branch key would
    misdirect one) and move to the next; False at the end."""
    cursor.delete()
    return bool(cursor.key())
