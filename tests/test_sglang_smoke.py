"""SGLang is pinned, and everything private we touch in it is still where we expect it.

sglang_speckv patches and wraps private SGLang names (sglang_speckv/sglang/cpu_compat,
sglang_speckv/sglang/plugin.py) and relies on a few facts about its storage interface. An
SGLang upgrade that moves any of them must fail here, loudly, with the name, rather than
as a strange failure inside a server.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import os
import subprocess
import sys

import pytest

from sglang_speckv.sglang import cpu_compat
from sglang_speckv.sglang import plugin as sglang_plugin
from sglang_speckv.sglang.compat import SGLANG_VERSION


def _resolve(module: str, dotted: str):
    obj = importlib.import_module(module)
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def test_sglang_version_is_the_pinned_one():
    installed = importlib.metadata.version("sglang")
    assert installed == SGLANG_VERSION, (
        f"sglang {installed} is installed but sglang-speckv is pinned to {SGLANG_VERSION} "
        "(sglang_speckv/sglang/compat.py): re-check every name in this file against the new release, "
        "then move the pin"
    )


def test_plugin_entry_point_is_declared():
    eps = importlib.metadata.entry_points(group="sglang.srt.plugins")
    ours = [ep for ep in eps if ep.name == "speckv"]
    assert ours and ours[0].value == "sglang_speckv.sglang.plugin:load", [ep.value for ep in eps]


@pytest.mark.parametrize(
    "module,name",
    sglang_plugin.PATCHED_NAMES,
    ids=[f"{m}:{n}" for m, n in sglang_plugin.PATCHED_NAMES],
)
def test_plugin_targets_exist(module, name):
    _resolve(module, name)


@pytest.mark.parametrize(
    "module,name",
    [p for p in cpu_compat.PATCHED_NAMES if p != ("sglang.srt.mem_cache.pool_host.mha", "transfer_kv_direct")],
    ids=lambda p: str(p),
)
def test_cpu_compat_targets_exist(module, name):
    if module in ("sglang.srt.mem_cache.allocation", "sglang.kernels.ops.kvcache.cache_move"):
        # These import sgl_kernel's CPU ops at module load: look at the source instead.
        spec = importlib.util.find_spec(module)
        source = open(spec.origin).read()
        assert f"from sgl_kernel import {name}" in source, f"{module} no longer imports {name}"
        return
    _resolve(module, name)


def test_cpu_direct_transfer_is_the_op_we_replace():
    """transfer_kv_direct is bound in pool_host/mha.py from CUDA sgl_kernel only; our
    version must keep its keyword arguments."""
    from sglang_speckv.sglang.cpu_compat import ops

    source = inspect.getsource(importlib.import_module("sglang.srt.mem_cache.pool_host.mha"))
    assert "transfer_kv_direct(" in source
    for kw in ("src_layers", "dst_layers", "src_indices", "dst_indices", "page_size"):
        assert f"{kw}=" in source, kw
        assert kw in inspect.signature(ops.transfer_kv_direct).parameters


def test_storage_interface_facts():
    from sglang.srt.managers.cache_controller import HiCacheController
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageExtraInfo
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

    abstract = set(HiCacheStorage.__abstractmethods__)
    assert abstract == {"get", "set", "exists", "batch_get", "batch_set"}, abstract
    for name in ("batch_exists", "batch_get_v1", "batch_set_v1", "register_mem_pool_host", "clear", "get_stats"):
        assert hasattr(HiCacheStorage, name), name
    assert "prefix_keys" in inspect.signature(HiCacheStorageExtraInfo).parameters
    # The dynamic route constructs backends as cls(storage_config, kwargs).
    assert "backend_class(storage_config, kwargs)" in inspect.getsource(StorageBackendFactory._create_dynamic_backend)
    # Our attach wrapper switches to these two functions for 'speckv'.
    source = inspect.getsource(HiCacheController.attach_storage_backend)
    assert "self.page_get_func = self._page_get_zero_copy" in source
    assert 'extra_config.get("interface_v1", 0)' in source


def run_fresh(code: str, timeout: int) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python process with SGLang's CPU engine selected."""
    env = {**os.environ, "SGLANG_USE_CPU_ENGINE": "1"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)


def test_plugin_loads_and_registers_in_a_fresh_process():
    """Run load() the way SGLang does (its own process) and parse a server command line
    that names the speckv backend."""
    code = (
        "from sglang.srt.plugins import load_plugins; load_plugins()\n"
        "from sglang.srt.server_args import prepare_server_args\n"
        "from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory as F\n"
        "a = prepare_server_args(['--model-path', 'x', '--hicache-storage-backend', 'speckv'])\n"
        "assert a.hicache_storage_backend == 'speckv', a.hicache_storage_backend\n"
        "assert F._registry['speckv']['class_name'] == 'SpecKVStorage'\n"
        "import sgl_kernel; print('shim', getattr(sgl_kernel, 'IS_SPECKV_CPU_STANDIN', False))\n"
    )
    out = run_fresh(code, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "shim True" in out.stdout


def test_names_the_backend_reads():
    """SpecKVStorage reads a few private facts: where a host pool's KV lives on the device
    (coding goes to that GPU), SGLang's --kv-cache-dtype (fp8 flavour) and its metrics type."""
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
    from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost
    from sglang.srt.observability.metrics_collector import StorageMetrics
    from sglang.srt.runtime_context import get_model

    for cls in (MHATokenToKVPoolHost, MLATokenToKVPoolHost):
        assert "self._transfer_device = buffer_info.device" in inspect.getsource(cls.__init__), cls
    assert callable(get_model)
    assert {"prefetch_pgs", "backup_pgs", "prefetch_bandwidth", "backup_bandwidth"} <= set(
        StorageMetrics.__dataclass_fields__)


def test_cpu_stand_in_never_shadows_a_real_sgl_kernel(tmp_path):
    """The CPU stand-in ships inside sglang_speckv (cpu_compat/shim), never as a top-level
    sgl_kernel, and goes on sys.path only when no sgl_kernel is importable: with one
    installed (a package on sys.path here, standing for SGLang's CUDA build), the shim stays
    off and `import sgl_kernel` gets the installed one."""
    real = tmp_path / "sgl_kernel"
    real.mkdir()
    (real / "__init__.py").write_text("REAL = True\n")
    code = (
        "import importlib.util, sys\n"
        "spec = importlib.util.find_spec('sgl_kernel')\n"
        "assert spec is None or 'sglang_speckv' not in str(spec.origin), spec.origin\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "from sglang_speckv.sglang import cpu_compat\n"
        "assert cpu_compat.install_sgl_kernel_shim() is False\n"
        "assert str(cpu_compat.SHIM_DIR) not in sys.path\n"
        "import sgl_kernel\n"
        "assert sgl_kernel.REAL and not hasattr(sgl_kernel, 'IS_SPECKV_CPU_STANDIN')\n"
        "print('ok')\n"
    )
    out = run_fresh(code, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-4000:]
