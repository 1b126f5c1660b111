"""SpecKVStorage against real SGLang host pools (MHATokenToKVPoolHost, built on the CPU), a
real LMDB store and the real coder.

Pages are small (2 layers, 2 KV heads, head_dim 16, 4 tokens: 512 scalars) so the CPU
reference coder keeps these tests fast; the real model's pages go through the server
tests (tests/test_server_e2e.py).
"""

from __future__ import annotations

import json
import threading
import time

import lmdb
import pytest
import torch

from sglang_speckv.codec import pack_value, unpack_value
from sglang_speckv.config import ConfigError
from sglang_speckv.sglang.adapter import SpecKVStorage
from sglang_speckv.sglang.geometry import PageGeometry
from sglang_speckv.sglang.plugin import PAGE_TOKENS

LAYERS, HEADS, DIM, PAGE = 2, 2, 16, 4
LAYOUTS = ("layer_first", "page_first", "page_first_direct", "page_head")


def _host_pool(layout: str, dtype=torch.bfloat16):
    """A real SGLang MHA host pool (unpinned: there is no CUDA here)."""
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost

    device_pool = MHATokenToKVPool(64, PAGE, dtype, HEADS, DIM, LAYERS, "cpu", False, start_layer=0, end_layer=LAYERS)
    return MHATokenToKVPoolHost(
        device_pool.get_device_pool_infos()[0].buffer_info, 2, 0, PAGE, layout, pin_memory=False,
        device_capacity_tokens=device_pool.size, start_layer=0, end_layer=LAYERS,
        write_back_staging=device_pool.hicache_write_back_staging,
    )


def _storage_config(tmp_path, **extra):
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig

    config = {"tiers": [{"name": "ram", "path": str(tmp_path / "ram"), "capacity": "64MiB", "sync": "none"}],
              "stats_file": str(tmp_path / "stats.json"), **extra}
    return HiCacheStorageConfig(
        tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1, is_mla_model=False,
        enable_storage_metrics=False, is_page_first_layout=False, model_name="test-model", extra_config=config,
    )


def _backend(tmp_path, pool, **extra) -> SpecKVStorage:
    backend = SpecKVStorage(_storage_config(tmp_path, **extra), {})
    backend.register_mem_pool_host(pool)
    return backend


def _fill(pool, pages: int, seed: int = 0) -> torch.Tensor:
    """Write KV-like values (per-channel offsets and scales, plus every special bit pattern
    in the first page) into the first ``pages`` pages of ``pool``; returns [pages, canonical]."""
    g = torch.Generator().manual_seed(seed)
    geometry = PageGeometry.of_pool(pool, None)
    channel_mu = torch.randn(2, LAYERS, 1, HEADS, DIM, generator=g) * 3
    channel_sigma = torch.rand(2, LAYERS, 1, HEADS, DIM, generator=g) + 0.05
    out = []
    for p in range(pages):
        page = (channel_mu + channel_sigma * torch.randn(geometry.shape, generator=g)).to(pool.dtype)
        if p == 0:
            bits = page.view(torch.int16).flatten()
            specials = [0x7FC0, 0x7FC1, 0xFFC3, 0x7F80, 0xFF80, 0x8000, 0x0000, 0x0001, 0x807F, 0x7F7F]
            bits[: len(specials)] = torch.tensor([s - (1 << 16) if s >= 1 << 15 else s for s in specials],
                                                 dtype=torch.int16)
        geometry.page(pool.kv_buffer, p * PAGE).copy_(page)
        out.append(page)
    return torch.stack(out)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.uint8)


def _keys(n: int, tag: str = "a") -> list[str]:
    return [f"{tag}{i:063x}" for i in range(n)]


def _extra(prefix: list[str]):
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageExtraInfo

    return HiCacheStorageExtraInfo(prefix_keys=prefix)


@pytest.fixture(scope="module", params=LAYOUTS)
def pool(request):
    return _host_pool(request.param)


def test_zero_copy_roundtrip_is_lossless(tmp_path, pool):
    """Write 3 pages from host slots 0.., read them into other slots: every bit back."""
    written = _fill(pool, 3)
    backend = _backend(tmp_path, pool)
    keys = _keys(3)
    assert backend.batch_exists(keys, _extra([])) == 0
    assert backend.batch_set_v1(keys, torch.arange(0, 3 * PAGE), _extra([])) == [True] * 3
    assert backend.batch_exists(keys, _extra([])) == 3
    assert backend.batch_exists([keys[0], "f" * 64, keys[2]], _extra([])) == 1

    target = torch.arange(8 * PAGE, 11 * PAGE)
    assert backend.batch_get_v1(keys, target, _extra([])) == [True] * 3
    for i in range(3):
        got = backend.geometry.page(pool.kv_buffer, int(target[i * PAGE]))
        assert torch.equal(_bits(got), _bits(written[i])), f"page {i} differs ({pool.layout})"
    stats = backend.stats()
    assert stats["pages_written"] == 3 and stats["pages_read"] == 3
    assert stats["coded_bytes_written"] > 0 and stats["raw_bytes_written"] == 3 * backend.geometry.page_bytes
    backend.close()
    assert json.loads((tmp_path / "stats.json").read_text())["pages_read"] == 3


def test_generic_flat_page_path(tmp_path, pool):
    """batch_set / batch_get with SGLang's flat pages (get_data_page / get_dummy_flat_data_page)."""
    written = _fill(pool, 2, seed=1)
    backend = _backend(tmp_path, pool)
    keys = _keys(2, "b")
    assert backend.batch_set(keys, [pool.get_data_page(i * PAGE) for i in range(2)])
    flats = [torch.zeros_like(pool.get_data_page(0)) for _ in keys]
    got = backend.batch_get(keys, flats)
    for i in range(2):
        assert got[i] is flats[i]
        pool.set_from_flat_data_page(20 * PAGE, got[i])
        assert torch.equal(_bits(backend.geometry.page(pool.kv_buffer, 20 * PAGE)), _bits(written[i]))
    assert backend.exists(keys[1]) and not backend.exists("c" * 64)
    assert backend.get("c" * 64, torch.zeros_like(flats[0])) is None
    backend.close()


def test_repeated_writes_are_skipped_and_reads_stop_at_first_miss(tmp_path):
    pool = _host_pool("layer_first")
    _fill(pool, 4, seed=2)
    backend = _backend(tmp_path, pool)
    keys = _keys(4, "d")
    assert backend.batch_set_v1(keys[:2], torch.arange(0, 2 * PAGE), _extra([])) == [True, True]
    assert backend.batch_set_v1(keys, torch.arange(0, 4 * PAGE), _extra([])) == [True] * 4
    stats = backend.stats()
    assert (stats["pages_written"], stats["pages_already_stored"]) == (4, 2)
    missing = [keys[0], "e" * 64, keys[2]]
    assert backend.batch_get_v1(missing, torch.arange(10 * PAGE, 13 * PAGE), _extra([])) == [True, False, False]
    backend.close()


def test_token_ids_from_the_side_channel_are_stored(tmp_path):
    pool = _host_pool("layer_first")
    _fill(pool, 2, seed=3)
    backend = _backend(tmp_path, pool)
    keys = _keys(2, "t")
    PAGE_TOKENS.record(keys, list(range(100, 100 + 2 * PAGE)), PAGE)
    assert backend.batch_set_v1(keys, torch.arange(0, 2 * PAGE), _extra([])) == [True, True]
    assert backend.stats()["pages_with_tokens"] == 2
    assert backend.batch_get_v1(keys, torch.arange(4 * PAGE, 6 * PAGE), _extra([])) == [True, True]
    backend.close()


def test_position_comes_from_the_write(tmp_path):
    """The write's prefix keys fix a page's position (recorded in its blob); a read decodes
    there whatever its own prefix keys say (SGLang's prefetches omit the matched node's own
    pages from them)."""
    from sglang_speckv.kernels.format import parse_blob

    pool = _host_pool("layer_first")
    written = _fill(pool, 1, seed=4)
    backend = _backend(tmp_path, pool)
    key = _keys(1, "p")
    assert backend.batch_set_v1(key, torch.arange(0, PAGE), _extra(_keys(3, "q"))) == [True]
    _, blob = unpack_value(backend.store.get(key)[0])
    assert parse_blob(blob).header.position == 3 * PAGE
    for prefix in ([], _keys(2, "q"), _keys(3, "q")):
        pool.kv_buffer[:, :, PAGE:2 * PAGE].zero_()
        assert backend.batch_get_v1(key, torch.arange(PAGE, 2 * PAGE), _extra(prefix)) == [True]
        assert torch.equal(_bits(backend.geometry.page(pool.kv_buffer, PAGE)), _bits(written[0]))
    backend.close()


def test_corrupt_values_are_misses_and_touch_no_other_host_memory(tmp_path):
    """Damaged records never reach the coder (host memory untouched); a damaged blob is a
    miss whose own host slots may hold unspecified bytes (the CPU decodes into them in
    place; HiCache frees the slots of pages not read) and no other byte of the pool."""
    pool = _host_pool("layer_first")
    _fill(pool, 2, seed=5)
    backend = _backend(tmp_path, pool)
    keys = _keys(2, "x")
    assert backend.batch_set_v1(keys, torch.arange(0, 2 * PAGE), _extra([])) == [True, True]
    backend.close()

    # Flip one byte of every stored record on disk: the store's record checksum fails.
    env = lmdb.open(str(tmp_path / "ram"), max_dbs=16, subdir=True, map_size=1 << 34)  # address space, not disk
    with env.begin(write=True) as txn:
        db = env.open_db(b"pages", txn=txn)
        for k, v in list(txn.cursor(db)):
            bad = bytearray(v)
            bad[len(bad) // 2] ^= 0x40
            txn.put(k, bytes(bad), db=db)
    env.close()

    backend = _backend(tmp_path, pool)
    target = torch.arange(8 * PAGE, 10 * PAGE)
    before = pool.kv_buffer[:, :, 8 * PAGE:10 * PAGE].clone()
    assert backend.batch_get_v1(keys, target, _extra([])) == [False, False]
    assert torch.equal(_bits(pool.kv_buffer[:, :, 8 * PAGE:10 * PAGE]), _bits(before))
    assert backend.stats()["store"]["tiers"][0]["corrupt"] == 2  # both damaged records

    # A record that verifies but holds a damaged blob: the coder's checks fail instead.
    good = _keys(1, "y")
    assert backend.batch_set_v1(good, torch.arange(0, PAGE), _extra([])) == [True]
    value = backend.store.get(good)[0]
    blob = bytearray(unpack_value(value)[1])
    blob[-5] ^= 0x01
    backend.store.put(_keys(1, "z"), [pack_value(None, bytes(blob))])
    outside = torch.ones(pool.kv_buffer.shape[2], dtype=torch.bool)
    outside[12 * PAGE:13 * PAGE] = False
    before = pool.kv_buffer[:, :, outside].clone()
    assert backend.batch_get_v1(_keys(1, "z"), torch.arange(12 * PAGE, 13 * PAGE), _extra([])) == [False]
    assert torch.equal(_bits(pool.kv_buffer[:, :, outside]), _bits(before))
    assert backend.stats()["verify_failures"] == 1  # the record-level ones are the store's "corrupt"
    before = pool.kv_buffer[:, :, 12 * PAGE:13 * PAGE].clone()

    # A blob of another format version (version 1: an older speckv's page checksum) that
    # somehow sits under this namespace: UnsupportedVersion, a miss.
    old = bytearray(unpack_value(value)[1])
    old[4:6] = (1).to_bytes(2, "little")
    backend.store.put(_keys(1, "v"), [pack_value(None, bytes(old))])
    assert backend.batch_get_v1(_keys(1, "v"), torch.arange(12 * PAGE, 13 * PAGE), _extra([])) == [False]
    assert torch.equal(_bits(pool.kv_buffer[:, :, 12 * PAGE:13 * PAGE]), _bits(before))
    assert backend.stats()["verify_failures"] == 2
    backend.close()


def test_pages_survive_a_restart(tmp_path):
    pool = _host_pool("layer_first")
    written = _fill(pool, 2, seed=6)
    keys = _keys(2, "r")
    backend = _backend(tmp_path, pool)
    assert backend.batch_set_v1(keys, torch.arange(0, 2 * PAGE), _extra([])) == [True, True]
    backend.close()
    backend = _backend(tmp_path, pool)
    assert backend.batch_get_v1(keys, torch.arange(4 * PAGE, 6 * PAGE), _extra([])) == [True, True]
    for i in range(2):
        assert torch.equal(_bits(backend.geometry.page(pool.kv_buffer, (4 + i) * PAGE)), _bits(written[i]))
    backend.close()


def test_namespaces_keep_models_apart(tmp_path):
    pool = _host_pool("layer_first")
    _fill(pool, 1, seed=7)
    keys = _keys(1, "n")
    backend = _backend(tmp_path, pool)
    assert backend.batch_set_v1(keys, torch.arange(0, PAGE), _extra([])) == [True]
    backend.close()
    other = SpecKVStorage(_storage_config(tmp_path), {})
    other.storage_config.model_name = "another-model"
    other.register_mem_pool_host(pool)
    assert other.batch_exists(keys, _extra([])) == 0
    other.close()


def test_concurrent_writers_and_readers(tmp_path):
    pool = _host_pool("layer_first")
    written = _fill(pool, 4, seed=8)
    backend = _backend(tmp_path, pool)
    errors = []

    def work(t: int):
        try:
            keys = _keys(2, f"{t}")
            src = torch.arange((t % 2) * 2 * PAGE, (t % 2) * 2 * PAGE + 2 * PAGE)
            assert backend.batch_set_v1(keys, src, _extra([])) == [True, True]
            dst = torch.arange((20 + 2 * t) * PAGE, (22 + 2 * t) * PAGE)
            assert backend.batch_get_v1(keys, dst, _extra([])) == [True, True]
            for i in range(2):
                got = backend.geometry.page(pool.kv_buffer, int(dst[i * PAGE]))
                assert torch.equal(_bits(got), _bits(written[(t % 2) * 2 + i]))
        except Exception as e:  # collected and re-raised in the test thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not errors, errors
    backend.close()


def test_fp8_pages_roundtrip(tmp_path):
    """fp8 KV is uint8 in SGLang's host pool; --kv-cache-dtype says which fp8."""
    pool = _host_pool("layer_first", dtype=torch.float8_e4m3fn)
    assert pool.dtype in (torch.uint8, torch.float8_e4m3fn)
    geometry = PageGeometry.of_pool(pool, "fp8_e4m3")
    assert geometry.dtype == "fp8_e4m3"
    g = torch.Generator().manual_seed(9)
    pages = torch.randint(0, 256, (2, *geometry.shape), generator=g, dtype=torch.uint8)
    for i in range(2):
        geometry.page(pool.kv_buffer, i * PAGE).view(torch.uint8).copy_(pages[i])
    backend = SpecKVStorage(_storage_config(tmp_path), {})
    backend.mem_pool_host = pool
    backend.open(geometry, pool.kv_buffer, torch.device("cpu"))
    keys = _keys(2, "f")
    assert backend.batch_set_v1(keys, torch.arange(0, 2 * PAGE), _extra([])) == [True, True]
    assert backend.batch_get_v1(keys, torch.arange(6 * PAGE, 8 * PAGE), _extra([])) == [True, True]
    for i in range(2):
        assert torch.equal(geometry.page(pool.kv_buffer, (6 + i) * PAGE).contiguous().view(torch.uint8), pages[i])
    backend.close()


def test_bad_configuration_is_refused_at_start_up(tmp_path):
    with pytest.raises(ConfigError, match="tiers"):
        SpecKVStorage(_storage_config(tmp_path, tiers=[]), {})
    with pytest.raises(ConfigError, match="capacity"):
        SpecKVStorage(_storage_config(tmp_path, tiers=[{"name": "a", "path": str(tmp_path), "capacity": "lots"}]), {})
    with pytest.raises(ConfigError, match="predictor"):
        SpecKVStorage(_storage_config(tmp_path, predictor="oracle"), {})
    with pytest.raises(ValueError, match="not supported"):
        PageGeometry.of_pool(object(), None)


def _calibration(tmp_path, layers=LAYERS, heads=HEADS, dim=DIM, kv_dtype="bf16") -> str:
    """A real calibration file (speckv calibrate's fitting) for pages of this layout, fitted
    on KV-like random sequences: enough for the coding paths, not for good figures."""
    from sglang_speckv.tools import calibrate as cal

    g = torch.Generator().manual_seed(100)
    mu = torch.randn(2, layers, 1, heads, dim, generator=g) * 3
    seqs = [(mu + torch.randn(2, layers, 32, heads, dim, generator=g)).to(torch.bfloat16) for _ in range(2)]
    inv_freq = [float(f) for f in (1.0 / 10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)).tolist()]
    layout = {"layers": layers, "kv_heads": heads, "head_dim": dim, "max_positions": 4096, "rotary_dim": dim,
              "rope_inv_freq": [inv_freq], "layer_rope": [0] * layers}  # as dump_kv.kv_layout gives it
    calib = cal.calibrate(seqs, model="test-model", layout=layout, kv_dtype=kv_dtype, names=("static", "static_rope"),
                          progress=False)
    path = tmp_path / f"calib-{layers}x{heads}x{dim}-{kv_dtype}.safetensors"
    calib.save(path)
    return str(path)


def test_pages_demoted_to_a_lower_tier_are_recoded_and_read_back(tmp_path):
    """A first tier (page_stats) too small for the batch: pages move down through the lower
    tier's re-coding hook (decoded, re-encoded with its calibrated predictor) and are read
    back from there bit for bit."""
    from sglang_speckv.kernels.format import parse_blob
    from sglang_speckv.predictors.linear import SPECS

    pool = _host_pool("layer_first")
    written = _fill(pool, 3, seed=10)
    calib = _calibration(tmp_path)
    tiers = [{"name": "small", "path": str(tmp_path / "small"), "capacity": "2KiB", "sync": "none"},
             {"name": "big", "path": str(tmp_path / "big"), "capacity": "64MiB", "sync": "none",
              "predictor": f"{calib}:static"}]
    backend = _backend(tmp_path, pool, tiers=tiers)
    keys = _keys(3, "m")
    assert backend.batch_set_v1(keys, torch.arange(0, 3 * PAGE), _extra([])) == [True] * 3
    stats = backend.stats()
    demoted = stats["store"]["tiers"][0]["demotions"]
    assert demoted >= 1 and stats["store"]["tiers"][1]["pages"] == demoted, stats["store"]
    assert stats["pages_recoded"] == demoted
    ids = set()
    for key in keys:
        value = backend.store.get([key])[0]
        ids.add(parse_blob(unpack_value(value)[1]).header.predictor_id)
    assert ids == {1, SPECS["static"].id}  # page_stats above, the calibrated predictor below
    assert backend.batch_get_v1(keys, torch.arange(8 * PAGE, 11 * PAGE), _extra([])) == [True] * 3
    for i in range(3):
        assert torch.equal(_bits(backend.geometry.page(pool.kv_buffer, (8 + i) * PAGE)), _bits(written[i]))
    backend.close()


def test_a_failing_predictor_is_a_failed_write_not_an_exception(tmp_path, caplog):
    """A predictor that raises while coding (a bug, a layout it did not expect) must not
    reach HiCache's backup thread, which SGLang does not restart: False per page, counted,
    one log line per cause; the next good write goes through."""
    pool = _host_pool("layer_first")
    written = _fill(pool, 2, seed=13)
    backend = _backend(tmp_path, pool)

    def broken(*args, **kwargs):
        raise RuntimeError("predictor bug")

    # fault injection on the real predictor object (the codec asks for predict_rows)
    backend.coder.default.predict = backend.coder.default.predict_rows = broken
    with caplog.at_level("WARNING"):
        assert backend.batch_set_v1(_keys(2, "u"), torch.arange(0, 2 * PAGE), _extra([])) == [False, False]
        assert backend.batch_set_v1(_keys(1, "v"), torch.arange(0, PAGE), _extra([])) == [False]
    assert sum("predictor bug" in r.getMessage() for r in caplog.records) == 1
    stats = backend.stats()
    assert (stats["encode_failures"], stats["pages_written"]) == (3, 0)
    assert backend.batch_exists(_keys(2, "u"), _extra([])) == 0
    del backend.coder.default.predict, backend.coder.default.predict_rows  # the class's own methods again
    assert backend.batch_set_v1(_keys(2, "u"), torch.arange(0, 2 * PAGE), _extra([])) == [True, True]
    assert backend.batch_get_v1(_keys(2, "u"), torch.arange(4 * PAGE, 6 * PAGE), _extra([])) == [True, True]
    assert torch.equal(_bits(backend.geometry.page(pool.kv_buffer, 5 * PAGE)), _bits(written[1]))
    backend.close()


def test_store_failures_are_misses_not_exceptions(tmp_path, caplog):
    """Any exception below the adapter (here the store, closed under SGLang's feet) is a
    miss or a failed write for SGLang, logged once."""
    pool = _host_pool("layer_first")
    _fill(pool, 1, seed=14)
    backend = _backend(tmp_path, pool)
    store, backend.store = backend.store, None  # every store call now raises AttributeError
    with caplog.at_level("WARNING"):
        assert backend.batch_exists(_keys(1, "w"), _extra([])) == 0
        assert backend.batch_set_v1(_keys(1, "w"), torch.arange(0, PAGE), _extra([])) == [False]
        assert backend.batch_get_v1(_keys(1, "w"), torch.arange(0, PAGE), _extra([])) == [False]
        assert backend.batch_get(_keys(1, "w"), [torch.zeros_like(pool.get_data_page(0))]) == [None]
    assert backend.stats()["store_errors"] == 4
    backend.store = store
    backend.close()


@pytest.mark.parametrize("mismatch", ["layout", "dtype"])
def test_a_calibration_that_does_not_fit_the_pool_is_refused_at_start_up(tmp_path, mismatch):
    layers = LAYERS + 1 if mismatch == "layout" else LAYERS
    calib = _calibration(tmp_path, layers=layers)
    pool = _host_pool("layer_first", dtype=torch.bfloat16 if mismatch == "layout" else torch.float16)
    backend = SpecKVStorage(_storage_config(tmp_path, predictor=f"{calib}:static"), {})
    with pytest.raises(ConfigError, match="predictor .*static.*" + ("layout" if mismatch == "layout" else "calibrated for bf16")):
        backend.register_mem_pool_host(pool)


def test_a_position_dependent_predictor_without_prefix_keys_warns_once(tmp_path, caplog):
    """static_rope codes keys at each token's position; without SGLang's prefix keys (a
    direct launch_server without hicache_storage_pass_prefix_keys, which SGLang keeps to
    itself) every write would start at position 0. The first such write says so, once; the
    pages are still correct."""
    pool = _host_pool("layer_first")
    written = _fill(pool, 2, seed=15)
    calib = _calibration(tmp_path)
    backend = _backend(tmp_path, pool, predictor=f"{calib}:static_rope")
    with caplog.at_level("WARNING"):
        assert backend.batch_set_v1(_keys(1, "a"), torch.arange(0, PAGE), _extra(_keys(2, "q"))) == [True]
        assert not any("prefix keys" in r.getMessage() for r in caplog.records)
        for tag in "bc":
            assert backend.batch_set_v1(_keys(1, tag), torch.arange(PAGE, 2 * PAGE), None) == [True]
    assert sum("hicache_storage_pass_prefix_keys" in r.getMessage() for r in caplog.records) == 1
    for tag, i in (("a", 0), ("b", 1)):
        assert backend.batch_get_v1(_keys(1, tag), torch.arange(4 * PAGE, 5 * PAGE), None) == [True]
        assert torch.equal(_bits(backend.geometry.page(pool.kv_buffer, 4 * PAGE)), _bits(written[i]))
    backend.close()


@pytest.mark.parametrize("layout", ["layer_first", "page_first", "page_first_direct"])
def test_mla_pages_roundtrip(tmp_path, layout):
    """MLA: one latent vector (kv_lora_rank + rope dims) per token and layer, canonical
    [1, layers, tokens, 1, latent]; replicated on every TP rank."""
    from sglang.srt.mem_cache.memory_pool import MLATokenToKVPool
    from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost

    device_pool = MLATokenToKVPool(64, PAGE, torch.bfloat16, 32, 16, LAYERS, "cpu", False, start_layer=0, end_layer=LAYERS)
    pool = MLATokenToKVPoolHost(
        device_pool.get_device_pool_infos()[0].buffer_info, 2, 0, PAGE, layout, pin_memory=False,
        device_capacity_tokens=device_pool.size, start_layer=0, end_layer=LAYERS, target_layer_num=LAYERS,
        override_kv_cache_dim=device_pool.kv_cache_dim,
    )
    geometry = PageGeometry.of_pool(pool, None)
    assert geometry.kind == "mla" and geometry.shape == (1, LAYERS, PAGE, 1, 48)
    g = torch.Generator().manual_seed(11)
    pages = (torch.randn(2, *geometry.shape, generator=g) * 2).to(torch.bfloat16)
    for i in range(2):
        geometry.page(pool.kv_buffer, i * PAGE).copy_(pages[i])
    config = _storage_config(tmp_path)
    config.is_mla_model = True
    backend = SpecKVStorage(config, {})
    backend.register_mem_pool_host(pool)
    keys = _keys(2, "l")
    assert backend.batch_set_v1(keys, torch.arange(0, 2 * PAGE), _extra([])) == [True, True]
    assert backend.batch_get_v1(keys, torch.arange(6 * PAGE, 8 * PAGE), _extra([])) == [True, True]
    flat = [torch.zeros_like(pool.get_data_page(0)) for _ in keys]
    assert all(t is not None for t in backend.batch_get(keys, flat))
    for i in range(2):
        assert torch.equal(_bits(geometry.page(pool.kv_buffer, (6 + i) * PAGE)), _bits(pages[i]))
        assert torch.equal(_bits(geometry.from_flat(flat[i])), _bits(pages[i]))
    backend.close()


def test_stats_file_catches_up_with_the_counters(tmp_path):
    """Writes of the stats file are rate-limited, but the last events reach it within the
    interval even when nothing happens afterwards."""
    from sglang_speckv.sglang.stats import STATS_FILE_INTERVAL_S

    pool = _host_pool("layer_first")
    _fill(pool, 1, seed=12)
    backend = _backend(tmp_path, pool)
    key = _keys(1, "s")
    assert backend.batch_exists(key, _extra([])) == 0  # writes the file (first event)
    assert backend.batch_set_v1(key, torch.arange(0, PAGE), _extra([])) == [True]  # too soon: deferred
    time.sleep(STATS_FILE_INTERVAL_S + 1.0)
    assert json.loads((tmp_path / "stats.json").read_text())["pages_written"] == 1
    backend.close()


def test_predictor_names_are_validated_with_clear_errors(tmp_path):
    from sglang_speckv.predictors import PredictorSpecError, predictor_from_spec

    assert predictor_from_spec("page_stats").name == "page_stats"
    with pytest.raises(PredictorSpecError, match="speckv calibrate"):
        predictor_from_spec("oracle")
    with pytest.raises(ConfigError, match="predictor:"):
        SpecKVStorage(_storage_config(tmp_path, predictor=str(tmp_path / "missing.safetensors") + ":static"), {})


def _model_config(tmp_path, name: str = "tiny", **kw) -> str:
    """A checkpoint directory holding only config.json (all live calibration reads): a
    Llama whose KV pages have this file's layout, unless ``kw`` says otherwise."""
    from transformers import LlamaConfig

    fields = dict(hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=HEADS,
                  head_dim=DIM, num_hidden_layers=LAYERS, vocab_size=128, max_position_embeddings=4096)
    directory = tmp_path / name
    LlamaConfig(**{**fields, **kw}).save_pretrained(directory)
    return str(directory)


def _live_backend(tmp_path, pool, model_path, **extra) -> SpecKVStorage:
    tiers = [{"name": "small", "path": str(tmp_path / "small"), "capacity": "3KiB", "sync": "none"},
             {"name": "big", "path": str(tmp_path / "big"), "capacity": "64MiB", "sync": "none", "predictor": "live"}]
    backend = SpecKVStorage(_storage_config(tmp_path, calibrate="auto", calibrate_sample_tokens=5 * PAGE, tiers=tiers,
                                            **extra), {})
    backend.open(PageGeometry.of_pool(pool, None), pool.kv_buffer, torch.device("cpu"), model_path)
    return backend


def test_live_calibration_switches_new_writes_and_recodes_demoted_pages(tmp_path):
    """calibrate = "auto": the first 5 pages written (one with NaN/inf patterns, which the
    fit leaves out) are sampled and page_stats-coded; the background fit makes the context
    predictor code later pages; pages demoted into the 'live' tier are re-coded with it;
    everything reads back bit for bit, also after a restart, which reuses the saved file
    and the same store namespace."""
    from sglang_speckv.kernels.format import parse_blob
    from sglang_speckv.predictors.linear import SPECS

    pool = _host_pool("layer_first")
    written = _fill(pool, 8, seed=20)
    model = _model_config(tmp_path)
    backend = _live_backend(tmp_path, pool, model)
    assert backend.coder.live.status()["state"] == "sampling" and backend.coder.identity() == ""
    keys = _keys(8, "v")
    assert backend.batch_set_v1(keys[:5], torch.arange(0, 5 * PAGE), _extra([])) == [True] * 5
    assert backend.coder.live.wait(timeout=120)
    assert backend.coder.live.status()["state"] == "ready", backend.coder.live.status()
    assert backend.batch_set_v1(keys[5:], torch.arange(5 * PAGE, 8 * PAGE), _extra(keys[:5])) == [True] * 3
    stats = backend.stats()
    assert stats["predictor"] == "context" and stats["live_calibration"]["state"] == "ready"
    assert stats["written_by_predictor"]["page_stats"]["pages"] == 5
    assert stats["written_by_predictor"]["context"]["pages"] == 3
    assert stats["pages_recoded"] >= 1 and stats["store"]["tiers"][1]["pages"] >= 5, stats["store"]
    ids = {parse_blob(unpack_value(backend.store.get([k])[0])[1]).header.predictor_id for k in keys}
    assert SPECS["context"].id in ids
    assert all(parse_blob(unpack_value(backend.store.get([k])[0])[1]).header.predictor_id == SPECS["context"].id
               for k in keys[5:])

    def read_back(b):
        assert b.batch_get_v1(keys, torch.arange(8 * PAGE, 16 * PAGE), _extra([])) == [True] * 8
        for i in range(8):
            assert torch.equal(_bits(b.geometry.page(pool.kv_buffer, (8 + i) * PAGE)), _bits(written[i]))

    read_back(backend)
    fingerprint = backend.coder.live.status()["fingerprint"]
    backend.close()
    again = _live_backend(tmp_path, pool, model)  # restart: the saved calibration, at once
    assert again.coder.live.status()["state"] == "ready" and again.coder.live.status()["fingerprint"] == fingerprint
    read_back(again)
    again.close()


def test_live_calibration_refuses_what_it_cannot_fit_at_start_up(tmp_path):
    """An unsupported model (MLA latents, no RoPE), a pool of another layout or KV dtype, or
    no model path: a ConfigError naming the architecture and what is missing."""
    from transformers import GPT2Config

    pool = _host_pool("layer_first")
    with pytest.raises(ConfigError, match="calibrate.*model path is unknown"):
        _live_backend(tmp_path, pool, None)
    with pytest.raises(ConfigError, match="calibrate = 'auto': LlamaForCausalLM: this server's pages hold 2 layers"):
        _live_backend(tmp_path, pool, _model_config(tmp_path, "deeper", num_hidden_layers=3,
                                                     architectures=["LlamaForCausalLM"]))
    gpt2 = tmp_path / "gpt2"
    GPT2Config(n_layer=2, n_head=2, n_embd=32, architectures=["GPT2LMHeadModel"]).save_pretrained(gpt2)
    with pytest.raises(ConfigError, match="GPT2LMHeadModel: its config has no RoPE parameters"):
        _live_backend(tmp_path, pool, str(gpt2))
    deepseek = tmp_path / "deepseek"
    deepseek.mkdir()
    (deepseek / "config.json").write_text(json.dumps({
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "kv_lora_rank": 512,
        "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "vocab_size": 128}))
    with pytest.raises(ConfigError, match="DeepseekV2ForCausalLM: its KV cache is an MLA latent"):
        _live_backend(tmp_path, pool, str(deepseek))
    with pytest.raises(ConfigError, match="covers KV dtypes bf16, fp8_e4m3, not fp16"):
        _live_backend(tmp_path, _host_pool("layer_first", dtype=torch.float16), _model_config(tmp_path))


def test_live_calibration_of_fp8_pages(tmp_path):
    """fp8 e4m3 KV (uint8 in SGLang's host pool): sampled as float8, fitted, and later
    pages coded by the live predictor read back bit for bit."""
    from sglang_speckv.kernels.format import parse_blob
    from sglang_speckv.predictors.linear import SPECS

    pool = _host_pool("layer_first", dtype=torch.float8_e4m3fn)
    geometry = PageGeometry.of_pool(pool, "fp8_e4m3")
    g = torch.Generator().manual_seed(21)
    mu = torch.randn(2, LAYERS, 1, HEADS, DIM, generator=g) * 3
    pages = (mu + torch.randn(7, *geometry.shape, generator=g)).to(torch.float8_e4m3fn).view(torch.uint8)
    for i in range(7):
        geometry.page(pool.kv_buffer, i * PAGE).view(torch.uint8).copy_(pages[i])
    tiers = [{"name": "ram", "path": str(tmp_path / "ram"), "capacity": "64MiB", "sync": "none"}]
    backend = SpecKVStorage(_storage_config(tmp_path, calibrate="auto", calibrate_sample_tokens=5 * PAGE, tiers=tiers), {})
    backend.open(geometry, pool.kv_buffer, torch.device("cpu"), _model_config(tmp_path))
    keys = _keys(7, "e")
    assert backend.batch_set_v1(keys[:5], torch.arange(0, 5 * PAGE), _extra([])) == [True] * 5
    assert backend.coder.live.wait(timeout=120) and backend.coder.live.status()["state"] == "ready"
    assert backend.batch_set_v1(keys[5:], torch.arange(5 * PAGE, 7 * PAGE), _extra(keys[:5])) == [True] * 2
    assert parse_blob(unpack_value(backend.store.get([keys[6]])[0])[1]).header.predictor_id == SPECS["context"].id
    assert backend.batch_get_v1(keys, torch.arange(8 * PAGE, 15 * PAGE), _extra([])) == [True] * 7
    for i in range(7):
        assert torch.equal(geometry.page(pool.kv_buffer, (8 + i) * PAGE).contiguous().view(torch.uint8), pages[i])
    backend.close()
