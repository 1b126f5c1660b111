"""Live calibration (``calibrate = "auto"``) in a real SGLang server (CPU engine,
SmolLM2-135M-Instruct, bf16 KV), started with no calibration file:

1. five prompts of calibration text are written with page_stats and sampled; the stats
   file then says the background fit is ready and that the context predictor codes new
   pages;
2. pages of held-out text written after the switch are coded with it at >= 1.7x their raw
   bf16 bytes, and after ``/flush_cache`` they restore from the store with greedy tokens and
   logprobs equal to an uncached run;
3. the pages coded with page_stats before the switch still restore (the store's namespace
   did not change with it). That a restart loads the saved calibration at once and reads
   both kinds of pages back is tested on a real host pool in tests/test_backend.py, without
   a second server start (CI time).

``calibrate_sample_tokens`` is 2048 here (the default is 4096) so that the test fits CI
time (~2.5 min on a 2-core machine). One run printed:
context 1.793x on the 50 pages written after the switch, page_stats 1.392x on the 160
before it.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest

from sglang_speckv.sglang.serve import CPU_PAGE_SIZE
from test_server_e2e import _assert_same, _full_pages, _stats, _wait_written

pytestmark = pytest.mark.server

PAGE = CPU_PAGE_SIZE
SAMPLE_TOKENS = 2048
PROMPT_TOKENS = 512  # five calibration prompts: 5 x 31 full pages = 2480 tokens >= SAMPLE_TOKENS
HELD_TOKENS = 400
NEW_TOKENS = 8
FIT_WAIT_S = 900.0  # the fit runs at nice 19: about a minute on 2 cores, longer on a busy machine
TEXT = Path(__file__).parent / "data" / "text"


def _args(root: Path) -> list[str]:
    toml = root / "tiers.toml"
    toml.write_text(
        f'stats_file = "{root / "stats.json"}"\ncalibrate = "auto"\ncalibrate_sample_tokens = {SAMPLE_TOKENS}\n'
        f'[[tiers]]\nname = "ram"\npath = "{root / "ram"}"\ncapacity = "512MiB"\nsync = "none"\n'
    )
    return ["--hicache-storage", "speckv", "--speckv-config", str(toml),
            "--hicache-storage-backend-extra-config", json.dumps({"prefetch_threshold": 2 * PAGE})]


@pytest.fixture(scope="module")
def prompts(model_dir):
    """Token-id prompts: five of calibration text, one of held-out text."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    calib = tok((TEXT / "calibration.txt").read_text())["input_ids"]
    held = tok((TEXT / "heldout.txt").read_text())["input_ids"]
    return [calib[i * PROMPT_TOKENS:(i + 1) * PROMPT_TOKENS] for i in range(5)], held[:HELD_TOKENS]


def _wait_ready(root: Path) -> dict:
    deadline = time.monotonic() + FIT_WAIT_S
    while time.monotonic() < deadline:
        live = _stats(root).get("live_calibration") or {}
        if live.get("state") in ("ready", "failed"):
            return live
        time.sleep(1.0)
    raise AssertionError(f"live calibration not ready after {FIT_WAIT_S:.0f} s: {_stats(root).get('live_calibration')}")


def _uncached(server, prompt) -> dict:
    out = server.generate(prompt, NEW_TOKENS, salt=uuid.uuid4().hex)
    assert not any(out["cached"].get(tier, 0) for tier in ("device", "host", "storage")), out["cached"]
    return out


def test_live_calibration_in_a_server(tmp_path, sglang_server, prompts):
    calib_prompts, held = prompts
    server = sglang_server(_args(tmp_path), name="live-a")
    first = server.generate(calib_prompts[0], NEW_TOKENS)  # before the switch: page_stats
    for p in calib_prompts[1:]:
        server.generate(p, 1)
    live = _wait_ready(tmp_path)
    assert live["state"] == "ready" and live["predictor"] == "context", live
    assert live["tokens_sampled"] >= SAMPLE_TOKENS and Path(live["path"]).is_file()
    assert (tmp_path / "ram").samefile(Path(live["path"]).parent)
    before = _stats(tmp_path)["written_by_predictor"]
    assert "context" not in before and before["page_stats"]["pages"] >= SAMPLE_TOKENS // PAGE

    reference = _uncached(server, held)  # its pages are coded with the live predictor too
    pages = _full_pages(reference["prompt_tokens"])
    _assert_same(server.generate(held, NEW_TOKENS), reference)
    stats = _wait_written(tmp_path, at_least=before["page_stats"]["pages"] + 2 * pages)
    server.flush_cache()
    again = server.generate(held, NEW_TOKENS)
    assert again["cached"].get("storage") == pages * PAGE, again["cached"]
    _assert_same(again, reference)
    time.sleep(2.0)
    stats = _stats(tmp_path)
    after = stats["written_by_predictor"]["context"]
    print(f"live calibration: {live}; written by predictor: {stats['written_by_predictor']}")
    assert stats["predictor"] == "context" and after["pages"] >= 2 * pages
    assert after["raw_bytes"] / after["coded_bytes"] >= 1.7, after
    assert stats["verify_failures"] == 0
    old = server.generate(calib_prompts[0], NEW_TOKENS)  # coded by page_stats before the switch
    assert old["cached"].get("storage") == _full_pages(first["prompt_tokens"]) * PAGE, old["cached"]
    _assert_same(old, first)
    server.stop()
