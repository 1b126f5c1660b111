"""The Mooncake tier (storage/mooncake.py) against a real local cluster: mooncake_master, a
mooncake_client daemon holding the memory, and client processes (sglang_speckv/testing.py)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sglang_speckv import codec
from sglang_speckv.config import ConfigError, load_config
from sglang_speckv.predictors.base import PageMeta
from sglang_speckv.predictors.page_stats import PageStatsPredictor
from sglang_speckv.storage import StoreError, TieredStore, chain_parents, namespace
from sglang_speckv.testing import MooncakeCluster, free_port

NS = namespace("SmolLM2-135M", kv_dtype="bf16", layout="layer_first", page_size=16, format_version=1)
SHAPE = (2, 2, 16, 2, 32)  # [kv, layers, tokens, heads, dim]: 8 KiB of bf16
KEYS = [f"{i:064x}" for i in range(1, 9)]
RECOVERY_S = 60.0
ROOT = Path(__file__).resolve().parent.parent  # backoff tops out at 30 s


@pytest.fixture
def cluster(tmp_path):
    with MooncakeCluster(tmp_path / "mooncake", segment="64MiB") as c:
        yield c


def coded_pages(n: int) -> tuple[list[torch.Tensor], list[bytes]]:
    """``n`` KV-like bf16 pages and their coded blobs (the values the backend stores)."""
    gen = torch.Generator().manual_seed(0)
    pages = [(torch.randn(SHAPE, generator=gen) * 0.5).to(torch.bfloat16) for _ in range(n)]
    blobs = codec.encode_pages(pages, [PageMeta("bf16", SHAPE, position=16 * i) for i in range(n)],
                               PageStatsPredictor())
    return pages, blobs


def config(cluster, local_dir=None, **fields):
    tiers = [{"name": "ram", "path": str(local_dir), "capacity": "64MiB", "sync": "none"}] if local_dir else []
    return load_config(overrides={"tiers": [*tiers, cluster.tier_config(**fields)]})


def _client(cluster, action: str, ns: bytes = NS) -> dict:
    """Run a store operation in a fresh client process; returns its JSON answer."""
    script = f"""
import json, sys
sys.path.insert(0, ".")
from sglang_speckv.config import load_config
from sglang_speckv.storage import TieredStore, chain_parents
from tests.test_mooncake import coded_pages, KEYS
config = load_config(overrides={{"tiers": [{cluster.tier_config()!r}]}})
with TieredStore(config, {ns!r}) as store:
    if {action!r} == "put":
        _, blobs = coded_pages(len(KEYS))
        out = store.put(KEYS, blobs, parents=chain_parents(KEYS))
    else:
        out = [None if v is None else bytes(v).hex() for v in store.get(KEYS)]
    print(json.dumps({{"result": out, "exists": store.exists_prefix(KEYS)}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_two_clients_share_coded_pages_byte_exact(cluster, tmp_path):
    pages, blobs = coded_pages(len(KEYS))
    written = _client(cluster, "put")
    assert written == {"result": [True] * len(KEYS), "exists": len(KEYS)}
    read = _client(cluster, "get")  # another process, another client
    assert [bytes.fromhex(v) for v in read["result"]] == blobs and read["exists"] == len(KEYS)
    decoded, errors = codec.decode_pages([bytes.fromhex(v) for v in read["result"]], PageStatsPredictor())
    assert errors == [None] * len(KEYS)
    assert all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(decoded, pages))
    # Another namespace (model, dtype, page size, calibration...) sees none of them.
    other = namespace("SmolLM2-135M", kv_dtype="bf16", layout="layer_first", page_size=32, format_version=1)
    assert _client(cluster, "get", other) == {"result": [None] * len(KEYS), "exists": 0}
    # Here, behind a local tier: a cluster hit is verified and copied into the local tier.
    with TieredStore(config(cluster, tmp_path / "ram"), NS) as store:
        assert [bytes(v) for v in store.get(KEYS)] == blobs
        stats = store.stats()
        assert stats["tiers"][0]["pages"] == len(KEYS) and stats["tiers"][1]["hits"] == len(KEYS)
        assert stats["tiers"][1]["cluster_objects"] == len(KEYS)
        store.clear()  # this namespace, every tier
        assert store.exists_prefix(KEYS) == 0


def test_corrupt_object_is_a_miss_and_removed(cluster):
    _, blobs = coded_pages(2)
    with TieredStore(config(cluster), NS) as store:
        store.put(KEYS[:2], blobs)
        # The same bytes under another key: the checksum covers the key.
        from sglang_speckv.storage.mooncake import object_key
        from sglang_speckv.storage.keys import store_key

        client = store.remote._client
        assert client.put(object_key(store_key(NS, KEYS[2])), client.get(object_key(store_key(NS, KEYS[0])))) == 0
        assert store.get(KEYS[:3])[2] is None
        assert store.stats()["tiers"][0]["corrupt"] == 1
        assert client.batch_is_exist([object_key(store_key(NS, KEYS[2]))]) == [0]


def test_killed_master_is_misses_then_recovers(cluster, caplog):
    _, blobs = coded_pages(4)
    with TieredStore(config(cluster), NS) as store, caplog.at_level(logging.WARNING):
        assert store.put(KEYS[:2], blobs[:2]) == [True, True]
        cluster.kill_master()
        assert store.get(KEYS[:2]) == [None, None]  # (the index died with the master)
        assert store.exists_prefix(KEYS[:2]) == 0
        assert store.put(KEYS[2:4], blobs[2:4]) == [False, False]
        assert store.get(KEYS[2:4]) == [None, None]
        unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
        assert len(unreachable) == 1  # one line for the incident
        cluster.start_master()
        cluster.wait_mounted()
        deadline = time.monotonic() + RECOVERY_S
        while store.put(KEYS[2:3], blobs[2:3]) != [True] and time.monotonic() < deadline:
            time.sleep(0.5)
        assert [bytes(v) for v in store.get(KEYS[2:3])] == blobs[2:3]
        assert any("reachable again" in r.getMessage() for r in caplog.records)


def test_eviction_inside_mooncake_is_a_miss(tmp_path):
    # 16 MiB of cluster memory, 40 MiB of pages: Mooncake evicts; what is gone is a miss.
    big = 1 << 20
    keys = [f"{i:064x}" for i in range(40)]
    values = [bytes([i]) * big for i in range(40)]
    with MooncakeCluster(tmp_path / "mooncake", segment="16MiB",
                         master_flags=("--default_kv_lease_ttl=50",)) as cluster:
        with TieredStore(config(cluster, local_buffer_size="32MiB"), NS) as store:
            for start in range(0, len(keys), 4):
                store.put(keys[start:start + 4], values[start:start + 4],
                          parents=chain_parents(keys[start:start + 4]))
                time.sleep(0.06)  # past the lease
            got = store.get(keys)
            assert all(v is None or bytes(v) == values[i] for i, v in enumerate(got))
            misses = sum(v is None for v in got)
            assert 0 < misses < len(keys), misses
            stats = store.stats()["tiers"][0]
            assert stats["misses"] == misses and stats["corrupt"] == 0
            assert stats["cluster_evicted_objects"] > 0


def test_unreachable_at_start_error_or_degraded(tmp_path, caplog):
    dead = {"name": "cluster", "kind": "mooncake", "master_address": f"127.0.0.1:{free_port()}",
            "metadata_server": f"http://127.0.0.1:{free_port()}/metadata"}
    with pytest.raises(StoreError, match=r"tiers\[1\]\.master_address: no Mooncake master .*on_unreachable"):
        TieredStore(load_config(overrides={"tiers": [
            {"name": "ram", "path": str(tmp_path / "a"), "sync": "none"}, dead]}), NS)
    with caplog.at_level(logging.WARNING), TieredStore(load_config(overrides={"tiers": [
            {"name": "ram", "path": str(tmp_path / "b"), "sync": "none"},
            {**dead, "on_unreachable": "degraded"}]}), NS) as store:
        assert "starts degraded" in caplog.text
        assert store.put(KEYS[:1], [b"x" * 100]) == [True]  # the local tier works
        assert bytes(store.get(KEYS[:1])[0]) == b"x" * 100
        assert store.get(KEYS[1:2]) == [None]
        assert store.stats()["tiers"][1]["reachable"] is False


@pytest.mark.parametrize("tiers, message", [
    ([{"name": "c", "kind": "mooncake"}, {"name": "r", "path": "/tmp/x"}], r"tiers\[0\]\.kind: .* last"),
    ([{"name": "c", "kind": "mooncake", "predictor": "x.safetensors"}], r"tiers\[0\]\.predictor"),
    ([{"name": "c", "kind": "mooncake", "protocol": "udp"}], r"tiers\[0\]\.protocol"),
    ([{"name": "c", "kind": "mooncake", "on_unreachable": "ignore"}], r"tiers\[0\]\.on_unreachable"),
])
def test_config_errors(tiers, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides={"tiers": tiers})


# --- two real SGLang servers, one cluster -------------------------------------------------

PAGE = 16  # sglang_speckv.sglang.serve.CPU_PAGE_SIZE (checked below)
PROMPT = " ".join(f"Item {i} costs {3 * i} dollars." for i in range(12))


def _server_args(root: Path, cluster) -> list[str]:
    """A server with its own (empty) local tier and the shared cluster behind it."""
    from sglang_speckv.sglang.serve import CPU_PAGE_SIZE

    assert CPU_PAGE_SIZE == PAGE
    root.mkdir(parents=True)
    toml = root / "tiers.toml"
    tier = "".join(f"{k} = {json.dumps(v)}\n" for k, v in cluster.tier_config().items())
    toml.write_text(f'stats_file = "{root / "stats.json"}"\n'
                    f'[[tiers]]\nname = "ram"\npath = "{root / "ram"}"\ncapacity = "256MiB"\nsync = "none"\n'
                    f"[[tiers]]\n{tier}")
    return ["--hicache-storage", "speckv", "--speckv-config", str(toml),
            "--hicache-storage-backend-extra-config", json.dumps({"prefetch_threshold": 2 * PAGE})]


def _wait_written(root: Path, pages: int, timeout: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout
    stats = {}
    while time.monotonic() < deadline:
        try:
            stats = json.loads((root / "stats.json").read_text())
        except (OSError, json.JSONDecodeError):
            stats = {}
        if stats.get("pages_written", 0) >= pages:
            return stats
        time.sleep(0.5)
    raise AssertionError(f"server wrote {stats.get('pages_written')} pages in {timeout:.0f} s, expected {pages}")


@pytest.mark.server
def test_two_servers_share_one_cluster(cluster, sglang_server, tmp_path):
    """Server A computes a prompt and writes its pages through to the cluster, and stops;
    server B (fresh process, its own empty local tier) restores the prefix from the cluster
    and answers with A's tokens. One server at a time: they share the CI machine's memory."""
    a = sglang_server(_server_args(tmp_path / "a", cluster), name="a")
    first = a.generate(PROMPT, 8)
    pages = (first["prompt_tokens"] - 1) // PAGE
    assert pages >= 4 and not first["cached"].get("storage")
    _wait_written(tmp_path / "a", pages)
    a.stop()
    assert (cluster.metrics() or {}).get("cluster_objects", 0) >= pages

    b = sglang_server(_server_args(tmp_path / "b", cluster), name="b")
    second = b.generate(PROMPT, 8)
    assert second["cached"].get("storage") == pages * PAGE, second["cached"]
    assert second["tokens"] == first["tokens"] and second["logprobs"] == first["logprobs"]
    # The stats file lags the counters by up to a second: read it before stopping B.
    deadline = time.monotonic() + 30.0
    while True:
        try:
            stats = json.loads((tmp_path / "b" / "stats.json").read_text())
        except (OSError, json.JSONDecodeError):
            stats = {"store": {"tiers": [{}, {"hits": 0}]}, "verify_failures": 0}
        cluster_tier = stats["store"]["tiers"][1]
        if cluster_tier["hits"] >= pages or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    b.stop()
    assert cluster_tier["hits"] >= pages and stats["verify_failures"] == 0, cluster_tier


def test_batches_larger_than_the_transfer_buffer(cluster):
    """Puts and gets are split to fit local_buffer_size; a page larger than it is a failed
    write of that page only (no outage)."""
    values = [bytes([i]) * (3 << 20) for i in range(8)] + [b"y" * (20 << 20)]  # 24 MiB + 20 MiB
    keys = [f"{i:064x}" for i in range(len(values))]
    with TieredStore(config(cluster, local_buffer_size="16MiB"), NS) as store:
        assert store.put(keys, values) == [True] * 8 + [False]
        assert [bytes(v) for v in store.get(keys[:8])] == values[:8]
        assert store.stats()["tiers"][0]["reachable"] is True  # not taken for an outage


def test_store_command_shows_the_cluster(cluster, tmp_path, capsys):
    from sglang_speckv.cli import main

    toml = tmp_path / "speckv.toml"
    tier = "".join(f"{k} = {json.dumps(v)}\n" for k, v in cluster.tier_config().items())
    toml.write_text(f'[[tiers]]\nname = "ram"\npath = "{tmp_path / "ram"}"\nsync = "none"\n[[tiers]]\n{tier}')
    with TieredStore(load_config(toml), NS) as store:
        store.put(KEYS[:3], [b"x" * 1000] * 3)
    assert main(["store", "--config", str(toml)]) == 0
    ram, remote = json.loads(capsys.readouterr().out)["tiers"]
    assert ram["pages"] == 3 and remote["reachable"] is True and remote["cluster_objects"] == 3
    cluster.kill_master()  # unreachable: the local tiers still show
    assert main(["store", "--config", str(toml)]) == 0
    ram, remote = json.loads(capsys.readouterr().out)["tiers"]
    assert ram["pages"] == 3 and remote["reachable"] is False and "cluster_objects" not in remote
