"""The blob: one coded (or raw) KV page, byte for byte as docs/FORMAT.md describes it.

A blob is ``header (80 bytes) | lane table (u32 x num_lanes) | side info | payload``, all
little-endian. The payload is the lane streams (u32 words, lane after lane) or, when the
RAW flag is set, the page's bytes verbatim. ``HEADER`` below is the single struct that
mirrors FORMAT.md's table; never pickle, never read a field FORMAT.md does not document.

``parse_blob`` trusts nothing: it checks the magic, the version, the header checksum (which
covers the header and the lane table), every flag bit, every code and every size *before*
allocating anything sized by the blob, and raises a subclass of ``BlobError`` that says
what is wrong. The decoder (codec.py) adds the checks only decoding can do (every lane's
final state, the page hash (kernels/page_hash.py) of the decoded page, the predictor).
"""

from __future__ import annotations

import math

import struct
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
import xxhash

from sglang_speckv.kernels import entropy_model as em
from sglang_speckv.kernels import table_model as tm

MAGIC = b"SPKV"
# The one place the blob format version is written. 3: the `model` byte (the table model,
# kernels/table_model.py, codes 16-bit pages); 2: raw_hash is the page hash
# (kernels/page_hash.py). Versions 1 and 2 are refused.
VERSION = 3

# Header: magic, version, flags, dtype, layout, predictor id, w_wide, kappa, model, 2
# reserved bytes (zero), shape (5 x u32), position, num_lanes, side_bytes, stream_words, reserved u32,
# fingerprint, raw_hash, header_xxh64. docs/FORMAT.md has the offsets.
HEADER = struct.Struct("<4sHHBBBBBB2s5IIIIII QQQ")
FIELDS = (
    "magic", "version", "flags", "dtype", "layout", "predictor_id", "w_wide", "kappa",
    "model", "reserved2", "shape0", "shape1", "shape2", "shape3", "shape4", "position", "num_lanes",
    "side_bytes", "stream_words", "reserved", "fingerprint", "raw_hash", "header_xxh64",
)  # fmt: skip
HEADER_SIZE = HEADER.size  # 80
CHECKED_SIZE = HEADER_SIZE - 8  # header_xxh64 covers bytes [0, 72) and the lane table
assert HEADER_SIZE == 80, HEADER_SIZE

# Flag bits (u16). All other bits must be zero.
FLAG_RAW = 1 << 0  # payload is the page verbatim (coding did not make it smaller)
FLAG_HAS_SIDE = 1 << 1  # side_bytes > 0 (redundant with side_bytes; both must agree)
KNOWN_FLAGS = FLAG_RAW | FLAG_HAS_SIDE

DTYPE_CODES = {"fp8_e4m3": 1, "fp8_e5m2": 2, "bf16": 3, "fp16": 4}
DTYPE_NAMES = {code: name for name, code in DTYPE_CODES.items()}
# Canonical page layouts (sglang_speckv/predictors/base.py): MHA [2, layers, tokens,
# kv_heads, head_dim]; MLA [1, layers, tokens, 1, latent_dim].
LAYOUT_CODES = {"mha": 1, "mla": 2}
LAYOUT_NAMES = {code: name for name, code in LAYOUT_CODES.items()}
# The entropy model that coded the stream (kernels/table_model.py MODELS).
MODEL_CODES = {tm.MODEL_EXACT: 0, tm.MODEL_TABLE: 1}
MODEL_NAMES = {code: name for name, code in MODEL_CODES.items()}

# The largest page a blob may describe: 1 GiB of raw KV. A real page is a few MB (e.g. 80
# layers x 64 tokens x 8 heads x 128 x 2 x 2 bytes = 21 MB); the bound keeps a lying shape
# from making the decoder allocate gigabytes.
MAX_PAGE_BYTES = 1 << 30
# Lane streams hold at least 2 words each; more lanes than symbols is never useful.
MIN_LANE_WORDS = 2


def min_stream_bits(numel: int, dtype: str) -> float:
    """A lower bound on the stream bits of a coded page of ``numel`` symbols, so that a
    header claiming a huge page over a tiny stream is refused before anything is allocated.
    Every key has probability at least 1/M, so the likeliest costs at least
    -log2(1 - (2^B - 1) / M) bits; rANS spends at least ~0.85x that (its rounding loses less
    than f/x <= 2^-3 relative per step), and the bound takes half, to be safe."""
    top = 1 << em.symbol_bits(dtype)
    return 0.5 * numel * -math.log1p(-(top - 1) / em.M) / math.log(2)


class BlobError(ValueError):
    """A blob that must not be decoded. The backend turns any of these into a cache miss."""


class BadMagic(BlobError):
    """Not a speckv blob (first 4 bytes are not b'SPKV')."""


class UnsupportedVersion(BlobError):
    """A speckv blob of a format version this code does not read."""


class Truncated(BlobError):
    """Shorter (or longer) than its header says."""


class BadChecksum(BlobError):
    """The header + lane table checksum does not match: the header is corrupt."""


class BadHeader(BlobError):
    """A header field is invalid or inconsistent (unknown flag/code, impossible sizes)."""


class WrongPredictor(BlobError):
    """Coded under a different predictor (id) or calibration (fingerprint)."""


class BadStream(BlobError):
    """A lane's rANS state did not return to its initial value: the stream is corrupt."""


class RawChecksumMismatch(BlobError):
    """The decoded page's page hash differs from the one recorded at encode time."""


@dataclass(frozen=True)
class BlobHeader:
    """The header fields (docs/FORMAT.md). Sizes are counts, not offsets."""

    dtype: str  # key of DTYPE_CODES
    layout: str  # key of LAYOUT_CODES
    shape: tuple[int, int, int, int, int]  # canonical page shape
    predictor_id: int
    fingerprint: int  # predictor / calibration fingerprint (u64)
    raw_hash: int  # page hash (kernels/page_hash.py) of the raw page
    position: int = 0  # absolute position of the page's first token
    flags: int = 0
    w_wide: int = 0
    kappa: int = 0
    num_lanes: int = 0
    model: str = tm.MODEL_EXACT  # key of MODEL_CODES
    side_bytes: int = 0
    stream_words: int = 0
    version: int = VERSION

    @property
    def raw(self) -> bool:
        return bool(self.flags & FLAG_RAW)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def page_bytes(self) -> int:
        return self.numel * em.symbol_bits(self.dtype) // 8

    @property
    def payload_bytes(self) -> int:
        return self.page_bytes if self.raw else 4 * self.stream_words

    @property
    def blob_size(self) -> int:
        return HEADER_SIZE + 4 * self.num_lanes + self.side_bytes + self.payload_bytes


class ParsedBlob(NamedTuple):
    header: BlobHeader
    lane_words: np.ndarray  # uint32 [num_lanes] (a read-only view into the blob)
    side: bytes
    payload: memoryview  # u32 words (coded) or the page bytes (RAW)


def layout_of(shape: tuple[int, ...]) -> str:
    """'mha' for [2, L, T, H, D], 'mla' for [1, L, T, 1, D]; ValueError otherwise."""
    if len(shape) == 5 and shape[0] == 2:
        return "mha"
    if len(shape) == 5 and shape[0] == 1 and shape[3] == 1:
        return "mla"
    raise ValueError(f"not a canonical page shape [2|1, layers, tokens, heads, dim]: {tuple(shape)}")


def pack_blob(header: BlobHeader, lane_words: np.ndarray, side: bytes, payload: bytes | memoryview) -> bytes:
    """Serialise a blob. The header's counts (num_lanes, side_bytes, stream_words, flags)
    must describe the other arguments; ``_validate`` checks them as ``parse_blob`` would."""
    lane_words = np.ascontiguousarray(lane_words, dtype="<u4")
    header = replace(header, flags=(header.flags & ~FLAG_HAS_SIDE) | (FLAG_HAS_SIDE if side else 0))
    _validate(header)
    if lane_words.shape != (header.num_lanes,) or len(side) != header.side_bytes:
        raise ValueError("lane table / side info do not match the header")
    if len(payload) != header.payload_bytes:
        raise ValueError(f"payload of {len(payload)} bytes, header says {header.payload_bytes}")
    if not header.raw and int(lane_words.sum(dtype=np.uint64)) != header.stream_words:
        raise ValueError("lane word counts do not sum to stream_words")
    checked = HEADER.pack(*_fields(header), 0)[:CHECKED_SIZE] + lane_words.tobytes()
    digest = xxhash.xxh64_intdigest(checked)
    return b"".join([checked[:CHECKED_SIZE], struct.pack("<Q", digest), checked[CHECKED_SIZE:], side, payload])


def parse_blob(blob: bytes | bytearray | memoryview) -> ParsedBlob:
    """Check and split a blob; raises a BlobError subclass on anything invalid."""
    view = memoryview(blob).cast("B")
    if len(view) < 6:
        raise Truncated(f"blob of {len(view)} bytes is shorter than its magic and version")
    if bytes(view[:4]) != MAGIC:
        raise BadMagic(f"not a speckv blob (magic {bytes(view[:4])!r}, expected {MAGIC!r})")
    (version,) = struct.unpack_from("<H", view, 4)
    if version != VERSION:
        raise UnsupportedVersion(f"blob format version {version}; this speckv reads version {VERSION}")
    if len(view) < HEADER_SIZE:
        raise Truncated(f"blob of {len(view)} bytes is shorter than the {HEADER_SIZE}-byte header")
    fields = dict(zip(FIELDS, HEADER.unpack_from(view, 0)))
    num_lanes = fields["num_lanes"]
    table_end = HEADER_SIZE + 4 * num_lanes
    if len(view) < table_end:
        raise Truncated(f"blob of {len(view)} bytes cannot hold its {num_lanes}-lane table")
    digest = xxhash.xxh64()
    digest.update(view[:CHECKED_SIZE])
    digest.update(view[HEADER_SIZE:table_end])
    if digest.intdigest() != fields["header_xxh64"]:
        raise BadChecksum("header checksum mismatch: the blob header is corrupt")
    header = _header_from_fields(fields)
    if len(view) != header.blob_size:
        raise Truncated(f"blob of {len(view)} bytes, header says {header.blob_size}")
    lane_words = np.frombuffer(view, dtype="<u4", count=num_lanes, offset=HEADER_SIZE)
    if not header.raw:
        if 32 * header.stream_words < min_stream_bits(header.numel, header.dtype):
            raise BadHeader(f"a stream of {header.stream_words} words cannot hold a page of {header.numel} symbols")
        if int(lane_words.sum(dtype=np.uint64)) != header.stream_words:
            raise BadHeader("lane word counts do not sum to the stream length")
        if num_lanes and int(lane_words.min()) < MIN_LANE_WORDS:
            raise BadHeader(f"a lane holds fewer than {MIN_LANE_WORDS} words")
    side_end = table_end + header.side_bytes
    return ParsedBlob(header, lane_words, bytes(view[table_end:side_end]), view[side_end:])


def _fields(h: BlobHeader) -> tuple:
    """BlobHeader -> HEADER values, without the trailing checksum."""
    return (
        MAGIC, h.version, h.flags, DTYPE_CODES[h.dtype], LAYOUT_CODES[h.layout], h.predictor_id,
        h.w_wide, h.kappa, MODEL_CODES[h.model], bytes(2), *h.shape, h.position, h.num_lanes, h.side_bytes, h.stream_words, 0,
        h.fingerprint, h.raw_hash,
    )  # fmt: skip


def _header_from_fields(f: dict) -> BlobHeader:
    """HEADER fields by name (already checksummed) -> validated BlobHeader."""
    if f["dtype"] not in DTYPE_NAMES:
        raise BadHeader(f"unknown dtype code {f['dtype']}")
    if f["layout"] not in LAYOUT_NAMES:
        raise BadHeader(f"unknown layout code {f['layout']}")
    if f["model"] not in MODEL_NAMES:
        raise BadHeader(f"unknown entropy model code {f['model']}")
    if f["reserved"] or f["reserved2"] != bytes(2):
        raise BadHeader("reserved header bytes are not zero")
    header = BlobHeader(
        dtype=DTYPE_NAMES[f["dtype"]], layout=LAYOUT_NAMES[f["layout"]],
        shape=tuple(f[f"shape{i}"] for i in range(5)), predictor_id=f["predictor_id"],
        fingerprint=f["fingerprint"], raw_hash=f["raw_hash"], position=f["position"],
        flags=f["flags"], w_wide=f["w_wide"], kappa=f["kappa"], num_lanes=f["num_lanes"],
        model=MODEL_NAMES[f["model"]],
        side_bytes=f["side_bytes"], stream_words=f["stream_words"], version=f["version"],
    )  # fmt: skip
    try:
        _validate(header)
    except ValueError as err:
        raise BadHeader(str(err)) from None
    return header


def _validate(h: BlobHeader) -> None:
    """Field-level rules of FORMAT.md (ValueError on the first one broken)."""
    if h.flags & ~KNOWN_FLAGS:
        raise ValueError(f"unknown flag bits {h.flags & ~KNOWN_FLAGS:#x}")
    if bool(h.flags & FLAG_HAS_SIDE) != (h.side_bytes > 0):
        raise ValueError("HAS_SIDE flag and side_bytes disagree")
    if h.dtype not in DTYPE_CODES or h.layout not in LAYOUT_CODES:
        raise ValueError(f"unknown dtype {h.dtype!r} or layout {h.layout!r}")
    if len(h.shape) != 5 or min(h.shape) < 1:
        raise ValueError(f"page shape {h.shape} must have 5 positive dimensions")
    if layout_of(h.shape) != h.layout:
        raise ValueError(f"shape {h.shape} is not a {h.layout} page")
    if h.page_bytes > MAX_PAGE_BYTES:
        raise ValueError(f"page of {h.page_bytes} bytes exceeds the {MAX_PAGE_BYTES}-byte limit")
    em.check_mixture(h.w_wide, h.kappa)
    tm.check_model(h.model, h.dtype)  # the table model codes 16-bit dtypes only
    if not 0 <= h.predictor_id <= 255:
        raise ValueError(f"predictor id {h.predictor_id} is not a u8")
    if h.raw:
        if h.num_lanes or h.stream_words or h.side_bytes:
            raise ValueError("a RAW blob has no lanes, no stream and no side info")
    elif not 1 <= h.num_lanes <= h.numel:
        raise ValueError(f"{h.num_lanes} lanes for {h.numel} symbols")
