// Interleaved rANS64 on the CPU: the C++ twin of kernels/rans_reference.py (same bytes,
// same keys, same verdicts). Built on first use by kernels/rans_cpu.py with
// torch.utils.cpp_extension.load; every constant of the coder arrives as a -D macro
// generated from entropy_model.py / rans_reference.py (SPECKV_*), and every table (PHI, the
// per-key fields, the quantiles) as a tensor argument, so nothing here repeats a number.
//
// Lanes are independent coders, so each function loops over lanes (in parallel with
// at::parallel_for: a lane's result does not depend on which thread ran it) and, within a
// lane, over its steps. Lane g is lane g % NL of page g / NL; its step j is symbol
// g % NL + j * NL of that page (DESIGN.md "Lanes").
//
// Arithmetic follows the reference operation for operation in int64. Products and sums that
// the reference lets wrap on corrupt input (never on valid input: see the bounds in
// rans_reference.py's docstring) go through uint64 so that they wrap here too instead of
// being undefined behaviour; >> of a negative int64 is arithmetic (gcc), as in torch.

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>

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

inline int64_t wrap_add(int64_t a, int64_t b) { return int64_t(uint64_t(a) + uint64_t(b)); }
inline int64_t wrap_mul(int64_t a, int64_t b) { return int64_t(uint64_t(a) * uint64_t(b)); }

// entropy_model.cdf for one symbol: the per-key field tables, the PHI table and the
// symbol's invariants (entropy_model.prepare: 2 mu_q, F - e, 2^32 // r).
struct Model {
  const int64_t* sig;  // [2^B] entropy_model.key_fields
  const int64_t* ex;
  const int64_t* sgn;
  const int64_t* phi;  // [PHI_KNOTS + 1]
  int64_t top;         // 2^B
  int64_t w_wide, kappa;

  // entropy_model._units at key k: sgn * min(trunc(sig * 2^(ex + off)), X_MAX)
  inline int64_t units(int64_t k, int64_t off) const {
    const int64_t shift = ex[k] + off;
    const int64_t up = std::clamp<int64_t>(shift, 0, X_SHIFT_MAX);
    const int64_t down = std::clamp<int64_t>(-shift, 0, 63);
    return sgn[k] * std::min<int64_t>((sig[k] << up) >> down, X_MAX);
  }

  // entropy_model.phi: 2^24 * Phi(t / 2^T_BITS), linear between knots
  inline int64_t phi_at(int64_t t) const {
    const int64_t u = std::clamp<int64_t>(t, -T_MAX, T_MAX) + T_MAX;
    const int64_t i = u >> INTERP_BITS;
    const int64_t f = u & ((int64_t(1) << INTERP_BITS) - 1);
    const int64_t lo = phi[i];
    return lo + (((phi[i + 1] - lo) * f) >> INTERP_BITS);
  }

  // entropy_model.cdf_prepared: C(k) for k in [0, 2^B]
  inline int64_t cdf(int64_t k, int64_t two_mu_q, int64_t off, int64_t inv) const {
    if (k <= 0) return 0;
    if (k >= top) return M;
    const int64_t boundary = units(k - 1, off) + units(k, off);
    const int64_t diff = std::clamp<int64_t>(boundary - two_mu_q, -DIFF_MAX, DIFF_MAX);
    const int64_t t = (diff * inv) >> T_SHIFT;
    const int64_t g = (W_TOTAL - w_wide) * phi_at(t) + w_wide * phi_at(t >> kappa);
    return k + ((g * (M - top)) >> 32);
  }
};

// The symbol's dtype, to turn a float64 value into a nearby key (the decoder's guess; any
// error there only costs time, never changes a result).
struct Minifloat {
  int64_t bits, man_bits, bias;
  bool fn_nan;

  int64_t nearest_key(double v) const {
    if (std::isnan(v)) v = 0.0;
    const int64_t exp_ones = (int64_t(1) << (bits - 1 - man_bits)) - 1;
    // the largest finite pattern: S.1111.110 for e4m3fn, S.1110.111... for IEEE-like
    const int64_t max_pattern = fn_nan ? (exp_ones << man_bits) + (int64_t(1) << man_bits) - 2
                                       : (exp_ones << man_bits) - 1;
    const bool negative = std::signbit(v);
    const double a = std::fabs(v);
    int64_t pattern = 0;
    if (a > 0.0) {
      int e2;
      const double m = std::frexp(a, &e2);  // a = m * 2^e2, m in [0.5, 1)
      const int64_t biased = int64_t(e2) - 1 + bias;
      if (biased >= 1) {  // normal: the mantissa's rounding may carry into the exponent
        const int64_t mant = std::llround((2.0 * m - 1.0) * double(int64_t(1) << man_bits));
        pattern = biased >= exp_ones + 1 ? max_pattern : (biased << man_bits) + mant;
      } else {  // subnormal: units of 2^(1 - bias - man_bits)
        pattern = std::llround(std::ldexp(a, int(man_bits + bias - 1)));
      }
      pattern = std::min(pattern, max_pattern);
    }
    const int64_t sign = int64_t(1) << (bits - 1);
    // entropy_model.keys_from_bits
    return negative ? (pattern | sign) ^ ((int64_t(1) << bits) - 1) : pattern | sign;
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

// entropy_model.cdf for keys in [0, 2^B] with quantised parameters, all int64 of one shape.
torch::Tensor cdf(const torch::Tensor& keys, const torch::Tensor& mu_q, const torch::Tensor& e,
                  const torch::Tensor& r, const torch::Tensor& sig, const torch::Tensor& ex,
                  const torch::Tensor& sgn, const torch::Tensor& phi, int64_t w_wide, int64_t kappa) {
  for (const auto* t : {&keys, &mu_q, &e, &r, &sig, &ex, &sgn, &phi}) check_int64(*t, "cdf argument");
  const Model model{sig.data_ptr<int64_t>(), ex.data_ptr<int64_t>(), sgn.data_ptr<int64_t>(),
                    phi.data_ptr<int64_t>(), sig.size(0), w_wide, kappa};
  const int64_t* k_p = keys.data_ptr<int64_t>();
  const int64_t* mu_p = mu_q.data_ptr<int64_t>();
  const int64_t* e_p = e.data_ptr<int64_t>();
  const int64_t* r_p = r.data_ptr<int64_t>();
  const int64_t count = keys.numel();
  for (int64_t i = 0; i < count; ++i) {
    if (r_p[i] < 1) throw std::invalid_argument("r must be >= 1 (from quantize_params)");
  }
  auto out = torch::empty_like(keys);
  int64_t* out_p = out.data_ptr<int64_t>();
  at::parallel_for(0, count, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      out_p[i] = model.cdf(k_p[i], 2 * mu_p[i], F - e_p[i], (int64_t(1) << 32) / r_p[i]);
    }
  });
  return out;
}

// One stage of rans_reference.Decoder.decode: symbols [first, first + n) of every page.
// mu_q, e, r: int64 [P, n]; x, ptr: int64 [P * NL] lane states and next-word indices,
// updated in place; words: int64 [W >= 1]. Returns keys int64 [P, n].
torch::Tensor decode(const torch::Tensor& words, torch::Tensor x_t, torch::Tensor ptr_t, const torch::Tensor& mu_q,
                     const torch::Tensor& e, const torch::Tensor& r, int64_t num_lanes, int64_t first,
                     const torch::Tensor& sig, const torch::Tensor& ex, const torch::Tensor& sgn,
                     const torch::Tensor& phi, const torch::Tensor& quantiles, int64_t w_wide, int64_t kappa,
                     int64_t bits, int64_t man_bits, int64_t bias, bool fn_nan) {
  for (const torch::Tensor* t : std::initializer_list<const torch::Tensor*>{
           &words, &x_t, &ptr_t, &mu_q, &e, &r, &sig, &ex, &sgn, &phi}) {
    check_int64(*t, "decode argument");
  }
  TORCH_CHECK(quantiles.dtype() == torch::kFloat64 && quantiles.is_contiguous(), "quantiles must be float64");
  const Model model{sig.data_ptr<int64_t>(), ex.data_ptr<int64_t>(), sgn.data_ptr<int64_t>(),
                    phi.data_ptr<int64_t>(), int64_t(1) << bits, w_wide, kappa};
  const Minifloat minifloat{bits, man_bits, bias, fn_nan};
  const int64_t num_pages = mu_q.size(0), n = mu_q.size(1);
  const int64_t* mu_p = mu_q.data_ptr<int64_t>();
  const int64_t* e_p = e.data_ptr<int64_t>();
  const int64_t* r_p = r.data_ptr<int64_t>();
  for (int64_t i = 0; i < num_pages * n; ++i) {
    if (r_p[i] < 1) throw std::invalid_argument("r must be >= 1 (from quantize_params)");
  }
  const int64_t* words_p = words.data_ptr<int64_t>();
  const int64_t last_word = words.numel() - 1;
  const double* q = quantiles.data_ptr<double>();
  const int64_t floor_free = M - model.top;  // counts the Gaussian mixture is spread over
  const int64_t num_cells = int64_t(1) << QUANTILE_BITS;
  const double cell_scale = double(num_cells) / double(floor_free);
  int64_t* x_p = x_t.data_ptr<int64_t>();
  int64_t* ptr_p = ptr_t.data_ptr<int64_t>();
  auto keys = torch::empty_like(mu_q);
  int64_t* keys_p = keys.data_ptr<int64_t>();
  const int64_t step_begin = first / num_lanes, step_end = (first + n + num_lanes - 1) / num_lanes;

  at::parallel_for(0, num_pages * num_lanes, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t page = g / num_lanes, lane = g % num_lanes;
      int64_t x = x_p[g], ptr = ptr_p[g];
      for (int64_t step = step_begin; step < step_end; ++step) {
        const int64_t sym = lane + step * num_lanes - first;  // within the stage
        if (sym < 0 || sym >= n) continue;                    // idle at a ragged stage end
        const int64_t i = page * n + sym;
        const int64_t two_mu_q = 2 * mu_p[i], off = F - e_p[i], inv = (int64_t(1) << 32) / r_p[i];
        const int64_t slot = x & (M - 1);

        // Guess the key as the reference does (G^-1 through the quantile table, twice), in
        // float64: only the speed depends on it.
        const double mu_f = std::ldexp(double(mu_p[i]), int(e_p[i] - F));
        const double sig_f = std::ldexp(double(r_p[i]), int(e_p[i] - R - T_BITS));
        int64_t guess = minifloat.nearest_key(mu_f);
        for (int pass = 0; pass < 2; ++pass) {
          const double u = double(std::clamp<int64_t>(slot - guess, 0, floor_free)) * cell_scale;
          const int64_t cell = std::min<int64_t>(int64_t(u), num_cells - 1);
          const double t = q[cell] + (q[cell + 1] - q[cell]) * (u - double(cell));
          guess = minifloat.nearest_key(mu_f + sig_f * t);
        }
        guess = std::clamp<int64_t>(guess, 0, model.top - 1);

        // Exact search: gallop from the guess to a bracket C(lo) <= slot < C(hi), then
        // bisect to hi = lo + 1. C is strictly increasing with C(0) = 0 <= slot < M =
        // C(2^B), so the key is the unique lo, whatever the guess was.
        int64_t lo, hi, c_lo, c_hi;
        const int64_t c_guess = model.cdf(guess, two_mu_q, off, inv);
        if (c_guess <= slot) {
          lo = guess, c_lo = c_guess;
          for (int64_t stride = 1;; stride <<= 1) {
            const int64_t h = std::min(lo + stride, model.top);
            const int64_t c = model.cdf(h, two_mu_q, off, inv);
            if (c > slot) { hi = h, c_hi = c; break; }
            lo = h, c_lo = c;
          }
        } else {
          hi = guess, c_hi = c_guess;
          for (int64_t stride = 1;; stride <<= 1) {
            const int64_t h = std::max<int64_t>(hi - stride, 0);
            const int64_t c = model.cdf(h, two_mu_q, off, inv);
            if (c <= slot) { lo = h, c_lo = c; break; }
            hi = h, c_hi = c;
          }
        }
        while (hi - lo > 1) {
          const int64_t mid = lo + (hi - lo) / 2;
          const int64_t c = model.cdf(mid, two_mu_q, off, inv);
          if (c <= slot) lo = mid, c_lo = c;
          else hi = mid, c_hi = c;
        }
        keys_p[i] = lo;

        // x' = freq * (x >> PROB_BITS) + slot - C(k); one word in if it fell below L. A read
        // past the lane's words reads words[min(ptr, W - 1)] like the reference; finish()
        // rejects the page.
        int64_t x_new = wrap_add(wrap_mul(c_hi - c_lo, x >> PROB_BITS), slot - c_lo);
        if (x_new < RANS_L) {
          x_new = int64_t(uint64_t(x_new) << WORD_BITS) | words_p[std::min(ptr, last_word)];
          ++ptr;
        }
        x = x_new;
      }
      x_p[g] = x;
      ptr_p[g] = ptr;
    }
  });
  return keys;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("encode", &encode, "rans_reference.encode on the CPU");
  m.def("cdf", &cdf, "entropy_model.cdf on the CPU");
  m.def("decode", &decode, "one stage of rans_reference.Decoder.decode on the CPU");
}
