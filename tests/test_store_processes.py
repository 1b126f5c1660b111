"""The store across processes and threads: fork, concurrent writers and readers, SIGKILL."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from sglang_speckv.config import load_config
from sglang_speckv.storage import TieredStore, chain_parents, namespace

NS = namespace("SmolLM2-135M", kv_dtype="bf16", layout="layer_first", page_size=64, format_version=1)
FORK = multiprocessing.get_context("fork")


def value_of(key, size=4096):
    return random.Random(key).randbytes(size)


def tiers(tmp_path, *capacities, **top):
    return load_config(overrides={"tiers": [
        {"name": f"t{i}", "path": str(tmp_path / f"t{i}"), "capacity": c,
         "sync": "none" if i == 0 else "data"}
        for i, c in enumerate(capacities)], **top})


def audit(store):
    for tier in store.tiers:
        assert tier.audit() == [], tier.name
        assert tier.counters()["bytes"] <= tier.capacity, tier.name


def _child_uses_inherited_store(store, keys, done):
    # Runs in a forked child: the parent's store object must reopen, not reuse, its tiers.
    ok = [bytes(v) for v in store.get(keys)] == [value_of(k) for k in keys]
    store.put(["child"], [value_of("child")])
    store.close()
    done.put(ok)


def test_store_reopens_after_fork(tmp_path):
    with TieredStore(tiers(tmp_path, "1MiB", "1MiB"), NS) as store:
        keys = [f"parent-{i}" for i in range(4)]
        store.put(keys, [value_of(k) for k in keys])
        done = FORK.Queue()
        child = FORK.Process(target=_child_uses_inherited_store, args=(store, keys, done))
        child.start()
        child.join(60)
        assert child.exitcode == 0 and done.get(timeout=5)
        assert bytes(store.get(["child"])[0]) == value_of("child")
        store.put(["after"], [b"x"])  # the parent's environments still work
        audit(store)


def _grow_map(config):
    with TieredStore(config, NS) as store:
        keys = [f"big-{i}" for i in range(40)]
        store.put(keys, [value_of(k, 100_000) for k in keys])  # ~4 MiB in one transaction


def test_map_grown_by_another_process(tmp_path):
    config = tiers(tmp_path, "1MiB")  # first map: 1 MiB
    with TieredStore(config, NS) as store:
        store.put(["mine"], [b"v"])
        child = FORK.Process(target=_grow_map, args=(config,))
        child.start()
        child.join(60)
        assert child.exitcode == 0
        assert store.exists_prefix(["big-0"]) == 1  # adopted the map the child grew
        store.put(["more"], [value_of("more", 100_000)])
        assert store.tiers[0].env.lmdb.info()["map_size"] >= 4 << 20
        audit(store)


CHAINS = [[f"chain{c}-page{i}" for i in range(6)] for c in range(12)]


def _worker(config, seed, seconds, errors, stats):
    """Three threads writing and reading overlapping chains; records any wrong byte."""

    def run(thread_seed):
        rng = random.Random(thread_seed)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            chain = rng.choice(CHAINS)
            if rng.random() < 0.5:
                start = rng.randrange(len(chain))
                part = chain[start:start + 3]
                ok = store.put(part, [value_of(k) for k in part],
                               parents=chain_parents(part, chain[start - 1] if start else None))
                if not all(ok):
                    errors.put(f"put failed {part}")
            else:
                n = store.exists_prefix(chain)
                for key, value in zip(chain, store.get(chain[:n])):
                    if value is not None and bytes(value) != value_of(key):
                        errors.put(f"wrong bytes for {key}")

    store = TieredStore(config, NS)
    threads = [threading.Thread(target=run, args=(seed * 10 + t,)) for t in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats.put(store.stats())
    store.close()


def test_two_processes_three_threads(tmp_path):
    # Small tiers, so the run demotes, promotes and drops all the time.
    config = tiers(tmp_path, 10 * 4120, 25 * 4120, recency_flush_seconds=0.01)
    errors, stats = FORK.Queue(), FORK.Queue()
    workers = [FORK.Process(target=_worker, args=(config, seed, 3.0, errors, stats)) for seed in (1, 2)]
    for w in workers:
        w.start()
    done = [stats.get(timeout=120) for _ in workers]
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0, 0]
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert found == []
    for events in ("hits", "demotions", "promotions", "evictions"):  # it did exercise them
        assert sum(t[events] for d in done for t in d["tiers"]) > 0, events
    with TieredStore(config, NS) as store:
        audit(store)
        assert sum(t["pages"] for t in store.stats()["tiers"]) > 0


# The writer killed by test_sigkill_mid_batch: writes batches (chains) of pages of mixed
# sizes forever, printing a batch's number once its put has returned.
WRITER = r"""
import json, random, sys
from sglang_speckv.config import load_config
from sglang_speckv.storage import TieredStore, chain_parents
config = load_config(overrides=json.loads(sys.argv[1]))
first, pages = int(sys.argv[2]), int(sys.argv[3])
store = TieredStore(config, bytes.fromhex(sys.argv[4]))
batch = first
while True:
    keys = [f"batch{batch}-page{i}" for i in range(pages)]
    values = [random.Random(k).randbytes(random.Random(k + "size").randint(1, 300_000)) for k in keys]
    assert all(store.put(keys, values, parents=chain_parents(keys)))
    print(batch, flush=True)
    batch += 1
"""


def expected(key):
    return random.Random(key).randbytes(random.Random(key + "size").randint(1, 300_000))


def test_sigkill_mid_batch(tmp_path):
    """Kill a writer (SIGKILL) at random moments, five times; after each, the store must
    reopen consistent, with every batch it reported committed whole, and each batch
    either whole or absent (no partial batch, no partial page)."""
    pages = 16  # ~2.4 MB per batch
    overrides = {"tiers": [
        {"name": "ram", "path": str(tmp_path / "ram"), "capacity": "12MiB", "sync": "none"},
        {"name": "ssd", "path": str(tmp_path / "ssd"), "capacity": "1GiB", "sync": "data"}],
        "promote_on_hit": False}
    config = load_config(overrides=overrides)
    rng = random.Random(0)
    committed: list[int] = []
    next_batch = 0
    for _ in range(5):
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, json.dumps(overrides), str(next_batch), str(pages), NS.hex()],
            stdout=subprocess.PIPE, text=True)
        reported = [int(writer.stdout.readline())]  # running: at least one batch committed
        time.sleep(rng.uniform(0.0, 0.4))
        writer.send_signal(signal.SIGKILL)
        reported += [int(line) for line in writer.stdout.read().split()]
        writer.wait()
        assert writer.returncode == -signal.SIGKILL
        committed += reported
        started = reported[-1] + 2  # the batch in flight when killed, at most
        with TieredStore(config, NS) as store:
            audit(store)
            for batch in range(started):
                keys = [f"batch{batch}-page{i}" for i in range(pages)]
                present = store.exists_prefix(keys)
                assert present in (0, pages), f"batch {batch}: {present} of {pages} pages"
                if batch in committed:
                    assert present == pages, f"committed batch {batch} lost"
            last = [f"batch{committed[-1]}-page{i}" for i in range(pages)]
            assert [bytes(v) for v in store.get(last)] == [expected(k) for k in last]
        next_batch = started
    assert len(committed) >= 5


def test_every_page_verifies_after_kills(tmp_path):
    """All values left by killed writers read back bit-exact (a partial value would fail its
    checksum and show up as a miss or corrupt count)."""
    overrides = {"tiers": [{"name": "ram", "path": str(tmp_path / "ram"), "capacity": "64MiB",
                            "sync": "none"}]}
    for round_ in range(3):
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, json.dumps(overrides), str(round_ * 1000), "8", NS.hex()],
            stdout=subprocess.PIPE, text=True)
        writer.stdout.readline()
        time.sleep(0.05 * round_)
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
    with TieredStore(load_config(overrides=overrides), NS) as store:
        keys = []
        for tier in store.tiers:
            keys += [k[len(NS):].decode() for k in tier.keys_with_prefix(NS)]
        values = store.get(keys)
        assert all(v is not None and bytes(v) == expected(k) for k, v in zip(keys, values))
        assert keys and store.stats()["tiers"][0]["corrupt"] == 0
        audit(store)
