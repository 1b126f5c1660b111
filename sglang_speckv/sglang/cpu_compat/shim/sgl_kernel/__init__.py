"""CPU stand-in for ``sgl_kernel``: the ops SGLang's CPU engine calls for a Llama model
with torch_native attention (sglang_speckv/sglang/cpu_compat/ops.py).

This directory is put on ``sys.path`` by ``sglang_speckv.sglang.cpu_compat`` only when
SGLANG_USE_CPU_ENGINE=1 and no real ``sgl_kernel`` is installed, so it never shadows a
real one. SGLang's CPU modules import other CPU ops at load time (speculative decoding
trees, fused MoE, ...) that such a model never calls: any other name therefore imports as
a function that raises when called, naming the op.
"""

from sglang_speckv.sglang.cpu_compat.ops import assign_req_to_token_pool_cpu, copy_all_layer_kv_cache_cpu

IS_SPECKV_CPU_STANDIN = True


def __getattr__(name: str):
    if name.startswith("__"):  # module protocol lookups (__path__, __file__, ...)
        raise AttributeError(name)

    def missing_op(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} is not provided by sglang-speckv's CPU stand-in, which covers "
            "Llama-architecture models with --attention-backend torch_native; install SGLang's "
            "CPU sgl-kernel build for other models or features"
        )

    missing_op.__name__ = name
    return missing_op
