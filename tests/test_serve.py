"""``speckv serve``'s SGLang command line (no server started: ``build_command`` only)."""

from __future__ import annotations

import json

import pytest

from sglang_speckv.sglang.serve import CPU_PAGE_SIZE, EXTRA_CONFIG_FLAG, GPU_PAGE_SIZE, build_command


def _extra(argv: list[str]) -> dict:
    return json.loads(argv[argv.index(EXTRA_CONFIG_FLAG) + 1])


@pytest.mark.parametrize("cpu, page", [(True, CPU_PAGE_SIZE), (False, GPU_PAGE_SIZE)])
def test_prefetch_threshold_is_one_page(cpu, page):
    # SGLang's default (256 tokens) would skip L3 for prompts whose part beyond the device
    # match is shorter: issue #9, docs/TUNING.md "The prefetch threshold".
    argv, _ = build_command(["--model-path", "/m"], cpu=cpu)
    assert _extra(argv) == {"hicache_storage_pass_prefix_keys": True, "prefetch_threshold": page}
    argv, _ = build_command(["--model-path", "/m", "--page-size", "32"], cpu=cpu)
    assert _extra(argv)["prefetch_threshold"] == 32


def test_explicit_prefetch_threshold_is_kept():
    argv, _ = build_command(["--model-path", "/m", EXTRA_CONFIG_FLAG, '{"prefetch_threshold": 256}'], cpu=True)
    assert _extra(argv)["prefetch_threshold"] == 256
    assert argv.count(EXTRA_CONFIG_FLAG) == 1


def test_bad_page_size():
    with pytest.raises(SystemExit, match="--page-size must be a positive integer"):
        build_command(["--model-path", "/m", "--page-size", "x"], cpu=True)
