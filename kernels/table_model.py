"""The table model (blob format 3, ``model`` = 1): a symbol as an aligned cell and its offset.

docs/DESIGN.md "The table model" is the specification; this module is its torch reference
(integer arithmetic only after ``entropy_model.quantize_params``). The C++ coder
(rans_cpu.cpp) and the Triton kernels (rans_triton.py) must produce the same bytes.

A 16-bit KV scalar with quantised parameters (mu_q, e, r) is coded in two rANS steps over
an *absolute* lattice of cells of width u = 2^(e - TS): cell m holds the values x with
floor(x / u) = m for x >= +0 and -1 - floor(|x| / u) = m for x <= -0 (edges at multiples of
u; +0 is in cell 0, -0 in cell -1).

1. **The cell** (PT = 15 bits): c = m - floor(mu / u) in [-TJ, TJ), or ESC. One table row
   per sigma bucket ``b`` (TB bits of r below its leading one) and position of mu in its
   cell (FB bits of frac(mu / u)), built from the exact model's mixture
   (``entropy_model.phi``): 2^(TB + FB) rows of NCELL + 2 cumulative counts.
2. **The offset.** A cell off zero (|m| >= 1, or m <= -2) lies inside one binade (binade
   edges 2^j >= u are multiples of u), so it holds exactly 2^L2 keys, evenly spaced, with
   L2 = log2(u / ulp) in [0, mantissa bits]: the key's significand is (|m'| << L2) | off,
   and off is L2 raw bits (a step of PT bits with frequency 2^(PT - L2): no table, no
   search). The two cells at zero (|x| < u) hold every tiny key: there a key of magnitude
   v owns the points n in [ceil(v 2^P2 / u), ceil(v' 2^P2 / u)) of 2^P2 (v' the next
   larger magnitude, the last clipped to 2^P2), and the decoder finds it by truncating
   n u / 2^P2 to the dtype.

ESC is followed by the exact model's step (28 bits), so every key of every (mu, sigma) stays
codable: NaN, inf, cells beyond +-TJ, cells narrower than the key spacing (ulp > u), zero-cell
keys closer together than u / 2^P2 (no point of their own). A symbol that is not ``dense``
(fewer than 2^DENSE_LOG keys per cell at |mu| + 2 sigma) is the exact model's step alone,
followed by the identity step (0, 2^PT) of scale PT, which codes nothing.

Contract: ``level1_table`` rows are strictly increasing from 0 to 2^PT (every entry has
frequency >= 1); ``level1_start`` is exact (its entry holds its bucket's first slot);
``symbol_steps`` frequencies are >= 1 and each step's cum + freq <=
2^scale; within a cell the keys' steps tile [0, 2^scale) (tests check this on every key);
``trunc_magnitude(n)`` is the largest finite magnitude whose value is <= n u / 2^P2.
"""

from __future__ import annotations

import functools

import torch

from sglang_speckv.kernels import entropy_model as em

# ---- Constants (docs/DESIGN.md "The table model" justifies them) ------------------------

MODEL_EXACT = "exact"  # entropy_model's per-scalar C(k): every dtype
MODEL_TABLE = "table"  # this module: 16-bit dtypes
MODELS = (MODEL_EXACT, MODEL_TABLE)

TS = 1  # cells u = 2^(e - TS) wide: sigma / u in [2, 4) (+0.14% bits on bf16 page_stats)
CELL_SHIFT = em.F - TS  # a cell is 2^19 units of delta = 2^(e - F)
TB = 3  # sigma buckets: the top TB bits of r below its leading one
FB = 4  # rows per sigma bucket: mu's position in its cell in 2^FB steps (error <= u / 32)
TJ = 64  # cells on each side of mu's: +-64 u > +-16 sigma
NCELL = 2 * TJ
ESC = NCELL  # the escape entry of a level-1 row
ROW = NCELL + 2  # cumulative counts per row: the cells, the escape's start, 2^PT
ROWS = 1 << (TB + FB)
PT = 15  # level-1 probability bits; also the scale of a cell's raw offset step
# The decoders' level-1 lookup (level1_start): 2^START_BITS buckets of slots per row. At 8
# bits (32 KiB of uint8) one correction step finishes 99.8% of lanes on SmolLM2 KV under
# page_stats, and a 32-lane program needs more at 5% of steps (12% at 7 bits, 2% at 9):
# docs/BENCHMARKS.md "Table model T2".
START_BITS = 8
P2 = 16  # points of a zero cell
# A symbol takes the table only where the dtype's keys are dense on the lattice: at least
# 2^DENSE_LOG keys per cell at |mu| + 2 sigma. Where they are sparser (sharp predictors,
# |mu| >> sigma) cells go empty or escape (+1% to +500% per symbol at 1-4 keys per cell);
# those symbols keep the exact model's one step.
DENSE_LOG = 3
# A key's magnitude in cells, floor(|x| / u), saturates at 2^40 (then c is far beyond +-TJ:
# |mu_q| >> CELL_SHIFT <= 2^31): sig < 2^11, so sig << 40 fits int64.
MAG_SHIFT_MAX = 40


def check_model(model: str, dtype: str) -> None:
    """Raise ValueError unless ``model`` can code ``dtype`` (the table model: 16 bits only)."""
    if model not in MODELS:
        raise ValueError(f"unknown entropy model {model!r}; expected one of {MODELS}")
    if model == MODEL_TABLE and em.symbol_bits(dtype) != 16:
        raise ValueError(f"the table model codes 16-bit dtypes only, not {dtype}")


# ---- Level 1: the cell table --------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def level1_table(w_wide: int, kappa: int) -> torch.Tensor:
    """CUM1: int64 [ROWS, ROW] on the CPU; row (b << FB) | f for sigma bucket b and mu's
    position f: CUM1[row][i] for cells c = i - TJ (i < NCELL), CUM1[row][NCELL] = the
    escape's start, CUM1[row][NCELL + 1] = 2^PT. The cell edge c u - mu is taken at the
    bucket centres: mu = (floor(mu / u) + (f + 1/2) / 2^FB) u, sigma = (1 + (2 b + 1) /
    2^(TB + 1)) 2^TS u."""
    em.check_mixture(w_wide, kappa)
    b = torch.arange(1 << TB, dtype=torch.int64)[:, None, None]
    f = torch.arange(1 << FB, dtype=torch.int64)[None, :, None]
    c = torch.arange(-TJ, TJ + 1, dtype=torch.int64)[None, None, :]
    # (c - (f + 1/2) / 2^FB) u / sigma in units of sigma / 2^T_BITS (floor division)
    num = ((c << (FB + 1)) - 2 * f - 1) << (em.T_BITS + TB + 1 - TS)
    t = torch.div(num, ((1 << (TB + 1)) + 2 * b + 1) << (FB + 1), rounding_mode="floor")
    phi = em.phi_table()
    g = (em.W_TOTAL - w_wide) * em.phi(t, phi) + w_wide * em.phi(t >> kappa, phi)  # [0, 2^32]
    i = torch.arange(NCELL + 1, dtype=torch.int64)
    cum = i + (((g - g[..., :1]) * ((1 << PT) - NCELL - 1)) >> 32)  # each entry >= 1
    cum = torch.cat([cum, torch.full((1 << TB, 1 << FB, 1), 1 << PT, dtype=torch.int64)], dim=-1)
    return cum.reshape(ROWS, ROW)


@functools.lru_cache(maxsize=8)
def level1_start(w_wide: int, kappa: int) -> torch.Tensor:
    """START: uint8 [ROWS, 2^START_BITS] on the CPU, the decoders' one-lookup level 1 (a
    decoder-side index of level1_table; the bytes do not depend on it). START[row][b] is the
    entry i of CUM1 = level1_table(w_wide, kappa) holding the bucket's first slot
    s0 = b << (PT - START_BITS): CUM1[row][i] <= s0 < CUM1[row][i + 1], i in [0, NCELL].

    Why a short correction finds any slot's entry from it: with CUM1[row] strictly
    increasing from CUM1[0] = 0 to CUM1[NCELL + 1] = 2^PT, the entry of a slot s is
    E(s) = #{i in [1, NCELL] : CUM1[i] <= s}, nondecreasing in s. For s in bucket b,
    E(s) = START[row][b] + #{i : s0 < CUM1[i] <= s}: stepping i forward from START while
    CUM1[i + 1] <= s reaches E(s), the unique entry, after at most as many steps as entries
    start inside the bucket (fewer than 2^(PT - START_BITS)). This is the bucketed slot ->
    symbol lookup of fast rANS decoders (J. Duda, "Asymmetric numeral systems",
    arXiv:1311.2540, decodes a slot through such a symbol table; here the table is coarse
    and the correction exact). Built from CUM1 in integers (entries <= NCELL < 2^8)."""
    cum1 = level1_table(w_wide, kappa)  # [ROWS, ROW]
    s0 = torch.arange(1 << START_BITS, dtype=torch.int64) << (PT - START_BITS)  # [2^START_BITS]
    # E(s0) = the number of CUM1[row][1 .. NCELL] <= s0 (each row strictly increasing)
    entry = torch.searchsorted(cum1[:, 1 : NCELL + 1].contiguous(), s0.expand(ROWS, -1).contiguous(), right=True)
    return entry.to(torch.uint8)  # [ROWS, 2^START_BITS]


def dense(mu_q: torch.Tensor, e: torch.Tensor, r: torch.Tensor, dtype: str) -> torch.Tensor:
    """bool: the symbol is coded by the table (else by the exact model alone): the key spacing
    at |mu| + 2 sigma, 2^ls units of delta, is at most a cell over 2^DENSE_LOG."""
    _, mbits, bias, _ = em.DTYPE_SPECS[dtype]
    v = mu_q.abs() + (r << (em.F - em.R + 1))  # |mu| + 2 sigma in delta, in [2^21, 2^51)
    lv = ((v.to(torch.float64).view(torch.int64) >> 52) & 0x7FF) - 1023  # floor(log2 v), exact
    ls = torch.maximum(lv, (1 - bias) + em.F - e) - mbits  # below the smallest normal: subnormal spacing
    return ls <= CELL_SHIFT - DENSE_LOG


def row_index(mu_q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """The level-1 row of a symbol: (sigma bucket << FB) | mu's position in its cell."""
    b = (r >> (em.R - TB)) - (1 << TB)  # r in [2^R, 2^(R+1)): its TB bits below the leading one
    return (b << FB) | ((mu_q >> (CELL_SHIFT - FB)) & ((1 << FB) - 1))


# ---- Level 2: offsets off zero, points at zero ----------------------------------------------


def _first_point(sig: torch.Tensor, ex: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """ceil(sig 2^ex 2^P2 / u): the first zero-cell point of a magnitude sig 2^ex (exact for
    values < 2u; sig < 2^11)."""
    s = ex - (e - TS - P2)
    return torch.where(s >= 0, sig << s.clamp(0, MAG_SHIFT_MAX), -((-sig) >> (-s).clamp(0, 63)))


def _next_magnitude(keys: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sig, ex, finite) of the magnitude one pattern above the key's (|x| -> the next larger
    representable magnitude; beyond the largest finite one: inf, not finite)."""
    b = em.symbol_bits(dtype)
    sig_t, ex_t, _ = em.key_fields(dtype, keys.device)
    mag_pat = em.bits_from_keys(keys, dtype) & ((1 << (b - 1)) - 1)
    nxt = em.keys_from_bits((mag_pat + 1).clamp(max=(1 << (b - 1)) - 1), dtype)  # a positive key
    ex = em.lookup(ex_t, nxt)
    return em.lookup(sig_t, nxt), ex, (ex != em.SATURATE_EX) & (mag_pat + 1 < (1 << (b - 1)))


def zero_points(keys: torch.Tensor, e: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(first point, count) of keys in a zero cell (|x| < u): the points of [0, 2^P2) whose
    truncation is the key. count <= 0: the key has no point (it escapes)."""
    sig_t, ex_t, _ = em.key_fields(dtype, keys.device)
    first = _first_point(em.lookup(sig_t, keys), em.lookup(ex_t, keys), e)
    nsig, nex, nfin = _next_magnitude(keys, dtype)
    nxt = torch.where(nfin, _first_point(nsig, nex, e).clamp(max=1 << P2), torch.full_like(first, 1 << P2))
    return first, nxt - first


def trunc_magnitude(n: torch.Tensor, e: torch.Tensor, dtype: str) -> torch.Tensor:
    """The magnitude pattern (sign bit clear) of the largest finite ``dtype`` value <= n u /
    2^P2 (0 <= n < 2^P2, so the float64 n 2^(e - TS - P2) is exact): a float truncated toward
    zero, by integer operations on its bits; beyond the largest finite value: that value."""
    b, mbits, bias, _ = em.DTYPE_SPECS[dtype]
    emin, emax = 1 - bias, (1 << (b - 1 - mbits)) - 2 - bias
    v = n.to(torch.float64) * em.pow2_f64(e - TS - P2)  # exact
    bits = v.view(torch.int64)
    big_e = ((bits >> 52) & 0x7FF) - 1023
    mant = bits & ((1 << 52) - 1)
    normal = ((big_e + bias) << mbits) | (mant >> (52 - mbits))
    sub = (mant | (1 << 52)) >> (52 - mbits + emin - big_e).clamp(0, 63)
    mag = torch.where(big_e >= emin, normal, sub)
    mag = torch.where(big_e > emax, torch.full_like(mag, ((emax + bias) << mbits) | ((1 << mbits) - 1)), mag)
    return torch.where(n == 0, torch.zeros_like(mag), mag)


def cell_of(keys: torch.Tensor, e: torch.Tensor, dtype: str) -> tuple[torch.Tensor, ...]:
    """(m, sh, sig, finite) of keys: the absolute cell m, sh = log2(ulp / u) (the offset has
    L2 = -sh bits where sh <= 0), the significand and whether the key is finite."""
    sig_t, ex_t, sgn_t = em.key_fields(dtype, keys.device)
    sig, ex, sgn = em.lookup(sig_t, keys), em.lookup(ex_t, keys), em.lookup(sgn_t, keys)
    sh = ex - (e - TS)
    mag = torch.where(sh >= 0, sig << sh.clamp(0, MAG_SHIFT_MAX), sig >> (-sh).clamp(0, 63))  # floor(|x| / u)
    return torch.where(sgn < 0, -1 - mag, mag), sh, sig, ex != em.SATURATE_EX


# ---- Encoding: the two steps of every symbol ------------------------------------------------


def symbol_steps(
    keys: torch.Tensor, mu_q: torch.Tensor, e: torch.Tensor, r: torch.Tensor, dtype: str, w_wide: int, kappa: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cum, freq, scale) int64 [..., 2] of every symbol's two steps in decode order (level 1,
    then the offset, the zero cell's points or, after ESC, the exact model's step; a symbol
    that is not ``dense``: the exact model's step, then the identity step (0, 2^PT) of scale
    PT, which codes nothing); shapes of keys (broadcast)."""
    check_model(MODEL_TABLE, dtype)
    keys, mu_q, e, r = torch.broadcast_tensors(keys, mu_q, e, r)
    cum1 = level1_table(w_wide, kappa).to(keys.device).reshape(-1)
    m, sh, sig, finite = cell_of(keys, e, dtype)
    c = m - (mu_q >> CELL_SHIFT)
    zero = (m == 0) | (m == -1)
    first, cnt = zero_points(keys, e, dtype)
    esc = ~finite | (c < -TJ) | (c >= TJ) | torch.where(zero, cnt <= 0, sh > 0)
    entry = row_index(mu_q, r) * ROW + torch.where(esc, torch.full_like(c, ESC), c + TJ)
    c1 = em.lookup(cum1, entry)
    f1 = em.lookup(cum1, entry + 1) - c1
    l2 = (-sh).clamp(0, PT)  # the offset's bits (off zero, not escaped: sh <= 0)
    off = sig & ((1 << l2) - 1)
    c2 = torch.where(zero, first, off << (PT - l2))
    f2 = torch.where(zero, cnt, 1 << (PT - l2))
    s2 = torch.where(zero, torch.full_like(c, P2), torch.full_like(c, PT))
    c_exact = em.cdf(keys, mu_q, e, r, dtype, w_wide, kappa)
    f_exact = em.cdf(keys + 1, mu_q, e, r, dtype, w_wide, kappa) - c_exact
    c2, f2 = torch.where(esc, c_exact, c2), torch.where(esc, f_exact, f2)
    s2 = torch.where(esc, torch.full_like(c, em.PROB_BITS), s2)
    cum = torch.stack([c1, c2], -1)
    freq = torch.stack([f1, f2], -1)
    scale = torch.stack([torch.full_like(c, PT), s2], -1)
    exact = (torch.stack([c_exact, torch.zeros_like(c)], -1), torch.stack([f_exact, torch.full_like(c, 1 << PT)], -1),
             torch.stack([torch.full_like(c, em.PROB_BITS), torch.full_like(c, PT)], -1))  # fmt: skip
    table = dense(mu_q, e, r, dtype)[..., None]
    return tuple(torch.where(table, t, x) for t, x in zip((cum, freq, scale), exact))


def ideal_bits(keys, mu_q, e, r, dtype: str, w_wide: int, kappa: int) -> torch.Tensor:
    """float64, shape of keys: -log2 of every symbol's probability under the table model."""
    _, freq, scale = symbol_steps(keys, mu_q, e, r, dtype, w_wide, kappa)
    return (scale - torch.log2(freq.to(torch.float64))).sum(-1)


# ---- Decoding helpers (the reference decoder in rans_reference.py runs these per step) ------


def decode_cell(slot1: torch.Tensor, row: torch.Tensor, cum1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(entry, cum, freq) of level 1 for slots in [0, 2^PT): the entry i of level-1 row
    ``row`` (row_index) with CUM1[i] <= slot < CUM1[i + 1]. cum1: level1_table on the slots'
    device."""
    rows = cum1[row]  # [lanes, ROW]
    i = (rows <= slot1[:, None]).sum(dim=1) - 1  # rows start at 0 and are increasing
    i = i.clamp(0, NCELL)
    c = rows.gather(1, i[:, None]).squeeze(1)
    return i, c, rows.gather(1, (i + 1)[:, None]).squeeze(1) - c


def decode_level2(
    entry: torch.Tensor, x: torch.Tensor, mu_q: torch.Tensor, e: torch.Tensor, dtype: str
) -> tuple[torch.Tensor, ...]:
    """(key, slot, cum, freq, scale, ok) of level 2 for lanes whose level-1 entry is a cell,
    from the state x after level 1 (entries of ESC give garbage, to be replaced). ok is False
    where the stream cannot be valid (a cell off zero narrower than the key spacing or beyond
    the largest finite binade); there the step is the identity (0, 2^PT)."""
    b, mbits, bias, _ = em.DTYPE_SPECS[dtype]
    emin_ex = 1 - bias - mbits  # the exponent of subnormals' (and the first binade's) ulp
    emax = (1 << (b - 1 - mbits)) - 2 - bias  # the largest finite binade
    m = entry - TJ + (mu_q >> CELL_SHIFT)
    neg = m < 0
    mag = torch.where(neg, -1 - m, m)  # |m'|, the cell's magnitude in units of u
    zero = mag == 0
    # the zero cell: the point's key by truncation, then its points
    slot_z = x & ((1 << P2) - 1)
    pat_z = trunc_magnitude(slot_z, e, dtype)
    # off zero: the cell's binade j = floor(log2 mag) + e - TS, its ulp 2^ex, L2 = log2(u / ulp)
    lg = ((mag.clamp(min=1).to(torch.float64).view(torch.int64) >> 52) & 0x7FF) - 1023
    j = lg + e - TS
    ex = torch.maximum(j - mbits, torch.full_like(j, emin_ex))
    l2 = (e - TS) - ex
    ok = zero | ((l2 >= 0) & (j <= emax))
    l2 = l2.clamp(0, PT)
    slot_o = x & ((1 << PT) - 1)
    off = slot_o >> (PT - l2)
    sig = (mag.clamp(max=1 << 20) << l2) | off
    normal = sig >= (1 << mbits)
    biased = torch.where(normal, ex + bias + mbits, torch.zeros_like(ex))
    pat_o = (biased.clamp(0, (1 << (b - 1 - mbits)) - 1) << mbits) | (sig & ((1 << mbits) - 1))
    pattern = torch.where(zero, pat_z, pat_o) | (neg.to(torch.int64) << (b - 1))
    key = em.keys_from_bits(pattern, dtype)
    first, cnt = zero_points(key, e, dtype)
    slot = torch.where(zero, slot_z, slot_o)
    cum = torch.where(zero, first, off << (PT - l2))
    freq = torch.where(zero, cnt, 1 << (PT - l2))
    scale = torch.where(zero, torch.full_like(m, P2), torch.full_like(m, PT))
    cum, freq = torch.where(ok, cum, torch.zeros_like(cum)), torch.where(ok, freq, torch.full_like(freq, 1 << PT))
    return key, torch.where(ok, slot, slot_o), cum, freq, torch.where(ok, scale, torch.full_like(scale, PT)), ok
