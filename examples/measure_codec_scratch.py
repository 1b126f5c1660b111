"""Peak memory of codec.encode_pages / decode_pages above what they are given, for one batch
of bf16 or fp8 pages (page_stats, a calibrated predictor, or the model predictor), on the CPU:

    python examples/measure_codec_scratch.py encode|decode [--pages 4] [--tokens 16] [--predictor page_stats]
        [--dtype bf16|fp8_e4m3] [--out-layout contiguous|layer_first|page_first]

Method (Linux): free memory is handed back to the OS (malloc_trim), the kernel's peak RSS
counter is reset (``echo 5 > /proc/self/clear_refs``), the call runs, and the peak is the
peak RSS (VmHWM) minus the RSS before the call. The pages, blobs and output pages given to
the call exist before it and are not counted; the scratch is the peak less what the call
returns (encode's blobs, which the peak includes). ``--out-layout``: decode into the pages
of a host buffer laid out as SGLang's (sglang/geometry.py views: not contiguous), with
room for twice the batch's pages, as the server's read path does; default: contiguous
pages of their own. ``--predictor model``: SmolLM2-135M (the checkpoint tests use; pages
of its shape, bf16 only), its chunk cache already holding the pages' chunks (as after the
prefill a write runs first: the predictor's own bounded state, not the codec's scratch).
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


# static: one stage, per-channel rows (like page_stats); static_rope: one stage, per-scalar
# rows (keys rotated to each token's position); prev_layer, context: a stage per (kv, layer)
# block and per-scalar (mu, sigma), computed from the blocks decoded before it
CALIBRATED = ("static", "static_rope", "prev_layer", "context")
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp8_e4m3": torch.float8_e4m3fn}


def calibrated(name: str, shape: tuple[int, ...], dtype: str):
    """A calibrated predictor for pages of ``shape``, fitted on two random pages of a
    made-up Llama-like layout: its memory use is a real one, its compression is not."""
    from sglang_speckv.predictors.linear import LinearGaussianPredictor
    from sglang_speckv.tools import calibrate as cal

    _, layers, tokens, heads, dim = shape
    inv_freq = [float(torch.tensor(500000.0 ** (-2 * i / dim), dtype=torch.float32)) for i in range(dim // 2)]
    layout = {"layers": layers, "kv_heads": heads, "head_dim": dim, "max_positions": 8192, "rotary_dim": dim,
              "rope_inv_freq": [inv_freq], "layer_rope": [0] * layers}  # fmt: skip
    seqs = [(torch.randn(2, layers, 64, heads, dim) * 0.5).to(TORCH_DTYPES[dtype]) for _ in range(2)]
    fitted = "static" if name == "context" else name
    calib = cal.calibrate(seqs, model="random", layout=layout, kv_dtype=dtype, names=(fitted,), progress=False)
    if name == "context":  # fitting its 5,120 inputs per block takes many minutes: static's
        # parameters with all-zero coefficients of context's shape (the same work and memory)
        from sglang_speckv.predictors.calibration import Block
        from sglang_speckv.predictors.linear import SPECS

        calib.blocks[name] = {
            (kv, layer): Block(torch.zeros(heads * dim, len(SPECS[name].sources(kv, layer, layers)) * heads * dim,
                                           dtype=torch.int16) if SPECS[name].sources(kv, layer, layers) else None,
                               b.bias, b.shift, b.sigma, b.sigma_scale)
            for (kv, layer), b in calib.blocks["static"].items()
        }  # fmt: skip
        calib.mixture[name] = calib.mixture["static"]
    return LinearGaussianPredictor(calib, name)


def model_pages(count: int, tokens: int):
    """The model predictor (SmolLM2-135M), and ``count`` consecutive bf16 pages of a random
    token sequence with their metas: the model's own KV plus noise (memory, not compression),
    its chunks computed and cached before the measured call."""
    from sglang_speckv.predictors.model import ModelPredictor
    from sglang_speckv.tools.prepare_model import prepare_model

    pred = ModelPredictor(f"model:{prepare_model()}?cache={count + 1}")
    ids = torch.randint(0, pred.model.config.vocab_size, (count * tokens,)).tolist()
    shape = (2, pred._layers, tokens, pred._heads, pred._dim)
    metas = [PageMeta("bf16", shape, i * tokens, tuple(ids[i * tokens:(i + 1) * tokens]), tuple(ids[:i * tokens]))
             for i in range(count)]  # fmt: skip
    pages = [(pred.kv(m) + 0.05 * torch.randn(shape)).to(torch.bfloat16).contiguous() for m in metas]
    return pred, pages, metas


def out_pages(layout: str, shape: tuple[int, ...], count: int, dtype: str) -> list[torch.Tensor]:
    """count zeroed pages of ``shape`` and ``dtype``: their own, or every other page of a host
    buffer of SGLang's ``layout`` (MHA: layer_first [2, L, size, H, D], page_first
    [2, size, L, H, D]; uint8 for fp8, as SGLang holds it)."""
    if layout == "contiguous":
        return [torch.zeros(shape, dtype=TORCH_DTYPES[dtype]) for _ in range(count)]
    kv, layers, tokens, heads, dim = shape
    size = 2 * count * tokens  # token slots
    own = (kv, layers, size, heads, dim) if layout == "layer_first" else (kv, size, layers, heads, dim)
    held = torch.bfloat16 if dtype == "bf16" else torch.uint8
    buffer = torch.zeros(own, dtype=held)
    geometry = PageGeometry("mha", layout, dtype, held, tokens, shape)
    return [geometry.page(buffer, 2 * i * tokens) for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("encode", "decode"))
    parser.add_argument("--pages", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--predictor", default="page_stats", choices=("page_stats", *CALIBRATED, "model"),
                        help="page_stats, a predictor calibrated on two random pages (memory, not compression), "
                             "or the model predictor (SmolLM2-135M)")
    parser.add_argument("--dtype", default="bf16", choices=tuple(TORCH_DTYPES), help="the pages' storage dtype")
    parser.add_argument("--out-layout", default="contiguous", choices=("contiguous", "layer_first", "page_first"),
                        help="decode into contiguous pages, or into views of a host buffer of this SGLang layout")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the thread pool's per-thread arenas would blur small figures
    torch.manual_seed(0)
    if args.predictor == "model" and args.dtype != "bf16":
        parser.error("the model predictor codes bf16 pages")
    if args.predictor == "model":
        pred, pages, metas = model_pages(args.pages, args.tokens)
        shape = metas[0].shape
    else:
        shape = (2, 32, args.tokens, 8, 128)  # [kv, layers, tokens, heads, dim]
        pages = [(torch.randn(shape) * 0.5).to(TORCH_DTYPES[args.dtype]) for _ in range(args.pages)]
        metas = [PageMeta(args.dtype, shape) for _ in pages]
        pred = PageStatsPredictor() if args.predictor == "page_stats" else calibrated(args.predictor, shape, args.dtype)
    codec.warm_up(args.dtype, shape, "cpu", PageStatsPredictor())  # the coder and its one-time tables, as a server's start-up
    raw = sum(p.numel() * p.element_size() for p in pages)
    # and the predictor's own one-time state (the model predictor: a page of its own)
    small = [pages[0][:, :, :1].contiguous()] if args.predictor != "model" else pages[:1]
    small_metas = [PageMeta(args.dtype, tuple(small[0].shape))] if args.predictor != "model" else metas[:1]
    codec.decode_pages(codec.encode_pages(small, small_metas, pred), pred, metas=small_metas)
    blobs = codec.encode_pages(pages, metas, pred) if args.what == "decode" else None
    out = out_pages(args.out_layout, shape, len(pages), args.dtype)  # touched: their memory is not scratch
    before = reset_peak()
    if args.what == "encode":
        returned = sum(len(b) for b in codec.encode_pages(pages, metas, pred))  # the blobs: the call's output
    else:
        codec.decode_pages(blobs, pred, metas=metas, out=out)
        returned = 0  # the pages were given (out)
    peak = status("VmHWM") - before
    scratch = peak - returned
    into = "" if args.what == "encode" else f" into {args.out_layout} pages"
    print(f"{args.what}{into}: batch of {len(pages)} pages, {raw / 1e6:.1f} MB raw {args.dtype}, {args.predictor}: "
          f"peak {peak / 1e6:.1f} MB = {peak / raw:.2f}x the batch, of which {returned / 1e6:.1f} MB the returned "
          f"blobs; scratch {scratch / 1e6:.1f} MB = {scratch / raw:.2f}x the batch")


if __name__ == "__main__":
    main()
