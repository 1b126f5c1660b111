"""What a predictor is: the contract between the coder and whatever estimates the KV cache.

A predictor gives, for every scalar of a page, a mean ``mu`` and a spread ``sigma`` (float32)
that the coder turns into integer probability tables (kernels/entropy_model.py). Encoder and
decoder call the predictor with the same inputs and must get the same bits back, on any
device (docs/DESIGN.md, invariant 3).

Decode order is staged: ``stages(meta)`` splits the page's flat symbol order (C order of the
canonical shape) into contiguous ranges; ``predict`` for stage s may read only the values of
stages < s. The rest of ``values`` is NaN while decoding; while encoding it may hold the
page's own values (the C++ encoder passes the page itself: no copy) or NaN (the Triton and
reference encoders), so a predictor that peeks ahead would code pages its decoder cannot
read back (each blob's page hash would make them misses): tests/test_predictors.py checks
every predictor's rows from a page against those from the page NaN'd from the stage on.

A stage's symbols may be split further into ``parts(meta, stage)`` equal consecutive parts
that ``predict_rows`` gives a range at a time (``parts=(p0, p1)``), bit for bit what the
whole stage gives for them: the codec asks for a stage a few parts at a time, so that a
predictor whose (mu, sigma) are per symbol (float32, 8 bytes per symbol: 4x a bf16 page,
8x an fp8 one) never holds a page's whole. The contract, in full:

    stages(meta)                          -> [0, ..., meta.numel], rising
    parts(meta, stage)                    -> int >= 1 dividing the stage's symbol count
    predict_rows(meta, side, values, stage, parts=None | (p0, p1))
        -> (mu, sigma) float32 [rows, ...] of the stage's symbols (parts p0 .. p1 - 1 of
           it when given), C order, possibly broadcast views (stride 0)
    predict(meta, side, values, stage)    -> the whole stage's (mu, sigma), 1-D
    side_info(values, meta)               -> bytes the blob carries for the page
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
        so far (stages < ``stage``; read nothing else: module docstring), NaN where not yet
        decoded, with any strides (the codec may pass a view of
        the caller's buffer: index or ``reshape`` it, do not ``view`` it flat). The codec
        passes the page in its storage dtype (bfloat16, float16, float8_e4m3fn,
        float8_e5m2: the decoded patterns themselves, no float32 copy of the batch); tools
        and tests may pass its exact float32 conversion.
        A predictor converts what it reads (every stored value is exact in float32 and
        float64), and must give the same (mu, sigma) for both.
        """

    def parts(self, meta: PageMeta, stage: int) -> int:
        """Into how many equal consecutive parts ``predict_rows`` may split ``stage``'s
        symbols (module docstring). A predictor whose rows are per symbol says more than 1,
        so that the codec holds a few parts' (mu, sigma) at a time, not the stage's; one
        whose rows are broadcast views (page_stats, static) costs nothing per symbol and
        keeps the default, 1."""
        return 1

    def predict_rows(
        self, meta: PageMeta, side: bytes, values: torch.Tensor, stage: int, parts: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``predict``'s (mu, sigma) as float32 tensors [rows, ...] whose C-order flattening
        is the stage's symbols, and which may be broadcast views (stride 0): the C++ coder
        reads them in place, the Triton decoder materialises them a few rows at a time, so
        a predictor whose parameters repeat (page_stats: one per channel, the same for
        every token) costs no scratch per symbol. ``parts=(p0, p1)``: only parts [p0, p1)
        of the stage (``parts``), the same bits as the whole stage's for those symbols;
        ``values`` and the other arguments as for the whole stage. Default: ``predict``'s
        1-D tensors as one row (one part)."""
        check_one_part(self, parts)
        mu, sigma = self.predict(meta, side, values, stage)
        return mu[None], sigma[None]


def check_one_part(predictor: Predictor, parts: tuple[int, int] | None) -> None:
    """ValueError unless ``parts`` asks a predictor of one part per stage for the whole stage."""
    if parts not in (None, (0, 1)):
        raise ValueError(f"{predictor.name}: parts {parts} of a stage of one part")
