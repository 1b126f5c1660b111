"""Interleaved rANS64 in Triton: the GPU twin of kernels/rans_reference.py.

It must produce the SAME BYTES as the torch reference (``rans_reference.encode``) and decode
the same keys with the same verdict (``rans_reference.Decoder``), on every input; the tests
(tests/test_rans_triton.py) compare the two bit for bit, under TRITON_INTERPRET=1 on CPU and
natively on CUDA. The coder math is docs/DESIGN.md "The coder" (the table model: "The
table model"); every constant is imported from entropy_model.py / rans_reference.py /
table_model.py, none is repeated here.

Interface (identical to the reference's and rans_cpu's, so sglang_speckv/codec.py can
dispatch by device). What the codec calls, one kernel each (quantize_params, C and the rANS
step fused per symbol, as rans_cpu.cpp ``encode_values`` / ``decode_values`` do on the CPU;
nothing int64 per symbol on the device):

* ``encode_values(bits, mu, sigma, dtype, num_lanes, w_wide, kappa, model) -> (words,
  lane_words)``: storage patterns (int16 for 16-bit dtypes, uint8 for fp8) and float32
  (mu, sigma), all [P, N]; words int32 holding the u32 words, lane_words int64 [P, NL].
  ``model``: "exact" (entropy_model's C(k), one step per symbol) or "table" (16-bit
  dtypes: table_model's aligned lattice, a cell and its offset or zero-cell point, two
  steps per symbol; _encode_table_kernel).
* ``Encoder(bits, dtype, num_lanes, w_wide, kappa, model)`` with ``encode(mu, sigma)`` for
  the n symbols of every page before those coded so far, LAST CHUNK FIRST, and ``finish()
  -> (words, lane_words)``: encode_values' bytes with float32 (mu, sigma) [P, n] a chunk at
  a time (rans_cpu.Encoder's interface; the codec encodes through it, a chunk of rows at a
  time). encode_values is an Encoder given one chunk.
* ``Decoder(..., model=...).decode_values(mu, sigma, out_bits, params=None)``: the next n
  symbols of every page from float32 (mu, sigma) [P, n] into columns [position, position +
  n) of out_bits [P, N] (storage patterns); the table model through _decode_table_kernel,
  which reads int32 ``params`` [P, n] (``table_params(mu, sigma, dtype)``: quantize_params,
  the dense test, the row and mu's cell of each (mu, sigma), packed; computed here when not
  given; the codec computes them once per distinct (mu, sigma) and broadcasts them).

The integer-level interface (tests, examples/estimate_sm90.py):

* ``cdf(keys, mu_q, e, r, dtype, w_wide, kappa)``: ``entropy_model.cdf`` fused into one
  kernel (the encoder's cum = C(k) and freq = C(k+1) - C(k) come from two calls).
* ``encode(cum, freq, num_lanes) -> (words, lane_words)``: P pages of N symbols, NL lanes
  per page.
* ``Decoder(words, lane_words, num_symbols, dtype, w_wide, kappa)`` with staged
  ``decode(mu_q, e, r) -> keys`` and ``finish() -> ok [P]``. It inherits construction
  (stream validation, initial states) and ``finish`` from the reference Decoder: only the
  per-stage loop runs on the GPU. Both decode methods read int32 (u32) or int64 words.
  ``decode`` is the exact model's only (the table model raises NotImplementedError).

quantize_params in a kernel (``_quantize``, the port of rans_cpu.cpp ``quantize``) uses only
exact float64 operations, so the integers (mu_q, e, r) that reach the bitstream are the
reference's whatever the compiler fuses: the reasons are in its docstring
(tests/test_rans_triton.py checks it on random float32 bit patterns and on the edges).

How the work is laid out:

* One Triton program advances a block of lanes in lockstep; lane g of the batch is lane
  g % NL of page g // NL, and its step j is symbol l + j * NL of that page (DESIGN.md
  "Lanes"). Lanes of a page that run out of symbols (N not a multiple of NL) are masked.
* Encode walks steps in REVERSE and writes each lane's emitted words backwards into its
  own scratch region of N_steps + 2 words (one word per step at most: after one emission
  x < 2^31 <= freq << 35), then flushes the state (low, high) in front of them, and writes
  the lane's word count. A second kernel copies each lane's variable-length stream into the
  contiguous output at its exclusive-scan offset. ``encode`` writes int64 words in
  [0, 2^32) like the reference, ``encode_values`` int32 holding the u32 words (its scratch
  is int32 too). ``Encoder`` runs the value kernels on a chunk of symbols [first, first +
  n) of every page at a time (the steps it touches; the lanes' states read from and
  written back to an int64 array, the flush only in the chunk with first == 0), compacts
  each chunk's words as it completes (its scratch is then freed), and ``finish`` copies the
  chunks' streams lane by lane into the output (_gather_kernel; the last chunk coded
  first, as its words come first in the lane's stream).
* Decode keeps each lane's state x and read pointer in device arrays between stages; a
  decode program is one warp of DECODE_LANES = 32 lanes. Per symbol it finds the key with
  C(key) <= slot < C(key + 1) by guess and check (rans_cpu.cpp decode_stage does the same
  on the CPU, rans_reference.Decoder with a wider window): the guess inverts the Gaussian
  mixture through the reference's quantile table (float32 here, only ever a starting
  point); C(guess) and C(guess + 1) are evaluated together (they share X(guess)); if every
  lane of the program hit, that is the whole search. Otherwise the missed lanes gallop
  away from the guess (probes 1, 3, 7, 15 keys beyond it, GALLOP_ROUNDS at most) and
  bisect what is left of their bracket, while the others idle: at most 2 + 4 + B
  evaluations, and every decision is an exact integer comparison of C with the slot, so
  the keys (and the bytes) are those of the reference whatever the guess. A read past the
  lane's words reads ``words[min(ptr, W - 1)]`` exactly as the reference does; ``finish``
  then rejects it.

Expected speed: an ESTIMATE, NOT MEASURED (no GPU was available when this was written; the
``__main__`` self-check prints the real figure on a CUDA machine). examples/estimate_sm90.py
compiles the decode kernel for sm_90 without a GPU, counts the SASS instructions of each
path of its step loop, counts how often the guesses miss with the kernel itself (interpreted,
``Decoder.decode(..., probes=...)``), and combines them; docs/BENCHMARKS.md "Coder on GPU"
has its table:

* Decode is integer-compute bound. When every lane of a program hits, a symbol costs ~400
  SASS instructions (the guess ~70; C(guess) and C(guess + 1) ~240: three X(k) from the
  keys' bits, per boundary the offset and t with one 64-bit multiply and two PHI lookups of
  two gathers each from an 8 KiB table that stays in L1, the mixture; INV, the loads, the
  state update and the warp vote the rest). A gallop or bisection round (one C(k)) adds
  ~150. Guesses miss for 0.06% of Gaussian bf16 symbols and 0.12% of SmolLM2's bf16 KV
  under page_stats, so a 32-lane program runs its fallback on 2-3% of steps: ~410-420
  instructions per bf16 symbol, ~390 per fp8 one, where the binary search this replaced
  took ~2.15k and ~1.14k (and measured 14-16 / 12-14 GB/s on an H100). At the 12-16 T
  thread-instructions/s such loops issue on an H100 that is ~57-79 GB/s of bf16 KV and
  ~31-41 GB/s of fp8. Memory is not the limit: ~32 B per symbol (mu_q, e, r as int64, the
  key) is ~1e11 symbols/s at ~3 TB/s. The ceiling needs ~100k lanes in flight per launch
  (e.g. 128 pages x 1024 lanes); fewer lanes leave the GPU latency bound. These counts are
  of ``_decode_kernel``; ``_decode_values_kernel`` runs the same search (``_find_key``)
  plus quantize_params (16 float64 instructions in its sm_90 SASS, and the integer ops
  around them: not yet counted per path) and reads ~10 B per symbol (mu, sigma; the
  pattern and value written) instead of 32.
* Encode: ``encode_values`` is one pass per symbol: quantize_params, C(k) and C(k + 1)
  together (``_cdf_pair``, ~240 instructions as in decode), one 64-bit division (~70), 10 B
  read (pattern, mu, sigma) and at most 4 B of scratch written; then the copy of the words.
  Its scratch writes are scattered (one region per lane); a step-major scratch would
  coalesce them if the encoder ever shows up in a profile.

* The table model (table_model.py, T2: cells aligned to multiples of u): per symbol its
  int32 parameters (e, the lookup row: the row or the exact model's, r's low bits, mu's
  cell: ``table_params``, an elementwise kernel run outside the step loop, once per
  distinct (mu, sigma)), level 1 (one int64 lookup word per row and slot bucket: the entry
  holding the bucket's first slot, table_model.level1_start, and the counts of one step
  from it; a symbol that is not dense reads the identity step and ESC), the level-1 rANS
  step (every lane: no select), level 2 (both kinds of cell as one integer n read through
  float32(n)'s bits: a zero cell's point truncated, or an offset cell's significand with
  the offset's L2 raw bits; the key's points in closed form: int32, no search), the
  level-2 rANS step (for bf16 without a multiply: the step is 2^w slots on a multiple of
  2^w, so it only removes bits of x; _rans_pop_bits). One warp vote per step opens the
  rare cases: a lane still short of its entry (the row's bisection; 5% of steps on SmolLM2
  KV) and the exact model's step (which alone reads and quantises mu; e and r are in the
  parameters) for a lane that escaped or is not dense. Its hit path compiles to 92 SASS
  instructions (bf16; 152 fp16) against 467 (491) for the exact model's value-level
  kernel; table_params costs ~112 per (mu, sigma) (examples/estimate_sm90.py splits them
  by source line; docs/BENCHMARKS.md "Table model T2: identity steps, a multiply-free
  level-2 step" has the table).

Device memory of the value-level path, from its allocations (not measured: no GPU here),
per symbol of a batch of P pages of N symbols and NL lanes (S = cdiv(N, NL) steps):

* ``Encoder.encode`` of a chunk of n symbols per page (S' = the steps it touches): the
  scratch, int32 [P * NL * (S' + 2)] (4 B per symbol of the chunk: a lane emits at most one
  word per step, since after an emission x < 2^31 <= freq << 35, plus its 2-word final
  state; the table model's two steps per symbol: [P * NL * (2 S' + 2)], 8 B), freed once
  the chunk's words (4 B per word, ~bits per symbol / 8 B per symbol) are compacted out
  of it, and 4 B per lane per chunk kept (its word count) plus 8 B per lane while it is
  compacted; the lanes' states (8 B per lane); in ``finish`` the output words beside the
  chunks' (each chunk freed after its copy). ``encode_values`` is one chunk of S steps:
  4 B (8 B) per symbol of the batch. The route through the reference's wrapper it replaces held
  int64 keys, mu_q, e, r, cum, keys + 1, the second C and freq: 64 B per symbol at the
  peak of its second ``cdf`` (more inside quantize_params), then an int64 scratch and int64
  words.
* ``Decoder.decode_values``: nothing per symbol under the exact model (the inputs (mu,
  sigma) and the output patterns are the caller's), words 4 B each; under the table model
  the int32 params (4 B per symbol) where the caller passes none, and once per device its
  tables (level-1 rows 65 KiB, lookup words 514 KiB). The old route held int64 mu_q, e, r and keys
  and the int64 temporaries of storage_from_keys: ~56 B per symbol of a stage (more inside
  quantize_params), and the codec widened the words to int64 (4 -> 8 B per word, with a
  transient int64 copy).

Run ``python -m sglang_speckv.kernels.rans_triton`` on a CUDA machine (or with
TRITON_INTERPRET=1 on CPU, slowly) for the self-check.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from sglang_speckv.kernels import entropy_model as em
from sglang_speckv.kernels import rans_reference as ref
from sglang_speckv.kernels import table_model as tm

# The reference's constants, wrapped so that @triton.jit code may read them as globals.
_PROB_BITS = tl.constexpr(em.PROB_BITS)
_M = tl.constexpr(em.M)
_F = tl.constexpr(em.F)
_X_SHIFT_MAX = tl.constexpr(em.X_SHIFT_MAX)
_X_MAX = tl.constexpr(em.X_MAX)
_DIFF_MAX = tl.constexpr(em.DIFF_MAX)
_T_MAX = tl.constexpr(em.T_MAX)
_T_SHIFT = tl.constexpr(em.T_SHIFT)
_INTERP_BITS = tl.constexpr(em.INTERP_BITS)
_INTERP_MASK = tl.constexpr((1 << em.INTERP_BITS) - 1)
_T_SAT = tl.constexpr(em.T_MAX << em.KAPPA_MAX)
_W_TOTAL = tl.constexpr(em.W_TOTAL)
_RANS_L = tl.constexpr(ref.RANS_L)
_WORD_BITS = tl.constexpr(ref.WORD_BITS)
_WORD_MASK = tl.constexpr(ref.WORD_MASK)
_ENC_SHIFT = tl.constexpr(ref.ENC_SHIFT)
_R = tl.constexpr(em.R)
_R_MIN = tl.constexpr(1 << em.R)  # the smallest r of quantize_params (masked lanes load it)
_T_BITS = tl.constexpr(em.T_BITS)
# quantize_params' clamps. All are powers of two: exact in float32 and float64 alike, so
# however Triton materialises them (a float literal becomes fp32, promoted to the float64
# operand) they are the reference's values.
_SIGMA_MIN = tl.constexpr(em.SIGMA_MIN)  # 2^-60
_SIGMA_MAX = tl.constexpr(em.SIGMA_MAX)  # 2^60
_MU_INF = tl.constexpr(em.MU_INF)  # 2^100
_X_MAX_F = tl.constexpr(float(em.X_MAX))  # 2^50
_TWO_R = tl.constexpr(float(1 << em.R))  # 2^R
_TWO52 = tl.constexpr(2.0**52)  # round-half-even by addition (see _round_half_even)
_NUM_CELLS = tl.constexpr(1 << ref.QUANTILE_BITS)  # cells of the guess's quantile table
# The table model's constants (table_model.py; docs/DESIGN.md "The table model").
_TS = tl.constexpr(tm.TS)
_CELL_SHIFT = tl.constexpr(tm.CELL_SHIFT)  # a cell is u = 2^CELL_SHIFT units of delta
_TJ = tl.constexpr(tm.TJ)
_NCELL = tl.constexpr(tm.NCELL)
_ESC = tl.constexpr(tm.ESC)
_ROW = tl.constexpr(tm.ROW)  # entries of a level-1 row (NCELL + 2)
# Level 1's fallback bisects the NCELL cells (a power of two) in log2(NCELL) probes after
# probing ESC's entry: no probe reads past entry NCELL, and the last read is NCELL + 1.
CELL_PROBES = tm.NCELL.bit_length() - 1  # 7
_CELL_PROBES = tl.constexpr(CELL_PROBES)
# The level-1 lookup (table_model.level1_start): 2^START_BITS buckets per row, then
# START_STEPS correction steps before a program falls back to the bisection. One int64 lookup
# word (_level1_lookup) holds the bucket's entry and the three cumulative counts of that one step.
_START_BITS = tl.constexpr(tm.START_BITS)
_START_SHIFT = tl.constexpr(tm.PT - tm.START_BITS)
START_STEPS = 1
_FB = tl.constexpr(tm.FB)
_FB_MASK = tl.constexpr((1 << tm.FB) - 1)
_PT = tl.constexpr(tm.PT)
_PT_MASK = tl.constexpr((1 << tm.PT) - 1)
_PT_ONE = tl.constexpr(1 << tm.PT)  # probability one at scale PT (the identity step's freq)
_P2 = tl.constexpr(tm.P2)
_P2_MASK = tl.constexpr((1 << tm.P2) - 1)
_POINTS = tl.constexpr(1 << tm.P2)  # points of a zero cell
# log2 of the widest cell, u = 2^(e - TS) with e <= log2(SIGMA_MAX): every zero-cell value is below it
_U_LOG_MAX = tl.constexpr(int(em.SIGMA_MAX).bit_length() - 1 - tm.TS)
# log2 of the smallest nonzero zero-cell point, 2^-P2 of the narrowest cell (e >= log2(SIGMA_MIN))
_POINT_LOG_MIN = tl.constexpr(-(int(1 / em.SIGMA_MIN).bit_length() - 1) - tm.TS - tm.P2)
_DENSE_MAX = tl.constexpr(tm.CELL_SHIFT - tm.DENSE_LOG)  # table_model.dense: log2 key spacing <= this
_SIGMA2_SHIFT = tl.constexpr(em.F - em.R + 1)  # r << this = 2 sigma in units of delta
_BUCKET_SHIFT = tl.constexpr(em.R - tm.TB)  # table_model.row_index: b = (r >> (R - TB)) - 2^TB
_NUM_BUCKETS = tl.constexpr(1 << tm.TB)
# A key's magnitude in cells saturates at sig << MAG_SAT (>= 2^16) in int32 where the
# reference's saturates at sig << MAG_SHIFT_MAX in int64: both are far beyond every cell a
# dense symbol codes (see "The table model" below), so both escape.
_MAG_SAT = tl.constexpr(16)
# The table decoder's per-symbol parameters, one int32 (table_params, _pack_params): what its
# hit path needs of quantize_params' (mu_q, e, r), so the quantisation runs once per distinct
# (mu, sigma) (page_stats: per channel) instead of once per symbol in the step loop. Bits
# 0-7 e + E_OFF, bits 8-14 the row, bit 15 set where NOT dense, bit 16 set for a masked lane
# only (never by table_params), bits 17-21 r's low R - TB bits (the row holds its top TB
# bits below the leading one: the exact model's step gets r back without sigma), bits
# 22-31 mq - TJ (signed; mq is mu's cell, 0 where not dense: level 2's cell is the level-1
# entry plus this field, _decode_level2). Bits 8-16 are the level-1 lookup row in place:
# the lookup word's index is those bits and the slot's bucket below them (_level1_entry);
# not dense selects the exact model's rows, masked the masked lanes' (_level1_lookup).
_PARAM_E_OFF = tl.constexpr(128)  # e in [-60, 61]
_PARAM_ROW_SHIFT = tl.constexpr(tm.START_BITS)  # 8: e's byte below, the slot's bucket in the lookup index
_PARAM_EXACT = tl.constexpr(tm.ROWS << 8)  # bit 15: rows are 7 bits
# bits 8-16: the lookup row (the row, + ROWS the exact model's, 2 ROWS the masked lanes')
_PARAM_LROW_MASK = tl.constexpr(((4 * tm.ROWS) - 1) << tm.START_BITS)
_PARAM_R_SHIFT = tl.constexpr(17)
_PARAM_R_MASK = tl.constexpr((1 << (em.R - tm.TB)) - 1)
_PARAM_MQ_SHIFT = tl.constexpr(17 + em.R - tm.TB)  # 22: |mq - TJ| <= 2^(MB - 2) + TJ <= 320 < 2^9
_PARAM_MASKED = tl.constexpr((2 * tm.ROWS << 8) | 128)  # a masked lane: its lookup row, e = 0, mq - TJ = 0
# Level 1's entry in the decoder: i = c + TJ in [0, NCELL) for the cell c relative to mu's,
# or I_ESC for ESC (table_model's ESC = NCELL), far enough from the cells that level 2 reads
# ESC's "cell" I_ESC + mq - TJ (in [2^MB, 2^(MB + 1)) for bf16: |mq| <= 2^(MB - 2)) as a
# magnitude whose step is the identity (d = 0): bf16's _rans_pop_bits needs no select for
# the exact model's lanes. One byte in the lookup words (_level1_lookup). A masked lane's
# row has the identity step and entry I_MASKED: no vote, and d = 0 too (mq - TJ = 0).
I_ESC = 255
I_MASKED = 254
_I_ESC = tl.constexpr(I_ESC)

# Lanes per program of the encoder: 128 = 4 warps (Triton's default) of one lane per thread.
BLOCK_LANES = 128
# The decoder's programs are one warp of 32 lanes. A program pays for its worst lane (the
# search's loops run while any lane needs them), so 32 lanes make a missed guess 4x less
# contagious than 128 (a block misses 2.7% of steps instead of 11% on Gaussian bf16 pages),
# and the loops' conditions are warp votes instead of shared-memory reductions behind two
# barriers each. The cost: at most 32 one-warp programs per SM (an H100's limit), i.e. 32
# warps, where ptxas' 48 registers would allow ~40. Chosen from examples/estimate_sm90.py
# (--warps 4 shows the other side); not yet timed on a GPU.
DECODE_WARPS = 1
DECODE_LANES = 32 * DECODE_WARPS
# Elements per program of the elementwise cdf kernel (8 per thread: enough independent
# loads in flight for a memory-bound kernel) and words per iteration of the stream copy.
BLOCK_ELEMS = 1024
# The decoder's galloping probes before it bisects what is left of a missed guess's side
# (see _decode_kernel): 4 bracket a key up to 15 keys past the guess in <= 4 + 3 probes.
GALLOP_ROUNDS = 4


# ---- The entropy model, as @triton.jit helpers (mirror entropy_model.py) -----------------
#
# Same integers as entropy_model.cdf, but each value is held in the narrowest type it provably
# fits (int64 is emulated with 2-4 instructions per op on a GPU): keys, exponents, shift
# amounts, t after saturation, PHI values and C itself are int32; X(k), the boundary offset,
# the t product and the mixture are int64. Exact arithmetic in either width gives the same
# integers, so this changes speed, not bytes (tests/test_rans_triton.py checks every key).


@triton.jit
def _value_units(k, e, BITS: tl.constexpr, MAN_BITS: tl.constexpr, BIAS: tl.constexpr, FN_NAN: tl.constexpr):
    """X(k) = entropy_model.value_units: int32 key k in [0, 2^B) -> its value in units of
    delta = 2^(e - F) (int32 e in [-60, 61]), truncated toward zero, saturated to +-X_MAX.
    Computed from the key's bits (the reference looks up per-key field tables); int64 out."""
    EXP_BITS: tl.constexpr = BITS - 1 - MAN_BITS
    TOP: tl.constexpr = 1 << (BITS - 1)
    ONES: tl.constexpr = (1 << BITS) - 1
    bits = tl.where((k & TOP) != 0, k ^ TOP, k ^ ONES)  # entropy_model.bits_from_keys
    negative = (bits >> (BITS - 1)) != 0
    biased = (bits >> MAN_BITS) & ((1 << EXP_BITS) - 1)
    mant = bits & ((1 << MAN_BITS) - 1)
    if FN_NAN:  # e4m3fn: only S.1111.111 is special (NaN)
        special = (biased == (1 << EXP_BITS) - 1) & (mant == (1 << MAN_BITS) - 1)
    else:  # IEEE-like: all-ones exponent is inf/NaN
        special = biased == (1 << EXP_BITS) - 1
    # subnormals (biased 0) have no implicit bit and the exponent of biased 1
    sig = mant + ((biased != 0).to(tl.int32) << MAN_BITS)  # < 2^11
    shift = tl.maximum(biased, 1) - BIAS - MAN_BITS - e + _F  # |value| / delta = sig * 2^shift
    # |shift| < 2^10. Left: << at most X_SHIFT_MAX saturates (sig >= 1) or keeps 0. Right:
    # >> 31 clears any sig < 2^11 exactly as the reference's >> 63 does.
    up = sig.to(tl.int64) << tl.minimum(tl.maximum(shift, 0), _X_SHIFT_MAX)
    down = sig >> tl.minimum(tl.maximum(-shift, 0), 31)
    mag = tl.minimum(tl.where(shift >= 0, up, down.to(tl.int64)), _X_MAX)
    mag = tl.where(special, _X_MAX, mag)  # inf and NaN saturate to the side of their sign
    return tl.where(negative, -mag, mag)


@triton.jit
def _phi(t, phi_ptr):
    """entropy_model.phi: 2^24 * Phi(t / 2^T_BITS), linear between the table's knots; int32
    t in, int32 out. The table has a padding entry, so PHI[i + 1] is in bounds at +T_MAX."""
    u = tl.minimum(tl.maximum(t, -_T_MAX), _T_MAX) + _T_MAX  # [0, 2 T_MAX]
    i = u >> _INTERP_BITS
    f = u & _INTERP_MASK
    lo = tl.load(phi_ptr + i).to(tl.int32)  # PHI <= 2^24
    hi = tl.load(phi_ptr + i + 1).to(tl.int32)
    # hi - lo < 2^17 (Phi's slope 0.4 times 2^24 / 64 per knot), times f < 2^14: < 2^31
    return lo + (((hi - lo) * f) >> _INTERP_BITS)


@triton.jit
def _inverse(r):
    """INV = 2^32 // r (entropy_model.prepare), int64, for int64 r in [1, 2^32) (quantize_params
    gives [2^R, 2^(R+1)]): (2^32 - 1) // r in uint32, plus 1 where r divides 2^32 (a power of
    two). Exact, and one 32-bit division instead of the ~80-instruction 64-bit one."""
    r32 = r.to(tl.uint32)
    q = tl.full(r.shape, 0xFFFFFFFF, tl.uint32) // r32
    return q.to(tl.int64) + ((r32 & (r32 - 1)) == 0).to(tl.int64)


@triton.jit
def _cdf_from_boundary(k, boundary, two_mu_q, inv, phi_ptr, w_wide, kappa, BITS: tl.constexpr):
    """C(k) = entropy_model.cdf, int32, for int32 keys k in [0, 2^B], given the key's lower
    boundary X(k - 1) + X(k) (int64, units of delta / 2; any value at the ends k = 0 and
    k = 2^B, whose C is fixed). Arithmetic >> of a negative t floors, exactly as torch's."""
    NUM_KEYS: tl.constexpr = 1 << BITS
    diff = tl.minimum(tl.maximum(boundary - two_mu_q, -_DIFF_MAX), _DIFF_MAX)
    t = (diff * inv) >> _T_SHIFT  # (boundary - mu) / sigma in units of sigma / 2^T_BITS
    # Saturating t at T_MAX << KAPPA_MAX (2^30) changes neither phi(t) nor phi(t >> kappa)
    # for any kappa <= KAPPA_MAX (both are clamped at T_MAX inside phi), and makes it int32.
    t = tl.minimum(tl.maximum(t, -_T_SAT), _T_SAT).to(tl.int32)
    g = (_phi(t, phi_ptr).to(tl.int64) * (_W_TOTAL - w_wide)
         + _phi(t >> kappa, phi_ptr).to(tl.int64) * w_wide)  # [0, 2^32]
    g = tl.where(k <= 0, 0, g)
    g = tl.where(k >= NUM_KEYS, 1 << 32, g)
    return k + ((g * (_M - NUM_KEYS)) >> 32).to(tl.int32)  # <= M = 2^28


@triton.jit
def _cdf(k, two_mu_q, e, inv, phi_ptr, w_wide, kappa,
         BITS: tl.constexpr, MAN_BITS: tl.constexpr, BIAS: tl.constexpr, FN_NAN: tl.constexpr):
    """C(k) = entropy_model.cdf, int32, for int32 keys k in [0, 2^B]; the per-symbol
    invariants come precomputed as in entropy_model.prepare: two_mu_q = 2 mu_q (int64),
    e (int32), inv = 2^32 // r (int64)."""
    NUM_KEYS: tl.constexpr = 1 << BITS
    kc = tl.minimum(tl.maximum(k, 1), NUM_KEYS - 1)  # the ends are fixed in _cdf_from_boundary
    boundary = (_value_units(kc - 1, e, BITS, MAN_BITS, BIAS, FN_NAN)
                + _value_units(kc, e, BITS, MAN_BITS, BIAS, FN_NAN))
    return _cdf_from_boundary(k, boundary, two_mu_q, inv, phi_ptr, w_wide, kappa, BITS)


@triton.jit
def _cdf_pair(k, two_mu_q, e, inv, phi_ptr, w_wide, kappa,
              BITS: tl.constexpr, MAN_BITS: tl.constexpr, BIAS: tl.constexpr, FN_NAN: tl.constexpr):
    """(C(k), C(k + 1)) for int32 keys k in [0, 2^B): two _cdf sharing X(k), three value
    units instead of four (rans_cpu.cpp Model::cdf_pair)."""
    NUM_KEYS: tl.constexpr = 1 << BITS
    x_k = _value_units(k, e, BITS, MAN_BITS, BIAS, FN_NAN)
    below = _value_units(tl.maximum(k - 1, 0), e, BITS, MAN_BITS, BIAS, FN_NAN)
    above = _value_units(tl.minimum(k + 1, NUM_KEYS - 1), e, BITS, MAN_BITS, BIAS, FN_NAN)
    c_lo = _cdf_from_boundary(k, below + x_k, two_mu_q, inv, phi_ptr, w_wide, kappa, BITS)
    c_hi = _cdf_from_boundary(k + 1, x_k + above, two_mu_q, inv, phi_ptr, w_wide, kappa, BITS)
    return c_lo, c_hi


@triton.jit
def _pow2_f64(n):
    """2.0^n as float64 from its bits (exact; int n within [-1022, 1023])."""
    return ((n.to(tl.int64) + 1023) << 52).to(tl.float64, bitcast=True)


@triton.jit
def _round_half_even(v):
    """torch.round of float64 v (half to even) without a libdevice call, as rans_cpu.cpp
    round_half_even: below 2^52 in magnitude, |v| + 2^52 is rounded by the addition itself
    to the nearest integer (ties to even, the default rounding mode) and subtracting 2^52
    again is exact; from 2^52 up every float64 is an integer already. (a + c) - c is not
    folded: Triton sets no reassociation flags, and the sm_90 PTX keeps both operations. A
    caller's product may be fused with the addition (see _quantize for why that is exact)."""
    a = tl.abs(v)
    rounded = tl.where(a < _TWO52, (a + _TWO52) - _TWO52, a)
    return tl.where(v < 0, -rounded, rounded)


@triton.jit
def _quantize(mu, sigma):
    """entropy_model.quantize_params of float32 (mu, sigma), operation for operation (the
    port of rans_cpu.cpp ``quantize``): (mu_q int64, e int32, r int64). Every float64 op
    is exact, so the integers are the reference's on any device:

    * float32 -> float64 widening, the NaN / <= 0 replacements and the clamps to powers of
      two (min / max select an operand) are exact;
    * frexp is read from the bits of s, a positive normal float64 after the clamps: its
      exponent field gives e, and 1.m is s with the exponent field set to 0;
    * 1.m * 2^R and m * 2^(F - e) multiply by exact powers of two with results far inside
      float64's normal range (|m| <= 2^100 or a float32 >= 2^-149, F - e in [-40, 80]), so
      each product is exact. The compiler may contract a product with the addition of
      _round_half_even into an FMA (the sm_90 build does: 1.m * 2^R + 2^52 becomes one
      ``fma.rn.f64``), which rounds p + 2^52 once where p was rounded first, but rounding
      an exact product is the identity: the same value either way.
    * the rounding is _round_half_even; the float64 -> int64 conversions get integers.
    """
    s = sigma.to(tl.float64)
    s = tl.where(s != s, 1.0, s)  # NaN -> 1
    s = tl.where(s <= 0, _SIGMA_MIN, s)  # 0, -0, negatives, -inf -> SIGMA_MIN
    s = tl.minimum(tl.maximum(s, _SIGMA_MIN), _SIGMA_MAX)  # +inf -> SIGMA_MAX
    u = s.to(tl.int64, bitcast=True)  # sign bit 0
    e = ((u >> 52) - 1023).to(tl.int32)  # s = 1.m * 2^e, e in [-60, 60]
    one_m = ((u & ((1 << 52) - 1)) | (1023 << 52)).to(tl.float64, bitcast=True)  # 1.m in [1, 2)
    r = _round_half_even(one_m * _TWO_R).to(tl.int64)  # in [2^R, 2^(R+1)]
    carry = r == 2 * _R_MIN  # 1.m rounded up to 2: r = 2^R, one octave up
    r = tl.where(carry, _R_MIN, r)
    e = e + carry.to(tl.int32)
    return _quantize_mu(mu, e), e, r


@triton.jit
def _quantize_mu(mu, e):
    """_quantize's mu_q (int64) of float32 mu given its e (int32, from sigma)."""
    m = mu.to(tl.float64)
    m = tl.where(m != m, 0.0, m)  # NaN -> 0
    m = tl.minimum(tl.maximum(m, -_MU_INF), _MU_INF)  # +-inf -> +-MU_INF
    mu_q = _round_half_even(m * _pow2_f64(-e + _F))  # e in [-60, 61]: 2^(F - e) is normal
    return tl.minimum(tl.maximum(mu_q, -_X_MAX_F), _X_MAX_F).to(tl.int64)


@triton.jit
def _key_of_pattern(pattern, BITS: tl.constexpr):
    """entropy_model.keys_from_bits for int32 storage patterns in [0, 2^B)."""
    TOP: tl.constexpr = 1 << (BITS - 1)
    ONES: tl.constexpr = (1 << BITS) - 1
    return tl.where((pattern & TOP) != 0, pattern ^ ONES, pattern | TOP)


@triton.jit
def _pattern_of_key(key, BITS: tl.constexpr):
    """entropy_model.bits_from_keys for int32 keys in [0, 2^B)."""
    TOP: tl.constexpr = 1 << (BITS - 1)
    ONES: tl.constexpr = (1 << BITS) - 1
    return tl.where((key & TOP) != 0, key ^ TOP, key ^ ONES)


# ---- The table model T2, as @triton.jit helpers (mirror table_model.py) -------------------
#
# table_model.py's docstring (docs/DESIGN.md "The table model") is the specification: cells
# of width u = 2^(e - TS) at absolute multiples of u, level 1 the cell relative to mu's,
# level 2 a cell's offset as raw bits (off zero) or a point of the two zero cells.
#
# Everything here is int32. A dense symbol (table_model.dense) has |mu| + 2 sigma <
# 2^(CELL_SHIFT - DENSE_LOG + MB + 1) units of delta, so mu's cell floor(mu / u) (``mq``)
# lies in [-2^(MB - 2), 2^(MB - 2)] and every cell it codes, m = c + mq with c in [-TJ, TJ),
# has |m| < 2^9 (fp16: 64 + 256). The kernels hold mq in int32 for dense symbols only (0 for
# the others, whose table steps are never coded: the exact model's step replaces them), so
# the reference's int64 clamps there (MAG_SHIFT_MAX, mag <= 2^20 in decode_level2) never
# bite, and magnitudes that saturate here (sig << MAG_SAT >= 2^16) are beyond +-TJ cells of
# mq exactly where the reference's are.


@triton.jit
def _dense(mu_q, e, r, MAN_BITS: tl.constexpr, BIAS: tl.constexpr):
    """table_model.dense: the symbol is coded by the table (else by the exact model's one
    step): the key spacing at |mu| + 2 sigma, 2^ls units of delta, is at most a cell over
    2^DENSE_LOG. int64 mu_q, r; int32 e. floor(log2 v) is the exponent of float64(v)
    (v < 2^51: exact)."""
    v = tl.abs(mu_q) + (r << _SIGMA2_SHIFT)  # |mu| + 2 sigma in delta, in [2^21, 2^51)
    lv = (v.to(tl.float64).to(tl.int64, bitcast=True) >> 52).to(tl.int32) - 1023
    # log2 of the key spacing there, max(lv, EMIN + F - e) - MB (below the smallest normal:
    # the subnormal spacing), with e moved out of the max
    ls = tl.maximum(lv + e, 1 - BIAS + _F) - e - MAN_BITS
    return ls <= _DENSE_MAX


@triton.jit
def _mu_cell(mu_q, table):
    """floor(mu / u) = mu_q >> CELL_SHIFT as int32 where ``table`` (a dense symbol: exact,
    see above), 0 elsewhere."""
    return tl.where(table, (mu_q >> _CELL_SHIFT).to(tl.int32), 0)


@triton.jit
def _row_index(mu_q, r):
    """table_model.row_index, int32: (sigma bucket << FB) | mu's position in its cell (bits
    CELL_SHIFT - FB .. CELL_SHIFT - 1 of mu_q, all in its low 32 bits). int64 mu_q, r."""
    b = (r.to(tl.int32) >> _BUCKET_SHIFT) - _NUM_BUCKETS  # r in [2^R, 2^(R+1))
    return (b << _FB) | ((mu_q.to(tl.int32) >> (_CELL_SHIFT - _FB)) & _FB_MASK)


@triton.jit
def _pack_params(mu_q, e, r, MAN_BITS: tl.constexpr, BIAS: tl.constexpr):
    """quantize_params' (mu_q, e, r) of a symbol as the table decoder's int32 parameters:
    the row (table_model.row_index), dense (table_model.dense), e, r's low bits, and mu's
    cell mq (_mu_cell: 0 where not dense). Unpacked by _unpack_params and _param_r."""
    table = _dense(mu_q, e, r, MAN_BITS, BIAS)
    mq = _mu_cell(mu_q, table)
    r_low = r.to(tl.int32) & _PARAM_R_MASK
    return (((mq - _TJ) << _PARAM_MQ_SHIFT) | (r_low << _PARAM_R_SHIFT) | tl.where(table, 0, _PARAM_EXACT)
            | (_row_index(mu_q, r) << _PARAM_ROW_SHIFT) | (e + _PARAM_E_OFF))


@triton.jit
def _unpack_params(params):
    """(lookup row << 8, mq - TJ, e) of _pack_params' int32: the lookup row is the row, plus
    ROWS where the symbol is not dense (_level1_lookup's rows of the exact model's step), 2
    ROWS for a masked lane (_PARAM_MASKED)."""
    return params & _PARAM_LROW_MASK, params >> _PARAM_MQ_SHIFT, (params & 255) - _PARAM_E_OFF


@triton.jit
def _param_r(params):
    """quantize_params' r (int64) of _pack_params' int32: 2^R, the row's sigma bucket (r's
    top TB bits below the leading one) and the low R - TB bits."""
    b = (params & (_PARAM_EXACT - 1)) >> (_PARAM_ROW_SHIFT + _FB)
    low = (params >> _PARAM_R_SHIFT) & _PARAM_R_MASK
    return ((b << _BUCKET_SHIFT) + low + _R_MIN).to(tl.int64)


@triton.jit
def _magnitude_fields(mag, MAN_BITS: tl.constexpr, BIAS: tl.constexpr):
    """(sig, ex) of int32 magnitude patterns (sign bit clear): the value sig * 2^ex, as
    entropy_model.key_fields for finite ones (inf and NaN get their bits' fields here)."""
    biased = mag >> MAN_BITS
    sig = (mag & ((1 << MAN_BITS) - 1)) + ((biased != 0).to(tl.int32) << MAN_BITS)  # < 2^11
    return sig, tl.maximum(biased, 1) - BIAS - MAN_BITS


@triton.jit
def _ceil_shift(v, s):
    """ceil(v * 2^s) for int32 v in [0, 2^12) and any int32 s, the left shift saturating at
    P2 (then v 2^s >= 2^P2 for v >= 1: past every zero-cell point). table_model._first_point
    shifts left at most MAG_SHIFT_MAX and right at most 63; >> 31 of -v >= -2^12 gives what
    >> 63 gives."""
    up = v << tl.minimum(tl.maximum(s, 0), _P2)
    down = -((-v) >> tl.minimum(tl.maximum(-s, 0), 31))
    return tl.where(s >= 0, up, down)


@triton.jit
def _zero_points(mag, e, MAN_BITS: tl.constexpr, BIAS: tl.constexpr, MAX_MAG: tl.constexpr):
    """table_model.zero_points of keys with magnitude pattern ``mag`` in a zero cell (|x| < u;
    other keys get values that are never coded): (first, count), int32; count <= 0: no point
    (ESC). The next larger magnitude is (sig + 1) 2^ex, also across a binade edge (2^(MB+1)
    2^ex = 2^MB 2^(ex+1)), so its first point needs no second decode; past the largest
    finite magnitude (the next is inf) the points end at 2^P2. For these keys sig 2^s < 2^P2
    (s < P2): no shift saturates."""
    sig, ex = _magnitude_fields(mag, MAN_BITS, BIAS)
    s = ex - e + (_TS + _P2)  # first point = ceil(sig 2^ex 2^P2 / u) = ceil(sig 2^s)
    first = _ceil_shift(sig, s)
    nxt = tl.where(mag < MAX_MAG, tl.minimum(_ceil_shift(sig + 1, s), _POINTS), _POINTS)
    return first, nxt - first


@triton.jit
def _table_steps(pattern, mq, e, BITS: tl.constexpr, MAN_BITS: tl.constexpr, BIAS: tl.constexpr):
    """table_model.symbol_steps of a dense symbol, the exact model's step left to the caller:
    (entry, cum2, freq2, scale2, esc), int32. int32 storage pattern, mq = _mu_cell, e. The
    level-1 entry is the cell c = m - mq plus TJ, or ESC (then cum2, freq2 and scale2 are
    garbage, freq2 possibly <= 0: the caller codes the exact model's step); level 2 is the
    zero cell's point range at scale P2, or the offset's L2 = -sh raw bits at scale PT."""
    EXP_ONES: tl.constexpr = (1 << (BITS - 1 - MAN_BITS)) - 1
    MAX_MAG: tl.constexpr = ((EXP_ONES - 1) << MAN_BITS) | ((1 << MAN_BITS) - 1)  # the largest finite
    mag_pat = pattern & ((1 << (BITS - 1)) - 1)
    sig, ex = _magnitude_fields(mag_pat, MAN_BITS, BIAS)
    sh = ex - e + _TS  # log2(ulp / u) (table_model.cell_of)
    mag = tl.where(sh >= 0, sig << tl.minimum(tl.maximum(sh, 0), _MAG_SAT),
                   sig >> tl.minimum(tl.maximum(-sh, 0), 31))  # floor(|x| / u), saturated (see above)
    c = tl.where((pattern >> (BITS - 1)) != 0, -1 - mag, mag) - mq  # the cell m, relative to mu's
    zero = mag == 0  # m = 0 or -1
    first, cnt = _zero_points(mag_pat, e, MAN_BITS, BIAS, MAX_MAG)
    esc = (mag_pat > MAX_MAG) | (c < -_TJ) | (c >= _TJ) | tl.where(zero, cnt <= 0, sh > 0)
    # off zero (not escaped: sh <= 0) the offset is sig's low L2 = -sh bits, a step of
    # 2^(PT - L2) at scale PT: q = PT - L2 (clamped as the reference clamps L2 to [0, PT])
    q = tl.minimum(tl.maximum(sh + _PT, 0), _PT)
    cum = tl.where(zero, first, (sig << q) & _PT_MASK)  # offset << (PT - L2)
    freq = tl.where(zero, cnt, 1 << q)
    return tl.where(esc, _ESC, c + _TJ), cum, freq, tl.where(zero, _P2, _PT), esc


@triton.jit
def _trunc_magnitude(n, e, BITS: tl.constexpr, MAN_BITS: tl.constexpr, BIAS: tl.constexpr):
    """table_model.trunc_magnitude: the magnitude pattern (int32) of the largest finite value
    <= n u / 2^P2 for int32 n in [0, 2^P2). float32(n) is exact and scaling it by
    2^(e - TS - P2) only adds to its exponent, so the bits are read from float32(n) with that
    exponent: the same integers as the reference's float64 product, without a multiply (the
    top MB bits below the leading one are float32's as they are float64's)."""
    EXP_BITS: tl.constexpr = BITS - 1 - MAN_BITS
    EMIN: tl.constexpr = 1 - BIAS
    EMAX: tl.constexpr = (1 << EXP_BITS) - 2 - BIAS
    MAX_MAG: tl.constexpr = ((EMAX + BIAS) << MAN_BITS) | ((1 << MAN_BITS) - 1)
    u = n.to(tl.float32).to(tl.int32, bitcast=True)  # sign bit 0
    big_e = (u >> 23) - 127 + e - (_TS + _P2)  # the exponent of n u / 2^P2
    frac = (u >> (23 - MAN_BITS)) & ((1 << MAN_BITS) - 1)  # its top MAN_BITS
    normal = ((big_e + BIAS) << MAN_BITS) | frac
    # subnormal: 1.frac >> (EMIN - E), which is (m | 2^52) >> (52 - MB + EMIN - E) in two steps
    sub = (frac | (1 << MAN_BITS)) >> tl.minimum(tl.maximum(EMIN - big_e, 0), 31)
    mag = tl.where(big_e >= EMIN, normal, sub)
    mag = tl.where(big_e > EMAX, MAX_MAG, mag)
    return tl.where(n == 0, 0, mag)


@triton.jit
def _decode_point(n, e, BITS: tl.constexpr, MAN_BITS: tl.constexpr, BIAS: tl.constexpr):
    """A zero cell's point n (int32 in [0, 2^P2)) decoded: (magnitude pattern, first, count),
    int32, i.e. table_model.trunc_magnitude and the zero_points of its key, the points in
    closed form from n. With s = log2 of the key's ulp in points (ex - (e - TS - P2)) and
    the key (sig, ex) the truncation of n (sig 2^s <= n < (sig + 1) 2^s; the next magnitude
    is (sig + 1) 2^ex, also across a binade edge): for s >= 0 keys sit on multiples of 2^s
    points, so first = n rounded down to one and the next key's first = first + 2^s; for
    s < 0, sig 2^s lies in (n - 1, n] and (sig + 1) 2^s in (n, n + 1]: first = n, next n + 1.
    Only the largest finite magnitude (the truncation clamps there: n may lie far beyond its
    value) takes the general first point; its points end at 2^P2."""
    EXP_BITS: tl.constexpr = BITS - 1 - MAN_BITS
    EMAX: tl.constexpr = (1 << EXP_BITS) - 2 - BIAS
    MAX_MAG: tl.constexpr = ((EMAX + BIAS) << MAN_BITS) | ((1 << MAN_BITS) - 1)
    mag = _trunc_magnitude(n, e, BITS, MAN_BITS, BIAS)
    s = tl.maximum(mag >> MAN_BITS, 1) - (BIAS + MAN_BITS) - e + (_TS + _P2)  # ex from the exponent field
    w = tl.minimum(tl.maximum(s, 0), _P2)  # 2^P2 points or more: the key owns [0, 2^P2) (n >> s = 0)
    first = n & (-1 << w)
    nxt = tl.minimum(first + (1 << w), _POINTS)
    if EMAX < _U_LOG_MAX:  # fp16: a zero cell may reach the largest finite magnitude (bf16's never does)
        top = mag == MAX_MAG
        first = tl.where(top, _ceil_shift((1 << (MAN_BITS + 1)) - 1, s), first)
        nxt = tl.where(top, _POINTS, nxt)
    return mag, first, nxt - first


@triton.jit
def _level1_bisect(slot1, row_ptr):
    """table_model.decode_cell: the entry i in [0, NCELL] of a level-1 row (int32 CUM1[row],
    ROW entries from row_ptr, per lane) with CUM1[i] <= slot1 < CUM1[i + 1], and CUM1[i].
    Branch-free: ESC's entry is probed first, the cells bisected with probes i + NCELL / 2,
    ..., i + 1 (CUM1[0] = 0, rows strictly increasing)."""
    c_esc = tl.load(row_ptr + _ESC)
    entry = tl.zeros_like(slot1)
    cum = tl.zeros_like(slot1)
    for level in tl.static_range(_CELL_PROBES):
        cand = entry + ((_NCELL >> 1) >> level)
        c = tl.load(row_ptr + cand)
        take = c <= slot1
        entry = tl.where(take, cand, entry)
        cum = tl.where(take, c, cum)
    esc = c_esc <= slot1
    return tl.where(esc, _ESC, entry), tl.where(esc, c_esc, cum)


@triton.jit
def _level1_entry(slot1, lrow, lookup_ptr):
    """table_model.decode_cell by one lookup: (i, CUM1[i], CUM1[i + 1]), int32, of level-1
    row ``lrow >> START_BITS`` (_unpack_params; CUM1 = _level1_table's row; i the entry,
    _I_ESC for ESC) where CUM1[i] <= slot1 < CUM1[i + 1] unless CUM1[i + 1] <= slot1 still
    (the lane is short of its entry: the caller bisects the row, _level1_bisect). The word
    of the row's bucket slot1 >> (PT - START_BITS) (int64 from lookup_ptr, _level1_lookup)
    holds CUM1[i0], CUM1[i0 + 1], CUM1[i0 + 2] and the entries i0 and i0 + 1, i0 =
    table_model.level1_start (the entry of the bucket's first slot): the one predicated
    step forward (START_STEPS) while CUM1[i + 1] <= slot1. A lane is short where its bucket
    holds more entry starts (the rows' tails; 5% of 32-lane steps on SmolLM2 KV). A row >=
    ROWS (a symbol that is not dense, a masked lane) reads (_I_ESC, 0, 2^PT): the identity
    step, then the exact model's."""
    word = tl.load(lookup_ptr + (lrow | (slot1 >> _START_SHIFT)))
    lo = word.to(tl.int32)  # CUM1[i0 + 1] << 16 | CUM1[i0]
    hi = (word >> 32).to(tl.int32)  # (i0 + 1) << 24 | i0 << 16 | CUM1[i0 + 2], the entries as bytes
    c0, c1, c2 = lo & 0xFFFF, (lo >> 16) & 0xFFFF, hi & 0xFFFF
    step = c1 <= slot1
    return tl.where(step, hi >> 24, hi >> 16) & 0xFF, tl.where(step, c1, c0), tl.where(step, c2, c1)


@triton.jit
def _decode_level2(entry, x16, mq_off, e, live, BITS: tl.constexpr, MAN_BITS: tl.constexpr, BIAS: tl.constexpr):
    """table_model.decode_level2 for a dense lane whose level-1 entry (_level1_entry) is a
    cell (ESC lanes, entry _I_ESC, get garbage, replaced by the caller, and for bf16 d = 0):
    (pattern, d, rem, freq, scale, ok), int32; the storage pattern instead of the key, the
    step as the d bits of x it removes (_rans_pop_bits; bf16) and as the slot's offset in
    its step rem = slot - cum and freq (_rans_pop). x16 = x & (2^P2 - 1), x the state after
    level 1; mq_off = _mu_cell - TJ (params); live: the lanes whose result is used. Where ok
    is False (a cell off zero narrower than the key spacing or beyond the largest finite
    binade: a corrupt stream) the step is the identity (0, 2^PT) at scale PT, and the
    pattern the reference's (its clamps of l2 and of the biased exponent; its clamp of the
    cell's magnitude at 2^20 never bites here: |m| < 2^9). By _decode_level2_float
    (_decode_level2_general in the rare program with a live lane in an impossible cell)."""
    m = entry + mq_off  # the cell, c + mq
    neg = m < 0
    mag = tl.where(neg, -1 - m, m)  # |m'|, the cell's magnitude in units of u
    zero = mag == 0
    pattern, d, rem, freq, scale, ok = _decode_level2_float(mag, zero, x16, e, live, BITS, MAN_BITS, BIAS)
    return pattern | (neg.to(tl.int32) << (BITS - 1)), d, rem, freq, scale, ok


@triton.jit
def _decode_level2_float(mag, zero, x16, e, live, BITS: tl.constexpr, MAN_BITS: tl.constexpr, BIAS: tl.constexpr):
    """_decode_level2 of a cell of magnitude ``mag`` (int32, >= 0): (magnitude pattern, d,
    rem, freq, scale, ok), int32, exact where ok. Both kinds of cell are one integer n <
    2^25 read as the value n 2^e0, e0 = e - TS - P2: the zero cell's point n = x16 (scale
    P2), an offset cell's 2 ((|m'| << PT) | slot) (scale PT, its slot's units halved so
    that both share e0; n is even there, so float32(n) is exact too). float32(n) is exact,
    and its bits give the key with no FMA (bf16 moves the exponent by an exact multiply by
    2^e0, see below; fp16 by an integer add): the truncation of a zero cell's
    point, an offset cell's significand (|m'| and the slot's top L2 bits) is n truncated to
    MB bits below its leading one, float32(n)'s bits >> (23 - MB) with the exponent moved by
    e0 (below the smallest normal binade: its MB + 1 significant bits shifted down to the
    subnormal ulp; beyond the largest: the largest finite magnitude, a zero cell's
    truncation). The key's ulp is 2^w units of n, w = max(floor(log2 value), EMIN) - MB -
    e0, clamped to [0, P2] on a zero cell (keys finer than a point are one point each, and
    +0's range at most the cell); off zero w = PT - L2 + 1 in [1, P2] (ok iff L2 >= 0 and
    the binade is finite). The step is the key's 2^w units from cum = n rounded down to a
    multiple of 2^w, so slot - cum is the slot's low bits below the step's, as x16's: the
    step removes x's bits [scale - d, scale), d = P2 - w (_rans_pop_bits), i.e. freq = 2^(P2
    - d) and rem = x16 & (freq - 1), except for the largest finite magnitude in a zero cell,
    whose points start at the general first point (_ceil_shift) and end at 2^P2 (rem and
    freq hold it). A program with a ``live`` lane in an impossible cell (never on a stream
    the encoder wrote) redoes every lane by _decode_level2_general, which gives the
    reference's pattern there too. For bf16 no value of a dense symbol's cells is subnormal
    or beyond the largest binade, and no cell narrower than a key: those parts, the vote
    and the branch compile away."""
    EXP_BITS: tl.constexpr = BITS - 1 - MAN_BITS
    EMIN: tl.constexpr = 1 - BIAS
    EMAX: tl.constexpr = (1 << EXP_BITS) - 2 - BIAS  # the largest finite binade
    MAX_MAG: tl.constexpr = ((EMAX + BIAS) << MAN_BITS) | ((1 << MAN_BITS) - 1)  # the largest finite
    MAG_MAX: tl.constexpr = _TJ + (1 << (MAN_BITS - 2))  # |m'| of a dense symbol's cells (|mq| <= 2^(MB - 2))
    SUBNORMAL: tl.constexpr = EMIN > _POINT_LOG_MIN  # a point may lie below the smallest normal
    BEYOND: tl.constexpr = EMAX < _U_LOG_MAX + MAN_BITS  # a cell may reach past the largest finite
    NARROW: tl.constexpr = MAG_MAX >= (1 << (MAN_BITS + 1))  # a cell may be narrower than a key
    n = tl.where(zero, x16, ((mag << _PT) | (x16 & _PT_MASK)) << 1)
    scale = tl.where(zero, _P2, _PT)
    e0 = e - (_TS + _P2)
    bits = n.to(tl.float32).to(tl.int32, bitcast=True)  # n < 2^25, even when >= 2^24: exact
    exp_n = (bits >> 23) - 127  # floor(log2 n) (-127 for n = 0)
    top = bits >> (23 - MAN_BITS)  # float32's exponent field and top MB mantissa bits
    pattern = top + ((e0 + BIAS - 127) << MAN_BITS)  # a normal key
    if SUBNORMAL:
        w = tl.maximum(tl.maximum(exp_n, EMIN - e0) - MAN_BITS, 0)
        sub = ((top & ((1 << MAN_BITS) - 1)) | (1 << MAN_BITS)) >> tl.minimum(EMIN - e0 - exp_n, 31)
        pattern = tl.where(exp_n + e0 >= EMIN, pattern, sub)
    else:
        w = tl.maximum(exp_n - MAN_BITS, 0)  # <= P2 on a zero cell (n < 2^P2)
    if SUBNORMAL | BEYOND | NARROW:
        ok = zero | (w <= _P2)  # off zero: L2 >= 0
        w = tl.minimum(w, _P2)
    else:  # bf16: a zero cell's n < 2^P2 and w <= P2 - MB; off zero n < 2^(MB + P2) (|m'| < 2^MB), w < P2
        ok = tl.full(mag.shape, 1, tl.int1)
        w = tl.minimum(w, _P2)  # d = 0, the identity, for ESC's lanes (|m'| >= 2^MB: w >= P2; _I_ESC)
    if BEYOND:
        pattern = tl.where(exp_n + e0 > EMAX, MAX_MAG, pattern)  # a zero cell's truncation (off zero: not ok)
        ok = ok & (zero | (exp_n + e0 <= EMAX))
    if BIAS == 127:  # bf16, float32's exponent range: the top 16 bits of float32(n) 2^e0, +0 included
        # an exact multiply by a power of two: e0 = e - TS - P2 in [-77, 44], and a dense
        # symbol's cells' values lie in [2^-77, 2^67): both factors and the product are
        # normal, so nothing rounds, and no add follows for a compiler to fuse into an FMA
        pattern = ((n.to(tl.float32) * ((e0 + 127) << 23).to(tl.float32, bitcast=True)).to(tl.int32, bitcast=True)
                   >> (23 - MAN_BITS))
    else:
        pattern = tl.where(n == 0, 0, pattern)
    d = _P2 - w
    freq = (1 << scale) >> d
    rem = x16 & (freq - 1)
    if BEYOND:  # the zero cell's largest finite magnitude: its first point in general, its points to 2^P2
        last = zero & (pattern == MAX_MAG)
        first = _ceil_shift((1 << (MAN_BITS + 1)) - 1, EMAX - MAN_BITS - e0)
        rem = tl.where(last, n - first, rem)
        freq = tl.where(last, _POINTS - first, freq)
    if SUBNORMAL | BEYOND | NARROW:
        if tl.max((live & ~ok).to(tl.int32), axis=0) > 0:  # an impossible cell: a corrupt stream
            pattern, rem, freq, scale, ok = _decode_level2_general(mag, zero, x16, e, BITS, MAN_BITS, BIAS)
    return pattern, d, rem, freq, scale, ok


@triton.jit
def _decode_level2_general(mag, zero, x16, e, BITS: tl.constexpr, MAN_BITS: tl.constexpr, BIAS: tl.constexpr):
    """_decode_level2 of a cell of magnitude ``mag`` for any 16-bit dtype (fp16: subnormal
    points, cells beyond the largest finite binade): (magnitude pattern, rem, freq, scale,
    ok), int32; the zero cell by _decode_point, an offset cell from its binade."""
    EXP_BITS: tl.constexpr = BITS - 1 - MAN_BITS
    EMIN_EX: tl.constexpr = 1 - BIAS - MAN_BITS  # the exponent of subnormals' (and the first binade's) ulp
    EMAX: tl.constexpr = (1 << EXP_BITS) - 2 - BIAS  # the largest finite binade
    # the zero cell: the point's magnitude by truncation, and its points
    pat_z, first, cnt = _decode_point(x16, e, BITS, MAN_BITS, BIAS)
    # off zero: the cell's binade j = floor(log2 mag) + e - TS (exact: mag < 2^9 in float32),
    # its ulp 2^ex, L2 = log2(u / ulp) raw bits of offset
    lg = (tl.maximum(mag, 1).to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 127
    j = lg + e - _TS
    ex = tl.maximum(j - MAN_BITS, EMIN_EX)
    ok = zero | ((ex <= e - _TS) & (j <= EMAX))  # L2 = (e - TS) - ex >= 0, a finite binade
    q = tl.minimum(tl.maximum(ex - e + (_TS + _PT), 0), _PT)  # PT - L2, L2 clamped to [0, PT]
    slot_o = x16 & _PT_MASK
    # the significand (|m'| << L2) | offset, the offset the slot's top L2 bits: < 2^24
    sig = ((mag << _PT) | slot_o) >> q
    biased = tl.where(sig >= (1 << MAN_BITS), tl.minimum(ex + BIAS + MAN_BITS, (1 << EXP_BITS) - 1), 0)
    pat_o = (biased << MAN_BITS) | (sig & ((1 << MAN_BITS) - 1))
    pattern = tl.where(zero, pat_z, pat_o)
    slot = tl.where(zero, x16, slot_o)
    cum = tl.where(zero, first, (slot_o >> q) << q)  # offset << (PT - L2)
    freq = tl.where(zero, cnt, 1 << q)
    scale = tl.where(zero, _P2, _PT)
    return pattern, tl.where(ok, slot - cum, slot_o), tl.where(ok, freq, _PT_ONE), tl.where(ok, scale, _PT), ok


@triton.jit
def _table_params_kernel(mu_ptr, sigma_ptr, params_ptr, num_elems,
                         MAN_BITS: tl.constexpr, BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """The table decoder's int32 parameters (_pack_params) of float32 (mu, sigma), elementwise:
    mu, sigma float32 [num_elems], params int32 [num_elems]."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < num_elems
    mu = tl.load(mu_ptr + offs, mask=mask, other=0.0)
    sigma = tl.load(sigma_ptr + offs, mask=mask, other=1.0)
    mu_q, e, r = _quantize(mu, sigma)
    tl.store(params_ptr + offs, _pack_params(mu_q, e, r, MAN_BITS, BIAS), mask=mask)


@triton.jit
def _cdf_kernel(keys_ptr, mu_q_ptr, e_ptr, r_ptr, phi_ptr, out_ptr,
                num_elems, w_wide, kappa,
                BITS: tl.constexpr, MAN_BITS: tl.constexpr, BIAS: tl.constexpr, FN_NAN: tl.constexpr,
                BLOCK: tl.constexpr):
    """out[i] = C(keys[i]) under (mu_q[i], e[i], r[i]); all int64 [num_elems]."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < num_elems
    k = tl.load(keys_ptr + offs, mask=mask, other=0).to(tl.int32)
    mu_q = tl.load(mu_q_ptr + offs, mask=mask, other=0)
    e = tl.load(e_ptr + offs, mask=mask, other=0).to(tl.int32)
    r = tl.load(r_ptr + offs, mask=mask, other=1)
    c = _cdf(k, 2 * mu_q, e, _inverse(r), phi_ptr, w_wide, kappa, BITS, MAN_BITS, BIAS, FN_NAN)
    tl.store(out_ptr + offs, c.to(tl.int64), mask=mask)


# ---- Encoder ------------------------------------------------------------------------------


@triton.jit
def _rans_push(x, ptr, cum, freq, scale, active, scratch_ptr):
    """One encoder step of the active lanes at scale s (rans_reference.encode; s = PROB_BITS
    for the exact model, PT, P2 or PROB_BITS for the table model's steps): emit a word below
    scratch[ptr] if x >= x_max = freq << (63 - s), then x = (x // freq << s) + x % freq + cum.
    int64 x, ptr (the lane's next free word + 1), cum, freq; s an int or an int tensor <= 31.
    x_max is 2^63 where freq = 2^s (a step of probability one), so the test is the
    reference's x > x_max - 1 = ((freq - 1) << (63 - s)) | (2^(63 - s) - 1), which fits
    int64. The word is stored in scratch's element type (int64, or int32 holding the u32
    word: a truncation of x & (2^32 - 1))."""
    shift = _WORD_BITS + 31 - scale  # x_max = freq << shift; ENC_SHIFT for s = PROB_BITS
    ones = (tl.full(x.shape, 1, tl.int64) << shift) - 1
    emit = active & (x > (((freq - 1) << shift) | ones))
    ptr = tl.where(emit, ptr - 1, ptr)
    tl.store(scratch_ptr + ptr, (x & _WORD_MASK).to(scratch_ptr.dtype.element_ty), mask=emit)
    x_norm = tl.where(emit, x >> _WORD_BITS, x)
    q = x_norm // freq  # x >= 0 and freq >= 1: truncation == floor
    x = tl.where(active, (q << scale) + (x_norm - q * freq) + cum, x)
    return x, ptr


@triton.jit
def _rans_flush(x, ptr, end, offs_lane, flush, lane_mask, scratch_ptr, count_ptr):
    """Where ``flush``, the final state in front of the lane's words (low word, then high
    word, < 2^31); count[lane] = its words in its scratch region (they end at ``end``), int32,
    for every lane."""
    ptr = tl.where(flush, ptr - 2, ptr)
    tl.store(scratch_ptr + ptr, (x & _WORD_MASK).to(scratch_ptr.dtype.element_ty), mask=flush)
    tl.store(scratch_ptr + ptr + 1, (x >> _WORD_BITS).to(scratch_ptr.dtype.element_ty), mask=flush)
    tl.store(count_ptr + offs_lane, (end - ptr).to(tl.int32), mask=lane_mask)


@triton.jit
def _encode_kernel(cum_ptr, freq_ptr, scratch_ptr, count_ptr,
                   num_lanes, lanes_per_page, num_symbols, num_steps,
                   BLOCK_LANES: tl.constexpr):
    """rANS-encode BLOCK_LANES lanes. cum, freq: int64 [P, N]; lane g's stream is written
    backwards into scratch[g * (S + 2), (g + 1) * (S + 2)) with S = num_steps = cdiv(N, NL),
    ending at the region's end; count[g] (int32) receives its number of words."""
    offs_lane = tl.program_id(0).to(tl.int64) * BLOCK_LANES + tl.arange(0, BLOCK_LANES)
    lane_mask = offs_lane < num_lanes
    page = offs_lane // lanes_per_page
    lane = offs_lane % lanes_per_page
    offs_page = page * num_symbols  # first symbol of the lane's page
    end = (offs_lane + 1) * (num_steps + 2)  # one past the region's end; writes go backwards
    ptr = end
    x = tl.full([BLOCK_LANES], _RANS_L, tl.int64)
    for s in range(0, num_steps):
        step = num_steps - 1 - s  # in reverse: rANS is a stack
        offs_sym = lane + step * lanes_per_page
        active = lane_mask & (offs_sym < num_symbols)  # a lane's ragged last step is idle
        cum = tl.load(cum_ptr + offs_page + offs_sym, mask=active, other=0)
        freq = tl.load(freq_ptr + offs_page + offs_sym, mask=active, other=1)
        x, ptr = _rans_push(x, ptr, cum, freq, _PROB_BITS, active, scratch_ptr)
    _rans_flush(x, ptr, end, offs_lane, lane_mask, lane_mask, scratch_ptr, count_ptr)


# Sizes, offsets and mixture parameters change from batch to batch: not specialised on
# (Triton would compile a variant per divisibility-by-16 pattern of them), so a server
# compiles one variant per dtype, and its warm-up at start-up covers its restores.
@triton.jit(do_not_specialize=["num_lanes", "lanes_per_page", "first", "count", "num_steps", "stride_bits",
                               "stride_mu", "w_wide", "kappa"])
def _encode_values_kernel(bits_ptr, mu_ptr, sigma_ptr, phi_ptr, x_ptr, scratch_ptr, count_ptr,
                          num_lanes, lanes_per_page, first, count, num_steps, stride_bits, stride_mu, w_wide, kappa,
                          BITS: tl.constexpr, MAN_BITS: tl.constexpr, BIAS: tl.constexpr, FN_NAN: tl.constexpr,
                          BLOCK_LANES: tl.constexpr):
    """_encode_kernel with quantize_params and both C values fused (rans_cpu.cpp
    encode_values), for symbols [first, first + count) of every page (a chunk; Encoder):
    bits int16 (16-bit dtypes) or uint8 [P, count] storage patterns, page p's at
    bits_ptr + p * stride_bits; mu, sigma float32 [P, count] at stride_mu; x int64 [lanes],
    each lane's state, read and written back (chunks run last first: rANS is a stack);
    scratch int32 [lanes, S + 2] for the S = num_steps steps the chunk touches (u32 words,
    each lane's written backwards from its region's end), count int32 [lanes] its number
    of words. The chunk that starts the pages (first == 0) flushes the states in front."""
    offs_lane = tl.program_id(0).to(tl.int64) * BLOCK_LANES + tl.arange(0, BLOCK_LANES)
    lane_mask = offs_lane < num_lanes
    page = offs_lane // lanes_per_page
    lane = offs_lane % lanes_per_page
    bits_ptrs = bits_ptr + page * stride_bits
    offs_page = page * stride_mu
    end = (offs_lane + 1) * (num_steps + 2)
    ptr = end
    x = tl.load(x_ptr + offs_lane, mask=lane_mask, other=_RANS_L)
    first_step = first // lanes_per_page
    for s in range(0, num_steps):
        step = first_step + num_steps - 1 - s  # in reverse: rANS is a stack
        offs_sym = lane + step * lanes_per_page - first  # the symbol within the chunk
        # a lane's ragged last step, and its symbols outside the chunk, are idle
        active = lane_mask & (offs_sym >= 0) & (offs_sym < count)
        # int16 loads sign-extend: the mask keeps the pattern's B bits
        pattern = tl.load(bits_ptrs + offs_sym, mask=active, other=0).to(tl.int32) & ((1 << BITS) - 1)
        mu = tl.load(mu_ptr + offs_page + offs_sym, mask=active, other=0.0)
        sigma = tl.load(sigma_ptr + offs_page + offs_sym, mask=active, other=1.0)
        mu_q, e, r = _quantize(mu, sigma)
        c_lo, c_hi = _cdf_pair(_key_of_pattern(pattern, BITS), 2 * mu_q, e, _inverse(r), phi_ptr, w_wide, kappa,
                               BITS, MAN_BITS, BIAS, FN_NAN)
        x, ptr = _rans_push(x, ptr, c_lo.to(tl.int64), (c_hi - c_lo).to(tl.int64), _PROB_BITS, active, scratch_ptr)
    tl.store(x_ptr + offs_lane, x, mask=lane_mask)
    _rans_flush(x, ptr, end, offs_lane, lane_mask & (first == 0), lane_mask, scratch_ptr, count_ptr)


@triton.jit(do_not_specialize=["num_lanes", "lanes_per_page", "first", "count", "num_steps", "stride_bits",
                               "stride_mu", "w_wide", "kappa"])
def _encode_table_kernel(bits_ptr, mu_ptr, sigma_ptr, cum1_ptr, phi_ptr, x_ptr, scratch_ptr, count_ptr,
                         num_lanes, lanes_per_page, first, count, num_steps, stride_bits, stride_mu, w_wide, kappa,
                         BITS: tl.constexpr, MAN_BITS: tl.constexpr, BIAS: tl.constexpr, FN_NAN: tl.constexpr,
                         BLOCK_LANES: tl.constexpr):
    """_encode_values_kernel under the table model (table_model.symbol_steps, then the
    reference's encode with two steps per symbol): bits int16 [P, count] storage patterns
    at stride_bits, mu, sigma float32 [P, count] at stride_mu; cum1 int32 [ROWS * ROW]
    (table_model.level1_table: _level1_table); scratch int32 [lanes, 2 S + 2] (a lane emits
    at most one word per step, two per symbol); x, count_ptr, first and count as
    _encode_values_kernel's. Per symbol, walking backwards: level 2 (the offset's raw bits,
    the zero cell's points or, after ESC, the exact model's C(k), C(k + 1) at scale 28),
    then the cell; a symbol that is not dense: the exact model's step alone."""
    offs_lane = tl.program_id(0).to(tl.int64) * BLOCK_LANES + tl.arange(0, BLOCK_LANES)
    lane_mask = offs_lane < num_lanes
    page = offs_lane // lanes_per_page
    lane = offs_lane % lanes_per_page
    bits_ptrs = bits_ptr + page * stride_bits
    offs_page = page * stride_mu
    end = (offs_lane + 1) * (2 * num_steps + 2)
    ptr = end
    x = tl.load(x_ptr + offs_lane, mask=lane_mask, other=_RANS_L)
    first_step = first // lanes_per_page
    for s in range(0, num_steps):
        step = first_step + num_steps - 1 - s
        offs_sym = lane + step * lanes_per_page - first
        active = lane_mask & (offs_sym >= 0) & (offs_sym < count)
        # int16 loads sign-extend: the mask keeps the pattern's B bits
        pattern = tl.load(bits_ptrs + offs_sym, mask=active, other=0).to(tl.int32) & ((1 << BITS) - 1)
        mu = tl.load(mu_ptr + offs_page + offs_sym, mask=active, other=0.0)
        sigma = tl.load(sigma_ptr + offs_page + offs_sym, mask=active, other=1.0)
        mu_q, e, r = _quantize(mu, sigma)
        table = _dense(mu_q, e, r, MAN_BITS, BIAS)
        entry, cum, freq, scale, esc = _table_steps(pattern, _mu_cell(mu_q, table), e, BITS, MAN_BITS, BIAS)
        exact = esc | ~table  # the exact model's step: after ESC, or alone
        freq = tl.where(exact, 1, freq)  # replaced below (an escaped zero-cell key may have none)
        if tl.max((active & exact).to(tl.int32), axis=0) > 0:  # rare on dense pages
            c_lo, c_hi = _cdf_pair(_key_of_pattern(pattern, BITS), 2 * mu_q, e, _inverse(r), phi_ptr, w_wide, kappa,
                                   BITS, MAN_BITS, BIAS, FN_NAN)
            cum = tl.where(exact, c_lo, cum)
            freq = tl.where(exact, c_hi - c_lo, freq)
        # a symbol that is not dense: its exact step, then the reference's identity step
        # (0, 2^PT), which emits nothing and leaves x as it is, so it is skipped here
        x, ptr = _rans_push(x, ptr, cum.to(tl.int64), freq.to(tl.int64), tl.where(exact, _PROB_BITS, scale), active,
                            scratch_ptr)
        row_ptr = cum1_ptr + _row_index(mu_q, r) * _ROW
        c1 = tl.load(row_ptr + entry, mask=active & table, other=0)  # entry in [0, NCELL]
        f1 = tl.load(row_ptr + entry + 1, mask=active & table, other=1) - c1
        x, ptr = _rans_push(x, ptr, c1.to(tl.int64), f1.to(tl.int64), _PT, active & table, scratch_ptr)
    tl.store(x_ptr + offs_lane, x, mask=lane_mask)
    _rans_flush(x, ptr, end, offs_lane, lane_mask & (first == 0), lane_mask, scratch_ptr, count_ptr)


@triton.jit
def _compact_kernel(scratch_ptr, count_ptr, dest_ptr, words_ptr, region, BLOCK: tl.constexpr):
    """One program per lane g: words[dest[g] : dest[g] + count[g]] = the last count[g]
    words of its region of the encode kernels' scratch, scratch[g * region : (g + 1) * region]."""
    g = tl.program_id(0).to(tl.int64)
    count = tl.load(count_ptr + g)
    begin = (g + 1) * region - count
    dest = tl.load(dest_ptr + g)
    for start in range(0, count, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < count
        tl.store(words_ptr + dest + offs, tl.load(scratch_ptr + begin + offs, mask=mask), mask=mask)


@triton.jit
def _gather_kernel(src_ptr, begin_ptr, count_ptr, dest_ptr, words_ptr, BLOCK: tl.constexpr):
    """One program per lane g: words[dest[g] : dest[g] + count[g]] = src[begin[g] : ...]."""
    g = tl.program_id(0)
    begin = tl.load(begin_ptr + g)
    count = tl.load(count_ptr + g)
    dest = tl.load(dest_ptr + g)
    for start in range(0, count, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < count
        tl.store(words_ptr + dest + offs, tl.load(src_ptr + begin + offs, mask=mask), mask=mask)


def _check_device(*tensors: torch.Tensor) -> None:
    device = tensors[0].device
    if any(t.device != device for t in tensors):
        raise ValueError(f"all tensors must be on one device, got {[str(t.device) for t in tensors]}")
    if device.type != "cuda" and not triton.knobs.runtime.interpret:
        raise ValueError(
            f"the Triton coder needs CUDA tensors, got {device}; use kernels/rans_reference.py "
            "on CPU (or set TRITON_INTERPRET=1 before importing this module to emulate it)"
        )


def cdf(
    keys: torch.Tensor,
    mu_q: torch.Tensor,
    e: torch.Tensor,
    r: torch.Tensor,
    dtype: str,
    w_wide: int = em.W_WIDE,
    kappa: int = em.KAPPA,
) -> torch.Tensor:
    """entropy_model.cdf in one kernel: C(k) for int64 keys in [0, 2^B], broadcast against
    the quantised int64 parameters (mu_q, e, r from quantize_params). Same result, bit for
    bit; int64 output of the broadcast shape."""
    em.check_mixture(w_wide, kappa)
    em.symbol_bits(dtype)  # a clear error for an unknown dtype name
    bits, man_bits, bias, fn_nan = em.DTYPE_SPECS[dtype]
    if any(t.dtype != torch.int64 for t in (keys, mu_q, e, r)):
        raise ValueError("keys, mu_q, e and r must be int64")
    _check_device(keys, mu_q, e, r)
    keys, mu_q, e, r = (t.contiguous() for t in torch.broadcast_tensors(keys, mu_q, e, r))
    out = torch.empty_like(keys)
    n = keys.numel()
    if n:
        _cdf_kernel[(triton.cdiv(n, BLOCK_ELEMS),)](
            keys, mu_q, e, r, em.phi_table(keys.device), out, n, w_wide, kappa,
            BITS=bits, MAN_BITS=man_bits, BIAS=bias, FN_NAN=fn_nan, BLOCK=BLOCK_ELEMS,
        )
    return out


def encode(cum: torch.Tensor, freq: torch.Tensor, num_lanes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """rans_reference.encode on the GPU, same bytes: P pages of N symbols, ``num_lanes``
    lanes per page.

    cum, freq: int64 [N] or [P, N], 0 <= cum, 1 <= freq, cum + freq <= M (not checked: a
    zero freq is undefined behaviour on the GPU). Returns (words int64 [W] in [0, 2^32),
    lane by lane, page by page; lane_words int64 [P, NL]). One host sync (the total size).
    """
    cum, freq = ref._as_batch(cum), ref._as_batch(freq)
    if cum.shape != freq.shape or cum.dtype != torch.int64 or freq.dtype != torch.int64:
        raise ValueError("cum and freq must be int64 tensors of the same shape")
    if num_lanes < 1:
        raise ValueError(f"num_lanes must be >= 1, got {num_lanes}")
    _check_device(cum, freq)
    cum, freq = cum.contiguous(), freq.contiguous()
    num_pages, num_symbols = cum.shape
    num_steps = triton.cdiv(num_symbols, num_lanes)
    lanes = num_pages * num_lanes
    # [lanes, num_steps + 2]: room for one word per step plus the 2-word flush
    scratch = torch.empty(lanes * (num_steps + 2), dtype=torch.int64, device=cum.device)
    counts = torch.empty(lanes, dtype=torch.int32, device=cum.device)
    _encode_kernel[(triton.cdiv(lanes, BLOCK_LANES),)](
        cum, freq, scratch, counts, lanes, num_lanes, num_symbols, num_steps, BLOCK_LANES=BLOCK_LANES,
    )
    words = _compact(scratch, counts, num_steps + 2)
    return words, counts.to(torch.int64).view(num_pages, num_lanes)


def _compact(scratch: torch.Tensor, counts: torch.Tensor, region: int) -> torch.Tensor:
    """The lanes' streams from their scratch regions of ``region`` words each (the last
    counts[g] words of lane g's, int32 [lanes]), concatenated: words [W] of scratch's dtype.
    One host sync (the total size)."""
    dest = torch.cumsum(counts, 0, dtype=torch.int64) - counts  # exclusive scan: where each lane's stream goes
    words = torch.empty(int(counts.sum(dtype=torch.int64)), dtype=scratch.dtype, device=scratch.device)
    _compact_kernel[(counts.numel(),)](scratch, counts, dest, words, region, BLOCK=BLOCK_ELEMS)
    return words


@functools.lru_cache(maxsize=8)
def _level1_table(w_wide: int, kappa: int, device: torch.device) -> torch.Tensor:
    """table_model.level1_table on ``device`` as int32 [ROWS * ROW], row by row (entries
    <= 2^PT; the kernels read it, never build it)."""
    return tm.level1_table(w_wide, kappa).to(torch.int32).reshape(-1).to(device)  # [ROWS, ROW] -> flat


@functools.lru_cache(maxsize=8)
def _level1_lookup(w_wide: int, kappa: int, device: torch.device) -> torch.Tensor:
    """The decoder's level-1 lookup words on ``device``, int64 [(2 ROWS + 1) * 2^START_BITS]
    row by row (514 KiB): for START's entry i of the row's bucket (table_model.level1_start),
    CUM1[i] | CUM1[i + 1] << 16 | CUM1[i + 2] << 32 | i << 48 | (i + 1) << 56, the entries
    as bytes with ESC as I_ESC (CUM1 = level1_table, entries <= 2^PT < 2^16; i <= NCELL, and
    for i = NCELL, where CUM1[i + 1] = 2^PT ends the row, CUM1[i + 2] repeats it). Rows ROWS
    .. 2 ROWS - 1, read for symbols that are not dense (_pack_params' bit 15), are the
    identity step (0, 2^PT) then ESC (the exact model's step); row 2 ROWS, the masked lanes'
    (_PARAM_MASKED), the identity step with entry I_MASKED (no vote, and level 2's d = 0)."""
    cum1 = tm.level1_table(w_wide, kappa)  # [ROWS, ROW]
    start = tm.level1_start(w_wide, kappa).long()  # [ROWS, 2^START_BITS]
    c0, c1, c2 = (cum1.gather(1, (start + k).clamp(max=tm.ROW - 1)) for k in range(3))
    i0, i1 = (torch.where(i >= tm.ESC, I_ESC, i) for i in (start, start + 1))  # i1 = ESC after the last cell
    word = c0 | c1 << 16 | c2 << 32 | i0 << 48 | (i1 - 256 * (i1 >= 128)) << 56  # i1's byte: int64's top
    identity = (1 << tm.PT) << 16 | (1 << tm.PT) << 32  # (cum, next) = (0, 2^PT) whatever the slot
    exact = torch.full_like(word, identity | I_ESC << 48 | (I_ESC - 256) << 56)
    masked = torch.full_like(word[:1], identity | I_MASKED << 48 | (I_MASKED - 256) << 56)
    return torch.cat([word, exact, masked]).reshape(-1).to(device)  # [2 ROWS, 2^START_BITS] -> flat


def table_params(mu: torch.Tensor, sigma: torch.Tensor, dtype: str) -> torch.Tensor:
    """The table decoder's per-symbol parameters (``Decoder.decode_values(..., params=)``):
    int32 shaped like float32 (mu, sigma) (any shape, one device), each the row, the dense
    test, e and mu's cell of quantize_params(mu, sigma) (_pack_params; the torch reference:
    entropy_model.quantize_params, table_model.row_index and table_model.dense). Elementwise,
    so a caller whose (mu, sigma) repeat (page_stats: one per channel) computes it once per
    distinct pair and broadcasts the int32, instead of quantising every symbol in the step
    loop."""
    b, man_bits, bias, _ = em.DTYPE_SPECS[dtype]
    if b != 16:
        raise ValueError(f"table_params is the table model's (16-bit dtypes), got {dtype}")
    if mu.dtype != torch.float32 or sigma.dtype != torch.float32 or mu.shape != sigma.shape:
        raise ValueError(f"mu and sigma must be float32 tensors of one shape, got {mu.dtype} {tuple(mu.shape)}, "
                         f"{sigma.dtype} {tuple(sigma.shape)}")
    _check_device(mu, sigma)
    mu, sigma = mu.contiguous(), sigma.contiguous()
    params = torch.empty(mu.shape, dtype=torch.int32, device=mu.device)
    n = mu.numel()
    if n:
        _table_params_kernel[(triton.cdiv(n, BLOCK_ELEMS),)](mu, sigma, params, n, MAN_BITS=man_bits, BIAS=bias,
                                                            BLOCK=BLOCK_ELEMS)
    return params


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
    """rans_reference.encode_values in one kernel pass per symbol (quantize_params, the
    model's steps, the rANS steps; rans_cpu.encode_values on the CPU), same bytes: an
    Encoder given the whole pages in one chunk.

    bits: storage patterns (int16 for 16-bit dtypes, else uint8), mu, sigma: float32, all
    [P, N] or [N] (or one tensor per page, stacked here) on one device; ``model``: "exact"
    (C(k) and C(k + 1), one step per symbol) or "table" (16-bit dtypes:
    table_model.symbol_steps, two steps per symbol). Returns (words int32 [W] holding the
    u32 words, lane by lane, page by page; lane_words int64 [P, NL]). One host sync (the
    total size). Device memory: Encoder's, for a chunk of all N symbols (4 B resp. 8 B of
    scratch per symbol); the codec encodes through Encoder a chunk at a time instead.
    """
    bits, mu, sigma = ref._params_batch(bits), ref._params_batch(mu), ref._params_batch(sigma)
    if mu.dtype != torch.float32 or sigma.dtype != torch.float32 or not (bits.shape == mu.shape == sigma.shape):
        raise ValueError("mu and sigma must be float32 tensors shaped like bits")
    encoder = Encoder(bits, dtype, num_lanes, w_wide, kappa, model)
    encoder.encode(mu, sigma)
    return encoder.finish()


class Encoder:
    """encode_values a chunk of symbols at a time, LAST CHUNK FIRST (rans_cpu.Encoder's
    interface and bytes; rANS encodes in reverse: rans_reference's warning 1): the pages'
    storage patterns at construction, then ``encode(mu, sigma)`` for the n symbols of every
    page just before those coded so far, and ``finish()`` for (words, lane_words), the
    bytes encode_values gives for the whole pages. So the caller materialises float32
    (mu, sigma) a chunk at a time, and the word scratch is a chunk's.

    Device memory, per chunk of n symbols of P pages (NL lanes per page, S = the steps the
    chunk touches, <= n / NL + 2): the chunk's storage patterns when the pages were given
    as separate tensors (stacked: [P, n], 1-2 B per symbol; a [P, N] tensor is read in
    place), the scratch int32 [P * NL * (S + 2)] (exact model) or [P * NL * (2 S + 2)]
    (table model: two steps per symbol), i.e. 4 B resp. 8 B per symbol of the chunk, and
    the lanes' stream offsets (int64 [P * NL]), freed when the chunk is compacted; then
    kept until ``finish``: the chunk's words (4 B per word, ~bits per symbol / 8 B per
    symbol), its words per lane (int32 [P * NL]), and the lanes' states (int64 [P * NL]).
    ``finish`` concatenates the chunks' words lane by lane into the output (held beside
    them for the copy, freed chunk by chunk), unless there was one chunk (its words are the
    output). One host sync per chunk (its words' count) and one in ``finish``.
    """

    def __init__(self, bits: torch.Tensor | Sequence[torch.Tensor], dtype: str, num_lanes: int,
                 w_wide: int = em.W_WIDE, kappa: int = em.KAPPA, model: str = tm.MODEL_EXACT):
        em.check_mixture(w_wide, kappa)
        b = em.symbol_bits(dtype)  # a clear error for an unknown dtype name
        tm.check_model(model, dtype)
        if num_lanes < 1:
            raise ValueError(f"num_lanes must be >= 1, got {num_lanes}")
        want = torch.int16 if b == 16 else torch.uint8
        # [P, N] read in place (a chunk is a view of it), or one [N] tensor per page (a
        # chunk's patterns stacked from them)
        self.batch = ref._as_batch(bits) if isinstance(bits, torch.Tensor) else None
        self.pages = list(self.batch) if self.batch is not None else [p.reshape(-1) for p in bits]
        if not self.pages or any(p.dtype != want or p.numel() != self.pages[0].numel() for p in self.pages):
            raise ValueError(f"{dtype} bits must be {'int16' if b == 16 else 'uint8'}, [P, N] or one [N] tensor "
                             "per page")
        _check_device(*self.pages)
        if self.batch is not None and self.batch.stride(-1) != 1:
            self.batch = self.batch.contiguous()
        self.dtype, self.model, self.w_wide, self.kappa = dtype, model, w_wide, kappa
        self.num_pages, self.num_lanes = len(self.pages), num_lanes
        self.device = self.pages[0].device
        self.position = self.pages[0].numel()  # symbols [position, N) are coded
        lanes = self.num_pages * num_lanes
        self.x = torch.full((lanes,), ref.RANS_L, dtype=torch.int64, device=self.device)  # [lanes] states
        self.chunks: list[tuple[torch.Tensor, torch.Tensor]] = []  # (words, int32 counts [lanes]), coding order

    def encode(self, mu: torch.Tensor, sigma: torch.Tensor) -> None:
        """Code the n symbols before ``position`` of every page from float32 (mu, sigma) of
        those symbols, [P, n] (or [n] for one page): one kernel launch, then the chunk's
        words compacted out of its scratch."""
        mu, sigma = ref._as_batch(mu), ref._as_batch(sigma)
        n = mu.shape[-1]
        if mu.dtype != torch.float32 or sigma.dtype != torch.float32 or mu.shape != sigma.shape:
            raise ValueError("mu and sigma must be float32 tensors of one shape")
        if mu.shape[0] != self.num_pages or not 1 <= n <= self.position:
            raise ValueError(f"encode of {tuple(mu.shape)} (mu, sigma) before symbol {self.position} of "
                             f"{self.num_pages} pages: [P, n] with 1 <= n <= {self.position}")
        _check_device(self.pages[0], mu, sigma)
        mu, sigma = mu.contiguous(), sigma.contiguous()
        first = self.position - n
        if self.batch is not None:
            bits = self.batch[:, first : self.position]  # [P, n] view
        else:
            bits = torch.stack([p[first : self.position] for p in self.pages])  # [P, n]
        lanes, num_lanes = self.num_pages * self.num_lanes, self.num_lanes
        num_steps = triton.cdiv(self.position, num_lanes) - first // num_lanes  # the steps the chunk touches
        # [lanes, region] u32 words: one word per rANS step at most plus the 2-word flush
        region = (2 if self.model == tm.MODEL_TABLE else 1) * num_steps + 2
        scratch = torch.empty(lanes * region, dtype=torch.int32, device=self.device)
        counts = torch.empty(lanes, dtype=torch.int32, device=self.device)
        b, man_bits, bias, fn_nan = em.DTYPE_SPECS[self.dtype]
        spec = dict(BITS=b, MAN_BITS=man_bits, BIAS=bias, FN_NAN=fn_nan, BLOCK_LANES=BLOCK_LANES)
        sizes = (lanes, num_lanes, first, n, num_steps, bits.stride(0), mu.stride(0), self.w_wide, self.kappa)
        grid = (triton.cdiv(lanes, BLOCK_LANES),)
        phi = em.phi_table(self.device)
        if self.model == tm.MODEL_TABLE:
            _encode_table_kernel[grid](bits, mu, sigma, _level1_table(self.w_wide, self.kappa, self.device), phi,
                                       self.x, scratch, counts, *sizes, **spec)
        else:
            _encode_values_kernel[grid](bits, mu, sigma, phi, self.x, scratch, counts, *sizes, **spec)
        del bits
        self.chunks.append((_compact(scratch, counts, region), counts))
        self.position = first

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(words int32 [W] holding the u32 words, lane by lane, page by page; lane_words
        int64 [P, NL]); every symbol must be coded. A lane's stream is its chunks' words in
        symbol order (the flush first): the last chunk coded first."""
        if self.position:
            raise ValueError(f"finish() with symbols [0, {self.position}) not coded")
        chunks, self.chunks = self.chunks, []
        if len(chunks) == 1:
            words, counts = chunks[0]
            return words, counts.to(torch.int64).view(self.num_pages, self.num_lanes)
        counts = torch.zeros(self.num_pages * self.num_lanes, dtype=torch.int64, device=self.device)
        for _, chunk_counts in chunks:
            counts += chunk_counts  # [lanes]
        dest = torch.cumsum(counts, 0) - counts  # exclusive scan: where each lane's stream goes
        words = torch.empty(int(counts.sum()), dtype=torch.int32, device=self.device)
        while chunks:
            chunk_words, chunk_counts = chunks.pop()  # freed once copied
            src = torch.cumsum(chunk_counts, 0, dtype=torch.int64) - chunk_counts
            _gather_kernel[(len(chunk_counts),)](chunk_words, src, chunk_counts, dest, words, BLOCK=BLOCK_ELEMS)
            dest += chunk_counts
            del chunk_words, chunk_counts, src
        return words, counts.view(self.num_pages, self.num_lanes)


# ---- Decoder ------------------------------------------------------------------------------


@triton.jit
def _pow2(n):
    """2.0^n as float32 from its bits (exact; int32 n within [-126, 127])."""
    return ((n + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _nearest_key(v, BITS: tl.constexpr, MAN_BITS: tl.constexpr, BIAS: tl.constexpr, FN_NAN: tl.constexpr):
    """The key of a dtype value near float32 v: |v| rounded half up to the dtype's grid,
    saturated to the largest finite value; zeros and NaN give +-0. Integer ops on v's bits
    (rans_cpu.cpp Dtype::nearest_key does the same on float64). Only guesses use it."""
    EXP_ONES: tl.constexpr = (1 << (BITS - 1 - MAN_BITS)) - 1
    TOP: tl.constexpr = 1 << (BITS - 1)
    ONES: tl.constexpr = (1 << BITS) - 1
    # S.1111.110 for e4m3fn, S.1110.111... for IEEE-like dtypes
    MAX_PATTERN: tl.constexpr = (EXP_ONES << MAN_BITS) - 1 + FN_NAN * ((1 << MAN_BITS) - 1)
    RS: tl.constexpr = 23 - MAN_BITS  # float32 mantissa bits dropped by a normal value
    u = v.to(tl.int32, bitcast=True)
    e8 = (u >> 23) & 0xFF
    m23 = u & 0x7FFFFF
    biased = tl.minimum(e8, 254) - 127 + BIAS  # the dtype's biased exponent; < 2^8: no overflow below
    normal = (((biased << 23) | m23) + (1 << (RS - 1))) >> RS  # a rounding carry moves into the exponent
    rs = tl.minimum(tl.maximum(24 - MAN_BITS - biased, 1), 31)  # subnormal: units of the dtype's smallest step
    sub = ((m23 | (1 << 23)) + (1 << (rs - 1))) >> rs
    pattern = tl.minimum(tl.where(biased >= 1, normal, sub), MAX_PATTERN)
    pattern = tl.where(e8 == 0, 0, pattern)  # float32 zeros (and subnormals: no guess makes one)
    pattern = tl.where(e8 == 255, tl.where(m23 == 0, MAX_PATTERN, 0), pattern)  # inf, NaN
    return tl.where(u < 0, (pattern | TOP) ^ ONES, pattern | TOP)  # entropy_model.keys_from_bits


@triton.jit
def _guess_key(slot, mu_q, e, r, q_ptr,
               BITS: tl.constexpr, MAN_BITS: tl.constexpr, BIAS: tl.constexpr, FN_NAN: tl.constexpr):
    """A key near the one whose interval holds slot, from the Gaussian quantile:
    C(k) = k + G(k) (M - 2^B) / 2^32, so the key's value should be mu + sigma G^-1(slot - k),
    with G^-1 from q = rans_reference._quantile_table (as float32, linear in each cell). That
    needs k itself: the first pass puts the key of +0 in its place, which is off by up to
    2^(B-1) counts: nothing against M for 8-bit keys, but a key's whole width in the dense
    regions of 16-bit ones, so those make a second pass with the first guess (it cuts the
    misses from ~4% to 0.064% of Gaussian bf16 symbols). int32 slot and key out; int64 mu_q,
    r; int32 e. Float32 arithmetic (FMA allowed) where rans_cpu.cpp / rans_reference.py use
    float64: a different rounding moves a guess by a key or so, which costs a probe, never a
    result: the decoder checks every guess with exact integer C."""
    FLOOR_FREE: tl.constexpr = _M - (1 << BITS)  # counts the Gaussian mixture is spread over
    PASSES: tl.constexpr = BITS // 8  # 1 for 8-bit keys, 2 for 16-bit ones
    mu_f = mu_q.to(tl.float32) * _pow2(e - _F)  # |mu_q| <= 2^50, e - F in [-80, 40]
    sig_f = r.to(tl.float32) * _pow2(e - (_R + _T_BITS))  # sigma per t unit
    key = tl.full(slot.shape, 1 << (BITS - 1), tl.int32)  # the key of +0
    for _ in tl.static_range(PASSES):
        u = tl.minimum(tl.maximum(slot - key, 0), FLOOR_FREE).to(tl.float32) * (_NUM_CELLS / FLOOR_FREE)
        cell = tl.minimum(u.to(tl.int32), _NUM_CELLS - 1)
        q_lo = tl.load(q_ptr + cell)
        t = q_lo + (tl.load(q_ptr + cell + 1) - q_lo) * (u - cell.to(tl.float32))  # G^-1(slot - key)
        key = _nearest_key(mu_f + sig_f * t, BITS, MAN_BITS, BIAS, FN_NAN)
    return key


@triton.jit
def _find_key(slot, mu_q, e, r, active, phi_ptr, q_ptr, w_wide, kappa,
              BITS: tl.constexpr, MAN_BITS: tl.constexpr, BIAS: tl.constexpr, FN_NAN: tl.constexpr,
              GALLOP_ROUNDS: tl.constexpr):
    """The decoder's symbol search for one step of the program's lanes: the key k (int32)
    with C(k) <= slot < C(k + 1), C(k), C(k + 1) (int32), and the probes it took beyond the
    guess's two (gallop, bisection; int32). int32 slot, e; int64 mu_q, r."""
    NUM_KEYS: tl.constexpr = 1 << BITS
    two_mu_q = 2 * mu_q
    inv = _inverse(r)
    # The key is the unique k with C(k) <= slot < C(k + 1) (C is strictly increasing, C(0) = 0,
    # C(2^B) = M > slot). Guess it, and check the guess with C(guess) and C(guess + 1).
    lo = _guess_key(slot, mu_q, e, r, q_ptr, BITS, MAN_BITS, BIAS, FN_NAN)  # [0, 2^B)
    hi = lo + 1
    c_lo, c_hi = _cdf_pair(lo, two_mu_q, e, inv, phi_ptr, w_wide, kappa, BITS, MAN_BITS, BIAS, FN_NAN)
    # From here on C(lo) = c_lo and C(hi) = c_hi in every active lane; a hit has lo = key. A
    # miss's bracket becomes the side of the guess that holds the key ([0, guess) or
    # [guess + 1, 2^B)), and from then on C(lo) <= slot < C(hi) holds, gallop and bisection
    # only shrink it, and the loops end at hi = lo + 1: lo is the key.
    down = active & (c_lo > slot)
    up = active & (c_hi <= slot)
    gallops = tl.zeros_like(slot)
    bisects = tl.zeros_like(slot)
    if tl.max((down | up).to(tl.int32), axis=0) > 0:  # rare: some lane's guess missed
        lo, c_lo, hi, c_hi = (tl.where(down, 0, tl.where(up, hi, lo)),
                              tl.where(down, 0, tl.where(up, c_hi, c_lo)),
                              tl.where(down, lo, tl.where(up, NUM_KEYS, hi)),
                              tl.where(down, c_lo, tl.where(up, _M, c_hi)))
        # Gallop outwards from the guess (probes 1, 3, 7, ... keys beyond it) while the key
        # is past the probe, at most GALLOP_ROUNDS probes: a near miss is bracketed tightly.
        going = down | up
        rounds = 0
        while (rounds < GALLOP_ROUNDS) & (tl.max(going.to(tl.int32), axis=0) > 0):
            stride = 1 << rounds
            cand = tl.where(down, tl.maximum(hi - stride, lo), tl.minimum(lo + stride, hi))
            c = _cdf(cand, two_mu_q, e, inv, phi_ptr, w_wide, kappa, BITS, MAN_BITS, BIAS, FN_NAN)
            take = c <= slot
            lo, c_lo = tl.where(going & take, cand, lo), tl.where(going & take, c, c_lo)
            hi, c_hi = tl.where(going & ~take, cand, hi), tl.where(going & ~take, c, c_hi)
            gallops += going.to(tl.int32)
            down = down & ~take
            up = up & take
            going = down | up
            rounds += 1
        # Bisect [lo, hi) down to one key: at most log2(hi - lo) probes, B at worst.
        while tl.max(hi - lo, axis=0) > 1:
            mid = (lo + hi) >> 1  # == lo where hi - lo == 1: C(lo) <= slot keeps the lane as is
            c = _cdf(mid, two_mu_q, e, inv, phi_ptr, w_wide, kappa, BITS, MAN_BITS, BIAS, FN_NAN)
            take = c <= slot
            bisects += (hi - lo > 1).to(tl.int32)
            lo, c_lo = tl.where(take, mid, lo), tl.where(take, c, c_lo)
            hi, c_hi = tl.where(take, hi, mid), tl.where(take, c_hi, c)
    return lo, c_lo, c_hi, gallops, bisects


@triton.jit
def _rans_x(x, rem, freq, scale):
    """The decoder's state update at scale s (an int or an int tensor), before its
    renormalisation: x' = freq * (x >> s) + rem with rem = slot - cum in [0, freq), slot = x
    & (2^s - 1). freq and rem are int32 in [1, 2^31) and [0, freq) (every model's steps), so
    they are widened as unsigned (the same integers; a 32 x 64-bit multiply instead of 64 x
    64, no sign extension). (freq, rem) = (2^s, slot) is the identity."""
    f = freq.to(tl.uint32, bitcast=True).to(tl.int64)
    q = x >> scale  # < 2^48
    # f q = (f (q >> 32)) << 32 + f (q & (2^32 - 1)): rem fills the first term's zero low half,
    # so the sum is one 32 x 32 -> 64-bit multiply-add (the true x' < 2^63: nothing wraps)
    return (((f * (q >> 32)) << 32) | rem.to(tl.uint32, bitcast=True).to(tl.int64)) + f * (q & _WORD_MASK)


@triton.jit
def _rans_pop(x, wptr, rem, freq, scale, active, words_ptr, num_words):
    """The decoder's step of the active lanes (rans_reference.Decoder._pop): _rans_x, then
    one word shifted in if x' < L (_rans_refill); the others keep x and wptr."""
    return _rans_refill(tl.where(active, _rans_x(x, rem, freq, scale), x), wptr, words_ptr, num_words)


@triton.jit
def _rans_refill(x_new, wptr, words_ptr, num_words):
    """The decoder's renormalisation of a state x_new after a step: one word shifted in
    where x_new < L (rans_reference.Decoder._pop), wptr advanced past it. A read past the
    lane's words reads words[min(ptr, W - 1)] as the reference does. An identity step (x_new
    = x >= L: every state is) reads nothing. Words are int64 in [0, 2^32) or int32 holding
    u32 words. The word lands in the low half and x_new's low half in the high one; a lane
    that reads none gets x_new's low half from the load's ``other`` (no select there)."""
    need = x_new < _RANS_L
    low = tl.load(words_ptr + tl.minimum(wptr, num_words - 1), mask=need, other=x_new & _WORD_MASK)
    return tl.where(need, x_new << _WORD_BITS, x_new & ~_WORD_MASK) | (low.to(tl.int64) & _WORD_MASK), wptr + need


@triton.jit
def _rans_pop_bits(x, wptr, d, low, words_ptr, num_words):
    """_rans_pop of a step of 2^w slots at scale s = w + d whose slot's offset in the step
    is the slot's low w bits (the step starts at a multiple of 2^w: freq = 2^w, rem = x &
    low, low = 2^w - 1): x' = 2^w (x >> s) + (x & low) is x with its bits [w, s) removed, no
    multiply. int32 d in [0, s] and low per lane; d = 0 is the identity."""
    low = low.to(tl.uint32, bitcast=True).to(tl.int64)  # zero-extended
    return _rans_refill(((x >> d.to(tl.int64)) & ~low) | (x & low), wptr, words_ptr, num_words)


@triton.jit
def _decode_kernel(words_ptr, mu_q_ptr, e_ptr, r_ptr, phi_ptr, q_ptr, keys_ptr, x_ptr, wptr_ptr, probes_ptr,
                   num_lanes, lanes_per_page, num_words, first, count, stride_probes, w_wide, kappa,
                   BITS: tl.constexpr, MAN_BITS: tl.constexpr, BIAS: tl.constexpr, FN_NAN: tl.constexpr,
                   GALLOP_ROUNDS: tl.constexpr, COUNT_PROBES: tl.constexpr, BLOCK_LANES: tl.constexpr):
    """Decode symbols [first, first + count) of every page for BLOCK_LANES lanes.
    mu_q, e, r, keys: int64 [P, count]; x, wptr: int64 [num_lanes] (state, next word index),
    read and written back; words: int64 or int32 (u32) [num_words]; q: float32
    [2^QUANTILE_BITS + 1] (the guess's quantiles). With COUNT_PROBES, probes: int32
    [2, P, count] (stride_probes apart) receives each symbol's gallop and bisection probes
    (C evaluations beyond the first two)."""
    offs_lane = tl.program_id(0).to(tl.int64) * BLOCK_LANES + tl.arange(0, BLOCK_LANES)
    lane_mask = offs_lane < num_lanes
    page = offs_lane // lanes_per_page
    lane = offs_lane % lanes_per_page
    offs_page = page * count  # the page's first parameter / key of this stage
    x = tl.load(x_ptr + offs_lane, mask=lane_mask, other=_RANS_L)
    wptr = tl.load(wptr_ptr + offs_lane, mask=lane_mask, other=0)
    for step in range(first // lanes_per_page, tl.cdiv(first + count, lanes_per_page)):
        offs_sym = lane + step * lanes_per_page - first  # symbol index within the stage
        active = lane_mask & (offs_sym >= 0) & (offs_sym < count)
        mu_q = tl.load(mu_q_ptr + offs_page + offs_sym, mask=active, other=0)
        e = tl.load(e_ptr + offs_page + offs_sym, mask=active, other=0).to(tl.int32)
        r = tl.load(r_ptr + offs_page + offs_sym, mask=active, other=_R_MIN)
        slot = (x & (_M - 1)).to(tl.int32)
        key, c_lo, c_hi, gallops, bisects = _find_key(slot, mu_q, e, r, active, phi_ptr, q_ptr, w_wide, kappa,
                                                      BITS, MAN_BITS, BIAS, FN_NAN, GALLOP_ROUNDS)
        tl.store(keys_ptr + offs_page + offs_sym, key.to(tl.int64), mask=active)
        if COUNT_PROBES:
            tl.store(probes_ptr + offs_page + offs_sym, gallops, mask=active)
            tl.store(probes_ptr + stride_probes + offs_page + offs_sym, bisects, mask=active)
        x, wptr = _rans_pop(x, wptr, slot - c_lo, c_hi - c_lo, _PROB_BITS, active, words_ptr, num_words)
    tl.store(x_ptr + offs_lane, x, mask=lane_mask)
    tl.store(wptr_ptr + offs_lane, wptr, mask=lane_mask)


@triton.jit(do_not_specialize=["num_lanes", "lanes_per_page", "num_words", "first", "count", "stride_out",
                               "w_wide", "kappa"])  # fmt: skip
def _decode_values_kernel(words_ptr, mu_ptr, sigma_ptr, phi_ptr, q_ptr, out_bits_ptr, x_ptr, wptr_ptr,
                          num_lanes, lanes_per_page, num_words, first, count, stride_out, w_wide, kappa,
                          BITS: tl.constexpr, MAN_BITS: tl.constexpr, BIAS: tl.constexpr, FN_NAN: tl.constexpr,
                          GALLOP_ROUNDS: tl.constexpr, BLOCK_LANES: tl.constexpr):
    """_decode_kernel with quantize_params fused and the keys written back as storage
    patterns (rans_cpu.cpp decode_values): mu, sigma float32 [P, count]; out_bits int16
    (16-bit dtypes) or uint8 [P, stride_out], columns [first, first + count) written.
    words int32 (u32) or int64 [num_words]; x, wptr as there."""
    offs_lane = tl.program_id(0).to(tl.int64) * BLOCK_LANES + tl.arange(0, BLOCK_LANES)
    lane_mask = offs_lane < num_lanes
    page = offs_lane // lanes_per_page
    lane = offs_lane % lanes_per_page
    offs_page = page * count  # the page's first (mu, sigma) of this stage
    offs_out_page = page * stride_out + first  # its first output column of this stage
    x = tl.load(x_ptr + offs_lane, mask=lane_mask, other=_RANS_L)
    wptr = tl.load(wptr_ptr + offs_lane, mask=lane_mask, other=0)
    for step in range(first // lanes_per_page, tl.cdiv(first + count, lanes_per_page)):
        offs_sym = lane + step * lanes_per_page - first  # symbol index within the stage
        active = lane_mask & (offs_sym >= 0) & (offs_sym < count)
        mu = tl.load(mu_ptr + offs_page + offs_sym, mask=active, other=0.0)
        sigma = tl.load(sigma_ptr + offs_page + offs_sym, mask=active, other=1.0)
        mu_q, e, r = _quantize(mu, sigma)
        slot = (x & (_M - 1)).to(tl.int32)
        key, c_lo, c_hi, _, _ = _find_key(slot, mu_q, e, r, active, phi_ptr, q_ptr, w_wide, kappa,
                                          BITS, MAN_BITS, BIAS, FN_NAN, GALLOP_ROUNDS)
        pattern = _pattern_of_key(key, BITS)  # [0, 2^B): the cast keeps its B bits
        tl.store(out_bits_ptr + offs_out_page + offs_sym, pattern.to(out_bits_ptr.dtype.element_ty), mask=active)
        x, wptr = _rans_pop(x, wptr, slot - c_lo, c_hi - c_lo, _PROB_BITS, active, words_ptr, num_words)
    tl.store(x_ptr + offs_lane, x, mask=lane_mask)
    tl.store(wptr_ptr + offs_lane, wptr, mask=lane_mask)


@triton.jit(do_not_specialize=["num_lanes", "lanes_per_page", "num_words", "first", "count", "stride_out",
                               "w_wide", "kappa"])  # fmt: skip
def _decode_table_kernel(words_ptr, params_ptr, mu_ptr, cum1_ptr, lookup_ptr, phi_ptr, q_ptr,
                         out_bits_ptr, x_ptr, wptr_ptr, lane_ok_ptr,
                         num_lanes, lanes_per_page, num_words, first, count, stride_out, w_wide, kappa,
                         BITS: tl.constexpr, MAN_BITS: tl.constexpr, BIAS: tl.constexpr, FN_NAN: tl.constexpr,
                         GALLOP_ROUNDS: tl.constexpr, BLOCK_LANES: tl.constexpr):
    """_decode_values_kernel under the table model (rans_reference.Decoder._table_symbol):
    per symbol its parameters (params int32 [P, count], table_params: quantize_params, the
    dense test, the row and mu's cell, computed outside the step loop), the cell (a lookup
    word with its one correction step, lookup int64 [(2 ROWS + 1) * 2^START_BITS], _level1_lookup;
    rarely a bisection of the symbol's row of cum1, int32 [ROWS * ROW], _level1_table), then
    level 2 (the offset's raw bits, or the zero cell's point: a truncation, no search) or,
    after ESC and for a symbol that is not dense, the exact model's step (_find_key, in a
    branch taken when any lane of the program needs it, which alone reads mu, float32
    [P, count], and quantises it; e and r come from params). lane_ok uint8 [num_lanes] (the
    reference's bool lane_ok) is cleared for lanes that decode an impossible cell (a
    corrupt stream). Other arguments as _decode_values_kernel's."""
    offs_lane = tl.program_id(0).to(tl.int64) * BLOCK_LANES + tl.arange(0, BLOCK_LANES)
    lane_mask = offs_lane < num_lanes
    page = offs_lane // lanes_per_page
    lane = offs_lane % lanes_per_page
    offs_page = page * count  # the page's first (mu, sigma) of this stage
    offs_out_page = page * stride_out + first  # its first output column of this stage
    x = tl.load(x_ptr + offs_lane, mask=lane_mask, other=_RANS_L)
    # int32 in the loop: the launcher checks that words and reads past them stay below 2^31
    wptr = tl.load(wptr_ptr + offs_lane, mask=lane_mask, other=0).to(tl.int32)
    bad = offs_lane < 0  # [BLOCK_LANES] False
    # bf16: every level-2 step is 2^w slots on a multiple of 2^w (_rans_pop_bits), as
    # _decode_level2_float's impossible cells and largest finite zero cell do not arise
    EMAX: tl.constexpr = (1 << (BITS - 1 - MAN_BITS)) - 2 - BIAS
    POW2_STEPS: tl.constexpr = (1 - BIAS <= _POINT_LOG_MIN) & (EMAX >= _U_LOG_MAX + MAN_BITS) & (
        _TJ + (1 << (MAN_BITS - 2)) < (1 << (MAN_BITS + 1)))
    first_step = first // lanes_per_page
    # the lane's symbol within the stage at the first step (< 0: decoded by an earlier stage;
    # -2^31 for a lane past num_lanes, which stays negative: count + lanes_per_page < 2^31),
    # and its parameters' and output's addresses, advanced by lanes_per_page symbols per step
    offs_sym = tl.where(lane_mask, lane + first_step * lanes_per_page - first, -(2**31)).to(tl.int32)
    params_ptrs = params_ptr + offs_page + offs_sym
    out_ptrs = out_bits_ptr + offs_out_page + offs_sym
    for step in range(first_step, tl.cdiv(first + count, lanes_per_page)):  # noqa: B007 (the loop counts)
        active = offs_sym.to(tl.uint32, bitcast=True) < count  # 0 <= offs_sym < count
        params = tl.load(params_ptrs, mask=active, other=_PARAM_MASKED)
        lrow, mq, e = _unpack_params(params)
        # level 1: the cell c (relative to mu's) or ESC, scale PT; the identity step for a
        # symbol that is not dense and for a masked lane (both read the exact model's rows)
        slot = (x & _PT_MASK).to(tl.int32)
        entry, c1, c_next = _level1_entry(slot, lrow, lookup_ptr)
        # one vote for both rare cases (2-5% of 32-lane steps each on SmolLM2 KV): a dense
        # lane short of its entry (c_next <= slot: the row's bisection), and ESC or a symbol
        # that is not dense (entry I_ESC, the largest: the exact model's step below); masked
        # lanes neither (entry I_MASKED, the identity step)
        rare = tl.max(tl.maximum(slot - c_next + _I_ESC, entry), axis=0) >= _I_ESC
        if rare:
            short = c_next <= slot  # dense lanes only (the exact model's rows end at 2^PT)
            if tl.max(short.to(tl.int32), axis=0) > 0:
                row_ptr = cum1_ptr + ((lrow & (_PARAM_EXACT - 1)) >> _PARAM_ROW_SHIFT) * _ROW
                entry_b, c1_b = _level1_bisect(slot, row_ptr)
                entry = tl.where(short, tl.where(entry_b == _ESC, _I_ESC, entry_b), entry)
                c1 = tl.where(short, c1_b, c1)
                c_next = tl.where(short, tl.load(row_ptr + entry_b + 1), c_next)
        x, wptr = _rans_refill(_rans_x(x, slot - c1, c_next - c1, _PT), wptr, words_ptr, num_words)
        # level 2: raw offset bits (scale PT) or a zero cell's point (P2); or the exact
        # model's step, scale PROB_BITS, after ESC and for a symbol that is not dense (its
        # one step: the reference's identity step after it reads nothing and leaves x as it is)
        exact = entry == _I_ESC  # ESC or not dense (after the bisection); masked lanes not
        pattern, d, rem, freq, scale, ok = _decode_level2(entry, (x & _P2_MASK).to(tl.int32), mq, e,
                                                          active & ~exact, BITS, MAN_BITS, BIAS)
        bad = bad | (active & ~exact & ~ok)
        low = ((1 << scale) - 1) >> d  # [0, 2^(scale - d)): the bits below level 2's step
        if rare:  # (a uniform branch: no vote on the hit path)
            if tl.max((active & exact).to(tl.int32), axis=0) > 0:
                need = active & exact
                mu = tl.load(mu_ptr + offs_page + offs_sym, mask=need, other=0.0)
                mu_q = _quantize_mu(mu, e)  # e and r from the parameters: sigma is not read
                slot_e = (x & (_M - 1)).to(tl.int32)
                key_e, c_lo, c_hi, _, _ = _find_key(slot_e, mu_q, e, _param_r(params), need, phi_ptr, q_ptr,
                                                    w_wide, kappa, BITS, MAN_BITS, BIAS, FN_NAN, GALLOP_ROUNDS)
                pattern = tl.where(exact, _pattern_of_key(key_e, BITS), pattern)
                x, wptr = _rans_pop(x, wptr, slot_e - c_lo, c_hi - c_lo, _PROB_BITS, need, words_ptr, num_words)
        # [0, 2^B): the cast keeps its B bits
        tl.store(out_ptrs, pattern.to(out_bits_ptr.dtype.element_ty), mask=active)
        # level 2's step (the exact model's lanes and the inactive ones: the identity, d = 0)
        if POW2_STEPS:
            x, wptr = _rans_pop_bits(x, wptr, d, low, words_ptr, num_words)
        else:
            x, wptr = _rans_pop(x, wptr, rem, freq, scale, active & ~exact, words_ptr, num_words)
        offs_sym += lanes_per_page
        params_ptrs += lanes_per_page
        out_ptrs += lanes_per_page
    tl.store(x_ptr + offs_lane, x, mask=lane_mask)
    tl.store(wptr_ptr + offs_lane, wptr.to(tl.int64), mask=lane_mask)
    tl.store(lane_ok_ptr + offs_lane, tl.zeros([BLOCK_LANES], tl.uint8), mask=lane_mask & bad)


class Decoder(ref.Decoder):
    """rans_reference.Decoder with its per-stage loop on the GPU (same keys, same verdict).

    Construction (stream validation, initial states x and word pointers ptr, both int64
    [P * NL] on the words' device, the per-lane verdict lane_ok, the guess's quantile
    table; ``model``, "exact" or "table") and ``finish()`` are the reference's own code.
    Words may be int32 holding the u32 words (what encode_values returns and the codec
    passes; 4 B per word) or int64 in [0, 2^32). The table model decodes through
    ``decode_values`` only.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.quantiles_f32 = self.quantiles.to(torch.float32)  # [2^QUANTILE_BITS + 1], guesses only

    def decode(
        self, mu_q: torch.Tensor, e: torch.Tensor, r: torch.Tensor, probes: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Keys (int64, [P, n] or [n] like the inputs) of the next n symbols of each page,
        given their quantised parameters (int64, from quantize_params). ``probes``, if given
        (int32 [2, P, n] on the same device), receives each symbol's C evaluations beyond the
        guess's two: [0] galloping, [1] bisecting (tests and examples/estimate_sm90.py)."""
        if self.model != tm.MODEL_EXACT:
            raise NotImplementedError("the Triton decoder runs the table model in decode_values only")
        squeeze = mu_q.dim() == 1
        (mu_q, e, r), n = self._stage((mu_q, e, r), torch.int64)
        _check_device(self.words, mu_q, e, r)
        mu_q, e, r = mu_q.contiguous(), e.contiguous(), r.contiguous()
        if probes is not None and (probes.shape != (2, *mu_q.shape) or probes.dtype != torch.int32
                                   or not probes.is_contiguous() or probes.device != mu_q.device):
            raise ValueError(f"probes must be a contiguous int32 tensor of shape {(2, *mu_q.shape)}")
        bits, man_bits, bias, fn_nan = em.DTYPE_SPECS[self.dtype]
        keys = torch.empty_like(mu_q)
        lanes = self.num_pages * self.num_lanes
        if n:
            self.words = self.words.contiguous()
            self.x, self.ptr = self.x.contiguous(), self.ptr.contiguous()  # updated in place
            _decode_kernel[(triton.cdiv(lanes, DECODE_LANES),)](
                self.words, mu_q, e, r, em.phi_table(mu_q.device), self.quantiles_f32, keys, self.x, self.ptr,
                probes, lanes, self.num_lanes, self.words.numel(), self.position, n, mu_q.numel(),
                self.w_wide, self.kappa, BITS=bits, MAN_BITS=man_bits, BIAS=bias, FN_NAN=fn_nan,
                GALLOP_ROUNDS=GALLOP_ROUNDS, COUNT_PROBES=probes is not None, BLOCK_LANES=DECODE_LANES,
                num_warps=DECODE_WARPS,
            )
        self.position += n
        return keys[0] if squeeze else keys

    def decode_values(
        self, mu: torch.Tensor, sigma: torch.Tensor, out_bits: torch.Tensor, params: torch.Tensor | None = None
    ) -> None:
        """rans_reference.Decoder.decode_values in one kernel (quantize_params, the search, the
        storage patterns per symbol; rans_cpu's on the CPU): the next n symbols of each page
        from float32 (mu, sigma) [P, n] (or [n]), written as storage patterns into columns
        [position, position + n) of out_bits [P, N] (int16 for 16-bit dtypes, else uint8;
        contiguous). The table model reads its parameters from ``params``, int32 shaped like
        mu (``table_params(mu, sigma, dtype)``, which a caller may compute once per distinct
        (mu, sigma) and broadcast), computing them here when not given (int32 [P, n]); mu only
        for its rare exact-model steps. Otherwise it allocates nothing per symbol
        on the device."""
        if params is not None and self.model != tm.MODEL_TABLE:
            raise ValueError("params are the table model's")
        (mu, sigma), n = self._stage((mu, sigma), torch.float32)
        if self.model == tm.MODEL_TABLE:
            if params is None:
                params = table_params(mu, sigma, self.dtype)
            (params,), _ = self._stage((params,), torch.int32)
            if params.shape != mu.shape:
                raise ValueError(f"params must be shaped like mu {tuple(mu.shape)}, got {tuple(params.shape)}")
            _check_device(mu, params)
            params = params.contiguous()
            if self.words.numel() + 2 * self.num_symbols >= 2**31:  # the kernel's int32 word pointers
                raise ValueError(f"{self.words.numel()} words: the Triton table decoder takes fewer than "
                                 f"2^31 - {2 * self.num_symbols} per call; decode fewer pages at a time")
        b, man_bits, bias, fn_nan = em.DTYPE_SPECS[self.dtype]
        want = torch.int16 if b == 16 else torch.uint8
        shape = (self.num_pages, self.num_symbols)
        if out_bits.shape != shape or out_bits.dtype != want or not out_bits.is_contiguous():
            raise ValueError(f"out_bits must be a contiguous {want} tensor of shape {shape}, "
                             f"got {out_bits.dtype} {tuple(out_bits.shape)}")
        _check_device(self.words, mu, sigma, out_bits)
        mu, sigma = mu.contiguous(), sigma.contiguous()
        lanes = self.num_pages * self.num_lanes
        if n:
            self.words = self.words.contiguous()
            self.x, self.ptr = self.x.contiguous(), self.ptr.contiguous()  # updated in place
            grid = (triton.cdiv(lanes, DECODE_LANES),)
            spec = dict(BITS=b, MAN_BITS=man_bits, BIAS=bias, FN_NAN=fn_nan, GALLOP_ROUNDS=GALLOP_ROUNDS,
                        BLOCK_LANES=DECODE_LANES, num_warps=DECODE_WARPS)
            sizes = (lanes, self.num_lanes, self.words.numel(), self.position, n, self.num_symbols, self.w_wide,
                     self.kappa)
            if self.model == tm.MODEL_TABLE:
                self.lane_ok = self.lane_ok.contiguous()  # cleared in place (as uint8) for impossible points
                _decode_table_kernel[grid](
                    self.words, params, mu, _level1_table(self.w_wide, self.kappa, mu.device),
                    _level1_lookup(self.w_wide, self.kappa, mu.device), em.phi_table(mu.device),
                    self.quantiles_f32, out_bits, self.x, self.ptr,
                    self.lane_ok.view(torch.uint8), *sizes, **spec,
                )
            else:
                _decode_values_kernel[grid](
                    self.words, mu, sigma, em.phi_table(mu.device), self.quantiles_f32, out_bits, self.x,
                    self.ptr, *sizes, **spec,
                )
        self.position += n


# ---- Self-check (python -m sglang_speckv.kernels.rans_triton) ----------------------------


def _self_check() -> None:
    """Random pages through the value-level path (what the codec runs), both entropy models
    for bf16: Triton bytes == reference bytes, staged decode_values == the pages' patterns,
    timings."""
    import time

    if torch.cuda.is_available():
        device, n, num_pages, num_lanes = "cuda", 1 << 20, 8, 1024
    elif triton.knobs.runtime.interpret:
        device, n, num_pages, num_lanes = "cpu", 1024, 2, 64  # the interpreter is slow
    else:
        raise SystemExit("no CUDA GPU: run with TRITON_INTERPRET=1 to check the kernels on CPU")
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter: timings mean nothing)"
    torch.manual_seed(0)
    em.phi_table(device)  # built once, outside the timings
    for dtype, model in (("bf16", tm.MODEL_EXACT), ("bf16", tm.MODEL_TABLE), ("fp8_e4m3", tm.MODEL_EXACT)):
        scale = 1.0 if dtype == "bf16" else 16.0
        mu = torch.randn(num_pages, n, device=device) * scale
        sigma = (torch.rand(num_pages, n, device=device) + 0.1) * scale
        values = (mu + sigma * torch.randn(num_pages, n, device=device)).to(em.TORCH_DTYPES[dtype])
        bits = values.view(torch.int16 if em.symbol_bits(dtype) == 16 else torch.uint8)  # [P, N]
        raw_mb = values.numel() * values.element_size() / 1e6

        def timed(fn):
            """fn() and its seconds; on CUDA the second of two runs (the first compiles)."""
            for _ in range(2 if device == "cuda" else 1):
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = fn()
                if device == "cuda":
                    torch.cuda.synchronize()
            return out, time.perf_counter() - t0

        def decode(decoder_cls, words, lane_words):
            dec = decoder_cls(words, lane_words, n, dtype, model=model)
            out_bits = torch.empty_like(bits)
            cut = n // 3  # two stages, cut mid-step
            dec.decode_values(mu[:, :cut], sigma[:, :cut], out_bits)
            dec.decode_values(mu[:, cut:], sigma[:, cut:], out_bits)
            return out_bits, dec.finish()

        (words_ref, lanes_ref), t_enc_ref = timed(lambda: ref.encode_values(bits, mu, sigma, dtype, num_lanes,
                                                                            model=model))
        (words, lane_words), t_enc = timed(lambda: encode_values(bits, mu, sigma, dtype, num_lanes, model=model))
        (got, ok), t_dec = timed(lambda: decode(Decoder, words, lane_words))
        (got_ref, ok_ref), t_dec_ref = timed(lambda: decode(ref.Decoder, words, lane_words))
        same = torch.equal(words, words_ref) and torch.equal(lane_words, lanes_ref)
        round_trip = torch.equal(got, bits) and torch.equal(got_ref, bits) and bool(ok.all()) and bool(ok_ref.all())
        print(
            f"{dtype}, {model} model, on {where}: {num_pages} pages x {n} symbols, {num_lanes} lanes: "
            f"{words.numel() * 32 / bits.numel():.4f} bits/symbol; bytes == reference: {same}; "
            f"round trip: {'OK' if round_trip else 'FAILED'}\n"
            f"  encode_values {raw_mb / t_enc:.4g} MB/s (torch reference {raw_mb / t_enc_ref:.4g} MB/s), "
            f"decode_values {raw_mb / t_dec:.4g} MB/s (torch reference {raw_mb / t_dec_ref:.4g} MB/s)"
        )
        if not (same and round_trip):
            raise SystemExit(1)


if __name__ == "__main__":
    _self_check()
