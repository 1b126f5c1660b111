"""The offline tier simulator: hand-computed cases, the real store as the reference, the
command on the real Mooncake trace."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from sglang_speckv.cli import main
from sglang_speckv.config import load_config
from sglang_speckv.replay.simulate import (
    Tier,
    parse_ratios,
    parse_sweep,
    ratios_from_file,
    simulate,
    stored_page_bytes,
    sweep_sizes,
)
from sglang_speckv.storage.record import HEADER_SIZE
from sglang_speckv.storage.store import TieredStore, chain_parents

MOONCAKE = Path(__file__).parents[1] / "examples" / "traces" / "mooncake_conversation_trace.jsonl.gz"
RAW = 100  # raw page bytes in the hand-computed cases
PAGE = RAW + HEADER_SIZE  # bytes a raw page takes in a tier (value + record header)

# Pages a..g as ints; chains consistent with one prefix tree (b follows a, e follows d, f follows b).
a, b, c, d, e, f = range(6)
CHAINS = [[a, b], [c], [a, b], [d, e], [a, b, f], [a, b]]


def two_tiers(slots_ram=2, slots_ssd=2, ratio=1.0):
    page = stored_page_bytes(RAW, ratio)
    return [Tier("ram", slots_ram * page, page), Tier("ssd", slots_ssd * page, page)]


def test_stored_page_bytes():
    assert stored_page_bytes(100, 1.0) == PAGE
    assert stored_page_bytes(100, 3.0) == 34 + HEADER_SIZE  # ceil(100 / 3)
    assert Tier("ram", 2 * PAGE + PAGE - 1, PAGE).slots == 2


def test_hand_computed_without_promotion():
    # Worked by hand, tick by tick (ram and ssd hold 2 pages each):
    # R1 [a,b]: writes b then a (the head gets the newest tick).
    # R2 [c]: writes c; ram evicts b, its only leaf (a has child b): b goes to ssd.
    # R3 [a,b]: hits a in ram, b in ssd (touched where they are).
    # R4 [d,e]: writes e, d; ram demotes c, then a (a leaf again since b left); ssd drops b.
    # R5 [a,b,f]: hits a in ssd (b is gone); writes f, b to ram, touching a (b's parent);
    #   ram demotes e, d; ssd drops c, passes over a (its chain goes on in ram: b), drops e.
    # R6 [a,b]: hits a in ssd, b in ram.
    res = simulate(CHAINS, two_tiers(), promote=False, page_tokens=256, prefetch_threshold=256)
    ram, ssd = res.stats
    assert (ram.hits, ssd.hits) == (2, 3)
    assert (ram.pages_in, ram.pages_out, ssd.pages_in, ssd.pages_out) == (7, 5, 5, 3)
    assert (ram.bytes_read, ssd.bytes_read) == (2 * PAGE, 3 * PAGE)
    assert ram.bytes_written == 7 * PAGE
    assert [sorted(ticks) for ticks in res.model.tick] == [[b, f], [a, d]]
    assert res.pages == 12 and res.store_hits == 5
    assert res.to_json()["hit_rate"] == pytest.approx(5 / 12)


def test_hand_computed_with_promotion():
    # A read promotes a quarter of ram's capacity, at least its first page found below: one
    # page here. R3: b is promoted (ram demotes c); R4: ram demotes b, a (tail first), ssd
    # drops c; R5: hits a, b in ssd: a is promoted (removed there, written to ram; ram demotes
    # e), b is touched there; the write of f (touching b, its parent) demotes d, and ssd drops
    # e; R6 hits a in ram, b in ssd: b is promoted, ram demotes f (its only leaf).
    res = simulate(CHAINS, two_tiers(), promote=True, page_tokens=256, prefetch_threshold=256)
    ram, ssd = res.stats
    assert (ram.hits, ssd.hits) == (2, 4)
    assert (ram.pages_in, ram.pages_out, ssd.pages_in, ssd.pages_out) == (9, 7, 7, 2)
    assert [sorted(ticks) for ticks in res.model.tick] == [[a, b], [d, f]]


def test_prefetch_threshold():
    big = [Tier("ram", 100 * PAGE, PAGE)]
    chains = [[a, b, c], [a, b, c, d], [a, b, c, d, e]]
    res = simulate(chains, big, page_tokens=64, prefetch_threshold=256)  # runs of < 4 pages not fetched
    assert res.stats[0].hits == 4 and res.short_runs == 3
    res = simulate(chains, big, page_tokens=64, prefetch_threshold=0)
    assert res.stats[0].hits == 3 + 4


def test_host_cache_in_front():
    big = [Tier("ram", 100 * PAGE, PAGE)]
    chains = [[a, b], [a, b, c], [d], [e], [a, b, c]]
    res = simulate(chains, big, host_pages=2, page_tokens=256, prefetch_threshold=256)
    # host holds 2 raw pages: serves a,b in R2; R5 finds neither (d, e pushed them out)
    assert res.host_hits == 2
    assert res.stats[0].hits == 3  # R5: a, b, c from the store
    assert res.to_json()["hit_rate"] == pytest.approx(5 / 10)


def test_too_small_tier_is_skipped():
    tiers = [Tier("ram", PAGE - 1, PAGE), Tier("ssd", 10 * PAGE, PAGE)]
    res = simulate(CHAINS, tiers, page_tokens=256, prefetch_threshold=256)
    assert res.stats[0].pages_in == 0 and res.stats[1].hits > 0


def _random_chains(rng: random.Random, n: int) -> list[list[int]]:
    """Chains of a random prefix tree: a request extends a prefix of an earlier one."""
    chains: list[list[int]] = []
    next_page = 0
    for _ in range(n):
        base = rng.choice(chains)[: rng.randint(0, 4)] if chains and rng.random() < 0.7 else []
        fresh = list(range(next_page, next_page + rng.randint(0 if base else 1, 3)))
        next_page += len(fresh)
        chains.append(base + fresh)
    return chains


def _drive_store(store: TieredStore, chains: list[list[int]], min_run: int) -> None:
    """What SGLang's HiCache does with a store per request: look up, fetch, write the rest."""
    for chain in chains:
        keys = [f"{p:064x}" for p in chain]
        n = store.exists_prefix(keys)
        n = n if n >= min_run else 0
        assert all(v is not None for v in store.get(keys[:n]))
        rest = keys[n:]
        if rest:
            store.put(rest, [bytes(RAW)] * len(rest), parents=chain_parents(rest, keys[n - 1] if n else None))


@pytest.mark.parametrize("promote", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_matches_the_real_store(tmp_path, promote, seed):
    """Same page accesses through the real TieredStore (LMDB) and the model: same hits per
    tier, same pages in each tier at the end."""
    rng = random.Random(seed)
    chains = _random_chains(rng, 60)
    slots = (rng.randint(2, 6), rng.randint(2, 8))
    config = load_config(overrides={
        "tiers": [
            {"name": "ram", "path": str(tmp_path / "ram"), "capacity": slots[0] * PAGE, "sync": "none"},
            {"name": "ssd", "path": str(tmp_path / "ssd"), "capacity": slots[1] * PAGE, "sync": "none"},
        ],
        "promote_on_hit": promote,
    })
    with TieredStore(config) as store:
        _drive_store(store, chains, min_run=2)
        real_hits = [t["hits"] for t in store.stats()["tiers"]]
        real_pages = [sorted(int(k.decode(), 16) for k in tier.keys_with_prefix(b"")) for tier in store.tiers]

    res = simulate(chains, two_tiers(*slots), promote=promote, page_tokens=128, prefetch_threshold=256)
    assert [s.hits for s in res.stats] == real_hits
    assert [sorted(ticks) for ticks in res.model.tick] == real_pages
    assert sum(real_hits) > 0 and all(real_pages)  # the case exercised both tiers


# ----------------------------------------------------------------------------- parsing


def test_parse_helpers(tmp_path):
    assert parse_sweep("ram=1GiB..4GiB", ["ram", "ssd"]) == ("ram", 2**30, 4 * 2**30)
    for bad in ("ram=1GiB", "disk=1GiB..2GiB", "ram=4GiB..1GiB", "ram=x..1GiB"):
        with pytest.raises(ValueError):
            parse_sweep(bad, ["ram", "ssd"])
    assert sweep_sizes(1, 8, None) == [1, 2, 4, 8]
    assert sweep_sizes(1, 6, None) == [1, 2, 4, 6]
    assert sweep_sizes(1, 100, 3) == [1, 10, 100]
    assert parse_ratios("2.5", ["ram", "ssd"]) == {"ram": 2.5, "ssd": 2.5}
    assert parse_ratios("ssd=3", ["ram", "ssd"]) == {"ram": 1.0, "ssd": 3.0}
    for bad in ("0", "-1", "nan", "disk=2"):
        with pytest.raises(ValueError):
            parse_ratios(bad, ["ram", "ssd"])
    report = tmp_path / "replay.json"
    report.write_text(json.dumps({"runs": [{"summary": {"store_ratio": {"ram": 2.0, "total": 2.0}}}]}))
    assert ratios_from_file(report, ["ram", "ssd"]) == {"ram": 2.0, "ssd": 2.0}
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"ratio": 1.7}))
    assert ratios_from_file(bench, ["ram"]) == {"ram": 1.7}
    bench.write_text(json.dumps({"bits": 3}))
    with pytest.raises(ValueError, match="no coded-size ratio"):
        ratios_from_file(bench, ["ram"])


# ----------------------------------------------------------------------------- command


def test_command_on_the_mooncake_trace(tmp_path, capsys):
    out = tmp_path / "sim"
    rc = main(["simulate", "--trace", str(MOONCAKE), "--max-requests", "3000", "--ram", "64GiB", "--ratio", "2.5",
               "--sweep", "ram=64GiB..256GiB", "--sweep-ratios", "4", "--report", str(out)])
    assert rc == 0
    data = json.loads((out / "simulate.json").read_text())
    rows = data["sweep"]
    assert [r["size"] for r in rows] == [64 * 2**30, 128 * 2**30, 256 * 2**30]
    ceiling = 1 - data["setup"]["unique_pages"] / data["result"]["pages"]
    for r in rows:
        rates = [r["curves"][label]["hit_rate"] for label in ("raw", "coded 2.50x", "coded 4.00x")]
        assert 0 < rates[0] <= rates[1] <= rates[2] <= ceiling
    assert data["result"]["hit_rate"] == rows[0]["curves"]["coded 2.50x"]["hit_rate"]  # same configuration
    assert (out / "sweep.png").stat().st_size > 10_000
    assert "| ram size | raw | coded 2.50x | coded 4.00x |" in (out / "SIMULATE.md").read_text()


def test_command_passes(tmp_path):
    out = tmp_path / "sim"
    assert main(["simulate", "--trace", "gen:sessions=3,turns=3,seed=1", "--page-tokens", "64", "--ram", "64GiB",
                 "--passes", "2", "--report", str(out)]) == 0
    first, second = json.loads((out / "simulate.json").read_text())["setup"]["pass_hit_rates"]
    assert second == 1.0 > first  # everything fits: the second pass finds every page
    assert "By pass: pass 1" in (out / "SIMULATE.md").read_text()


def test_command_errors(capsys):
    assert main(["simulate", "--trace", "gen:sessions=2", "--sweep", "ram=1GiB..2GiB"]) == 2
    assert "give --ratio" in capsys.readouterr().err
    assert main(["simulate", "--trace", "gen:sessions=2", "--ram", "lots"]) == 2
    assert "--ram" in capsys.readouterr().err
