"""Write a synthetic KV dump (``speckv dump-kv`` layout) of a given model shape, for timing
``speckv compress`` / ``decompress`` without a model: k, v [layers, kv_heads, tokens,
head_dim] with a per-channel offset and spread, as KV has (the figures it gives are speeds
and memory, not compression ratios: those come from real KV, docs/BENCHMARKS.md).

    python examples/make_dump.py OUT.safetensors [--layers 32 --kv-heads 8 --tokens 1024 --head-dim 128]

The defaults are Llama-3-8B's KV shape; 1024 tokens of bf16 are 128 MiB.
"""

from __future__ import annotations

import argparse

import torch
from safetensors.torch import save_file


def make_dump(path: str, layers: int, kv_heads: int, tokens: int, head_dim: int, dtype: str = "bf16", seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    out = {}
    for name in ("k", "v"):
        offset = torch.randn(layers, kv_heads, 1, head_dim, generator=g)
        spread = torch.rand(layers, kv_heads, 1, head_dim, generator=g) * 2 + 0.05
        x = torch.empty(layers, kv_heads, tokens, head_dim, dtype=torch_dtype)
        for layer in range(layers):  # one layer of float32 at a time
            x[layer] = (offset[layer] + spread[layer] * torch.randn(kv_heads, tokens, head_dim, generator=g)).to(torch_dtype)
        out[name] = x
    save_file(out, path, metadata={"position": "0"})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    a = p.parse_args()
    make_dump(a.out, a.layers, a.kv_heads, a.tokens, a.head_dim, a.dtype)


if __name__ == "__main__":
    main()
