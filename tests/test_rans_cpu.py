"""The C++ CPU coder (kernels/rans_cpu.py + rans_cpu.cpp) against the torch reference, bit
for bit: cdf integers, encoded words and lane tables, decoded keys, lane states and finish
verdicts, over all four dtypes, adversarial pages and parameters, ragged and empty lane
layouts, stages cut mid-step and corrupt streams; and the fallback to the reference when the
extension cannot be built. The first test in a fresh environment compiles the extension
(~40 s, once; cached under the torch extensions directory)."""

import logging
import threading

import pytest
import torch

from sglang_speckv.kernels import entropy_model as em
from sglang_speckv.kernels import page_hash
from sglang_speckv.kernels import rans_cpu as rc
from sglang_speckv.kernels import rans_reference as rr
from sglang_speckv.kernels import table_model as tm

DTYPES = ["bf16", "fp16", "fp8_e4m3", "fp8_e5m2"]


@pytest.fixture(scope="module", autouse=True)
def built():
    """The extension must build here (gcc and ninja are test requirements): a fallback
    would make every comparison below compare the reference with itself."""
    assert rc.available(), "the C++ coder did not build: see the warning logged above"


def params_for(mu, sigma):
    return em.quantize_params(mu.to(torch.float32), sigma.to(torch.float32))


def adversarial_page(dtype, num_pages, n, seed):
    """Keys of every kind (random patterns incl. NaN payloads, +-inf, +-0, subnormals, and
    model-typical values) under parameters that include garbage mu/sigma."""
    keys, mu, sigma = adversarial_inputs(dtype, num_pages, n, seed)
    mu_q, e, r = params_for(mu, sigma)
    cum = em.cdf(keys, mu_q, e, r, dtype)
    freq = em.cdf(keys + 1, mu_q, e, r, dtype) - cum
    return keys, (mu_q, e, r), cum, freq


def adversarial_inputs(dtype, num_pages, n, seed):
    """(keys int64, mu, sigma float32) [P, n] of adversarial_page."""
    g = torch.Generator().manual_seed(seed)
    b = em.symbol_bits(dtype)
    scale = 16.0 if dtype.startswith("fp8") else 1.0
    mu = torch.randn(num_pages, n, generator=g) * scale
    sigma = (torch.rand(num_pages, n, generator=g) + 0.05) * scale
    values = (mu + sigma * torch.randn(num_pages, n, generator=g)).to(em.TORCH_DTYPES[dtype])
    keys = em.keys_from_bits(em.storage_bits(values), dtype)
    any_pattern = torch.randint(0, 1 << b, keys.shape, generator=g)
    keys = torch.where(torch.rand(num_pages, n, generator=g) < 0.2, any_pattern, keys)
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, -1e-40])
    special_keys = em.keys_from_bits(em.storage_bits(special.to(em.TORCH_DTYPES[dtype])), dtype)
    keys[:, ::11] = special_keys.repeat(n)[: keys[:, ::11].shape[1]]
    keys[:, 1::13] = (1 << b) - 1  # +NaN with the largest payload
    keys[:, 2::13] = 0  # -NaN with the largest payload
    bad_sigma = torch.tensor([0.0, float("nan"), float("inf"), -1.0, 1e-45, 3e38, 1e-30])
    bad_mu = torch.tensor([float("nan"), float("inf"), float("-inf"), 1e38, -3e38, 1e-45])
    sigma[:, ::3] = bad_sigma.repeat(n)[: sigma[:, ::3].shape[1]]
    mu[:, ::5] = bad_mu.repeat(n)[: mu[:, ::5].shape[1]]
    return keys, mu.to(torch.float32), sigma.to(torch.float32)


def storage_bits_of(keys, dtype):
    """int64 keys -> the int16 / uint8 storage patterns the value-level coders take."""
    return rr.storage_from_keys(keys, dtype).view(torch.int16 if em.symbol_bits(dtype) == 16 else torch.uint8)


def decode_values_both(words32, lane_words, n, dtype, mu, sigma, cuts=(), **coding):
    """decode_values with both coders in the same stages: same patterns, states and verdict.
    coding: w_wide, kappa, model. Returns (bits, ok)."""
    bounds = [0, *cuts, n]
    outs = []
    for cls in (rr.Decoder, rc.Decoder):
        dec = cls(words32, lane_words, n, dtype, **coding)
        bits = torch.zeros((mu.shape[0], n), dtype=torch.int16 if em.symbol_bits(dtype) == 16 else torch.uint8)
        for a, b in zip(bounds, bounds[1:]):
            dec.decode_values(mu[:, a:b].contiguous(), sigma[:, a:b].contiguous(), bits)
        outs.append((bits, dec.x.clone(), dec.ptr.clone(), dec.lane_ok.clone(), dec.finish()))
    for got_ref, got in zip(*outs):
        assert torch.equal(got, got_ref)
    return outs[1][0], outs[1][4]


@pytest.mark.parametrize("dtype", DTYPES)
def test_value_level_coder_bit_identical(dtype):
    """encode_values (quantize_params, C and the rANS step fused in C++) writes the bytes of
    the reference's integer path; decode_values returns every pattern."""
    n, num_lanes = 3001, 17
    keys, mu, sigma = adversarial_inputs(dtype, 3, n, seed=11)
    bits = storage_bits_of(keys, dtype)
    mu_q, e, r = params_for(mu, sigma)
    cum = em.cdf(keys, mu_q, e, r, dtype)
    words, lane_words = rr.encode(cum, em.cdf(keys + 1, mu_q, e, r, dtype) - cum, num_lanes)
    for encode_values in (rr.encode_values, rc.encode_values):
        got, got_lanes = encode_values(bits, mu, sigma, dtype, num_lanes)
        assert got.dtype == torch.int32 and torch.equal(got, rr.as_u32(words)) and torch.equal(got_lanes, lane_words)
        # one tensor per page (the codec's call: each page's own memory, read in place)
        pages = [bits[i].clone() for i in range(len(bits))]
        got, got_lanes = encode_values(pages, list(mu), list(sigma), dtype, num_lanes)
        assert torch.equal(got, rr.as_u32(words)) and torch.equal(got_lanes, lane_words)
    with pytest.raises(ValueError, match="one \\[N\\] tensor per page"):
        rc.encode_values([bits[0], bits[1][:-1]], mu[:2], sigma[:2], dtype, num_lanes)
    out, ok = decode_values_both(rr.as_u32(words), lane_words, n, dtype, mu, sigma, cuts=(5, 1000, 1001))
    assert bool(ok.all()) and torch.equal(out, bits)
    # into one tensor per page (the codec's call on the caller's own pages), both coders
    for cls in (rr.Decoder, rc.Decoder):
        dec = cls(rr.as_u32(words), lane_words, n, dtype)
        pages = [torch.zeros(n, dtype=bits.dtype) for _ in range(len(bits))]
        dec.decode_values(mu[:, :1000].contiguous(), sigma[:, :1000].contiguous(), pages)
        dec.decode_values(mu[:, 1000:].contiguous(), sigma[:, 1000:].contiguous(), pages)
        assert bool(dec.finish().all()) and torch.equal(torch.stack(pages), bits)
        with pytest.raises(ValueError, match="pages of"):
            cls(rr.as_u32(words), lane_words, n, dtype).decode_values(mu, sigma, pages[:-1])
    wrong_width = [torch.zeros(n, dtype=torch.uint8 if bits.dtype == torch.int16 else torch.int16) for _ in bits]
    with pytest.raises(RuntimeError, match="out_bits must be int16 for 16-bit dtypes"):
        rc.Decoder(rr.as_u32(words), lane_words, n, dtype).decode_values(mu, sigma, wrong_width)


@pytest.mark.parametrize("dtype,model", [("bf16", tm.MODEL_TABLE), ("fp8_e4m3", tm.MODEL_EXACT)])
def test_decode_reads_prediction_rows_in_place(dtype, model):
    """A decoder stage takes each page's (mu, sigma) as the predictor's rows (broadcast over
    tokens, as page_stats gives them; strided) and reads them in place, as the encoder does:
    same patterns and verdicts as from [P, n] tensors, for both models, with stages cut
    mid-row and mid-step."""
    g = torch.Generator().manual_seed(5)
    rows, tokens, channels, num_lanes = 3, 5, 7, 4
    n = rows * tokens * channels
    mu = [torch.randn(rows, 1, channels, generator=g).expand(rows, tokens, channels) for _ in range(2)]
    sigma = [torch.rand(rows, 2 * channels, generator=g)[:, ::2, None].transpose(1, 2).expand(rows, tokens, channels) + 0.1
             for _ in range(2)]  # fmt: skip
    values = torch.stack([m + s * torch.randn(m.shape, generator=g) for m, s in zip(mu, sigma)]).reshape(2, n)
    bits = values.to(em.TORCH_DTYPES[dtype]).view(torch.int16 if dtype == "bf16" else torch.uint8)
    words, lane_words = rc.encode_values(bits, mu, sigma, dtype, num_lanes, model=model)
    flat = [torch.stack([t.reshape(-1) for t in ts]) for ts in (mu, sigma)]  # [P, n]
    for cls in (rr.Decoder, rc.Decoder):
        dec = cls(words, lane_words, n, dtype, model=model)
        out = torch.zeros_like(bits)
        for a, b in ((0, 40), (40, 41), (41, n)):  # a row is 35 symbols, a step 4
            dec.decode_values([t.reshape(-1)[a:b] for t in mu], [t.reshape(-1)[a:b] for t in sigma], out)
        assert bool(dec.finish().all()) and torch.equal(out, bits)
    # rows of a stage: [R, T, C] views starting mid-page, read in place
    dec = rc.Decoder(words, lane_words, n, dtype, model=model)
    out = torch.zeros_like(bits)
    dec.decode_values(flat[0][:, :35], flat[1][:, :35], out)
    dec.decode_values([t[1:] for t in mu], [t[1:] for t in sigma], out)
    assert bool(dec.finish().all()) and torch.equal(out, bits)


SENTINEL = 0x5A  # every byte of a host buffer before a decode into its pages


def host_pages(layout, shape, dtype, num_pages):
    """num_pages strided views [2, L, T, H, D] (shape) of a larger sentinel-filled buffer laid
    out like SGLang's host pools (sglang/geometry.py), one free page between them, and the
    buffer: layer_first [2, L, size, H, D], page_first [2, size, L, H, D] (tokens outermost
    but one), page_head [2, pages, H, T, L, D] (layers and heads swapped)."""
    kv, layers, t, heads, dim = shape
    size = 2 * num_pages * t
    own = {"layer_first": (kv, layers, size, heads, dim), "page_first": (kv, size, layers, heads, dim),
           "page_head": (kv, 2 * num_pages, heads, t, layers, dim)}[layout]
    storage = torch.int16 if em.symbol_bits(dtype) == 16 else torch.uint8
    buffer = torch.full((torch.Size(own).numel() * storage.itemsize,), SENTINEL, dtype=torch.uint8).view(storage).view(own)
    views = {"layer_first": lambda s: buffer[:, :, s * t:(s + 1) * t],
             "page_first": lambda s: buffer[:, s * t:(s + 1) * t].permute(0, 2, 1, 3, 4),
             "page_head": lambda s: buffer[:, s].permute(0, 3, 2, 1, 4)}[layout]
    return [views(2 * i + 1) for i in range(num_pages)], buffer


@pytest.mark.parametrize("dtype, model", [("bf16", tm.MODEL_TABLE), ("fp8_e4m3", tm.MODEL_EXACT)])
@pytest.mark.parametrize("num_lanes", [7, 70])  # one block of lanes per page, two (LANE_BLOCK 64)
def test_value_level_decode_into_strided_pages(dtype, model, num_lanes):
    """Both coders' decode_values write each symbol into its element of out pages of any
    strides (pages of SGLang's host layouts): the contiguous decode's patterns, and no other
    byte of the buffer; stages cut mid-step. A page that overlaps itself is refused."""
    shape = (2, 3, 5, 2, 7)
    n = torch.Size(shape).numel()
    keys, mu, sigma = adversarial_inputs(dtype, 3, n, seed=5)
    bits = storage_bits_of(keys, dtype)
    words, lane_words = rc.encode_values(bits, mu, sigma, dtype, num_lanes, model=model)
    coders = [(layout, rc.Decoder) for layout in ("layer_first", "page_first", "page_head")]
    coders.append(("page_head", rr.Decoder))  # the (slow) reference once: it writes through the same views
    for layout, cls in coders:
        pages, buffer = host_pages(layout, shape, dtype, len(bits))
        assert not any(page.is_contiguous() for page in pages)
        dec = cls(words, lane_words, n, dtype, model=model)
        for a, b in ((0, 100), (100, 101), (101, n)):
            dec.decode_values(mu[:, a:b].contiguous(), sigma[:, a:b].contiguous(), pages)
        assert bool(dec.finish().all())
        for page, want in zip(pages, bits):
            assert torch.equal(page.reshape(-1), want)
            page.view(torch.uint8).fill_(SENTINEL)
        assert bool((buffer.view(torch.uint8) == SENTINEL).all()), f"{layout}: wrote outside the pages"
    broadcast = [torch.zeros(1, dtype=bits.dtype).expand(n)] * len(bits)
    for cls in (rr.Decoder, rc.Decoder):
        with pytest.raises(ValueError, match="no stride 0"):
            cls(words, lane_words, n, dtype, model=model).decode_values(mu, sigma, broadcast)


@pytest.mark.parametrize("dtype", ["bf16", "fp8_e4m3"])
def test_value_level_corrupt_streams_same_verdict(dtype):
    n, num_lanes = 600, 30
    keys, mu, sigma = adversarial_inputs(dtype, 2, n, seed=7)
    words, lane_words = rc.encode_values(storage_bits_of(keys, dtype), mu, sigma, dtype, num_lanes)
    g = torch.Generator().manual_seed(8)
    for _ in range(6):
        bad = words.clone()
        i = int(torch.randint(0, words.numel(), (1,), generator=g))
        bad[i] ^= 1 << int(torch.randint(0, 31, (1,), generator=g))
        decode_values_both(bad, lane_words, n, dtype, mu, sigma)
    noise = rr.as_u32(torch.randint(0, 1 << 32, words.shape, generator=g))
    assert not bool(decode_values_both(noise, lane_words, n, dtype, mu, sigma)[1].any())


# ---- The table model (kernels/table_model.py): the reference's bytes, patterns and verdicts ----

TABLE = tm.MODEL_TABLE
# (mu, sigma) scenes for the table model's edges: mu saturated with a tiny sigma, sigma beyond
# SIGMA_MAX (the garbage sigmas of adversarial_inputs add zero cells whose points truncate
# beyond the largest finite value), the largest values (for fp16 the cells above its largest
# binade belong to no key), subnormals (too sparse for the table, and dense enough for it:
# bf16 at 3e-39, fp16 at 1e-6), a sigma far below mu's spacing (not dense), and an ordinary
# one; each with values at Z sigma from mu: in a cell, beyond the +-TJ cells (escapes), far
# out.
SCENES = [(1e30, 1e-30), (3.389e38, 1e37), (-3.38e38, 1e37), (0.0, 1e-40), (1e-39, 3e-39), (65500.0, 1100.0),
          (-65400.0, 30.0), (0.0, 1e-6), (2.0, 1e-3), (0.0, 1.0)]  # fmt: skip
Z = [0.0, 0.4, 0.9, -0.9, 5.0, -3.0, 20.0, -40.0, 1000.0, -1e6]


def table_inputs(dtype, num_pages, n, seed):
    """adversarial_inputs (every kind of pattern, garbage mu and sigma), with every 7th
    symbol from one of the SCENES at one of the Z offsets."""
    keys, mu, sigma = adversarial_inputs(dtype, num_pages, n, seed)
    i = torch.arange(mu[:, 4::7].shape[1])
    scene = torch.tensor(SCENES)[i % len(SCENES)]
    z = torch.tensor(Z)[i // len(SCENES) % len(Z)]
    mu[:, 4::7], sigma[:, 4::7] = scene[:, 0], scene[:, 1]
    values = (scene[:, 0] + scene[:, 1] * z).to(em.TORCH_DTYPES[dtype])
    keys[:, 4::7] = em.keys_from_bits(em.storage_bits(values), dtype)
    return keys, mu, sigma


def gaussian_inputs(dtype, num_pages, n, seed):
    """(keys, mu, sigma) of values drawn around (mu, sigma): the table model's cells."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(num_pages, n, generator=g) * 4
    sigma = torch.rand(num_pages, n, generator=g) * 2 + 0.01
    values = (mu + sigma * torch.randn(num_pages, n, generator=g)).to(em.TORCH_DTYPES[dtype])
    return em.keys_from_bits(em.storage_bits(values), dtype), mu, sigma


def table_both(dtype, keys, mu, sigma, num_lanes, cuts=(), **mixture):
    """Encode with both coders under the table model (same words and lane table), decode
    with both in the given stages (same patterns, values, states, verdicts: each decoder
    reads the other's words). Returns (bits, words, lane_words, ok)."""
    bits = storage_bits_of(keys, dtype)
    words_ref, lanes_ref = rr.encode_values(bits, mu, sigma, dtype, num_lanes, model=TABLE, **mixture)
    words, lane_words = rc.encode_values(bits, mu, sigma, dtype, num_lanes, model=TABLE, **mixture)
    assert words.dtype == torch.int32 and torch.equal(words, words_ref) and torch.equal(lane_words, lanes_ref)
    out, ok = decode_values_both(words, lane_words, keys.shape[1], dtype, mu, sigma, cuts, model=TABLE, **mixture)
    return bits, out, words, lane_words, ok


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize(
    "num_pages,n,num_lanes,cuts",
    [(1, 1, 1, ()), (2, 10, 3, (4,)), (3, 3001, 17, (5, 1000, 1001)), (2, 999, 1000, (500,)), (2, 0, 4, ()),
     (1, 700, 64, (1, 63, 64, 64, 129))],
)  # fmt: skip
def test_table_model_hostile_pages_bit_identical(dtype, num_pages, n, num_lanes, cuts):
    """NaN payloads, +-inf, -0, subnormals, the largest values, escapes, garbage (mu,
    sigma); ragged lanes, more lanes than symbols, empty pages, stages cut mid-step."""
    keys, mu, sigma = table_inputs(dtype, num_pages, n, seed=n + num_lanes)
    bits, out, _, _, ok = table_both(dtype, keys, mu, sigma, num_lanes, cuts)
    assert bool(ok.all()) and torch.equal(out, bits)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("w_wide,kappa", [(em.W_WIDE, em.KAPPA), (0, 0), (255, em.KAPPA_MAX)])
def test_table_model_gaussian_pages_bit_identical(dtype, w_wide, kappa):
    keys, mu, sigma = gaussian_inputs(dtype, 2, 4000, seed=w_wide + kappa)
    bits, out, words, _, ok = table_both(dtype, keys, mu, sigma, 32, (1234,), w_wide=w_wide, kappa=kappa)
    assert bool(ok.all()) and torch.equal(out, bits)
    exact, _ = rc.encode_values(bits, mu, sigma, dtype, 32, w_wide, kappa)
    assert not torch.equal(words, exact)  # the model argument reaches the C++


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("inputs", [table_inputs, gaussian_inputs])
def test_table_model_corrupt_streams_same_verdict(dtype, inputs):
    """Flipped bits, truncated and shifted lanes, random words, no words: the same states,
    lane verdicts (cells that hold no key) and page verdicts as the reference; never a crash."""
    n, num_lanes = 600, 30
    keys, mu, sigma = inputs(dtype, 2, n, seed=7)
    words, lane_words = rc.encode_values(storage_bits_of(keys, dtype), mu, sigma, dtype, num_lanes, model=TABLE)
    g = torch.Generator().manual_seed(8)
    for _ in range(8):
        bad = words.clone()
        i = int(torch.randint(0, words.numel(), (1,), generator=g))
        bad[i] ^= 1 << int(torch.randint(0, 32, (1,), generator=g))
        decode_values_both(bad, lane_words, n, dtype, mu, sigma, (n // 2,), model=TABLE)
    shifted = lane_words.clone()
    shifted[0, 0] += 1
    shifted[0, 1] -= 1
    assert not bool(decode_values_both(words, shifted, n, dtype, mu, sigma, model=TABLE)[1][0])
    short = lane_words.clone()
    short[1, -1] -= 1  # the last lane's last word missing: reads past the stream's end
    assert not bool(decode_values_both(words[:-1], short, n, dtype, mu, sigma, model=TABLE)[1][1])
    noise = rr.as_u32(torch.randint(0, 1 << 32, words.shape, generator=g))
    assert not bool(decode_values_both(noise, lane_words, n, dtype, mu, sigma, model=TABLE)[1].any())
    if dtype == "fp16":  # cells beyond fp16's largest value belong to no key: the guard fires
        near_max = (torch.full((2, n), 65500.0), torch.full((2, n), 1100.0))
        _, ok = decode_values_both(noise, lane_words, n, dtype, *near_max, model=TABLE)
        dec = rc.Decoder(noise, lane_words, n, dtype, model=TABLE)
        dec.decode_values(*near_max, torch.zeros((2, n), dtype=torch.int16))
        assert not bool(ok.any()) and not bool(dec.lane_ok.all())
    empty = torch.zeros((2, num_lanes), dtype=torch.int64)  # no words at all
    assert not bool(decode_values_both(torch.zeros(0, dtype=torch.int32), empty, n, dtype, mu, sigma, model=TABLE)[1].any())


def test_table_model_arguments():
    """Unknown models and 8-bit dtypes are refused; the integer-level decode of a table
    stream (the reference's) returns its keys."""
    keys, mu, sigma = table_inputs("bf16", 1, 50, seed=3)
    bits = storage_bits_of(keys, "bf16")
    with pytest.raises(ValueError, match="unknown entropy model"):
        rc.encode_values(bits, mu, sigma, "bf16", 2, model="tables")
    with pytest.raises(ValueError, match="16-bit"):
        rc.encode_values(bits.to(torch.uint8), mu, sigma, "fp8_e4m3", 2, model=TABLE)
    words, lane_words = rc.encode_values(bits, mu, sigma, "bf16", 2, model=TABLE)
    with pytest.raises(ValueError, match="unknown entropy model"):
        rc.Decoder(words, lane_words, 50, "bf16", model="tables")
    dec = rc.Decoder(words, lane_words, 50, "bf16", model=TABLE)
    assert torch.equal(dec.decode(*params_for(mu, sigma)), keys) and bool(dec.finish().all())


def decode_both(words, lane_words, n, dtype, params, cuts=()):
    """Decode with both coders in the same stages; assert same keys, states and verdict."""
    decoders = [rr.Decoder(words, lane_words, n, dtype), rc.Decoder(words, lane_words, n, dtype)]
    bounds = [0, *cuts, n]
    outs = []
    for dec in decoders:
        parts = [dec.decode(*(p[:, a:b] for p in params)) for a, b in zip(bounds, bounds[1:])]
        outs.append((torch.cat(parts, dim=1), dec.x.clone(), dec.ptr.clone(), dec.finish()))
    for got_ref, got in zip(*outs):
        assert torch.equal(got, got_ref)
    return outs[1][0], outs[1][3]


@pytest.mark.parametrize("dtype", DTYPES)
def test_cdf_every_key(dtype):
    """C(k) at every key in [0, 2^B] under ordinary and garbage parameters."""
    b = em.symbol_bits(dtype)
    mu = torch.tensor([0.0, 0.3, -2.0, float("nan"), 1e30, 0.0, 5.0, float("-inf"), 448.0])
    sigma = torch.tensor([1.0, 0.01, 3.0, 1.0, 1.0, 0.0, float("inf"), float("nan"), 1e-3])
    mu_q, e, r = params_for(mu, sigma)
    keys = torch.arange((1 << b) + 1)[None, :]  # [1, 2^B + 1]
    params = [p[:, None] for p in (mu_q, e, r)]  # [9, 1]
    for w_wide, kappa in ((em.W_WIDE, em.KAPPA), (0, 0), (255, em.KAPPA_MAX)):
        expect = em.cdf(keys, *params, dtype, w_wide, kappa)
        assert torch.equal(rc.cdf(keys, *params, dtype, w_wide, kappa), expect)


@pytest.mark.parametrize("dtype", DTYPES)
def test_adversarial_pages_bit_identical(dtype):
    keys, params, cum, freq = adversarial_page(dtype, 3, 3000, seed=1)
    assert torch.equal(rc.cdf(keys, *params, dtype), cum)
    words_ref, lanes_ref = rr.encode(cum, freq, 16)
    words, lane_words = rc.encode(cum, freq, 16)
    assert torch.equal(words, words_ref) and torch.equal(lane_words, lanes_ref)
    got, ok = decode_both(words, lane_words, 3000, dtype, params, cuts=(7, 1500, 1501))
    assert torch.equal(got, keys) and bool(ok.all())


@pytest.mark.parametrize(
    "num_pages,n,num_lanes",
    [(1, 1, 1), (1, 100, 1), (2, 10, 3), (3, 1000, 7), (1, 5, 8), (2, 999, 1000), (4, 4096, 64), (2, 0, 4)],
)
def test_lane_layouts(num_pages, n, num_lanes):
    """Ragged last steps, more lanes than symbols, and empty pages (flush words only)."""
    keys, params, cum, freq = adversarial_page("bf16", num_pages, n, seed=n + num_lanes)
    words_ref, lanes_ref = rr.encode(cum, freq, num_lanes)
    words, lane_words = rc.encode(cum, freq, num_lanes)
    assert torch.equal(words, words_ref) and torch.equal(lane_words, lanes_ref)
    got, ok = decode_both(words, lane_words, n, "bf16", params)
    assert torch.equal(got, keys) and bool(ok.all())


def test_staged_decode_cuts_mid_step():
    n, num_lanes = 2000, 24
    keys, params, cum, freq = adversarial_page("fp8_e4m3", 3, n, seed=2)
    words, lane_words = rc.encode(cum, freq, num_lanes)
    # stages cut mid-step, shorter than a step, one symbol long, empty, and exactly aligned
    got, ok = decode_both(words, lane_words, n, "fp8_e4m3", params, cuts=(5, 6, 6, 24, 48, 500, 1013))
    assert torch.equal(got, keys) and bool(ok.all())


def test_single_page_1d_interface():
    keys, params, cum, freq = adversarial_page("fp16", 1, 300, seed=3)
    words, lane_words = rc.encode(cum[0], freq[0], 5)
    assert torch.equal(words, rr.encode(cum[0], freq[0], 5)[0])
    dec = rc.Decoder(words, lane_words[0], 300, "fp16")
    got = dec.decode(*(p[0] for p in params))
    assert got.shape == (300,) and torch.equal(got, keys[0]) and bool(dec.finish().all())


@pytest.mark.parametrize("dtype", ["bf16", "fp8_e5m2"])
def test_corrupt_streams_same_verdict(dtype):
    """Flipped bits, words moved between lanes, truncated and padded lanes (reads past a
    lane's end), invalid initial states, random words: same keys and verdicts."""
    n, num_lanes = 600, 30
    keys, params, cum, freq = adversarial_page(dtype, 2, n, seed=5)
    words, lane_words = rc.encode(cum, freq, num_lanes)
    g = torch.Generator().manual_seed(6)
    for _ in range(10):
        bad = words.clone()
        i = int(torch.randint(0, words.numel(), (1,), generator=g))
        bad[i] ^= 1 << int(torch.randint(0, 32, (1,), generator=g))
        decode_both(bad, lane_words, n, dtype, params)
    shifted = lane_words.clone()
    shifted[0, 0] += 1
    shifted[0, 1] -= 1
    assert not bool(decode_both(words, shifted, n, dtype, params)[1][0])
    short = lane_words.clone()
    short[1, -1] -= 1  # the last lane's last word missing: reads past the stream's end
    assert not bool(decode_both(words[:-1], short, n, dtype, params)[1][1])
    tiny = lane_words.clone()
    tiny[0, 3] = 1  # fewer than 2 words: no state at all
    tiny[0, 4] += lane_words[0, 3] - 1
    assert not bool(decode_both(words, tiny, n, dtype, params)[1][0])
    high = words.clone()
    high[1] = 0xFFFFFFFF  # first lane's state >= 2^63: rejected, no overflow
    assert not bool(decode_both(high, lane_words, n, dtype, params)[1][0])
    noise = torch.randint(0, 1 << 32, words.shape, generator=g)
    assert not bool(decode_both(noise, lane_words, n, dtype, params)[1].any())
    empty = torch.zeros((2, num_lanes), dtype=torch.int64)  # no words at all
    assert not bool(decode_both(torch.zeros(0, dtype=torch.int64), empty, n, dtype, params)[1].any())


def test_argument_errors():
    keys, params, cum, freq = adversarial_page("bf16", 1, 50, seed=7)
    with pytest.raises(ValueError):
        rc.encode(cum, freq, 0)
    with pytest.raises(ValueError):
        rc.encode(cum, torch.zeros_like(freq), 2)  # freq 0 is not codable
    words, lane_words = rc.encode(cum, freq, 2)
    dec = rc.Decoder(words, lane_words, 50, "bf16")
    with pytest.raises(ValueError):
        dec.decode(*(torch.cat([p, p], dim=1) for p in params))  # more symbols than the page
    with pytest.raises(ValueError):
        dec.finish()  # before the last symbol


def test_build_failure_falls_back_to_reference(monkeypatch, caplog):
    """A failing build (no compiler, say) logs one warning naming the reason; encode, cdf,
    decode and the page hash then run the reference and give its results."""

    def broken_build():
        raise RuntimeError("Error building extension: c++: not found")

    monkeypatch.setattr(rc, "_load", broken_build)
    monkeypatch.setattr(rc, "_extension", None)
    monkeypatch.setattr(rc, "_build_failed", False)
    keys, params, cum, freq = adversarial_page("fp8_e4m3", 2, 500, seed=8)
    with caplog.at_level(logging.INFO, logger=rc.__name__):
        assert torch.equal(rc.cdf(keys, *params, "fp8_e4m3"), cum)
        words, lane_words = rc.encode(cum, freq, 8)
        dec = rc.Decoder(words, lane_words, 500, "fp8_e4m3")
        got = dec.decode(*params)
        digest = rc.page_hash(keys.to(torch.uint8))
        keys16, mu, sigma = table_inputs("bf16", 2, 300, seed=8)
        bits16 = storage_bits_of(keys16, "bf16")
        table_words, table_lanes = rc.encode_values(bits16, mu, sigma, "bf16", 8, model=TABLE)
        table_dec = rc.Decoder(table_words, table_lanes, 300, "bf16", model=TABLE)
        table_out = torch.zeros_like(bits16)
        table_dec.decode_values(mu, sigma, table_out)
        assert not rc.available()
    assert torch.equal(words, rr.encode(cum, freq, 8)[0]) and torch.equal(got, keys) and bool(dec.finish().all())
    assert torch.equal(table_words, rr.encode_values(bits16, mu, sigma, "bf16", 8, model=TABLE)[0])
    assert torch.equal(table_out, bits16) and bool(table_dec.finish().all())
    assert digest == page_hash.reference(keys.to(torch.uint8))
    warnings = [rec for rec in caplog.records if rec.levelno == logging.WARNING]
    assert len(warnings) == 1 and "c++: not found" in warnings[0].getMessage()


def test_concurrent_first_use_builds_once(monkeypatch):
    built_ext = rc.extension()
    calls = []
    gate = threading.Event()

    def slow_build():
        calls.append(1)
        gate.wait(5)
        return built_ext

    monkeypatch.setattr(rc, "_load", slow_build)
    monkeypatch.setattr(rc, "_extension", None)
    results = []
    threads = [threading.Thread(target=lambda: results.append(rc.extension())) for _ in range(4)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results == [built_ext] * 4


def test_results_do_not_depend_on_thread_count():
    keys, params, cum, freq = adversarial_page("bf16", 3, 5000, seed=9)
    table_keys, mu, sigma = table_inputs("bf16", 3, 5000, seed=9)
    bits = storage_bits_of(table_keys, "bf16")
    results, hashes = [], []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            words, lane_words = rc.encode(cum, freq, 70)
            dec = rc.Decoder(words, lane_words, 5000, "bf16")
            results.append((rc.cdf(keys, *params, "bf16"), words, lane_words, dec.decode(*params), dec.finish()))
            table_words, table_lanes = rc.encode_values(bits, mu, sigma, "bf16", 70, model=TABLE)
            table_dec = rc.Decoder(table_words, table_lanes, 5000, "bf16", model=TABLE)
            out = torch.zeros_like(bits)
            table_dec.decode_values(mu, sigma, out)
            results[-1] += (table_words, table_lanes, out, table_dec.x, table_dec.finish())
            hashes.append(rc.page_hash(cum.repeat(4, 1)))  # 480 KB: 4 chunks of the C++ loop
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*results))
    assert hashes[0] == hashes[1] == page_hash.reference(cum.repeat(4, 1))
