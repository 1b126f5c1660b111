"""Device placement of every predictor, checked without a GPU.

A predictor must compute on the device of the values it is given. A CPU tensor that meets
a CUDA one (e.g. a 0-dim CPU bound passed to ``clamp``) crashes on a GPU only, so CPU tests
never see it. Here every predictor runs with its page on PyTorch's ``meta`` device under a
TorchFunctionMode that raises as soon as one torch call receives tensors on two devices
(0-dim CPU tensors included, which CPU kernels would silently accept).

The calibration is fitted to random KV of a tiny layout: this checks where tensors live,
not what the predictions are worth (tests/test_predictors.py does that on real KV).
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from sglang_speckv.predictors.base import PageMeta
from sglang_speckv.predictors.linear import SPECS, LinearGaussianPredictor
from sglang_speckv.predictors.page_stats import PageStatsPredictor
from sglang_speckv.tools import calibrate as cal

LAYOUT = {"layers": 3, "kv_heads": 2, "head_dim": 8, "max_positions": 512, "rotary_dim": 8,  # as dump_kv.kv_layout
          "rope_inv_freq": [[1.0, 0.1, 0.01, 0.001]], "layer_rope": [0, 0, 0]}
SHAPE = (2, LAYOUT["layers"], 4, LAYOUT["kv_heads"], LAYOUT["head_dim"])  # [2, L, T, H, D]


class MixedDevices(AssertionError):
    """One torch call received tensors on two devices."""


class OneDevicePerCall(TorchFunctionMode):
    """Raise MixedDevices when a torch function gets tensors on more than one device."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves, _ = tree_flatten((args, kwargs))
        devices = {t.device for t in leaves if isinstance(t, torch.Tensor)}
        if len(devices) > 1:
            raise MixedDevices(f"{getattr(func, '__name__', func)} got tensors on {sorted(map(str, devices))}")
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def calib():
    torch.manual_seed(0)
    seqs = [(torch.randn(SHAPE[:2] + (24,) + SHAPE[3:]) * 2).to(torch.bfloat16) for _ in range(2)]
    return cal.calibrate(seqs, model="random", layout=LAYOUT, kv_dtype="bf16", progress=False)


def _predictors(calib):
    return [PageStatsPredictor()] + [LinearGaussianPredictor(calib, name) for name in SPECS]


def test_detector_catches_a_cpu_scalar_on_another_device():
    x = torch.zeros(3, device="meta")
    with pytest.raises(MixedDevices), OneDevicePerCall():
        x.clamp(-torch.tensor(1.0), torch.tensor(1.0))  # what linear.py once did


@pytest.mark.parametrize("index", range(1 + len(SPECS)), ids=["page_stats", *SPECS])
def test_predictions_stay_on_the_page_device(calib, index):
    pred = _predictors(calib)[index]
    meta = PageMeta("bf16", SHAPE, position=100)
    page = torch.randn(SHAPE).to(torch.bfloat16).to(torch.float32)
    # side info is bytes: page_stats computes it on the host by design (one copy of the page)
    side = pred.side_info(page, meta)
    values = torch.full(SHAPE, float("nan"), device="meta")
    stages = pred.stages(meta)
    with OneDevicePerCall():
        if type(pred).side_info is not PageStatsPredictor.side_info:
            assert pred.side_info(values, meta) == side
        for s, (a, b) in enumerate(zip(stages, stages[1:])):
            mu, sigma = pred.predict(meta, side, values, s)
            assert mu.device.type == sigma.device.type == "meta"
            assert mu.dtype == sigma.dtype == torch.float32 and mu.shape == sigma.shape == (b - a,)
