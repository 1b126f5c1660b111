"""CPU stand-in for ``sgl_kernel``: only the ops SGLang's CPU engine needs (see
sglang_speckv/cpu_compat/ops.py).

This directory is put on ``sys.path`` by ``sglang_speckv.cpu_compat.apply()`` only when
SGLANG_USE_CPU_ENGINE=1 and no real ``sgl_kernel`` is installed, so it can never shadow a
real one. Any other name is an ImportError naming the missing op, so SGLang's own
``try: from sgl_kernel import X / except ImportError`` fallbacks still work.
"""

from sglang_speckv.cpu_compat.ops import assign_req_to_token_pool_cpu, copy_all_layer_kv_cache_cpu

__all__ = ["assign_req_to_token_pool_cpu", "copy_all_layer_kv_cache_cpu"]
IS_SPECKV_CPU_STANDIN = True


def __getattr__(name: str):
    raise AttributeError(
        f"sgl_kernel.{name} is not provided by sglang-speckv's CPU stand-in (only "
        f"{', '.join(__all__)}); SGLang's CPU engine with torch_native attention does not need it"
    )
