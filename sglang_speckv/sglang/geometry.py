"""How a page of SGLang's host (L2) pool maps to the canonical page shape.

A stored page does not depend on SGLang's memory layout: every page is viewed in the
canonical shape of sglang_speckv/predictors/base.py, MHA ``[2, layers, tokens, kv_heads,
head_dim]`` and MLA ``[1, layers, tokens, 1, latent_dim]``. Supported layouts: ``layer_first``,
``page_first``, ``page_first_direct`` and (MHA) ``page_head``; others are refused at start-up
with the flag to use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from sglang_speckv.kernels.entropy_model import DTYPE_NAMES

# SGLang keeps fp8 KV as uint8 in host memory; its --kv-cache-dtype names the format.
FP8_KV_CACHE_DTYPES = ("fp8_e4m3", "fp8_e5m2")

# How a page sits in SGLang's host buffer, per (kind, layout): how to slice the page that
# starts at token slot s (T tokens per page) out of the buffer, and the permutation of that
# slice's axes ("own" order, also the order of SGLang's flat pages) into canonical order.
# MLA canonical pages then get a leading axis of 1.
_LAYOUTS = {
    # buffer [2, L, size, H, D]
    ("mha", "layer_first"): (lambda b, s, t: b[:, :, s:s + t], (0, 1, 2, 3, 4)),
    # buffer [2, size, L, H, D]
    ("mha", "page_first"): (lambda b, s, t: b[:, s:s + t], (0, 2, 1, 3, 4)),
    # buffer [2, pages, L, T, H, D]
    ("mha", "page_first_direct"): (lambda b, s, t: b[:, s // t], (0, 1, 2, 3, 4)),
    # buffer [2, pages, H, T, L, D]
    ("mha", "page_head"): (lambda b, s, t: b[:, s // t], (0, 3, 2, 1, 4)),
    # buffer [L, size, 1, D]
    ("mla", "layer_first"): (lambda b, s, t: b[:, s:s + t], (0, 1, 2, 3)),
    # buffer [size, L, 1, D]
    ("mla", "page_first"): (lambda b, s, t: b[s:s + t], (1, 0, 2, 3)),
    # buffer [pages, L, T, 1, D]
    ("mla", "page_first_direct"): (lambda b, s, t: b[s // t], (0, 1, 2, 3)),
}


@dataclass(frozen=True)
class PageGeometry:
    """How one page of a host pool maps to the canonical page shape.

    ``kind``: "mha" or "mla"; ``layout``: SGLang's host layout; ``dtype``: the speckv dtype
    name; ``torch_dtype``: the element type of the pool's buffer (uint8 for fp8);
    ``shape``: the canonical shape."""

    kind: str
    layout: str
    dtype: str
    torch_dtype: torch.dtype
    page_size: int
    shape: tuple[int, int, int, int, int]

    @property
    def page_bytes(self) -> int:
        return math.prod(self.shape) * self.torch_dtype.itemsize

    @classmethod
    def of_pool(cls, pool: Any, kv_cache_dtype: str | None) -> PageGeometry:
        """Geometry of SGLang's host pool ``pool``; ValueError with what to do if unsupported."""
        from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
        from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost

        if type(pool) is MHATokenToKVPoolHost:
            if pool.head_dim != pool.v_head_dim:
                raise ValueError("speckv: MHA pools with different K and V head dims are not supported")
            kind, shape = "mha", (2, pool.layer_num, pool.page_size, pool.head_num, pool.head_dim)
        elif type(pool) is MLATokenToKVPoolHost:
            kind, shape = "mla", (1, pool.layer_num, pool.page_size, 1, pool.kv_cache_dim)
        else:
            raise ValueError(f"speckv: host pool {type(pool).__name__} is not supported (MHA and MLA "
                             "token pools are; hybrid, sparse and asymmetric pools are not)")
        if (kind, pool.layout) not in _LAYOUTS:
            ok = [layout for k, layout in _LAYOUTS if k == kind]
            raise ValueError(f"speckv: host layout {pool.layout!r} is not supported for {kind.upper()}; "
                             f"use --hicache-mem-layout {' / '.join(ok)}")
        return cls(kind, pool.layout, dtype_name(pool.dtype, kv_cache_dtype), pool.dtype, pool.page_size, shape)

    def page(self, buffer: torch.Tensor, start: int) -> torch.Tensor:
        """A view, in canonical shape, of the page whose first token slot is ``start``."""
        slice_page, _ = _LAYOUTS[self.kind, self.layout]
        return self._canonical(slice_page(buffer, start, self.page_size))

    def from_flat(self, flat: torch.Tensor) -> torch.Tensor:
        """Canonical view of a flat page (SGLang's ``get_data_page(flat=True)``: the page's
        slice of the buffer, flattened in the layout's own order)."""
        _, perm = _LAYOUTS[self.kind, self.layout]
        canonical = self.shape if self.kind == "mha" else self.shape[1:]
        own = [0] * len(perm)
        for i, p in enumerate(perm):  # own axis p becomes canonical axis i
            own[p] = canonical[i]
        return self._canonical(flat.view(own))

    def _canonical(self, own: torch.Tensor) -> torch.Tensor:
        _, perm = _LAYOUTS[self.kind, self.layout]
        view = own.permute(perm)
        return view if self.kind == "mha" else view.unsqueeze(0)


def dtype_name(torch_dtype: torch.dtype, kv_cache_dtype: str | None) -> str:
    """The speckv dtype name of a pool's buffer dtype (uint8 needs SGLang's --kv-cache-dtype)."""
    if torch_dtype in DTYPE_NAMES:
        return DTYPE_NAMES[torch_dtype]
    if torch_dtype == torch.uint8 and kv_cache_dtype in FP8_KV_CACHE_DTYPES:
        return kv_cache_dtype
    raise ValueError(f"speckv: KV cache dtype {torch_dtype} (--kv-cache-dtype {kv_cache_dtype}) is not "
                     "supported; use bf16, fp16, fp8_e4m3 or fp8_e5m2")


def sglang_kv_cache_dtype() -> str | None:
    """SGLang's --kv-cache-dtype in this (scheduler) process, or None outside a server."""
    try:
        from sglang.srt.runtime_context import get_model

        return get_model().kv_cache_dtype
    except ValueError:  # "config namespace 'model' not published": not in a server process
        return None


def sglang_model_path() -> str | None:
    """SGLang's --model-path in this (scheduler) process, or None outside a server."""
    try:
        from sglang.srt.runtime_context import get_model

        return get_model().model_path
    except ValueError:  # "config namespace 'model' not published": not in a server process
        return None
