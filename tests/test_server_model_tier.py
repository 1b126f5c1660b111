"""A cold tier coded by the model predictor in a real SGLang server (CPU engine,
SmolLM2-135M-Instruct, bf16 KV): a RAM tier (page_stats) too small for a prompt's pages
demotes most of them into an SSD tier whose predictor is the served model
(``model:CHECKPOINT``); after ``/flush_cache`` the prompt's pages are restored from the
store with greedy tokens and logprobs equal to an uncached run, the SSD tier's raw/stored
ratio is reported in the stats file. (That a restarted process reads the model tier's pages
back bit for bit is tested on a real host pool in tests/test_model_predictor.py, without a
second server start: CI time.)"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from sglang_speckv.sglang.serve import CPU_PAGE_SIZE
from sglang_speckv.sglang.stats import STATS_FILE_INTERVAL_S
from test_server_e2e import NEW_TOKENS, P1, _assert_same, _full_pages, _stats, _uncached, _wait_written

pytestmark = pytest.mark.server

PAGE = CPU_PAGE_SIZE
RAM_KIB = 600  # two SmolLM2 pages coded by page_stats (~265 KB each)


def _args(root: Path, model_dir) -> list[str]:
    toml = root / "tiers.toml"
    toml.write_text(
        f'stats_file = "{root / "stats.json"}"\n'
        f'[[tiers]]\nname = "ram"\npath = "{root / "ram"}"\ncapacity = "{RAM_KIB}KiB"\nsync = "none"\n'
        f'[[tiers]]\nname = "ssd"\npath = "{root / "ssd"}"\ncapacity = "256MiB"\nsync = "data"\n'
        f'predictor = "model:{model_dir}"\n'
    )
    return ["--hicache-storage", "speckv", "--speckv-config", str(toml),
            "--hicache-storage-backend-extra-config", json.dumps({"prefetch_threshold": 2 * PAGE})]


def test_model_tier_restores_exactly(tmp_path, sglang_server, model_dir):
    server = sglang_server(_args(tmp_path, model_dir), name="model-tier-a")
    reference = _uncached(server, P1)
    pages = _full_pages(reference["prompt_tokens"])
    _assert_same(server.generate(P1, NEW_TOKENS), reference)
    _wait_written(tmp_path, at_least=2 * pages)
    server.flush_cache()
    again = server.generate(P1, NEW_TOKENS)
    assert again["cached"].get("storage") == pages * PAGE, again["cached"]
    _assert_same(again, reference)
    time.sleep(STATS_FILE_INTERVAL_S + 0.5)
    stats = _stats(tmp_path)
    ram, ssd = stats["store"]["tiers"]
    print(f"ram tier {ram['pages']} pages ratio {ram['ratio']}; ssd tier {ssd['pages']} pages ratio {ssd['ratio']}; "
          f"recoded {stats['pages_recoded']}")
    assert ssd["pages"] >= pages // 2 and stats["pages_recoded"] >= ssd["pages"]
    assert ssd["ratio"] >= 3.0 and stats["verify_failures"] == 0
    server.stop()
