"""``speckv compress`` / ``speckv decompress``: code a KV dump file losslessly, and back.

    speckv compress kv.safetensors --out kv.speckv [--calib calib.safetensors] [--lanes N] [--page-tokens T]
    speckv decompress kv.speckv --out kv2.safetensors [--calib calib.safetensors]

A KV dump (``speckv dump-kv``) is a safetensors file with tensors ``k`` and ``v`` of shape
[layers, kv_heads, tokens, head_dim] in bf16, fp16, float8_e4m3fn or float8_e5m2 (or uint8
with metadata ``kv_dtype`` = ``fp8_e4m3`` | ``fp8_e5m2``), optional metadata ``position``
and optional ``token_ids`` [tokens], plus anything else (fp8 scales, ...).

The compressed file is itself a safetensors file: the KV cut along the tokens into pages of
canonical shape [2, layers, tokens, kv_heads, head_dim] (``--page-tokens``; by default as
many tokens as fit DEFAULT_PAGE_BYTES), each page one speckv blob (docs/FORMAT.md) in the
uint8 tensor ``speckv.page.<i>`` with metadata ``speckv.pages`` = their number, every other
tensor and all metadata of the dump verbatim, and the dtype the dump stored K and V in.
Pages are coded and decoded one at a time. ``decompress`` restores ``k`` and ``v`` bit for
bit with that dtype; it also reads files of one ``speckv.blob`` (the whole KV as one page),
as written before pages. Both write the same bytes for the same input and options (the
coder is deterministic; the safetensors metadata is written sorted by key, see ``_save``).
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
import warnings
from pathlib import Path

import torch

from sglang_speckv import codec
from sglang_speckv.kernels import entropy_model as em
from sglang_speckv.kernels import format as fmt
from sglang_speckv.predictors.base import PageMeta, Predictor

PAGE_TENSOR = "speckv.page."  # + index: one blob per page of tokens, in token order
PAGES_KEY = "speckv.pages"  # metadata: the number of pages
BLOB_TENSOR = "speckv.blob"  # files written before pages: the whole KV as one blob (still read)
# The dump is coded in pages of at most this many raw bytes (all of its tokens' layers and
# heads), one page at a time, so memory stays a few pages above the dump and its output.
# Each page carries its own side info: for page_stats, 24 bits per channel, i.e. 24 / tokens
# bits per scalar (0.19 at the 128 tokens of a 16 MiB Llama-3-8B page).
DEFAULT_PAGE_BYTES = 16 << 20
STORAGE_KEY = "speckv.kv_tensor_dtype"  # metadata: the torch dtype k and v were stored in
FP8_BY_METADATA = {"fp8_e4m3": "fp8_e4m3", "fp8_e5m2": "fp8_e5m2"}


class CodecCliError(Exception):
    """A user-facing problem with the inputs; the message says what to do."""


def predictor_for(calib: str | None, predictor_id: int | None = None) -> Predictor:
    """The predictor to code with: page statistics without a calibration file, else
    ``PATH[:NAME]`` (predictors.predictor_from_spec; without NAME, the blob's predictor
    ``predictor_id`` or the default calibrated one)."""
    from sglang_speckv.predictors import PAGE_STATS, PredictorSpecError, predictor_from_spec

    try:
        return predictor_from_spec(calib or PAGE_STATS, predictor_id)
    except PredictorSpecError as err:
        raise CodecCliError(str(err)) from None


def _load(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    if not Path(path).is_file():
        raise CodecCliError(f"no such file: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}, dict(f.metadata() or {})
    except SafetensorError as err:
        raise CodecCliError(f"{path} is not a readable safetensors file: {err}") from None


def _save(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file, the same bytes for the same tensors and metadata: safetensors
    writes its metadata in hash-map order (a different order from one process to the next),
    so the header is rewritten in place with the metadata sorted by key."""
    from safetensors.torch import save_file

    save_file({k: t.contiguous() for k, t in tensors.items()}, path, metadata=metadata or None)
    with open(path, "r+b") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        if "__metadata__" not in header:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:  # never seen: safetensors writes the same compact JSON
            raise OSError(f"{path}: the sorted safetensors header ({len(text)} bytes) outgrew "
                          f"the written one ({size}); report this with the dump's metadata")
        f.seek(8)
        f.write(text + b" " * (size - len(text)))  # safetensors pads its header with spaces


def _kv_dtype(t: torch.Tensor, metadata: dict[str, str]) -> str:
    """The speckv dtype name of a dump's k/v tensor."""
    if t.dtype == torch.uint8:
        name = metadata.get("kv_dtype")
        if name not in FP8_BY_METADATA:
            raise CodecCliError(
                f"k and v are uint8: metadata kv_dtype must be fp8_e4m3 or fp8_e5m2, got {name!r}"
            )
        return FP8_BY_METADATA[name]
    if t.dtype not in em.DTYPE_NAMES:
        raise CodecCliError(f"k and v are {t.dtype}; expected one of bf16, fp16, float8_e4m3fn, float8_e5m2, uint8")
    return em.DTYPE_NAMES[t.dtype]


def _page_meta(page_shape, dtype: str, position: int, tensors: dict[str, torch.Tensor], t0: int, t1: int) -> PageMeta:
    """The meta of the page holding the dump's tokens [t0, t1)."""
    ids = tensors.get("token_ids")
    token_ids = tuple(int(i) for i in ids[t0:t1].tolist()) if ids is not None else None
    return PageMeta(dtype, tuple(page_shape), position, token_ids)


def _page_tokens(k: torch.Tensor, page_tokens: int | None) -> int:
    """Tokens per page: ``page_tokens``, or as many as fit DEFAULT_PAGE_BYTES (one at least)."""
    layers, heads, _, dim = k.shape
    token_bytes = 2 * layers * heads * dim * k.element_size()
    tokens = page_tokens or max(1, DEFAULT_PAGE_BYTES // token_bytes)
    if tokens * token_bytes > fmt.MAX_PAGE_BYTES:
        raise CodecCliError(f"a page of {tokens} tokens exceeds a blob's {fmt.MAX_PAGE_BYTES} bytes; use fewer --page-tokens")
    return tokens


def compress(
    src: str, dst: str, calib: str | None = None, lanes: int | None = None, page_tokens: int | None = None
) -> str:
    """Compress a dump file; returns the one-line summary."""
    tensors, metadata = _load(src)
    if "k" not in tensors or "v" not in tensors:
        raise CodecCliError(f"{src}: expected tensors 'k' and 'v', found {sorted(tensors)}")
    k, v = tensors.pop("k"), tensors.pop("v")
    if k.shape != v.shape or k.dtype != v.dtype or k.dim() != 4 or k.shape[2] < 1 or min(k.shape) < 1:
        raise CodecCliError(
            f"{src}: k and v must both be [layers, kv_heads, tokens, head_dim] of one dtype (no empty axis); "
            f"got {tuple(k.shape)} {k.dtype} and {tuple(v.shape)} {v.dtype}"
        )
    dtype = _kv_dtype(k, metadata)
    try:
        position = int(metadata.get("position", 0))
    except ValueError:
        raise CodecCliError(f"{src}: metadata position must be an integer") from None
    predictor = predictor_for(calib)
    tokens, step = k.shape[2], _page_tokens(k, page_tokens)
    start = time.perf_counter()
    blobs = []
    for t0 in range(0, tokens, step):  # one page at a time: memory stays a few pages
        t1 = min(tokens, t0 + step)
        page = torch.stack([k[:, :, t0:t1], v[:, :, t0:t1]]).permute(0, 1, 3, 2, 4).contiguous()  # [2, L, t, H, D]
        meta = _page_meta(page.shape, dtype, position + t0, tensors, t0, t1)
        blobs += codec.encode_pages([page], [meta], predictor, num_lanes=lanes, w_wide=predictor.w_wide, kappa=predictor.kappa)
        del page
    seconds = time.perf_counter() - start
    with warnings.catch_warnings():  # the blobs are read-only bytes; safetensors only reads them
        warnings.simplefilter("ignore", UserWarning)
        for i, blob in enumerate(blobs):
            tensors[f"{PAGE_TENSOR}{i}"] = torch.frombuffer(blob, dtype=torch.uint8)
    metadata[STORAGE_KEY] = str(k.dtype).removeprefix("torch.")
    metadata[PAGES_KEY] = str(len(blobs))
    _save(dst, tensors, metadata)
    headers = [fmt.parse_blob(blob).header for blob in blobs]
    raw_bytes, coded_bytes = sum(h.page_bytes for h in headers), sum(len(blob) for blob in blobs)
    kinds = {"stored raw" if h.raw else f"{h.num_lanes} lanes" for h in headers}
    return (
        f"{src} -> {dst}: k, v {list(k.shape)} {dtype} in {len(blobs)} pages of {step} tokens: "
        f"{8 * coded_bytes / (raw_bytes * 8 / em.symbol_bits(dtype)):.3f} bits/scalar, ratio {raw_bytes / coded_bytes:.3f}x, "
        f"{raw_bytes / seconds / 1e6:.1f} MB/s ({predictor.name}; {', '.join(sorted(kinds))})"
    )


def decompress(src: str, dst: str, calib: str | None = None) -> str:
    """Decompress a file written by ``compress``; returns the one-line summary."""
    tensors, metadata = _load(src)
    if PAGES_KEY in metadata:
        try:
            count = int(metadata.pop(PAGES_KEY))
            blobs = [tensors.pop(f"{PAGE_TENSOR}{i}") for i in range(count)]
        except (ValueError, KeyError):
            raise CodecCliError(f"{src}: metadata {PAGES_KEY} does not match its {PAGE_TENSOR}* tensors") from None
    elif BLOB_TENSOR in tensors:  # written before pages: the whole KV in one blob
        blobs = [tensors.pop(BLOB_TENSOR)]
    else:
        raise CodecCliError(f"{src} was not written by speckv compress (no {PAGE_TENSOR}* or {BLOB_TENSOR!r} tensors)")
    storage = metadata.pop(STORAGE_KEY, None)
    try:
        headers = [fmt.parse_blob(blob.numpy()).header for blob in blobs]
    except fmt.BlobError as err:
        raise CodecCliError(f"{src}: {err}") from None
    if not headers:
        raise CodecCliError(f"{src} holds no pages")
    first = headers[0]
    _, layers, _, heads, dim = first.shape
    tokens = sum(h.shape[2] for h in headers)
    t0 = 0
    for h in headers:  # pages follow each other along the tokens
        if (h.dtype, h.shape[:2], h.shape[3:], h.position) != (first.dtype, first.shape[:2], first.shape[3:], first.position + t0):
            raise CodecCliError(f"{src}: its pages are not consecutive slices of one dump")
        t0 += h.shape[2]
    torch_dtype = getattr(torch, storage or "", None)
    if not isinstance(torch_dtype, torch.dtype) or torch_dtype.itemsize != em.symbol_bits(first.dtype) // 8:
        raise CodecCliError(f"{src}: metadata {STORAGE_KEY}={storage!r} does not fit a {first.dtype} page")
    predictor = predictor_for(calib, first.predictor_id)
    kv = torch.empty((2, layers, heads, tokens, dim), dtype=em.TORCH_DTYPES[first.dtype])  # [2, L, H, T, D]
    start = time.perf_counter()
    t0 = 0
    for blob, h in zip(blobs, headers):
        t1 = t0 + h.shape[2]
        meta = _page_meta(h.shape, h.dtype, h.position, tensors, t0, t1)
        out = kv[:, :, :, t0:t1].permute(0, 1, 3, 2, 4)  # the page's slots, canonical shape
        (_,), (error,) = codec.decode_pages([blob.numpy()], predictor, metas=[meta], out=[out])
        if error is not None:
            raise CodecCliError(f"{src}: cannot decode page {t0 // max(1, first.shape[2])}: {error}")
        t0 = t1
    seconds = time.perf_counter() - start
    kv = kv.view(torch_dtype)
    tensors["k"], tensors["v"] = kv[0], kv[1]
    _save(dst, tensors, metadata)
    raw_bytes = sum(h.page_bytes for h in headers)
    return (
        f"{src} -> {dst}: k, v {list(kv.shape[1:])} {first.dtype} from {len(blobs)} pages: "
        f"{raw_bytes / seconds / 1e6:.1f} MB/s, verified (page hash)"
    )


def _run(action) -> int:
    try:
        print(action())
    except CodecCliError as err:
        print(f"speckv: {err}", file=sys.stderr)
        return 2
    return 0


def compress_command(parser: argparse.ArgumentParser):
    parser.add_argument("input", help="KV dump (safetensors with k, v)")
    parser.add_argument("--out", required=True, help="compressed file to write")
    parser.add_argument("--calib", help="calibration file, PATH[:PREDICTOR] (default: page-statistics predictor)")
    parser.add_argument(
        "--lanes",
        type=int,
        help=f"rANS lanes (default: one per {codec.SYMBOLS_PER_LANE} scalars, a power of two <= {codec.MAX_LANES})",
    )

    parser.add_argument(
        "--page-tokens", type=int,
        help=f"tokens per page (default: as many as fit {DEFAULT_PAGE_BYTES >> 20} MiB of raw KV)",
    )  # fmt: skip

    def run(args) -> int:
        if args.lanes is not None and args.lanes < 1:
            parser.error("--lanes must be >= 1")
        if args.page_tokens is not None and args.page_tokens < 1:
            parser.error("--page-tokens must be >= 1")
        return _run(lambda: compress(args.input, args.out, args.calib, args.lanes, args.page_tokens))

    return run


def decompress_command(parser: argparse.ArgumentParser):
    parser.add_argument("input", help="file written by speckv compress")
    parser.add_argument("--out", required=True, help="KV dump (safetensors) to write")
    parser.add_argument("--calib", help="the calibration the file was compressed with, if any")
    return lambda args: _run(lambda: decompress(args.input, args.out, args.calib))
