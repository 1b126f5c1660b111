"""``speckv simulate``: replay a trace's page accesses through the tier model, offline.

The question it answers: with these tier sizes, what share of prompt pages would the store
serve, and from which tier; and how much more would it serve if pages were coded (smaller)
rather than raw. No server, no model: a trace, tier capacities, the raw size of a page and
a coded-size ratio per tier (measured by a replay or a benchmark, or given).

The tier model (``TierModel``) follows the store's rules (storage/, docs/DESIGN.md):
- tiers in order (ram, then ssd); a page lives in exactly one tier;
- a request looks its pages up from the first; the hit is the run of consecutive present
  pages from the start (SGLang's batch_exists: it stops at the first miss);
- every page of a request is then touched, tail first, so within a request the head of the
  chain is the most recent and the tail the first evicted ("chain tails before heads");
  pages not present are written to the first tier; with ``promote``, a page found in a
  lower tier moves to the first; otherwise it becomes the most recent of its tier;
- a tier over capacity demotes its least recently used pages to the next tier (as the most
  recent there); the last tier drops them.
Pages are equal in size within a tier: raw page bytes / that tier's ratio, rounded up. A
tier too small for one page is skipped.

Optionally an SGLang host cache (``host_bytes``, raw pages, LRU) sits in front, as HiCache's
L2 does: pages it holds are served from it and never reach the store (write-through still
stores every new page in the store).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from sglang_speckv.config import load_config, parse_size
from sglang_speckv.replay.synth import page_keys
from sglang_speckv.replay.traces import MOONCAKE_BLOCK_TOKENS, Request, TraceError, load_trace
from sglang_speckv.storage.record import HEADER_SIZE

# Raw KV bytes per token assumed when none is given: Llama-3.1-8B in bf16 (32 layers x
# 8 KV heads x 128 dims x K,V x 2 bytes = 128 KiB), a common serving target and the model
# size class of the traces' service. Pass --token-bytes for yours.
DEFAULT_TOKEN_BYTES = 32 * 8 * 128 * 2 * 2

def format_size(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


@dataclass(frozen=True)
class Tier:
    name: str
    capacity: int  # bytes
    page_bytes: int  # bytes one page occupies in this tier (raw / ratio)

    @property
    def slots(self) -> int:
        return self.capacity // self.page_bytes


@dataclass
class TierStats:
    hits: int = 0  # pages served from this tier
    bytes_read: int = 0
    bytes_written: int = 0  # new pages, demotions and promotions into this tier
    pages_in: int = 0
    pages_out: int = 0  # demoted to the next tier, or dropped from the last


class TierModel:
    """The store's tiers: capacities, LRU, demotion, optional promotion (module docstring)."""

    def __init__(self, tiers: list[Tier], promote: bool = False):
        self.tiers = tiers
        self.promote = promote
        self.live = [i for i, t in enumerate(tiers) if t.slots > 0]  # tiers that hold a page
        self.lru: list[OrderedDict[int, None]] = [OrderedDict() for _ in tiers]  # first = coldest
        self.where: dict[int, int] = {}  # page -> tier index
        self.stats = [TierStats() for _ in tiers]
        self.reputs = 0  # pages after the first miss that were present anyway

    def lookup(self, pages: list[int]) -> list[int]:
        """Tier of each page of the hit run (consecutive present pages from the start)."""
        run = []
        for p in pages:
            t = self.where.get(p)
            if t is None:
                break
            run.append(t)
        return run

    def access(self, pages: list[int], served: int = 0) -> list[int]:
        """One request over its page chain. ``served``: leading pages a front cache already
        served (not looked up or touched here). Returns the tiers of the pages this store
        served, in order."""
        pages = pages[served:]
        run = self.lookup(pages)
        for t in run:
            self.stats[t].hits += 1
            self.stats[t].bytes_read += self.tiers[t].page_bytes
        if not self.live:
            return run
        first = self.live[0]
        for i in range(len(pages) - 1, -1, -1):  # tail first: the head ends up most recent
            p = pages[i]
            t = self.where.get(p)
            if t is None:
                self._put(p, first)
                continue
            self.reputs += i >= len(run)
            if self.promote and t != first:
                del self.lru[t][p]
                self._put(p, first)
            else:
                self.lru[t].move_to_end(p)
        self._evict()
        return run

    def _put(self, page: int, t: int) -> None:
        self.lru[t][page] = None
        self.where[page] = t
        self.stats[t].pages_in += 1
        self.stats[t].bytes_written += self.tiers[t].page_bytes

    def _evict(self) -> None:
        for k, t in enumerate(self.live):
            lru = self.lru[t]
            nxt = self.live[k + 1] if k + 1 < len(self.live) else None
            while len(lru) > self.tiers[t].slots:
                victim, _ = lru.popitem(last=False)
                self.stats[t].pages_out += 1
                if nxt is None:
                    del self.where[victim]
                else:
                    self._put(victim, nxt)


class HostCache:
    """SGLang's host cache in front of the store: raw pages, LRU, prefix lookup."""

    def __init__(self, capacity: int, page_bytes: int):
        self.slots = capacity // page_bytes
        self.lru: OrderedDict[int, None] = OrderedDict()
        self.hits = 0

    def access(self, pages: list[int]) -> int:
        """Serve the leading pages it holds; then hold the whole chain. Returns pages served."""
        n = 0
        while n < len(pages) and pages[n] in self.lru:
            n += 1
        self.hits += n
        for p in reversed(pages):
            if p in self.lru:
                self.lru.move_to_end(p)
            else:
                self.lru[p] = None
        while len(self.lru) > self.slots:
            self.lru.popitem(last=False)
        return n


@dataclass
class SimResult:
    tiers: list[Tier]
    stats: list[TierStats]
    pages: int  # full pages requested
    host_hits: int
    reputs: int
    seconds: float
    per_request: list[list[int]] = field(default_factory=list)  # [host, tier0, tier1, ...] hits

    @property
    def store_hits(self) -> int:
        return sum(s.hits for s in self.stats)

    def to_json(self) -> dict:
        pages = max(1, self.pages)
        return {
            "pages": self.pages,
            "host_hits": self.host_hits,
            "host_hit_rate": self.host_hits / pages,
            "store_hit_rate": self.store_hits / pages,
            "hit_rate": (self.host_hits + self.store_hits) / pages,
            "reputs": self.reputs,
            "seconds": self.seconds,
            "tiers": [
                {
                    "name": t.name,
                    "capacity": t.capacity,
                    "page_bytes": t.page_bytes,
                    "slots": t.slots,
                    "hit_rate": s.hits / pages,
                    **vars(s),
                }
                for t, s in zip(self.tiers, self.stats)
            ],
        }


def request_pages(requests: list[Request], page_tokens: int) -> list[list[int]]:
    """Page key chains of every request, as small dense ints (same page -> same int)."""
    ids: dict[int, int] = {}
    out = []
    for r in requests:
        keys = page_keys(((c.key, c.n_tokens) for c in r.chunks), page_tokens)
        out.append([ids.setdefault(k, len(ids)) for k in keys])
    return out


def simulate(
    chains: list[list[int]],
    tiers: list[Tier],
    promote: bool = False,
    host_bytes: int = 0,
    raw_page_bytes: int = 1,
    per_request: bool = False,
) -> SimResult:
    """Run the page chains (in arrival order) through an optional host cache and the tiers."""
    t0 = time.perf_counter()
    model = TierModel(tiers, promote)
    host = HostCache(host_bytes, raw_page_bytes) if host_bytes else None
    rows = []
    for pages in chains:
        served = host.access(pages) if host else 0
        run = model.access(pages, served)
        if per_request:
            row = [served] + [0] * len(tiers)
            for t in run:
                row[1 + t] += 1
            rows.append(row)
    return SimResult(
        tiers=tiers,
        stats=model.stats,
        pages=sum(map(len, chains)),
        host_hits=host.hits if host else 0,
        reputs=model.reputs,
        seconds=time.perf_counter() - t0,
        per_request=rows,
    )


# ----------------------------------------------------------------------------- ratios


def parse_ratios(text: str, tier_names: list[str]) -> dict[str, float]:
    """'2.0' (every tier) or 'ram=1.9,ssd=2.3' (raw page bytes / coded bytes)."""
    if "=" not in text:
        return dict.fromkeys(tier_names, _ratio(text))
    out = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        if name.strip() not in tier_names:
            raise ValueError(f"--ratio names tier {name.strip()!r}; tiers are {tier_names}")
        out[name.strip()] = _ratio(value)
    return {n: out.get(n, 1.0) for n in tier_names}


def _ratio(text: str) -> float:
    r = float(text)
    if not math.isfinite(r) or r <= 0:
        raise ValueError(f"a ratio must be a positive number, got {text!r}")
    return r


def ratios_from_file(path: Path, tier_names: list[str]) -> dict[str, float]:
    """Coded-size ratios measured elsewhere: a replay report (``replay.json``: the stored
    bytes raw vs coded per tier at the end of the run) or any JSON with ``"ratio": x`` or
    ``"ratios": {tier: x}`` (a benchmark result)."""
    data = json.loads(Path(path).read_text())
    if isinstance(data.get("ratios"), dict):
        return {n: _ratio(str(data["ratios"].get(n, 1.0))) for n in tier_names}
    if "ratio" in data:
        return dict.fromkeys(tier_names, _ratio(str(data["ratio"])))
    runs = data.get("runs")
    if isinstance(runs, list) and runs and isinstance(runs[0].get("summary", {}).get("store_ratio"), dict):
        measured = runs[0]["summary"]["store_ratio"]
        overall = measured.get("total")
        return {n: _ratio(str(measured.get(n, overall or 1.0))) for n in tier_names}
    raise ValueError(f"{path}: no coded-size ratio found (expected a replay report or a JSON with 'ratio')")


# ----------------------------------------------------------------------------- command


def simulate_command(parser: argparse.ArgumentParser):
    parser.add_argument("--trace", required=True, help="trace file (Mooncake JSONL, agentic JSON) or gen:key=value,...")
    parser.add_argument("--config", type=Path, default=None,
                        help="speckv TOML config: its tiers (names, capacities) and promote_on_hit "
                             "(default: the built-in defaults, one 16GiB ram tier)")
    parser.add_argument("--ram", default=None, help="capacity of the tier named ram (replaces the config's)")
    parser.add_argument("--ssd", default=None, help="capacity of the tier named ssd (added after the config's tiers)")
    parser.add_argument("--host", default="0", help="SGLang host cache (L2) in front of the store, raw pages (default 0: none)")
    parser.add_argument("--promote", action=argparse.BooleanOptionalAction, default=None,
                        help="move a page hit in a lower tier to the first (default: the config's promote_on_hit)")
    parser.add_argument("--token-bytes", type=int, default=DEFAULT_TOKEN_BYTES,
                        help=f"raw KV bytes per token: layers x kv_heads x head_dim x 2 (K, V) x dtype bytes "
                             f"(default {DEFAULT_TOKEN_BYTES}: Llama-3.1-8B bf16)")
    parser.add_argument("--page-tokens", type=int, default=None,
                        help="tokens per page (default: the block size, 512 for Mooncake)")
    parser.add_argument("--block-tokens", type=int, default=None, help="tokens per Mooncake block (default 512)")
    parser.add_argument("--ratio", default=None, help="coded-size ratio raw/coded: 2.0, or ram=1.9,ssd=2.3 (default 1: raw)")
    parser.add_argument("--ratio-from", type=Path, default=None, help="take the ratios from a replay report or bench JSON")
    parser.add_argument("--max-requests", type=int, default=None, help="first N requests only")
    parser.add_argument("--sweep", default=None, help="TIER=LO..HI, e.g. ram=1GiB..64GiB: hit rate against that tier's size")
    parser.add_argument("--sweep-points", type=int, default=None, help="log-spaced sizes in the sweep (default: doublings)")
    parser.add_argument("--report", type=Path, default=None, help="directory for simulate.json, SIMULATE.md and sweep.png")
    return run_simulate


def tier_sizes(args: argparse.Namespace) -> tuple[dict[str, int], bool]:
    """Tier capacities (in order) and promotion, from the config and --ram/--ssd."""
    config = load_config(args.config)
    sizes = {t.name: t.capacity for t in config.tiers}
    for name in ("ram", "ssd"):
        if getattr(args, name) is not None:
            sizes[name] = parse_size(getattr(args, name), f"--{name}")
    promote = config.promote_on_hit if args.promote is None else args.promote
    return sizes, promote


def run_simulate(args: argparse.Namespace) -> int:
    try:
        requests = load_trace(args.trace, block_tokens=args.block_tokens, max_requests=args.max_requests)
        sizes, promote = tier_sizes(args)
        host_bytes = parse_size(args.host, "--host")
        names = list(sizes)
        if args.ratio_from is not None:
            ratios = ratios_from_file(args.ratio_from, names)
        elif args.ratio is not None:
            ratios = parse_ratios(args.ratio, names)
        else:
            ratios = dict.fromkeys(names, 1.0)
        sweep = parse_sweep(args.sweep, names) if args.sweep else None
        if sweep and all(r == 1.0 for r in ratios.values()):
            raise ValueError("the sweep compares raw and coded pages; give --ratio or --ratio-from")
    except (TraceError, ValueError, OSError) as e:  # ConfigError is a ValueError
        print(f"speckv simulate: {e}", file=sys.stderr)
        return 2
    page_tokens = args.page_tokens or args.block_tokens or MOONCAKE_BLOCK_TOKENS
    raw_page = page_tokens * args.token_bytes

    t0 = time.perf_counter()
    chains = request_pages(requests, page_tokens)
    t_keys = time.perf_counter() - t0

    def tiers_for(size_of: dict[str, int], ratio_of: dict[str, float]) -> list[Tier]:
        return [Tier(n, size_of[n], stored_page_bytes(raw_page, ratio_of[n])) for n in names]

    result = simulate(chains, tiers_for(sizes, ratios), promote, host_bytes, raw_page, per_request=True)
    setup = {
        "trace": str(args.trace),
        "requests": len(requests),
        "page_tokens": page_tokens,
        "token_bytes": args.token_bytes,
        "raw_page_bytes": raw_page,
        "unique_pages": len({p for c in chains for p in c}),
        "ratios": ratios,
        "promote": promote,
        "host_bytes": host_bytes,
        "key_seconds": t_keys,
    }
    from sglang_speckv.replay import report  # matplotlib only when reporting

    print(report.simulate_markdown(setup, result.to_json()))
    sweep_rows = None
    if sweep is not None:
        tier, lo, hi = sweep
        setup["sweep_tier"] = tier
        sweep_rows = []
        for size in tqdm(sweep_sizes(lo, hi, args.sweep_points), desc=f"sweep {tier}", unit="size"):
            row = {"size": size}
            for label, ratio_of in (("raw", dict.fromkeys(names, 1.0)), ("coded", ratios)):
                res = simulate(chains, tiers_for({**sizes, tier: size}, ratio_of), promote, host_bytes, raw_page)
                row[label] = res.to_json()
            sweep_rows.append(row)
        print(report.sweep_markdown(setup, sweep_rows))
    if args.report is not None:
        paths = report.write_simulate_report(args.report, setup, result, sweep_rows)
        print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def stored_page_bytes(raw_page: int, ratio: float) -> int:
    """Bytes a page takes in a tier: the coded value (raw / ratio, rounded up) plus the
    store's record header, which tier capacities count too (storage/record.py)."""
    return math.ceil(raw_page / ratio) + HEADER_SIZE


def parse_sweep(text: str, tier_names: list[str]) -> tuple[str, int, int]:
    """'ram=1GiB..64GiB' -> ('ram', 2**30, 2**36)."""
    name, sep, rng = text.partition("=")
    lo, dots, hi = rng.partition("..")
    if not sep or not dots or name not in tier_names:
        raise ValueError(f"bad --sweep {text!r}: expected TIER=LO..HI with TIER in {tier_names}, e.g. ram=1GiB..64GiB")
    lo_b, hi_b = parse_size(lo, "--sweep"), parse_size(hi, "--sweep")
    if not 0 < lo_b <= hi_b:
        raise ValueError(f"bad --sweep {text!r}: need 0 < LO <= HI")
    return name, lo_b, hi_b


def sweep_sizes(lo: int, hi: int, points: int | None) -> list[int]:
    """Doublings from lo up to hi (hi included), or ``points`` log-spaced sizes."""
    if points is None:
        sizes = [lo]
        while sizes[-1] * 2 <= hi:
            sizes.append(sizes[-1] * 2)
        return sizes if sizes[-1] == hi else sizes + [hi]
    if points < 2:
        raise ValueError("--sweep-points must be >= 2")
    return sorted({round(lo * (hi / lo) ** (i / (points - 1))) for i in range(points)})
