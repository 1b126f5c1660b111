"""The model predictor (predictors/model.py) on real SmolLM2-135M KV: blobs decode bit for
bit in a fresh process, a different fingerprint (weights, quantisation, device kind) is a
miss, pages without tokens fall back cleanly, and demotion into a model-predictor tier
re-codes pages that read back exactly through a real SGLang host pool."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sglang_speckv import codec
from sglang_speckv.kernels import format as fmt
from sglang_speckv.predictors import PredictorSpecError, predictor_from_spec
from sglang_speckv.predictors import model as model_predictor
from sglang_speckv.predictors.base import PageMeta
from sglang_speckv.tools import calibrate as cal
from sglang_speckv.tools import dump_kv

TEXT = Path(__file__).parent / "data" / "text"
PAGE = 16
PAGES = 3


@pytest.fixture(scope="module")
def held(model_dir):
    """(pages [PAGES] bf16 [2, L, 16, H, D] of held-out text, their metas with tokens)."""
    model, tok = dump_kv.load_model(model_dir)
    ids = dump_kv.tokenize(tok, dump_kv.read_texts([TEXT / "heldout.txt"]), PAGE * PAGES).tolist()
    kv = cal.to_pages(*dump_kv.compute_kv(model, torch.tensor(ids), progress=False))
    pages = [kv[:, :, s:s + PAGE].contiguous() for s in range(0, PAGE * PAGES, PAGE)]
    metas = [PageMeta("bf16", tuple(p.shape), s, tuple(ids[s:s + PAGE]), tuple(ids[:s]))
             for p, s in zip(pages, range(0, PAGE * PAGES, PAGE))]
    return pages, metas


@pytest.fixture(scope="module")
def predictor(model_dir):
    return predictor_from_spec(f"model:{model_dir}")


@pytest.fixture(scope="module")
def blobs(held, predictor):
    pages, metas = held
    return codec.encode_pages(pages, metas, predictor, w_wide=predictor.w_wide, kappa=predictor.kappa)


DECODE = """
import json, sys, torch
from sglang_speckv import codec
from sglang_speckv.predictors import predictor_from_spec
from sglang_speckv.predictors.base import PageMeta
job = json.load(open(sys.argv[1]))
pred = predictor_from_spec(job["spec"])
metas = [PageMeta("bf16", tuple(m["shape"]), m["position"], tuple(m["ids"]), tuple(m["prefix"])) for m in job["metas"]]
blobs = [bytes.fromhex(b) for b in job["blobs"]]
pages, errors = codec.decode_pages(blobs, pred, metas=metas)
assert errors == [None] * len(blobs), errors
torch.save([p.view(torch.int16) for p in pages], sys.argv[2])
"""


def test_a_coded_page_decodes_identically_in_a_fresh_process(tmp_path, model_dir, held, blobs, predictor):
    pages, metas = held
    headers = [fmt.parse_blob(b).header for b in blobs]
    assert all(not h.raw and h.predictor_id == predictor.id and h.fingerprint == predictor.fingerprint for h in headers)
    job = {"spec": f"model:{model_dir}", "blobs": [b.hex() for b in blobs],
           "metas": [{"shape": m.shape, "position": m.position, "ids": m.token_ids, "prefix": m.prefix_ids} for m in metas]}
    (tmp_path / "job.json").write_text(json.dumps(job))
    subprocess.run([sys.executable, "-c", DECODE, str(tmp_path / "job.json"), str(tmp_path / "out.pt")],
                   check=True, timeout=600)
    for page, out in zip(pages, torch.load(tmp_path / "out.pt")):
        assert torch.equal(page.view(torch.int16), out)


def test_blobs_beat_page_stats_on_real_kv(held, blobs):
    """The sanity check behind the bench's figures (bits per scalar of real blobs)."""
    pages, metas = held
    base = codec.encode_pages(pages, metas, predictor_from_spec("page_stats"))
    n = sum(p.numel() for p in pages)
    bits, base_bits = 8 * sum(map(len, blobs)) / n, 8 * sum(map(len, base)) / n
    print(f"model {bits:.3f} bits/scalar, page_stats {base_bits:.3f}")
    assert bits < 0.6 * base_bits


def _perturbed_loader(real):
    def load(path):
        m = real(path)
        with torch.no_grad():
            m.model.layers[-1].mlp.down_proj.weight[0, 0] += 1e-3
        return m

    return load


@pytest.mark.parametrize("change", ["weights", "quantisation", "device kind"])
def test_a_fingerprint_the_reader_does_not_reproduce_is_a_miss(monkeypatch, model_dir, held, blobs, predictor, change):
    spec = f"model:{model_dir}"
    if change == "weights":
        monkeypatch.setattr(model_predictor, "load_float32", _perturbed_loader(model_predictor.load_float32))
    elif change == "quantisation":
        spec += "?quant=int8&exact=10"
    else:
        monkeypatch.setattr(model_predictor, "device_kind", lambda: "cpu/other-isa")
    other = predictor_from_spec(spec)
    assert other.fingerprint != predictor.fingerprint
    pages, errors = codec.decode_pages(blobs[:1], other, metas=held[1][:1])
    assert pages == [None] and isinstance(errors[0], fmt.WrongPredictor)


def test_spec_errors_say_what_to_write(tmp_path, model_dir):
    for spec, words in ((f"model:{model_dir}?quant=int3", "quant must be one of"),
                        (f"model:{model_dir}?depth=2", "unknown parameter"),
                        (f"model:{model_dir}?threads=x", "must be an integer"),
                        (f"model:{tmp_path}", "config.json")):
        with pytest.raises(PredictorSpecError, match=words):
            predictor_from_spec(spec)


def test_pages_the_predictor_cannot_code_fall_back_cleanly(model_dir, held, caplog):
    """No token ids, or no prefix: the page coder codes them with page_stats (one log line
    per cause); re-coding such a page for a model tier leaves it as it is."""
    from sglang_speckv.sglang.page_coder import PageCoder

    pages, metas = held
    coder = PageCoder(f"model:{model_dir}", [], 1 << 26)
    model = coder.default
    bare = [PageMeta("bf16", m.shape, m.position) for m in metas[1:]]
    no_prefix = [PageMeta("bf16", m.shape, m.position, m.token_ids) for m in metas[1:]]
    with caplog.at_level("WARNING"):
        values = coder.encode(torch.stack(pages[1:]), bare) + coder.encode(torch.stack(pages[1:]), no_prefix)
    ids = [fmt.parse_blob(codec.unpack_value(v)[1]).header.predictor_id for v in values]
    assert ids == [1] * 4
    assert sum("cannot code" in r.message for r in caplog.records) == 2  # one line per cause
    for v in values:
        view = memoryview(v)
        assert coder.recode(model, view) is view  # moves as it is
    value = coder.encode(torch.stack(pages[:1]), metas[:1])[0]  # all tokens known: the model codes it
    assert fmt.parse_blob(codec.unpack_value(value)[1]).header.predictor_id == model.id


def test_a_model_tier_recodes_demoted_pages_that_read_back_exactly_after_a_restart(tmp_path, model_dir, held):
    """A real SGLang host pool of SmolLM2's geometry holding real KV, a RAM tier (page_stats)
    too small for the chain and an SSD tier with the model predictor: demoted pages are
    re-coded by the model (the store's hook), the tier's raw/stored ratio is reported, and
    a restarted backend reads them back bit for bit."""
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig, HiCacheStorageExtraInfo
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost

    from sglang_speckv.sglang.adapter import SpecKVStorage
    from sglang_speckv.sglang.plugin import PAGE_TOKENS

    pages, metas = held
    _, layers, _, heads, dim = pages[0].shape
    device_pool = MHATokenToKVPool(128, PAGE, torch.bfloat16, heads, dim, layers, "cpu", False, start_layer=0, end_layer=layers)
    pool = MHATokenToKVPoolHost(device_pool.get_device_pool_infos()[0].buffer_info, 2, 0, PAGE, "layer_first",
                                pin_memory=False, device_capacity_tokens=device_pool.size, start_layer=0,
                                end_layer=layers, write_back_staging=device_pool.hicache_write_back_staging)
    tiers = [{"name": "ram", "path": str(tmp_path / "ram"), "capacity": "300KiB", "sync": "none"},
             {"name": "ssd", "path": str(tmp_path / "ssd"), "capacity": "64MiB", "sync": "none",
              "predictor": f"model:{model_dir}"}]
    config = HiCacheStorageConfig(
        tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1, is_mla_model=False,
        enable_storage_metrics=False, is_page_first_layout=False, model_name="smollm2",
        extra_config={"tiers": tiers, "stats_file": str(tmp_path / "stats.json")})

    def backend():
        b = SpecKVStorage(config, {})
        b.register_mem_pool_host(pool)
        return b

    b = backend()
    for i, page in enumerate(pages):
        b.geometry.page(pool.kv_buffer, i * PAGE).copy_(page)
    keys = [f"{i:064x}" for i in range(1, PAGES + 1)]
    PAGE_TOKENS.record(keys, [t for m in metas for t in m.token_ids], PAGE)
    none = HiCacheStorageExtraInfo(prefix_keys=[])
    assert b.batch_set_v1(keys, torch.arange(0, PAGES * PAGE), none) == [True] * PAGES
    stats = b.stats()
    ram, ssd = stats["store"]["tiers"]
    assert ssd["pages"] >= 2 and stats["pages_recoded"] == ssd["pages"], stats
    ratio = ssd["ratio"]
    print(f"ssd tier: {ssd['pages']} pages, raw/stored {ratio:.2f}x; ram tier {ram['pages']} pages, "
          f"raw/stored {ram['ratio']}x")
    assert ratio > 3.0
    b.close()
    b = backend()  # a restart: a fresh predictor (empty chunk cache), the same fingerprint
    dest = torch.arange(4 * PAGE, (4 + PAGES) * PAGE)
    assert b.batch_get_v1(keys, dest, none) == [True] * PAGES
    for i, page in enumerate(pages):
        assert torch.equal(b.geometry.page(pool.kv_buffer, (4 + i) * PAGE).view(torch.int16), page.view(torch.int16))
    b.close()
