"""Pure-torch versions of the few sgl_kernel ops SGLang's CPU engine calls.

PyPI's ``sgl-kernel`` is CUDA only; SGLang's CPU build of it is source-only. Without AMX
every layer of a Llama model runs SGLang's plain-torch ``forward_native``, so the CPU
engine needs only these ops from sgl_kernel, each a few lines of indexing:

- ``assign_req_to_token_pool_cpu`` (mem_cache/allocation.py, called per batch),
- ``copy_all_layer_kv_cache_cpu`` (kernels/ops/kvcache/cache_move.py, KV moves),
- ``transfer_kv_direct`` (mem_cache/pool_host/mha.py, HiCache L1 <-> L2 copies for
  ``--hicache-io-backend direct --hicache-mem-layout layer_first``; bound from CUDA
  sgl_kernel only, so it is a NameError on CPU without this).

Each function keeps the argument names and order of the sgl_kernel op it replaces, and
reads all sources before writing any destination (the kernels' gather-then-store order).
"""

from __future__ import annotations

import ctypes

import torch


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,  # [batch] rows of req_to_token
    req_to_token: torch.Tensor,  # [max_reqs, pool_len] token slot of each request position
    start_offset: torch.Tensor,  # [batch] first position to write, per request
    end_offset: torch.Tensor,  # [batch] one past the last position, per request
    out_cache_loc: torch.Tensor,  # [sum(end - start)] new slots, requests concatenated
    pool_len: int,
) -> None:
    """``req_to_token[r, start:end] = out_cache_loc[next end - start slots]`` per request."""
    assert req_to_token.shape[1] == pool_len
    pos = 0
    for r, start, end in zip(req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist()):
        req_to_token[r, start:end] = out_cache_loc[pos : pos + end - start]
        pos += end - start


def _rows(ptr: int, stride_bytes: int, num_rows: int) -> torch.Tensor:
    """A [num_rows, stride_bytes] uint8 view of host memory at ``ptr`` (no copy)."""
    buf = (ctypes.c_uint8 * (stride_bytes * num_rows)).from_address(ptr)
    return torch.frombuffer(buf, dtype=torch.uint8).view(num_rows, stride_bytes)


def copy_all_layer_kv_cache_cpu(
    data_ptrs: torch.Tensor,  # [buffers] uint64 base address of each layer's K or V buffer
    strides: torch.Tensor,  # [buffers] bytes per token row of each buffer
    tgt_loc: torch.Tensor,  # [n] destination rows
    src_loc: torch.Tensor,  # [n] source rows
) -> None:
    """For every buffer: row ``tgt_loc[i]`` = row ``src_loc[i]`` (bytewise)."""
    if tgt_loc.numel() == 0:
        return
    num_rows = int(max(int(tgt_loc.max()), int(src_loc.max()))) + 1
    src, tgt = src_loc.long().cpu(), tgt_loc.long().cpu()
    for ptr, stride in zip(data_ptrs.tolist(), strides.tolist()):
        rows = _rows(int(ptr), int(stride), num_rows)
        rows[tgt] = rows[src]  # advanced indexing gathers into a temporary first


def transfer_kv_direct(
    src_layers: list[torch.Tensor],  # each [tokens, heads, dim]: per-layer K and V buffers
    dst_layers: list[torch.Tensor],  # same count and row shape as src_layers
    src_indices: torch.Tensor,  # [n] token rows to read
    dst_indices: torch.Tensor,  # [n] token rows to write
    page_size: int,
) -> None:
    """``dst_layers[i][dst_indices] = src_layers[i][src_indices]`` for every layer i.

    ``page_size`` is accepted for signature compatibility: the CUDA op uses it to copy
    page-contiguous runs in one memcpy, which index_copy_ makes unnecessary."""
    assert len(src_layers) == len(dst_layers), (len(src_layers), len(dst_layers))
    assert src_indices.numel() == dst_indices.numel()
    if src_indices.numel() == 0:
        return
    for src, dst in zip(src_layers, dst_layers):
        rows = src.index_select(0, src_indices.to(src.device))
        dst.index_copy_(0, dst_indices.to(dst.device), rows.to(dst.device))
