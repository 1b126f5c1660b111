"""The store against a hostile environment: damaged files and records, killed writers and
readers, two writer processes. Each promise here is quoted in docs/STORAGE.md next to the
test's name. Every test runs under a deadline (``deadline`` or subprocess timeouts): a hang
is a failure, not a stuck CI job."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time

import pytest

from sglang_speckv.config import load_config
from sglang_speckv.storage import TieredStore, chain_parents, namespace, store_key
from sglang_speckv.storage import env as env_module

NS = namespace("SmolLM2-135M", kv_dtype="bf16", layout="layer_first", page_size=64, format_version=1)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD_ENV = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail the test (TimeoutError) if the block runs longer than ``seconds``."""

    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def value_of(key: str, size: int = 3000) -> bytes:
    return random.Random(key).randbytes(size)


def config_of(tmp_path, *capacities, **top):
    return load_config(overrides={"tiers": [
        {"name": f"t{i}", "path": str(tmp_path / f"t{i}"), "capacity": c,
         "sync": "none" if i == 0 else "data"} for i, c in enumerate(capacities)], **top})


def audit(store):
    for tier in store.tiers:
        assert tier.audit() == [], tier.name
        assert tier.counters()["bytes"] <= tier.capacity, tier.name


# --- two writer processes, SIGKILLed: no acknowledged page lost -----------------------------

# Writes batches of 1-3 pages (a chain each) forever, printing a batch's number once its put
# has returned True: from then on the store must hold the batch (the last tier never fills).
WRITER = r"""
import json, random, sys
from sglang_speckv.config import load_config
from sglang_speckv.storage import TieredStore, chain_parents
config = load_config(overrides=json.loads(sys.argv[1]))
name, ns = sys.argv[2], bytes.fromhex(sys.argv[3])
store = TieredStore(config, ns)
rng = random.Random(name)
batch = 0
while True:
    keys = [f"{name}-b{batch}-p{i}" for i in range(rng.randint(1, 3))]
    values = [random.Random(k).randbytes(3000) for k in keys]
    if all(store.put(keys, values, parents=chain_parents(keys))):
        print(batch, flush=True)
    batch += 1
"""


def acknowledged(name: str, batches: list[int]) -> list[str]:
    keys = []
    for batch in batches:
        n = random.Random(name)  # replay the writer's batch sizes
        sizes = [n.randint(1, 3) for _ in range(batch + 1)]
        keys += [f"{name}-b{batch}-p{i}" for i in range(sizes[batch])]
    return keys


def test_two_writers_sigkilled_lose_no_acknowledged_page(tmp_path):
    """Two writer processes share a tiny first tier (every put demotes pages the other wrote)
    and are SIGKILLed at random moments, five rounds; after each round every page whose put
    had returned True reads back bit-exact, and every tier audits clean."""
    overrides = {"tiers": [
        {"name": "ram", "path": str(tmp_path / "ram"), "capacity": 12 * 3024, "sync": "none"},
        {"name": "ssd", "path": str(tmp_path / "ssd"), "capacity": "256MiB", "sync": "data"}],
        "promote_on_hit": False}
    config = load_config(overrides=overrides)
    rng = random.Random(11)
    done: dict[str, list[int]] = {}
    for round_ in range(5):
        names = [f"r{round_}w{w}" for w in range(2)]
        writers = [subprocess.Popen([sys.executable, "-c", WRITER, json.dumps(overrides), name,
                                     NS.hex()], stdout=subprocess.PIPE, text=True, env=CHILD_ENV)
                   for name in names]
        try:
            for writer in writers:
                writer.stdout.readline()  # both running
            for writer in rng.sample(writers, 2):  # killed one after the other, at random
                time.sleep(rng.uniform(0.05, 0.35))
                writer.send_signal(signal.SIGKILL)
            for name, writer in zip(names, writers):
                out, _ = writer.communicate(timeout=30)
                assert writer.returncode == -signal.SIGKILL
                done[name] = [0] + [int(line) for line in out.split()]
        finally:
            for writer in writers:
                writer.kill()
        keys = [k for name, batches in done.items() for k in acknowledged(name, batches)]
        with deadline(60), TieredStore(config, NS) as store:
            got = store.get(keys)
            lost = [k for k, v in zip(keys, got) if v is None]
            assert lost == [], f"round {round_}: {len(lost)} acknowledged pages lost, e.g. {lost[:3]}"
            assert all(bytes(v) == value_of(k) for k, v in zip(keys, got))
            # A writer killed between a commit and the round that moves its batch down may
            # leave the tier over capacity; the next write restores it.
            assert store.put([f"after{round_}"], [value_of(f"after{round_}")]) == [True]
            audit(store)
    assert sum(len(b) for b in done.values()) > 100


# --- damaged LMDB files: verified in a child at open, quarantined, never an abort ------------

PSIZE = 4096
P_BRANCH, P_LEAF = 0x01, 0x02

# Opens a (maybe damaged) store and uses every entry point; prints what it saw. Run in a
# child process: if LMDB aborted, only the child would die, and the test would see it.
USER = r"""
import json, random, sys
from sglang_speckv.config import load_config
from sglang_speckv.storage import TieredStore
config = load_config(overrides=json.loads(sys.argv[1]))
keys = json.loads(sys.argv[2])
with TieredStore(config, bytes.fromhex(sys.argv[3])) as store:
    got = store.get(keys)
    wrong = sum(v is not None and bytes(v) != random.Random(k).randbytes(len(v)) for k, v in zip(keys, got))
    new = [f"new{i}" for i in range(300)]
    ok = store.put(new, [random.Random(k).randbytes(3000) for k in new])
    store.exists_prefix(keys)
    stats = store.stats()
    store.flush()
    store.clear()
    problems = {t.name: t.audit() for t in store.tiers}
print(json.dumps({"wrong": wrong, "found": sum(v is not None for v in got), "puts": sum(ok),
                  "damaged": sum(t["damaged"] for t in stats["tiers"]), "problems": problems}))
"""


def _tree_pages(data: bytes) -> list[int]:
    """Numbers of the B-tree pages (branch or leaf) in an LMDB data file."""
    pages = []
    for n in range(2, len(data) // PSIZE):
        pgno, flags = struct.unpack_from("<Q2xH", data, n * PSIZE)
        if pgno == n and flags & (P_BRANCH | P_LEAF):
            pages.append(n)
    return pages


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    """A one-tier store with chains of pages and many small ones (trees of several levels)."""
    path = tmp_path_factory.mktemp("healthy")
    overrides = {"tiers": [{"name": "ram", "path": str(path / "ram"), "capacity": "8MiB",
                            "sync": "none"}]}
    keys = [f"c{c}-p{i}" for c in range(60) for i in range(5)] + [f"s{i}" for i in range(2000)]
    with TieredStore(load_config(overrides=overrides), NS) as store:
        for c in range(60):
            chain = keys[c * 5:c * 5 + 5]
            store.put(chain, [value_of(k) for k in chain], parents=chain_parents(chain))
        small = keys[300:]
        store.put(small, [random.Random(k).randbytes(7) for k in small])
        used = (store.tiers[0].env.lmdb.info()["last_pgno"] + 1) * PSIZE
    return path, keys, used


@pytest.mark.parametrize("damage", ["truncated"] + [f"flips{seed}" for seed in range(8)])
def test_damaged_file_never_aborts(healthy, tmp_path, damage):
    """A data file truncated to half the pages in use, or bit flips in B-tree pages: the store opens
    (quarantining what its child-process walk rejects), serves only exact values or misses,
    takes new pages, and `speckv store --check` reports instead of aborting."""
    source, keys, used = healthy
    shutil.copytree(source / "ram", tmp_path / "ram")
    data_file = tmp_path / "ram" / "data.mdb"
    data = bytearray(data_file.read_bytes())
    if damage == "truncated":
        data = data[:used // 2]
    else:
        rng = random.Random(damage)
        page = rng.choice(_tree_pages(data))
        for _ in range(4):
            data[page * PSIZE + rng.randrange(16, PSIZE)] ^= 1 << rng.randrange(8)
    data_file.write_bytes(bytes(data))
    overrides = {"tiers": [{"name": "ram", "path": str(tmp_path / "ram"), "capacity": "8MiB",
                            "sync": "none"}]}
    toml = tmp_path / "tiers.toml"
    toml.write_text(f'[[tiers]]\nname = "ram"\npath = "{tmp_path / "ram"}"\ncapacity = "8MiB"\n'
                    'sync = "none"\n')
    check = subprocess.run([sys.executable, "-m", "sglang_speckv.cli", "store", "--config",
                            str(toml), "--check"], capture_output=True, text=True, timeout=60,
                           env=CHILD_ENV)
    assert check.returncode in (0, 1) and "Traceback" not in check.stderr, check.stderr
    flagged = "damaged:" in check.stdout
    used = subprocess.run([sys.executable, "-c", USER, json.dumps(overrides), json.dumps(keys),
                           NS.hex()], capture_output=True, text=True, timeout=60, env=CHILD_ENV)
    assert used.returncode == 0, used.stderr[-2000:]
    seen = json.loads(used.stdout)
    assert seen["wrong"] == 0 and seen["puts"] == 300
    assert seen["problems"] == {"ram": []}
    quarantined = [p for p in os.listdir(tmp_path / "ram") if p.startswith("damaged-")]
    assert bool(quarantined) == flagged  # what --check rejects, the open moves aside
    if flagged:
        assert "is damaged" in used.stderr and "starting the tier empty" in used.stderr
        assert seen["found"] == 0
    if damage == "truncated":
        assert flagged


def test_damaged_tree_in_use_elsewhere_is_a_startup_error(healthy, tmp_path):
    source, _, used = healthy
    shutil.copytree(source / "ram", tmp_path / "ram")
    data_file = tmp_path / "ram" / "data.mdb"
    holder = subprocess.Popen([sys.executable, "-c", "import lmdb, sys; e = lmdb.open(sys.argv[1]); "
                               "print(1, flush=True); sys.stdin.read()", str(tmp_path / "ram")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        holder.stdout.readline()
        data = bytearray(data_file.read_bytes())
        data_file.write_bytes(bytes(data[:used // 2]))
        config = load_config(overrides={"tiers": [{"name": "ram", "path": str(tmp_path / "ram"),
                                                   "capacity": "8MiB", "sync": "none"}]})
        with pytest.raises(env_module.StoreError, match=r"tiers\[0\].path: .* damaged .* open in "
                                                        "another process"):
            TieredStore(config, NS)
    finally:
        holder.kill()
        holder.wait(10)


# --- damaged records: validated, repaired or dropped, counted; never an exception ----------

def _put_chains(store, chains=8, length=3):
    keys = []
    for c in range(chains):
        chain = [f"c{c}-p{i}" for i in range(length)]
        assert all(store.put(chain, [value_of(k) for k in chain], parents=chain_parents(chain)))
        keys += chain
    return keys


def _raw(tier):
    """A write transaction on the tier's LMDB environment, behind the store's back."""
    return tier.env.lmdb.begin(write=True)


@pytest.mark.parametrize("damage", ["short counter", "zero bytes", "huge bytes", "pages off",
                                    "longer value", "shorter value", "empty leaf key",
                                    "stale leaf", "leaf of a missing page", "short meta",
                                    "bad parent", "parent cycles"])
def test_damaged_records_are_repaired_not_raised(tmp_path, damage):
    """Each kind of damaged bookkeeping record, then a workload that must evict: every put
    succeeds, reads are exact or misses, the damage is counted, no hang, and the tier audits
    clean afterwards (repaired)."""
    config = config_of(tmp_path, 30 * 3024, "64MiB", recency_flush_seconds=0.0)
    with deadline(60), TieredStore(config, NS) as store:
        keys = _put_chains(store)
        t0 = store.tiers[0]
        k1 = store_key(NS, keys[5])
        with _raw(t0) as txn:
            meta = bytes(txn.get(k1, db=t0._meta))
            tick = struct.unpack_from("<Q", meta)[0]
            if damage == "short counter":
                txn.put(b"bytes", b"\1\2\3", db=t0._state)
            elif damage == "zero bytes":
                txn.put(b"bytes", bytes(8), db=t0._state)
            elif damage == "huge bytes":
                txn.put(b"bytes", struct.pack("<Q", 1 << 62), db=t0._state)
            elif damage == "pages off":
                txn.put(b"pages", struct.pack("<Q", 1000), db=t0._state)
            elif damage == "longer value":  # removal must not subtract more than was counted
                txn.put(k1, bytes(100_000), db=t0._pages)
            elif damage == "shorter value":
                txn.put(k1, b"x", db=t0._pages)
            elif damage == "empty leaf key":
                txn.put(struct.pack(">Q", 0), b"", db=t0._leaves)
            elif damage == "stale leaf":  # an entry out of order: its tick is not the page's
                txn.put(struct.pack(">Q", 0) + k1, b"", db=t0._leaves)
                txn.delete(struct.pack(">Q", tick) + k1, db=t0._leaves)
            elif damage == "leaf of a missing page":
                txn.put(struct.pack(">Q", 1) + b"nowhere", b"", db=t0._leaves)
            elif damage == "short meta":
                txn.put(k1, meta[:10], db=t0._meta)
            elif damage == "bad parent":
                txn.put(k1, meta[:40] + b"p" * 600, db=t0._meta)
            elif damage == "parent cycles":  # each chain's head names its tail: no leaf left
                for c in range(8):
                    head, tail = (store_key(NS, f"c{c}-p{i}") for i in (0, 2))
                    txn.put(head, bytes(txn.get(head, db=t0._meta))[:40] + tail, db=t0._meta)
                    txn.put(tail, head, db=t0._children)
                txn.drop(t0._leaves, delete=False)
        more = [f"more{i}" for i in range(80)]
        for start in range(0, 80, 4):  # over the tier's capacity: must evict
            part = more[start:start + 4]
            assert all(store.put(part, [value_of(k) for k in part], parents=chain_parents(part)))
        got = store.get(keys + more)
        assert all(v is None or bytes(v) == value_of(k) for k, v in zip(keys + more, got))
        assert all(v is not None for v in got[len(keys):])  # the new pages are all there
        stats = store.stats()
        if damage != "parent cycles":  # (bad input, not damage: nothing to count)
            assert stats["tiers"][0]["damaged"] + stats["tiers"][0]["corrupt"] > 0
        store.flush()
        store.put(["last"], [value_of("last")])  # one more write repairs what reads found
        audit(store)
        store.clear()
        assert [t["pages"] for t in store.stats()["tiers"]] == [0, 0]


@pytest.mark.parametrize("field", ["tick", "raw size", "parent", "header"])
@pytest.mark.parametrize("how", ["one bit", "all ones"])
def test_flipped_meta_fields_never_return_wrong_bytes_or_stop_writes(tmp_path, field, how):
    """A page's meta entry: tick u64 | raw size u64 | record header (24 B, checksummed with
    the value) | parent key. Damage in the header is a corrupt page (a miss); in the other
    fields it can only misorder eviction, skew raw_bytes or leave an index row behind. With
    it in three pages' entries and the counters damaged too (so they are rebuilt from the
    meta entries), a workload that must evict and promote: every put succeeds, every read
    is exact or a miss, nothing raises."""
    config = config_of(tmp_path, 30 * 3024, "64MiB", recency_flush_seconds=0.0)
    with deadline(60), TieredStore(config, NS) as store:
        keys = _put_chains(store)
        t0 = store.tiers[0]
        offset = {"tick": 0, "raw size": 8, "header": 16 + 12, "parent": 40 + 9}[field]
        with _raw(t0) as txn:
            for key in keys[3:6]:  # the second chain: p0 (no parent), p1, p2
                meta = bytearray(txn.get(store_key(NS, key), db=t0._meta))
                if offset >= len(meta):
                    continue  # no parent to damage
                if how == "one bit":
                    meta[offset] ^= 0x80  # the top bit of a u64 (or a byte of a key)
                else:
                    end = offset + 8 if field != "parent" else len(meta)
                    meta[offset:end] = b"\xff" * (end - offset)
                txn.put(store_key(NS, key), bytes(meta), db=t0._meta)
            txn.put(b"bytes", b"\1\2\3", db=t0._state)  # the counters get rebuilt from meta
        more = [f"more{i}" for i in range(80)]
        for start in range(0, 80, 4):  # over the tier's capacity: must evict
            part = more[start:start + 4]
            assert all(store.put(part, [value_of(k) for k in part], parents=chain_parents(part)))
        for _ in range(2):  # the second pass reads what the first promoted
            got = store.get(keys + more)
            assert all(v is None or bytes(v) == value_of(k) for k, v in zip(keys + more, got))
        assert all(store.put(["last"], [value_of("last")]))
        assert all(t["bytes"] <= t["capacity"] for t in store.stats()["tiers"])
        if field == "header":
            assert sum(t["corrupt"] for t in store.stats()["tiers"]) > 0


def test_damaged_index_stops_eviction_instead_of_hanging(tmp_path):
    """Eviction on an index whose deletes miss (what a damaged branch key does to LMDB's
    searches; simulated, since the open-time walk quarantines real ones): the walk ends, in
    bounded steps, with the misses counted."""
    from sglang_speckv.storage import tier as tier_module

    with deadline(30), TieredStore(config_of(tmp_path, 100 * 3024), NS) as store:
        _put_chains(store, chains=6)
        t0 = store.tiers[0]

        def body(txn):
            w = tier_module._Writer(txn, t0, [])
            w.remove = lambda key, keep=False: None  # finds nothing to delete
            return w.evict(0), w.damaged, w.stuck

        victims, damaged, stuck = t0.env.write(body, commit=False)
        assert victims == [] and damaged > 0


# --- a killed reader: its slot is freed, the file stays bounded ------------------------------

READER = r"""
import json, os, signal, sys
from sglang_speckv.config import load_config
from sglang_speckv.storage import TieredStore
store = TieredStore(load_config(overrides=json.loads(sys.argv[1])), b"namespce")
with store.tiers[0].env.read() as txn:  # a snapshot pinned by a reader slot...
    print(os.getpid(), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # ...which the dead process never releases
"""


def test_killed_reader_does_not_grow_the_file(tmp_path):
    """A process SIGKILLed inside a read transaction leaves its reader slot; a writer that
    was open before keeps data.mdb within 2 x capacity + 1 MiB while writing 16x the
    capacity through the tier (the stale slot is cleared by the periodic reader_check)."""
    capacity = 256 << 10
    overrides = {"tiers": [{"name": "ram", "path": str(tmp_path / "ram"), "capacity": capacity,
                            "sync": "none"}]}
    with deadline(60), TieredStore(load_config(overrides=overrides), NS) as store:
        store.put(["first"], [value_of("first")])
        reader = subprocess.run([sys.executable, "-c", READER, json.dumps(overrides)],
                                capture_output=True, text=True, timeout=30, env=CHILD_ENV)
        assert reader.returncode == -signal.SIGKILL
        dead = int(reader.stdout.split()[0])
        assert str(dead) in store.tiers[0].env.lmdb.readers()  # the stale slot
        for i in range(16 * capacity // (4 * 16384)):
            keys = [f"w{i}-{j}" for j in range(4)]
            assert all(store.put(keys, [value_of(k, 16384) for k in keys]))
        time.sleep(env_module.READER_CHECK_SECONDS)
        store.put(["after"], [value_of("after")])
        assert str(dead) not in store.tiers[0].env.lmdb.readers()
        size = os.path.getsize(tmp_path / "ram" / "data.mdb")
        assert size <= 2 * capacity + env_module.MIN_GROWTH, size
        audit(store)


def test_lmdb_errors_at_run_time_are_misses_and_false(tmp_path):
    """Every entry point with a tier whose environment fails (here: closed under the store,
    so each LMDB call raises lmdb.Error): misses, False, zeros, never an exception."""
    with deadline(30), TieredStore(config_of(tmp_path, 30 * 3024, "1MiB"), NS) as store:
        keys = _put_chains(store, chains=2)
        store.tiers[1].env.lmdb.close()
        assert store.put(["x"], [value_of("x")]) in ([True], [False])
        store.tiers[0].env.lmdb.close()
        assert store.get(keys) == [None] * len(keys)
        assert store.exists_prefix(keys) == 0
        assert store.put(["y"], [value_of("y")]) == [False]
        assert [t["pages"] for t in store.stats()["tiers"]] == [0, 0]
        store.flush()
        store.clear()
        store.tiers = []  # closed already
