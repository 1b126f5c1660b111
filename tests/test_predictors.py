"""Calibrated token-free predictors on real SmolLM2-135M KV: exact round trips through the
real codec, bit-determinism (repeats, thread counts, page cuts, batch compositions), the
fixed-point dot product, garbage pages, and the calibration file's checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sglang_speckv.tools import calibrate as cal
from sglang_speckv.tools import dump_kv
from sglang_speckv import codec
from sglang_speckv.kernels import format as fmt
from sglang_speckv.predictors import predictor_from_calibration
from sglang_speckv.predictors.base import PageMeta
from sglang_speckv.predictors.calibration import CalibrationError, load_calibration
from sglang_speckv.predictors.linear import SPECS, LinearGaussianPredictor, block_features, rope_cos_sin

TEXT = Path(__file__).parent / "data" / "text"
DTYPES = ("bf16", "fp8_e4m3")
CALIB_TOKENS = 384  # two sequences of 192: one fit, one validation (enough to exercise every path)
HELD_TOKENS = 48


@pytest.fixture(scope="module")
def kv(model_dir):
    """Real KV: calibration sequences and a held-out page per dtype, plus calibrations."""
    model, tok = dump_kv.load_model(model_dir)
    out = {"model": dump_kv.model_identity(model), "layout": dump_kv.kv_layout(model)}
    ids_cal = dump_kv.tokenize(tok, dump_kv.read_texts([TEXT / "calibration.txt"]), CALIB_TOKENS)
    ids_held = dump_kv.tokenize(tok, dump_kv.read_texts([TEXT / "heldout.txt"]), HELD_TOKENS)
    for kv_dtype in DTYPES:
        seqs, scale = cal.calibration_sequences(model, ids_cal, kv_dtype, CALIB_TOKENS // 2, progress=False)
        k, v = dump_kv.compute_kv(model, ids_held, progress=False)
        held = cal.to_pages(k.to(torch.bfloat16), v.to(torch.bfloat16))
        if scale is not None:
            held = torch.stack([dump_kv.to_fp8(held[0], scale[0]), dump_kv.to_fp8(held[1], scale[1])])
        calib = cal.calibrate(seqs, model=out["model"], layout=out["layout"], kv_dtype=kv_dtype, fp8_scale=scale, progress=False)
        out[kv_dtype] = {"seqs": seqs, "held": held, "calib": calib, "scale": scale}
    return out


def pages_of(page: torch.Tensor, tokens: int, start: int = 0):
    """Cut [2, L, T, H, D] into pages of ``tokens`` (with their metas) from token ``start``."""
    kv_dtype = "bf16" if page.dtype == torch.bfloat16 else "fp8_e4m3"
    out = []
    for s in range(start, page.shape[2] - tokens + 1, tokens):
        p = page[:, :, s : s + tokens].contiguous()
        out.append((p, PageMeta(kv_dtype, tuple(p.shape), s)))
    return out


@pytest.mark.parametrize("kv_dtype", DTYPES)
@pytest.mark.parametrize("name", list(SPECS))
def test_codec_round_trip_exact(kv, kv_dtype, name):
    pred = LinearGaussianPredictor(kv[kv_dtype]["calib"], name)
    pages = pages_of(kv[kv_dtype]["held"], 16)[:2]
    blobs = codec.encode_pages([p for p, _ in pages], [m for _, m in pages], pred, w_wide=pred.w_wide, kappa=pred.kappa)
    out, errors = codec.decode_pages(blobs, pred, metas=[m for _, m in pages])
    assert errors == [None, None]
    for (p, _), o in zip(pages, out):
        assert torch.equal(p.view(torch.uint8), o.view(torch.uint8))
    header = fmt.parse_blob(blobs[0]).header
    assert not header.raw and header.predictor_id == pred.id and header.fingerprint == pred.fingerprint
    assert (header.w_wide, header.kappa) == (pred.w_wide, pred.kappa)


@pytest.mark.parametrize("kv_dtype", DTYPES)
def test_context_predicts_better_than_static(kv, kv_dtype):
    """A sanity check on held-out text (the figures themselves come from bench frontier)."""
    bits = {}
    held = kv[kv_dtype]["held"]
    for name in ("static", "context"):
        pred = LinearGaussianPredictor(kv[kv_dtype]["calib"], name)
        meta = PageMeta(kv_dtype, tuple(held.shape), 0)
        stages = pred.stages(meta)
        mu, sigma = zip(*(pred.predict(meta, b"", held.to(torch.float32), s) for s in range(len(stages) - 1)))
        bits[name] = float(cal.scalar_bits(held.reshape(-1), torch.cat(mu), torch.cat(sigma), kv_dtype, pred.w_wide, pred.kappa).mean())
    assert bits["context"] < bits["static"] < {"bf16": 16, "fp8_e4m3": 8}[kv_dtype]


def _predict_all(pred, page, meta):
    stages = pred.stages(meta)
    values = page.to(torch.float32)
    return [pred.predict(meta, b"", values, s) for s in range(len(stages) - 1)]


@pytest.mark.parametrize("name", ["context", "static_rope"])
def test_bit_deterministic(kv, name):
    """Same bits on repeats, with 1 or 2 threads, and whether a token sits in a 16- or a
    32-token page (predictions are per token), and a page's blob does not depend on the
    other pages of the batch."""
    pred = LinearGaussianPredictor(kv["bf16"]["calib"], name)
    held = kv["bf16"]["held"]
    (big, big_meta), = pages_of(held, 32)[:1]
    ref = _predict_all(pred, big, big_meta)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        again = _predict_all(LinearGaussianPredictor(kv["bf16"]["calib"], name), big, big_meta)
    finally:
        torch.set_num_threads(threads)
    for (m1, s1), (m2, s2) in zip(ref, again):
        assert torch.equal(m1.view(torch.int32), m2.view(torch.int32)) and torch.equal(s1.view(torch.int32), s2.view(torch.int32))
    # the second half of the 32-token page == a 16-token page at position 16
    small, small_meta = pages_of(held, 16)[1]
    part = _predict_all(pred, small, small_meta)
    stages_big, stages_small = pred.stages(big_meta), pred.stages(small_meta)
    mu_big = torch.cat([m for m, _ in ref]).reshape(big.shape)
    mu_small = torch.cat([m for m, _ in part]).reshape(small.shape)
    assert len(stages_big) == len(stages_small)
    assert torch.equal(mu_big[:, :, 16:].view(torch.int32), mu_small.view(torch.int32))
    # batch composition
    pages = pages_of(held, 16)
    alone = codec.encode_pages([pages[1][0]], [pages[1][1]], pred, w_wide=pred.w_wide, kappa=pred.kappa)
    batch = codec.encode_pages([p for p, _ in pages], [m for _, m in pages], pred, w_wide=pred.w_wide, kappa=pred.kappa)
    assert alone[0] == batch[1]


@pytest.mark.parametrize("name", list(SPECS))
def test_rows_read_earlier_stages_only_and_parts_are_the_stage(kv, name):
    """The contract the C++ encoder relies on (predictors/base.py): a stage's rows from the
    page itself (what the encoder shows) are those from the page NaN'd from the stage on
    (what the decoder shows), and the rows of each range of parts are the whole stage's."""
    pred = LinearGaussianPredictor(kv["bf16"]["calib"], name)
    (page, meta), = pages_of(kv["bf16"]["held"], 16)[1:2]
    stages = pred.stages(meta)
    for s in range(len(stages) - 1):
        masked = page.clone()
        masked.view(-1)[stages[s]:] = float("nan")
        whole = pred.predict_rows(meta, b"", page, s)
        assert all(torch.equal(a.view(torch.int32), b.view(torch.int32))
                   for a, b in zip(whole, pred.predict_rows(meta, b"", masked, s)))
        n = pred.parts(meta, s)
        for p0, p1 in ((0, n), (n // 2, n), (0, 1), (n - 1, n)):
            rows = pred.predict_rows(meta, b"", page, s, (p0, p1))
            per_part = whole[0].numel() // n
            for got, want in zip(rows, whole):
                want = want.reshape(-1)[p0 * per_part:p1 * per_part]
                assert torch.equal(got.reshape(-1).view(torch.int32), want.view(torch.int32))
    assert pred.parts(meta, 0) == (2 * meta.shape[1] if name == "static_rope" else 1)


def test_fixed_point_dot_product_is_exact(kv):
    """The float64 matmul of the context predictor equals the same sum in int64."""
    calib = kv["bf16"]["calib"]
    pred = LinearGaussianPredictor(calib, "context")
    held = kv["bf16"]["held"].to(torch.float32)
    cos_sin = rope_cos_sin(calib.rope, torch.arange(held.shape[2]), calib.layout["layer_rope"])
    kv_, layer = 1, 10
    x = torch.cat([block_features(held, skv, sl, cos_sin, pred.rotary(skv), int(calib.in_exp[skv, sl]))
                   for skv, sl in SPECS["context"].sources(kv_, layer, 30)], dim=1)
    block = calib.blocks["context"][(kv_, layer)]
    exact = x.to(torch.int64) @ block.coef.to(torch.int64).t() + block.bias
    floated = x @ block.coef.to(torch.float64).t() + block.bias.to(torch.float64)
    assert torch.equal(floated.to(torch.int64), exact)
    assert float(exact.abs().max()) < 2.0**53


@pytest.mark.parametrize("kv_dtype", DTYPES)
def test_garbage_pages_round_trip(kv, kv_dtype):
    """Any bit pattern (NaN payloads, inf, -0, subnormals) codes and decodes exactly."""
    pred = LinearGaussianPredictor(kv[kv_dtype]["calib"], "context")
    shape = (2, 30, 4, 3, 64)
    g = torch.Generator().manual_seed(1)
    if kv_dtype == "bf16":
        page = torch.randint(-(2**15), 2**15, shape, generator=g, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    else:
        page = torch.randint(0, 256, shape, generator=g, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
    meta = PageMeta(kv_dtype, shape, 100)
    mus = _predict_all(pred, page, meta)
    assert all(bool(torch.isfinite(m).all() and torch.isfinite(s).all() and (s > 0).all()) for m, s in mus)
    blobs = codec.encode_pages([page], [meta], pred, w_wide=pred.w_wide, kappa=pred.kappa)
    (out,), (err,) = codec.decode_pages(blobs, pred, metas=[meta])
    assert err is None and torch.equal(out.view(torch.uint8), page.view(torch.uint8))


def test_calibration_file_round_trip(kv, tmp_path):
    calib = kv["fp8_e4m3"]["calib"]
    path = tmp_path / "calib.safetensors"
    calib.save(path)
    loaded = load_calibration(path)
    assert loaded.fingerprint == calib.fingerprint and loaded.kv_dtype == "fp8_e4m3"
    assert torch.equal(loaded.fp8_scale, kv["fp8_e4m3"]["scale"])
    held = kv["fp8_e4m3"]["held"]
    page, meta = pages_of(held, 16)[0]
    for name in SPECS:
        a, b = LinearGaussianPredictor(calib, name), predictor_from_calibration(path, name)
        assert a.fingerprint == b.fingerprint
        for (m1, s1), (m2, s2) in zip(_predict_all(a, page, meta), _predict_all(b, page, meta)):
            assert torch.equal(m1, m2) and torch.equal(s1, s2)


def test_wrong_calibration_is_refused(kv, tmp_path):
    """A blob coded under one calibration does not decode under another (clean error)."""
    calib = kv["bf16"]["calib"]
    other = cal.calibrate(list(reversed(kv["bf16"]["seqs"])), model=kv["model"], layout=kv["layout"],
                          kv_dtype="bf16", names=["context"], residual=(), progress=False)
    a, b = LinearGaussianPredictor(calib, "context"), LinearGaussianPredictor(other, "context")
    assert a.fingerprint != b.fingerprint
    page, meta = pages_of(kv["bf16"]["held"], 16)[0]
    blobs = codec.encode_pages([page], [meta], a, w_wide=a.w_wide, kappa=a.kappa)
    (out,), (err,) = codec.decode_pages(blobs, b, metas=[meta])
    assert out is None and isinstance(err, fmt.WrongPredictor)
    # a bf16 calibration refuses fp8 pages, and a page of the wrong layout
    fp8_page, fp8_meta = pages_of(kv["fp8_e4m3"]["held"], 16)[0]
    with pytest.raises(ValueError, match="calibrated for bf16"):
        a.predict(fp8_meta, b"", fp8_page.to(torch.float32), 0)
    with pytest.raises(ValueError, match="layout"):
        a.predict(PageMeta("bf16", (2, 29, 16, 3, 64)), b"", torch.zeros(2, 29, 16, 3, 64), 0)


def test_bad_calibration_files(kv, tmp_path):
    path = tmp_path / "calib.safetensors"
    kv["bf16"]["calib"].save(path)
    data = bytearray(path.read_bytes())
    with pytest.raises(CalibrationError, match="does not exist"):
        load_calibration(tmp_path / "missing.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    data[-100] ^= 1  # a bit in the last tensor
    corrupt.write_bytes(bytes(data))
    with pytest.raises(CalibrationError, match="corrupt"):
        load_calibration(corrupt)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CalibrationError, match="not a readable"):
        load_calibration(truncated)
    with pytest.raises(CalibrationError, match="no parameters"):
        LinearGaussianPredictor(cal.calibrate(kv["bf16"]["seqs"], model="m", layout=kv["layout"], kv_dtype="bf16",
                                              names=["static"], residual=(), progress=False), "context")


def test_cli_calibrate_compress_decompress(model_dir, tmp_path):
    """dump-kv -> calibrate -> compress --calib -> decompress --calib, bit-exact; and a
    different calibration is refused with a clear message."""
    from sglang_speckv.cli import main

    calib_text, held_text = str(TEXT / "calibration.txt"), str(TEXT / "heldout.txt")
    calib, other = tmp_path / "calib.safetensors", tmp_path / "other.safetensors"
    common = ["--model", str(model_dir), "--kv-dtype", "fp8_e4m3", "--seq-len", "96", "--predictors", "static_rope", "context"]
    assert main(["calibrate", "--text", calib_text, "--out", str(calib), "--max-tokens", "192", *common]) == 0
    assert main(["calibrate", "--text", held_text, "--out", str(other), "--max-tokens", "192", *common]) == 0
    dump, blob, back = tmp_path / "kv.safetensors", tmp_path / "kv.speckv", tmp_path / "back.safetensors"
    assert main(["dump-kv", "--model", str(model_dir), "--text", held_text, "--out", str(dump), "--max-tokens", "24",
                 "--kv-dtype", "fp8_e4m3", "--scales-from", str(calib)]) == 0
    assert main(["compress", str(dump), "--out", str(blob), "--calib", f"{calib}:static_rope"]) == 0
    assert main(["decompress", str(blob), "--out", str(back), "--calib", str(calib)]) == 0  # picks the blob's predictor
    a, b = dump_kv.KVDump.load(dump), dump_kv.KVDump.load(back)
    assert torch.equal(a.k.view(torch.uint8), b.k.view(torch.uint8)) and torch.equal(a.v.view(torch.uint8), b.v.view(torch.uint8))
    assert torch.equal(a.scale, load_calibration(calib).fp8_scale)
    assert main(["decompress", str(blob), "--out", str(tmp_path / "x.safetensors"), "--calib", str(other)]) == 2


def test_specs_are_consistent():
    ids = [spec.id for spec in SPECS.values()]
    assert len(set(ids)) == len(ids) and 1 not in ids  # 1 is page_stats
    for spec in SPECS.values():
        assert all(o < 0 for o in spec.k_from_k + spec.v_from_v), "a source must decode before its target"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: CPU/GPU bit-identity of predictions not checked")
@pytest.mark.parametrize("kv_dtype", DTYPES)
def test_same_bits_on_gpu(kv, kv_dtype):
    """Invariant 3: (mu, sigma) computed on CUDA equal the CPU ones bit for bit, and a blob
    encoded on the CPU decodes on the GPU."""
    pred = LinearGaussianPredictor(kv[kv_dtype]["calib"], "context")
    page, meta = pages_of(kv[kv_dtype]["held"], 16)[0]
    cpu = _predict_all(pred, page, meta)
    gpu = _predict_all(pred, page.cuda(), meta)
    for (m1, s1), (m2, s2) in zip(cpu, gpu):
        assert torch.equal(m1.view(torch.int32), m2.cpu().view(torch.int32))
        assert torch.equal(s1.view(torch.int32), s2.cpu().view(torch.int32))
    blobs = codec.encode_pages([page], [meta], pred, w_wide=pred.w_wide, kappa=pred.kappa)
    (out,), (err,) = codec.decode_pages(blobs, pred, metas=[meta], device="cuda")
    assert err is None and torch.equal(out.cpu().view(torch.uint8), page.view(torch.uint8))
