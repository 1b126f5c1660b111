"""Fixes that let SGLang's CPU engine (SGLANG_USE_CPU_ENGINE=1) run HiCache on a machine
with no GPU: for the CPU tests and the CPU demo. Nothing here runs unless the CPU engine is
on; nothing here can replace a real CUDA ``sgl_kernel``.

Obstacles in sglang 0.5.23 on ``--device cpu`` and the fix for each (``apply()``):

1. The CPU engine imports ``assign_req_to_token_pool_cpu`` and
   ``copy_all_layer_kv_cache_cpu`` from ``sgl_kernel`` at import time; PyPI's sgl-kernel
   is CUDA only. Fix: put ``cpu_compat/shim`` (a package named ``sgl_kernel`` holding
   pure-torch versions, ops.py) on ``sys.path``, only if ``find_spec("sgl_kernel")`` is
   None. SGLang starts its scheduler and detokenizer with multiprocessing ``spawn``, which
   hands the parent's ``sys.path`` to the child, so the shim is importable there before
   SGLang's modules import it (the plugin's ``load()`` runs too late in a child for that).
2. HiCache's host buffer is allocated with cudaHostRegister ("Found no NVIDIA driver").
   Fix: SGLang's own ``alloc_with_pin_memory`` for device type ``cpu``
   (``ALLOC_MEMORY_FUNCS["cpu"]``), which is a plain ``torch.empty`` when not pinning.
3. Host pools default to ``pin_memory=True`` and pass it to every allocation (e.g.
   ``get_dummy_flat_data_page`` on the generic L3 read path); pinning needs CUDA. Fix:
   ``HostKVCache.pin_memory`` becomes a class property that reads False and ignores
   assignment, so no host pool pins anything under the CPU engine.
4. The L1 <-> L2 copy op for ``--hicache-io-backend direct --hicache-mem-layout
   layer_first`` is bound from CUDA sgl_kernel only (NameError). Fix: bind ops.py's
   index_copy_ version into the MHA host pool module.
5. ``torch.cpu.Stream`` has no ``synchronize`` (called on a failed transfer). Fix: a no-op
   (CPU work on a "stream" is already synchronous).
6. Host pools must leave a hard-coded 10 GiB of host RAM free, which refuses a few-MB pool
   on a busy 24 GB machine. Fix: reserve ``CPU_HOST_MEMORY_RESERVE_BYTES`` instead.

``PATCHED_NAMES`` lists every SGLang name touched; tests/test_sglang_smoke.py checks that
each still exists in the pinned SGLang (sglang_speckv/sglang/compat.py).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

SHIM_DIR = Path(__file__).resolve().parent / "shim"
# Host RAM the CPU engine leaves free when sizing HiCache host pools: the CPU test and demo
# pools are a few MB; 1 GiB keeps headroom for the OS without refusing them on a shared
# machine (SGLang's own 10 GiB default is sized for GPU servers).
CPU_HOST_MEMORY_RESERVE_BYTES = 1 << 30

# (module, attribute) pairs that apply() reads or replaces; checked by the smoke test.
PATCHED_NAMES = (
    ("sglang.srt.mem_cache.allocation", "assign_req_to_token_pool_cpu"),
    ("sglang.kernels.ops.kvcache.cache_move", "copy_all_layer_kv_cache_cpu"),
    ("sglang.srt.mem_cache.pool_host.common", "ALLOC_MEMORY_FUNCS"),
    ("sglang.srt.mem_cache.pool_host.common", "alloc_with_pin_memory"),
    ("sglang.srt.mem_cache.pool_host.base", "HostKVCache"),
    ("sglang.srt.mem_cache.pool_host.mha", "transfer_kv_direct"),
    ("sglang.srt.mem_cache.pool_host.base", "HICACHE_HOST_MEMORY_RESERVE_BYTES"),
    ("sglang.srt.utils", "is_cpu"),
)

_applied = False


def cpu_engine_enabled() -> bool:
    """True when SGLang will run its CPU engine (the same test as sglang.srt.utils.is_cpu)."""
    return os.environ.get("SGLANG_USE_CPU_ENGINE", "0") == "1"


def install_sgl_kernel_shim() -> bool:
    """Make ``import sgl_kernel`` find the CPU stand-in, if and only if the CPU engine is on
    and no real sgl_kernel is installed. Returns True if the shim is (now) on sys.path."""
    if not cpu_engine_enabled():
        return False
    shim = str(SHIM_DIR)
    if shim in sys.path:
        return True
    if importlib.util.find_spec("sgl_kernel") is not None:
        return False  # a real sgl_kernel: never shadow it
    sys.path.append(shim)  # appended: anything installed later still wins
    return True


def apply() -> bool:
    """Apply every fix listed in the module docstring, once per process, if the CPU engine
    is on. Returns True if the fixes are active."""
    global _applied
    if _applied:
        return True
    if not cpu_engine_enabled():
        return False
    install_sgl_kernel_shim()

    import torch

    from sglang.srt.mem_cache.pool_host import base, common, mha
    from sglang_speckv.sglang.cpu_compat import ops

    common.ALLOC_MEMORY_FUNCS["cpu"] = common.alloc_with_pin_memory
    base.HostKVCache.pin_memory = property(lambda self: False, lambda self, value: None)
    if not hasattr(mha, "transfer_kv_direct"):  # bound only when CUDA sgl_kernel imported
        mha.transfer_kv_direct = ops.transfer_kv_direct
    base.HICACHE_HOST_MEMORY_RESERVE_BYTES = CPU_HOST_MEMORY_RESERVE_BYTES
    if not hasattr(torch.cpu.Stream, "synchronize"):
        torch.cpu.Stream.synchronize = lambda self: None
    _applied = True
    return True
