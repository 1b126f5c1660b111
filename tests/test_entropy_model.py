"""The integer entropy model (kernels/entropy_model.py): keys, parameter quantisation, the
PHI table and C(k) on every key of every dtype, under sane and garbage parameters."""

import math

import pytest
import torch
import xxhash

from sglang_speckv.kernels import entropy_model as em

DTYPES = list(em.DTYPE_SPECS)

# (mu, sigma) pairs a broken predictor could produce, plus ordinary ones.
NASTY_PARAMS = [
    (0.0, 1.0),
    (0.3, 0.05),
    (-1e4, 1e-3),
    (float("nan"), float("nan")),
    (float("inf"), 0.0),
    (float("-inf"), -1.0),
    (1e38, 1e-38),
    (-3e38, float("inf")),
    (1e-30, 1e-45),  # subnormal sigma
    (5.0, 3e38),
]


def all_patterns(dtype):
    """Every bit pattern of the dtype as (keys [2^B], float64 values [2^B])."""
    b = em.symbol_bits(dtype)
    bits = torch.arange(1 << b, dtype=torch.int64)
    raw = (bits - ((bits >> (b - 1)) << b)).to(torch.int16) if b == 16 else bits.to(torch.uint8)
    values = raw.view(em.TORCH_DTYPES[dtype]).to(torch.float64)
    return em.keys_from_bits(bits, dtype), values


@pytest.mark.parametrize("dtype", DTYPES)
def test_keys_invert_and_sort_by_value(dtype):
    keys, values = all_patterns(dtype)
    bits = torch.arange(1 << em.symbol_bits(dtype))
    assert torch.equal(em.bits_from_keys(keys, dtype), bits)
    assert torch.equal(torch.sort(keys).values, bits)  # a permutation
    order = torch.argsort(keys)
    ordered = values[order]
    finite = ordered[~torch.isnan(ordered)]
    assert bool((finite[1:] >= finite[:-1]).all())  # key order is value order
    # NaNs sit at the two ends: negative ones first, positive ones last
    nan_pos = torch.isnan(ordered).nonzero().squeeze(1)
    n_nan = nan_pos.numel()
    assert n_nan > 0
    assert set(nan_pos.tolist()) == set(range(n_nan // 2)) | set(range(len(ordered) - n_nan // 2, len(ordered)))


def test_storage_bits_of_uint8_and_float8_agree():
    x = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(em.storage_bits(x), em.storage_bits(x.view(torch.float8_e5m2)))
    with pytest.raises(TypeError):
        em.storage_bits(torch.zeros(3, dtype=torch.float32))


def test_phi_table():
    table = em.phi_table()
    assert table.dtype == torch.int64 and table.shape == (em.PHI_KNOTS + 1,)
    assert table[0] == 0 and table[-1] == table[-2] == 1 << em.PHI_BITS
    assert bool((table[1:] >= table[:-1]).all())
    assert table[em.PHI_KNOTS // 2] == 1 << (em.PHI_BITS - 1)  # Phi(0) = 1/2
    assert xxhash.xxh64_intdigest(table.numpy().astype("<i8").tobytes()) == em.PHI_XXH64
    # the exact-decimal values agree with libm's erfc at this resolution
    for i in range(0, em.PHI_KNOTS, 37):
        x = (i - em.PHI_KNOTS // 2) / (1 << em.KNOT_BITS)
        assert int(table[i]) == round((1 << em.PHI_BITS) * 0.5 * math.erfc(-x / math.sqrt(2)))


def test_quantize_params_is_exact_and_regularises():
    sigma = torch.tensor([1.0, 3.0, 1e-3, 0.0, -2.0, float("nan"), float("inf"), 1e-45, 2.0**70, 1.999], dtype=torch.float32)
    mu = torch.tensor([0.5, -7.0, float("nan"), float("inf"), float("-inf"), 1.0, 2.0, 0.0, 1e30, 1.0], dtype=torch.float32)
    mu_q, e, r = em.quantize_params(mu, sigma)
    assert mu_q.dtype == e.dtype == r.dtype == torch.int64
    assert bool(((r >= 1 << em.R) & (r < 1 << (em.R + 1))).all())
    assert bool(((e >= -60) & (e <= 60)).all())
    sigma_q = r.double() * torch.pow(2.0, (e - em.R).double())
    expect = torch.tensor([1.0, 3.0, 1e-3, em.SIGMA_MIN, em.SIGMA_MIN, 1.0, em.SIGMA_MAX, em.SIGMA_MIN, em.SIGMA_MAX, 2.0], dtype=torch.float64)
    assert torch.allclose(sigma_q, expect, rtol=2.0**-9)
    assert sigma_q[0] == 1.0 and sigma_q[1] == 3.0 and sigma_q[9] == 2.0  # 1.999 rounds up: carry into e
    delta = torch.pow(2.0, (e - em.F).double())
    assert mu_q[0] * delta[0] == 0.5 and mu_q[1] * delta[1] == -7.0
    assert mu_q[2] == 0  # NaN mu
    assert mu_q[3] == em.X_MAX and mu_q[4] == -em.X_MAX  # infinities saturate
    assert mu_q[8] == em.X_MAX  # far beyond 2^50 grid units
    with pytest.raises(TypeError):
        em.quantize_params(mu.double(), sigma)


@pytest.mark.parametrize("dtype", DTYPES)
def test_value_units_monotone_and_saturating(dtype):
    keys, values = all_patterns(dtype)
    order = torch.argsort(keys)
    for e in (-60, -10, 0, 7, 60):
        x = em.value_units(keys[order], torch.tensor(e), dtype)
        assert bool((x[1:] >= x[:-1]).all())
        assert int(x.abs().max()) <= em.X_MAX
        # exact where the value is on the grid and in range
        v = values[order]
        ok = torch.isfinite(v) & (v.abs() * 2.0 ** (em.F - e) < em.X_MAX)
        assert torch.equal(x[ok], torch.trunc(v[ok] * 2.0 ** (em.F - e)).to(torch.int64))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mu,sigma", NASTY_PARAMS)
def test_cdf_floor_on_every_key(dtype, mu, sigma):
    b = em.symbol_bits(dtype)
    keys = torch.arange((1 << b) + 1)
    mu_q, e, r = em.quantize_params(torch.tensor([mu]), torch.tensor([sigma]))
    for w_wide, kappa in ((em.W_WIDE, em.KAPPA), (0, 0), (255, 7)):
        c = em.cdf(keys, mu_q, e, r, dtype, w_wide, kappa)
        assert c[0] == 0 and c[-1] == em.M
        assert int((c[1:] - c[:-1]).min()) >= 1  # every pattern codable


def test_cdf_rejects_bad_mixture():
    mu_q, e, r = em.quantize_params(torch.zeros(1), torch.ones(1))
    with pytest.raises(ValueError):
        em.cdf(torch.arange(3), mu_q, e, r, "bf16", 256, 3)
    with pytest.raises(ValueError):
        em.cdf(torch.arange(3), mu_q, e, r, "bf16", 13, 8)


def test_cdf_golden():
    """The model's integers are the format: any change to them breaks stored blobs."""
    digest = xxhash.xxh64()
    for dtype in DTYPES:
        keys = torch.arange((1 << em.symbol_bits(dtype)) + 1)
        for mu, sigma in NASTY_PARAMS:
            mu_q, e, r = em.quantize_params(torch.tensor([mu]), torch.tensor([sigma]))
            digest.update(em.cdf(keys, mu_q, e, r, dtype).numpy().astype("<i8").tobytes())
    assert digest.intdigest() == 0x773480AD940E34B7


def float_model_bits(values, mu, sigma, dtype, w_wide=em.W_WIDE, kappa=em.KAPPA):
    """Mean -log2 q under the same mixture evaluated exactly in float64 (boundaries at the
    midpoints between neighbouring values)."""
    keys, all_values = all_patterns(dtype)
    order = torch.argsort(keys)
    v = all_values[order].nan_to_num(0.0, posinf=1e300, neginf=-1e300)
    mid = (v[1:] + v[:-1]) / 2

    def phi(x):
        return 0.5 * torch.special.erfc(-x / math.sqrt(2))

    w = w_wide / 256
    g = (1 - w) * phi((mid - mu) / sigma) + w * phi((mid - mu) / (sigma * 2**kappa))
    g = torch.cat([torch.zeros(1, dtype=torch.float64), g, torch.ones(1, dtype=torch.float64)])
    c = torch.arange(len(g), dtype=torch.float64) + g * (em.M - len(keys))
    freq = c[1:] - c[:-1]
    k = em.keys_from_bits(em.storage_bits(values), dtype)
    return float((em.PROB_BITS - torch.log2(freq[k])).mean())


@pytest.mark.parametrize("dtype,tolerance", [("bf16", 0.002), ("fp16", 0.005), ("fp8_e4m3", 0.001)])
@pytest.mark.parametrize("mu,sigma", [(0.0, 1.0), (3.0, 1.0), (0.0, 1e-3)])
def test_integer_model_matches_float_model(dtype, tolerance, mu, sigma):
    """The value grid is fine enough: keys near zero keep their mass (F = 6 cost bf16 7.6
    bits/scalar here)."""
    torch.manual_seed(0)
    scale = 16.0 / sigma if dtype.startswith("fp8") else 1.0  # into fp8's range
    x = ((torch.randn(20000, dtype=torch.float64) * sigma + mu) * scale).to(em.TORCH_DTYPES[dtype])
    keys = em.keys_from_bits(em.storage_bits(x), dtype)
    n = x.numel()
    ideal = em.ideal_bits(keys, torch.full((n,), mu * scale), torch.full((n,), sigma * scale), dtype) / n
    assert abs(ideal - float_model_bits(x, mu * scale, sigma * scale, dtype)) < tolerance
