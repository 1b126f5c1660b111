"""LMDB environments, opened the way py-lmdb's documentation asks, and grown when full.

Rules this module enforces (py-lmdb docs, "Environment" and "Threads"):
- One ``lmdb.Environment`` per directory per process: ``open_env`` keeps a registry keyed by
  (realpath, pid). Fork waits until no transaction of this process is in flight; the child
  then closes the handles it inherited (without touching the parent's reader slots) and
  opens its own on first use. No read transactions are cached (``max_spare_txns=0``): a
  cached one, inherited and closed by a child, would free the parent's reader slot.
- Transactions live in ``with`` blocks; values are read with ``buffers=True`` and the
  callers copy them out before the block ends.
- ``set_mapsize`` needs no active transaction in this process: every transaction holds a
  shared lock, and growing the map takes it exclusively.

Writes go straight into the map (``writemap``): without it LMDB copies every value into
malloc'ed pages and then ``pwrite``s them, 10-15x slower for MiB values on this project's
machines. The catch: a write through the map into a part of the file that the filesystem
cannot back is a SIGBUS, not an error. So the map never reaches past the file's allocated
blocks: the file only grows, by ``posix_fallocate`` first and ``set_mapsize`` second, and
every process maps at most the file's size. A full filesystem then shows as LMDB's
``MapFullError`` and a failed allocation, ``NoRoom``, which the tier answers by evicting.

Map size. It starts at the data file's size, or for a new file at the tier's capacity up
to FIRST_MAP_SIZE, and grows by a quarter (at least MIN_GROWTH) each time a write hits
``MapFullError``, up to what the filesystem can hold. The tiers enforce capacity in bytes of
values, so the file settles at the capacity plus LMDB's fragmentation and one batch. Map
changes (open, growth, adopting another process's growth, which reaches this one as
``MapResizedError`` at ``begin``) take a file lock (``speckv.lock``), so they see and keep
"file size = allocated = largest map".

Sync settings (``tiers[].sync``; docs/STORAGE.md has the full story):
- ``none``: no fsync (MDB_NOSYNC). Right for tmpfs, which dies with the machine. On a disk,
  a power loss can leave a damaged B-tree, so a tier opened with ``none`` writes the boot id
  into ``unsynced_boot`` and any later open after a reboot empties the tier first.
- ``data``: one fsync per commit, the meta page is not (MDB_NOMETASYNC): a power loss may
  undo the last commit, the tree stays intact.
- ``full``: both fsynced: a commit is durable.
A killed process (SIGKILL) loses nothing committed under any setting: the kernel holds the
written pages.

Damage. LMDB trusts its file: some damaged B-tree pages make it fail an assertion and abort
the process, a truncated file is a SIGBUS. So before this process opens an environment, a
child process walks it (``verify_env``); if the child fails, the files are moved aside into
``damaged-<time>-<pid>/`` and the tier starts empty (logged), unless another process has the
environment open (a StoreError at start-up then). Reader slots of dead processes are freed
at open, every READER_CHECK_SECONDS by writers, and before any growth of the map, so a
killed reader cannot make the file grow without bound.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import lmdb

T = TypeVar("T")
logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1  # layout of the named databases (storage/tier.py); stored under b"schema"
DB_NAMES = (b"pages", b"meta", b"leaves", b"children", b"state")
DUPSORT_DBS = (b"children",)
# Concurrent read transactions per environment (each holds a reader slot of 64 bytes in
# lock.mdb): 64 rank processes x 3 SGLang I/O threads, with room for tools.
MAX_READERS = 256
# A new file's first map: the capacity, up to this much (RAM on tmpfs: it is allocated).
FIRST_MAP_SIZE = 64 << 20
# Smallest growth step: a few LMDB pages for a tiny tier; big tiers grow by a quarter, so
# that growing (which waits for this process's transactions) stays rare.
MIN_GROWTH = 1 << 20
_SYNC_FLAGS = {"none": (False, False), "data": (True, False), "full": (True, True)}  # sync, metasync
# Errors of a commit that mean the filesystem refused the write: ENOSPC, or EIO when a
# write comes back short; EDQUOT and EFBIG are limits too.
_NO_ROOM_ERRNOS = (errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EFBIG)
# Reader slots of dead processes (SIGKILL) pin the pages their snapshots use, so the file
# grows: every write frees them at most this often, and before any growth of the map.
READER_CHECK_SECONDS = 1.0
# The file's bound. Soft: 2 x capacity + MIN_GROWTH; growth steps stop at it, and a write
# that would grow the map past it first frees dead readers' slots and waits up to
# FULL_WAIT_SECONDS for live readers to let go of the pages their snapshots pin (under load,
# a reading thread descheduled inside its transaction pins every page freed meanwhile).
# Hard: one growth step more, plus twice the write's batch; a write that needs more fails
# (NoRoom: the store evicts and retries once, then the put returns False). An opportunistic
# write (a promotion: the page is stored below already) never grows the file past the soft
# bound and does not wait: at it, it fails at once (NoRoom), unless freeing dead readers'
# slots makes room.
FULL_WAIT_SECONDS = 0.2
# A verification of a tier at open (a child process walking every database) that takes
# longer than this counts as failed (a damaged tree can make a walk loop).
VERIFY_TIMEOUT_SECONDS = 600
_UNSYNCED_MARKER = "unsynced_boot"
_OPEN_LOCK = "speckv.lock"
_LMDB_FILES = ("data.mdb", "lock.mdb")


class StoreError(RuntimeError):
    """The store cannot start (bad directory, no room, foreign data): says which field and what to do."""


class NoRoom(StoreError):
    """A write needs more space than the map can grow to on this filesystem."""


class SharedLock:
    """Many holders in shared mode or one in exclusive mode; a waiting exclusive holder
    blocks new shared ones (so growth is not starved). Not reentrant."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive or self._waiting:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                if not self._shared:
                    self._cond.notify_all()

    def acquire_exclusive(self) -> None:
        with self._cond:
            self._waiting += 1
            while self._exclusive or self._shared:
                self._cond.wait()
            self._waiting -= 1
            self._exclusive = True

    def release_exclusive(self) -> None:
        with self._cond:
            self._exclusive = False
            self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        self.acquire_exclusive()
        try:
            yield
        finally:
            self.release_exclusive()


def _boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(os.path.join(path, "data.mdb"))
    except FileNotFoundError:
        return 0


def _room(path: str) -> int:
    """Bytes the LMDB data file in ``path`` could reach: its size plus the free space."""
    st = os.statvfs(path)
    return _file_size(path) + st.f_bavail * st.f_frsize


class Env:
    """One LMDB environment (a tier directory) in this process. Use ``open_env``."""

    def __init__(self, path: str, sync: str, capacity: int, where: str) -> None:
        self.path = path
        self.sync = sync
        self.where = where
        self.users = 0
        self.key = (os.path.realpath(path), os.getpid())  # its entry in _REGISTRY
        self.soft_limit = (2 * capacity + MIN_GROWTH) // 4096 * 4096
        self._lock = SharedLock()
        room = _room(path)
        if capacity > room:
            raise StoreError(
                f"{where}.capacity: {capacity} bytes, but {path} can hold only {room} "
                f"(free space on its filesystem plus the existing store); lower the capacity "
                f"or free space")
        do_sync, metasync = _SYNC_FLAGS[sync]
        try:
            with self._file_lock():
                self._forget_unsynced_writes_after_reboot()
                self._quarantine_if_damaged()
                first = max(_file_size(path), min(capacity, FIRST_MAP_SIZE), MIN_GROWTH)
                self.lmdb = lmdb.open(
                    path, map_size=first, subdir=True,
                    sync=do_sync, metasync=metasync, writemap=True, max_dbs=len(DB_NAMES),
                    max_readers=MAX_READERS, max_spare_txns=0, lock=True)
                # For posix_fallocate. LMDB's fcntl locks are on lock.mdb, so opening and
                # closing data.mdb cannot release them.
                self._data_fd = os.open(os.path.join(path, "data.mdb"), os.O_RDWR | os.O_CLOEXEC)
                self._allocate(0, self.lmdb.info()["map_size"])  # fills holes a crash left
        except (OSError, lmdb.Error, NoRoom) as e:
            if getattr(self, "lmdb", None) is not None:
                self.close()
            raise StoreError(f"{where}.path: cannot open an LMDB store in {path}: {e}; "
                             "check that the directory is writable and has room") from e
        try:
            self.lmdb.reader_check()  # free reader slots of processes that died (SIGKILL)
            self._reader_checked = time.monotonic()
            self.dbs = self._open_dbs()
        except BaseException:
            self.close()
            raise

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        """Exclusive across processes: opening the tier and changing the map size."""
        with open(os.path.join(self.path, _OPEN_LOCK), "a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            yield

    def _allocate(self, start: int, end: int) -> None:
        """Back data.mdb with blocks from ``start`` to ``end`` (extending it if shorter)."""
        if end <= start:
            return
        try:
            os.posix_fallocate(self._data_fd, start, end - start)
        except OSError as e:
            raise NoRoom(f"{self.where}: cannot allocate {end - start} bytes for {self.path} "
                         f"({e.strerror}); is its filesystem full?") from e

    def close(self) -> None:
        self.lmdb.close()
        if getattr(self, "_data_fd", None) is not None:
            os.close(self._data_fd)
            self._data_fd = None

    def _quarantine_if_damaged(self) -> None:
        """Verify the environment in a child process (LMDB aborts the process on some damaged
        trees, so this one must not be the first to walk them); a damaged one is moved aside
        into ``damaged-<time>-<pid>/`` in the tier's directory and the tier starts empty."""
        if _file_size(self.path) == 0:
            return
        problem = verify_env(self.path)
        if problem is None:
            return
        if _in_use_elsewhere(self.path):
            raise StoreError(
                f"{self.where}.path: the LMDB store in {self.path} is damaged ({problem}) and "
                "open in another process; stop the processes using it and start again (it "
                "will be moved aside), or delete the directory (it is a cache)")
        aside = os.path.join(self.path, time.strftime("damaged-%Y%m%dT%H%M%SZ", time.gmtime())
                             + f"-{os.getpid()}")
        os.makedirs(aside)
        for name in _LMDB_FILES:
            with contextlib.suppress(FileNotFoundError):
                os.replace(os.path.join(self.path, name), os.path.join(aside, name))
        logger.error("speckv store: %s: the LMDB store in %s is damaged (%s); moved it to %s "
                     "and starting the tier empty (delete that directory once inspected)",
                     self.where, self.path, problem, aside)

    def _forget_unsynced_writes_after_reboot(self) -> None:
        marker = os.path.join(self.path, _UNSYNCED_MARKER)
        boot = _boot_id()
        try:
            with open(marker) as f:
                written_in = f.read().strip()
        except FileNotFoundError:
            written_in = None
        if written_in is not None and written_in != boot:
            # Written without fsync before a reboot: the tree may be damaged. It is a cache.
            for name in _LMDB_FILES:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.path, name))
            os.unlink(marker)
            written_in = None
        if self.sync == "none" and written_in is None:
            tmp = f"{marker}.{os.getpid()}"
            with open(tmp, "w") as f:
                f.write(boot)
            os.replace(tmp, marker)

    def _open_dbs(self) -> dict[bytes, object]:
        try:
            with self.lmdb.begin(write=True) as txn:
                main = {bytes(k) for k, _ in txn.cursor()}
                if main - set(DB_NAMES):
                    raise StoreError(
                        f"{self.where}.path: {self.path} holds an LMDB store that is not "
                        f"sglang-speckv's; point the tier at an empty directory")
                dbs = {name: self.lmdb.open_db(name, txn=txn, dupsort=name in DUPSORT_DBS)
                       for name in DB_NAMES}
                schema = txn.get(b"schema", db=dbs[b"state"])
                if schema is None:
                    txn.put(b"schema", str(SCHEMA_VERSION).encode(), db=dbs[b"state"])
                elif schema != str(SCHEMA_VERSION).encode():
                    raise StoreError(
                        f"{self.where}.path: {self.path} holds a store of layout version "
                        f"{schema.decode(errors='replace')}, this is version {SCHEMA_VERSION}; "
                        "delete the directory (it is a cache) or point the tier elsewhere")
        except lmdb.Error as e:
            raise StoreError(f"{self.where}.path: cannot write to {self.path}: {e}") from e
        return dbs

    @contextlib.contextmanager
    def read(self) -> Iterator[lmdb.Transaction]:
        """A read transaction; values are memoryviews valid only inside the block."""
        while True:
            with self._lock.shared():
                try:
                    txn = self.lmdb.begin(buffers=True)
                except lmdb.MapResizedError:
                    txn = None
                if txn is not None:
                    with txn:
                        yield txn
                    return
            self._adopt_new_size()

    def write(self, body: Callable[[lmdb.Transaction], T], commit: bool = True,
              batch: int = 0, opportunistic: bool = False) -> T:
        """Run ``body(txn)`` in one write transaction and commit it (or abort it: a dry run).
        ``body`` may run again (from scratch) after the map grows, so it must keep its effects
        inside the transaction. ``batch``: bytes of values it writes (for the hard bound).
        ``opportunistic``: never grow the map past the soft bound; NoRoom there instead."""
        if time.monotonic() - self._reader_checked >= READER_CHECK_SECONDS:
            self._reader_checked = time.monotonic()
            self.lmdb.reader_check()
        waited = 0.0
        while True:
            with self._lock.shared():
                try:
                    with self.lmdb.begin(write=True, buffers=True) as txn:
                        result = body(txn)
                        if not commit:
                            txn.abort()
                        return result
                except lmdb.MapResizedError:
                    seen = None
                except lmdb.MapFullError:
                    seen = self.lmdb.info()["map_size"]
                except lmdb.Error as e:
                    if getattr(e, "code", None) in _NO_ROOM_ERRNOS:
                        raise NoRoom(f"{self.where}: cannot write to {self.path} ({e}); "
                                     "is its filesystem full?") from e
                    raise
            if seen is None:
                self._adopt_new_size()
            elif seen >= self.soft_limit and opportunistic:
                self._reader_checked = time.monotonic()
                if not self.lmdb.reader_check():
                    raise NoRoom(f"{self.where}: the store in {self.path} is at its soft bound "
                                 f"({self.soft_limit} bytes); an opportunistic write does not grow it")
            elif seen >= self.soft_limit and waited < FULL_WAIT_SECONDS:
                self._reader_checked = time.monotonic()
                if not self.lmdb.reader_check():
                    time.sleep(0.01)  # then retry: live readers may have let go
                    waited += 0.01
            else:
                self._grow(seen, batch)

    def _adopt_new_size(self) -> None:
        with self._lock.exclusive(), self._file_lock():
            # The file is as large as the largest map any process uses, and allocated.
            self.lmdb.set_mapsize(max(_file_size(self.path), self.lmdb.info()["map_size"]))

    def _grow(self, seen: int, batch: int = 0) -> None:
        with self._lock.exclusive(), self._file_lock():
            current = self.lmdb.info()["map_size"]
            if current > seen:
                return  # another thread grew it meanwhile
            self._reader_checked = time.monotonic()
            if self.lmdb.reader_check():
                return  # a dead process's snapshot pinned freed pages: retry without growing
            size = _file_size(self.path)
            if size <= current:  # else another process grew it already: adopt that
                size = current + max(current // 4, MIN_GROWTH)
                if current < self.soft_limit:
                    size = min(size, self.soft_limit)
                hard = self.soft_limit + max(self.soft_limit // 4, MIN_GROWTH) + 2 * batch
                if size > hard:
                    raise NoRoom(f"{self.where}: the store in {self.path} would grow past "
                                 f"{hard} bytes (2 x capacity + 1 MiB, one growth step, twice "
                                 "the batch): readers are pinning freed pages")
                size = min(size, _room(self.path))
                if size <= current:
                    raise NoRoom(f"{self.where}: the store in {self.path} is full and its "
                                 "filesystem has no room to grow it")
                self._allocate(current, size)
            self.lmdb.set_mapsize(size)


# The verification run in a child process: open the environment read-only, check that the
# file holds every page the meta page says is used, walk every database (keys in order,
# every key found again by a search, the first and last byte of every value touched: a page
# past the end of the file is a SIGBUS), and print "ok". Any other outcome is damage.
_VERIFY = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
import lmdb
path, dupsort = sys.argv[2], set(sys.argv[3].encode().split(b","))
env = lmdb.open(path, readonly=True, max_dbs=16, subdir=True, lock=True, max_spare_txns=0)
info, stat = env.info(), env.stat()
size = os.path.getsize(os.path.join(path, "data.mdb"))
if (info["last_pgno"] + 1) * stat["psize"] > size:
    sys.exit(f"truncated: {size} bytes, pages used up to {(info['last_pgno'] + 1) * stat['psize']}")
def walk(txn, db, dup):
    n, last = 0, None
    cursor, probe = txn.cursor(db=db), txn.cursor(db=db)
    for key, value in cursor:
        item = (bytes(key), bytes(value) if dup else b"")
        if last is not None and item <= last:
            sys.exit("keys out of order")
        if not (probe.set_key_dup(*item) if dup else probe.set_key(item[0])):
            sys.exit("a key a search cannot find")
        if len(value):
            value[0], value[-1]
        n, last = n + 1, item
    if n != txn.stat(db)["entries"]:
        sys.exit("entry count differs from the tree's")
    return n
with env.begin(buffers=True) as txn:
    names = [bytes(k) for k, _ in txn.cursor()]
    walk(txn, None, False)
    for name in names:
        try:
            db = env.open_db(name, txn=txn, dupsort=name in dupsort, create=False)
        except lmdb.IncompatibleError:
            continue  # not a database: a foreign store, refused after open
        walk(txn, db, name in dupsort)
print("ok")
"""


def verify_env(path: str) -> str | None:
    """None if the LMDB environment in ``path`` reads back whole, else what is wrong. Runs in
    a child process: LMDB answers some damage (a bad B-tree page, a truncated file) with an
    assertion that aborts the process, or a SIGBUS."""
    lmdb_dir = os.path.dirname(os.path.dirname(os.path.abspath(lmdb.__file__)))
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-S", "-c", _VERIFY, lmdb_dir, path,
             ",".join(name.decode() for name in DUPSORT_DBS)],
            capture_output=True, text=True, timeout=VERIFY_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        return f"verifying it took over {VERIFY_TIMEOUT_SECONDS} s"
    if done.returncode == 0 and done.stdout.strip() == "ok":
        return None
    lines = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()
    if done.returncode < 0:
        return f"reading it killed the reader with signal {-done.returncode}: {lines[-1]}"
    return lines[-1]


def _in_use_elsewhere(path: str) -> bool:
    """Another process has the environment open: it holds a shared fcntl lock on the first
    byte of lock.mdb (LMDB's own test for exclusive use). Only for an environment this
    process has not opened (closing any descriptor of lock.mdb drops our own LMDB locks)."""
    try:
        fd = os.open(os.path.join(path, "lock.mdb"), os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


_REGISTRY: dict[tuple[str, int], Env] = {}
_REGISTRY_LOCK = threading.Lock()
_fork_handlers_registered = False


def _before_fork() -> None:
    # Fork only between transactions: the child closes what it inherits (below), and closing
    # an environment aborts its transactions, which would clear the parent's reader slots.
    # Newest first: a write on tier t reads the tiers above it (opened before it) inside its
    # transaction, so taking tier t before them cannot wait on a thread that waits on us.
    _REGISTRY_LOCK.acquire()
    for env in reversed(_REGISTRY.values()):
        env._lock.acquire_exclusive()


def _after_fork_in_parent() -> None:
    for env in _REGISTRY.values():
        env._lock.release_exclusive()
    _REGISTRY_LOCK.release()


def _after_fork_in_child() -> None:
    # py-lmdb refuses to open files that are open in this process, and the parent's handles
    # count: close them (LMDB's close clears only reader slots of the calling process, and
    # no transaction is in flight, see _before_fork), so the child opens its own.
    for env in _REGISTRY.values():
        env._lock.release_exclusive()
        env.close()
    _REGISTRY.clear()
    _REGISTRY_LOCK.release()


def open_env(path: str, *, sync: str, capacity: int, where: str) -> Env:
    """The process's environment for tier directory ``path`` (created if missing), opened on
    first use. ``where`` (e.g. ``tiers[0]``) prefixes error messages. Pair with ``close_env``."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise StoreError(f"{where}.path: cannot create {path}: {e.strerror}; create it or "
                         "choose another directory") from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise StoreError(f"{where}.path: {path} is not writable by this process")
    global _fork_handlers_registered
    key = (os.path.realpath(path), os.getpid())
    with _REGISTRY_LOCK:
        if not _fork_handlers_registered:
            os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                                after_in_child=_after_fork_in_child)
            _fork_handlers_registered = True
        env = _REGISTRY.get(key)
        if env is None:
            env = Env(path, sync, capacity, where)
            _REGISTRY[key] = env
        elif env.sync != sync:
            raise StoreError(f"{where}.sync: {path} is already open in this process with "
                             f"sync={env.sync!r}, not {sync!r}")
        env.users += 1
        return env


def close_env(env: Env) -> None:
    """Release one ``open_env``; the last release in the process closes the environment."""
    if env.key[1] != os.getpid():
        return  # inherited through fork: closed already in the child (_after_fork_in_child)
    with _REGISTRY_LOCK:
        env.users -= 1
        if env.users == 0:
            del _REGISTRY[env.key]
            env.close()
