"""Soak: the page store under kills, damage and concurrency for a given time (not in CI).

Each round: two writer processes (two threads each, puts and verified reads of chains) and
a reader that SIGKILLs itself inside a read transaction share two tiers (a tiny first tier,
so every put demotes; a last tier that never fills); the writers are SIGKILLed at random
moments. Then a checker process (so that an LMDB abort would kill it, not the soak) opens
the store, reads back every page whose put was acknowledged, audits the tiers and measures
the files. Every few rounds, between rounds, the store is damaged: bit flips in a B-tree
page or a truncated data file (the next open must quarantine or survive it), or a damaged
bookkeeping record (a counter, an index entry, a meta entry; the next writes must repair it).

A page acknowledged before a damage may be gone after it (a quarantined tier starts empty);
a page acknowledged after the last damage must read back bit-exact: one that does not is
counted as lost. Wrong bytes, aborts, hangs and lost pages must all be 0.

    .venv/bin/python examples/soak_store.py --seconds 300 [--dir /tmp/soak]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time

CAPACITY_T0 = 48 * 3024  # 48 pages of 3000 bytes: every put demotes
CAPACITY_T1 = "512MiB"  # never fills: a missing page is a lost page, not an eviction
KEYS_PER_WRITER = 4000  # key space per writer name (keeps the store bounded)
MIN_GROWTH = 1 << 20  # storage/env.py: the file-size bound is 2 x capacity + this

WRITER = r"""
import json, random, sys, threading
from sglang_speckv.config import load_config
from sglang_speckv.storage import TieredStore, chain_parents
config = load_config(overrides=json.loads(sys.argv[1]))
name = sys.argv[2]
store = TieredStore(config, b"soak-ns!")
lock = threading.Lock()
def run(seed):
    rng = random.Random(seed)
    while True:
        start = rng.randrange(%(keys)d - 3)
        keys = [f"{name}-k{start + i}" for i in range(rng.randint(1, 3))]
        if rng.random() < 0.7:
            ok = store.put(keys, [random.Random(k).randbytes(3000) for k in keys],
                           parents=chain_parents(keys, f"{name}-k{start - 1}" if start else None))
            with lock:
                print("ack" if all(ok) else "refused", *keys, flush=True)
        else:
            for k, v in zip(keys, store.get(keys)):
                if v is not None and bytes(v) != random.Random(k).randbytes(3000):
                    with lock:
                        print("wrong", k, flush=True)
threads = [threading.Thread(target=run, args=(f"{name}{t}",), daemon=True) for t in range(2)]
for t in threads:
    t.start()
for t in threads:
    t.join()
""" % {"keys": KEYS_PER_WRITER}

READER = r"""
import json, os, signal, sys
from sglang_speckv.config import load_config
from sglang_speckv.storage import TieredStore
store = TieredStore(load_config(overrides=json.loads(sys.argv[1])), b"soak-ns!")
store.get(["x"])
with store.tiers[0].env.read() as txn:
    os.kill(os.getpid(), signal.SIGKILL)
"""

CHECKER = r"""
import json, os, random, struct, sys
from sglang_speckv.config import load_config
from sglang_speckv.storage import TieredStore
from sglang_speckv.storage.keys import store_key
config = load_config(overrides=json.loads(sys.argv[1]))
keys = json.load(open(sys.argv[2]))
damage, seed = sys.argv[3], int(sys.argv[4])
record = None
with TieredStore(config, b"soak-ns!") as store:
    got = store.get(keys)
    missing = [k for k, v in zip(keys, got) if v is None]
    wrong = sum(v is not None and bytes(v) != random.Random(k).randbytes(3000) for k, v in zip(keys, got))
    problems = [f"{t.name}: {p}" for t in store.tiers for p in t.audit()]
    stats = store.stats()
    if damage == "record":  # one damaged bookkeeping record, written behind the store's back
        rng = random.Random(seed)
        tier = store.tiers[rng.randrange(len(store.tiers))]
        with tier.env.read() as txn:
            some = [bytes(k) for k, _ in zip(txn.cursor(db=tier._meta).iternext(values=False), range(50))]
        with tier.env.lmdb.begin(write=True) as txn:
            kind = rng.choice(["counter", "short counter", "empty leaf", "stale leaf", "meta", "value"])
            record = f"{kind} in {tier.name}"
            if kind == "counter":
                txn.put(rng.choice([b"bytes", b"pages", b"raw_bytes"]), struct.pack("<Q", rng.getrandbits(64)), db=tier._state)
            elif kind == "short counter":
                txn.put(b"bytes", b"\1\2", db=tier._state)
            elif kind == "empty leaf":
                txn.put(struct.pack(">Q", rng.getrandbits(16)), b"", db=tier._leaves)
            elif some and kind == "stale leaf":
                txn.put(struct.pack(">Q", 0) + rng.choice(some), b"", db=tier._leaves)
            elif some and kind == "meta":
                key = rng.choice(some)
                txn.put(key, bytes(txn.get(key, db=tier._meta))[:rng.randrange(60)], db=tier._meta)
            elif some:
                txn.put(rng.choice(some), rng.randbytes(rng.randrange(1, 9000)), db=tier._pages)
sizes = [os.path.getsize(os.path.join(t.path, "data.mdb")) for t in config.tiers]
quarantined = sum(p.startswith("damaged-") for t in config.tiers for p in os.listdir(t.path))
print(json.dumps({"missing": missing, "wrong": wrong, "problems": problems, "sizes": sizes,
                  "quarantined": quarantined, "record": record,
                  "damaged": sum(t["damaged"] + t["corrupt"] for t in stats["tiers"])}))
"""

PSIZE = 4096


def damage_file(path: str, kind: str, rng: random.Random) -> None:
    """Bit flips in a B-tree page of data.mdb, or the file truncated to half."""
    data_file = os.path.join(path, "data.mdb")
    with open(data_file, "rb") as f:
        data = bytearray(f.read())
    if kind == "truncate":
        data = data[:len(data) // 2]
    else:
        pages = [n for n in range(2, len(data) // PSIZE)
                 if struct.unpack_from("<Q2xH", data, n * PSIZE) == (n, 2)
                 or struct.unpack_from("<Q2xH", data, n * PSIZE) == (n, 1)]
        if not pages:
            return
        page = rng.choice(pages)
        for _ in range(4):
            data[page * PSIZE + rng.randrange(16, PSIZE)] ^= 1 << rng.randrange(8)
    with open(data_file, "wb") as f:
        f.write(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--dir", default=None, help="scratch directory (default: a new temp dir)")
    parser.add_argument("--damage-every", type=int, default=4, help="damage the store every N rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--promote", action="store_true",
                        help="promote_on_hit: pages read below the first tier move up, copy "
                             "first (docs/STORAGE.md); a page lost to a kill counts as lost")
    args = parser.parse_args()
    root = args.dir or tempfile.mkdtemp(prefix="speckv-soak-")
    shutil.rmtree(os.path.join(root, "t0"), ignore_errors=True)
    shutil.rmtree(os.path.join(root, "t1"), ignore_errors=True)
    overrides = {"tiers": [
        {"name": "ram", "path": os.path.join(root, "t0"), "capacity": CAPACITY_T0, "sync": "none"},
        {"name": "disk", "path": os.path.join(root, "t1"), "capacity": CAPACITY_T1, "sync": "data"}],
        "promote_on_hit": args.promote, "recency_flush_seconds": 0.05}
    bounds = [2 * CAPACITY_T0 + MIN_GROWTH, None]
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
           + os.pathsep + os.environ.get("PYTHONPATH", "")}
    rng = random.Random(args.seed)
    acked: dict[str, int] = {}  # key -> round its put was acknowledged in
    last_damage = -1
    n = {"rounds": 0, "writers killed": 0, "readers killed": 0, "acknowledged puts": 0,
         "puts refused (False)": 0,
         "pages checked": 0, "lost (acked after the last damage)": 0,
         "dropped by damage (acked before it)": 0, "wrong bytes": 0, "aborts": 0, "hangs": 0,
         "audit problems": 0, "file damages": 0, "record damages": 0,
         "tiers quarantined": 0}
    max_ratio = 0.0
    deadline = time.monotonic() + args.seconds
    round_ = 0
    while time.monotonic() < deadline:
        names = [f"r{round_}w{i}" for i in range(2)]
        procs = [subprocess.Popen([sys.executable, "-c", WRITER, json.dumps(overrides), name],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for name in names]
        reader = subprocess.Popen([sys.executable, "-c", READER, json.dumps(overrides)],
                                  stderr=subprocess.DEVNULL, env=env)
        time.sleep(rng.uniform(1.0, 2.5))
        for proc in rng.sample(procs, len(procs)):
            time.sleep(rng.uniform(0.0, 0.3))
            proc.send_signal(signal.SIGKILL)
        for proc in procs:
            try:
                out, err = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
                n["hangs"] += 1
            if proc.returncode == -signal.SIGKILL:
                n["writers killed"] += 1
            else:
                n["aborts"] += 1
                print(f"writer exited with {proc.returncode}: {err[-500:]}", file=sys.stderr)
            for line in out.splitlines():
                word, *keys = line.split()
                if word == "ack" and len(keys) == len(line.split()) - 1:
                    n["acknowledged puts"] += 1
                    for key in keys:
                        acked[key] = round_
                elif word == "wrong":
                    n["wrong bytes"] += 1
                elif word == "refused":
                    n["puts refused (False)"] += 1
        try:
            reader.wait(timeout=60)
        except subprocess.TimeoutExpired:  # stuck (e.g. on a mutex a killed writer held)
            n["hangs"] += 1
            print(f"round {round_}: reader {reader.pid} stuck for 60 s; killed", file=sys.stderr)
            reader.kill()
            reader.wait()
        n["readers killed"] += reader.returncode == -signal.SIGKILL
        damage = "none"
        if round_ % args.damage_every == args.damage_every - 1:
            damage = rng.choice(["flip", "flip", "truncate", "record", "record"])
        keys_file = os.path.join(root, "acked.json")
        with open(keys_file, "w") as f:
            json.dump(sorted(acked), f)
        try:
            check = subprocess.run([sys.executable, "-c", CHECKER, json.dumps(overrides), keys_file,
                                    "record" if damage == "record" else "none", str(rng.getrandbits(32))],
                                   capture_output=True, text=True, timeout=300, env=env)
        except subprocess.TimeoutExpired:
            n["hangs"] += 1
            break
        if check.returncode != 0:
            n["aborts"] += 1
            print(f"checker exited with {check.returncode}: {check.stderr[-800:]}", file=sys.stderr)
            break
        seen = json.loads(check.stdout)
        n["pages checked"] += len(acked)
        n["wrong bytes"] += seen["wrong"]
        n["audit problems"] += len(seen["problems"])
        for problem in seen["problems"]:
            print(f"round {round_}: audit: {problem}", file=sys.stderr)
        if seen["sizes"][0] > bounds[0]:
            print(f"round {round_}: ram data.mdb {seen['sizes'][0]} > bound {bounds[0]}",
                  file=sys.stderr)
        n["tiers quarantined"] = seen["quarantined"]
        for key in seen["missing"]:
            if acked[key] > last_damage:
                n["lost (acked after the last damage)"] += 1
                print(f"lost: {key} (acknowledged in round {acked[key]})", file=sys.stderr)
            else:
                n["dropped by damage (acked before it)"] += 1
            del acked[key]
        max_ratio = max(max_ratio, seen["sizes"][0] / bounds[0])
        if damage in ("flip", "truncate"):
            tier = rng.choice(["t0", "t1"])
            damage_file(os.path.join(root, tier), damage, rng)
            n["file damages"] += 1
            print(f"round {round_}: damage: {damage} in {tier}", file=sys.stderr)
        elif damage == "record":
            n["record damages"] += 1
            print(f"round {round_}: damage: {seen['record']}", file=sys.stderr)
        if damage != "none":
            last_damage = round_
        round_ += 1
        n["rounds"] = round_
    n["largest ram data.mdb / bound (2 x capacity + 1 MiB)"] = round(max_ratio, 3)
    width = max(map(len, n))
    print(f"soak_store.py --seconds {args.seconds:g} --damage-every {args.damage_every} "
          f"--seed {args.seed}{' --promote' if args.promote else ''} ({root})")
    print(f"| {'count'.ljust(width)} | value |\n|{'-' * (width + 2)}|-------|")
    for name, value in n.items():
        print(f"| {name.ljust(width)} | {value} |")
    bad = (n["lost (acked after the last damage)"] + n["wrong bytes"] + n["aborts"] + n["hangs"]
           + (max_ratio > 1))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
