"""Batch codec: KV pages <-> blobs, many pages per call (DietGPU style).

    blobs = encode_pages(pages, metas, predictor)          # list[bytes]
    pages, errors = decode_pages(blobs, predictor)         # a status per page

Encoding a page: the predictor gives float32 (mu, sigma) stage by stage, and the coder's
value-level entry point (``encode_values``: quantize_params, the entropy model's integer
steps (``model_for``: the table model for 16-bit dtypes, the exact model for fp8) and the
rANS steps) writes the lane streams from the page's bit patterns; all pages with the
same size and lane count share one coder call, so one loop step of the coder serves the
whole batch. A page that coding would not shrink is stored raw (FLAG_RAW). Decoding runs
the same stages (``Decoder.decode_values`` writes bit patterns straight into the batch's
pages): the predictor sees the page decoded so far, in its storage dtype (NaN elsewhere),
exactly as the encoder showed it.

Memory: a call codes its pages in batches of at most ``batch_bytes`` raw bytes (config
field ``coding_batch_bytes``; one page at least). Predictions come as rows
(``Predictor.predict_rows``, possibly broadcast views: page_stats holds one (mu, sigma) per
channel). The C++ coder reads them in place, encoding and decoding (and each page's
storage patterns when encoding), a chunk of a stage's parts at a time (``Predictor.parts``,
``_part_chunks``: within PARAMS_SHARE of the page). Both it and the Triton coder encode a
page stage by stage, last stage and last chunk first (the chunked encoders,
``_code_staged``), so that a page's (mu, sigma) exist a chunk at a time. The Triton coder
gets them materialised a chunk of rows at a time: the decoder within PARAMS_SHARE (its
table decoder's int32 parameters too, ``rans_triton.table_params``, computed once per
distinct (mu, sigma) of the broadcast rows and broadcast like them), the encoder within
ENCODE_SHARE (with the chunk's patterns and its int32 word scratch, 4 B per symbol, 8 B
under the table model); the reference encoder stacks them ([P, N] float32, [P, N]
patterns). Beyond that: the decoded storage patterns of the batch (none on the CPU when
the caller's ``out`` pages take them in place, whatever their strides: e.g. a page's view
of SGLang's layer_first or page_first host buffer; a multi-stage predictor reads its
values from them), and the coded words (on the GPU twice while the Triton encoder's
``finish`` concatenates its chunks' words). Verifying a decoded page that is not
contiguous hashes a contiguous copy of that one page (kernels/page_hash.py). Nothing
int64 per symbol is allocated, on the CPU or the GPU. Figures: docs/BENCHMARKS.md
"Codec scratch".

Pages are tensors of the canonical shape (predictors/base.py) in their storage dtype
(bfloat16, float16, float8_e4m3fn, float8_e5m2, or uint8 holding fp8 with the meta saying
which). CUDA pages use the Triton coder (rans_triton.py), CPU pages the C++ coder
(rans_cpu.py, which falls back to the torch reference rans_reference.py where it cannot be
compiled); all produce the same bytes.

Every blob is checked before its page is returned (docs/DESIGN.md invariant 4): a bad blob
yields ``None`` and a ``BlobError`` in its slot, and never disturbs the other pages. The
page hash in the header (kernels/page_hash.py) is computed on the page's own device, at
encode and after decode: a GPU page is never copied to the host to be checked.
"""

from __future__ import annotations

import math
import struct
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from types import ModuleType

import numpy as np
import torch

from sglang_speckv.kernels import entropy_model as em
from sglang_speckv.kernels import format as fmt
from sglang_speckv.kernels import table_model as tm
from sglang_speckv.kernels.page_hash import page_hash
from sglang_speckv.kernels import rans_cpu
from sglang_speckv.kernels.rans_reference import MAX_LANES, SYMBOLS_PER_LANE, default_lanes  # noqa: F401 (re-exported)
from sglang_speckv import config
from sglang_speckv.predictors.base import PageMeta, Predictor

class BadSide(fmt.BlobError):
    """The predictor rejected the blob's side info (or failed on it)."""


def max_compressed_size(meta: PageMeta) -> int:
    """The largest blob ``encode_pages`` can return for this page: a RAW blob (header plus
    the page bytes), since a coded blob is only kept when it is smaller than that."""
    return fmt.HEADER_SIZE + _raw_bytes(meta)


def model_for(dtype: str) -> str:
    """The entropy model a page of ``dtype`` is coded with: the table model for 16-bit
    dtypes (a decoder without search, docs/DESIGN.md "The table model"), the exact model for
    fp8 (too few keys for a value lattice)."""
    return tm.MODEL_TABLE if em.symbol_bits(dtype) == 16 else tm.MODEL_EXACT


def _coder(device: torch.device) -> ModuleType:
    """The rANS implementation for a device: Triton kernels on CUDA, C++ loops on the CPU
    (rans_cpu runs the torch reference itself if its extension cannot be built)."""
    if device.type == "cuda":
        from sglang_speckv.kernels import rans_triton  # imports triton: only when needed

        return rans_triton
    return rans_cpu


# ---- Pages, batches ----------------------------------------------------------------------


def _storage_view(page: torch.Tensor, meta: PageMeta) -> torch.Tensor:
    """The page as its float storage dtype (uint8 fp8 pages are reinterpreted); any strides."""
    _check_page(page, meta)
    torch_dtype = em.TORCH_DTYPES[meta.dtype]
    return page if page.dtype == torch_dtype else page.view(torch_dtype)


def _check_page(page: torch.Tensor, meta: PageMeta) -> None:
    """ValueError unless ``page`` has the meta's shape and stores its dtype."""
    if tuple(page.shape) != tuple(meta.shape):
        raise ValueError(f"page of shape {tuple(page.shape)}, meta says {meta.shape}")
    ok = page.dtype == em.TORCH_DTYPES[meta.dtype] or (page.dtype == torch.uint8 and em.symbol_bits(meta.dtype) == 8)
    if not ok:
        raise ValueError(f"page dtype {page.dtype} does not store {meta.dtype}")


def _bits_dtype(dtype: str) -> torch.dtype:
    """The integer dtype the coders take storage patterns in."""
    return torch.int16 if em.symbol_bits(dtype) == 16 else torch.uint8


def _page_bytes(page: torch.Tensor) -> bytes:
    """The page's raw bytes, C order, little-endian."""
    return page.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes()


def _raw_bytes(meta: PageMeta) -> int:
    return meta.numel * em.symbol_bits(meta.dtype) // 8


def batches(metas: Sequence[PageMeta | None], batch_bytes: int) -> list[list[int]]:
    """Indices of ``metas`` cut into consecutive runs of at most ``batch_bytes`` raw bytes
    each (a page larger than that is a run of its own). None metas count as empty."""
    runs: list[list[int]] = [[]]
    size = 0
    for i, meta in enumerate(metas):
        nbytes = 0 if meta is None else _raw_bytes(meta)
        if runs[-1] and size + nbytes > batch_bytes:
            runs.append([])
            size = 0
        runs[-1].append(i)
        size += nbytes
    return [run for run in runs if run]


def _budget(batch_bytes: int | None) -> int:
    if batch_bytes is None:
        return config.default("coding_batch_bytes")
    if batch_bytes < 1:
        raise ValueError(f"batch_bytes must be >= 1, got {batch_bytes}")
    return batch_bytes


def _checked_stages(predictor: Predictor, meta: PageMeta) -> list[int]:
    stages = list(predictor.stages(meta))
    if stages[0] != 0 or stages[-1] != meta.numel or any(b <= a for a, b in zip(stages, stages[1:])):
        raise ValueError(f"{predictor.name}: stages {stages[:4]}... must rise from 0 to {meta.numel}")
    return stages


def _checked_rows(pred: tuple[torch.Tensor, torch.Tensor], n: int, name: str):
    """predict_rows' (mu, sigma), checked: float32, [rows >= 1, ...], n symbols. A tensor of
    one row is flattened (a view when it is contiguous) so that any range of it is a view."""
    out = []
    for t in pred:
        if t.dtype != torch.float32 or t.dim() < 1 or t.shape[0] < 1 or t.numel() != n:
            raise ValueError(f"{name}: predict_rows must return float32 [rows, ...] of {n} values, got {t.dtype} {tuple(t.shape)}")
        out.append(t.reshape(-1) if t.shape[0] == 1 else t)
    return tuple(out)


# A stage's predictions are asked for in chunks of the predictor's parts (_part_chunks) whose
# (mu, sigma) take at most this share of the pages' raw bytes (float32 mu and sigma are 8
# bytes per symbol: 4x a bf16 page, 8x an fp8 one), by the chunked encoders and the C++
# decoder; the Triton decoder materialises chunks of rows of this share (_chunks).
PARAMS_SHARE = 0.125
# The torch reference's encoder needs each page's (mu, sigma) whole (a lane's rANS steps run
# backwards over the page); it codes a batch's pages in runs whose materialised (mu, sigma)
# pass this share of the batch's raw bytes by at most one page's (per-symbol predictions:
# 4x a bf16 page).
PARAMS_SHARE_ENCODE = 1.0
# The Triton encoder (rans_triton.Encoder) codes a stage in chunks whose materialised
# float32 (mu, sigma), stacked storage patterns and word scratch (one int32 per rANS step:
# 4 B per symbol, 8 B under the table model) take at most this share of the pages' raw bytes.
ENCODE_SHARE = 0.25


def _chunks(preds, n: int, page_bytes: int, symbol_bytes: int = 8, share: float = PARAMS_SHARE) -> list[tuple[int, int]]:
    """Ranges [c0, c1) of a stage's n symbols, each ending on a row of every page's
    prediction (so _flat_range is a view plus a copy of the range), each as long as
    ``share`` of a page's raw bytes allows at ``symbol_bytes`` per symbol (mu and sigma; the
    table decoder's int32 params too on the GPU; the encoder's patterns and scratch), and
    at least one row."""
    row = 1
    for pred in preds:  # (mu, sigma) or (mu, sigma, params)
        for t in pred:
            if t.dim() > 1:
                row = math.lcm(row, t[0].numel())
    if row > n or n % row:
        row = n
    target = max(1, int(page_bytes * share) // symbol_bytes)  # symbols whose parameters fit the share
    step = max(row, target // row * row)
    return [(c0, min(n, c0 + step)) for c0 in range(0, n, step)]


def _table_params_rows(coder: ModuleType, mu: torch.Tensor, sigma: torch.Tensor, dtype: str) -> torch.Tensor:
    """The Triton table decoder's int32 parameters of prediction rows (``table_params``:
    quantize_params, the dense test, the row), computed once per distinct (mu, sigma): on
    one element along the dimensions where both are broadcast (stride 0: page_stats' tokens),
    then broadcast back the same way (a view, materialised a chunk at a time like mu). Rows
    of two shapes (one of them flattened by _checked_rows): per symbol, 1-D."""
    if mu.shape != sigma.shape:
        return coder.table_params(mu.reshape(-1), sigma.reshape(-1), dtype)
    one = tuple(slice(0, 1) if a == b == 0 else slice(None) for a, b in zip(mu.stride(), sigma.stride()))
    return coder.table_params(mu[one], sigma[one], dtype).expand(mu.shape)


def _flat_range(t: torch.Tensor, c0: int, c1: int) -> torch.Tensor:
    """Symbols [c0, c1) of a prediction [rows, ...] (C order): rows sliced (a view), then
    flattened (a copy of the range only, for broadcast rows). 1-D: a view."""
    if t.dim() == 1:
        return t[c0:c1]
    row = t[0].numel()
    return t[c0 // row : c1 // row].reshape(-1)


def _stack_range(preds, c0: int, c1: int, device: torch.device) -> list[torch.Tensor]:
    """Symbols [c0, c1) (a _chunks range) of every page's predictions (per page a tuple of
    tensors [rows, ...]), as contiguous [P, c1 - c0] tensors on ``device``, one per tuple
    element (a view of one page's when it is contiguous there)."""
    if len(preds) == 1:
        return [_flat_range(t, c0, c1).to(device).contiguous()[None] for t in preds[0]]
    chunk = [torch.empty((len(preds), c1 - c0), dtype=t.dtype, device=device) for t in preds[0]]
    for j, pred in enumerate(preds):
        for dest, t in zip(chunk, pred):
            dest[j] = _flat_range(t, c0, c1)
    return chunk


# ---- Encode -----------------------------------------------------------------------------


@dataclass
class _Coded:
    """One page on its way to a blob."""

    header: fmt.BlobHeader
    side: bytes
    page: torch.Tensor  # the page in its storage dtype (any strides; read only for RAW blobs)


@dataclass
class _Prepared:
    """One page ready for the coder: its blob so far, storage patterns ([numel], the
    page's own memory when contiguous), stage boundaries, and, for the reference encoder,
    its (mu, sigma) (rows for a one-stage predictor; the stages' rows
    concatenated, the coder needing the page whole). The chunked encoder predicts as it
    codes (_code_staged): nothing held."""

    coded: _Coded
    meta: PageMeta
    bits: torch.Tensor
    stages: list[int]
    mu: torch.Tensor | None = None
    sigma: torch.Tensor | None = None

    def held(self) -> int:
        """Bytes this page holds until it is coded beyond its own patterns."""
        return sum(t.untyped_storage().nbytes() for t in (self.mu, self.sigma) if t is not None)


def _nan_page(meta: PageMeta, device: torch.device, materialise: bool) -> torch.Tensor:
    """The ``values`` a predictor sees before stage 0: the page's shape in its storage dtype,
    all NaN (every storage dtype has one; torch.full writes the same pattern on both sides).
    Stages then fill in the stored patterns, so values are exact and NaN payloads kept.
    Without ``materialise`` (one stage: nothing is ever filled in) a broadcast scalar."""
    nan = torch.full((), float("nan"), dtype=em.TORCH_DTYPES[meta.dtype], device=device)
    return nan.expand(meta.shape).clone() if materialise else nan.expand(meta.shape)


def _cpp(device: torch.device) -> bool:
    """Whether the C++ coder codes pages on ``device``: it reads prediction rows in place,
    a few of a stage's parts at a time (_part_chunks), decoding and encoding (the chunked
    encoder, rans_cpu.Encoder: last part first, so that a page's (mu, sigma) exist a chunk
    at a time); else the coder takes (mu, sigma) materialised."""
    return _coder(device) is rans_cpu and rans_cpu.available()


def _staged(device: torch.device) -> bool:
    """Whether pages on ``device`` are encoded a stage at a time, last first (_code_staged):
    by the C++ coder (reading the rows in place) or the Triton coder (rans_triton.Encoder, a
    chunk of rows at a time); the torch reference takes (mu, sigma) whole."""
    return _cpp(device) or _coder(device) is not rans_cpu


def _part_chunks(predictor: Predictor, meta: PageMeta, stage: int, symbols: int) -> list[tuple[int, int, int]]:
    """(p0, p1, n): ranges [p0, p1) of the ``predictor.parts`` of a stage of ``symbols``
    symbols that the chunked encoders and the C++ decoder ask predict_rows for at once, and
    the n symbols of each: as many parts as float32 (mu, sigma), 8 bytes per symbol, fit in
    PARAMS_SHARE of the page's raw bytes, and at least one. ValueError for a part count that
    does not divide the stage."""
    parts = predictor.parts(meta, stage)
    if parts < 1 or symbols % parts:
        raise ValueError(f"{predictor.name}: {parts} parts of a stage of {symbols} symbols (must divide it)")
    per_part = symbols // parts
    step = max(1, int(_raw_bytes(meta) * PARAMS_SHARE) // (8 * per_part))
    return [(p0, min(parts, p0 + step), (min(parts, p0 + step) - p0) * per_part) for p0 in range(0, parts, step)]


def _prepare(page, meta, predictor, stages, w_wide, kappa, lanes, model) -> _Prepared:
    """Side info, bit patterns ([numel], int16 / uint8) and what the coder needs of the
    predictor: for the chunked encoder nothing (it predicts as it codes: _code_staged);
    else a one-stage predictor's predict_rows (possibly broadcast views), or a multi-stage
    one's stages' rows predicted now and concatenated into one [numel] each."""
    page = _storage_view(page, meta)
    bits = page.contiguous().view(_bits_dtype(meta.dtype)).reshape(-1)
    side = predictor.side_info(page, meta)  # the page as stored: no float32 copy of it
    header = fmt.BlobHeader(
        dtype=meta.dtype, layout=fmt.layout_of(meta.shape), shape=tuple(meta.shape),
        predictor_id=predictor.id, fingerprint=predictor.fingerprint,
        raw_hash=page_hash(page), position=meta.position, w_wide=w_wide,
        kappa=kappa, num_lanes=lanes, side_bytes=len(side), model=model,
    )  # fmt: skip
    prepared = _Prepared(_Coded(header, side, page), meta, bits, stages)
    if _staged(page.device):
        return prepared
    if len(stages) == 2:  # one stage: what the decoder knows is a broadcast NaN
        prepared.mu, prepared.sigma = _checked_rows(
            predictor.predict_rows(meta, side, _nan_page(meta, page.device, False), 0), meta.numel, predictor.name)
        return prepared
    # What the decoder will know at stage s: the values of stages < s, NaN elsewhere, in the
    # storage dtype (_nan_page), filled in as the stages go; the stages' rows flattened into
    # one [numel] each.
    seen = _nan_page(meta, page.device, materialise=True)
    mu, sigma = (torch.empty(meta.numel, dtype=torch.float32, device=page.device) for _ in range(2))
    for s, (a, b) in enumerate(zip(stages, stages[1:])):
        rows = _checked_rows(predictor.predict_rows(meta, side, seen, s), b - a, predictor.name)
        mu[a:b], sigma[a:b] = rows[0].reshape(-1), rows[1].reshape(-1)
        del rows
        if b < meta.numel:  # later stages see these patterns themselves
            seen.view(-1)[a:b] = bits[a:b].view(seen.dtype)
    prepared.mu, prepared.sigma = mu, sigma
    return prepared


def encode_pages(
    pages: Sequence[torch.Tensor],
    metas: Sequence[PageMeta],
    predictor: Predictor,
    *,
    num_lanes: int | None = None,
    w_wide: int = em.W_WIDE,
    kappa: int = em.KAPPA,
    batch_bytes: int | None = None,
) -> list[bytes]:
    """Code each page into a blob (docs/FORMAT.md). ``num_lanes`` defaults per page to
    ``default_lanes(numel)``; ``w_wide``/``kappa`` set the mixture (recorded per blob);
    ``batch_bytes`` bounds the raw bytes coded at once (default: config coding_batch_bytes).
    Raises ValueError for pages that do not match their meta or a misbehaving predictor."""
    if len(pages) != len(metas):
        raise ValueError(f"{len(pages)} pages but {len(metas)} metas")
    em.check_mixture(w_wide, kappa)
    if num_lanes is not None and num_lanes < 1:
        raise ValueError(f"num_lanes must be >= 1, got {num_lanes}")
    for page, meta in zip(pages, metas):
        _check_page(page, meta)
    blobs: list[bytes] = []
    for run in batches(metas, _budget(batch_bytes)):
        blobs += _encode_batch([pages[i] for i in run], [metas[i] for i in run], predictor, w_wide, kappa, num_lanes)
    return blobs


def _encode_batch(pages, metas, predictor, w_wide, kappa, num_lanes, model=None) -> list[bytes]:
    """Blobs of pages in one batch, each with ``model`` (default: model_for its dtype)."""
    # One coder call per (size, lanes, device, dtype, stages): its loop steps serve every page at once.
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, (page, meta) in enumerate(zip(pages, metas)):
        lanes = min(num_lanes or default_lanes(meta.numel), meta.numel)
        groups[(meta.numel, lanes, page.device, meta.dtype, tuple(_checked_stages(predictor, meta)))].append(i)
    blobs: list[bytes] = [b""] * len(pages)
    retry: list[int] = []
    params_budget = PARAMS_SHARE_ENCODE * sum(_raw_bytes(meta) for meta in metas)
    for (numel, lanes, device, dtype, stages), members in groups.items():
        m = model or model_for(dtype)
        # Pages go to the coder together until what they hold (_Prepared.held: predictions,
        # per symbol 4x a bf16 page; none for the chunked encoder, whose chunks of parts
        # take PARAMS_SHARE of each page) passes the budget, then the next run starts.
        run, held = [], 0
        for n, i in enumerate(members):
            run.append((i, _prepare(pages[i], metas[i], predictor, list(stages), w_wide, kappa, lanes, m)))
            held += run[-1][1].held()
            if held >= params_budget or n + 1 == len(members):
                retry += _code_run(run, predictor, device, dtype, lanes, w_wide, kappa, m, blobs)
                held = 0
    # A page the table model could not shrink (mostly escapes: every bit pattern, garbage
    # parameters) gets the exact model's try before it is stored raw.
    if retry:
        again = _encode_batch([pages[i] for i in retry], [metas[i] for i in retry], predictor, w_wide, kappa,
                              num_lanes, tm.MODEL_EXACT)  # fmt: skip
        for i, blob in zip(retry, again):
            blobs[i] = blob
    return blobs


def _code_run(run: list, predictor, device, dtype, lanes, w_wide, kappa, model, blobs: list[bytes]) -> list[int]:
    """One coder call for ``run`` ((index, _Prepared) per page; emptied, so that the
    predictions are freed as soon as the coder is done): blobs[index] for each page.
    Returns the indices whose page the table model left raw (worth the exact model's try)."""
    index, prepared = zip(*run)
    run.clear()
    if _staged(device):
        words, lane_words = _code_staged(prepared, predictor, device, dtype, lanes, w_wide, kappa, model)
    else:
        words, lane_words = _coder(device).encode_values([p.bits for p in prepared], [p.mu for p in prepared],
                                                         [p.sigma for p in prepared], dtype, lanes, w_wide, kappa,
                                                         model)  # fmt: skip
    coded = [p.coded for p in prepared]
    del prepared
    lane_words = lane_words.cpu().numpy()  # [P, NL]
    words = words.cpu().numpy().view("<u4")  # int32 -> the same u32 patterns, no copy
    ends = np.cumsum(lane_words.sum(axis=1))
    retry = []
    for j, c in enumerate(coded):
        stream = words[ends[j] - lane_words[j].sum() : ends[j]]
        blobs[index[j]], raw = _pack(c, lane_words[j], stream)
        if raw and model == tm.MODEL_TABLE:
            retry.append(index[j])
    return retry


def _code_staged(prepared, predictor, device, dtype, lanes, w_wide, kappa, model) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked encoder (rans_cpu.Encoder, rans_triton.Encoder) over pages of one stage
    layout: the last stage first and within a stage its last chunk of parts first
    (_part_chunks), each chunk's predictions made just before it is coded, so that a page's
    (mu, sigma) exist a chunk at a time. What the predictor sees is what the decoder will
    know as far as it may read (stages < s): a multi-stage predictor gets the page itself
    (no copy; stages >= s hold the page's values, not the decoder's NaN: predictors/base.py),
    a one-stage one the decoder's broadcast NaN. The C++ encoder reads the rows in place;
    the Triton one gets them materialised a chunk at a time (ENCODE_SHARE), last first."""
    encoder = _coder(device).Encoder([p.bits for p in prepared], dtype, lanes, w_wide, kappa, model)
    stages = prepared[0].stages
    single = len(stages) == 2
    page_bytes = prepared[0].meta.numel * em.symbol_bits(dtype) // 8
    # per symbol of a Triton chunk: float32 (mu, sigma), the stacked patterns, the scratch
    symbol_bytes = 8 + em.symbol_bits(dtype) // 8 + (8 if model == tm.MODEL_TABLE else 4)
    for s in reversed(range(len(stages) - 1)):
        a, b = stages[s], stages[s + 1]
        for p0, p1, n in reversed(_part_chunks(predictor, prepared[0].meta, s, b - a)):
            preds = []
            for p in prepared:
                values = _nan_page(p.meta, p.coded.page.device, False) if single else p.coded.page
                rows = predictor.predict_rows(p.meta, p.coded.side, values, s, (p0, p1))
                preds.append(_checked_rows(rows, n, predictor.name))
                del rows
            if _cpp(device):
                encoder.encode([mu for mu, _ in preds], [sigma for _, sigma in preds])
            else:
                for c0, c1 in reversed(_chunks(preds, n, page_bytes, symbol_bytes, ENCODE_SHARE)):
                    encoder.encode(*_stack_range(preds, c0, c1, device))
            del preds
    return encoder.finish()


def _pack(c: _Coded, lane_words: np.ndarray, stream: np.ndarray) -> tuple[bytes, bool]:
    """(the coded blob, False), or (the RAW one, True) when coding did not make the page
    smaller."""
    header = replace(c.header, stream_words=int(stream.size))
    if header.blob_size >= fmt.HEADER_SIZE + c.header.page_bytes:
        raw = replace(c.header, flags=fmt.FLAG_RAW, num_lanes=0, side_bytes=0, stream_words=0)
        return fmt.pack_blob(raw, np.zeros(0, np.uint32), b"", _page_bytes(c.page)), True
    return fmt.pack_blob(header, lane_words, c.side, memoryview(stream).cast("B")), False


# ---- Decode -----------------------------------------------------------------------------


def decode_pages(
    blobs: Sequence[bytes | memoryview],
    predictor: Predictor,
    *,
    metas: Sequence[PageMeta | None] | None = None,
    out: Sequence[torch.Tensor | None] | None = None,
    device: torch.device | str | None = None,
    batch_bytes: int | None = None,
) -> tuple[list[torch.Tensor | None], list[fmt.BlobError | None]]:
    """Decode blobs coded under ``predictor``. Returns (pages, errors): for each blob either
    the page (storage dtype, canonical shape) and None, or None and the BlobError why not.

    metas: what the caller expects of each page (dtype, shape, position must match the
    blob; token_ids are passed on to the predictor); default: the blob's own header.
    out: preallocated pages to write into (same shape, any strides; storage dtype, or uint8
    for fp8). On the CPU they are decoded into in place, whatever their strides: the page of
    a blob that fails verification may then hold unspecified bytes (the error says the page
    is not there; never read it); elsewhere in their buffer nothing is written. device:
    where to decode; default the device of ``out``'s first tensor, else CPU. batch_bytes:
    raw bytes decoded at once (default: config coding_batch_bytes).
    """
    n = len(blobs)
    budget = _budget(batch_bytes)
    if device is None:
        first = next((t for t in (out or []) if t is not None), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    pages: list[torch.Tensor | None] = [None] * n
    errors: list[fmt.BlobError | None] = [None] * n
    groups: dict[tuple, list[tuple[int, fmt.ParsedBlob, PageMeta]]] = defaultdict(list)
    for i, blob in enumerate(blobs):
        try:
            parsed = fmt.parse_blob(blob)
            meta = _meta_for(parsed.header, metas[i] if metas is not None else None, predictor)
            if out is not None and out[i] is not None:
                _check_page(out[i], meta)
            if parsed.header.raw:
                pages[i] = _finish_page(_page_from_raw(parsed, meta), parsed.header, out, i)
            else:
                h = parsed.header
                key = (h.dtype, h.shape, h.num_lanes, h.w_wide, h.kappa, h.model, tuple(_checked_stages(predictor, meta)))
                groups[key].append((i, parsed, meta))
        except fmt.BlobError as err:
            errors[i] = err
        except ValueError as err:  # out[i] does not fit the page the blob describes
            errors[i] = fmt.BadHeader(str(err))
    for key, members in groups.items():
        for run in batches([meta for _, _, meta in members], budget):
            _decode_group([members[j] for j in run], key[-1], predictor, device, pages, errors, out)
    return pages, errors


def _meta_for(header: fmt.BlobHeader, expected: PageMeta | None, predictor: Predictor) -> PageMeta:
    if header.predictor_id != predictor.id or header.fingerprint != predictor.fingerprint:
        raise fmt.WrongPredictor(
            f"blob coded by predictor {header.predictor_id} (fingerprint {header.fingerprint:#018x}); "
            f"this is {predictor.name} {predictor.id} ({predictor.fingerprint:#018x})"
        )
    meta = PageMeta(header.dtype, header.shape, header.position)
    if expected is None:
        return meta
    if (expected.dtype, tuple(expected.shape), expected.position) != (meta.dtype, meta.shape, meta.position):
        raise fmt.BadHeader(f"blob holds a {meta}, expected {expected}")
    return expected


def _page_from_raw(parsed: fmt.ParsedBlob, meta: PageMeta) -> torch.Tensor:
    raw = np.frombuffer(parsed.payload, dtype=np.uint8).copy()
    return torch.from_numpy(raw).view(em.TORCH_DTYPES[meta.dtype]).view(meta.shape)


def _finish_page(page: torch.Tensor, header: fmt.BlobHeader, out, i: int) -> torch.Tensor:
    """Verify the decoded page's hash (on its device) and hand it over (into out[i] when given).
    A page decoded in place into a strided out page is hashed from a contiguous copy of it
    (page_hash.page_bytes): one page's bytes at a time, never the batch's."""
    if page_hash(page) != header.raw_hash:
        raise fmt.RawChecksumMismatch("decoded page does not match the checksum recorded at encode time")
    if out is None or out[i] is None:
        return page
    target = out[i]
    if target.data_ptr() != page.data_ptr():  # not decoded in place
        target.view(page.dtype).copy_(page) if target.dtype == torch.uint8 else target.copy_(page)
    return target


def _words(members, device: torch.device) -> torch.Tensor:
    """The members' lane streams, concatenated, as int32 holding the u32 words (what both
    coders' decode_values read) on ``device``."""
    words = np.concatenate([np.frombuffer(p.payload, dtype="<u4") for _, p, _ in members])
    return torch.from_numpy(words.astype(np.uint32, copy=False).view(np.int32)).to(device)


def _targets(members, out, device: torch.device) -> list[torch.Tensor] | None:
    """The members' own out pages as storage patterns (canonical shape, any strides: e.g. a
    page's view of SGLang's host buffer), when the C++ coder can decode into them in place
    (CPU, every page given): no [P, numel] scratch and no copy. A page that then fails
    verification leaves its out page holding unspecified bytes (its error says so; callers
    never read it). None: decode into scratch."""
    if device.type != "cpu" or out is None:
        return None
    targets = []
    for i, _, meta in members:
        if out[i] is None or out[i].device != device:
            return None
        targets.append(out[i].view(_bits_dtype(meta.dtype)))
    return targets


def _decode_group(members, stages, predictor, device, pages, errors, out) -> None:
    """Decode pages of one shape/dtype/lane count together, stage by stage: on the CPU a
    chunk of the predictor's parts per call, its rows read in place (_part_chunks),
    elsewhere a chunk of rows at a time, materialised (_chunks)."""
    header0 = members[0][1].header
    numel, shape, dtype = header0.numel, header0.shape, header0.dtype
    lane_words = torch.from_numpy(np.stack([p.lane_words for _, p, _ in members]).astype(np.int64)).to(device)
    coder = _coder(device)
    decoder = coder.Decoder(
        _words(members, device), lane_words, numel, dtype, header0.w_wide, header0.kappa, header0.model
    )
    bits = _targets(members, out, device) or torch.empty((len(members), numel), dtype=_bits_dtype(dtype), device=device)
    # The values decoded so far feed later stages' predictions: the decoded patterns
    # themselves, as the storage dtype, NaN where not yet decoded (the encoder's _nan_page).
    # With one stage there are none, and every page's prediction sees one broadcast NaN.
    single = len(stages) == 2
    torch_dtype = em.TORCH_DTYPES[dtype]
    if not single:
        for page_bits, (_, _, meta) in zip(bits, members):
            page_bits.view(torch_dtype).view(shape).copy_(_nan_page(meta, device, False))
    failed: dict[int, fmt.BlobError] = {}

    def predict(s: int, n: int, parts: tuple[int, int] | None) -> list:
        """Per page (mu, sigma) [rows, ...] of n symbols of stage s, possibly broadcast views."""
        preds = []
        for j, (_, parsed, meta) in enumerate(members):
            page_values = _nan_page(meta, device, False) if single else bits[j].view(torch_dtype).view(shape)
            try:
                rows = predictor.predict_rows(meta, parsed.side, page_values, s, *([parts] if parts else []))
                preds.append(_checked_rows(rows, n, predictor.name))
            except (ValueError, RuntimeError) as err:  # bad side info: this page only
                failed.setdefault(j, BadSide(f"{predictor.name} rejected the side info: {err}"))
                zero, one = (torch.full((), v, dtype=torch.float32, device=device).expand(n) for v in (0.0, 1.0))
                preds.append((zero, one))
        return preds

    for s, (a, b) in enumerate(zip(stages, stages[1:])):
        if _cpp(device):  # the C++ coder reads the rows in place, a chunk of parts at a time
            for p0, p1, n in _part_chunks(predictor, members[0][2], s, b - a):
                preds = predict(s, n, (p0, p1))
                decoder.decode_values([mu for mu, _ in preds], [sigma for _, sigma in preds], bits)
                del preds
            continue
        preds = predict(s, b - a, None)
        # the Triton table decoder's parameters, quantised per distinct (mu, sigma) here
        # rather than per symbol in its step loop (mu and sigma feed its rare exact steps only)
        packed = hasattr(coder, "table_params") and header0.model == tm.MODEL_TABLE
        if packed:
            preds = [(mu, sigma, _table_params_rows(coder, mu, sigma, dtype)) for mu, sigma in preds]
        for c0, c1 in _chunks(preds, b - a, numel * em.symbol_bits(dtype) // 8, 12 if packed else 8):
            chunk = _stack_range(preds, c0, c1, device)  # [P, c1 - c0] each
            decoder.decode_values(*chunk[:2], bits, *([chunk[2]] if packed else []))
            del chunk
        del preds
    ok = decoder.finish().tolist()
    for j, (i, parsed, meta) in enumerate(members):
        try:
            if j in failed:
                raise failed[j]
            if not ok[j]:
                raise fmt.BadStream("a lane's rANS state did not return to its initial value: corrupt stream")
            page = bits[j].view(torch_dtype).view(meta.shape)  # out[i] itself when decoded in place
            pages[i] = _finish_page(page, parsed.header, out, i)
        except fmt.BlobError as err:
            errors[i] = err


# ---- Start-up ---------------------------------------------------------------------------

WARM_UP_TOKENS = 64  # the warm-up page has at least this many tokens


def warm_up(dtype: str, shape: Sequence[int], device: torch.device | str, predictor: Predictor) -> None:
    """Code and decode one page of ``dtype`` and the canonical ``shape`` (at least
    WARM_UP_TOKENS tokens, so that side info is worth coding) on ``device`` with
    ``predictor``, so that what a restore runs is compiled, loaded or built now, not by the
    first write or restore: the coder (Triton kernels on CUDA: tens of seconds the first
    time; the C++ coder on the CPU), the tables of the predictor's mixture, and the
    predictor's own parameters on the device. The page is drawn from the predictor itself,
    stage by stage (mu + sigma z, z standard normal, side info from a Gaussian page), so
    that a calibrated predictor codes it as it codes KV. The kernels do not depend on the
    token count. RuntimeError if the page was not coded by ``model_for(dtype)`` (a page of
    zeros is stored raw in bf16: it would warm nothing up) or did not decode; ValueError if
    the predictor cannot code such a page without token ids (``can_code``)."""
    shape = list(shape)
    shape[2] = max(shape[2], WARM_UP_TOKENS)
    meta = PageMeta(dtype, tuple(shape), 0)
    why = predictor.can_code(meta)
    if why is not None:
        raise ValueError(f"{predictor.name} cannot code a page without token ids ({why})")
    torch_dtype = em.TORCH_DTYPES[dtype]
    gen = torch.Generator().manual_seed(0)
    gaussian = torch.randn(shape, generator=gen).to(torch_dtype).to(device)
    side = predictor.side_info(gaussian, meta)
    page = _nan_page(meta, gaussian.device, materialise=True)
    stages = _checked_stages(predictor, meta)
    for s, (a, b) in enumerate(zip(stages, stages[1:])):
        mu, sigma = (t.reshape(-1) for t in predictor.predict_rows(meta, side, page, s))
        z = torch.randn(b - a, generator=gen).to(mu.device)
        page.view(-1)[a:b] = (mu + sigma * z).to(torch_dtype)
    (blob,) = encode_pages([page], [meta], predictor)
    header = fmt.parse_blob(blob).header
    if header.raw or header.model != model_for(dtype):
        raise RuntimeError(f"the warm-up page was not coded by the {model_for(dtype)} model")
    _, (error,) = decode_pages([blob], predictor, device=device)
    if error is not None:
        raise error


# ---- The stored value: token ids + blob (docs/FORMAT.md "Stored value") -------------------

VALUE_MAGIC = b"SKVT"
VALUE_VERSION = 1
VALUE_HEAD = struct.Struct("<4sB3xI")  # magic, version, 3 zero bytes, number of token ids
# Store namespaces change with the value and blob formats: a reader never sees an older one.
FORMAT_VERSION = VALUE_VERSION * 1000 + fmt.VERSION


def pack_value(token_ids: bytes | None, blob: bytes) -> bytes:
    """The stored value: header, token ids (uint32 LE bytes, or None), blob."""
    token_ids = token_ids or b""
    return b"".join((VALUE_HEAD.pack(VALUE_MAGIC, VALUE_VERSION, len(token_ids) // 4), token_ids, blob))


def unpack_value(value) -> tuple[bytes | None, memoryview]:
    """(token ids as uint32 LE bytes or None, blob) of a stored value; BlobError if it is
    not one."""
    view = memoryview(value).cast("B")
    if len(view) < VALUE_HEAD.size:
        raise fmt.BlobError(f"stored value of {len(view)} bytes is shorter than its header")
    magic, version, n = VALUE_HEAD.unpack_from(view)
    if magic != VALUE_MAGIC or version != VALUE_VERSION:
        raise fmt.BlobError(f"stored value has magic {magic!r} version {version}, expected {VALUE_MAGIC!r} {VALUE_VERSION}")
    end = VALUE_HEAD.size + 4 * n
    if end > len(view):
        raise fmt.BlobError(f"stored value claims {n} token ids but holds {len(view)} bytes")
    tokens = bytes(view[VALUE_HEAD.size:end]) if n else None
    return tokens, view[end:]


def token_tuple(raw: bytes | None) -> tuple[int, ...] | None:
    """Token ids (uint32 LE bytes) as a tuple, as PageMeta holds them."""
    if raw is None:
        return None
    return struct.unpack(f"<{len(raw) // 4}I", raw)
