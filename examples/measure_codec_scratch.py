"""Peak memory of codec.encode_pages / decode_pages above what they are given, for one batch
of bf16 pages (page_stats, or a calibrated predictor), on the CPU:

    python examples/measure_codec_scratch.py encode|decode [--pages 4] [--tokens 16] [--predictor page_stats]
        [--out-layout contiguous|layer_first|page_first]

Method (Linux): free memory is handed back to the OS (malloc_trim), the kernel's peak RSS
counter is reset (``echo 5 > /proc/self/clear_refs``), the call runs, and the peak is the
peak RSS (VmHWM) minus the RSS before the call. The pages, blobs and output pages given to
the call exist before it and are not counted; the scratch is the peak less what the call
returns (encode's blobs, which the peak includes). ``--out-layout``: decode into the pages
of a host buffer laid out as SGLang's (sglang/geometry.py views: not contiguous), with
room for twice the batch's pages, as the server's read path does; default: contiguous
pages of their own.
"""
import argparse
import ctypes
import re
from pathlib import Path

import torch

from sglang_speckv import codec
from sglang_speckv.predictors.base import PageMeta
from sglang_speckv.predictors.page_stats import PageStatsPredictor
from sglang_speckv.sglang.geometry import PageGeometry


def status(field: str) -> int:
    """A VmRSS / VmHWM field of /proc/self/status, in bytes."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1)) * 1024


def reset_peak() -> int:
    """Return freed memory to the OS, reset the peak RSS to the current RSS, return it."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return status("VmRSS")


# static: one stage, per-channel rows (like page_stats); prev_layer: a stage per (kv, layer)
# block and per-scalar (mu, sigma), computed from the blocks decoded before it
CALIBRATED = ("static", "prev_layer")


def calibrated(name: str, shape: tuple[int, ...]):
    """A calibrated predictor for pages of ``shape``, fitted on two random pages of a
    made-up Llama-like layout: its memory use is a real one, its compression is not."""
    from sglang_speckv.predictors.linear import LinearGaussianPredictor
    from sglang_speckv.tools import calibrate as cal

    _, layers, tokens, heads, dim = shape
    inv_freq = [float(torch.tensor(500000.0 ** (-2 * i / dim), dtype=torch.float32)) for i in range(dim // 2)]
    layout = {"layers": layers, "kv_heads": heads, "head_dim": dim, "max_positions": 8192, "rotary_dim": dim,
              "rope_inv_freq": [inv_freq], "layer_rope": [0] * layers}  # fmt: skip
    seqs = [(torch.randn(2, layers, 64, heads, dim) * 0.5).to(torch.bfloat16) for _ in range(2)]
    calib = cal.calibrate(seqs, model="random", layout=layout, kv_dtype="bf16", names=(name,), progress=False)
    return LinearGaussianPredictor(calib, name)


def out_pages(layout: str, shape: tuple[int, ...], count: int) -> list[torch.Tensor]:
    """count zeroed bf16 pages of ``shape``: their own, or every other page of a host buffer
    of SGLang's ``layout`` (MHA: layer_first [2, L, size, H, D], page_first [2, size, L, H, D])."""
    if layout == "contiguous":
        return [torch.zeros(shape, dtype=torch.bfloat16) for _ in range(count)]
    kv, layers, tokens, heads, dim = shape
    size = 2 * count * tokens  # token slots
    own = (kv, layers, size, heads, dim) if layout == "layer_first" else (kv, size, layers, heads, dim)
    buffer = torch.zeros(own, dtype=torch.bfloat16)
    geometry = PageGeometry("mha", layout, "bf16", torch.bfloat16, tokens, shape)
    return [geometry.page(buffer, 2 * i * tokens) for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("encode", "decode"))
    parser.add_argument("--pages", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--predictor", default="page_stats", choices=("page_stats", *CALIBRATED),
                        help="page_stats, or a predictor calibrated on two random pages (memory, not compression)")
    parser.add_argument("--out-layout", default="contiguous", choices=("contiguous", "layer_first", "page_first"),
                        help="decode into contiguous pages, or into views of a host buffer of this SGLang layout")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the thread pool's per-thread arenas would blur small figures
    torch.manual_seed(0)
    shape = (2, 32, args.tokens, 8, 128)  # [kv, layers, tokens, heads, dim]
    codec.warm_up("bf16", shape, "cpu", PageStatsPredictor())  # the coder and its one-time tables, as a server's start-up
    pages = [(torch.randn(shape) * 0.5).to(torch.bfloat16) for _ in range(args.pages)]
    metas = [PageMeta("bf16", shape) for _ in pages]
    raw = sum(p.numel() * p.element_size() for p in pages)
    pred = PageStatsPredictor() if args.predictor == "page_stats" else calibrated(args.predictor, shape)
    small = [pages[0][:, :, :1].contiguous()]  # and the predictor's own one-time state
    codec.decode_pages(codec.encode_pages(small, [PageMeta("bf16", tuple(small[0].shape))], pred), pred)
    blobs = codec.encode_pages(pages, metas, pred) if args.what == "decode" else None
    out = out_pages(args.out_layout, shape, len(pages))  # touched: their memory is not scratch
    before = reset_peak()
    if args.what == "encode":
        returned = sum(len(b) for b in codec.encode_pages(pages, metas, pred))  # the blobs: the call's output
    else:
        codec.decode_pages(blobs, pred, metas=metas, out=out)
        returned = 0  # the pages were given (out)
    peak = status("VmHWM") - before
    scratch = peak - returned
    into = "" if args.what == "encode" else f" into {args.out_layout} pages"
    print(f"{args.what}{into}: batch of {len(pages)} pages, {raw / 1e6:.1f} MB raw bf16, {args.predictor}: "
          f"peak {peak / 1e6:.1f} MB = {peak / raw:.2f}x the batch, of which {returned / 1e6:.1f} MB the returned "
          f"blobs; scratch {scratch / 1e6:.1f} MB = {scratch / raw:.2f}x the batch")


if __name__ == "__main__":
    main()
