"""Peak scratch of the codec's Triton encode path (codec.encode_pages on the Triton coder)
for one batch, by accounting, without a GPU: the kernels run in Triton's interpreter on CPU
tensors, and every tensor the call allocates is counted.

    TRITON_INTERPRET=1 python examples/measure_triton_encode_scratch.py [--dtype bf16|fp8_e4m3]
        [--pages 1] [--layers 4] [--tokens 16] [--lanes 128] [--predictor page_stats|static|prev_layer]
        [--gc-after-launch]

Method: torch's profiler (``profile_memory``) records each allocation and free of torch's
CPU allocator ([memory] events, with their sizes) in order; the peak of their running sum
during encode_pages is the most the call held at once beyond what existed before (pages,
predictor, the coder's one-time tables: a small batch is encoded first, as a server's
warm-up does). On a GPU these tensors are the device's (the interpreter hands CPU tensors
to the kernels as they are, so it adds none; its numpy temporaries are not counted, as they
have no GPU counterpart); the host side of the call (numpy lane tables, packed blobs) is
not torch's and is not counted. "returned" is the coded words the blobs hold (the call's
output, on the device until copied out); scratch is the peak less that.

The interpreter runs the kernels at ~0.1-0.3 s per rANS step, so pages are [2, layers,
tokens, 8, 128] (Llama-3-8B's KV heads and head size, 16-token pages) with fewer layers
than its 32, and 128 lanes per page (the codec's default for the 32-layer page): 1024 steps
per lane where the codec's default gives 8192, and the same steps per chunk as the full
page (chunks are whole (kv, layer) blocks), so per-lane arrays (4-12 B per lane per chunk)
weigh what they would there. For the interpreter's speed only (no allocation changes):
the kernels' BLOCK_LANES is raised to cover the batch's lanes in one program, and the two
copy kernels (_compact_kernel, _gather_kernel: a program per lane, allocating nothing) are
run as numpy copies into the tensors they write. ``--gc-after-launch``: the interpreter
keeps a launch's arguments alive until the garbage collector runs (reference cycles in its
argument handling), so a chunk's tensors would still be counted while the next chunk
allocates its own; a compiled launch on a GPU holds no such references. This collects
after each encode launch.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from sglang_speckv import codec
from sglang_speckv.kernels import entropy_model as em
from sglang_speckv.kernels import rans_triton as rt
from sglang_speckv.predictors.base import PageMeta
from sglang_speckv.predictors.page_stats import PageStatsPredictor

sys.path.insert(0, str(Path(__file__).parent))
from measure_codec_scratch import CALIBRATED  # noqa: E402


def peak_bytes(fn) -> tuple[int, object]:
    """(the peak of torch's CPU allocations live during fn() above those live before it, fn())."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()  # + allocated, - freed (frees of tensors from before count below 0)
        peak = max(peak, live)
    return peak, out


class _Launch:
    """kernel[grid](...) -> fn(...)."""

    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        return self.fn


def _copy_streams(src, begin, counts, dest, words):
    """words[dest[g] + i] = src[begin[g] + i] for i < counts[g], every lane g (numpy)."""
    c = counts.numpy().astype(np.int64)
    within = np.arange(c.sum()) - np.repeat(np.cumsum(c) - c, c)
    words.numpy()[np.repeat(dest.numpy(), c) + within] = src.numpy()[np.repeat(begin, c) + within]


def numpy_copies() -> None:
    """The stream copies of rans_triton (either version of _compact_kernel) as numpy."""
    if "region" in rt._compact_kernel.arg_names:  # (scratch, counts, dest, words, region)
        def compact(scratch, counts, dest, words, region, BLOCK):
            c = counts.numpy().astype(np.int64)
            _copy_streams(scratch, (np.arange(len(c)) + 1) * region - c, counts, dest, words)
    else:  # (scratch, begin, counts, dest, words): main at af2262f
        def compact(scratch, begin, counts, dest, words, BLOCK):
            _copy_streams(scratch, begin.numpy(), counts, dest, words)
    rt._compact_kernel = _Launch(compact)
    if hasattr(rt, "_gather_kernel"):
        rt._gather_kernel = _Launch(lambda src, begin, counts, dest, words, BLOCK: _copy_streams(
            src, begin.numpy(), counts, dest, words))


def gc_after_launch() -> None:
    """gc.collect() after each launch of the encode kernels (see the module docstring)."""
    for name in ("_encode_values_kernel", "_encode_table_kernel"):
        setattr(rt, name, _GridLaunch(getattr(rt, name)))


class _GridLaunch:
    """kernel[grid](...), then gc.collect()."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        import gc

        def run(*args, **kwargs):
            self.kernel[grid](*args, **kwargs)
            gc.collect()

        return run


def calibrated(name: str, shape: tuple[int, ...], dtype: str):
    """measure_codec_scratch.calibrated for pages of ``dtype``: fitted on two random
    sequences (its memory use is a real one, its compression is not)."""
    from sglang_speckv.predictors.linear import LinearGaussianPredictor
    from sglang_speckv.tools import calibrate as cal

    _, layers, tokens, heads, dim = shape
    inv_freq = [float(torch.tensor(500000.0 ** (-2 * i / dim), dtype=torch.float32)) for i in range(dim // 2)]
    layout = {"layers": layers, "kv_heads": heads, "head_dim": dim, "max_positions": 8192, "rotary_dim": dim,
              "rope_inv_freq": [inv_freq], "layer_rope": [0] * layers}  # fmt: skip
    scale = 16.0 if dtype.startswith("fp8") else 0.5
    seqs = [(torch.randn(2, layers, 64, heads, dim) * scale).to(em.TORCH_DTYPES[dtype]) for _ in range(2)]
    calib = cal.calibrate(seqs, model="random", layout=layout, kv_dtype=dtype, names=(name,), progress=False)
    return LinearGaussianPredictor(calib, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp8_e4m3"))
    parser.add_argument("--pages", type=int, default=1)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--lanes", type=int, default=128, help="lanes per page (default %(default)s)")
    parser.add_argument("--predictor", default="page_stats", choices=("page_stats", *CALIBRATED))
    parser.add_argument("--gc-after-launch", action="store_true", help="see the module docstring")
    args = parser.parse_args()
    if not (rt.triton.knobs.runtime.interpret or torch.cuda.is_available()):
        raise SystemExit("set TRITON_INTERPRET=1 (no CUDA GPU here)")
    torch.manual_seed(0)
    shape = (2, args.layers, args.tokens, 8, 128)  # [kv, layers, tokens, heads, dim]
    torch_dtype = em.TORCH_DTYPES[args.dtype]
    scale = 16.0 if args.dtype.startswith("fp8") else 0.5
    # per-channel offsets and spreads, Gaussian: KV-like for page_stats
    offset = torch.randn(2, args.layers, 1, 8, 128) * scale
    spread = torch.rand(2, args.layers, 1, 8, 128) * scale + 0.05 * scale
    pages = [(offset + spread * torch.randn(shape)).to(torch_dtype) for _ in range(args.pages)]
    metas = [PageMeta(args.dtype, shape) for _ in pages]
    raw = sum(p.numel() * p.element_size() for p in pages)
    pred = PageStatsPredictor() if args.predictor == "page_stats" else calibrated(args.predictor, shape, args.dtype)
    expect = codec.encode_pages(pages, metas, pred, num_lanes=args.lanes)  # the C++ coder's blobs
    codec._coder = lambda device: rt  # the Triton coder on CPU tensors (the interpreter)
    numpy_copies()
    if args.gc_after_launch:
        gc_after_launch()
    rt.BLOCK_LANES = max(rt.BLOCK_LANES, 1 << (args.pages * args.lanes - 1).bit_length())  # one program
    codec.encode_pages(pages[:1], metas[:1], pred, num_lanes=512)  # the coder's and predictor's one-time tables
    peak, blobs = peak_bytes(lambda: codec.encode_pages(pages, metas, pred, num_lanes=args.lanes))
    from sglang_speckv.kernels import format as fmt

    headers = [fmt.parse_blob(b).header for b in blobs]
    returned = 4 * sum(h.stream_words for h in headers)  # the coded words (int32) the blobs hold
    raws = sum(h.raw for h in headers)
    scratch = peak - returned
    gc_note = ", gc after launches" if args.gc_after_launch else ""
    print(f"encode{gc_note}: {len(pages)} x {args.dtype} {list(shape)}, {args.lanes} lanes, {args.predictor}: raw "
          f"{raw / 1e6:.3f} MB; peak {peak / 1e6:.3f} MB = {peak / raw:.2f}x; coded words {returned / 1e6:.3f} MB "
          f"= {returned / raw:.2f}x ({raws} pages raw); scratch {scratch / 1e6:.3f} MB = {scratch / raw:.2f}x; "
          f"blobs == the C++ coder's: {blobs == expect}")


if __name__ == "__main__":
    main()
