"""The coder's entropy model: integer cumulative frequencies C(k) for one float KV scalar.

A *family* in the constriction sense: the parameters (mu, sigma) of every scalar arrive at
coding time, there is no object per symbol. Symbols are the raw bit patterns of the stored
dtype, mapped to order *keys* (``keys_from_bits``) so that key order is value order.
docs/DESIGN.md "The coder" is the prose version of this module; the two must agree.

Contract (what the rANS coders in rans_reference.py and rans_triton.py rely on):

* **Probability floor.** ``C(0) = 0``, ``C(2^B) = M`` and ``f(k) = C(k+1) - C(k) >= 1`` for
  every key of every dtype under every (mu, sigma), including NaN and infinite ones: the
  model is a mixture of a uniform component of weight ``2^B / M`` (one count per key) and a
  two-Gaussian mixture spread over the remaining ``M - 2^B`` counts. So every bit pattern
  (NaN payloads, +-inf, -0, subnormals) is codable.
* **Sigma floor.** sigma is regularised identically on both sides by ``quantize_params``:
  NaN -> 1, ``<= 0`` -> ``SIGMA_MIN``, then clamped to ``[SIGMA_MIN, SIGMA_MAX]`` and rounded
  to ``R + 1`` significant bits.
* **Exact invertibility.** ``C`` is strictly increasing in the key (monotone integer steps
  plus the ``+k`` of the floor), so a decoder finds the unique key with
  ``C(k) <= slot < C(k+1)`` by any exact search.
* **Determinism.** ``quantize_params`` is the only float -> int step and uses only exact
  operations (frexp, float64 multiplication by a power of two built from its bits,
  round-half-even of a float64). Everything after it is int64 arithmetic (adds, multiplies
  that provably fit, arithmetic shifts, one integer division ``2^32 // r``) and lookups in
  the integer table ``PHI``, which is computed in exact decimal arithmetic (no libm) and
  checked against a golden xxh64. Same inputs -> same integers on every CPU and GPU.

All functions are vectorised torch (int64 unless stated) and broadcast their arguments.
"""

from __future__ import annotations

import functools
from decimal import ROUND_HALF_EVEN, Decimal, localcontext

import torch
import xxhash

# ---- Constants -------------------------------------------------------------------------

# Probabilities are integers out of M = 2^PROB_BITS. 28 bits: the mixture's scaling
# G * (M - 2^B) < 2^32 * 2^28 = 2^60 fits int64, and so does rans64's bound freq << 35 with
# state L = 2^31 (rans_reference.py); the uniform floor (2^B counts) takes 2^-12 of the mass
# for 16-bit symbols and 2^-20 for 8-bit ones (about 4e-4 and 1.4e-6 bits per scalar).
PROB_BITS = 28
M = 1 << PROB_BITS

# Sigma is rounded to R + 1 significant bits: r = round(mantissa * 2^R) in [2^R, 2^(R+1)).
# A relative sigma error <= 2^-9 costs < 1e-5 bits per scalar (KL of a Gaussian with a
# scale off by eps is ~eps^2 / ln 2), and r < 2^9 keeps INV = 2^32 // r at most 2^24 so
# that DIFF_MAX * INV <= 2^58 fits int64.
R = 8

# The value grid: values and mu are measured in units delta = 2^(e - F), where
# sigma_q = r * 2^(e - R), so delta is between sigma / 2^(F+1) and sigma / 2^F. The grid must
# be finer than the spacing of the dtype's values near zero, or neighbouring keys share a
# grid cell and lose their Gaussian mass to the floor (28 bits each): with F = 6 a bf16
# N(0, 1) page costs 18.2 bits/scalar instead of 10.5. F = 20 puts the loss against an
# exact float64 model below 0.001 bits (bf16) and 0.003 bits (fp16) per scalar.
F = 20

# Sigma range. 2^+-60 brackets any float KV scale (bf16/fp16/fp8 values live in
# [2^-133, 2^128]) while keeping e in [-60, 60], so mu * 2^(F - e) cannot overflow float64
# and 2^(F - e) is a normal float64.
SIGMA_MIN = 2.0**-60
SIGMA_MAX = 2.0**60

# Saturation of value units (X) and of mu_q: +-2^50 units of delta (>= 2^29 sigma), far
# beyond any Gaussian mass (the widest component ends at 8 * 2^7 = 2^10 sigma); sig (< 2^11)
# << 50 stays below 2^61, and X(k-1) + X(k) - 2 mu_q stays below 2^52.
X_SHIFT_MAX = 50
X_MAX = 1 << X_SHIFT_MAX
# Exponent given to inf/NaN keys: ex + (F - e) >= 1024 - 40 > X_SHIFT_MAX, so they saturate.
SATURATE_EX = 1024
# Infinite mu is mapped to +-MU_INF before quantisation: any finite value beyond X_MAX
# units would do; 2^100 is exact in float64 and times 2^(F + 60) is still finite.
MU_INF = 2.0**100

# t is (boundary - mu) / sigma in units of sigma / 2^T_BITS; the standard normal CDF is
# tabulated at knots sigma / 2^KNOT_BITS apart out to +-T_SIGMAS sigma and linearly
# interpolated with INTERP_BITS = T_BITS - KNOT_BITS fractional bits. T_BITS = F: the t grid
# is as fine as the value grid (a coarser t merges keys just as a coarse F does).
# Knots 1/64 sigma apart: the linear interpolation's density error is ~1e-5 relative.
T_BITS = 20
KNOT_BITS = 6
INTERP_BITS = T_BITS - KNOT_BITS  # 14; (PHI[i+1] - PHI[i]) < 2^17, times f < 2^31
T_SIGMAS = 8  # Phi(-8) = 6e-16: rounds to 0 at 2^-24 resolution, so the table ends exactly
T_MAX = T_SIGMAS << T_BITS  # 2^23: |t| is clamped here
# t = diff * (delta/2) / sigma_q * 2^T_BITS = diff * 2^(T_BITS + R - F - 1) / r
#   = (diff * INV) >> T_SHIFT with INV = 2^32 // r in (2^23, 2^24].
T_SHIFT = 32 - (T_BITS + R - F - 1)  # 25
# The boundary offset diff (units of delta/2) is clamped to +-DIFF_MAX before the multiply:
# |diff| = 2^34 already gives |t| > 2^34 * 2^23 >> 25 = 2^32 > T_MAX << KAPPA_MAX = 2^30, so
# the clamp never changes phi (both Gaussians are saturated there); it only bounds the
# product diff * INV <= 2^58.
DIFF_MAX = 1 << 34
PHI_BITS = 24  # table values are round(2^24 * Phi): 2^24 * 2^8 (mixture weights) = 2^32
PHI_KNOTS = 2 * (T_SIGMAS << KNOT_BITS) + 1  # 1025 knots: -8, -8 + 1/64, ..., +8
# xxh64 of the 1026 little-endian int64 entries (1025 knots + 1 padding entry equal to the
# last, so the interpolation at t = +T_MAX may read PHI[i + 1]).
PHI_XXH64 = 0x3DB593D9D24B92EC

# Mixture defaults (both are recorded in every blob header, so they can change without a
# format change). w_wide / 256 of the Gaussian mass is spread 2^kappa times wider: KV
# residuals have heavier tails than a Gaussian (the fit in Fergus Finn's speculative KV
# coding post puts 3% at 3x sigma plus 2% on the marginal). 13/256 ~ 5% at 2^3 = 8x sigma
# covers outliers out to 64 sigma before the uniform floor takes over, and costs only
# ~0.07 bits/scalar when the residual happens to be exactly Gaussian.
W_WIDE = 13
KAPPA = 3
W_TOTAL = 256  # mixture weights are out of 256 (w_wide is a u8 in the header)
KAPPA_MAX = 7

# Storage dtypes: (bits B, mantissa bits, exponent bias, fp8 e4m3fn-style NaN only).
# e4m3 is the "fn" variant used by SGLang/vLLM fp8 KV: no infinities, NaN = S.1111.111
# (S.1111.110 = 448 is an ordinary number).
DTYPE_SPECS: dict[str, tuple[int, int, int, bool]] = {
    "fp8_e4m3": (8, 3, 7, True),
    "fp8_e5m2": (8, 2, 15, False),
    "bf16": (16, 7, 127, False),
    "fp16": (16, 10, 15, False),
}
TORCH_DTYPES = {
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
DTYPE_NAMES = {t: name for name, t in TORCH_DTYPES.items()}  # the inverse: torch dtype -> name


def symbol_bits(dtype: str) -> int:
    """B: bits per symbol (8 or 16) of a storage dtype name from DTYPE_SPECS."""
    try:
        return DTYPE_SPECS[dtype][0]
    except KeyError:
        raise ValueError(f"unknown KV dtype {dtype!r}; expected one of {sorted(DTYPE_SPECS)}") from None


# ---- Symbols and keys -------------------------------------------------------------------


def storage_bits(values: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns of a bf16/fp16/fp8 (or uint8 holding fp8) tensor as int64 in
    [0, 2^B), same shape."""
    if values.element_size() == 2:
        return values.view(torch.int16).to(torch.int64) & 0xFFFF
    if values.element_size() == 1:
        return values.view(torch.uint8).to(torch.int64)
    raise TypeError(f"expected a 16- or 8-bit storage dtype, got {values.dtype}")


def keys_from_bits(bits: torch.Tensor, dtype: str) -> torch.Tensor:
    """Order keys of raw patterns: k = u ^ (2^B - 1) if the sign bit is set, else
    u | 2^(B-1). Key order is value order (-NaN < -inf < ... < -0 < +0 < ... < +inf < +NaN)."""
    b = symbol_bits(dtype)
    top, ones = 1 << (b - 1), (1 << b) - 1
    return torch.where((bits & top) != 0, bits ^ ones, bits | top)


def bits_from_keys(keys: torch.Tensor, dtype: str) -> torch.Tensor:
    """Inverse of keys_from_bits."""
    b = symbol_bits(dtype)
    top, ones = 1 << (b - 1), (1 << b) - 1
    return torch.where((keys & top) != 0, keys ^ top, keys ^ ones)


# ---- Parameter quantisation (the only float -> int step) --------------------------------


def pow2_f64(n: torch.Tensor) -> torch.Tensor:
    """2.0^n as float64, built from its bits (exact; n int64 within the normal range)."""
    return ((n + 1023) << 52).view(torch.float64)


def quantize_params(mu: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mu, sigma) float32 -> (mu_q, e, r) int64, same (broadcast) shape.

    sigma_q = r * 2^(e - R) with r in [2^R, 2^(R+1)) and e in [-60, 60]; mu is
    mu_q * 2^(e - F), round-half-even, clamped to +-X_MAX. NaN sigma -> 1, sigma <= 0 ->
    SIGMA_MIN, +inf -> SIGMA_MAX; NaN mu -> 0, +-inf mu -> +-MU_INF. Exact operations only.
    """
    if mu.dtype != torch.float32 or sigma.dtype != torch.float32:
        raise TypeError(f"predictors return float32 (mu, sigma); got {mu.dtype}, {sigma.dtype}")
    s = sigma.to(torch.float64)
    s = torch.where(torch.isnan(s), torch.ones_like(s), s)
    s = torch.where(s <= 0, torch.full_like(s, SIGMA_MIN), s)
    s = s.clamp(SIGMA_MIN, SIGMA_MAX)
    mant, exp = torch.frexp(s)  # s = mant * 2^exp, mant in [0.5, 1)
    e = exp.to(torch.int64) - 1  # s = (2 mant) * 2^e, 2 mant in [1, 2)
    r = torch.round(mant * float(1 << (R + 1))).to(torch.int64)  # exact product, half-even
    carry = r == (1 << (R + 1))
    r = torch.where(carry, torch.full_like(r, 1 << R), r)
    e = e + carry.to(torch.int64)

    m = mu.to(torch.float64)
    m = torch.where(torch.isnan(m), torch.zeros_like(m), m)
    m = m.clamp(-MU_INF, MU_INF)  # +-inf -> +-2^100
    e, m = torch.broadcast_tensors(e, m)
    mu_q = torch.round(m * pow2_f64(F - e)).clamp(-X_MAX, X_MAX).to(torch.int64)
    r = r.expand_as(e)
    return mu_q, e, r


# ---- Value units and the CDF -------------------------------------------------------------


@functools.cache
def _key_fields_cpu(dtype: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per key k in [0, 2^B): (sig, ex, sgn) int64 with value(k) = sgn * sig * 2^ex exactly;
    sgn = -1 for negative patterns (also -0 and -NaN), +1 otherwise; inf and NaN get sig = 1,
    ex = SATURATE_EX so that they saturate to +-X_MAX in value_units."""
    b, mbits, bias, fn_nan = DTYPE_SPECS[dtype]
    ebits = b - 1 - mbits
    bits = bits_from_keys(torch.arange(1 << b, dtype=torch.int64), dtype)
    biased = (bits >> mbits) & ((1 << ebits) - 1)
    mant = bits & ((1 << mbits) - 1)
    if fn_nan:  # e4m3fn: only S.1111.111 is special (NaN)
        special = (biased == (1 << ebits) - 1) & (mant == (1 << mbits) - 1)
    else:  # IEEE-like: an all-ones exponent is inf/NaN
        special = biased == (1 << ebits) - 1
    # subnormals (biased 0) have no implicit bit and the exponent of biased 1
    sig = mant + ((biased != 0).to(torch.int64) << mbits)  # < 2^11
    ex = biased.clamp(min=1) - bias - mbits
    sig = torch.where(special, torch.ones_like(sig), sig)
    ex = torch.where(special, torch.full_like(ex, SATURATE_EX), ex)
    sgn = 1 - 2 * (bits >> (b - 1))
    return sig, ex, sgn


_KEY_FIELDS_ON_DEVICE: dict[tuple[str, torch.device], tuple[torch.Tensor, ...]] = {}


def key_fields(dtype: str, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sig, ex, sgn) tables of every key of ``dtype`` (see _key_fields_cpu), cached per device."""
    symbol_bits(dtype)  # validates the name
    index = (dtype, torch.device(device))
    if index not in _KEY_FIELDS_ON_DEVICE:
        _KEY_FIELDS_ON_DEVICE[index] = tuple(t.to(device) for t in _key_fields_cpu(dtype))
    return _KEY_FIELDS_ON_DEVICE[index]


def lookup(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table[index] for a 1-D table (index_select: several times faster on CPU than
    advanced indexing, same result)."""
    return table.index_select(0, index.reshape(-1)).view(index.shape)


def _units(sig: torch.Tensor, ex: torch.Tensor, sgn: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
    """sgn * min(trunc(sig * 2^(ex + off)), X_MAX): one of the two shifts is zero; << at most
    X_SHIFT_MAX saturates (sig >= 1) or keeps 0, and >> 63 already clears any sig < 2^11."""
    shift = ex + off
    mag = ((sig << shift.clamp(0, X_SHIFT_MAX)) >> (-shift).clamp(0, 63)).clamp(max=X_MAX)
    return sgn * mag


def value_units(keys: torch.Tensor, e: torch.Tensor, dtype: str) -> torch.Tensor:
    """X(k): the key's value in units of delta = 2^(e - F), truncated toward zero and
    saturated to +-X_MAX (infinities and NaNs saturate to the side of their sign).
    Integer shifts only; non-decreasing in k. keys in [0, 2^B)."""
    sig, ex, sgn = key_fields(dtype, keys.device)
    return _units(lookup(sig, keys), lookup(ex, keys), lookup(sgn, keys), F - e)


@functools.cache
def _phi_values() -> tuple[int, ...]:
    """round(2^24 * Phi(i / 64)) for i in [-512, 512], then the padding entry, computed in
    50-digit decimal arithmetic (correctly rounded, platform independent).

    Phi(x) = (1 + erf(x / sqrt 2)) / 2 with the positive series
    erf(z) = 2/sqrt(pi) * exp(-z^2) * sum_n 2^n z^(2n+1) / (1 * 3 * ... * (2n+1)),
    which has no cancellation; 300 terms reach below 1e-60 for z <= 8 / sqrt 2.
    """
    # pi to 60 digits (the decimal module has no pi; this is the standard expansion).
    pi = Decimal("3.14159265358979323846264338327950288419716939937510582097494")
    half_knots = T_SIGMAS << KNOT_BITS
    out = []
    with localcontext() as ctx:
        ctx.prec = 50
        sqrt2 = Decimal(2).sqrt()
        two_over_sqrt_pi = 2 / pi.sqrt()
        scale = Decimal(1 << PHI_BITS)
        for i in range(-half_knots, half_knots + 1):
            z = abs(Decimal(i) / (1 << KNOT_BITS)) / sqrt2
            term, total, n = z, Decimal(0), 0
            while term > Decimal("1e-60"):
                total += term
                n += 1
                term = term * 2 * z * z / (2 * n + 1)
            erf = two_over_sqrt_pi * (-z * z).exp() * total
            if i < 0:
                erf = -erf
            out.append(int(((1 + erf) / 2 * scale).quantize(Decimal(1), rounding=ROUND_HALF_EVEN)))
    out.append(out[-1])  # padding: PHI[i + 1] at the last knot
    return tuple(out)


@functools.cache
def _phi_cpu() -> torch.Tensor:
    table = torch.tensor(_phi_values(), dtype=torch.int64)
    digest = xxhash.xxh64_intdigest(table.numpy().astype("<i8").tobytes())
    if digest != PHI_XXH64:
        raise RuntimeError(
            f"PHI table checksum {digest:#018x} != golden {PHI_XXH64:#018x}: this platform "
            "computes a different normal-CDF table and would write incompatible blobs"
        )
    return table


_PHI_ON_DEVICE: dict[torch.device, torch.Tensor] = {}


def phi_table(device: torch.device | str | None = None) -> torch.Tensor:
    """The integer normal-CDF table: int64 [PHI_KNOTS + 1], PHI[0] = 0, PHI[1024] =
    PHI[1025] = 2^24, non-decreasing. Built (and checked) on first use, cached per device."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device not in _PHI_ON_DEVICE:
        _PHI_ON_DEVICE[device] = _phi_cpu().to(device)
    return _PHI_ON_DEVICE[device]


def phi(t: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """2^24 * Phi(t / 2^T_BITS), piecewise linear between knots, integer, in [0, 2^24]."""
    u = t.clamp(-T_MAX, T_MAX) + T_MAX  # [0, 2 T_MAX]
    i = u >> INTERP_BITS
    f = u & ((1 << INTERP_BITS) - 1)
    lo = lookup(table, i)
    return lo + (((lookup(table, i + 1) - lo) * f) >> INTERP_BITS)


def prepare(mu_q: torch.Tensor, e: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-symbol invariants of C: (2 mu_q, F - e, INV = 2^32 // r), int64. A decoder
    evaluates C at many candidate keys per symbol and computes these once."""
    return 2 * mu_q, F - e, (1 << 32) // r


def cdf_inner(
    keys: torch.Tensor,
    two_mu_q: torch.Tensor,
    off: torch.Tensor,
    inv: torch.Tensor,
    dtype: str,
    w_wide: int,
    kappa: int,
) -> torch.Tensor:
    """C(k) for keys in [1, 2^B - 1] only (the ends are fixed: see cdf), from ``prepare``'s
    invariants; broadcasts keys against them."""
    sig, ex, sgn = key_fields(dtype, keys.device)
    table = phi_table(keys.device)
    prev = keys - 1
    boundary = _units(lookup(sig, prev), lookup(ex, prev), lookup(sgn, prev), off) + _units(
        lookup(sig, keys), lookup(ex, keys), lookup(sgn, keys), off
    )
    diff = (boundary - two_mu_q).clamp(-DIFF_MAX, DIFF_MAX)  # units of delta/2
    t = (diff * inv) >> T_SHIFT  # (boundary - mu) / sigma in units of sigma / 2^T_BITS
    g = (W_TOTAL - w_wide) * phi(t, table) + w_wide * phi(t >> kappa, table)  # [0, 2^32]
    return keys + ((g * (M - (1 << symbol_bits(dtype)))) >> 32)


def cdf_prepared(
    keys: torch.Tensor,
    two_mu_q: torch.Tensor,
    off: torch.Tensor,
    inv: torch.Tensor,
    dtype: str,
    w_wide: int,
    kappa: int,
) -> torch.Tensor:
    """C(k) for keys in [0, 2^B] from ``prepare``'s invariants (cdf_inner plus the ends)."""
    top = 1 << symbol_bits(dtype)
    inner = cdf_inner(keys.clamp(1, top - 1), two_mu_q, off, inv, dtype, w_wide, kappa)
    c = torch.where(keys <= 0, torch.zeros_like(inner), inner)
    return torch.where(keys >= top, torch.full_like(c, M), c)


def cdf(
    keys: torch.Tensor,
    mu_q: torch.Tensor,
    e: torch.Tensor,
    r: torch.Tensor,
    dtype: str,
    w_wide: int = W_WIDE,
    kappa: int = KAPPA,
) -> torch.Tensor:
    """C(k) for keys in [0, 2^B] (broadcast against the quantised parameters): C(0) = 0,
    C(2^B) = M, strictly increasing. See the module docstring for the contract."""
    check_mixture(w_wide, kappa)
    return cdf_prepared(keys, *prepare(mu_q, e, r), dtype, w_wide, kappa)


def check_mixture(w_wide: int, kappa: int) -> None:
    """Raise ValueError unless 0 <= w_wide <= 255 and 0 <= kappa <= KAPPA_MAX."""
    if not (0 <= w_wide < W_TOTAL and 0 <= kappa <= KAPPA_MAX):
        raise ValueError(f"w_wide must be in [0, {W_TOTAL - 1}] and kappa in [0, {KAPPA_MAX}]; got {w_wide}, {kappa}")


# ---- Conveniences ------------------------------------------------------------------------


def ideal_bits(
    keys: torch.Tensor,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    dtype: str,
    w_wide: int = W_WIDE,
    kappa: int = KAPPA,
) -> float:
    """Sum over symbols of -log2(f(k) / M) under this model: what an ideal coder spends.
    keys: ``keys_from_bits(storage_bits(x), dtype)``; mu, sigma float32, same shape."""
    mu_q, e, r = quantize_params(mu, sigma)
    lo = cdf(keys, mu_q, e, r, dtype, w_wide, kappa)
    hi = cdf(keys + 1, mu_q, e, r, dtype, w_wide, kappa)
    freq = (hi - lo).to(torch.float64)
    return float((PROB_BITS - torch.log2(freq)).sum())
