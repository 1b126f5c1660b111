"""sglang/page_coder.py at start-up: the coder is compiled or loaded when the backend opens."""

import torch

from sglang_speckv import codec
from sglang_speckv.sglang.geometry import PageGeometry
from sglang_speckv.sglang.page_coder import PageCoder

GEOMETRY = PageGeometry("mha", "layer_first", "bf16", torch.bfloat16, 4, (2, 2, 4, 2, 8))


def test_open_warms_the_coder_up(caplog):
    coder = PageCoder("page_stats", [], 1 << 20)
    with caplog.at_level("INFO", logger="sglang_speckv.sglang.page_coder"):
        coder.open(GEOMETRY, torch.device("cpu"))
    assert any("coder ready on cpu" in r.getMessage() for r in caplog.records)


def test_a_failing_warm_up_is_logged_and_start_up_goes_on(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no kernels today")

    monkeypatch.setattr(codec, "encode_pages", broken)
    coder = PageCoder("page_stats", [], 1 << 20)
    with caplog.at_level("WARNING", logger="sglang_speckv.sglang.page_coder"):
        coder.open(GEOMETRY, torch.device("cpu"))
    assert any("warm-up on cpu failed (RuntimeError: no kernels today)" in r.getMessage() for r in caplog.records)
