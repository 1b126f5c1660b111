// Interleaved rANS64 on the CPU: the C++ twin of kernels/rans_reference.py (same bytes,
// same keys, same verdicts). Built on first use by kernels/rans_cpu.py with
// torch.utils.cpp_extension.load; every constant of the coder arrives as a -D macro
// generated from entropy_model.py / rans_reference.py / table_model.py (SPECKV_*), the
// dtype's fields (entropy_model.DTYPE_SPECS) and the tables (PHI, the decoder's quantiles,
// the table model's level-1 rows) as arguments, so nothing here repeats a number.
//
// Lanes are independent coders, so the work is split over lanes with at::parallel_for (a
// lane's result does not depend on which thread ran it, so neither do the bytes): a thread
// advances a block of LANE_BLOCK lanes of a page step by step (encode in reverse). Lane g
// is lane g % NL of page g / NL; its step j is symbol g % NL + j * NL of that page
// (DESIGN.md "Lanes").
//
// Two entropy models: the exact model (entropy_model.py: C(k), one 28-bit step per symbol)
// and the table model (table_model.py, whose docstring specifies it; 16-bit dtypes): two
// steps per symbol, the key's cell on a lattice aligned to multiples of u = 2^(e - TS)
// relative to mu's cell (a level-1 table row, or ESC), then the key within the cell (raw
// offset bits off zero, a zero cell's points, or after ESC the exact model's step); a
// symbol that is not dense takes the exact model's step alone. Its level-1 table arrives as
// a tensor from table_model.level1_table.
//
// Within a step the model's work for the block's lanes (quantize_params, the guess, C at two
// keys; the table model's cells, level-1 search, offsets and zero-cell truncation) is independent across
// lanes, so it is written branch-free (selects, & instead of &&, clamps by value, loads
// outside selects) in loops under `#pragma omp simd`: with -march=native the compiler turns
// them into AVX-512 (or AVX2) code with gathers for the table reads. Integer operations give
// the same integers in any lane width, and the float64 steps are the same IEEE operations
// (-ffp-contract=off: no FMA), so the bytes do not depend on the vector width or the CPU
// (tests/test_rans_cpu.py compares them with the torch reference). Check that the loops
// still vectorise after a change: add -fopt-info-vec-missed to CFLAGS in rans_cpu.py.
//
// Arithmetic follows the reference operation for operation in int64. Products and sums that
// the reference lets wrap on corrupt input (never on valid input: see the bounds in
// rans_reference.py's docstring) go through uint64 so that they wrap here too instead of
// being undefined behaviour; >> of a negative int64 is arithmetic (gcc), as in torch.

#include <ATen/MemoryOverlap.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <type_traits>
#ifdef __linux__
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace {

constexpr int64_t PROB_BITS = SPECKV_PROB_BITS;
constexpr int64_t M = int64_t(1) << PROB_BITS;
constexpr int64_t F = SPECKV_F;
constexpr int64_t R = SPECKV_R;
constexpr int64_t T_BITS = SPECKV_T_BITS;
constexpr int64_t X_SHIFT_MAX = SPECKV_X_SHIFT_MAX;
constexpr int64_t X_MAX = int64_t(1) << X_SHIFT_MAX;
constexpr int64_t DIFF_MAX = SPECKV_DIFF_MAX;
constexpr int64_t T_MAX = SPECKV_T_MAX;
constexpr int64_t T_SHIFT = SPECKV_T_SHIFT;
constexpr int64_t INTERP_BITS = SPECKV_INTERP_BITS;
constexpr int64_t W_TOTAL = SPECKV_W_TOTAL;
constexpr int64_t RANS_L = SPECKV_RANS_L;
constexpr int64_t WORD_BITS = SPECKV_WORD_BITS;
constexpr int64_t WORD_MASK = (int64_t(1) << WORD_BITS) - 1;
constexpr int64_t ENC_SHIFT = SPECKV_ENC_SHIFT;
constexpr int64_t QUANTILE_BITS = SPECKV_QUANTILE_BITS;
constexpr double SIGMA_MIN = SPECKV_SIGMA_MIN;
constexpr double SIGMA_MAX = SPECKV_SIGMA_MAX;
constexpr double MU_INF = SPECKV_MU_INF;
constexpr int64_t SATURATE_EX = SPECKV_SATURATE_EX;  // entropy_model's exponent of inf and NaN keys
// The table model (kernels/table_model.py, whose docstring specifies it)
constexpr int64_t TS = SPECKV_TS;          // cells u = 2^(e - TS) wide
constexpr int64_t CELL_SHIFT = SPECKV_CELL_SHIFT;  // a cell is 2^CELL_SHIFT units of delta (F - TS)
constexpr int64_t TB = SPECKV_TB;          // sigma buckets: the top TB bits of r below its leading one
constexpr int64_t FB = SPECKV_FB;          // rows per bucket: mu's position in its cell in 2^FB steps
constexpr int64_t TJ = SPECKV_TJ;          // cells on each side of mu's
constexpr int64_t NCELL = SPECKV_NCELL;    // 2 TJ
constexpr int64_t ESC = SPECKV_ESC;        // the escape entry of a level-1 row (NCELL)
constexpr int64_t START_BITS = SPECKV_START_BITS;  // table_model.level1_start's buckets: 2^START_BITS per row
constexpr int64_t ROW = SPECKV_ROW;        // a level-1 row: NCELL + 1 entries' CUM1 and 2^PT
constexpr int64_t ROWS = SPECKV_ROWS;      // 2^(TB + FB) rows
constexpr int64_t PT = SPECKV_PT;          // level-1 probability bits; the scale of an offset step
constexpr int64_t P2 = SPECKV_P2;          // points of a zero cell: 2^P2 (its step's scale)
constexpr int64_t DENSE_LOG = SPECKV_DENSE_LOG;    // the table needs >= 2^DENSE_LOG keys per cell
constexpr int64_t MAG_SHIFT_MAX = SPECKV_MAG_SHIFT_MAX;  // a magnitude in cells saturates at 2^MAG_SHIFT_MAX

constexpr int64_t floor_log2(int64_t v) { return v <= 1 ? 0 : 1 + floor_log2(v >> 1); }
static_assert(MAG_SHIFT_MAX + 11 <= 63, "sig (< 2^11) << MAG_SHIFT_MAX must fit int64");

inline int64_t wrap_add(int64_t a, int64_t b) { return int64_t(uint64_t(a) + uint64_t(b)); }
inline int64_t wrap_mul(int64_t a, int64_t b) { return int64_t(uint64_t(a) * uint64_t(b)); }

// 2^n as float64 from its bits (exact), n clamped to the normal range.
inline double pow2(int64_t n) {
  const uint64_t u = uint64_t(std::clamp<int64_t>(n, -1022, 1023) + 1023) << 52;
  double d;
  std::memcpy(&d, &u, sizeof d);
  return d;
}

// 2^n as int64 for n in [0, 62], by way of the float64 2^n: no shift of a constant by a
// per-lane count, which gcc's vectoriser cannot do.
inline int64_t pow2_int(int64_t n) { return int64_t(pow2(n)); }

// A storage dtype (entropy_model.DTYPE_SPECS: bits B, mantissa bits, exponent bias,
// e4m3fn-style NaN only), with the masks its fields need.
struct Dtype {
  int64_t bits, man_bits, bias;
  bool fn_nan;
  int64_t top, exp_ones, man_mask, max_pattern;
  int64_t nan_mant_ones;  // mantissa bits that need not be set in an inf/NaN pattern

  Dtype(int64_t bits_, int64_t man_bits_, int64_t bias_, bool fn_nan_)
      : bits(bits_), man_bits(man_bits_), bias(bias_), fn_nan(fn_nan_), top(int64_t(1) << bits_),
        exp_ones((int64_t(1) << (bits_ - 1 - man_bits_)) - 1), man_mask((int64_t(1) << man_bits_) - 1),
        // the largest finite pattern: S.1111.110 for e4m3fn, S.1110.111... for IEEE-like
        max_pattern(fn_nan_ ? (exp_ones << man_bits_) + man_mask - 1 : (exp_ones << man_bits_) - 1),
        nan_mant_ones(fn_nan_ ? 0 : man_mask) {}

  // entropy_model.value_units at key k in [0, 2^B) with off = F - e: the key's value in units
  // of delta, truncated toward zero, saturated to +-X_MAX; computed from the key's bits
  // (entropy_model._key_fields_cpu tabulates the same sig, ex, sgn).
  inline int64_t units(int64_t k, int64_t off) const {
    // Branch-free (selects only), so that loops over lanes vectorise.
    const int64_t sign_bit = top >> 1;
    const int64_t pattern = (k & sign_bit) ? k ^ sign_bit : k ^ (top - 1);  // bits_from_keys
    const int64_t biased = (pattern >> man_bits) & exp_ones;
    const int64_t mant = pattern & man_mask;
    // inf/NaN: an all-ones exponent, and for e4m3fn an all-ones mantissa too
    const bool special = (biased == exp_ones) & ((mant | nan_mant_ones) == man_mask);  // & not &&: no branch
    const int64_t sig = mant + (int64_t(biased != 0) << man_bits);  // < 2^11
    const int64_t shift = std::max<int64_t>(biased, 1) - bias - man_bits + off;
    const int64_t up = std::clamp<int64_t>(shift, 0, X_SHIFT_MAX);
    const int64_t down = std::clamp<int64_t>(-shift, 0, 63);
    // inf and NaN saturate to the side of their sign
    const int64_t mag = special ? X_MAX : std::min<int64_t>((sig << up) >> down, X_MAX);
    return (pattern & sign_bit) ? -mag : mag;
  }

  // A key whose value is near v (the decoder's guess: any error here only costs time, never
  // changes a result): v rounded to the dtype's grid, saturated to the finite range.
  inline int64_t nearest_key(double v) const {
    // Branch-free like units(); every shift count is clamped into [0, 63] before use.
    uint64_t u;
    std::memcpy(&u, &v, sizeof u);
    const int64_t e2 = int64_t(u >> 52) & 0x7FF;  // float64 biased exponent
    const int64_t m52 = int64_t(u & ((uint64_t(1) << 52) - 1));
    const int64_t biased = e2 - 1023 + bias;  // < 2^11
    // normal (biased >= 1): round the mantissa; a carry moves into the exponent
    const int64_t rs_n = 52 - man_bits;
    const int64_t normal = ((std::max<int64_t>(biased, 0) << 52 | m52) + (int64_t(1) << (rs_n - 1))) >> rs_n;
    // subnormal: units of 2^(1 - bias - man_bits); shifted out entirely beyond 62
    const int64_t rs_s = std::clamp<int64_t>(53 - man_bits - biased, 1, 63);
    // (v + 2^(s-1)) >> s written as ((v >> (s-1)) + 1) >> 1 (equal for v >= 0): no shift
    // of a constant by a per-lane count, which the vectoriser cannot do
    const int64_t sub = rs_s > 62 ? 0 : (((int64_t(1) << 52 | m52) >> (rs_s - 1)) + 1) >> 1;
    int64_t pattern = std::min(biased >= 1 ? normal : sub, max_pattern);
    pattern = ((e2 == 0) | (e2 == 0x7FF)) ? 0 : pattern;  // float64 zeros, subnormals and NaNs guess 0
    pattern = ((e2 == 0x7FF) & (m52 == 0)) ? max_pattern : pattern;  // infinities
    const int64_t sign_bit = top >> 1;
    return (u >> 63) ? (pattern | sign_bit) ^ (top - 1) : pattern | sign_bit;  // keys_from_bits
  }

  // The fields of a magnitude pattern mp (sign bit clear) as entropy_model._key_fields_cpu
  // tabulates them: its value is sig 2^ex; inf and NaN get sig 1, ex SATURATE_EX.
  // Returns whether it is finite (for the callers' escapes: a test of ex == SATURATE_EX
  // there stops gcc's vectoriser). Branch-free.
  inline bool magnitude_fields(int64_t mp, int64_t& sig, int64_t& ex) const {
    const int64_t biased = (mp >> man_bits) & exp_ones;
    const int64_t mant = mp & man_mask;
    const bool special = (biased == exp_ones) & ((mant | nan_mant_ones) == man_mask);  // inf/NaN
    sig = special ? 1 : mant + (int64_t(biased != 0) << man_bits);  // < 2^11
    ex = special ? SATURATE_EX : std::max<int64_t>(biased, 1) - bias - man_bits;
    return !special;
  }

  // table_model.trunc_magnitude: the magnitude pattern of the largest finite value <= n u /
  // 2^P2 (u = 2^(e - TS), 0 <= n < 2^P2, so the float64 n 2^(e - TS - P2) is exact), by
  // integer operations on its bits; beyond the largest finite value, that value. 16-bit
  // (IEEE-like) dtypes only. Branch-free, every shift count clamped into range.
  inline int64_t trunc_magnitude(int64_t n, int64_t e) const {
    const double v = double(n) * pow2(e - TS - P2);
    uint64_t u;
    std::memcpy(&u, &v, sizeof u);
    const int64_t big_e = int64_t(u >> 52 & 0x7FF) - 1023;
    const int64_t mant = int64_t(u & ((uint64_t(1) << 52) - 1));
    const int64_t emin = 1 - bias, emax = exp_ones - 1 - bias;
    const int64_t normal = (std::max<int64_t>(big_e + bias, 0) << man_bits) | (mant >> (52 - man_bits));
    const int64_t sub = (mant | (int64_t(1) << 52)) >> std::clamp<int64_t>(52 - man_bits + emin - big_e, 0, 63);
    const int64_t mag = big_e > emax ? max_pattern : (big_e >= emin ? normal : sub);
    return n == 0 ? 0 : mag;
  }
};

// entropy_model.cdf for one symbol given its invariants (entropy_model.prepare: 2 mu_q,
// off = F - e, inv = 2^32 // r).
struct Model {
  Dtype dtype;
  const int64_t* phi;  // [PHI_KNOTS + 1] entropy_model.phi_table
  int64_t w_wide, kappa;

  // entropy_model.phi: 2^24 * Phi(t / 2^T_BITS), linear between knots
  inline int64_t phi_at(int64_t t) const {
    const int64_t u = std::clamp<int64_t>(t, -T_MAX, T_MAX) + T_MAX;
    const int64_t i = u >> INTERP_BITS;
    const int64_t f = u & ((int64_t(1) << INTERP_BITS) - 1);
    const int64_t lo = phi[i];
    return lo + (((phi[i + 1] - lo) * f) >> INTERP_BITS);
  }

  // C from key k's lower boundary (units(k - 1) + units(k), in units of delta / 2), k in [1, 2^B)
  inline int64_t from_boundary(int64_t k, int64_t boundary, int64_t two_mu_q, int64_t inv) const {
    const int64_t diff = std::clamp<int64_t>(boundary - two_mu_q, -DIFF_MAX, DIFF_MAX);
    const int64_t t = (diff * inv) >> T_SHIFT;
    const int64_t g = (W_TOTAL - w_wide) * phi_at(t) + w_wide * phi_at(t >> kappa);  // [0, 2^32]
    return k + ((g * (M - dtype.top)) >> 32);
  }

  // entropy_model.cdf_prepared: C(k) for k in [0, 2^B] (C(0) = 0, C(2^B) = M)
  inline int64_t cdf(int64_t k, int64_t two_mu_q, int64_t off, int64_t inv) const {
    if (k <= 0) return 0;
    if (k >= dtype.top) return M;
    return from_boundary(k, dtype.units(k - 1, off) + dtype.units(k, off), two_mu_q, inv);
  }

  // (C(k), C(k + 1)) for k in [0, 2^B), sharing units(k)
  inline void cdf_pair(int64_t k, int64_t two_mu_q, int64_t off, int64_t inv, int64_t& c0, int64_t& c1) const {
    // both boundaries are always computed (units of keys -1 and 2^B are harmless), then
    // the ends selected: no branch, so loops over lanes vectorise
    const int64_t u = dtype.units(k, off);
    const int64_t f0 = from_boundary(k, dtype.units(k - 1, off) + u, two_mu_q, inv);
    const int64_t f1 = from_boundary(k + 1, u + dtype.units(k + 1, off), two_mu_q, inv);
    c0 = k <= 0 ? 0 : f0;
    c1 = k + 1 >= dtype.top ? M : f1;
  }
};

void check_int64(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.dtype() == torch::kInt64 && t.is_contiguous() && t.device().is_cpu(), name,
              " must be a contiguous int64 CPU tensor");
}

}  // namespace

// rans_reference.encode: cum, freq int64 [P, N] (checked: 1 <= freq, 0 <= cum, cum + freq
// <= M). Returns (words int64 [W], lane_words int64 [P, NL]).
std::vector<torch::Tensor> encode(const torch::Tensor& cum, const torch::Tensor& freq, int64_t num_lanes) {
  check_int64(cum, "cum");
  check_int64(freq, "freq");
  const int64_t num_pages = cum.size(0), n = cum.size(1);
  const int64_t* cum_p = cum.data_ptr<int64_t>();
  const int64_t* freq_p = freq.data_ptr<int64_t>();
  for (int64_t i = 0; i < num_pages * n; ++i) {
    if (freq_p[i] < 1 || cum_p[i] < 0 || cum_p[i] > M - freq_p[i]) {
      throw std::invalid_argument("cum/freq out of range: need 1 <= freq and 0 <= cum <= M - freq");
    }
  }
  const int64_t steps = (n + num_lanes - 1) / num_lanes;
  const int64_t lanes = num_pages * num_lanes;
  const int64_t region = steps + 2;  // one word per step at most, plus the 2-word flush
  auto scratch = torch::empty({lanes * region}, torch::kInt64);
  auto begin = torch::empty({lanes}, torch::kInt64);
  int64_t* scratch_p = scratch.data_ptr<int64_t>();
  int64_t* begin_p = begin.data_ptr<int64_t>();
  at::parallel_for(0, lanes, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t page = g / num_lanes, lane = g % num_lanes;
      const int64_t* c = cum_p + page * n;
      const int64_t* f = freq_p + page * n;
      int64_t* out = scratch_p + g * region;
      int64_t ptr = region;  // words are written backwards (warning 2 of the reference)
      int64_t x = RANS_L;
      for (int64_t s = steps - 1; s >= 0; --s) {  // in reverse (warning 1)
        const int64_t i = lane + s * num_lanes;
        if (i >= n) continue;  // the reference's (0, M) pad is the identity
        const int64_t x_lim = ((f[i] - 1) << ENC_SHIFT) | ((int64_t(1) << ENC_SHIFT) - 1);
        if (x > x_lim) {
          out[--ptr] = x & WORD_MASK;
          x >>= WORD_BITS;
        }
        const int64_t q = x / f[i];  // x >= 0, freq >= 1: truncation == floor
        x = (q << PROB_BITS) + (x - q * f[i]) + c[i];
      }
      out[--ptr] = x >> WORD_BITS;  // flush: low word first in decode order
      out[--ptr] = x & WORD_MASK;
      begin_p[g] = ptr;
    }
  });
  auto lane_words = torch::empty({lanes}, torch::kInt64);
  int64_t* count_p = lane_words.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t g = 0; g < lanes; ++g) {
    count_p[g] = region - begin_p[g];
    total += count_p[g];
  }
  auto words = torch::empty({total}, torch::kInt64);
  int64_t* words_p = words.data_ptr<int64_t>();
  int64_t dest = 0;
  for (int64_t g = 0; g < lanes; ++g) {
    std::copy_n(scratch_p + g * region + begin_p[g], count_p[g], words_p + dest);
    dest += count_p[g];
  }
  return {words, lane_words.view({num_pages, num_lanes})};
}

void check_params(const int64_t* r, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    if (r[i] < 1) throw std::invalid_argument("r must be >= 1 (quantised parameters from quantize_params)");
  }
}

// entropy_model.cdf for keys in [0, 2^B] with quantised parameters, all int64 of one shape;
// the dtype as (bits, man_bits, bias, fn_nan) from entropy_model.DTYPE_SPECS.
torch::Tensor cdf(const torch::Tensor& keys, const torch::Tensor& mu_q, const torch::Tensor& e,
                  const torch::Tensor& r, const torch::Tensor& phi, int64_t w_wide, int64_t kappa,
                  int64_t bits, int64_t man_bits, int64_t bias, bool fn_nan) {
  for (const auto* t : {&keys, &mu_q, &e, &r, &phi}) check_int64(*t, "cdf argument");
  const Model model{Dtype(bits, man_bits, bias, fn_nan), phi.data_ptr<int64_t>(), w_wide, kappa};
  const int64_t* k_p = keys.data_ptr<int64_t>();
  const int64_t* mu_p = mu_q.data_ptr<int64_t>();
  const int64_t* e_p = e.data_ptr<int64_t>();
  const int64_t* r_p = r.data_ptr<int64_t>();
  const int64_t count = keys.numel();
  check_params(r_p, count);
  auto out = torch::empty_like(keys);
  int64_t* out_p = out.data_ptr<int64_t>();
  at::parallel_for(0, count, 1 << 14, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      out_p[i] = model.cdf(k_p[i], 2 * mu_p[i], F - e_p[i], (int64_t(1) << 32) / r_p[i]);
    }
  });
  return out;
}

// Lanes decoded together by one thread, step by step, in three passes per step: (1) every
// lane's guess and C at the guess pair, branch-free and independent across lanes, so the
// loop vectorises (#pragma omp simd; AVX-512 gathers and 64-bit multiplies where the CPU has
// them); (2) the few lanes whose slot is not in [C(guess), C(guess + 1)) search, one by one;
// (3) the block's keys are emitted and every lane renormalises, vectorised again. Only the
// guess is float arithmetic, and it only decides where the exact integer search starts.
constexpr int64_t LANE_BLOCK = 64;
// Guess passes, as rans_reference's _guess_and_check: the second corrects the floor's +k in
// C(k) = k + ... with the first guess in place of the key of mu (3% faster here, vectorised).
constexpr int GUESS_PASSES = 2;

// The exact model's guess (rans_reference's _guess_and_check): the key whose value is mu +
// sigma G^-1(slot - k) through the quantile table q, with the key of mu in place of k, then
// again with the first guess as k. Float arithmetic: it only decides where the exact search
// starts. Branch-free (called in vectorised loops).
inline int64_t guess_key(const Dtype& dtype, const double* q, int64_t slot, int64_t mu_q, int64_t e, int64_t r) {
  const int64_t floor_free = M - dtype.top;  // counts the Gaussian mixture is spread over
  const int64_t num_cells = int64_t(1) << QUANTILE_BITS;
  const double cell_scale = double(num_cells) / double(floor_free);
  const double mu_f = double(mu_q) * pow2(e - F);
  const double sig_f = double(r) * pow2(e - R - T_BITS);
  int64_t k = dtype.nearest_key(mu_f);
  for (int pass = 0; pass < GUESS_PASSES; ++pass) {
    const double u = double(std::clamp<int64_t>(slot - k, 0, floor_free)) * cell_scale;
    const int64_t cell = std::min<int64_t>(int64_t(u), num_cells - 1);
    const double t = q[cell] + (q[cell + 1] - q[cell]) * (u - double(cell));
    k = std::clamp<int64_t>(dtype.nearest_key(mu_f + sig_f * t), 0, dtype.top - 1);
  }
  return k;
}

// For a lane whose slot missed the guess pair [lo, hi = lo + 1) (c_lo = C(lo), c_hi =
// C(lo + 1)): gallop from it to a bracket C(lo) <= slot < C(hi), then bisect to hi = lo + 1.
// C is strictly increasing with C(0) = 0 <= slot < M = C(2^B), so the key is the unique lo
// whatever the guess.
static void search_key(const Model& model, int64_t two_mu_q, int64_t off, int64_t inv, int64_t slot, int64_t& lo, int64_t& c_lo,
            int64_t& c_hi) {
  int64_t hi = lo + 1;
  if (c_lo > slot) {  // the key is below the guess
    for (int64_t stride = 1;; stride <<= 1) {
      hi = lo, c_hi = c_lo;
      lo = std::max<int64_t>(hi - stride, 0);
      c_lo = model.cdf(lo, two_mu_q, off, inv);
      if (c_lo <= slot) break;
    }
  } else {  // the key is above the guess
    for (int64_t stride = 1;; stride <<= 1) {
      lo = hi, c_lo = c_hi;
      hi = std::min(lo + stride, model.dtype.top);
      c_hi = model.cdf(hi, two_mu_q, off, inv);
      if (c_hi > slot) break;
    }
  }
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    const int64_t c = model.cdf(mid, two_mu_q, off, inv);
    if (c <= slot) {
      lo = mid, c_lo = c;
    } else {
      hi = mid, c_hi = c;
    }
  }
}

// One stage of rans_reference.Decoder.decode, the loop shared by both entry points below:
// symbols [first, first + n) of each of P pages. params (IntParams or RowParams below) gives
// the quantised parameters and 2^32 // r: params.step(page, col0, j_lo, j_hi) before a step
// of the lanes' block, then params(j, mu_q, e, r, inv) for block slot j in [j_lo, j_hi), the
// stage's column col0 + j of the page; emit(page, col0, j_lo, j_hi, key) takes a block's keys
// key[j], j in [j_lo, j_hi), of columns col0 + j. Each thread works with its own copies of
// params and emit (they keep buffers and cursors). x, ptr: int64 [P * NL] lane states and next-word
// indices, updated in place; words_p: W >= 1 words (int64 or uint32 values in [0, 2^32)).
template <class Word, class ParamFn, class EmitFn>
void decode_stage(const Model& model, const double* q, const Word* words_p, int64_t num_words, int64_t* x_p,
                  int64_t* ptr_p, int64_t num_pages, int64_t n, int64_t num_lanes, int64_t first, ParamFn params,
                  EmitFn emit) {
  const int64_t last_word = num_words - 1;
  const int64_t step_begin = first / num_lanes, step_end = (first + n + num_lanes - 1) / num_lanes;
  const int64_t blocks_per_page = (num_lanes + LANE_BLOCK - 1) / LANE_BLOCK;

  at::parallel_for(0, num_pages * blocks_per_page, 1, [&](int64_t b0, int64_t b1) {
    // Locals, not loads through the closure, in the vectorised loops.
    const Model mdl = model;
    ParamFn prm = params;  // the thread's own (RowParams keeps the block's parameters)
    EmitFn out = emit;  // the thread's own (PatternWriter keeps a cursor)
    const double* qt = q;
    const Word* wp = words_p;
    // block slot j holds lane l0 + j: its state, next word, and this step's key and C pair
    int64_t x[LANE_BLOCK], ptr[LANE_BLOCK], key[LANE_BLOCK], c_lo[LANE_BLOCK], c_hi[LANE_BLOCK];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t page = b / blocks_per_page;
      const int64_t l0 = (b % blocks_per_page) * LANE_BLOCK;
      const int64_t l1 = std::min(l0 + LANE_BLOCK, num_lanes);
      const int64_t g0 = page * num_lanes + l0;  // the block's first lane in the batch
      std::copy(x_p + g0, x_p + g0 + (l1 - l0), x);
      std::copy(ptr_p + g0, ptr_p + g0 + (l1 - l0), ptr);
      for (int64_t step = step_begin; step < step_end; ++step) {
        // lane l holds stage symbol l + step * NL - first; idle outside [0, n) (ragged ends)
        const int64_t base = step * num_lanes - first;
        const int64_t j_lo = std::max(l0, -base) - l0, j_hi = std::min(l1, n - base) - l0;
        const int64_t col0 = base + l0;  // slot j: column col0 + j
        prm.step(page, col0, j_lo, j_hi);

        // Pass 1: the guess and (C(guess), C(guess + 1)). The guess is the reference's: G^-1
        // of (slot - k) through the quantile table, with the key of mu in place of k, then
        // again with the first guess as k.
#pragma omp simd
        for (int64_t j = j_lo; j < j_hi; ++j) {
          int64_t mu_q, e, r, inv;  // inv = 2^32 // r
          prm(j, mu_q, e, r, inv);
          const int64_t k = guess_key(mdl.dtype, qt, x[j] & (M - 1), mu_q, e, r);
          key[j] = k;
          mdl.cdf_pair(k, 2 * mu_q, F - e, inv, c_lo[j], c_hi[j]);
        }
        // Pass 2: the misses (a few percent of symbols) search.
        for (int64_t j = j_lo; j < j_hi; ++j) {
          const int64_t slot = x[j] & (M - 1);
          if (c_lo[j] > slot || c_hi[j] <= slot) {
            int64_t mu_q, e, r, inv;
            prm(j, mu_q, e, r, inv);
            search_key(model, 2 * mu_q, F - e, inv, slot, key[j], c_lo[j], c_hi[j]);
          }
        }
        // Pass 3: emit; x' = freq * (x >> PROB_BITS) + slot - C(k); one word in if it fell
        // below L. A read past the lane's words reads words[min(ptr, W - 1)] like the
        // reference; finish() rejects it.
        out(page, col0, j_lo, j_hi, key);
#pragma omp simd
        for (int64_t j = j_lo; j < j_hi; ++j) {
          const int64_t x_new = wrap_add(wrap_mul(c_hi[j] - c_lo[j], x[j] >> PROB_BITS), (x[j] & (M - 1)) - c_lo[j]);
          const int64_t word = int64_t(wp[std::min(ptr[j], last_word)]);
          const bool refill = x_new < RANS_L;
          x[j] = refill ? int64_t(uint64_t(x_new) << WORD_BITS) | word : x_new;
          ptr[j] += refill;
        }
      }
      std::copy(x, x + (l1 - l0), x_p + g0);
      std::copy(ptr, ptr + (l1 - l0), ptr_p + g0);
    }
  });
}

void check_quantiles(const torch::Tensor& quantiles) {
  TORCH_CHECK(quantiles.dtype() == torch::kFloat64 && quantiles.is_contiguous() &&
                  quantiles.numel() == (int64_t(1) << QUANTILE_BITS) + 1,
              "quantiles must be rans_reference._quantile_table");
}

// decode_stage's parameters from int64 (mu_q, e, r) [P, n] (quantize_params' output).
struct IntParams {
  const int64_t *mu_q, *e, *r;
  int64_t n, base = 0;  // the stage's symbols per page; the step's symbol at block slot 0
  inline void step(int64_t page, int64_t col0, int64_t, int64_t) { base = page * n + col0; }
  inline void operator()(int64_t j, int64_t& m, int64_t& ee, int64_t& rr, int64_t& inv) const {
    m = mu_q[base + j], ee = e[base + j], rr = r[base + j];
    inv = (int64_t(1) << 32) / rr;
  }
};

// One stage of rans_reference.Decoder.decode: symbols [first, first + n) of every page.
// mu_q, e, r: int64 [P, n]; x, ptr: int64 [P * NL] lane states and next-word indices,
// updated in place; words: int64 [W >= 1]. Returns keys int64 [P, n].
torch::Tensor decode(const torch::Tensor& words, torch::Tensor x_t, torch::Tensor ptr_t, const torch::Tensor& mu_q,
                     const torch::Tensor& e, const torch::Tensor& r, int64_t num_lanes, int64_t first,
                     const torch::Tensor& phi, const torch::Tensor& quantiles, int64_t w_wide, int64_t kappa,
                     int64_t bits, int64_t man_bits, int64_t bias, bool fn_nan) {
  for (const torch::Tensor* t :
       std::initializer_list<const torch::Tensor*>{&words, &x_t, &ptr_t, &mu_q, &e, &r, &phi}) {
    check_int64(*t, "decode argument");
  }
  check_quantiles(quantiles);
  const Model model{Dtype(bits, man_bits, bias, fn_nan), phi.data_ptr<int64_t>(), w_wide, kappa};
  const int64_t* mu_p = mu_q.data_ptr<int64_t>();
  const int64_t* e_p = e.data_ptr<int64_t>();
  const int64_t* r_p = r.data_ptr<int64_t>();
  check_params(r_p, mu_q.numel());
  auto keys = torch::empty_like(mu_q);
  int64_t* keys_p = keys.data_ptr<int64_t>();
  const int64_t n = mu_q.size(1);
  decode_stage(
      model, quantiles.data_ptr<double>(), words.data_ptr<int64_t>(), words.numel(), x_t.data_ptr<int64_t>(),
      ptr_t.data_ptr<int64_t>(), mu_q.size(0), mu_q.size(1), num_lanes, first, IntParams{mu_p, e_p, r_p, n},
      [=](int64_t page, int64_t col0, int64_t j_lo, int64_t j_hi, const int64_t* key) {
        int64_t* dst = keys_p + page * n + col0;
#pragma omp simd
        for (int64_t j = j_lo; j < j_hi; ++j) dst[j] = key[j];
      });
  return keys;
}

// ---- The value-level path: float32 (mu, sigma) and storage bits in, nothing int64 [N] ----

// Round-half-even of a float64 under the default rounding mode, without a libm call: below
// 2^52 in magnitude, adding and subtracting 2^52 leaves exactly the nearest integer (ties to
// even); from 2^52 up every float64 is an integer already. (No -ffast-math here, and
// -ffp-contract=off, so the compiler keeps both operations.)
inline double round_half_even(double v) {
  constexpr double TWO52 = 4503599627370496.0;
  const double a = std::fabs(v);
  const double rounded = (a + TWO52) - TWO52;  // the nearest integer of a, ties to even, if a < 2^52
  return std::copysign(a < TWO52 ? rounded : a, v);  // (selects, no branch: loops vectorise)
}

// std::clamp for a non-NaN double, by value (std::clamp returns a reference, which the
// vectoriser turns into control flow)
inline double clamp_value(double v, double lo, double hi) {
  v = v < lo ? lo : v;
  return v > hi ? hi : v;
}

// entropy_model.quantize_params for one scalar, operation for operation: sigma's frexp
// read from its bits (it is a positive normal float64 after the clamps), exact products
// with powers of two, round-half-even. Branch-free.
inline void quantize(float mu, float sigma, int64_t& mu_q, int64_t& e, int64_t& r) {
  double s = sigma;
  s = std::isnan(s) ? 1.0 : s;
  s = s <= 0 ? SIGMA_MIN : s;
  s = clamp_value(s, SIGMA_MIN, SIGMA_MAX);
  uint64_t u;
  std::memcpy(&u, &s, sizeof u);
  const int64_t e0 = int64_t(u >> 52) - 1023;  // s = 1.m * 2^e0
  const uint64_t one_m = (u & ((uint64_t(1) << 52) - 1)) | (uint64_t(1023) << 52);
  double mant;  // 1.m in [1, 2): frexp's mantissa times 2
  std::memcpy(&mant, &one_m, sizeof mant);
  const int64_t r0 = int64_t(round_half_even(mant * double(int64_t(1) << R)));
  const bool carry = r0 == (int64_t(1) << (R + 1));  // 1.m rounded up to 2
  r = carry ? int64_t(1) << R : r0;
  e = e0 + carry;
  double m = mu;
  m = std::isnan(m) ? 0.0 : m;
  m = clamp_value(m, -MU_INF, MU_INF);
  const double xmax = double(X_MAX);
  mu_q = int64_t(clamp_value(round_half_even(m * pow2(F - e)), -xmax, xmax));
}

// 2^32 // r for the r quantize produces ([2^R, 2^(R+1)]), one division per entry once.
struct InverseTable {
  int64_t inv[(int64_t(1) << R) + 1];
  InverseTable() {
    for (int64_t r = 0; r <= (int64_t(1) << R); ++r) inv[r] = (int64_t(1) << 32) / (r + (int64_t(1) << R));
  }
  inline int64_t operator()(int64_t r) const { return inv[r - (int64_t(1) << R)]; }
};
const InverseTable INVERSE;

// A [P, N] tensor of storage patterns, int16 (16-bit dtypes) or uint8: the pointer of its width.
struct Bits {
  const uint8_t* p8 = nullptr;
  const int16_t* p16 = nullptr;
  explicit Bits(const torch::Tensor& t) {
    TORCH_CHECK(t.is_contiguous() && t.device().is_cpu() && (t.dtype() == torch::kInt16 || t.dtype() == torch::kUInt8),
                "bits must be a contiguous int16 or uint8 CPU tensor");
    if (t.dtype() == torch::kInt16) p16 = t.data_ptr<int16_t>(); else p8 = t.data_ptr<uint8_t>();
  }
};

// Where the elements of a CPU view of up to MAX_DIMS dims with any element strides (0 where
// a value repeats) sit, in its flat C order: its dims of size 1 dropped and each dim merged
// into the one before it where they step as one, so a contiguous view is one dim of stride 1
// (flat()) and e.g. a page of SGLang's layer_first host buffer, [2, L, T, H, D] with T H D
// contiguous, is [2 L, T H D].
struct Layout {
  static constexpr int64_t MAX_DIMS = SPECKV_MAX_DIMS;  // rans_reference.MAX_PAGE_DIMS
  int64_t dims = 0, size[MAX_DIMS] = {}, stride[MAX_DIMS] = {};

  explicit Layout(const torch::Tensor& t) {
    TORCH_CHECK(t.dim() <= MAX_DIMS, "views of at most ", MAX_DIMS, " dims, got ", t.dim());
    for (int64_t d = 0; d < t.dim(); ++d) {
      if (t.size(d) == 1) continue;
      if (dims > 0 && stride[dims - 1] == t.size(d) * t.stride(d)) {
        size[dims - 1] *= t.size(d), stride[dims - 1] = t.stride(d);
      } else {
        size[dims] = t.size(d), stride[dims] = t.stride(d), ++dims;
      }
    }
    if (dims == 0) size[0] = t.numel(), stride[0] = 1, dims = 1;  // one element, or none
  }

  bool flat() const { return dims == 1 && stride[0] == 1; }

  // offsets of elements i0, i0 + 1, ..., i0 + n - 1: i0's index by div/mod once, then an
  // odometer over the dims
  inline void offsets(int64_t i0, int64_t n, int64_t* out) const {
    if (n <= 0) return;
    int64_t idx[MAX_DIMS], off = 0;
    for (int64_t d = dims - 1, rest = i0; d >= 0; --d) {
      idx[d] = rest % size[d], rest /= size[d];
      off += idx[d] * stride[d];
    }
    const int64_t last = dims - 1;
    for (int64_t j = 0; j < n; ++j) {
      out[j] = off;
      off += stride[last];
      for (int64_t d = last; d > 0 && ++idx[d] == size[d]; --d) {  // carry
        idx[d] = 0;
        off += stride[d - 1] - size[d] * stride[d];
      }
    }
  }

  // A row of the last dim (flat elements begin .. begin + size[last] - 1, the first at
  // offset off; idx: its index in the other dims), for walking forward through the view.
  struct Row {
    int64_t begin = 0, off = 0, idx[MAX_DIMS] = {};
  };

  // The row holding element i, by div/mod over the dims
  inline Row row_of(int64_t i) const {
    Row row;
    int64_t rest = i / size[dims - 1];
    row.begin = rest * size[dims - 1];
    for (int64_t d = dims - 2; d >= 0; --d) {
      row.idx[d] = rest % size[d], rest /= size[d];
      row.off += row.idx[d] * stride[d];
    }
    return row;
  }

  // The next row (an odometer over the other dims: no division)
  inline void next(Row& row) const {
    row.begin += size[dims - 1];
    for (int64_t d = dims - 2; d >= 0; --d) {
      row.off += stride[d];
      if (++row.idx[d] < size[d] || d == 0) break;
      row.idx[d] = 0, row.off -= size[d] * stride[d];  // carry
    }
  }
};

// One page's mu or sigma as rows (sglang_speckv/codec.py, Predictor.predict_rows): a float32
// view of its N values with any strides (0 where a parameter repeats, e.g. page_stats'
// per-channel values over the tokens); element i of the page's flat order is at p + its
// Layout offset.
struct Rows {
  Layout layout;
  const float* p = nullptr;

  explicit Rows(const torch::Tensor& t) : layout(t) {
    TORCH_CHECK(t.dtype() == torch::kFloat32 && t.device().is_cpu(), "parameter rows must be float32 CPU tensors");
    p = t.data_ptr<float>();
  }

  inline void offsets(int64_t i0, int64_t n, int64_t* out) const { layout.offsets(i0, n, out); }
};

// decode_stage's parameters from each page's float32 mu and sigma Rows (a stage's n symbols,
// read in place: predict_rows' rows, possibly broadcast views), quantised per symbol. A
// step's block of symbols is consecutive, so step() copies its mu and sigma into contiguous
// block buffers (a plain copy when the block lies within one row of the last dim, as it
// mostly does: that is a token's heads x dim or more) and the vectorised passes read those.
struct RowParams {
  const Rows *mu, *sigma;  // [P] each
  float mu_buf[LANE_BLOCK], sigma_buf[LANE_BLOCK];  // block slot j's mu and sigma
  inline void step(int64_t page, int64_t col0, int64_t j_lo, int64_t j_hi) {
    gather(mu[page], col0 + j_lo, j_hi - j_lo, mu_buf + j_lo);
    gather(sigma[page], col0 + j_lo, j_hi - j_lo, sigma_buf + j_lo);
  }
  inline void operator()(int64_t j, int64_t& m, int64_t& ee, int64_t& rr, int64_t& inv) const {
    quantize(mu_buf[j], sigma_buf[j], m, ee, rr);
    inv = INVERSE(rr);
  }
  static inline void gather(const Rows& rows, int64_t i0, int64_t count, float* out) {
    if (count <= 0) return;  // no lane of the block holds a symbol of the stage in this step
    const Layout& layout = rows.layout;
    if (layout.flat()) {  // contiguous rows (a [P, n] stage, or a one-row prediction): no division
      std::copy(rows.p + i0, rows.p + i0 + count, out);
      return;
    }
    const int64_t last = layout.dims - 1, width = layout.size[last];
    if (layout.stride[last] == 1 && i0 % width + count <= width) {  // within one row: contiguous
      const Layout::Row row = layout.row_of(i0);
      const float* p = rows.p + row.off + (i0 - row.begin);
      std::copy(p, p + count, out);
      return;
    }
    int64_t off[LANE_BLOCK];
    rows.offsets(i0, count, off);
    for (int64_t j = 0; j < count; ++j) out[j] = rows.p[off[j]];
  }
};

// One rANS encoder step of scale 2^shift[j] for block slots j in [0, n) (rans_reference.encode's
// scale; shift 28 for the exact model, 15 (level 1, offsets) and 16 (zero cells) for the table model;
// 1 <= freq <= 2^shift): a word out if x >= freq << (63 - shift) (word[j], else -1), then
// x = ((x // freq) << shift) + x % freq + cum. Vectorised: the quotient is estimated in
// float64 and corrected to the exact one (below x < freq << (63 - shift), so x // freq <
// 2^48 and the estimate is off by at most one).
inline void put_block(int64_t* x, const int64_t* cum, const int64_t* freq, const int64_t* shift, int64_t n,
                      int64_t* word) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const int64_t f = freq[j];
    int64_t xl = x[j];
    const bool emit = (xl >> (ENC_SHIFT + PROB_BITS - shift[j])) >= f;  // x >= f << (63 - shift)
    word[j] = emit ? xl & WORD_MASK : -1;
    xl = emit ? xl >> WORD_BITS : xl;
    int64_t q = int64_t(double(xl) / double(f));
    int64_t rem = int64_t(uint64_t(xl) - uint64_t(q) * uint64_t(f));  // in [-f, 2f): may wrap, not overflow
    q = rem < 0 ? q - 1 : q;
    rem = rem < 0 ? rem + f : rem;
    q = rem >= f ? q + 1 : q;
    rem = rem >= f ? rem - f : rem;
    x[j] = (q << shift[j]) + rem + cum[j];
  }
}

// Hand the whole memory pages inside [begin, end) back to the OS (their contents are not
// needed again; the range stays allocated and would read as zeros). What keeps the encoder's
// peak at about one copy of the words while it copies them out of its scratch.
inline void release_pages(const void* begin, const void* end) {
#ifdef __linux__
  static const uintptr_t page = uintptr_t(sysconf(_SC_PAGESIZE));
  const uintptr_t lo = (uintptr_t(begin) + page - 1) & ~(page - 1), hi = uintptr_t(end) & ~(page - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED);
#endif
}

// The words put_block emitted, appended to their lanes' regions of the scratch (slot j is lane
// g0 + j; region g at scratch + g * stride, emitted[g] words so far).
inline void push_words(const int64_t* word, int64_t n, uint32_t* scratch, int64_t stride, int64_t* emitted,
                       int64_t g0) {
  for (int64_t j = 0; j < n; ++j) {
    if (word[j] >= 0) scratch[(g0 + j) * stride + emitted[g0 + j]++] = uint32_t(word[j]);
  }
}

// table_model.dense: the symbol takes the table (else the exact model's one step alone): the
// key spacing at |mu| + 2 sigma, 2^ls units of delta, is at most a cell over 2^DENSE_LOG.
inline bool dense(const Dtype& dtype, int64_t mu_q, int64_t e, int64_t r) {
  const double v = double(std::abs(mu_q) + (r << (F - R + 1)));  // |mu| + 2 sigma in delta, in [2^21, 2^51): exact
  uint64_t u;
  std::memcpy(&u, &v, sizeof u);
  const int64_t lv = int64_t(u >> 52) - 1023;  // floor(log2 v)
  const int64_t ls = std::max<int64_t>(lv, 1 - dtype.bias + F - e) - dtype.man_bits;  // subnormal spacing below
  return ls <= CELL_SHIFT - DENSE_LOG;
}

// table_model._first_point: ceil(sig 2^ex 2^P2 / u), the first zero-cell point of a
// magnitude sig 2^ex (exact for values < 2u; sig < 2^11). Branch-free.
inline int64_t first_point(int64_t sig, int64_t ex, int64_t e) {
  const int64_t s = ex - (e - TS - P2);
  const int64_t up = sig << std::clamp<int64_t>(s, 0, MAG_SHIFT_MAX);
  const int64_t down = -((-sig) >> std::clamp<int64_t>(-s, 0, 63));  // a ceiling: arithmetic shift
  return s >= 0 ? up : down;
}

// table_model.zero_points for a magnitude pattern mp: (first, count) of its points in a zero
// cell, [first, first + count) of [0, 2^P2): from its first point to the next larger
// magnitude's (clipped to 2^P2; 2^P2 past the largest finite one). count <= 0: no point.
inline void zero_points(const Dtype& dtype, int64_t mp, int64_t e, int64_t& first, int64_t& count) {
  const int64_t top_mag = dtype.top >> 1;  // magnitude patterns are below 2^(B - 1)
  int64_t sig, ex, next_sig, next_ex;
  dtype.magnitude_fields(mp, sig, ex);
  const bool next_finite = dtype.magnitude_fields(std::min(mp + 1, top_mag - 1), next_sig, next_ex) & (mp + 1 < top_mag);
  first = first_point(sig, ex, e);
  const int64_t next = std::min<int64_t>(first_point(next_sig, next_ex, e), int64_t(1) << P2);
  count = (next_finite ? next : int64_t(1) << P2) - first;
}

// table_model.row_index as an index into CUM1 (an index, not a pointer: table reads as base
// + per-lane index vectorise to gathers): where the row of the symbol's sigma bucket b (r's
// TB bits below its leading one) and mu's position in its cell (FB bits) starts.
inline int64_t level1_row_number(int64_t mu_q, int64_t r) {
  const int64_t b = (r >> (R - TB)) - (int64_t(1) << TB);
  return (b << FB) | ((mu_q >> (CELL_SHIFT - FB)) & ((int64_t(1) << FB) - 1));
}
inline int64_t level1_row(int64_t mu_q, int64_t r) { return level1_row_number(mu_q, r) * ROW; }

// The level-1 entry i of the row at cum1 + row with row[i] <= slot < row[i + 1] (row[0] = 0
// <= slot < row[NCELL + 1] = 2^PT), i >= i0: a bisection with strides STRIDE, STRIDE / 2, ...,
// 1 (from 2^floor(log2 NCELL): they reach NCELL), unrolled at compile time and branch-free so
// that the loop over lanes around it vectorises; strides past the row read its last entry,
// never <= slot.
template <int64_t STRIDE>
inline int64_t level1_entry(const int64_t* cum1, int64_t row, int64_t slot, int64_t i0) {
  if constexpr (STRIDE == 0) {
    return i0;
  } else {
    const int64_t t = std::min<int64_t>(i0 + STRIDE, NCELL + 1);
    return level1_entry<STRIDE / 2>(cum1, row, slot, cum1[row + t] <= slot ? t : i0);
  }
}

// The decoders' level-1 lookup (table_model.level1_start, uint8 [ROWS, 2^START_BITS]):
// START[row][b] is the entry holding slot b << (PT - START_BITS), the first of its bucket.
// A slot's entry is START[row][slot >> (PT - START_BITS)] plus the entries that start in
// its bucket at or below it (rows strictly increasing: see level1_start), so stepping
// forward while row[i + 1] <= slot reaches it; decode_stage_table takes one such step
// vectorised, and the rare lane still short of it (a bucket of a row's tail) finishes with
// level1_entry's bisection from there (exact from any i0 at or below the entry).
constexpr int64_t START_SHIFT = PT - START_BITS;
void check_start1(const torch::Tensor& start1) {
  TORCH_CHECK(start1.dtype() == torch::kUInt8 && start1.is_contiguous() && start1.dim() == 2 &&
                  start1.size(0) == ROWS && start1.size(1) == (int64_t(1) << START_BITS),
              "start1 must be table_model.level1_start: uint8 [ROWS, 2^START_BITS], contiguous");
}

void check_level1(const torch::Tensor& cum1) {
  check_int64(cum1, "cum1");
  TORCH_CHECK(cum1.dim() == 2 && cum1.size(0) == ROWS && cum1.size(1) == ROW,
              "cum1 must be table_model.level1_table: int64 [ROWS, ROW]");
}

// quantize_params + the model + encode, a stage at a time (rans_reference.encode_values'
// bytes; the chunked encoder): ValueEncoder(bits, ...) holds each page's storage patterns
// (int16 or uint8, contiguous [N], read in place, kept alive here) and every lane's state;
// encode(mu, sigma, first) codes symbols [first, first + n) of every page from each page's
// float32 mu and sigma as Rows (views of the stage's n values, any strides, read in place);
// finish() flushes and returns (words int32 [W] holding the u32 words, lane_words int64
// [P, NL]). With cum1 (table_model.level1_table; 16-bit dtypes) the table model, else the
// exact model.
//
// WARNING: rANS encodes in reverse (warning 1 of the reference): the calls must cover the
// page from its end back to its start, each ending where the previous one began (first +
// n == the previous first; the first call ends at N). So a multi-stage predictor's stages
// are coded last stage first, each predicted just before it is coded: only one stage's
// (mu, sigma) exists at a time.
class ValueEncoder {
 public:
  ValueEncoder(std::vector<torch::Tensor> bits_pages, int64_t num_lanes, torch::Tensor phi, int64_t w_wide,
               int64_t kappa, int64_t bits, int64_t man_bits, int64_t bias, bool fn_nan,
               c10::optional<torch::Tensor> cum1)
      : bits_pages_(std::move(bits_pages)), phi_(std::move(phi)), cum1_(std::move(cum1)), num_lanes_(num_lanes),
        model_{Dtype(bits, man_bits, bias, fn_nan), nullptr, w_wide, kappa} {
    check_int64(phi_, "phi");
    model_.phi = phi_.data_ptr<int64_t>();
    num_pages_ = int64_t(bits_pages_.size());
    TORCH_CHECK(num_pages_ >= 1 && num_lanes >= 1, "P >= 1 pages of bits; num_lanes >= 1");
    if (cum1_.has_value()) {
      check_level1(*cum1_);
      TORCH_CHECK(bits == 16 && !fn_nan, "the table model codes 16-bit dtypes only");
      cum1_p_ = cum1_->data_ptr<int64_t>();
    }
    n_ = bits_pages_[0].numel();
    for (const torch::Tensor& page : bits_pages_) {
      const Bits pattern(page);
      TORCH_CHECK(page.dim() == 1 && page.numel() == n_ && (page.dtype() == torch::kInt16) == (bits == 16),
                  "each page's bits: [N], int16 for 16-bit dtypes, else uint8");
      pages16_.push_back(reinterpret_cast<const uint16_t*>(pattern.p16));
      pages8_.push_back(pattern.p8);
    }
    const int64_t steps = (n_ + num_lanes - 1) / num_lanes;
    const int64_t lanes = num_pages_ * num_lanes;
    // Each lane's words in the order emitted (the reverse of decode order), in its own region
    // of one scratch buffer: at most one word per step (two steps per symbol in the table
    // model) plus the 2-word flush. Left uninitialised, so only the pages the words touch
    // become resident (~bits per symbol / 8 B per symbol), and released lane by lane as the
    // words are copied out. (Compacting the lanes to the buffer's front in place instead
    // touches the front regions' unused pages: more memory.)
    stride_ = (cum1_p_ ? 2 * steps : steps) + 2;
    scratch_.reset(new uint32_t[size_t(lanes * stride_)]);
    emitted_.assign(lanes, 0);
    x_.assign(lanes, RANS_L);
    end_ = n_;
  }

  void encode(const std::vector<torch::Tensor>& mu, const std::vector<torch::Tensor>& sigma, int64_t first) {
    TORCH_CHECK(int64_t(mu.size()) == num_pages_ && int64_t(sigma.size()) == num_pages_,
                "encode: P mu and P sigma rows");
    const int64_t count = mu[0].numel();
    TORCH_CHECK(count >= 1 && first >= 0 && first + count == end_,
                "encode: symbols [first, first + n) must end where the previous call began (the first call at N)");
    std::vector<Rows> mu_rows, sigma_rows;
    for (int64_t page = 0; page < num_pages_; ++page) {
      TORCH_CHECK(mu[page].numel() == count && sigma[page].numel() == count,
                  "encode: every page's mu and sigma rows hold the stage's n values");
      mu_rows.emplace_back(mu[page]);
      sigma_rows.emplace_back(sigma[page]);
    }
    if (pages16_[0] != nullptr) {
      encode_range(pages16_, mu_rows, sigma_rows, first, count);
    } else {
      encode_range(pages8_, mu_rows, sigma_rows, first, count);
    }
    end_ = first;
  }

  std::vector<torch::Tensor> finish() {
    TORCH_CHECK(end_ == 0 && !finished_, "finish: once, after encode has covered every symbol");
    finished_ = true;
    const int64_t lanes = num_pages_ * num_lanes_;
    uint32_t* const scratch = scratch_.get();
    for (int64_t g = 0; g < lanes; ++g) {  // flush: low word first in decode order
      uint32_t* out = &scratch[g * stride_ + emitted_[g]];
      out[0] = uint32_t(x_[g] >> WORD_BITS);
      out[1] = uint32_t(x_[g] & WORD_MASK);
      emitted_[g] += 2;
    }
    auto lane_words = torch::empty({num_pages_, num_lanes_}, torch::kInt64);
    int64_t* count_p = lane_words.data_ptr<int64_t>();
    int64_t total = 0;
    for (int64_t g = 0; g < lanes; ++g) total += (count_p[g] = emitted_[g]);
    auto words = torch::empty({total}, torch::kInt32);
    uint32_t* words_p = reinterpret_cast<uint32_t*>(words.data_ptr<int32_t>());
    for (int64_t g = 0; g < lanes; ++g) {
      const uint32_t* lane = &scratch[g * stride_];
      words_p = std::reverse_copy(lane, lane + emitted_[g], words_p);
      release_pages(lane, lane + emitted_[g]);  // copied out: the words and the scratch are not both held
    }
    scratch_.reset();
    return {words, lane_words};
  }

 private:
  std::vector<torch::Tensor> bits_pages_;
  torch::Tensor phi_;
  c10::optional<torch::Tensor> cum1_;
  const int64_t* cum1_p_ = nullptr;  // the table model's level-1 rows, or none: the exact model
  int64_t num_lanes_, num_pages_ = 0, n_ = 0, stride_ = 0, end_ = 0;
  bool finished_ = false;
  Model model_;
  std::vector<const uint16_t*> pages16_;  // the pages' patterns (one of the two is null)
  std::vector<const uint8_t*> pages8_;
  std::unique_ptr<uint32_t[]> scratch_;
  std::vector<int64_t> emitted_, x_;  // per lane of the batch: words in its region, its state

  // patterns: per page, uint16_t or uint8_t [N] (one instantiation per width, so the inner
  // loop has no branch on it)
  template <class Patterns>
  void encode_range(const Patterns& patterns, const std::vector<Rows>& mu_rows, const std::vector<Rows>& sigma_rows,
                    int64_t first, int64_t count) {
    const Model model = model_;
    const int64_t num_lanes = num_lanes_, num_pages = num_pages_, stride = stride_;
    const int64_t* cum1_p = cum1_p_;
    uint32_t* const scratch = scratch_.get();
    int64_t* const emitted = emitted_.data();
    int64_t* const x_p = x_.data();
    const int64_t blocks_per_page = (num_lanes + LANE_BLOCK - 1) / LANE_BLOCK;
    const int64_t sign_bit = model.dtype.top >> 1, ones = model.dtype.top - 1;
    const int64_t step_lo = first / num_lanes, step_hi = (first + count - 1) / num_lanes;
    at::parallel_for(0, num_pages * blocks_per_page, 1, [&](int64_t b0, int64_t b1) {
      // Locals, not loads through the closures, in the vectorised loops.
      const Model mdl = model;
      const auto* const* pat_pages = patterns.data();
      const int64_t* c1p = cum1_p;
      const int64_t sign = sign_bit, all_ones = ones;
      // block slot j holds lane l0 + j: its state, this step's (cum, freq) (the exact model's,
      // or the table model's level 1), and where its symbol's mu and sigma are; the table
      // model's level 2 (cum2, freq2), whether that is the exact model's step (after ESC, or
      // alone for a symbol that is not dense), and the key and parameters that step needs
      int64_t x[LANE_BLOCK], cum[LANE_BLOCK], freq[LANE_BLOCK], mu_off[LANE_BLOCK], sigma_off[LANE_BLOCK];
      int64_t cum2[LANE_BLOCK], freq2[LANE_BLOCK], exact[LANE_BLOCK], key[LANE_BLOCK], mu_qs[LANE_BLOCK],
          es[LANE_BLOCK], rs[LANE_BLOCK];
      // each step's scale bits and emitted words (-1: none); the slots taking the exact model's step
      int64_t shift[LANE_BLOCK], shift2[LANE_BLOCK], word[LANE_BLOCK], word2[LANE_BLOCK], list[LANE_BLOCK];
      std::fill(shift, shift + LANE_BLOCK, c1p ? PT : PROB_BITS);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t page = b / blocks_per_page;
        const int64_t l0 = (b % blocks_per_page) * LANE_BLOCK;
        const int64_t l1 = std::min(l0 + LANE_BLOCK, num_lanes);
        const int64_t g0 = page * num_lanes + l0;
        std::copy(x_p + g0, x_p + g0 + (l1 - l0), x);
        for (int64_t s = step_hi; s >= step_lo; --s) {  // in reverse (warning 1 of the reference)
          // slot j: symbol sym0 + j of the page, coded in this call for j in [j_lo, j_hi)
          const int64_t sym0 = l0 + s * num_lanes;
          const int64_t j_lo = std::max(sym0, first) - sym0, j_hi = std::min(l1 + s * num_lanes, first + count) - sym0;
          if (j_hi <= j_lo) continue;
          const int64_t m_j = j_hi - j_lo;
          const auto* pat = pat_pages[page] + sym0;
          mu_rows[page].offsets(sym0 + j_lo - first, m_j, mu_off + j_lo);  // the rows start at symbol first
          sigma_rows[page].offsets(sym0 + j_lo - first, m_j, sigma_off + j_lo);
          const float *mus = mu_rows[page].p, *sigmas = sigma_rows[page].p;
          if (!c1p) {
            // The model at every lane's symbol: independent across lanes, branch-free (vectorised).
#pragma omp simd
            for (int64_t j = j_lo; j < j_hi; ++j) {
              const int64_t u = pat[j];
              const int64_t k = (u & sign) ? u ^ all_ones : u | sign;  // keys_from_bits
              int64_t mu_q, e, r, c1;
              quantize(mus[mu_off[j]], sigmas[sigma_off[j]], mu_q, e, r);
              mdl.cdf_pair(k, 2 * mu_q, F - e, INVERSE(r), cum[j], c1);
              freq[j] = c1 - cum[j];
            }
            put_block(x + j_lo, cum + j_lo, freq + j_lo, shift + j_lo, m_j, word + j_lo);
            push_words(word + j_lo, m_j, scratch, stride, emitted, g0 + j_lo);
            continue;
          }
          // The table model (table_model.symbol_steps): level 1 codes the key's cell relative
          // to mu's, c = m - floor(mu / u), or ESC; level 2 the offset in a cell off zero (the
          // significand's low L2 bits: a step of scale PT, frequency 2^(PT - L2)), the key's
          // points in a zero cell (scale P2), or after ESC the exact model's step. A symbol
          // that is not dense is the exact model's step alone: its second step, the identity
          // (0, 2^PT), leaves the state as it is and emits nothing, so it takes level 1's slot
          // here (same bytes). Vectorised like the exact model above.
#pragma omp simd
          for (int64_t j = j_lo; j < j_hi; ++j) {
            const int64_t u = pat[j];
            const int64_t k = (u & sign) ? u ^ all_ones : u | sign;  // keys_from_bits
            int64_t mu_q, e, r;
            quantize(mus[mu_off[j]], sigmas[sigma_off[j]], mu_q, e, r);
            // cell_of: the magnitude in cells floor(|x| / u) (saturated: c is then far out),
            // sh = log2(ulp / u), the cell m (-1 - magnitude for negative patterns)
            const int64_t mp = u & (sign - 1);
            int64_t sig, ex;
            const bool finite = mdl.dtype.magnitude_fields(mp, sig, ex);
            const int64_t sh = ex - (e - TS);
            const int64_t mag_up = sig << std::clamp<int64_t>(sh, 0, MAG_SHIFT_MAX);
            const int64_t mag_down = sig >> std::clamp<int64_t>(-sh, 0, 63);
            const int64_t mag = sh >= 0 ? mag_up : mag_down;
            const int64_t c = ((u & sign) ? -1 - mag : mag) - (mu_q >> CELL_SHIFT);
            const bool zero = mag == 0;  // m in {0, -1}
            int64_t first, count;
            zero_points(mdl.dtype, mp, e, first, count);
            // escapes: inf and NaN, cells beyond +-TJ, zero-cell keys without a point, cells off
            // zero narrower than the key spacing (& and |, not a select of bools: that vectorises)
            const bool esc = !finite | (c < -TJ) | (c >= TJ) | (zero & (count <= 0)) | (!zero & (sh > 0));
            const bool table = dense(mdl.dtype, mu_q, e, r);
            const int64_t i1 = level1_row(mu_q, r) + (esc ? ESC : c + TJ);
            cum[j] = table ? c1p[i1] : 0;
            freq[j] = table ? c1p[i1 + 1] - c1p[i1] : int64_t(1) << PT;
            const int64_t l2 = std::clamp<int64_t>(-sh, 0, PT);  // the offset's bits (off zero, no escape)
            const int64_t off = sig - ((sig >> l2) << l2);  // sig's low l2 bits
            cum2[j] = zero ? first : off << (PT - l2);
            freq2[j] = zero ? count : pow2_int(PT - l2);
            exact[j] = esc | !table;  // the exact model's step at level 2
            shift2[j] = (esc | !table) ? PROB_BITS : (zero ? P2 : PT);
            key[j] = k, mu_qs[j] = mu_q, es[j] = e, rs[j] = r;
          }
          // The exact model's step, after ESC or alone: over all lanes when many take it (a
          // sharp predictor's pages; contiguous, the others' results discarded), else over a
          // list of them; vectorised either way.
          const auto exact_pair = [&](int64_t j) __attribute__((always_inline)) {
            int64_t c0, c1;
            mdl.cdf_pair(key[j], 2 * mu_qs[j], F - es[j], INVERSE(rs[j]), c0, c1);
            cum2[j] = exact[j] ? c0 : cum2[j];
            freq2[j] = exact[j] ? c1 - c0 : freq2[j];
          };
          int64_t m = 0;
          for (int64_t j = j_lo; j < j_hi; ++j) {
            list[m] = j;
            m += exact[j] != 0;
          }
          if (2 * m > m_j) {
#pragma omp simd
            for (int64_t j = j_lo; j < j_hi; ++j) exact_pair(j);
          } else {
#pragma omp simd
            for (int64_t t = 0; t < m; ++t) exact_pair(list[t]);
          }
          put_block(x + j_lo, cum2 + j_lo, freq2 + j_lo, shift2 + j_lo, m_j, word2 + j_lo);  // level 2, then
          put_block(x + j_lo, cum + j_lo, freq + j_lo, shift + j_lo, m_j, word + j_lo);  // level 1 (decode order reversed)
          push_words(word2 + j_lo, m_j, scratch, stride, emitted, g0 + j_lo);
          push_words(word + j_lo, m_j, scratch, stride, emitted, g0 + j_lo);
        }
        std::copy(x, x + (l1 - l0), x_p + g0);
      }
    });
  }
};

// One decoder stage of the table model (rans_reference.Decoder._table_symbol): symbols
// [first, first + n) of each of P pages from params (RowParams: float32 mu and sigma, as
// decode_stage takes them); emit(page, col0, j_lo, j_hi, key) takes a block's keys (as
// decode_stage's). Per step, (1) every lane's
// quantize_params and whether it is dense; (2) for the dense lanes the level-1 entry (a
// branch-free bisection of the row), rANS step, and for a cell its key and level-2 step
// (table_model.decode_level2: off zero a shift and a mask, at zero a truncation); (3) for
// the lanes that escaped or are not dense, the exact model's step (guess and check, as
// decode_stage); (4) emit. All vectorised but the exact model's misses. x, ptr: int64
// [P * NL] lane states and next-word indices, bad: uint8 [P * NL] lanes that decoded a cell
// holding no key (decode_level2's ok false: a corrupt stream; the step is then the identity
// (0, 2^PT) and the lane goes on), all updated in place.
template <class EmitFn>
void decode_stage_table(const Model& model, const int64_t* cum1, const uint8_t* start1, const double* q,
                        const uint32_t* words_p, int64_t num_words, int64_t* x_p, int64_t* ptr_p, uint8_t* bad_p,
                        const RowParams& params, int64_t num_pages, int64_t n, int64_t num_lanes, int64_t first,
                        EmitFn emit) {
  const int64_t last_word = num_words - 1;
  const int64_t step_begin = first / num_lanes, step_end = (first + n + num_lanes - 1) / num_lanes;
  const int64_t blocks_per_page = (num_lanes + LANE_BLOCK - 1) / LANE_BLOCK;

  at::parallel_for(0, num_pages * blocks_per_page, 1, [&](int64_t b0, int64_t b1) {
    // Locals, not loads through the closure, in the vectorised loops.
    const Model mdl = model;
    const Dtype dt = model.dtype;
    const int64_t sign_bit = dt.top >> 1, ones = dt.top - 1;
    EmitFn out = emit;  // the thread's own (PatternWriter keeps a cursor)
    const double* qt = q;
    const int64_t* c1p = cum1;
    const uint8_t* s1p = start1;
    const uint32_t* wp = words_p;
    RowParams prm = params;  // the thread's own (it keeps the block's parameters)
    // block slot j holds lane l0 + j: its state, next word and verdict, this step's key, whether
    // takes the exact model's step (ESC, or not dense), and the quantised parameters it needs
    int64_t x[LANE_BLOCK], ptr[LANE_BLOCK], bad[LANE_BLOCK], key[LANE_BLOCK], exact[LANE_BLOCK];
    int64_t mu_qs[LANE_BLOCK], es[LANE_BLOCK], rs[LANE_BLOCK];
    // level 1's entry, and whether the lookup's one step left it short (see check_start1)
    int64_t ent[LANE_BLOCK], short1[LANE_BLOCK];
    // the exact model's step: which slots take it, and C at their guess pair
    int64_t list[LANE_BLOCK], c_lo[LANE_BLOCK], c_hi[LANE_BLOCK];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t page = b / blocks_per_page;
      const int64_t l0 = (b % blocks_per_page) * LANE_BLOCK;
      const int64_t l1 = std::min(l0 + LANE_BLOCK, num_lanes);
      const int64_t g0 = page * num_lanes + l0;  // the block's first lane in the batch
      std::copy(x_p + g0, x_p + g0 + (l1 - l0), x);
      std::copy(ptr_p + g0, ptr_p + g0 + (l1 - l0), ptr);
      std::copy(bad_p + g0, bad_p + g0 + (l1 - l0), bad);
      for (int64_t step = step_begin; step < step_end; ++step) {
        // lane l holds stage symbol l + step * NL - first; idle outside [0, n) (ragged ends)
        const int64_t base = step * num_lanes - first;
        const int64_t j_lo = std::max(l0, -base) - l0, j_hi = std::min(l1, n - base) - l0;
        const int64_t col0 = base + l0;  // slot j: column col0 + j
        prm.step(page, col0, j_lo, j_hi);

        // Pass 1: the parameters, and whether the symbol takes the table (dense) or the exact
        // model's step alone (its second step, the identity, reads nothing).
#pragma omp simd
        for (int64_t j = j_lo; j < j_hi; ++j) {
          int64_t mu_q, e, r, inv;
          prm(j, mu_q, e, r, inv);
          mu_qs[j] = mu_q, es[j] = e, rs[j] = r;
          exact[j] = !dense(dt, mu_q, e, r);
        }
        // Pass 1b: level 1's entry of every lane (a lane that is not dense reads a valid row
        // and discards it): START's lookup and one step, vectorised; the lanes still short of
        // their entry bisect from there, one by one.
#pragma omp simd
        for (int64_t j = j_lo; j < j_hi; ++j) {
          const int64_t row_n = level1_row_number(mu_qs[j], rs[j]), row = row_n * ROW;
          const int64_t slot1 = x[j] & ((int64_t(1) << PT) - 1);
          int64_t i = s1p[(row_n << START_BITS) + (slot1 >> START_SHIFT)];
          i += c1p[row + i + 1] <= slot1;  // i <= NCELL: within the row
          ent[j] = i;
          short1[j] = c1p[row + i + 1] <= slot1;
        }
        for (int64_t j = j_lo; j < j_hi; ++j) {
          if (short1[j]) {
            ent[j] = level1_entry<int64_t(1) << floor_log2(NCELL)>(c1p, level1_row(mu_qs[j], rs[j]),
                                                                  x[j] & ((int64_t(1) << PT) - 1), ent[j]);
          }
        }
        // Pass 2: level 1, then a cell's level 2 (an escape's level 2 is discarded) of lane j;
        // a lane that is not dense keeps its state (a select).
        const auto table_lane = [&](int64_t j) __attribute__((always_inline)) {  // inlined: its loops vectorise
          const int64_t mu_q = mu_qs[j], e = es[j];
          // level 1: the entry i with row[i] <= slot1 < row[i + 1], then the step
          const int64_t row = level1_row(mu_q, rs[j]);
          const int64_t slot1 = x[j] & ((int64_t(1) << PT) - 1);
          const int64_t i = ent[j];
          const int64_t c1 = c1p[row + i], f1 = c1p[row + i + 1] - c1;
          int64_t x1 = f1 * (x[j] >> PT) + slot1 - c1;  // < 2^63 for any state: no wrap
          const bool refill1 = x1 < RANS_L;
          // (words read unconditionally, then selected: a conditional gather does not vectorise)
          const int64_t word1 = int64_t(wp[std::min(ptr[j], last_word)]);
          x1 = refill1 ? int64_t(uint64_t(x1) << WORD_BITS) | word1 : x1;
          const int64_t p1 = ptr[j] + refill1;
          // level 2 (table_model.decode_level2; garbage after ESC, replaced in pass 3): the
          // cell m and its magnitude in cells
          const bool esc = i == ESC;
          const int64_t m = i - TJ + (mu_q >> CELL_SHIFT);
          const bool neg = m < 0;
          const int64_t mag = neg ? -1 - m : m;
          const bool zero = mag == 0;
          // a zero cell: the point's magnitude by truncation, and that magnitude's points
          const int64_t slot_z = x1 & ((int64_t(1) << P2) - 1);
          const int64_t pat_z = dt.trunc_magnitude(slot_z, e);
          int64_t first, count;
          zero_points(dt, pat_z, e, first, count);
          // off zero: the cell's binade j2 = floor(log2 mag) + e - TS (exact: mag < 2^53), its
          // ulp 2^ex, and L2 = log2(u / ulp) raw bits of offset: the key's significand is
          // (mag << L2) | off. A cell narrower than the ulp or beyond the largest finite
          // binade holds no key: not ok (a corrupt stream), the identity step
          const double mag_f = double(std::max<int64_t>(mag, 1));
          uint64_t mag_bits;
          std::memcpy(&mag_bits, &mag_f, sizeof mag_bits);
          const int64_t j2 = int64_t(mag_bits >> 52) - 1023 + e - TS;
          const int64_t ex = std::max<int64_t>(j2 - dt.man_bits, 1 - dt.bias - dt.man_bits);
          const int64_t l2_raw = (e - TS) - ex;
          const bool ok = zero | ((l2_raw >= 0) & (j2 <= dt.exp_ones - 1 - dt.bias));
          const int64_t l2 = std::clamp<int64_t>(l2_raw, 0, PT);
          const int64_t slot_o = x1 & ((int64_t(1) << PT) - 1);
          const int64_t off = slot_o >> (PT - l2);
          const int64_t sig = (std::min<int64_t>(mag, int64_t(1) << 20) << l2) | off;
          const int64_t biased = sig >= (int64_t(1) << dt.man_bits) ? ex + dt.bias + dt.man_bits : 0;
          const int64_t pat_o = (std::clamp<int64_t>(biased, 0, dt.exp_ones) << dt.man_bits) | (sig & dt.man_mask);
          const int64_t pattern = (zero ? pat_z : pat_o) | (neg ? sign_bit : 0);
          // the level-2 step: (first, count) of scale P2 at zero, (off << (PT - L2), 2^(PT - L2))
          // of scale PT off zero, the identity (0, 2^PT) of scale PT where not ok
          const int64_t c2 = ok ? (zero ? first : off << (PT - l2)) : 0;
          const int64_t f2 = ok ? (zero ? count : pow2_int(PT - l2)) : int64_t(1) << PT;
          const bool at_p2 = ok & zero;
          const int64_t slot2 = at_p2 ? slot_z : slot_o;
          const int64_t xs = at_p2 ? x1 >> P2 : x1 >> PT;
          int64_t x2 = wrap_add(wrap_mul(f2, xs), slot2 - c2);  // < 2^63 on any stream, as the reference's
          const bool refill2 = x2 < RANS_L;
          const int64_t word2 = int64_t(wp[std::min(p1, last_word)]);
          x2 = refill2 ? int64_t(uint64_t(x2) << WORD_BITS) | word2 : x2;
          const bool table = exact[j] == 0;
          x[j] = table ? (esc ? x1 : x2) : x[j];
          ptr[j] = table ? (esc ? p1 : p1 + refill2) : ptr[j];
          bad[j] |= table & !(ok | esc);
          key[j] = neg ? pattern ^ ones : pattern | sign_bit;  // keys_from_bits
          exact[j] = esc | !table;
        };
        // Over all lanes when many are dense (contiguous loads and stores), else over a list
        // of the dense ones (a sharp predictor's pages: most symbols are not dense).
        int64_t m = 0;
        for (int64_t j = j_lo; j < j_hi; ++j) {
          list[m] = j;
          m += exact[j] == 0;
        }
        if (4 * m > j_hi - j_lo) {
#pragma omp simd
          for (int64_t j = j_lo; j < j_hi; ++j) table_lane(j);
        } else {
#pragma omp simd
          for (int64_t t = 0; t < m; ++t) table_lane(list[t]);
        }
        // Pass 3: the exact model's step, after ESC or alone (exact[j]): the guess and C pair,
        // vectorised as in decode_stage, over all lanes when many take it (a sharp predictor's
        // pages: contiguous loads and stores, the others' results discarded), else over a list
        // of them; the misses search one by one; then the rANS step, vectorised again.
        const auto exact_guess = [&](int64_t j) __attribute__((always_inline)) {
          const int64_t k = guess_key(dt, qt, x[j] & (M - 1), mu_qs[j], es[j], rs[j]);
          key[j] = exact[j] ? k : key[j];
          mdl.cdf_pair(k, 2 * mu_qs[j], F - es[j], INVERSE(rs[j]), c_lo[j], c_hi[j]);
        };
        const auto exact_step = [&](int64_t j) __attribute__((always_inline)) {
          const int64_t x_new = wrap_add(wrap_mul(c_hi[j] - c_lo[j], x[j] >> PROB_BITS), (x[j] & (M - 1)) - c_lo[j]);
          const int64_t word = int64_t(wp[std::min(ptr[j], last_word)]);
          const bool refill = x_new < RANS_L;
          const int64_t x_step = refill ? int64_t(uint64_t(x_new) << WORD_BITS) | word : x_new;
          const bool take = exact[j] != 0;
          x[j] = take ? x_step : x[j];
          ptr[j] += take & refill;
        };
        m = 0;
        for (int64_t j = j_lo; j < j_hi; ++j) {
          list[m] = j;
          m += exact[j] != 0;
        }
        const bool all_lanes = 2 * m > j_hi - j_lo;
        if (all_lanes) {
#pragma omp simd
          for (int64_t j = j_lo; j < j_hi; ++j) exact_guess(j);
        } else {
#pragma omp simd
          for (int64_t t = 0; t < m; ++t) exact_guess(list[t]);
        }
        for (int64_t t = 0; t < m; ++t) {
          const int64_t j = list[t], slot = x[j] & (M - 1);
          if (c_lo[j] > slot || c_hi[j] <= slot) {
            search_key(mdl, 2 * mu_qs[j], F - es[j], INVERSE(rs[j]), slot, key[j], c_lo[j], c_hi[j]);
          }
        }
        if (all_lanes) {
#pragma omp simd
          for (int64_t j = j_lo; j < j_hi; ++j) exact_step(j);
        } else {
#pragma omp simd
          for (int64_t t = 0; t < m; ++t) exact_step(list[t]);
        }
        // Pass 4: emit.
        out(page, col0, j_lo, j_hi, key);
      }
      std::copy(x, x + (l1 - l0), x_p + g0);
      std::copy(ptr, ptr + (l1 - l0), ptr_p + g0);
      for (int64_t j = 0; j < l1 - l0; ++j) bad_p[g0 + j] = uint8_t(bad[j] != 0);
    }
  });
}

// Key k's storage pattern as T (int16_t or uint8_t): bits_from_keys
template <class T>
inline T pattern(int64_t k, int64_t sign_bit, int64_t ones) {
  return T(std::make_unsigned_t<T>((k & sign_bit) ? k ^ sign_bit : k ^ ones));
}

// decode_values' emit: a block's keys key[j], j in [j_lo, j_hi), as storage patterns (int16
// for 16-bit dtypes (wide), else uint8) into elements first + col0 + j (flat C order) of
// page `page`, laid out as its Layout. A contiguous page takes them in a row; any other, row
// by row of its last dim, the current row kept in a cursor: a block's symbols only move
// forward from step to step, so the row is found by division once per block and then
// stepped. Each thread decodes with its own copy (decode_stage's `out`): its own cursor.
struct PatternWriter {
  void* const* pages;
  const Layout* layouts;
  int64_t first, sign_bit, ones;
  bool wide;
  int64_t page_at = -1;  // the cursor: page page_at's row `row`
  Layout::Row row;

  inline void operator()(int64_t page, int64_t col0, int64_t j_lo, int64_t j_hi, const int64_t* key) {
    if (wide) {
      put(static_cast<int16_t*>(pages[page]), page, first + col0, j_lo, j_hi, key);
    } else {
      put(static_cast<uint8_t*>(pages[page]), page, first + col0, j_lo, j_hi, key);
    }
  }

  template <class T>
  inline void put(T* p, int64_t page, int64_t i0, int64_t j_lo, int64_t j_hi, const int64_t* key) {
    const Layout& layout = layouts[page];
    const int64_t sign = sign_bit, all = ones;
    if (j_lo >= j_hi) return;
    if (layout.flat()) {
#pragma omp simd
      for (int64_t j = j_lo; j < j_hi; ++j) p[i0 + j] = pattern<T>(key[j], sign, all);
      return;
    }
    const int64_t width = layout.size[layout.dims - 1], step = layout.stride[layout.dims - 1];
    if (page != page_at || i0 + j_lo < row.begin) {  // a new block
      row = layout.row_of(i0 + j_lo), page_at = page;
    }
    for (int64_t j = j_lo; j < j_hi;) {
      while (i0 + j >= row.begin + width) layout.next(row);
      const int64_t j_end = std::min(j_hi, row.begin + width - i0);  // this row's slots
      T* const dst = p + row.off + (i0 - row.begin) * step;  // slot j's element: dst[j * step]
      if (step == 1) {  // (the usual case: SGLang's layouts keep head_dim contiguous)
#pragma omp simd
        for (int64_t t = j; t < j_end; ++t) dst[t] = pattern<T>(key[t], sign, all);
      } else {
#pragma omp simd
        for (int64_t t = j; t < j_end; ++t) dst[t * step] = pattern<T>(key[t], sign, all);
      }
      j = j_end;
    }
  }
};

// One decoder stage, symbols first .. first + n of P pages, from each page's float32 mu and
// sigma as Rows (views of the stage's n values, any strides: predict_rows' rows, read in
// place as the encoder reads them): the keys go straight back to storage patterns in
// out_bits, P pages of N elements each (int16 for 16-bit dtypes, uint8 for 8-bit
// ones; views of up to Layout::MAX_DIMS dims with any strides, e.g. the caller's pages in
// SGLang's host buffer; elements first .. first + n of each page's flat C order). The pages must not
// overlap (themselves or each other): threads write them concurrently.
// words: int32 [W >= 1] holding u32 words; x, ptr as in decode.
void decode_values(const torch::Tensor& words, torch::Tensor x_t, torch::Tensor ptr_t, const std::vector<torch::Tensor>& mu,
                   const std::vector<torch::Tensor>& sigma, int64_t num_lanes, int64_t first,
                   const std::vector<torch::Tensor>& out_bits,
                   const torch::Tensor& phi,
                   const torch::Tensor& quantiles, int64_t w_wide, int64_t kappa, int64_t bits, int64_t man_bits,
                   int64_t bias, bool fn_nan, const c10::optional<torch::Tensor>& cum1,
                   const c10::optional<torch::Tensor>& start1, c10::optional<torch::Tensor> bad) {
  TORCH_CHECK(words.dtype() == torch::kInt32 && words.is_contiguous() && words.numel() >= 1, "words: int32 [W >= 1]");
  for (const torch::Tensor* t : std::initializer_list<const torch::Tensor*>{&x_t, &ptr_t, &phi}) {
    check_int64(*t, "decode argument");
  }
  check_quantiles(quantiles);
  const int64_t num_pages = int64_t(out_bits.size());
  TORCH_CHECK(num_pages >= 1 && int64_t(mu.size()) == num_pages && int64_t(sigma.size()) == num_pages,
              "decode_values: P mu rows, P sigma rows and P out_bits pages");
  const int64_t n = mu[0].numel(), total = out_bits[0].numel();
  std::vector<Rows> mu_rows, sigma_rows;
  for (int64_t p = 0; p < num_pages; ++p) {
    TORCH_CHECK(mu[p].numel() == n && sigma[p].numel() == n, "decode_values: every page's mu and sigma hold n values");
    mu_rows.emplace_back(mu[p]);
    sigma_rows.emplace_back(sigma[p]);
  }
  const RowParams params{mu_rows.data(), sigma_rows.data()};
  const bool wide = out_bits[0].dtype() == torch::kInt16;
  std::vector<void*> pages(num_pages);  // page p's patterns: int16_t or uint8_t, laid out as layouts[p]
  std::vector<Layout> layouts;
  for (int64_t p = 0; p < num_pages; ++p) {
    const torch::Tensor& page = out_bits[p];
    TORCH_CHECK(page.device().is_cpu() && (page.dtype() == torch::kInt16 || page.dtype() == torch::kUInt8) &&
                    page.dtype() == out_bits[0].dtype() && page.numel() == total,
                "decode_values: out_bits pages must all be int16 or uint8 CPU tensors of one dtype and N elements");
    TORCH_CHECK(at::has_internal_overlap(page) != at::MemOverlap::Yes,
                "decode_values: an out_bits page overlaps itself (a broadcast view?)");
    pages[p] = page.data_ptr();
    layouts.emplace_back(page);
  }
  TORCH_CHECK(first >= 0 && first + n <= total, "decode_values: shapes do not fit");
  TORCH_CHECK(wide == (bits == 16), "decode_values: out_bits must be int16 for 16-bit dtypes, uint8 for 8-bit ones");
  const Model model{Dtype(bits, man_bits, bias, fn_nan), phi.data_ptr<int64_t>(), w_wide, kappa};
  const int64_t sign_bit = model.dtype.top >> 1, ones = model.dtype.top - 1;
  const PatternWriter emit{pages.data(), layouts.data(), first, sign_bit, ones, wide};
  const uint32_t* words_p = reinterpret_cast<const uint32_t*>(words.data_ptr<int32_t>());
  if (cum1.has_value()) {  // the table model
    check_level1(*cum1);
    TORCH_CHECK(start1.has_value(), "the table model's decoder needs start1 (table_model.level1_start)");
    check_start1(*start1);
    TORCH_CHECK(bits == 16 && !fn_nan, "the table model codes 16-bit dtypes only");
    TORCH_CHECK(bad.has_value() && bad->dtype() == torch::kUInt8 && bad->is_contiguous() && bad->numel() == x_t.numel(),
                "the table model's decoder needs bad: uint8 [P * NL], contiguous");
    decode_stage_table(model, cum1->data_ptr<int64_t>(), start1->data_ptr<uint8_t>(), quantiles.data_ptr<double>(),
                       words_p, words.numel(),
                       x_t.data_ptr<int64_t>(), ptr_t.data_ptr<int64_t>(), bad->data_ptr<uint8_t>(), params,
                       num_pages, n, num_lanes, first, emit);
    return;
  }
  decode_stage(
      model, quantiles.data_ptr<double>(), words_p, words.numel(), x_t.data_ptr<int64_t>(), ptr_t.data_ptr<int64_t>(),
      num_pages, n, num_lanes, first, params, emit);
}

// kernels/page_hash.py's page hash of a page's bytes (uint8 [n], contiguous): the sum mod
// 2^64 of fmix(w_j ^ k_j) over its little-endian u64 words w_j (the last one zero-padded),
// k_j = seed + (j + 1) * gamma. The constants come from page_hash.py as arguments (int64 bit
// patterns). Chunks of words are summed in parallel and their partial sums added: the sum
// is order-independent, so the result does not depend on the number of threads.
int64_t page_hash(const torch::Tensor& bytes, int64_t seed, int64_t gamma, int64_t mix1, int64_t mix2) {
  static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "page_hash reads words little-endian");
  TORCH_CHECK(bytes.dtype() == torch::kUInt8 && bytes.dim() == 1 && bytes.is_contiguous(), "bytes: uint8 [n], contiguous");
  const uint8_t* p = bytes.data_ptr<uint8_t>();
  const int64_t n = bytes.numel(), full_words = n / 8;
  const uint64_t g = uint64_t(gamma), m1 = uint64_t(mix1), m2 = uint64_t(mix2);
  const auto term = [m1, m2](uint64_t z) {  // fmix: splitmix64's finaliser
    z = (z ^ (z >> 30)) * m1;
    z = (z ^ (z >> 27)) * m2;
    return z ^ (z >> 31);
  };
  constexpr int64_t CHUNK_WORDS = 1 << 14;  // 128 KiB of page per task
  std::vector<uint64_t> partial((full_words + CHUNK_WORDS - 1) / CHUNK_WORDS, 0);
  at::parallel_for(0, int64_t(partial.size()), 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t j0 = c * CHUNK_WORDS, j1 = std::min(full_words, j0 + CHUNK_WORDS);
      uint64_t k = uint64_t(seed) + uint64_t(j0 + 1) * g, sum = 0;  // k_j, j = j0
      for (int64_t j = j0; j < j1; ++j, k += g) {
        uint64_t w;
        std::memcpy(&w, p + 8 * j, 8);
        sum += term(w ^ k);
      }
      partial[c] = sum;
    }
  });
  uint64_t total = 0;
  for (const uint64_t s : partial) total += s;
  if (n % 8) {  // the last word, zero-padded
    uint64_t w = 0;
    std::memcpy(&w, p + 8 * full_words, n % 8);
    total += term(w ^ (uint64_t(seed) + uint64_t(full_words + 1) * g));
  }
  return int64_t(total);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("encode", &encode, "rans_reference.encode on the CPU");
  m.def("cdf", &cdf, "entropy_model.cdf on the CPU");
  m.def("decode", &decode, "one stage of rans_reference.Decoder.decode on the CPU");
  py::class_<ValueEncoder>(m, "ValueEncoder", "quantize_params + the model + encode, a stage at a time (last first)")
      .def(py::init<std::vector<torch::Tensor>, int64_t, torch::Tensor, int64_t, int64_t, int64_t, int64_t, int64_t, bool,
                    c10::optional<torch::Tensor>>())
      .def("encode", &ValueEncoder::encode, "symbols [first, first + n) of every page, ending where the last call began")
      .def("finish", &ValueEncoder::finish, "flush every lane: (words, lane_words)");
  m.def("decode_values", &decode_values, "one decoder stage from float32 (mu, sigma) into storage bits");
  m.def("page_hash", &page_hash, "kernels/page_hash.py's page hash of a page's bytes (int64 bits of the u64)");
}
