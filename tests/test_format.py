"""The blob format (kernels/format.py, docs/FORMAT.md): golden bytes, and every way a blob
can be wrong is rejected with a BlobError (never a crash, never a wrong page)."""

import struct

import numpy as np
import pytest
import torch
import xxhash

from sglang_speckv import codec
from sglang_speckv.kernels import entropy_model as em
from sglang_speckv.kernels import format as fmt
from sglang_speckv.kernels import page_hash
from sglang_speckv.predictors.base import PageMeta
from sglang_speckv.predictors.page_stats import PageStatsPredictor

PREDICTOR = PageStatsPredictor()


def tiny_bf16_page():
    """A fixed [2, 1, 8, 1, 4] bf16 page with per-channel structure (no RNG)."""
    i = torch.arange(64, dtype=torch.float32).view(2, 1, 8, 1, 4)
    channel = torch.tensor([0.5, -1.0, 2.0, 0.0])
    return (channel * (1 + i[:, :, :, :, :1] / 64) + ((i * 7) % 5 - 2) / 16).to(torch.bfloat16)


TINY_META = PageMeta("bf16", (2, 1, 8, 1, 4), position=130)

# encode_pages([tiny_bf16_page()], [TINY_META], PageStatsPredictor(), num_lanes=2): format
# version 3, `model` byte (offset 13) = 1, the table model
GOLDEN_CODED = (
    "53504b56030002000301010d0301000002000000010000000800000001000000040000008200000002000000"
    "18000000120000000000000000000000000000006f45c56c0eb0ef0cc2be494c6bd0d28c080000000a000000"
    "183f9dbf1c40003c5c3fdbbf5d4080bca7abb1a4a5abb2a42f084cda33cf02006e8c845ec6c7b2667582272c"
    "72bd7863b712e4eaa60e81fc5be90391bd695c07f0e76e4e4a07f7bc909b4cefd600ce1d9983e4dd41800d20"
    "00004a4ad7a472b6"
)
# encode_pages of an 8-byte fp8 page that does not compress: stored RAW
GOLDEN_RAW = (
    "53504b56030001000101010d0300000002000000010000000200000001000000020000000000000000000000"
    "00000000000000000000000000000000000000002dd2bb2c62fec16848ee4c0b0feaa9f801f37a80005cc129"
)
# The same bf16 page written by format version 2 (the exact model; no model byte).
# Refused: UnsupportedVersion.
GOLDEN_V2_CODED = (
    "53504b56020002000301010d0300000002000000010000000800000001000000040000008200000002000000"
    "18000000130000000000000000000000000000006f45c56c0eb0ef0cd8d5154694b123aa080000000b000000"
    "183f9dbf1c40003c5c3fdbbf5d4080bca7abb1a4a5abb2a453dfc2e047ce0200dac33ab25091a4f9fab7d0ed"
    "72bd7863b712e4eaa60e81fcf4fa66de99a50e01bca939addb7140471e93f9d42b8c3efefb4af82cedcbc3dc"
    "bce6cf3e9afdb27234b6c32c"
)
# The same page written by format version 1 (raw_xxh64 at offset 64; the stream is that of
# version 2, the version and both checksums differ). Refused: UnsupportedVersion.
GOLDEN_V1_CODED = (
    "53504b56010002000301010d0300000002000000010000000800000001000000040000008200000002000000"
    "1800000013000000000000000000000000000000e8867c12d038c494b5a1601796ad6458080000000b000000"
    "183f9dbf1c40003c5c3fdbbf5d4080bca7abb1a4a5abb2a453dfc2e047ce0200dac33ab25091a4f9fab7d0ed"
    "72bd7863b712e4eaa60e81fcf4fa66de99a50e01bca939addb7140471e93f9d42b8c3efefb4af82cedcbc3dc"
    "bce6cf3e9afdb27234b6c32c"
)


def golden_raw_page():
    return torch.tensor([0x01, 0xF3, 0x7A, 0x80, 0x00, 0x5C, 0xC1, 0x29], dtype=torch.uint8).view(2, 1, 2, 1, 2)


def coded_blob():
    (blob,) = codec.encode_pages([tiny_bf16_page()], [TINY_META], PREDICTOR, num_lanes=2)
    return blob


def decode_one(blob, predictor=PREDICTOR):
    (page,), (error,) = codec.decode_pages([blob], predictor)
    return page, error


def with_fields(blob, rehash=True, **changes):
    """The blob with header fields replaced (and its checksum recomputed unless told)."""
    view = bytearray(blob)
    fields = dict(zip(fmt.FIELDS, fmt.HEADER.unpack_from(view, 0)))
    fields.update(changes)
    view[: fmt.HEADER_SIZE] = fmt.HEADER.pack(*fields.values())
    if rehash:
        table_end = fmt.HEADER_SIZE + 4 * min(fields["num_lanes"], (len(view) - fmt.HEADER_SIZE) // 4)
        digest = xxhash.xxh64_intdigest(bytes(view[: fmt.CHECKED_SIZE]) + bytes(view[fmt.HEADER_SIZE : table_end]))
        struct.pack_into("<Q", view, fmt.CHECKED_SIZE, digest)
    return bytes(view)


def test_golden_coded_bytes():
    blob = coded_blob()
    assert blob.hex() == GOLDEN_CODED
    page, error = decode_one(bytes.fromhex(GOLDEN_CODED))
    assert error is None and torch.equal(page.view(torch.int16), tiny_bf16_page().view(torch.int16))


def test_golden_raw_bytes():
    meta = PageMeta("fp8_e4m3", (2, 1, 2, 1, 2))
    (blob,) = codec.encode_pages([golden_raw_page()], [meta], PREDICTOR)
    assert fmt.parse_blob(blob).header.raw and len(blob) == fmt.HEADER_SIZE + 8
    assert blob.hex() == GOLDEN_RAW
    page, error = decode_one(bytes.fromhex(GOLDEN_RAW))
    assert error is None and torch.equal(page.view(torch.uint8), golden_raw_page())


@pytest.mark.parametrize("version,golden", [(1, GOLDEN_V1_CODED), (2, GOLDEN_V2_CODED)])
def test_old_version_blobs_are_refused(version, golden):
    old = bytes.fromhex(golden)
    with pytest.raises(fmt.UnsupportedVersion, match=f"version {version}"):
        fmt.parse_blob(old)
    page, error = decode_one(old)
    assert page is None and isinstance(error, fmt.UnsupportedVersion)


def test_header_round_trip_and_offsets():
    blob = coded_blob()
    parsed = fmt.parse_blob(blob)
    h = parsed.header
    assert (h.dtype, h.layout, h.shape, h.position, h.predictor_id) == ("bf16", "mha", (2, 1, 8, 1, 4), 130, 1)
    assert h.num_lanes == 2 and parsed.lane_words.sum() == h.stream_words
    assert h.side_bytes == len(parsed.side) == 3 * 8 and h.flags == fmt.FLAG_HAS_SIDE
    # FORMAT.md offsets
    assert blob[:4] == b"SPKV" and struct.unpack_from("<H", blob, 4)[0] == fmt.VERSION == 3
    assert blob[13] == fmt.MODEL_CODES["table"] and fmt.parse_blob(blob).header.model == "table"
    assert struct.unpack_from("<5I", blob, 16) == (2, 1, 8, 1, 4)
    assert struct.unpack_from("<I", blob, 36)[0] == 130
    assert struct.unpack_from("<Q", blob, 64)[0] == page_hash.reference(tiny_bf16_page())
    assert len(blob) == fmt.HEADER_SIZE + 4 * h.num_lanes + h.side_bytes + 4 * h.stream_words


def test_every_truncation_is_rejected():
    blob = coded_blob()
    for n in range(len(blob)):
        with pytest.raises(fmt.BlobError):
            fmt.parse_blob(blob[:n])
    with pytest.raises(fmt.Truncated):
        fmt.parse_blob(blob + b"\0")


def test_every_single_bit_flip_is_rejected_or_harmless():
    """Every flipped bit of a coded blob is refused with a BlobError, or, where it cannot
    change the page (a side-info bit below what the table model reads of sigma, which then
    decodes to the same symbols and passes the page hash), gives the original page."""
    blob = coded_blob()
    flipped = []
    for i in range(len(blob)):
        for bit in range(8):
            bad = bytearray(blob)
            bad[i] ^= 1 << bit
            flipped.append(bytes(bad))
    pages, errors = codec.decode_pages(flipped, PREDICTOR)  # one batch: the good ones decode together
    page = tiny_bf16_page()
    harmless = [i for i, p in enumerate(pages) if p is not None]
    assert all(torch.equal(pages[i].view(torch.int16), page.view(torch.int16)) for i in harmless)
    h = fmt.parse_blob(blob).header
    side = range(fmt.HEADER_SIZE + 4 * h.num_lanes, fmt.HEADER_SIZE + 4 * h.num_lanes + h.side_bytes)
    assert all(i // 8 in side for i in harmless) and len(harmless) <= len(flipped) // 20
    errors = [e for e in errors if e is not None]
    assert len(errors) == len(flipped) - len(harmless)
    assert all(isinstance(e, fmt.BlobError) for e in errors)
    kinds = {type(e) for e in errors}
    assert {fmt.BadMagic, fmt.UnsupportedVersion, fmt.BadChecksum} <= kinds
    assert kinds & {fmt.BadStream, fmt.RawChecksumMismatch}


@pytest.mark.parametrize(
    "changes,error",
    [
        ({"magic": b"SPKX"}, fmt.BadMagic),
        ({"version": 1}, fmt.UnsupportedVersion),
        ({"version": 2}, fmt.UnsupportedVersion),
        ({"version": 4}, fmt.UnsupportedVersion),
        ({"version": 0}, fmt.UnsupportedVersion),
        ({"flags": fmt.FLAG_HAS_SIDE | 1 << 5}, fmt.BadHeader),
        ({"flags": 0}, fmt.BadHeader),  # HAS_SIDE missing though side_bytes > 0
        ({"dtype": 0}, fmt.BadHeader),
        ({"dtype": 9}, fmt.BadHeader),
        ({"layout": 2}, fmt.BadHeader),  # MLA code on an MHA shape
        ({"layout": 7}, fmt.BadHeader),
        ({"reserved": 1}, fmt.BadHeader),
        ({"reserved2": b"\0\1"}, fmt.BadHeader),
        ({"model": 2}, fmt.BadHeader),  # no such entropy model
        ({"kappa": 8}, fmt.BadHeader),
        ({"shape2": 0}, fmt.BadHeader),
        ({"shape2": 1 << 31, "shape4": 1 << 31}, fmt.BadHeader),  # a lying size: 2^63 scalars
        ({"num_lanes": 0}, fmt.BadHeader),
        ({"shape2": 1, "num_lanes": 9}, fmt.BadHeader),  # more lanes than scalars
        ({"num_lanes": 1 << 30}, fmt.Truncated),  # a lane table that is not there
        ({"side_bytes": 1 << 31}, fmt.Truncated),
        ({"stream_words": 3}, fmt.Truncated),
        ({"header_xxh64": 0}, fmt.BadChecksum),
    ],
)
def test_bad_headers(changes, error):
    rehash = "header_xxh64" not in changes
    bad = with_fields(coded_blob(), rehash=rehash, **changes)
    with pytest.raises(error):
        fmt.parse_blob(bad)
    page, err = decode_one(bad)
    assert page is None and isinstance(err, error)


def test_bad_lane_tables():
    blob = coded_blob()
    words = np.frombuffer(blob, dtype="<u4", count=2, offset=fmt.HEADER_SIZE)
    for table in ([int(words[0]) + 1, int(words[1]) - 1], [0, int(words.sum())], [1, int(words.sum()) - 1]):
        bad = bytearray(blob)
        bad[fmt.HEADER_SIZE : fmt.HEADER_SIZE + 8] = np.array(table, dtype="<u4").tobytes()
        bad = with_fields(bytes(bad))
        page, err = decode_one(bad)
        assert page is None and isinstance(err, fmt.BlobError), table


def test_wrong_predictor_or_fingerprint():
    blob = coded_blob()

    class Calibrated(PageStatsPredictor):
        fingerprint = 0x1234

    class Other(PageStatsPredictor):
        id = 9

    for predictor in (Calibrated(), Other()):
        page, err = decode_one(blob, predictor)
        assert page is None and isinstance(err, fmt.WrongPredictor)
    _, err = decode_one(with_fields(blob, fingerprint=5))
    assert isinstance(err, fmt.WrongPredictor)


def test_pack_blob_refuses_inconsistent_parts():
    parsed = fmt.parse_blob(coded_blob())
    h, payload = parsed.header, bytes(parsed.payload)
    with pytest.raises(ValueError):
        fmt.pack_blob(h, parsed.lane_words[:1], parsed.side, payload)
    with pytest.raises(ValueError):
        fmt.pack_blob(h, parsed.lane_words, parsed.side[:-1], payload)
    with pytest.raises(ValueError):
        fmt.pack_blob(h, parsed.lane_words, parsed.side, payload[:-4])
    assert fmt.pack_blob(h, parsed.lane_words, parsed.side, payload) == coded_blob()


def test_a_tiny_stream_claiming_a_huge_page_is_refused():
    """98 bytes with a valid checksum whose header claims a 1 GiB page: refused by
    parse_blob (the stream cannot hold that many symbols), before any allocation."""
    shape = (2, 32, 8192, 8, 128)  # 2^29 bf16 scalars = MAX_PAGE_BYTES
    header = fmt.BlobHeader(
        dtype="bf16", layout="mha", shape=shape, predictor_id=PREDICTOR.id, fingerprint=0, raw_hash=0,
        w_wide=13, kappa=3, num_lanes=1, side_bytes=6, stream_words=2,
    )  # fmt: skip
    blob = fmt.pack_blob(header, np.array([2], np.uint32), bytes(6), bytes(8))
    assert len(blob) == 98 and header.page_bytes == fmt.MAX_PAGE_BYTES
    with pytest.raises(fmt.BadHeader, match="cannot hold"):
        fmt.parse_blob(blob)
    (page,), (err,) = codec.decode_pages([blob], PREDICTOR)
    assert page is None and isinstance(err, fmt.BadHeader)


def test_the_cheapest_real_pages_pass_the_stream_bound():
    """Constant pages (the cheapest to code) stay above the bound, in every dtype."""
    for dtype in ("bf16", "fp16", "fp8_e4m3", "fp8_e5m2"):
        meta = PageMeta(dtype, (2, 2, 64, 2, 64))
        page = torch.ones(meta.shape, dtype=em.TORCH_DTYPES[dtype])  # sigma floors at 2^-12 |mu|
        (blob,) = codec.encode_pages([page], [meta], PREDICTOR, num_lanes=1)
        header = fmt.parse_blob(blob).header
        assert not header.raw and 32 * header.stream_words >= 2 * fmt.min_stream_bits(meta.numel, dtype)
        (out,), (err,) = codec.decode_pages([blob], PREDICTOR, metas=[meta])
        assert err is None and torch.equal(out.view(torch.uint8), page.view(torch.uint8))
