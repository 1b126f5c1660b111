"""``speckv compress`` / ``speckv decompress``: code a KV dump file losslessly, and back.

    speckv compress kv.safetensors --out kv.speckv [--calib calib.safetensors] [--lanes N]
    speckv decompress kv.speckv --out kv2.safetensors [--calib calib.safetensors]

A KV dump (``speckv dump-kv``) is a safetensors file with tensors ``k`` and ``v`` of shape
[layers, kv_heads, tokens, head_dim] in bf16, fp16, float8_e4m3fn or float8_e5m2 (or uint8
with metadata ``kv_dtype`` = ``fp8_e4m3`` | ``fp8_e5m2``), optional metadata ``position``
and optional ``token_ids`` [tokens], plus anything else (fp8 scales, ...).

The compressed file is itself a safetensors file: the KV as one speckv blob (docs/FORMAT.md;
one page of canonical shape [2, layers, tokens, kv_heads, head_dim]) in the uint8 tensor
``speckv.blob``, every other tensor and all metadata of the dump verbatim, and the dtype the
dump stored K and V in. ``decompress`` restores ``k`` and ``v`` bit for bit with that dtype.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from sglang_speckv import codec
from sglang_speckv.kernels import entropy_model as em
from sglang_speckv.kernels import format as fmt
from sglang_speckv.predictors.base import PageMeta, Predictor

BLOB_TENSOR = "speckv.blob"
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
    from safetensors.torch import save_file

    save_file({k: t.contiguous() for k, t in tensors.items()}, path, metadata=metadata or None)


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


def _page_meta(page_shape, dtype: str, position: int, tensors: dict[str, torch.Tensor]) -> PageMeta:
    ids = tensors.get("token_ids")
    token_ids = tuple(int(i) for i in ids.tolist()) if ids is not None else None
    return PageMeta(dtype, tuple(page_shape), position, token_ids)


def compress(src: str, dst: str, calib: str | None = None, lanes: int | None = None) -> str:
    """Compress a dump file; returns the one-line summary."""
    tensors, metadata = _load(src)
    if "k" not in tensors or "v" not in tensors:
        raise CodecCliError(f"{src}: expected tensors 'k' and 'v', found {sorted(tensors)}")
    k, v = tensors.pop("k"), tensors.pop("v")
    if k.shape != v.shape or k.dtype != v.dtype or k.dim() != 4:
        raise CodecCliError(
            f"{src}: k and v must both be [layers, kv_heads, tokens, head_dim] of one dtype; "
            f"got {tuple(k.shape)} {k.dtype} and {tuple(v.shape)} {v.dtype}"
        )
    dtype = _kv_dtype(k, metadata)
    try:
        position = int(metadata.get("position", 0))
    except ValueError:
        raise CodecCliError(f"{src}: metadata position must be an integer") from None
    page = torch.stack([k, v]).permute(0, 1, 3, 2, 4).contiguous()  # [2, L, T, H, D]
    meta = _page_meta(page.shape, dtype, position, tensors)
    if meta.numel * em.symbol_bits(dtype) // 8 > fmt.MAX_PAGE_BYTES:
        raise CodecCliError(f"{src}: the KV is larger than one blob's {fmt.MAX_PAGE_BYTES} bytes; dump fewer tokens")
    predictor = predictor_for(calib)
    start = time.perf_counter()
    (blob,) = codec.encode_pages(
        [page], [meta], predictor, num_lanes=lanes, w_wide=predictor.w_wide, kappa=predictor.kappa
    )
    seconds = time.perf_counter() - start
    tensors[BLOB_TENSOR] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    metadata[STORAGE_KEY] = str(k.dtype).removeprefix("torch.")
    _save(dst, tensors, metadata)
    header = fmt.parse_blob(blob).header
    raw_bytes = header.page_bytes
    how = "stored raw (coding did not help)" if header.raw else f"{predictor.name}, {header.num_lanes} lanes"
    return (
        f"{src} -> {dst}: k, v {list(k.shape)} {dtype}: {8 * len(blob) / meta.numel:.3f} bits/scalar, "
        f"ratio {raw_bytes / len(blob):.3f}x, {raw_bytes / seconds / 1e6:.1f} MB/s ({how})"
    )


def decompress(src: str, dst: str, calib: str | None = None) -> str:
    """Decompress a file written by ``compress``; returns the one-line summary."""
    tensors, metadata = _load(src)
    if BLOB_TENSOR not in tensors or STORAGE_KEY not in metadata:
        raise CodecCliError(f"{src} was not written by speckv compress (no {BLOB_TENSOR!r} tensor)")
    blob = tensors.pop(BLOB_TENSOR).numpy().tobytes()
    storage = metadata.pop(STORAGE_KEY)
    try:
        header = fmt.parse_blob(blob).header
    except fmt.BlobError as err:
        raise CodecCliError(f"{src}: {err}") from None
    predictor = predictor_for(calib, header.predictor_id)
    meta = _page_meta(header.shape, header.dtype, header.position, tensors)
    start = time.perf_counter()
    (page,), (error,) = codec.decode_pages([blob], predictor, metas=[meta])
    seconds = time.perf_counter() - start
    if error is not None:
        raise CodecCliError(f"{src}: cannot decode: {error}")
    torch_dtype = getattr(torch, storage, None)
    if not isinstance(torch_dtype, torch.dtype) or torch_dtype.itemsize != page.element_size():
        raise CodecCliError(f"{src}: metadata {STORAGE_KEY}={storage!r} does not fit a {header.dtype} page")
    kv = page.permute(0, 1, 3, 2, 4).contiguous().view(torch_dtype)  # [2, L, H, T, D]
    tensors["k"], tensors["v"] = kv[0], kv[1]
    _save(dst, tensors, metadata)
    return (
        f"{src} -> {dst}: k, v {list(kv.shape[1:])} {header.dtype}: "
        f"{header.page_bytes / seconds / 1e6:.1f} MB/s, verified (xxh64)"
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

    def run(args) -> int:
        if args.lanes is not None and args.lanes < 1:
            parser.error("--lanes must be >= 1")
        return _run(lambda: compress(args.input, args.out, args.calib, args.lanes))

    return run


def decompress_command(parser: argparse.ArgumentParser):
    parser.add_argument("input", help="file written by speckv compress")
    parser.add_argument("--out", required=True, help="KV dump (safetensors) to write")
    parser.add_argument("--calib", help="the calibration the file was compressed with, if any")
    return lambda args: _run(lambda: decompress(args.input, args.out, args.calib))
