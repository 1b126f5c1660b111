"""The table model (blob format 3, ``model`` = 1): a symbol as a lattice cell and a point.

docs/DESIGN.md "The table model" is the specification; this module is its torch reference
(integer arithmetic only after ``entropy_model.quantize_params``). The C++ coder
(rans_cpu.cpp) and the Triton kernels (rans_triton.py) must produce the same bytes.

A 16-bit KV scalar with quantised parameters (mu_q, e, r) is coded in two rANS steps:

1. **The cell** (PT = 15 bits): which of the NCELL cells of width u = 2^(e - TS) around mu
   holds the symbol's first lattice point, or ESC. One table row per sigma bucket ``b`` (the
   top TB bits of r below its leading one), built from the exact model's mixture
   (``entropy_model.phi``), so a row is a few hundred bytes and the decoder finds the entry
   with one short search in it.
2. **The point** (P2 = 16 bits): the cell's 2^P2 lattice points, W = 8 units of delta apart,
   each belonging to the key its value truncates to (``trunc_key``). A key's points are
   contiguous; it is coded in the cell of its first point, and the first key starting in a
   cell also takes the cell's points before it. The decoder maps the point to its key by
   truncating a float: no search and no C(k).

ESC is followed by the exact model's step (28 bits), so every key of every (mu, sigma)
stays codable: NaN, inf, keys with no point (spacing below W delta), tails beyond the
lattice.

Contract: ``level1_table`` rows are strictly increasing from 0 to 2^PT (every entry has
frequency >= 1); ``thresholds`` is non-decreasing in the key; ``trunc_key(n)`` is the largest
key with ``thresholds(key) <= n`` (tests check this on every key); ``symbol_steps``
frequencies are >= 1 and each step's cum + freq <= 2^scale.
"""

from __future__ import annotations

import functools

import torch

from sglang_speckv.kernels import entropy_model as em

# ---- Constants (docs/DESIGN.md "The table model" justifies them) ------------------------

MODEL_EXACT = "exact"  # entropy_model's per-scalar C(k): every dtype
MODEL_TABLE = "table"  # this module: 16-bit dtypes
MODELS = (MODEL_EXACT, MODEL_TABLE)

TS = 1  # lattice u = 2^(e - TS): sigma / u in [2, 4) (+0.16-0.20% bits in the study)
TB = 3  # sigma buckets: the top TB bits of r below its leading one
TJ = 64  # cells on each side of mu: +-64 u > +-16 sigma
NCELL = 2 * TJ
ESC = NCELL  # the escape entry of a level-1 row
PT = 15  # level-1 probability bits (a row of NCELL + 2 cumulative counts)
P2 = 16  # lattice points per cell
CELL_SHIFT = em.F - TS  # a cell is U = 2^19 units of delta = 2^(e - F)
W_SHIFT = CELL_SHIFT - P2  # points are W = 2^3 units of delta apart
TSAT = 1 << 52  # thresholds saturate here: beyond any point (|mu_q| <= 2^50, cells < 2^23 W)
# A symbol takes the table only where the dtype's keys are dense on the lattice: at least
# 2^DENSE_LOG keys per cell at |mu| + 2 sigma. Where they are sparser (sharp predictors,
# |mu| >> sigma) cells go empty and the lattice wastes their mass (+1% to +500% per symbol
# at 1-4 keys per cell); those symbols keep the exact model's one step.
DENSE_LOG = 3
assert W_SHIFT >= 0


def check_model(model: str, dtype: str) -> None:
    """Raise ValueError unless ``model`` can code ``dtype`` (the table model: 16 bits only)."""
    if model not in MODELS:
        raise ValueError(f"unknown entropy model {model!r}; expected one of {MODELS}")
    if model == MODEL_TABLE and em.symbol_bits(dtype) != 16:
        raise ValueError(f"the table model codes 16-bit dtypes only, not {dtype}")


# ---- Level 1: the cell table --------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def level1_table(w_wide: int, kappa: int) -> torch.Tensor:
    """CUM1: int64 [2^TB, NCELL + 2] on the CPU; row b: CUM1[b][i] for cells i < NCELL
    (cell j = i - TJ), CUM1[b][NCELL] = the escape's start, CUM1[b][NCELL + 1] = 2^PT."""
    em.check_mixture(w_wide, kappa)
    b = torch.arange(1 << TB, dtype=torch.int64)[:, None]
    edges = torch.arange(-TJ, TJ + 1, dtype=torch.int64)[None, :]  # units of u
    # the edge in units of sigma / 2^T_BITS for the bucket's centre sigma / u (floor division)
    t = torch.div(edges << (em.T_BITS + TB + 1 - TS), (1 << (TB + 1)) + 2 * b + 1, rounding_mode="floor")
    phi = em.phi_table()
    g = (em.W_TOTAL - w_wide) * em.phi(t, phi) + w_wide * em.phi(t >> kappa, phi)  # [0, 2^32]
    i = torch.arange(NCELL + 1, dtype=torch.int64)[None, :]
    cum = i + (((g - g[:, :1]) * ((1 << PT) - NCELL - 1)) >> 32)
    return torch.cat([cum, torch.full((1 << TB, 1), 1 << PT, dtype=torch.int64)], dim=1)


def dense(mu_q: torch.Tensor, e: torch.Tensor, r: torch.Tensor, dtype: str) -> torch.Tensor:
    """bool: the symbol is coded by the table (else by the exact model alone): the key spacing
    at |mu| + 2 sigma, 2^ls units of delta, is at most a cell over 2^DENSE_LOG."""
    _, mbits, bias, _ = em.DTYPE_SPECS[dtype]
    v = mu_q.abs() + (r << (em.F - em.R + 1))  # |mu| + 2 sigma in delta, in [2^21, 2^51)
    lv = ((v.to(torch.float64).view(torch.int64) >> 52) & 0x7FF) - 1023  # floor(log2 v), exact
    ls = torch.maximum(lv, (1 - bias) + em.F - e) - mbits  # below the smallest normal: subnormal spacing
    return ls <= CELL_SHIFT - DENSE_LOG


def bucket(r: torch.Tensor) -> torch.Tensor:
    """The sigma bucket of r in [2^R, 2^(R+1)): its TB bits below the leading one."""
    return (r >> (em.R - TB)) - (1 << TB)


# ---- Level 2: thresholds, first points and the truncation map ----------------------------


def thresholds(keys: torch.Tensor, e: torch.Tensor, dtype: str) -> torch.Tensor:
    """T(k) for keys in [-1, 2^B] (broadcast against e): a point n (units of delta from 0)
    maps to a key >= k iff n >= T(k). Non-decreasing in k, saturated to +-TSAT."""
    top = 1 << em.symbol_bits(dtype)
    k0 = top >> 1  # the key of +0
    sig_t, ex_t, _ = em.key_fields(dtype, keys.device)
    neg = keys < k0
    m = torch.where(neg, keys - 1, keys).clamp(0, top - 1)  # the key whose value sets T
    sig, ex = em.lookup(sig_t, m), em.lookup(ex_t, m)
    s = ex + em.F - e  # value(m) = +-sig * 2^s units of delta
    up = sig << s.clamp(0, 52)  # sig * 2^s for s >= 0 (sig < 2^11: fits)
    pos = torch.where(s >= 0, up, -((-sig) >> (-s).clamp(0, 62)))  # ceil(sig * 2^s)
    low = torch.where(s >= 0, -up, (-sig) >> (-s).clamp(0, 62)) + 1  # floor(-sig * 2^s) + 1
    t = torch.where(neg, low, pos).clamp(-TSAT, TSAT)
    special = ex == em.SATURATE_EX  # inf / NaN
    t = torch.where(special | (keys >= top), torch.full_like(t, TSAT), t)
    return torch.where(neg & (special | (keys <= 0)), torch.full_like(t, -TSAT), t)


def first_point(keys: torch.Tensor, mu_q: torch.Tensor, e: torch.Tensor, dtype: str) -> torch.Tensor:
    """q(k) = ceil((T(k) - mu_q) / W): the first lattice point (index relative to mu) that
    maps to a key >= k; point q lies in cell q >> P2."""
    return -((mu_q - thresholds(keys, e, dtype)) >> W_SHIFT)


def trunc_key(n: torch.Tensor, e: torch.Tensor, dtype: str) -> torch.Tensor:
    """The key of the float n * 2^(e - F) truncated toward zero to ``dtype`` (the largest
    finite magnitude beyond it; n = 0 -> +0): the largest key with T(key) <= n. n: int64 with
    |n| < 2^51, so n * 2^(e - F) is an exact float64; integer operations on its bits."""
    b, mbits, bias, _ = em.DTYPE_SPECS[dtype]
    ebits = b - 1 - mbits
    emin, emax = 1 - bias, (1 << ebits) - 2 - bias
    v = n.to(torch.float64) * em.pow2_f64(e - em.F)  # exact
    bits = v.view(torch.int64)
    big_e = ((bits >> 52) & 0x7FF) - 1023
    mant = bits & ((1 << 52) - 1)
    normal = ((big_e + bias) << mbits) | (mant >> (52 - mbits))
    sub = (mant | (1 << 52)) >> (52 - mbits + emin - big_e).clamp(0, 63)
    mag = torch.where(big_e >= emin, normal, sub)
    mag = torch.where(big_e > emax, torch.full_like(mag, ((emax + bias) << mbits) | ((1 << mbits) - 1)), mag)
    mag = torch.where(n == 0, torch.zeros_like(mag), mag)
    pattern = mag | ((n < 0).to(torch.int64) << (b - 1))
    return em.keys_from_bits(pattern, dtype)


# ---- Encoding: the two steps of every symbol ------------------------------------------------


def symbol_steps(
    keys: torch.Tensor, mu_q: torch.Tensor, e: torch.Tensor, r: torch.Tensor, dtype: str, w_wide: int, kappa: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cum, freq, scale) int64 [..., 2] of every symbol's two steps in decode order (level 1,
    then the point or, after ESC, the exact model's step; a symbol that is not ``dense``: the
    exact model's step, then the identity step (0, 2^PT) of scale PT, which codes nothing);
    shapes of keys (broadcast)."""
    check_model(MODEL_TABLE, dtype)
    keys, mu_q, e, r = torch.broadcast_tensors(keys, mu_q, e, r)
    cum1 = level1_table(w_wide, kappa).to(keys.device).reshape(-1)
    row = bucket(r) * (NCELL + 2)
    qa, qk, qb = (first_point(keys + d, mu_q, e, dtype) for d in (-1, 0, 1))
    j = qk >> P2
    cs = j << P2
    esc = (j < -TJ) | (j >= TJ) | (qb <= qk)
    entry = torch.where(esc, torch.full_like(j, ESC), j + TJ) + row
    c1 = em.lookup(cum1, entry)
    f1 = em.lookup(cum1, entry + 1) - c1
    cum2 = torch.where(qa < cs, torch.zeros_like(qk), qk - cs)
    cnt = torch.minimum(qb, cs + (1 << P2)) - cs - cum2
    c_exact = em.cdf(keys, mu_q, e, r, dtype, w_wide, kappa)
    f_exact = em.cdf(keys + 1, mu_q, e, r, dtype, w_wide, kappa) - c_exact
    c2 = torch.where(esc, c_exact, cum2)
    f2 = torch.where(esc, f_exact, cnt)
    s2 = torch.where(esc, torch.full_like(j, em.PROB_BITS), torch.full_like(j, P2))
    cum = torch.stack([c1, c2], -1)
    freq = torch.stack([f1, f2], -1)
    scale = torch.stack([torch.full_like(j, PT), s2], -1)
    exact = (torch.stack([c_exact, torch.zeros_like(j)], -1), torch.stack([f_exact, torch.full_like(j, 1 << PT)], -1),
             torch.stack([torch.full_like(j, em.PROB_BITS), torch.full_like(j, PT)], -1))  # fmt: skip
    table = dense(mu_q, e, r, dtype)[..., None]
    return tuple(torch.where(table, t, x) for t, x in zip((cum, freq, scale), exact))


def ideal_bits(keys, mu_q, e, r, dtype: str, w_wide: int, kappa: int) -> torch.Tensor:
    """float64, shape of keys: -log2 of every symbol's probability under the table model."""
    _, freq, scale = symbol_steps(keys, mu_q, e, r, dtype, w_wide, kappa)
    return (scale - torch.log2(freq.to(torch.float64))).sum(-1)


# ---- Decoding helpers (the reference decoder in rans_reference.py runs these per step) ------


def decode_cell(slot1: torch.Tensor, r: torch.Tensor, cum1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(entry, cum, freq) of level 1 for slots in [0, 2^PT): the entry i of row bucket(r)
    with CUM1[i] <= slot < CUM1[i + 1]. cum1: level1_table on the slots' device."""
    rows = cum1[bucket(r)]  # [lanes, NCELL + 2]
    i = (rows <= slot1[:, None]).sum(dim=1) - 1  # rows start at 0 and are increasing
    i = i.clamp(0, NCELL)
    c = rows.gather(1, i[:, None]).squeeze(1)
    return i, c, rows.gather(1, (i + 1)[:, None]).squeeze(1) - c


def decode_point(
    entry: torch.Tensor, slot2: torch.Tensor, mu_q: torch.Tensor, e: torch.Tensor, dtype: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(key, cum2, cnt, ok) of level 2 for lanes whose level-1 entry is a cell (entries of
    ESC give garbage, to be replaced). ok is False where the stream cannot be valid; there
    (cum2, cnt) = (slot2, 1) keep the rANS state in range."""
    cs = (entry - TJ) << P2
    kp = trunc_key(mu_q + ((cs + slot2) << W_SHIFT), e, dtype)
    qp = first_point(kp, mu_q, e, dtype)
    before = qp < cs  # k' started in an earlier cell: the point belongs to k' + 1
    k = kp + before.to(torch.int64)
    qk = torch.where(before, first_point(k, mu_q, e, dtype), qp)
    qa = torch.where(before, qp, first_point(k - 1, mu_q, e, dtype))
    cum2 = torch.where(qa < cs, torch.zeros_like(qk), qk - cs)
    cnt = torch.minimum(first_point(k + 1, mu_q, e, dtype), cs + (1 << P2)) - cs - cum2
    ok = (qk < cs + (1 << P2)) & (cnt >= 1) & (cum2 <= slot2) & (slot2 < cum2 + cnt)
    return k, torch.where(ok, cum2, slot2), torch.where(ok, cnt, torch.ones_like(cnt)), ok
