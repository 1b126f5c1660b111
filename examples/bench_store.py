"""Benchmark: the speckv page store against SGLang's file backend and a raw memcpy.

For pages of 1, 2, 4 and 8 MiB, on /dev/shm (host RAM) and on a disk directory, it measures
in one process, on the same pages and into the same --batch destination buffers:
- memcpy: copying each page into the buffers in turn (numpy.copyto): the floor for a read;
- speckv: ``TieredStore.put`` / ``get`` (one tier, batches of --batch pages); a read copies
  each value out of LMDB into the caller's buffer (``out=``) and verifies its checksum;
- sglang-file: SGLang's own ``HiCacheFile`` backend as installed
  (sglang/srt/mem_cache/hicache_storage.py), driven directly with flat uint8 tensors: ``set``
  writes one file per page (temporary file, then rename), ``get`` reads a file into the
  buffer (``readinto``).

Timed rounds interleave the three readers (memcpy, speckv, sglang-file), and the best of
--rounds counts, so that other load on the machine hits all of them alike. Reads are warm
(pages in the page cache); for the disk, a cold read follows after the files were fsynced
and dropped from the page cache (posix_fadvise). On disk the store runs twice: with
sync = "data" (one fsync per batch, the choice for disks) and with sync = "none", which is
what HiCacheFile does (it never fsyncs). Target: a RAM-tier read
costs at most 2x a memcpy of the same bytes ("read / memcpy").

    .venv/bin/python examples/bench_store.py [--disk-dir /var/tmp] [--total-mib 256]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import tempfile
import time

import lmdb
import numpy as np
import torch
from tqdm import tqdm

from sglang_speckv.config import load_config
from sglang_speckv.storage import TieredStore, chain_parents, namespace

MiB = 1 << 20
NAMESPACE = namespace("bench", kv_dtype="bf16", layout="layer_first", page_size=64, format_version=1)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def drop_cache(paths: list[str]) -> None:
    """Write back and evict these files from the page cache (no root needed)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class Speckv:
    """The store with one tier in ``where``."""

    def __init__(self, where: str, pages, keys, buffers, sync: str) -> None:
        self.config = load_config(overrides={"tiers": [
            {"name": "bench", "path": where, "sync": sync,
             "capacity": 4 * sum(p.nbytes for p in pages)}]})
        self.where, self.pages, self.keys, self.buffers = where, pages, keys, buffers
        self.batches = [range(i, min(i + len(buffers), len(keys)))
                        for i in range(0, len(keys), len(buffers))]
        self.store = TieredStore(self.config, NAMESPACE)

    def clear(self) -> None:
        self.store.clear()  # rewriting existing keys would be a no-op

    def put(self) -> None:
        for b in self.batches:
            keys = [self.keys[i] for i in b]
            assert all(self.store.put(keys, [self.pages[i] for i in b], parents=chain_parents(keys)))

    def get(self) -> None:
        for b in self.batches:
            got = self.store.get([self.keys[i] for i in b], out=self.buffers)
            assert all(v is not None for v in got)

    def cold_get(self) -> float:
        self.store.close()
        drop_cache([os.path.join(self.where, "data.mdb")])
        self.store = TieredStore(self.config, NAMESPACE)
        return timed(self.get)

    def close(self) -> None:
        self.store.close()


class SGLangFile:
    """SGLang's HiCacheFile backend in ``where``."""

    def __init__(self, where: str, pages, keys, buffers) -> None:
        from sglang.srt.mem_cache.hicache_storage import HiCacheFile, HiCacheStorageConfig

        config = HiCacheStorageConfig(
            tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
            is_mla_model=False, enable_storage_metrics=False, is_page_first_layout=False,
            model_name="bench", extra_config={"file_storage_path": where})
        self.where, self.keys = where, keys
        self.backend = HiCacheFile(config, file_path=where)
        self.tensors = [torch.from_numpy(p) for p in pages]
        self.targets = [torch.from_numpy(b) for b in buffers]

    def clear(self) -> None:
        self.backend.clear()

    def put(self) -> None:
        for key, tensor in zip(self.keys, self.tensors):
            assert self.backend.set(key, tensor)

    def get(self) -> None:
        for i, key in enumerate(self.keys):
            assert self.backend.get(key, self.targets[i % len(self.targets)]) is not None

    def cold_get(self) -> float:
        drop_cache([os.path.join(self.where, f) for f in os.listdir(self.where)])
        return timed(self.get)

    def close(self) -> None:
        self.backend.clear()  # HiCacheFile has no close(); free the space now


def run(place: str, root: str, size: int, args) -> list[tuple]:
    """Rows (system, bytes, pages, put s, get s, cold get s, memcpy s) for one page size."""
    n = max(args.total_mib // size, args.batch)
    rng = np.random.default_rng(size)
    pages = [rng.integers(0, 256, size * MiB, dtype=np.uint8) for _ in range(n)]
    keys = [f"{size:02d}-{i:061d}" for i in range(n)]
    buffers = [np.empty(size * MiB, dtype=np.uint8) for _ in range(args.batch)]
    def where(name: str) -> str:
        return os.path.join(root, f"{name}-{size}")

    if place == "ram":
        systems = {"speckv": Speckv(where("speckv"), pages, keys, buffers, sync="none")}
    else:  # the choice for disks, and without fsync like HiCacheFile
        systems = {"speckv": Speckv(where("speckv"), pages, keys, buffers, sync="data"),
                   "speckv sync=none": Speckv(where("nosync"), pages, keys, buffers, sync="none")}
    systems["sglang-file"] = SGLangFile(where("file"), pages, keys, buffers)
    try:
        put = {name: float("inf") for name in systems}
        for _ in range(args.rounds):
            for name, system in systems.items():
                system.clear()
                put[name] = min(put[name], timed(system.put))

        def memcpy():
            for i, page in enumerate(pages):
                np.copyto(buffers[i % len(buffers)], page)

        readers = {"memcpy": memcpy, **{name: s.get for name, s in systems.items()}}
        get = {name: float("inf") for name in readers}
        for _ in range(args.rounds):
            for name, read in readers.items():
                get[name] = min(get[name], timed(read))
        cold = {name: s.cold_get() for name, s in systems.items()} if place == "disk" else {}
    finally:
        for system in systems.values():
            system.close()
    nbytes = n * size * MiB
    return [(name, nbytes, n, put.get(name), get[name], cold.get(name), get["memcpy"])
            for name in readers]


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    mem = next(int(line.split()[1]) // 1024**2 for line in open("/proc/meminfo")
               if line.startswith("MemTotal"))
    return (f"{cpu}, {os.cpu_count()} cores, {mem} GiB RAM, Linux {platform.release()}, "
            f"Python {platform.python_version()}, LMDB {'.'.join(map(str, lmdb.version()))} "
            f"(py-lmdb {lmdb.__version__}), torch {torch.__version__}")


def filesystem(path: str) -> str:
    done = subprocess.run(["df", "-T", path], capture_output=True, text=True)
    fields = done.stdout.splitlines()[-1].split() if done.returncode == 0 else ["?", "?"]
    return f"{fields[1]} ({fields[0]})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--disk-dir", default="/var/tmp", help="a directory on the disk to test")
    parser.add_argument("--sizes-mib", default="1,2,4,8", help="page sizes in MiB")
    parser.add_argument("--total-mib", type=int, default=256, help="bytes of pages per run")
    parser.add_argument("--batch", type=int, default=8, help="pages per store put/get call")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds; the best counts")
    args = parser.parse_args()

    roots = {"ram": tempfile.mkdtemp(prefix="speckv-bench-", dir="/dev/shm"),
             "disk": tempfile.mkdtemp(prefix="speckv-bench-", dir=args.disk_dir)}
    runs = [(size, place) for size in map(int, args.sizes_mib.split(",")) for place in roots]
    rows = []
    try:
        for size, place in tqdm(runs, desc="bench_store", unit="run"):
            rows += [(place, size, *row) for row in run(place, roots[place], size, args)]
    finally:
        for root in roots.values():
            shutil.rmtree(root, ignore_errors=True)

    print(f"\nmachine: {machine()}")
    print(f"ram: /dev/shm, {filesystem('/dev/shm')}; disk: {args.disk_dir}, {filesystem(args.disk_dir)}")
    print(f"{args.total_mib} MiB of random pages per run, batches of {args.batch} pages, "
          f"best of {args.rounds} interleaved rounds\n")
    print("| tier | page MiB | system | put pages/s | put GB/s | get pages/s | get GB/s "
          "| read / memcpy | cold get GB/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for place, size, system, nbytes, n, t_put, t_get, t_cold, t_copy in rows:
        put = f"{n / t_put:,.0f} | {nbytes / t_put / 1e9:.2f}" if t_put else "- | -"
        cold = f"{nbytes / t_cold / 1e9:.2f}" if t_cold else "-"
        print(f"| {place} | {size} | {system} | {put} | {n / t_get:,.0f} | "
              f"{nbytes / t_get / 1e9:.2f} | {t_get / t_copy:.2f}x | {cold} |")


if __name__ == "__main__":
    main()
