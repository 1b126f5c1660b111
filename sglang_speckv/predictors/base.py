"""What a predictor is: the contract between the coder and whatever estimates the KV cache.

A predictor gives, for every scalar of a page, a mean ``mu`` and a spread ``sigma`` (float32)
that the coder turns into integer probability tables (kernels/entropy_model.py). Encoder and
decoder call the predictor with the same inputs and must get the same bits back, on any
device (docs/DESIGN.md, invariant 3).

Decode order is staged: ``stages(meta)`` splits the page's flat symbol order (C order of the
canonical shape) into contiguous ranges; ``predict`` for stage s may read only the values of
stages < s (the rest of ``values`` is NaN while decoding, and is masked to NaN while encoding
too, so a predictor that peeks ahead fails loudly in tests rather than silently at decode).
"""

from __future__ import annotations

import math

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from sglang_speckv.kernels.entropy_model import KAPPA, W_WIDE

# Canonical page shapes (C order), shared by the coder, the predictors and the backend:
#   MHA: [2 (K, V), layers, tokens, kv_heads, head_dim]  == one page of SGLang's layer_first
#        host buffer (2, L, size, H, D) sliced on the token axis.
#   MLA: [1, layers, tokens, 1, latent_dim]


@dataclass(frozen=True)
class PageMeta:
    """Everything both sides know about a page before decoding it."""

    dtype: str  # a name of kernels/entropy_model.py TORCH_DTYPES: fp8_e4m3, fp8_e5m2, bf16, fp16
    shape: tuple[int, int, int, int, int]  # canonical shape, see above
    position: int = 0  # absolute position of the page's first token in its sequence
    token_ids: tuple[int, ...] | None = None  # when a side channel provides them
    # the tokens at positions 0 .. position-1, where known (predictors with needs_prefix)
    prefix_ids: tuple[int, ...] | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class Predictor(ABC):
    """Per-scalar (mu, sigma) for a page. Subclasses set ``id`` (u8, written in blob headers)
    and ``name``; ``fingerprint`` (u64) identifies the model/calibration the predictor was
    fitted to (0 for self-contained predictors whose parameters travel in the blob)."""

    id: ClassVar[int]
    name: ClassVar[str]
    fingerprint: int = 0
    # The coder's mixture (kernels/entropy_model.py: w_wide / 256 of the mass at 2^kappa
    # sigma) this predictor's sigma was fitted for; callers of codec.encode_pages pass them
    # on (they are recorded in each blob header).
    w_wide: int = W_WIDE
    kappa: int = KAPPA
    # True if predictions depend on the page's absolute position (meta.position): such a
    # predictor codes well only where the writer knows it (SGLang's prefix keys).
    uses_position: ClassVar[bool] = False
    # True if predictions need the page's token ids and every token before it
    # (meta.token_ids, meta.prefix_ids); pages without them are not coded by it (can_code).
    needs_prefix: ClassVar[bool] = False

    def can_code(self, meta: PageMeta) -> str | None:
        """Why this page cannot be coded by this predictor (None: it can). Pages it cannot
        code stay with the predictor they have."""
        return None

    def check(self, dtype: str, shape: tuple[int, ...]) -> None:
        """Raise ValueError (saying what does not fit) if this predictor cannot code pages
        of ``dtype`` and canonical ``shape``. Called once at start-up, not per page."""

    def side_info(self, values: torch.Tensor, meta: PageMeta) -> bytes:
        """Bytes the encoder sends in the blob for this page (e.g. page statistics). values:
        the page [2, layers, tokens, heads, dim] in its storage dtype (bf16, fp16, fp8) as
        the codec hands it (no float32 copy of the page), or float32; any strides."""
        return b""

    def stages(self, meta: PageMeta) -> list[int]:
        """Stage boundaries in flat symbol index: [0, ..., meta.numel]. One stage by default."""
        return [0, meta.numel]

    @abstractmethod
    def predict(
        self, meta: PageMeta, side: bytes, values: torch.Tensor, stage: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, sigma), float32, 1-D, for the symbols of ``stage``.

        ``values``: a tensor of the canonical shape holding the page's values as decoded
        so far, NaN where not yet decoded, with any strides (the codec may pass a view of
        the caller's buffer: index or ``reshape`` it, do not ``view`` it flat). The codec
        passes the page in its storage dtype (bfloat16, float16, float8_e4m3fn,
        float8_e5m2: the decoded patterns themselves, no float32 copy of the batch); tools
        and tests may pass its exact float32 conversion.
        A predictor converts what it reads (every stored value is exact in float32 and
        float64), and must give the same (mu, sigma) for both.
        """

    def predict_rows(
        self, meta: PageMeta, side: bytes, values: torch.Tensor, stage: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``predict``'s (mu, sigma) as float32 tensors [rows, ...] whose C-order flattening
        is the stage's symbols, and which may be broadcast views (stride 0). The decoder
        materialises them a few rows at a time, so a predictor whose parameters repeat
        (page_stats: one per channel, the same for every token) costs no scratch per
        symbol. Default: ``predict``'s 1-D tensors as one row."""
        mu, sigma = self.predict(meta, side, values, stage)
        return mu[None], sigma[None]
