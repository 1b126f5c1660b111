"""Live calibration (predictors/live.py) without a server: real SmolLM2 KV pages fed as a
server writes them, a background fit, exact round trips with the fitted predictor, the saved
file reused on restart, a new one for another KV dtype, and failures that never raise."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sglang_speckv import codec
from sglang_speckv.predictors.base import PageMeta
from sglang_speckv.predictors.live import LiveCalibration, calibration_path, model_key
from sglang_speckv.tools import calibrate as cal
from sglang_speckv.tools import dump_kv

TEXT = Path(__file__).parent / "data" / "text"
PAGE = 16
SAMPLE = 64  # tokens sampled before the fit (CI-sized; the default is 4096)
# The fit runs at nice 0 here: at nice 19 on a busy CI machine it may wait for minutes.
FAST = {"sample_tokens": SAMPLE, "nice": 0}


@pytest.fixture(scope="module")
def smollm2(model_dir):
    model, tok = dump_kv.load_model(model_dir)
    layout = dump_kv.kv_layout(model)
    key = model_key(layout, (Path(model_dir) / "config.json").read_bytes())
    ids = dump_kv.tokenize(tok, dump_kv.read_texts([TEXT / "calibration.txt"]), 80)
    held = dump_kv.tokenize(tok, dump_kv.read_texts([TEXT / "heldout.txt"]), 32)
    pages = [cal.to_pages(*(x.to(torch.bfloat16) for x in dump_kv.compute_kv(model, i, progress=False))) for i in (ids, held)]
    return {"layout": layout, "key": key, "written": pages[0], "held": pages[1], "config": model.config}


def feed_all(live, written):
    for s in range(0, written.shape[2] - PAGE + 1, PAGE):
        live.feed(written[:, :, s : s + PAGE], s)


def test_layout_from_config_matches_the_model(smollm2):
    assert dump_kv.layout_from_config(smollm2["config"]) == smollm2["layout"]


def test_fit_switch_restart_and_new_dtype(smollm2, tmp_path):
    live = LiveCalibration(tmp_path, layout=smollm2["layout"], model_key=smollm2["key"], kv_dtype="bf16", **FAST)
    assert live.predictor() is None and live.status()["state"] == "sampling"
    live.feed(torch.zeros(2, 29, PAGE, 3, 64, dtype=torch.bfloat16), 0)  # another layout: ignored
    live.feed(smollm2["written"][:, :, :PAGE].to(torch.float16), 0)  # another dtype: ignored
    feed_all(live, smollm2["written"])
    assert live.wait(timeout=600)
    st = live.status()
    assert st["state"] == "ready", st
    assert st["predictor"] == "context" and st["pages_ignored"] == 2 and st["tokens_sampled"] >= SAMPLE
    pred = live.predictor()
    assert calibration_path(tmp_path, smollm2["key"], "bf16").is_file()
    # pages written after the switch: coded with the live predictor, decoded exactly
    held = smollm2["held"]
    pages = [held[:, :, s : s + PAGE].contiguous() for s in (0, PAGE)]
    metas = [PageMeta("bf16", tuple(p.shape), s) for p, s in zip(pages, (1000, 1016))]
    blobs = codec.encode_pages(pages, metas, pred, w_wide=pred.w_wide, kappa=pred.kappa)
    out, errors = codec.decode_pages(blobs, pred, metas=metas)
    assert errors == [None, None]
    assert all(torch.equal(p.view(torch.int16), o.view(torch.int16)) for p, o in zip(pages, out))
    assert sum(map(len, blobs)) * 8 / sum(p.numel() for p in pages) < 16
    # a restart reuses the saved calibration at once (same fingerprint, nothing to sample)
    again = LiveCalibration(tmp_path, layout=smollm2["layout"], model_key=smollm2["key"], kv_dtype="bf16", **FAST)
    assert again.status()["state"] == "ready" and again.predictor().fingerprint == pred.fingerprint
    # another KV dtype (or model key) starts a calibration of its own
    fp8 = LiveCalibration(tmp_path, layout=smollm2["layout"], model_key=smollm2["key"], kv_dtype="fp8_e4m3", **FAST)
    other = LiveCalibration(tmp_path, layout=smollm2["layout"], model_key="0" * 16, kv_dtype="bf16", **FAST)
    assert fp8.predictor() is None and other.predictor() is None and fp8.path != live.path != other.path


def test_failures_never_raise(smollm2, tmp_path):
    # a corrupt saved file is not used (refitted later), and says why
    path = calibration_path(tmp_path, smollm2["key"], "bf16")
    path.write_bytes(b"not a calibration")
    live = LiveCalibration(tmp_path, layout=smollm2["layout"], model_key=smollm2["key"], kv_dtype="bf16", **FAST)
    assert live.predictor() is None and "not a readable" in live.status()["error"]
    # a sample of garbage (NaN) pages: the fit fails in its thread, feed/predictor never raise
    nan = torch.full((2, 30, PAGE, 3, 64), float("nan"), dtype=torch.bfloat16)
    for i in range(SAMPLE // PAGE):
        live.feed(nan, i * PAGE)
    assert live.wait(timeout=60)
    st = live.status()
    assert st["state"] == "failed" and "finite pages" in st["error"] and live.predictor() is None
    live.feed(nan, 0)  # after a failure: ignored
