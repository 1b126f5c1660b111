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
    assert any("warm-up on cpu failed (RuntimeError: no kernels today)" in r.getMessage() for r in caplog.records)
