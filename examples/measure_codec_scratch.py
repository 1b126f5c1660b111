"""Peak RSS growth of codec.encode_pages / decode_pages over one batch of four 2 MiB bf16
pages (page_stats), in a fresh process: python examples/measure_codec_scratch.py encode|decode"""
import resource, sys, torch
from sglang_speckv import codec
from sglang_speckv.kernels import rans_cpu, entropy_model as em, rans_reference as ref
from sglang_speckv.predictors.base import PageMeta
from sglang_speckv.predictors.page_stats import PageStatsPredictor
rans_cpu.extension(); em.phi_table(); ref._quantile_table(13, 3); rans_cpu.value_of_bits("bf16")
torch.manual_seed(0)
P = 4
pages = [(torch.randn(2, 32, 16, 8, 128) * 0.5).to(torch.bfloat16) for _ in range(P)]  # 4 MiB each
metas = [PageMeta("bf16", tuple(p.shape)) for p in pages]
raw = sum(p.numel() * 2 for p in pages)
pred = PageStatsPredictor()
small = [pages[0][:, :, :1].contiguous()]
codec.decode_pages(codec.encode_pages(small, [PageMeta("bf16", tuple(small[0].shape))], pred), pred)  # warm paths
blobs = codec.encode_pages(pages, metas, pred) if sys.argv[1] == "decode" else None
out = [torch.empty_like(p) for p in pages]
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
# touch a buffer as large as anything above so that the peak is set before measuring
filler = torch.ones(raw // 4 * 3, dtype=torch.float32); del filler
r0 = rss()
if sys.argv[1] == "encode":
    codec.encode_pages(pages, metas, pred)
else:
    codec.decode_pages(blobs, pred, metas=metas, out=out)
print(f"{sys.argv[1]}: batch {raw / 1e6:.1f} MB raw, peak RSS growth {(rss() - r0) / 1e6:.1f} MB = {(rss() - r0) / raw:.2f}x"
      " (beyond a 3x-the-batch buffer touched before; add 3x if growth > 0)")
