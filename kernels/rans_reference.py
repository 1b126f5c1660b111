"""Reference interleaved rANS coder in torch: the bytes the Triton kernels must reproduce.

Written after ryg_rans' rans64.h (Fabian Giesen, public domain). Three things bite:

1. **Encode runs in reverse.** rANS is a stack: the decoder pops symbols in the opposite
   order to the one the encoder pushed them. The encoder therefore walks each lane's symbols
   from last to first, so that the decoder can go forwards.
2. **Output grows backwards.** The encoder emits its words last-to-first; a lane's stream,
   as stored and as read by the decoder, is the final state (low word, high word) followed
   by the emitted words in *decode* order. Here this is: the word the encoder emitted while
   encoding step s is stored at decode position s (it is read right after decoding step s).
3. **Lanes interleave freely.** Symbol i of a page (flat C order) belongs to lane i % NL and
   is that lane's step i // NL. Lanes are independent coders with their own states and word
   streams, so one vector operation advances every lane (of every page in a batch) by one
   step. Streams are concatenated lane by lane (page by page in a batch).

State bounds (all arithmetic is int64, never overflows):

* The state x lives in [L, 2^63) with L = 2^31 = RANS_L: 31, not 32, bits below so that a
  state and a shifted-in 32-bit word, (x << 32) | w with x < L, still fits in 63 bits.
* Probabilities are out of M = 2^PROB_BITS = 2^28 (entropy_model.py), freq in [1, M].
* Encoding symbol (cum, freq) from x keeps x < 2^63 iff x < x_max = ((L >> 28) << 32) * freq
  = freq << 35; if not, one 32-bit word is emitted (x >>= 32) and then x < 2^31 <= x_max.
  x' = ((x // freq) << 28) + (x % freq) + cum < (x_max // freq) << 28 = 2^63, and x' >= L.
* Decoding: x' = freq * (x >> 28) + (x & (M-1)) - cum < 2^28 * 2^35 = 2^63; if x' < L, one
  word is shifted in, after which x >= 8 * 2^32 >= L. This holds for ANY words, so a corrupt
  stream cannot overflow the arithmetic; it is caught by the final check instead.
* Every lane starts encoding at x = L; after decoding its last step the state must be L
  again and all its words consumed (an integrity check for free).

A padded step with (cum, freq) = (0, M) is the identity for the encoder (x // M << 28 +
x % M = x, and x < M << 35 = 2^63 never emits): the encoder pads ragged lanes this way
instead of masking. M << 35 itself does not fit int64, so the encoder tests
x > ((freq - 1) << 35) + (2^35 - 1) (at most 2^63 - 1), which is x >= freq << 35.

Minimal API: ``encode(cum, freq, num_lanes) -> (words, lane_words)`` and ``Decoder``
(staged: ``decode(mu_q, e, r)`` for the next n symbols of every page, then ``finish()``).
The decoder computes C(k) itself (entropy_model.cdf), so it takes quantised parameters.
Run ``python -m sglang_speckv.kernels.rans_reference`` for the self-check and its speed.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from sglang_speckv.kernels import entropy_model as em
from sglang_speckv.kernels import table_model as tm

RANS_L = 1 << 31  # lower bound of the normalised state interval [L, 2^63)
WORD_BITS = 32  # the coder emits and reads 32-bit words
WORD_MASK = (1 << WORD_BITS) - 1
# Renormalisation bound x_max = freq << ENC_SHIFT (see the module docstring).
ENC_SHIFT = WORD_BITS + 31 - em.PROB_BITS  # 35
# The decoder's symbol search. It first *guesses* the key (float arithmetic, any error only
# costs time), then checks C exactly at the guess and WINDOW keys on either side; lanes
# whose slot falls outside that window (a few in 10^4 in the body of the distribution: keys
# denser than the guess is accurate, far tails, NaNs) take the exact k-ary search, which
# resolves SEARCH_BITS bits of the key per level with 2^SEARCH_BITS - 1 candidates at once
# (4 levels for 16-bit symbols, 2 for fp8). The result is the unique k with
# C(k) <= slot < C(k+1) either way: only integer C values decide it.
WINDOW = 2
SEARCH_BITS = 4
# The guess inverts the mixture through a table of its quantiles: t at which
# G = (256 - w) phi(t) + w phi(t >> kappa) crosses i / 2^QUANTILE_BITS of 2^32, linearly
# interpolated. 2^12 cells (32 KiB of float64) stay in a core's cache, which the C++ decoder's
# random lookups need (2^16 cells, 512 KiB, cost it ~30% of its time); the guess only sets
# the search's starting point, never a result.
QUANTILE_BITS = 12
# A decoder's out pages (Decoder.decode_values) are views of at most this many dims, any
# strides: a canonical page [2, layers, tokens, heads, dim] of a host buffer.
MAX_PAGE_DIMS = 5


def _as_batch(t: torch.Tensor) -> torch.Tensor:
    """[N] -> [1, N]; [P, N] unchanged."""
    if t.dim() == 1:
        return t.unsqueeze(0)
    if t.dim() != 2:
        raise ValueError(f"expected [N] or [P, N], got shape {tuple(t.shape)}")
    return t


def _params_batch(t: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """encode_values' bits, mu or sigma, or a decoder stage's mu or sigma: [N], [P, N], or
    one tensor per page of any shape whose C-order flattening is the page's N values
    (Predictor.predict_rows, possibly broadcast views) -> [P, N]. (rans_cpu reads per-page tensors in place; this
    materialises them.)"""
    if isinstance(t, torch.Tensor):
        return _as_batch(t)
    return torch.stack([page.reshape(-1) for page in t])


def _to_grid(t: torch.Tensor, first: int, num_lanes: int, fill: int) -> torch.Tensor:
    """[P, n] symbols first .. first + n - 1 of each page -> [steps, P * NL] by (step, lane),
    padded with ``fill`` where a (step, lane) is outside the range."""
    p, n = t.shape
    lead = first % num_lanes
    steps = -(-(lead + n) // num_lanes)
    padded = torch.full((p, steps * num_lanes), fill, dtype=t.dtype, device=t.device)
    padded[:, lead : lead + n] = t
    # [P, steps, NL] -> [steps, P, NL] -> [steps, P * NL]
    return padded.view(p, steps, num_lanes).transpose(0, 1).reshape(steps, p * num_lanes)


def _from_grid(grid: torch.Tensor, first: int, n: int, num_pages: int) -> torch.Tensor:
    """Inverse of _to_grid: [steps, P * NL] -> [P, n]."""
    steps, lanes = grid.shape
    num_lanes = lanes // num_pages
    lead = first % num_lanes
    flat = grid.view(steps, num_pages, num_lanes).transpose(0, 1).reshape(num_pages, steps * num_lanes)
    return flat[:, lead : lead + n]


def encode(
    cum: torch.Tensor, freq: torch.Tensor, num_lanes: int, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """rANS-encode P pages of N symbols each with ``num_lanes`` lanes per page.

    cum, freq: int64 [N] or [P, N] (one step per symbol, out of M = 2^PROB_BITS), or
    [P, N, S] with ``scale`` [P, N, S] (S steps per symbol in decode order, step t out of
    2^scale[..., t], scale <= 31: the table model's two steps); 0 <= cum, 1 <= freq,
    cum + freq <= 2^scale.
    Returns (words, lane_words): words int64 [W] with values in [0, 2^32), every lane's
    stream in decode order, lane after lane, page after page; lane_words int64 [P, NL] with
    sum == W. Every lane has at least its 2 flush words (also a lane with no symbols).
    """
    if scale is None:
        cum, freq = _as_batch(cum)[..., None], _as_batch(freq)[..., None]
        scale = torch.full_like(cum, em.PROB_BITS)
    if not (cum.shape == freq.shape == scale.shape and cum.dim() == 3):
        raise ValueError("cum, freq (and scale) must have one shape: [N], [P, N] or [P, N, steps]")
    if any(t.dtype != torch.int64 for t in (cum, freq, scale)):
        raise ValueError("cum, freq and scale must be int64 tensors")
    if num_lanes < 1:
        raise ValueError(f"num_lanes must be >= 1, got {num_lanes}")
    num_pages, _, per_symbol = cum.shape

    # Everything per-symbol happens here, before the loop: [steps, P * NL] grids, a
    # symbol's steps consecutive. (0, M) at scale PROB_BITS pads: identity steps.
    def grid(t, fill):
        levels = [_to_grid(t[..., i], 0, num_lanes, fill) for i in range(per_symbol)]
        return torch.stack(levels, dim=1).flatten(0, 1)  # [symbol steps * S, lanes]

    cum_g, freq_g, scale_g = grid(cum, 0), grid(freq, em.M), grid(scale, em.PROB_BITS)
    enc_shift = WORD_BITS + 31 - scale_g  # x_max = freq << (63 - scale)
    x_lim_g = ((freq_g - 1) << enc_shift) | ((1 << enc_shift) - 1)  # x_max - 1, fits int64
    steps, lanes = cum_g.shape
    out = torch.empty((steps, lanes), dtype=torch.int64, device=cum.device)
    emitted = torch.empty((steps, lanes), dtype=torch.bool, device=cum.device)

    x = torch.full((lanes,), RANS_L, dtype=torch.int64, device=cum.device)
    for s in range(steps - 1, -1, -1):  # in reverse (warning 1)
        emit = x > x_lim_g[s]
        out[s] = x & WORD_MASK
        emitted[s] = emit
        x = torch.where(emit, x >> WORD_BITS, x)
        q = torch.div(x, freq_g[s], rounding_mode="floor")
        x = (q << scale_g[s]) + (x - q * freq_g[s]) + cum_g[s]

    # Each lane's stream in decode order: flush (low, high), then emitted words by step.
    flush = torch.stack([x & WORD_MASK, x >> WORD_BITS], dim=1)  # [lanes, 2]
    all_words = torch.cat([flush, out.T], dim=1)  # [lanes, 2 + steps]
    keep = torch.cat([torch.ones_like(flush, dtype=torch.bool), emitted.T], dim=1)
    words = all_words[keep]  # row-major: lane by lane
    lane_words = keep.sum(dim=1).view(num_pages, num_lanes)
    return words, lane_words


def _word(words: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """words[index] as int64 in [0, 2^32) (words: int64, or int32 holding u32 words)."""
    return words[index].to(torch.int64) & WORD_MASK


def as_u32(words: torch.Tensor) -> torch.Tensor:
    """int64 words in [0, 2^32) -> int32 holding the same u32 bit patterns (half the bytes)."""
    return (words - ((words >> 31) << 32)).to(torch.int32)


def storage_from_keys(keys: torch.Tensor, dtype: str) -> torch.Tensor:
    """int64 keys -> the same shape in the storage dtype (bit patterns restored)."""
    bits = em.bits_from_keys(keys, dtype)
    if em.symbol_bits(dtype) == 16:
        raw = (bits - ((bits >> 15) << 16)).to(torch.int16)  # two's complement, no wrap
    else:
        raw = bits.to(torch.uint8)
    return raw.view(em.TORCH_DTYPES[dtype])


def encode_values(
    bits: torch.Tensor,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    dtype: str,
    num_lanes: int,
    w_wide: int = em.W_WIDE,
    kappa: int = em.KAPPA,
    model: str = tm.MODEL_EXACT,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The value-level encoder (what rans_cpu and rans_triton fuse, same bytes): storage
    patterns ``bits`` (int16 for 16-bit dtypes, else uint8) and float32 (mu, sigma), all
    [P, N] (or [N], or one tensor per page: see _params_batch) -> quantize_params -> the
    model's steps (``model``: "exact", entropy_model.cdf, one step per symbol; "table",
    table_model.symbol_steps, two) -> encode. Returns (words int32 [W] holding the u32 words,
    lane_words [P, NL])."""
    tm.check_model(model, dtype)
    keys = em.keys_from_bits(em.storage_bits(_params_batch(bits)), dtype)
    mu_q, e, r = em.quantize_params(_params_batch(mu), _params_batch(sigma))
    if model == tm.MODEL_TABLE:
        cum, freq, scale = tm.symbol_steps(keys, mu_q, e, r, dtype, w_wide, kappa)
    else:
        cum = em.cdf(keys, mu_q, e, r, dtype, w_wide, kappa)
        freq, scale = em.cdf(keys + 1, mu_q, e, r, dtype, w_wide, kappa) - cum, None
    del keys, mu_q, e, r
    words, lane_words = encode(cum, freq, num_lanes, scale)
    return as_u32(words), lane_words


# A blob may name any of 256 x 8 mixtures: the tables of only the last few stay cached.
@functools.lru_cache(maxsize=8)
def _quantile_table(w_wide: int, kappa: int) -> torch.Tensor:
    """float64 [2^QUANTILE_BITS + 1]: entry i is the smallest t (units of sigma/2^T_BITS)
    with G(t) >= i * 2^(32 - QUANTILE_BITS), found by integer bisection on em.phi."""
    table = em.phi_table()
    target = torch.arange((1 << QUANTILE_BITS) + 1, dtype=torch.int64) << (32 - QUANTILE_BITS)
    lo = torch.full_like(target, -((em.T_MAX << kappa) + 1))  # G(lo) = 0 <= target
    hi = torch.full_like(target, em.T_MAX << kappa)  # G(hi) = 2^32 >= target
    while bool((hi - lo > 1).any()):
        mid = (lo + hi) >> 1
        g = (em.W_TOTAL - w_wide) * em.phi(mid, table) + w_wide * em.phi(mid >> kappa, table)
        above = g >= target
        hi = torch.where(above, mid, hi)
        lo = torch.where(above, lo, mid)
    return hi.to(torch.float64)


def _nearest_key(v: torch.Tensor, dtype: str) -> torch.Tensor:
    """The key of the dtype value nearest to float64 v (clamped to the finite range)."""
    torch_dtype = em.TORCH_DTYPES[dtype]
    top = torch.finfo(torch_dtype).max
    x = v.nan_to_num(0.0).clamp(-top, top).to(torch.float32).to(torch_dtype)
    return em.keys_from_bits(em.storage_bits(x), dtype)


def page_rows(out_bits: torch.Tensor | Sequence[torch.Tensor], num_pages: int, num_symbols: int) -> list[torch.Tensor]:
    """A decoder's output pages as P tensors of N storage patterns each (int16 or uint8, one
    dtype): the rows of a [P, N] tensor (views), or the P pages given (e.g. the caller's own,
    decoded into in place), each of any shape of N elements up to MAX_PAGE_DIMS dims and any
    strides (e.g. a page's view of SGLang's host buffer), symbol i being element i of its
    flat C order. ValueError if they do not fit or a page overlaps itself (a stride 0)."""
    rows = list(out_bits.unbind(0)) if isinstance(out_bits, torch.Tensor) and out_bits.dim() == 2 else list(out_bits)
    ok = len(rows) == num_pages and all(
        t.dim() <= MAX_PAGE_DIMS and t.numel() == num_symbols and t.dtype in (torch.int16, torch.uint8)
        and t.dtype == rows[0].dtype and not any(st == 0 and sz > 1 for sz, st in zip(t.shape, t.stride()))
        for t in rows
    )  # fmt: skip
    if not ok:
        raise ValueError(f"out_bits must be [{num_pages}, {num_symbols}] or {num_pages} pages of {num_symbols} "
                         f"int16/uint8 patterns each (up to {MAX_PAGE_DIMS} dims, any strides, no stride 0)")
    return rows


def put_flat(page: torch.Tensor, start: int, values: torch.Tensor) -> None:
    """Write values [n] into elements [start, start + n) of page's flat C order, through
    the page's strides (a strided page: through an index of those elements)."""
    if page.is_contiguous():
        page.view(-1)[start : start + values.numel()] = values
    else:
        flat = torch.arange(start, start + values.numel(), device=page.device)
        page[torch.unravel_index(flat, page.shape)] = values


class Decoder:
    """Staged decoder for P pages coded by ``encode`` with the same lane count.

    ``decode(mu_q, e, r)`` decodes the next n symbols (flat order) of every page, given the
    quantised parameters of exactly those symbols ([P, n] or [n] for one page); stages may
    start and end mid-step (some lanes idle). ``finish()`` then reports, per page, whether
    every lane returned to RANS_L having consumed exactly its words.
    """

    def __init__(
        self,
        words: torch.Tensor,
        lane_words: torch.Tensor,
        num_symbols: int,
        dtype: str,
        w_wide: int = em.W_WIDE,
        kappa: int = em.KAPPA,
        model: str = tm.MODEL_EXACT,
    ):
        """words: int64 [W] in [0, 2^32) (lane streams, concatenated as ``encode`` returns
        them); lane_words: int64 [P, NL] (sum == W); num_symbols: N per page; model: the
        entropy model that coded them (table_model.MODELS)."""
        lane_words = _as_batch(lane_words)
        if words.dtype not in (torch.int64, torch.int32) or lane_words.dtype != torch.int64:
            raise ValueError("words must be int64 (or int32 holding u32 words) and lane_words int64")
        if int(lane_words.sum()) != words.numel():
            raise ValueError(f"lane_words sum {int(lane_words.sum())} != {words.numel()} words")
        self.num_pages, self.num_lanes = lane_words.shape
        self.num_symbols = num_symbols
        em.check_mixture(w_wide, kappa)
        if em.symbol_bits(dtype) % SEARCH_BITS:
            raise ValueError(f"{dtype}: symbol bits must be a multiple of SEARCH_BITS={SEARCH_BITS}")
        tm.check_model(model, dtype)
        self.dtype, self.w_wide, self.kappa, self.model = dtype, w_wide, kappa, model
        self.quantiles = _quantile_table(w_wide, kappa).to(words.device)
        self.offsets = torch.arange(-WINDOW, WINDOW + 2, device=words.device)  # [2W + 2]
        self.position = 0  # symbols of each page decoded so far
        # an empty stream still gets one (zero) word so that every gather below is in bounds
        self.words = words if words.numel() else torch.zeros(1, dtype=words.dtype, device=words.device)
        counts = lane_words.reshape(-1)  # [lanes]
        starts = torch.cumsum(counts, 0) - counts
        self.end = starts + counts
        last_word = self.words.numel() - 1
        low = _word(self.words, starts.clamp(max=last_word))
        high = _word(self.words, (starts + 1).clamp(max=last_word))
        x = low | (high << WORD_BITS)
        valid = (counts >= 2) & (high < (1 << 31)) & (x >= RANS_L)  # state in [L, 2^63)
        self.ok = valid.view(self.num_pages, self.num_lanes).all(dim=1)  # [P]
        self.x = torch.where(valid, x, torch.full_like(x, RANS_L))  # keeps arithmetic in range
        self.ptr = starts + 2
        self.lane_ok = torch.ones_like(valid)  # False once a lane decoded an impossible step

    def _search(self, slot, two_mu_q, off, inv):
        """Exact k-ary search: the key k with C(k) <= slot < C(k+1), and (C(k), C(k+1)).
        All [lanes]."""
        lo = torch.zeros_like(slot)
        c_lo = torch.zeros_like(slot)  # C(lo)
        c_hi = torch.full_like(slot, em.M)  # C(lo + 2^(shift + SEARCH_BITS)); C(2^B) = M
        two_mu_q, off, inv = two_mu_q[:, None], off[:, None], inv[:, None]
        digits = torch.arange(1, 1 << SEARCH_BITS, device=slot.device)  # [D - 1]
        for shift in range(em.symbol_bits(self.dtype) - SEARCH_BITS, -1, -SEARCH_BITS):
            cand = lo[:, None] + (digits << shift)  # [lanes, D - 1], in [1, 2^B - 1]
            c = em.cdf_inner(cand, two_mu_q, off, inv, self.dtype, self.w_wide, self.kappa)
            d = (c <= slot[:, None]).sum(dim=1)  # C is increasing: a prefix is <= slot
            ext = torch.cat([c_lo[:, None], c, c_hi[:, None]], dim=1)  # [lanes, D + 1]
            c_lo = ext.gather(1, d[:, None]).squeeze(1)
            c_hi = ext.gather(1, (d + 1)[:, None]).squeeze(1)
            lo = lo + (d << shift)
        return lo, c_lo, c_hi

    def _guess_and_check(self, slot, params, guide):
        """The key for each lane's slot and (C(k), C(k+1)): guess, check a window, and fall
        back to the exact search for lanes outside it. params: prepare()'s invariants;
        guide: (mu, sigma per t unit, key of mu) as float64/float64/int64. All [lanes].
        G^-1 of the slot is where the key's value should be; C(k) = k + G W / 2^32 needs k
        itself, so the guess is made twice, first with the key of mu in its place."""
        mu_f, sig_f, guess = guide
        floor_free = em.M - (1 << em.symbol_bits(self.dtype))  # counts G is spread over
        for _ in range(2):  # the second pass corrects the floor's +k with the first guess
            u = (slot - guess).clamp(0, floor_free).to(torch.float64) * ((1 << QUANTILE_BITS) / floor_free)
            i = u.to(torch.int64).clamp(max=(1 << QUANTILE_BITS) - 1)
            t_lo = em.lookup(self.quantiles, i)
            t = t_lo + (em.lookup(self.quantiles, i + 1) - t_lo) * (u - i)  # G^-1(slot - k)
            guess = _nearest_key(mu_f + sig_f * t, self.dtype)
        cand = (guess[:, None] + self.offsets).clamp(0, 1 << em.symbol_bits(self.dtype))  # [lanes, 2W + 2]
        c = em.cdf_prepared(cand, *(p[:, None] for p in params), self.dtype, self.w_wide, self.kappa)
        d = (c <= slot[:, None]).sum(dim=1) - 1  # last candidate with C <= slot
        d = d.clamp(0, 2 * WINDOW)[:, None]
        k = cand.gather(1, d).squeeze(1)
        c_lo = c.gather(1, d).squeeze(1)
        c_hi = c.gather(1, d + 1).squeeze(1)
        miss = ((c[:, 0] > slot) | (c[:, -1] <= slot)).nonzero().squeeze(1)
        if miss.numel():
            found = self._search(slot[miss], *(p[miss] for p in params))
            for full, part in zip((k, c_lo, c_hi), found):
                full[miss] = part
        return k, c_lo, c_hi

    def _pop(self, x, ptr, slot, cum, freq, scale):
        """One rANS decode step of every lane (slot = x & (2^scale - 1)), then at most one
        word shifted in: (x, ptr). Reads past a lane's words are caught in finish()."""
        x = freq * (x >> scale) + slot - cum
        need = x < RANS_L
        w = _word(self.words, ptr.clamp(max=self.words.numel() - 1))
        return torch.where(need, (x << WORD_BITS) | w, x), ptr + need

    def _table_symbol(self, x, ptr, g, cum1):
        """One symbol of every lane under the table model (docs/DESIGN.md "The table
        model"): the cell (or ESC), then the offset, the zero cell's point or the exact
        model's step. g: the step's grids (exact model's invariants and guide, then mu_q, e,
        r). Returns (key, x, ptr, ok)."""
        mu_q, e, r = g[6:]
        table = tm.dense(mu_q, e, r, self.dtype)
        slot_x = x & (em.M - 1)  # the exact model's step, for the symbols not in the table
        k_x, c_lo, c_hi = self._guess_and_check(slot_x, g[:3], g[3:6])
        x_x, ptr_x = self._pop(x, ptr, slot_x, c_lo, c_hi - c_lo, em.PROB_BITS)
        slot1 = x & ((1 << tm.PT) - 1)
        entry, c1, f1 = tm.decode_cell(slot1, tm.row_index(mu_q, r), cum1)
        x, ptr = self._pop(x, ptr, slot1, c1, f1, tm.PT)
        k, slot, cum, freq, scale, ok = tm.decode_level2(entry, x, mu_q, e, self.dtype)
        esc = (entry == tm.ESC).nonzero().squeeze(1)
        if esc.numel():  # the exact model's step for the escaped lanes
            slot_e = x[esc] & (em.M - 1)
            k_e, c_lo, c_hi = self._guess_and_check(slot_e, [p[esc] for p in g[:3]], [p[esc] for p in g[3:6]])
            for full, part in zip((k, cum, freq, slot, scale, ok), (k_e, c_lo, c_hi - c_lo, slot_e, em.PROB_BITS, True)):
                full[esc] = part
        x, ptr = self._pop(x, ptr, slot, cum, freq, scale)
        return (torch.where(table, k, k_x), torch.where(table, x, x_x), torch.where(table, ptr, ptr_x), ok | ~table)

    def _stage(self, params: tuple[torch.Tensor, ...], dtype: torch.dtype) -> tuple[list[torch.Tensor], int]:
        """The one argument check of a decoder stage, shared by the three coders: the
        stage's parameters ([P, n] or [n], all of ``dtype`` and one shape) as [P, n]
        batches that fit the pages from the current position, and n."""
        batch = [_as_batch(t) for t in params]
        if any(t.shape != batch[0].shape or t.dtype != dtype for t in batch):
            raise ValueError(f"the stage's parameters must be {dtype} tensors of one shape")
        n = batch[0].shape[1]
        if batch[0].shape[0] != self.num_pages or self.position + n > self.num_symbols:
            raise ValueError(
                f"decode of {tuple(batch[0].shape)} symbols at position {self.position} does not fit "
                f"{self.num_pages} pages of {self.num_symbols} symbols"
            )
        return batch, n

    def decode(self, mu_q: torch.Tensor, e: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """Keys (int64, [P, n] or [n] like the inputs) of the next n symbols of each page."""
        squeeze = mu_q.dim() == 1
        (mu_q, e, r), n = self._stage((mu_q, e, r), torch.int64)
        first, nl = self.position, self.num_lanes
        # Per-symbol invariants of C, and the guess's float view of the parameters (exact
        # products with powers of two), as [steps, lanes] grids; pads are harmless values.
        two_mu_q, off, inv = em.prepare(mu_q, e, r)
        mu_f = mu_q.to(torch.float64) * em.pow2_f64(e - em.F)
        sig_f = r.to(torch.float64) * em.pow2_f64(e - em.R - em.T_BITS)
        grids = [
            _to_grid(two_mu_q, first, nl, 0),
            _to_grid(off, first, nl, em.F),
            _to_grid(inv, first, nl, (1 << 32) >> em.R),
            _to_grid(mu_f, first, nl, 0),
            _to_grid(sig_f, first, nl, 1),
            _to_grid(_nearest_key(mu_f, self.dtype), first, nl, 0),
        ]
        if self.model == tm.MODEL_TABLE:
            grids += [_to_grid(mu_q, first, nl, 0), _to_grid(e, first, nl, 0), _to_grid(r, first, nl, 1 << em.R)]
            cum1 = tm.level1_table(self.w_wide, self.kappa).to(mu_q.device)
        steps = grids[0].shape[0]
        # Which (step, lane) cells hold a symbol of this stage: [steps, NL] -> lanes.
        cell = torch.arange(steps * nl, device=mu_q.device).view(-1, nl) + (first - first % nl)
        active_g = ((cell >= first) & (cell < first + n)).repeat(1, self.num_pages)
        keys_g = torch.empty_like(grids[0])
        x, ptr, lane_ok = self.x, self.ptr, self.lane_ok
        for s in range(steps):
            g = [grid[s] for grid in grids]
            if self.model == tm.MODEL_TABLE:
                k, x_new, ptr_new, ok = self._table_symbol(x, ptr, g, cum1)
            else:
                slot = x & (em.M - 1)
                k, c_lo, c_hi = self._guess_and_check(slot, g[:3], g[3:6])
                x_new, ptr_new = self._pop(x, ptr, slot, c_lo, c_hi - c_lo, em.PROB_BITS)
                ok = lane_ok
            if s == 0 or s == steps - 1:  # only the ends of a stage are ragged
                act = active_g[s]
                x_new = torch.where(act, x_new, x)
                ptr_new = torch.where(act, ptr_new, ptr)
                ok = ok | ~act
            x, ptr, lane_ok = x_new, ptr_new, lane_ok & ok
            keys_g[s] = k
        self.lane_ok = lane_ok
        self.x, self.ptr = x, ptr
        self.position += n
        keys = _from_grid(keys_g, first, n, self.num_pages)
        return keys[0] if squeeze else keys

    def decode_values(
        self,
        mu: torch.Tensor | Sequence[torch.Tensor],
        sigma: torch.Tensor | Sequence[torch.Tensor],
        out_bits: torch.Tensor | Sequence[torch.Tensor],
    ) -> None:
        """The value-level stage (what rans_cpu and rans_triton fuse): the next n symbols
        of each page from float32 (mu, sigma) [P, n] or [n], or one tensor per page whose
        C-order flattening is its n values (as encode_values takes them; rans_cpu reads
        those in place), written as storage patterns into columns [position, position + n)
        of out_bits (int16 for 16-bit dtypes, else uint8): [P, N], or P pages of N elements
        each, any shape and strides (see page_rows)."""
        (mu, sigma), _ = self._stage((_params_batch(mu), _params_batch(sigma)), torch.float32)
        rows = page_rows(out_bits, self.num_pages, self.num_symbols)
        first = self.position
        keys = self.decode(*em.quantize_params(mu, sigma))
        patterns = storage_from_keys(keys, self.dtype)  # [P, n]
        for row, page_patterns in zip(rows, patterns):
            put_flat(row, first, page_patterns.view(row.dtype))

    def finish(self) -> torch.Tensor:
        """bool [P]: True for pages whose every lane decoded all N symbols, consumed exactly
        its words and returned to RANS_L. False means a corrupt or foreign stream."""
        if self.position != self.num_symbols:
            raise ValueError(f"finish() after {self.position} of {self.num_symbols} symbols")
        lane_ok = (self.x == RANS_L) & (self.ptr == self.end) & self.lane_ok
        return self.ok & lane_ok.view(self.num_pages, self.num_lanes).all(dim=1)


# A lane costs about 80 bits beyond the ideal code length (its 32-bit entry in the lane
# table and the ~48 bits of its 64-bit final state that carry no information). 8192
# symbols per lane keep that under 0.3% even at 4 bits/symbol, while a 1M-symbol page still
# gets 128 lanes to spread over GPU threads (and torch vector lanes on a CPU).
SYMBOLS_PER_LANE = 8192
MAX_LANES = 1024  # beyond this, a page's lanes outnumber what one decode step can use


def default_lanes(n: int) -> int:
    """Lanes for a page of n symbols: the largest power of two <= n / SYMBOLS_PER_LANE,
    within [1, MAX_LANES]."""
    target = max(1, min(MAX_LANES, n // SYMBOLS_PER_LANE))
    return 1 << (target.bit_length() - 1)


# ---- Self-check (like ryg_rans' main.cpp: encode, decode, compare, print speed) ----------


def _self_check() -> None:
    import time

    torch.manual_seed(0)
    em.phi_table()  # built once per process: not part of the timings
    for dtype, n, num_lanes in (("bf16", 1 << 18, 1024), ("fp8_e4m3", 1 << 18, 1024)):
        torch_dtype = em.TORCH_DTYPES[dtype]
        scale = 1.0 if dtype == "bf16" else 16.0
        mu = torch.randn(n) * scale
        sigma = (torch.rand(n) + 0.1) * scale
        values = (mu + sigma * torch.randn(n)).to(torch_dtype)
        keys = em.keys_from_bits(em.storage_bits(values), dtype)
        mu_q, e, r = em.quantize_params(mu, sigma)
        raw_mb = n * values.element_size() / 1e6

        em.key_fields(dtype, "cpu")
        _quantile_table(em.W_WIDE, em.KAPPA)
        t0 = time.perf_counter()
        cum = em.cdf(keys, mu_q, e, r, dtype)
        freq = em.cdf(keys + 1, mu_q, e, r, dtype) - cum
        words, lane_words = encode(cum, freq, num_lanes)
        t1 = time.perf_counter()
        dec = Decoder(words, lane_words, n, dtype)
        half = n // 3  # two stages, cut mid-step
        got = torch.cat([dec.decode(mu_q[:half], e[:half], r[:half]), dec.decode(mu_q[half:], e[half:], r[half:])])
        ok = bool(dec.finish().all())
        t2 = time.perf_counter()

        ideal = float((em.PROB_BITS - torch.log2(freq.double())).sum())
        print(
            f"{dtype}: {n} symbols, {num_lanes} lanes, {torch.get_num_threads()} threads: "
            f"{words.numel() * 32 / n:.4f} bits/symbol "
            f"(ideal {ideal / n:.4f}); encode {raw_mb / (t1 - t0):.1f} MB/s, "
            f"decode {raw_mb / (t2 - t1):.1f} MB/s; round trip {'OK' if ok and torch.equal(got, keys) else 'FAILED'}"
        )
        if not (ok and torch.equal(got, keys)):
            raise SystemExit(1)


if __name__ == "__main__":
    _self_check()
