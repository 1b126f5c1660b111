"""The store on a filesystem that fills up or is read-only.

Each case runs in a child process inside a private mount namespace (``unshare``) on a
tmpfs of a few MiB, so the full filesystem is real and nobody else's.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

CASE = r"""
import json, os, subprocess, sys
import lmdb
from sglang_speckv.config import load_config
from sglang_speckv.storage import StoreError, TieredStore

mnt, case = sys.argv[1], sys.argv[2]
NS = b"namespce"
result = {}

def config(path="t0", capacity="6MiB"):
    return load_config(overrides={"tiers": [
        {"name": "ram", "path": f"{mnt}/{path}", "capacity": capacity, "sync": "none"}]})

def fill(mib):
    # Up to mib MiB of junk, or until the filesystem is full.
    with open(f"{mnt}/junk", "wb", buffering=0) as f:
        for _ in range(mib * 16):
            try:
                f.write(b"\1" * (1 << 16))
            except OSError:
                break

def value(key):
    return key.encode() * (300_000 // len(key))

if case == "full_evicts":
    with TieredStore(config(), NS) as store:
        fill(4)  # the store's 6 MiB no longer fit: only ~4 MiB of the tmpfs are left
        keys = [f"page{i}" for i in range(60)]
        result["puts"] = [all(store.put(keys[i:i + 4], [value(k) for k in keys[i:i + 4]]))
                          for i in range(0, 60, 4)]
        result["last_batch"] = [bytes(v) == value(k) if v is not None else None
                                for k, v in zip(keys[-4:], store.get(keys[-4:]))]
        result["audit"] = store.tiers[0].audit()
        result["evictions"] = store.stats()["tiers"][0]["evictions"]
elif case == "full_from_the_start":
    with TieredStore(config(), NS) as store:  # its first map: the 6 MiB capacity, allocated
        fill(8)  # all the tmpfs has left
        keys = [f"big{i}" for i in range(24)]  # 7.2 MB in one batch: the map must grow
        result["full"] = store.put(keys, [value(k) for k in keys])
        os.unlink(f"{mnt}/junk")
        result["after"] = store.put(keys[:4], [value(k) for k in keys[:4]])
        result["read"] = bytes(store.get(keys[:1])[0]) == value(keys[0])
        result["audit"] = store.tiers[0].audit()
elif case in ("promote_into_full", "demote_into_full"):
    # Two tiers, one on the small tmpfs (then filled up), one on the ordinary disk beside it.
    full, disk = f"{mnt}/t0", f"{mnt}/../disk"
    first, second = (full, disk) if case == "promote_into_full" else (disk, full)
    cap = "1MiB" if case == "promote_into_full" else "2MiB"
    store = TieredStore(load_config(overrides={"tiers": [
        {"name": "t0", "path": first, "capacity": cap, "sync": "none"},
        {"name": "t1", "path": second, "capacity": "8MiB" if second == disk else "1MiB",
         "sync": "none"}]}), NS)
    with store:
        n = 12 if case == "promote_into_full" else 8
        a, b = [f"a{i}" for i in range(n)], [f"b{i}" for i in range(6)]
        for i in range(n):  # one page a write: the first tier's file stays near its capacity
            assert store.put(a[i:i + 1], [value(a[i])], parents=[a[i - 1] if i else None])
        result["file"] = os.path.getsize(f"{first}/data.mdb")
        result["below"] = store.tiers[1].counters()["pages"]
        result["in_t0"] = store.tiers[0].present([store._key(k) for k in a])
        fill(8)  # the tmpfs tier's file can no longer grow
        if case == "promote_into_full":
            # A read promotes one page here (a quarter of t0, at least one page), which the
            # free pages of t0's map could hold: take those with ballast records (in its
            # state database, which the store ignores) until the map is full.
            tier = store.tiers[0]
            for i in range(1000):
                try:
                    with tier.env.lmdb.begin(write=True) as txn:
                        txn.put(b"ballast%d" % i, bytes(1 << 16), db=tier._state)
                except lmdb.MapFullError:
                    break
            # The pages found in t1 cannot be written to t0: they must stay in t1.
            for _ in range(2):
                result.setdefault("reads", []).append(
                    [v is not None and bytes(v) == value(k) for k, v in zip(a, store.get(a))])
        else:
            # The victims of t0 cannot be written to t1: they must stay in t0.
            result["put"] = store.put(b, [value(k) for k in b], parents=[None] + b[:-1])
            result["reads"] = [[v is not None and bytes(v) == value(k)
                                for k, v in zip(a + b, store.get(a + b))]]
            result["over"] = store.tiers[0].counters()["bytes"] > store.tiers[0].capacity
            os.unlink(f"{mnt}/junk")  # room again: the next write demotes
            store.put(["c"], [value("c")])
            result["over_after"] = store.tiers[0].counters()["bytes"] > store.tiers[0].capacity
        result["stats"] = [{k: t[k] for k in ("pages", "promotions", "demotions", "evictions")}
                           for t in store.stats()["tiers"]]
        result["audit"] = [tier.audit() for tier in store.tiers]
elif case == "too_small":
    try:
        TieredStore(config(capacity="1GiB"), NS)
    except StoreError as e:
        result["error"] = str(e)
elif case == "read_only":
    with TieredStore(config(), NS) as store:
        store.put(["k"], [b"v"])
    subprocess.run(["mount", "-o", "remount,ro", mnt], check=True)
    for name in ("t0", "new"):
        try:
            TieredStore(config(name), NS)
        except StoreError as e:
            result[name] = str(e)
print(json.dumps(result))
"""


def run_case(tmp_path, case):
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs `unshare -rm` (user and mount namespaces) to mount a small tmpfs")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=8m tmpfs "$0" && exec "$@"',
         str(mnt), sys.executable, "-c", CASE, str(mnt), case],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_full_filesystem_makes_room_by_evicting(tmp_path):
    result = run_case(tmp_path, "full_evicts")
    assert all(result["puts"])
    assert result["last_batch"] == [True] * 4
    assert result["audit"] == [] and result["evictions"] > 0


def test_full_filesystem_is_a_failed_put_not_an_error(tmp_path):
    result = run_case(tmp_path, "full_from_the_start")
    assert result == {"full": [False] * 24, "after": [True] * 4, "read": True, "audit": []}


def test_promotion_into_a_full_tier_keeps_the_pages_below(tmp_path):
    # A hit in t1 is written to t0 first and removed from t1 only once t0 holds it: when
    # t0's file cannot grow (a real full map on a full filesystem), the pages stay in t1.
    result = run_case(tmp_path, "promote_into_full")
    assert result["below"] == 9, result  # 3 of the 12 pages fit t0; 9 went down
    assert result["reads"] == [[True] * 12] * 2, result  # the second read finds them again
    assert [t["pages"] for t in result["stats"]] == [3, 9]
    assert result["stats"][1]["promotions"] == 0 and result["audit"] == [[], []]


def test_demotion_into_a_full_tier_keeps_the_pages_above(tmp_path):
    # t0's victims are copied to t1 before t0 may delete them: when t1's file cannot grow,
    # they stay in t0 (over its capacity), and move down once t1 has room again.
    result = run_case(tmp_path, "demote_into_full")
    assert result["below"] == 2 and all(result["put"])
    # Every page t0 held is still there. (The two in t1, the last tier, are dropped by its
    # making room on its full filesystem, by design: it evicts before refusing a write.)
    assert sum(result["in_t0"]) == 6
    assert result["reads"] == [result["in_t0"] + [True] * 6] and result["over"] is True
    assert result["over_after"] is False and result["audit"] == [[], []]


def test_capacity_beyond_the_filesystem_is_a_startup_error(tmp_path):
    error = run_case(tmp_path, "too_small")["error"]
    assert error.startswith("tiers[0].capacity: 1073741824 bytes, but") and "can hold only" in error


def test_read_only_filesystem_is_a_startup_error(tmp_path):
    result = run_case(tmp_path, "read_only")
    assert result["t0"].startswith("tiers[0].path: ")
    assert result["t0"].endswith("is not writable by this process")
    assert result["new"].startswith("tiers[0].path: cannot create")
    assert "Read-only file system" in result["new"]
