"""The torch reference rANS coder (kernels/rans_reference.py): round trips over lane
layouts, staged decoding, the exact symbol search, and corrupt streams."""

import pytest
import torch

from sglang_speckv.kernels import entropy_model as em
from sglang_speckv.kernels import rans_reference as rr


def model_symbols(num_pages, n, dtype, seed, garbage=False):
    """Keys drawn near a Gaussian model (plus outliers), their params and (cum, freq)."""
    g = torch.Generator().manual_seed(seed)
    scale = 16.0 if dtype.startswith("fp8") else 1.0
    mu = torch.randn(num_pages, n, generator=g) * scale
    sigma = (torch.rand(num_pages, n, generator=g) + 0.05) * scale
    x = mu + sigma * torch.randn(num_pages, n, generator=g)
    keys = em.keys_from_bits(em.storage_bits(x.to(em.TORCH_DTYPES[dtype])), dtype)
    outliers = torch.rand(num_pages, n, generator=g) < 0.05  # any pattern at all
    keys = torch.where(outliers, torch.randint(0, 1 << em.symbol_bits(dtype), keys.shape, generator=g), keys)
    if garbage:
        sigma[:, ::3] = torch.tensor([0.0, float("nan"), float("inf"), -1.0, 1e-45, 3e38]).repeat(n)[: sigma[:, ::3].shape[1]]
        mu[:, ::5] = torch.tensor([float("nan"), float("inf"), float("-inf"), 1e38]).repeat(n)[: mu[:, ::5].shape[1]]
    mu_q, e, r = em.quantize_params(mu, sigma)
    cum = em.cdf(keys, mu_q, e, r, dtype)
    freq = em.cdf(keys + 1, mu_q, e, r, dtype) - cum
    return keys, (mu_q, e, r), cum, freq


def decode_all(words, lane_words, n, dtype, params, cuts=()):
    dec = rr.Decoder(words, lane_words, n, dtype)
    bounds = [0, *cuts, n]
    parts = [dec.decode(*(p[:, a:b] for p in params)) for a, b in zip(bounds, bounds[1:])]
    return torch.cat(parts, dim=1), dec.finish()


@pytest.mark.parametrize(
    "num_pages,n,num_lanes",
    [(1, 1, 1), (1, 100, 1), (2, 10, 3), (3, 1000, 7), (1, 5, 8), (2, 999, 1000), (4, 4096, 64)],
)
@pytest.mark.parametrize("dtype", ["bf16", "fp8_e4m3"])
def test_round_trip_lane_layouts(num_pages, n, num_lanes, dtype):
    keys, params, cum, freq = model_symbols(num_pages, n, dtype, seed=n)
    words, lane_words = rr.encode(cum, freq, num_lanes)
    assert lane_words.shape == (num_pages, num_lanes) and int(lane_words.sum()) == words.numel()
    assert int(lane_words.min()) >= 2 and 0 <= int(words.min()) and int(words.max()) < 1 << 32
    got, ok = decode_all(words, lane_words, n, dtype, params)
    assert torch.equal(got, keys) and bool(ok.all())


@pytest.mark.parametrize("dtype", ["fp16", "fp8_e5m2"])
def test_round_trip_garbage_params(dtype):
    keys, params, cum, freq = model_symbols(2, 3000, dtype, seed=1, garbage=True)
    words, lane_words = rr.encode(cum, freq, 16)
    got, ok = decode_all(words, lane_words, 3000, dtype, params)
    assert torch.equal(got, keys) and bool(ok.all())


def test_staged_decode_equals_one_shot():
    n, num_lanes = 2000, 24
    keys, params, cum, freq = model_symbols(3, n, "bf16", seed=2)
    words, lane_words = rr.encode(cum, freq, num_lanes)
    one, ok1 = decode_all(words, lane_words, n, "bf16", params)
    # stages cut mid-step, a stage shorter than a step, one symbol long, and exactly aligned
    staged, ok2 = decode_all(words, lane_words, n, "bf16", params, cuts=(5, 6, 24, 48, 500, 1013))
    assert torch.equal(one, keys) and torch.equal(staged, keys) and bool(ok1.all() and ok2.all())


def test_single_page_1d_interface():
    keys, params, cum, freq = model_symbols(1, 300, "fp8_e4m3", seed=3)
    words, lane_words = rr.encode(cum[0], freq[0], 5)
    dec = rr.Decoder(words, lane_words[0], 300, "fp8_e4m3")
    got = dec.decode(*(p[0] for p in params))
    assert got.shape == (300,) and torch.equal(got, keys[0]) and bool(dec.finish().all())


def test_extreme_frequencies():
    """freq = 1 (floor-only symbols) and the largest possible freq, back to back."""
    n = 500
    freq = torch.where(torch.arange(n) % 2 == 0, 1, em.M - (1 << 16) + 1).to(torch.int64)
    cum = torch.where(freq == 1, torch.tensor(em.M - 1), torch.tensor(0))
    words, lane_words = rr.encode(cum, freq, 3)
    assert int(lane_words.min()) >= 2
    # decode by hand with the state update (the model-free half of the decoder)
    dec = rr.Decoder(words, lane_words, n, "bf16")
    x, ptr = dec.x.clone(), dec.ptr.clone()
    for i in range(n):
        lane = i % 3
        slot = int(x[lane]) & (em.M - 1)
        assert cum[i] <= slot < cum[i] + freq[i]
        x[lane] = int(freq[i]) * (int(x[lane]) >> em.PROB_BITS) + slot - int(cum[i])
        if x[lane] < rr.RANS_L:
            x[lane] = (int(x[lane]) << 32) | int(words[ptr[lane]])
            ptr[lane] += 1
    assert bool((x == rr.RANS_L).all()) and torch.equal(ptr, dec.end)


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp8_e4m3", "fp8_e5m2"])
def test_search_is_exact_for_any_slot(dtype):
    """Guess + window + fallback finds the unique k with C(k) <= slot < C(k+1) for slots
    all over [0, M), including the floor-only keys and garbage parameters."""
    b = em.symbol_bits(dtype)
    g = torch.Generator().manual_seed(4)
    mu = torch.tensor([0.0, 0.3, -2.0, float("nan"), 1e30, 0.0, 5.0], dtype=torch.float32)
    sigma = torch.tensor([1.0, 0.01, 3.0, 1.0, 1.0, 0.0, float("inf")], dtype=torch.float32)
    mu_q, e, r = em.quantize_params(mu, sigma)
    all_keys = torch.arange((1 << b) + 1)
    dec = rr.Decoder(torch.zeros(2, dtype=torch.int64), torch.tensor([[2]]), 1, dtype)
    for j in range(len(mu)):
        table = em.cdf(all_keys, mu_q[j], e[j], r[j], dtype)  # [2^B + 1]
        # first and last slots of every fp8 key and of 3000 random 16-bit keys, random slots
        some = torch.randperm(1 << b, generator=g)[:3000]
        slots = torch.cat([table[some], table[some + 1] - 1, torch.randint(0, em.M, (3000,), generator=g)])
        expect = torch.searchsorted(table, slots, right=True) - 1
        lanes = slots.numel()
        params = [p.expand(lanes).clone() for p in em.prepare(mu_q[j : j + 1], e[j : j + 1], r[j : j + 1])]
        mu_f = (mu_q[j].double() * em.pow2_f64(e[j] - em.F)).expand(lanes)
        sig_f = (r[j].double() * em.pow2_f64(e[j] - em.R - em.T_BITS)).expand(lanes)
        guide = [mu_f, sig_f, rr._nearest_key(mu_f, dtype)]
        k, c_lo, c_hi = dec._guess_and_check(slots, params, guide)
        assert torch.equal(k, expect), f"param set {j}"
        assert torch.equal(c_lo, table[expect]) and torch.equal(c_hi, table[expect + 1])


def test_corrupt_streams_fail_finish():
    """rANS itself has no error detection: a flipped bit can move a slot from one
    frequency-1 key to another and leave the state intact. finish() catches nearly all
    flips; the rest decode to different symbols, which the codec's page checksum catches."""
    n, num_lanes = 600, 30
    keys, params, cum, freq = model_symbols(1, n, "bf16", seed=5)
    words, lane_words = rr.encode(cum, freq, num_lanes)
    g = torch.Generator().manual_seed(6)
    flagged = 0
    for _ in range(20):
        bad = words.clone()
        i = int(torch.randint(0, words.numel(), (1,), generator=g))
        bad[i] ^= 1 << int(torch.randint(0, 32, (1,), generator=g))
        got, ok = decode_all(bad, lane_words, n, "bf16", params)
        assert not bool(ok.all()) or not torch.equal(got, keys)
        flagged += not bool(ok.all())
    assert flagged >= 15
    # a lane table that moves words between lanes, and an invalid initial state
    shifted = lane_words.clone()
    shifted[0, 0] += 1
    shifted[0, 1] -= 1
    assert not bool(decode_all(words, shifted, n, "bf16", params)[1].all())
    high = words.clone()
    high[1] = 0xFFFFFFFF  # first lane's state >= 2^63: rejected, no overflow
    assert not bool(decode_all(high, lane_words, n, "bf16", params)[1].all())


def test_decoder_argument_errors():
    keys, params, cum, freq = model_symbols(1, 50, "bf16", seed=7)
    words, lane_words = rr.encode(cum, freq, 2)
    with pytest.raises(ValueError):
        rr.Decoder(words[:-1], lane_words, 50, "bf16")  # table does not cover the words
    dec = rr.Decoder(words, lane_words, 50, "bf16")
    with pytest.raises(ValueError):
        dec.decode(*(torch.cat([p, p], dim=1) for p in params))  # more symbols than the page
    with pytest.raises(ValueError):
        dec.finish()  # before the last symbol
    with pytest.raises(ValueError):
        rr.encode(cum, freq, 0)
