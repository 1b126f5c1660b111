"""``speckv simulate``: replay a trace's page accesses through the tier model, offline.

The question it answers: with these tier sizes, what share of prompt pages would the store
serve, and from which tier; and how much more would it serve if pages were coded (smaller)
rather than raw. No server, no model: a trace, tier capacities, the raw size of a page and a
coded-size ratio per tier (measured by a replay or a benchmark, or given).

``TierModel`` follows the store (storage/store.py, storage/tier.py) rule for rule:
- tiers in order; a page lives in one tier; its bytes there are the coded value (raw /
  the tier's ratio, rounded up) plus the record header, and capacities count those bytes;
- recency is a tick: inserting or touching a page gives it a new one; a batch of inserts
  is ticked tail first, so the head of a chain is the newest;
- eviction takes *leaves* only (pages no page of the same tier names as parent), oldest
  tick first; a parent whose last child left becomes a leaf at its own old tick. A leaf
  whose chain goes on in a tier above (a child there) is touched and passed over once.
  Victims move to the next tier (newest there, order kept); the last tier drops them;
- reads touch the pages they hit; with ``promote`` a page hit below the first tier is
  removed there and written to the first, the first pages of the read first, while they fit
  in 1/PROMOTE_SHARE of the first tier's capacity (counted at their size in the tier read;
  the first always, if it fits in the capacity); the rest are touched where they are. Not
  modelled: the store also skips a promotion when the first tier's file is at its soft
  bound, which depends on LMDB's layout, not on page counts; writes of a page already stored (in any tier)
  only touch it, as does the write of a batch for the page its chain continues from.
and SGLang drives it as HiCache does, per request, with the request's full pages:
- an optional host cache (``--host``, raw pages, LRU) in front, like HiCache's L2:
  the pages it holds from the start of the chain never reach the store;
- lookup: the run of consecutive stored pages from there (batch_exists); a run shorter
  than ``prefetch_threshold`` tokens is not fetched (SGLang's default 256);
- fetch the run (hits), then write the rest of the chain (write-through backup).
Accesses take their tick at once; the store records them in memory and ticks them at that
tier's next commit (or within recency_flush_seconds), before the commit's inserts: the
same order within a tier, as tests/test_simulate.py checks against the real store.
"""

from __future__ import annotations

import argparse
import heapq
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
from sglang_speckv.storage.store import PROMOTE_SHARE

# Raw KV bytes per token assumed when none is given: Llama-3.1-8B in bf16 (32 layers x
# 8 KV heads x 128 dims x K,V x 2 bytes = 128 KiB), a common serving target and the model
# size class of the traces' service. Pass --token-bytes for yours.
DEFAULT_TOKEN_BYTES = 32 * 8 * 128 * 2 * 2


@dataclass(frozen=True)
class Tier:
    """One store tier as the model sees it: a capacity and the bytes of one page there."""

    name: str
    capacity: int  # bytes
    page_bytes: int  # bytes one page occupies in this tier (stored_page_bytes)

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
    """The store's tiers: capacities, leaf-LRU eviction, demotion, promotion (module
    docstring). ``parent`` maps a page to the page before it in its chain."""

    def __init__(self, tiers: list[Tier], promote: bool, parent: dict[int, int]):
        self.tiers = [t for t in tiers if t.slots > 0]  # a tier that cannot hold a page is skipped
        self.index = [tiers.index(t) for t in self.tiers]  # position in the caller's list
        self.promote = promote
        self.parent = parent
        n = len(self.tiers)
        self.tick: list[dict[int, int]] = [{} for _ in range(n)]  # page -> tick, pages in tier
        self.kids: list[dict[int, int]] = [{} for _ in range(n)]  # page -> children in tier
        self.leaves: list[list[tuple[int, int]]] = [[] for _ in range(n)]  # heaps of (tick, page), lazy
        self.where: dict[int, int] = {}  # page -> tier
        self.clock = 0
        self.stats = [TierStats() for _ in tiers]

    def _stat(self, t: int) -> TierStats:
        return self.stats[self.index[t]]

    def exists_prefix(self, pages: list[int]) -> int:
        n = 0
        while n < len(pages) and pages[n] in self.where:
            n += 1
        return n

    def get(self, pages: list[int]) -> list[int]:
        """Read pages known to be stored; returns the caller's tier index of each."""
        served = []
        promoted: dict[int, list[int]] = {}  # tier -> pages read there, to move to the first
        budget = self.tiers[0].capacity // PROMOTE_SHARE  # bytes this read may promote
        moving, moved = self.promote, 0  # moving: until the first page below that does not fit
        for p in pages:
            t = self.where[p]
            served.append(self.index[t])
            st = self._stat(t)
            st.hits += 1
            size = self.tiers[t].page_bytes
            st.bytes_read += size
            if t > 0 and moving:
                moving = size <= budget or (not moved and size <= self.tiers[0].capacity)
            if t > 0 and moving:
                budget -= size
                moved += 1
                promoted.setdefault(t, []).append(p)
            else:
                self._touch(p, t)
        for t, moved in sorted(promoted.items()):
            # The store writes them to the first tier without evicting, removes them below,
            # then evicts the first tier: the same as removing first, then inserting.
            for p in moved:
                self._remove(p, t)
            self._insert(moved, 0)
        return served

    def put(self, pages: list[int]) -> None:
        """Write a run of consecutive pages of one chain: new ones into the first tier."""
        if not pages:
            return
        before = self.parent.get(pages[0])
        for p in pages + ([before] if before is not None else []):
            t = self.where.get(p)
            if t is not None:
                self._touch(p, t)
        new = [p for p in pages if p not in self.where]
        if new:
            self._insert(new, 0)

    # --- one tier ---------------------------------------------------------------------

    def _new_tick(self) -> int:
        self.clock += 1
        return self.clock

    def _touch(self, p: int, t: int) -> None:
        tick = self._new_tick()
        self.tick[t][p] = tick
        if not self.kids[t].get(p):
            heapq.heappush(self.leaves[t], (tick, p))

    def _insert(self, pages: list[int], t: int) -> None:
        """Insert in chain order (ticked tail first), then evict down to capacity."""
        for p in reversed(pages):
            tick = self._new_tick()
            self.tick[t][p] = tick
            self.where[p] = t
            if not self.kids[t].get(p):
                heapq.heappush(self.leaves[t], (tick, p))
            q = self.parent.get(p)
            if q is not None:
                self.kids[t][q] = self.kids[t].get(q, 0) + 1  # q, if here, is no leaf now
            st = self._stat(t)
            st.pages_in += 1
            st.bytes_written += self.tiers[t].page_bytes
        victims = []
        in_use: set[int] = set()
        while len(self.tick[t]) > self.tiers[t].slots:
            victims.append(self._pop_leaf(t, in_use))
        if victims:
            self._stat(t).pages_out += len(victims)
            if t + 1 < len(self.tiers):
                self._insert(victims[::-1], t + 1)  # reversed: the coldest gets the oldest tick

    def _pop_leaf(self, t: int, in_use: set[int]) -> int:
        """Remove and return the coldest leaf of tier t. A leaf whose chain goes on in a tier
        above is in use: it is touched and passed over once (``in_use``), then taken if
        nothing colder remains."""
        heap, ticks, kids = self.leaves[t], self.tick[t], self.kids[t]
        while heap:
            tick, p = heapq.heappop(heap)
            if ticks.get(p) != tick or kids.get(p):  # a stale entry
                continue
            if p not in in_use and any(self.kids[u].get(p) for u in range(t)):
                in_use.add(p)
                self._touch(p, t)
                continue
            self._remove(p, t)
            return p
        raise AssertionError("a tier over capacity has no leaf: the chains have a cycle")

    def _remove(self, p: int, t: int) -> None:
        del self.tick[t][p]
        del self.where[p]
        q = self.parent.get(p)
        if q is not None:
            left = self.kids[t][q] - 1
            if left:
                self.kids[t][q] = left
            else:
                del self.kids[t][q]
                if q in self.tick[t]:  # the parent is a leaf again, at its old tick
                    heapq.heappush(self.leaves[t], (self.tick[t][q], q))


class HostCache:
    """SGLang's host cache in front of the store: ``slots`` raw pages, LRU, prefix lookup."""

    def __init__(self, slots: int):
        self.slots = slots
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


# SGLang fetches a stored prefix only if it covers at least this many tokens (HiCache's
# prefetch_threshold default; shorter runs are recomputed).
PREFETCH_THRESHOLD = 256


@dataclass
class SimResult:
    """What one simulation counted; ``to_json`` adds the rates."""

    tiers: list[Tier]
    stats: list[TierStats]
    pages: int  # full pages requested
    host_hits: int
    short_runs: int  # stored pages not fetched: their run was under the prefetch threshold
    seconds: float
    model: TierModel = field(repr=False)  # the tiers at the end (what each holds)
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
            "short_runs": self.short_runs,
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
    *,
    page_tokens: int,
    promote: bool = True,
    host_pages: int = 0,
    prefetch_threshold: int = PREFETCH_THRESHOLD,
    per_request: bool = False,
) -> SimResult:
    """Run the page chains (requests in arrival order) through an optional host cache of
    ``host_pages`` raw pages and the store's tiers, as SGLang's HiCache would (module
    docstring). ``page_tokens`` converts the prefetch threshold to pages."""
    t0 = time.perf_counter()
    parent = {p: chain[i - 1] for chain in chains for i, p in enumerate(chain) if i}
    model = TierModel(tiers, promote, parent)
    host = HostCache(host_pages) if host_pages else None
    min_run = -(-prefetch_threshold // page_tokens)  # pages
    short_runs = 0
    rows = []
    for pages in chains:
        served = host.access(pages) if host else 0
        rest = pages[served:]
        n = model.exists_prefix(rest)
        if n < min_run:
            short_runs += n
            n = 0
        hit_tiers = model.get(rest[:n])
        model.put(rest[n:])
        if per_request:
            row = [served] + [0] * len(tiers)
            for t in hit_tiers:
                row[1 + t] += 1
            rows.append(row)
    return SimResult(
        tiers=tiers,
        stats=model.stats,
        pages=sum(map(len, chains)),
        host_hits=host.hits if host else 0,
        short_runs=short_runs,
        seconds=time.perf_counter() - t0,
        model=model,
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
    parser.add_argument("--prefetch-threshold", type=int, default=PREFETCH_THRESHOLD,
                        help=f"tokens a stored prefix must cover to be fetched (SGLang's default {PREFETCH_THRESHOLD})")
    parser.add_argument("--token-bytes", type=int, default=DEFAULT_TOKEN_BYTES,
                        help=f"raw KV bytes per token: layers x kv_heads x head_dim x 2 (K, V) x dtype bytes "
                             f"(default {DEFAULT_TOKEN_BYTES}: Llama-3.1-8B bf16)")
    parser.add_argument("--page-tokens", type=int, default=None,
                        help="tokens per page (default: the block size, 512 for Mooncake)")
    parser.add_argument("--block-tokens", type=int, default=None, help="tokens per Mooncake block (default 512)")
    parser.add_argument("--ratio", default=None, help="coded-size ratio raw/coded: 2.0, or ram=1.9,ssd=2.3 (default 1: raw)")
    parser.add_argument("--ratio-from", type=Path, default=None, help="take the ratios from a replay report or bench JSON")
    parser.add_argument("--max-requests", type=int, default=None, help="N requests only")
    parser.add_argument("--passes", type=int, default=1,
                        help="run the trace this many times in a row (as speckv replay --passes; default 1)")
    parser.add_argument("--skip-requests", type=int, default=0, help="start at this request of the trace (default 0)")
    parser.add_argument("--sweep", default=None, help="TIER=LO..HI, e.g. ram=1GiB..64GiB: hit rate against that tier's size")
    parser.add_argument("--sweep-points", type=int, default=None, help="log-spaced sizes in the sweep (default: doublings)")
    parser.add_argument("--sweep-ratios", default=None,
                        help="more coded-size ratios to draw in the sweep, e.g. 2.4,3.0 (each for every tier)")
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
        requests = load_trace(args.trace, block_tokens=args.block_tokens, max_requests=args.max_requests,
                              skip_requests=args.skip_requests)
        sizes, promote = tier_sizes(args)
        host_bytes = parse_size(args.host, "--host")
        names = list(sizes)
        if args.ratio_from is not None:
            ratios = ratios_from_file(args.ratio_from, names)
        elif args.ratio is not None:
            ratios = parse_ratios(args.ratio, names)
        else:
            ratios = dict.fromkeys(names, 1.0)
        if args.passes < 1:
            raise ValueError("--passes must be >= 1")
        sweep = parse_sweep(args.sweep, names) if args.sweep else None
        extra_ratios = [_ratio(x) for x in args.sweep_ratios.split(",")] if args.sweep_ratios else []
        if sweep and all(r == 1.0 for r in ratios.values()):
            raise ValueError("the sweep compares raw and coded pages; give --ratio or --ratio-from")
    except (TraceError, ValueError, OSError) as e:  # ConfigError is a ValueError
        print(f"speckv simulate: {e}", file=sys.stderr)
        return 2
    page_tokens = args.page_tokens or args.block_tokens or MOONCAKE_BLOCK_TOKENS
    raw_page = page_tokens * args.token_bytes

    t0 = time.perf_counter()
    chains = request_pages(requests, page_tokens) * args.passes
    t_keys = time.perf_counter() - t0

    def tiers_for(size_of: dict[str, int], ratio_of: dict[str, float]) -> list[Tier]:
        return [Tier(n, size_of[n], stored_page_bytes(raw_page, ratio_of[n])) for n in names]

    common = dict(promote=promote, host_pages=host_bytes // raw_page, page_tokens=page_tokens,
                  prefetch_threshold=args.prefetch_threshold)
    result = simulate(chains, tiers_for(sizes, ratios), per_request=True, **common)
    setup = {
        "trace": str(args.trace),
        "requests": len(requests),
        "passes": args.passes,
        "page_tokens": page_tokens,
        "token_bytes": args.token_bytes,
        "raw_page_bytes": raw_page,
        "unique_pages": len({p for c in chains for p in c}),
        "ratios": ratios,
        "promote": promote,
        "host_bytes": host_bytes,
        "prefetch_threshold": args.prefetch_threshold,
        "key_seconds": t_keys,
    }
    if args.passes > 1:  # share of each pass's pages served from cache (host or store)
        per_pass = len(requests)
        setup["pass_hit_rates"] = [
            sum(sum(row) for row in result.per_request[k * per_pass:(k + 1) * per_pass])
            / max(1, sum(map(len, chains[k * per_pass:(k + 1) * per_pass])))
            for k in range(args.passes)
        ]
    from sglang_speckv.replay import report  # matplotlib only when reporting

    print(report.simulate_markdown(setup, result.to_json()))
    sweep_rows = None
    if sweep is not None:
        tier, lo, hi = sweep
        setup["sweep_tier"] = tier
        curves = {"raw": dict.fromkeys(names, 1.0), ratio_label(ratios): ratios}
        curves.update({ratio_label(r): r for r in (dict.fromkeys(names, x) for x in extra_ratios)})
        sweep_rows = []
        for size in tqdm(sweep_sizes(lo, hi, args.sweep_points), desc=f"sweep {tier}", unit="size"):
            sweep_rows.append({"size": size, "curves": {
                label: simulate(chains, tiers_for({**sizes, tier: size}, ratio_of), **common).to_json()
                for label, ratio_of in curves.items()
            }})
        print(report.sweep_markdown(setup, sweep_rows))
    if args.report is not None:
        paths = report.write_simulate_report(args.report, setup, result.to_json(), sweep_rows)
        print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def ratio_label(ratio_of: dict[str, float]) -> str:
    """'coded 2.50x', or 'coded ram 1.90x, ssd 2.30x' when the tiers differ."""
    values = set(ratio_of.values())
    if len(values) == 1:
        return f"coded {values.pop():.2f}x"
    return "coded " + ", ".join(f"{n} {r:.2f}x" for n, r in ratio_of.items())


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
