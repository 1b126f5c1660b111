"""The tiered LMDB page store, one rule at a time, on real LMDB environments in tmp_path."""

from __future__ import annotations

import json
import os
import random

import lmdb
import pytest

from sglang_speckv.config import load_config
from sglang_speckv.storage import StoreError, TieredStore, chain_parents, namespace, record, store_key
from sglang_speckv.storage import env as env_module

NS = namespace("SmolLM2-135M", kv_dtype="bf16", layout="layer_first", page_size=64, format_version=1)
PAGE = 10_000  # bytes per test value: small, so capacities of a few pages stay tiny
RECORD = PAGE + record.HEADER_SIZE  # bytes a test page counts for in a tier


def make_config(tmp_path, *capacities_in_pages, **top):
    """Config with one tier per capacity (in test pages); the first tier is 'none'-synced."""
    tiers = [{"name": f"t{i}", "path": str(tmp_path / f"t{i}"), "capacity": pages * RECORD,
              "sync": "none" if i == 0 else "data"} for i, pages in enumerate(capacities_in_pages)]
    return load_config(overrides={"tiers": tiers, **top})


def keys_of(n, tag="k"):
    return [f"{tag}{i:063d}"[:64] for i in range(n)]


def value_of(key):
    """Deterministic value per key, so any reader can check what it got."""
    return random.Random(key).randbytes(PAGE)


def put_chain(store, keys, prefix_key=None):
    assert all(store.put(keys, [value_of(k) for k in keys], parents=chain_parents(keys, prefix_key)))


def check(store):
    for tier in store.tiers:
        assert tier.audit() == [], tier.name
        assert tier.counters()["bytes"] <= tier.capacity


def test_put_get_roundtrip_and_stats(tmp_path):
    with TieredStore(make_config(tmp_path, 100), NS) as store:
        keys = keys_of(5)
        assert store.put(keys, [value_of(k) for k in keys], raw_sizes=[3 * PAGE] * 5) == [True] * 5
        got = store.get(keys + ["absent"])
        assert got[-1] is None
        assert [bytes(v) for v in got[:5]] == [value_of(k) for k in keys]
        assert all(isinstance(v, bytearray) for v in got[:5])  # writable, for torch.frombuffer
        assert store.exists_prefix(keys) == 5
        stats = store.stats()
        tier = stats["tiers"][0]
        assert (tier["pages"], tier["bytes"], tier["raw_bytes"]) == (5, 5 * RECORD, 15 * PAGE)
        assert (tier["hits"], tier["misses"], stats["hits"], stats["misses"]) == (5, 1, 5, 1)
        assert json.loads(json.dumps(stats)) == stats  # plain JSON, as the stats file holds it
        check(store)


def test_get_into_caller_buffers(tmp_path):
    import numpy as np

    with TieredStore(make_config(tmp_path, 100, 100), NS) as store:
        keys = keys_of(4)
        put_chain(store, keys)
        store.tiers[1].commit(inserts=[_page("lower")])
        buffers = [np.zeros(PAGE + 100, dtype=np.uint8) for _ in range(5)]
        got = store.get(keys + ["lower"], out=buffers)
        assert [bytes(v) for v in got] == [value_of(k) for k in keys + ["lower"]]
        assert all(isinstance(v, memoryview) and len(v) == PAGE for v in got)
        assert bytes(buffers[2][:PAGE]) == value_of(keys[2])  # written in place
        # A value larger than its buffer is a miss, never a truncated value, and stays.
        small = [bytearray(PAGE - 1)] * 4
        assert store.get(keys, out=small) == [None] * 4
        assert store.stats()["tiers"][0]["corrupt"] == 0 and store.exists_prefix(keys) == 4


def test_values_may_be_any_bytes_like(tmp_path):
    import numpy as np

    with TieredStore(make_config(tmp_path, 100), NS) as store:
        array = np.arange(PAGE // 4, dtype=np.int32)
        assert store.put(["a", "b", "c"], [array, bytearray(b"xy"), memoryview(b"")]) == [True] * 3
        assert [bytes(v) for v in store.get(["a", "b", "c"])] == [array.tobytes(), b"xy", b""]
        assert store.stats()["tiers"][0]["raw_bytes"] == PAGE + 2  # default raw size: value size


def test_existing_key_is_a_cheap_no_op(tmp_path):
    with TieredStore(make_config(tmp_path, 100), NS) as store:
        keys = keys_of(3)
        put_chain(store, keys)
        before = store.tiers[0].counters()
        # Same keys, other values: nothing rewritten (keys name content), still True.
        assert store.put(keys, [b"other"] * 3) == [True] * 3
        after = store.tiers[0].counters()
        assert (after["pages"], after["bytes"]) == (before["pages"], before["bytes"])
        assert [bytes(v) for v in store.get(keys)] == [value_of(k) for k in keys]


def test_persists_across_reopen(tmp_path):
    config = make_config(tmp_path, 100, 100)
    with TieredStore(config, NS) as store:
        put_chain(store, keys_of(4))
    with TieredStore(config, NS) as store:
        assert [bytes(v) for v in store.get(keys_of(4))] == [value_of(k) for k in keys_of(4)]


def test_namespaces_keep_servers_apart(tmp_path):
    config = make_config(tmp_path, 100)
    base = dict(kv_dtype="bf16", layout="layer_first", page_size=64, format_version=1)
    spaces = {
        namespace("m", **base),
        namespace("other-model", **base),
        namespace("m", **{**base, "kv_dtype": "fp8_e4m3"}),
        namespace("m", **{**base, "layout": "page_first"}),
        namespace("m", **{**base, "page_size": 32}),
        namespace("m", **{**base, "format_version": 2}),
        namespace("m", **base, tp_rank=1, tp_size=2),
        namespace("m", **base, pp_rank=1, pp_size=2),
        namespace("m", **base, cp_rank=1, cp_size=2),
        namespace("m", **base, dcp_rank=1, dcp_size=2),
    }
    assert len(spaces) == 10 and all(len(ns) == 8 for ns in spaces)
    # Replicated (MLA) KV: every TP rank shares one copy.
    assert (namespace("m", **base, tp_rank=0, tp_size=4, kv_replicated=True)
            == namespace("m", **base, tp_rank=3, tp_size=4, kv_replicated=True))
    a, b = sorted(spaces)[:2]
    with TieredStore(config, a) as store_a, TieredStore(config, b) as store_b:
        store_a.put(["page"], [b"from a"])
        assert store_b.get(["page"]) == [None] and store_b.exists_prefix(["page"]) == 0
        store_b.put(["page"], [b"from b"])
        assert bytes(store_a.get(["page"])[0]) == b"from a"
        store_a.clear()
        assert store_a.get(["page"]) == [None]
        assert bytes(store_b.get(["page"])[0]) == b"from b"
        check(store_a)


def test_exists_prefix_stops_at_the_first_gap(tmp_path):
    with TieredStore(make_config(tmp_path, 100, 100), NS) as store:
        keys = keys_of(6)
        store.put(keys[:2] + keys[3:], [value_of(k) for k in keys[:2] + keys[3:]])
        assert store.exists_prefix(keys) == 2
        assert store.exists_prefix(keys[3:]) == 3
        assert store.exists_prefix([]) == 0
        # A prefix split across tiers counts as one run.
        store.tiers[1].commit(inserts=[_page(keys[2])])
        assert store.exists_prefix(keys) == 6


def _page(key, ns=NS):
    from sglang_speckv.storage.tier import Page

    skey = store_key(ns, key)
    return Page(skey, record.seal(skey, value_of(key)), value_of(key), PAGE, None)


def test_capacity_evicts_chain_tails_first(tmp_path):
    with TieredStore(make_config(tmp_path, 10), NS) as store:
        chain = keys_of(8, "a")
        put_chain(store, chain)
        other = keys_of(6, "b")
        put_chain(store, other)  # 14 pages, room for 10: the colder chain loses its tail
        assert store.exists_prefix(chain) == 4 and store.exists_prefix(other) == 6
        assert store.stats()["tiers"][0]["evictions"] == 4
        # Continuing chain "b" (its parent is other[-1]) eats chain "a" from its tail.
        more = keys_of(4, "c")
        put_chain(store, more, prefix_key=other[-1])
        assert store.exists_prefix(chain) == 0 and store.exists_prefix(other + more) == 10
        check(store)


def test_one_batch_bigger_than_the_tier(tmp_path):
    with TieredStore(make_config(tmp_path, 5), NS) as store:
        chain = keys_of(12)
        put_chain(store, chain)
        assert store.exists_prefix(chain) == 5  # the head stays, the tail is gone
        check(store)


def test_reads_refresh_recency(tmp_path):
    with TieredStore(make_config(tmp_path, 6, recency_flush_seconds=0.0), NS) as store:
        a, b = keys_of(3, "a"), keys_of(3, "b")
        put_chain(store, a)
        put_chain(store, b)
        assert all(v is not None for v in store.get(a))  # "a" is now the most recent
        put_chain(store, keys_of(3, "c"))
        assert store.exists_prefix(a) == 3 and store.exists_prefix(b) == 0


def test_accesses_wait_for_the_next_write(tmp_path):
    with TieredStore(make_config(tmp_path, 6, recency_flush_seconds=3600.0), NS) as store:
        a, b = keys_of(3, "a"), keys_of(3, "b")
        put_chain(store, a)
        put_chain(store, b)
        ticks = _ticks(store.tiers[0])
        store.get(a)
        assert _ticks(store.tiers[0]) == ticks  # remembered, not written
        put_chain(store, keys_of(3, "c"))  # written with this transaction, before its inserts
        assert store.exists_prefix(a) == 3 and store.exists_prefix(b) == 0


def _ticks(tier):
    with tier.env.read() as txn:
        return {bytes(k): bytes(v[:8]) for k, v in txn.cursor(db=tier._meta)}


def test_demotion_promotion_and_the_last_tier_drops(tmp_path):
    with TieredStore(make_config(tmp_path, 4, 4), NS) as store:
        a, b, c = keys_of(4, "a"), keys_of(4, "b"), keys_of(4, "c")
        put_chain(store, a)
        put_chain(store, b)  # a -> t1
        tiers = store.stats()["tiers"]
        assert [t["pages"] for t in tiers] == [4, 4] and tiers[0]["demotions"] == 4
        assert store.tiers[1].present([store_key(NS, k) for k in a]) == [True] * 4
        put_chain(store, c)  # b -> t1, a dropped
        assert store.exists_prefix(a) == 0 and store.exists_prefix(b) == 4
        assert store.stats()["tiers"][1]["evictions"] == 4
        # A hit in t1 moves the page up, its place in t0 goes down: a quarter of t0's
        # capacity per read (one page here), the first pages of the read first.
        for n in range(1, 5):
            assert [bytes(v) for v in store.get(b)] == [value_of(k) for k in b]
            assert store.stats()["tiers"][1]["promotions"] == n
            assert store.tiers[0].present([store_key(NS, k) for k in b]) == [True] * n + [False] * (4 - n)
        assert store.stats()["tiers"][1]["hits"] == 4 + 3 + 2 + 1
        assert store.tiers[1].present([store_key(NS, k) for k in c]) == [True] * 4
        check(store)


def test_promotion_keeps_the_copy_a_demotion_counts_on(tmp_path):
    # A promotion writes the page to t0, then removes it from t1 only if its tick there is
    # still the one read. A demotion out of t0 in between copies the page back to t1 first
    # (a touch: it is there) and then deletes it from t0, counting on that copy: kept.
    with TieredStore(make_config(tmp_path, 2, 10), NS) as store:
        keys = keys_of(4)
        put_chain(store, keys)
        t1 = store.tiers[1]
        key = next(k for k in (store_key(NS, k) for k in keys) if t1.present([k])[0])
        page = t1.read([key])[0]
        t1.commit(inserts=[page])  # the demotion's copy
        t1.commit(promoted=[(key, page.tick)])
        assert t1.present([key]) == [True]
        page = t1.read([key])[0]  # nobody wrote it since: the promotion's removal goes ahead
        t1.commit(promoted=[(key, page.tick)])
        assert t1.present([key]) == [False]
        assert t1.audit() == []


def test_a_long_read_promotes_a_share_within_the_soft_bound(tmp_path):
    # One read of 300 pages found below an 8-page first tier promotes a quarter of its
    # capacity (two pages here), the first of the read first; the next read the next two.
    # Promotion is opportunistic: the first tier's file stays within its soft bound
    # (2 x capacity + 1 MiB; promoting all 300 pages at once took it to ~3x that), and every
    # page reads back exact, promoted or not.
    with TieredStore(make_config(tmp_path, 8, 400), NS) as store:
        keys = keys_of(300)
        for start in range(0, 300, 4):
            put_chain(store, keys[start:start + 4], keys[start - 1] if start else None)
        soft = 2 * store.tiers[0].capacity + env_module.MIN_GROWTH
        skeys = [store_key(NS, k) for k in keys]
        for n in range(1, 4):
            assert [bytes(v) for v in store.get(keys)] == [value_of(k) for k in keys]
            assert os.path.getsize(tmp_path / "t0" / "data.mdb") <= soft
            assert store.stats()["tiers"][1]["promotions"] == 2 * n
            assert store.tiers[0].present(skeys[:2 * n + 2]) == [True] * 2 * n + [False] * 2
        check(store)


def test_no_promotion_when_disabled(tmp_path):
    with TieredStore(make_config(tmp_path, 2, 4, promote_on_hit=False), NS) as store:
        a = keys_of(4)
        put_chain(store, a)
        assert all(v is not None for v in store.get(a))
        assert [t["pages"] for t in store.stats()["tiers"]] == [2, 2]
        assert store.stats()["tiers"][1]["promotions"] == 0


def test_a_chain_across_tiers_keeps_its_head(tmp_path):
    # The head of a conversation went down to t1; its continuation is written to t0. When t1
    # must drop pages, it must not drop the head while the continuation lives above.
    with TieredStore(make_config(tmp_path, 10, 20), NS) as store:
        keys = keys_of(40)
        put_chain(store, keys[:20])
        put_chain(store, keys[20:], prefix_key=keys[19])
        assert store.exists_prefix(keys) == 30
        assert sum(v is not None for v in store.get(keys)) == 30
        assert store.exists_prefix(keys) == 30  # and still after promotions moved pages around
        check(store)


def test_recode_hook_on_demotion(tmp_path):
    with TieredStore(make_config(tmp_path, 2, 10), NS) as store:
        store.set_recode("t1", lambda value: b"recoded:" + bytes(value[:4]))
        keys = keys_of(4)
        put_chain(store, keys)
        got = store.get(keys)
        assert [bytes(v) for v in got[:2]] == [value_of(k) for k in keys[:2]]
        assert [bytes(v) for v in got[2:]] == [b"recoded:" + value_of(k)[:4] for k in keys[2:]]
        with pytest.raises(ValueError, match="no tier named"):
            store.set_recode("nope", None)


def test_failing_recode_hook_moves_pages_unchanged(tmp_path):
    def broken(value):
        raise RuntimeError("predictor missing")

    with TieredStore(make_config(tmp_path, 2, 10, promote_on_hit=False), NS) as store:
        store.set_recode("t1", broken)
        keys = keys_of(4)
        put_chain(store, keys)
        assert [bytes(v) for v in store.get(keys)] == [value_of(k) for k in keys]


def _flip(path, needle, offset):
    """Flip one byte of data.mdb at ``offset`` past the only occurrence of ``needle``."""
    data_file = path / "data.mdb"
    data = bytearray(data_file.read_bytes())
    at = data.find(needle)
    assert at >= 0 and data.find(needle, at + 1) < 0
    data[at + offset] ^= 0x10
    data_file.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["value", "value length", "checksum", "magic"])
def test_byte_flip_in_the_file_is_a_miss(tmp_path, where):
    config = make_config(tmp_path, 100)
    keys = keys_of(3)
    with TieredStore(config, NS) as store:
        put_chain(store, keys)
    target = store_key(NS, keys[1])
    header = record.seal(target, value_of(keys[1]))
    needle, offset = {
        "value": (value_of(keys[1])[:64], PAGE // 2),
        "value length": (header, 8),
        "checksum": (header, 20),
        "magic": (header, 1),
    }[where]
    _flip(tmp_path / "t0", needle, offset)
    with TieredStore(config, NS) as store:
        got = store.get(keys)
        assert got[1] is None
        assert bytes(got[0]) == value_of(keys[0]) and bytes(got[2]) == value_of(keys[2])
        assert store.stats()["tiers"][0]["corrupt"] == 1
        assert store.exists_prefix(keys) == 1  # deleted
        check(store)


def test_value_under_the_wrong_key_is_a_miss(tmp_path):
    with TieredStore(make_config(tmp_path, 100), NS) as store:
        put_chain(store, keys_of(2))
        tier = store.tiers[0]
        a, b = (store_key(NS, k) for k in keys_of(2))
        with tier.env.read() as txn:
            value_a = bytes(txn.get(a, db=tier._pages))
        with tier.env.lmdb.begin(write=True) as txn:
            txn.put(b, value_a, db=tier._pages)  # another key's value, same length
            txn.put(store_key(NS, "short"), b"SKVR", db=tier._pages)
            txn.put(store_key(NS, "short"), bytes(16), db=tier._meta)  # a meta entry cut short
        assert store.get(keys_of(2) + ["short"])[1:] == [None, None]
        assert store.stats()["tiers"][0]["corrupt"] == 2


def test_clear_and_stats_after(tmp_path):
    with TieredStore(make_config(tmp_path, 100, 100), NS) as store:
        put_chain(store, keys_of(10))
        store.tiers[1].commit(inserts=[_page("lower")])
        store.clear()
        assert [t["pages"] for t in store.stats()["tiers"]] == [0, 0]
        check(store)


def test_capacity_and_accounting_under_a_random_workload(tmp_path):
    rng = random.Random(7)
    config = make_config(tmp_path, 12, 25, recency_flush_seconds=0.0)
    chains = [keys_of(rng.randint(1, 8), f"c{c}-") for c in range(30)]
    with TieredStore(config, NS) as store:
        for _ in range(150):
            chain = rng.choice(chains)
            if rng.random() < 0.6:
                start = rng.randrange(len(chain))
                part = chain[start:start + rng.randint(1, 4)]
                put_chain(store, part, prefix_key=chain[start - 1] if start else None)
            else:
                n = store.exists_prefix(chain)
                got = store.get(chain[:n])
                assert all(v is not None and bytes(v) == value_of(k) for k, v in zip(chain, got))
            check(store)
    for name in ("t0", "t1"):
        # The file holds the capacity plus LMDB's fragmentation and a batch: bounded.
        capacity = config.tiers[int(name[1])].capacity
        assert os.path.getsize(tmp_path / name / "data.mdb") <= 2 * capacity + env_module.MIN_GROWTH


def test_map_grows_for_a_batch_bigger_than_the_map(tmp_path):
    config = load_config(overrides={"tiers": [
        {"name": "ram", "path": str(tmp_path / "ram"), "capacity": "1MiB", "sync": "none"}]})
    with TieredStore(config, NS) as store:
        assert store.tiers[0].env.lmdb.info()["map_size"] == 1 << 20  # the capacity
        keys = keys_of(300)  # ~3 MiB in one transaction
        put_chain(store, keys)
        map_size = store.tiers[0].env.lmdb.info()["map_size"]
        assert map_size > 3 << 20
        # Grown by allocating the file first: no holes a write through the map could hit.
        data = tmp_path / "ram" / "data.mdb"
        assert os.path.getsize(data) == map_size and os.stat(data).st_blocks * 512 >= map_size
        assert store.exists_prefix(keys) == (1 << 20) // RECORD
        check(store)


def test_startup_errors_name_the_field(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    bad_path = load_config(overrides={"tiers": [{"name": "r", "path": str(a_file / "sub")}]})
    with pytest.raises(StoreError, match=r"tiers\[0\].path: cannot create"):
        TieredStore(bad_path, NS)
    too_big = load_config(overrides={"tiers": [
        {"name": "r", "path": str(tmp_path / "ok")},
        {"name": "s", "path": str(tmp_path / "big"), "capacity": "100000TiB"}]})
    with pytest.raises(StoreError, match=r"tiers\[1\].capacity: .* can hold only"):
        TieredStore(too_big, NS)
    with TieredStore(load_config(overrides={"tiers": [{"name": "r", "path": str(tmp_path / "ok")}]}), NS):
        pass  # the first tier, opened before tiers[1] failed, was released


def test_foreign_or_newer_store_is_refused(tmp_path):
    foreign = tmp_path / "foreign"
    with lmdb.open(str(foreign)) as env, env.begin(write=True) as txn:
        txn.put(b"someone", b"else's")
    config = load_config(overrides={"tiers": [{"name": "r", "path": str(foreign)}]})
    with pytest.raises(StoreError, match=r"tiers\[0\].path: .* not sglang-speckv's"):
        TieredStore(config, NS)
    config = make_config(tmp_path, 10)
    TieredStore(config, NS).close()
    with lmdb.open(str(tmp_path / "t0"), max_dbs=8) as env:
        state = env.open_db(b"state")
        with env.begin(write=True) as txn:
            txn.put(b"schema", b"99", db=state)
    with pytest.raises(StoreError, match=r"layout version 99, this is version 1"):
        TieredStore(config, NS)


def test_unsynced_tier_is_emptied_after_a_reboot(tmp_path):
    config = make_config(tmp_path, 10)  # t0 is sync = "none"
    with TieredStore(config, NS) as store:
        put_chain(store, keys_of(3))
    marker = tmp_path / "t0" / "unsynced_boot"
    assert marker.read_text() == open("/proc/sys/kernel/random/boot_id").read().strip()
    with TieredStore(config, NS) as store:  # same boot: kept
        assert store.exists_prefix(keys_of(3)) == 3
    marker.write_text("an-earlier-boot")
    with TieredStore(config, NS) as store:
        assert store.exists_prefix(keys_of(3)) == 0
        check(store)


def test_bad_arguments(tmp_path):
    with TieredStore(make_config(tmp_path, 10), NS) as store:
        with pytest.raises(ValueError, match="2 keys, 1 values"):
            store.put(["a", "b"], [b"x"])
        with pytest.raises(ValueError, match="the store takes at most"):
            store.get(["x" * 1000])


def test_one_environment_per_directory_per_process(tmp_path):
    config = make_config(tmp_path, 10)
    with TieredStore(config, NS) as one, TieredStore(config, b"other ns") as two:
        assert one.tiers[0].env is two.tiers[0].env
        one.put(["k"], [b"v"])
        assert two.tiers[0].counters()["pages"] == 1
    clash = load_config(overrides={"tiers": [{"name": "x", "path": str(tmp_path / "t0"), "sync": "full"}]})
    with TieredStore(config, NS), pytest.raises(StoreError, match="already open in this process"):
        TieredStore(clash, NS)


def test_store_command(tmp_path, capsys):
    from sglang_speckv.cli import main

    toml = tmp_path / "speckv.toml"
    toml.write_text(f'[[tiers]]\nname = "ram"\npath = "{tmp_path / "ram"}"\ncapacity = "1MiB"\n')
    config = load_config(toml)
    with TieredStore(config, NS) as store:
        put_chain(store, keys_of(3))
    assert main(["store", "--config", str(toml), "--check"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tiers"][0]["pages"] == 3 and report["problems"] == {"ram": []}
    with TieredStore(config, NS) as store:  # break the accounting behind the store's back
        with store.tiers[0].env.lmdb.begin(write=True) as txn:
            txn.delete(store_key(NS, keys_of(3)[2]), db=store.tiers[0]._pages)
    assert main(["store", "--config", str(toml), "--check"]) == 1
    assert json.loads(capsys.readouterr().out)["problems"]["ram"]
