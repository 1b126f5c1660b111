"""sglang/page_coder.py at start-up: the coder is compiled or loaded when the backend opens."""

import dataclasses

import pytest
import torch

from sglang_speckv import codec
from sglang_speckv.kernels import entropy_model as em
from sglang_speckv.kernels.format import parse_blob
from sglang_speckv.sglang.geometry import PageGeometry
from sglang_speckv.sglang.page_coder import PageCoder

GEOMETRY = PageGeometry("mha", "layer_first", "bf16", torch.bfloat16, 4, (2, 2, 4, 2, 8))


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp8_e4m3"])
def test_open_warms_the_coder_up(dtype, monkeypatch, caplog):
    """The warm-up page is coded by the model real pages of the dtype use (not stored raw,
    as a page of zeros is in bf16), so that its kernels are the ones compiled at start-up."""
    blobs = []
    real = codec.decode_pages

    def spy(b, *args, **kwargs):
        blobs.extend(b)
        return real(b, *args, **kwargs)

    monkeypatch.setattr(codec, "decode_pages", spy)
    geometry = dataclasses.replace(GEOMETRY, dtype=dtype, torch_dtype=torch.uint8 if "fp8" in dtype else em.TORCH_DTYPES[dtype])
    coder = PageCoder("page_stats", [], 1 << 20)
    with caplog.at_level("INFO", logger="sglang_speckv.sglang.page_coder"):
        coder.open(geometry, torch.device("cpu"))
    assert any("coder ready on cpu" in r.getMessage() for r in caplog.records)
    (header,) = [parse_blob(b).header for b in blobs]
    assert not header.raw and header.model == codec.model_for(dtype)


def test_a_failing_warm_up_is_logged_and_start_up_goes_on(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no kernels today")

    monkeypatch.setattr(codec, "encode_pages", broken)
    coder = PageCoder("page_stats", [], 1 << 20)
    with caplog.at_level("WARNING", logger="sglang_speckv.sglang.page_coder"):
        coder.open(GEOMETRY, torch.device("cpu"))
    assert any("warm-up with predictor page_stats on cpu failed (RuntimeError: no kernels today)" in r.getMessage()
               for r in caplog.records)


def test_open_warms_up_every_predictor_that_codes_without_tokens(tmp_path, monkeypatch, caplog):
    """A calibrated predictor's first restore must not pay for its mixture's tables or its
    parameters on the device: open() codes and decodes a page drawn from each configured
    predictor (a random Gaussian page could be stored raw under a calibrated predictor's
    narrow sigmas), after page_stats."""
    from sglang_speckv.tools import calibrate as cal

    shape = GEOMETRY.shape
    g = torch.Generator().manual_seed(3)
    mu = torch.randn(shape[0], shape[1], 1, *shape[3:], generator=g) * 3
    seqs = [(mu + 0.01 * torch.randn(shape[0], shape[1], 16, *shape[3:], generator=g)).to(torch.bfloat16) for _ in range(2)]
    layout = {"layers": shape[1], "kv_heads": shape[3], "head_dim": shape[4], "max_positions": 4096, "rotary_dim": shape[4],
              "rope_inv_freq": [[1.0] * (shape[4] // 2)], "layer_rope": [0] * shape[1]}
    path = tmp_path / "calib.safetensors"
    cal.calibrate(seqs, model="m", layout=layout, kv_dtype="bf16", names=("static",), progress=False).save(path)
    warmed = []
    real = codec.decode_pages

    def spy(b, predictor, *args, **kwargs):
        warmed.append((predictor.name, parse_blob(b[0]).header))
        return real(b, predictor, *args, **kwargs)

    monkeypatch.setattr(codec, "decode_pages", spy)
    coder = PageCoder(f"{path}:static", [], 1 << 20)
    with caplog.at_level("INFO", logger="sglang_speckv.sglang.page_coder"):
        coder.open(GEOMETRY, torch.device("cpu"))
    assert [name for name, _ in warmed] == ["page_stats", coder.default.name]
    assert all(not h.raw and h.model == codec.model_for("bf16") for _, h in warmed)
    assert any("warmed up: page_stats, " + coder.default.name in r.getMessage() for r in caplog.records)
