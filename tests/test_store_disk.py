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


def test_capacity_beyond_the_filesystem_is_a_startup_error(tmp_path):
    error = run_case(tmp_path, "too_small")["error"]
    assert error.startswith("tiers[0].capacity: 1073741824 bytes, but") and "can hold only" in error


def test_read_only_filesystem_is_a_startup_error(tmp_path):
    result = run_case(tmp_path, "read_only")
    assert result["t0"].startswith("tiers[0].path: ")
    assert result["t0"].endswith("is not writable by this process")
    assert result["new"].startswith("tiers[0].path: cannot create")
    assert "Read-only file system" in result["new"]
