"""The Triton rANS coder (kernels/rans_triton.py) against the torch reference, bit for bit.

Without a CUDA GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set below
before the kernel module is imported: @triton.jit reads it when it decorates). The
interpreter is slow (~5 ms per vector operation), so pages here are small and lanes many:
what is exercised is the kernels' arithmetic and indexing, which the interpreter executes
with the GPU's integer semantics (truncating //, arithmetic >>, fixed widths). On a CUDA machine
the same tests run the compiled kernels, and test_gpu_large_pages adds big pages.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the import below (see the module docstring)

import pytest  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from sglang_speckv.kernels import entropy_model as em  # noqa: E402
from sglang_speckv.kernels import rans_cpu as rc  # noqa: E402
from sglang_speckv.kernels import rans_reference as ref  # noqa: E402
from sglang_speckv.kernels import rans_triton as rt  # noqa: E402
from sglang_speckv.kernels import table_model as tm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not isinstance(rt._cdf_kernel, InterpretedFunction):
    rt = importlib.reload(rt)  # another test imported it before TRITON_INTERPRET was set

DTYPES = ("fp8_e4m3", "fp8_e5m2", "bf16", "fp16")

# float32 (mu, sigma) a predictor might return by mistake: NaN, infinities, zero and negative
# sigma, float32 subnormals and extremes. quantize_params must map all of them to usable ints.
GARBAGE_MU = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-45, -3e38, 3e38, 65504.0, -448.0]
GARBAGE_SIGMA = [float("nan"), float("inf"), -float("inf"), 0.0, -1.0, 1e-45, 3e38, 1e-30, 1e30, 0.37]

# Raw patterns that must round-trip: NaN payloads, +-inf, +-0, subnormals, extremes.
SPECIAL_BITS = {
    "fp8_e4m3": [0x7F, 0xFF, 0x7E, 0xFE, 0x00, 0x80, 0x01, 0x81, 0x07, 0x87],
    "fp8_e5m2": [0x7C, 0xFC, 0x7D, 0x7F, 0xFE, 0x00, 0x80, 0x01, 0x83, 0x7B],
    "bf16": [0x7F80, 0xFF80, 0x7FC0, 0x7F81, 0xFFFF, 0x0000, 0x8000, 0x0001, 0x807F, 0x7F7F],
    "fp16": [0x7C00, 0xFC00, 0x7E00, 0x7C01, 0xFFFF, 0x0000, 0x8000, 0x0001, 0x83FF, 0x7BFF],
}


def draw_pages(dtype: str, num_pages: int, n: int, seed: int):
    """float32 (mu, sigma) and int64 storage patterns [P, n]: two thirds of the patterns
    drawn around (mu, sigma) as a predictor would see them, the rest random bits."""
    gen = torch.Generator().manual_seed(seed)
    scale = 16.0 if dtype.startswith("fp8") else 1.0
    mu = torch.randn(num_pages, n, generator=gen) * scale
    sigma = (torch.rand(num_pages, n, generator=gen) + 0.05) * scale
    values = (mu + sigma * torch.randn(num_pages, n, generator=gen)).to(em.TORCH_DTYPES[dtype])
    bits = em.storage_bits(values)
    raw = torch.randint(0, 1 << em.symbol_bits(dtype), (num_pages, n), generator=gen)
    return mu, sigma, torch.where(torch.rand(num_pages, n, generator=gen) < 1 / 3, raw, bits)


def make_pages(dtype: str, num_pages: int, n: int, seed: int):
    """keys and quantised params, [P, n] int64 on DEVICE: two thirds of the symbols drawn
    around (mu, sigma) as a predictor would see them, the rest raw random bit patterns; the
    special patterns and the garbage (mu, sigma) at the front of every page."""
    mu, sigma, bits = draw_pages(dtype, num_pages, n, seed)
    for t, start, special in ((bits, 0, SPECIAL_BITS[dtype]), (mu, 0, GARBAGE_MU), (sigma, 3, GARBAGE_SIGMA)):
        m = max(0, min(len(special), n - start))  # what fits in a short page
        t[:, start : start + m] = torch.tensor(special[:m], dtype=t.dtype)
    mu_q, e, r = em.quantize_params(mu, sigma)
    keys = em.keys_from_bits(bits, dtype)
    return tuple(t.contiguous().to(DEVICE) for t in (keys, mu_q, e, r))


def cum_freq_reference(keys, mu_q, e, r, dtype, w_wide=em.W_WIDE, kappa=em.KAPPA):
    cum = em.cdf(keys, mu_q, e, r, dtype, w_wide, kappa)
    return cum, em.cdf(keys + 1, mu_q, e, r, dtype, w_wide, kappa) - cum


def decode_staged(decoder, mu_q, e, r, cuts):
    """Decode with stage boundaries ``cuts`` (flat symbol indices) and return all keys."""
    bounds = [0, *cuts, mu_q.shape[-1]]
    parts = [decoder.decode(mu_q[..., a:b], e[..., a:b], r[..., a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    return torch.cat(parts, dim=-1)


def decode_counting_probes(decoder, mu_q, e, r, cuts):
    """decode_staged for the Triton decoder, also returning each symbol's probes beyond the
    guess's pair: int32 [2, P, N] (gallop, bisection)."""
    bounds = [0, *cuts, mu_q.shape[-1]]
    keys, probes = [], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        probes.append(torch.full((2, mu_q.shape[0], b - a), -1, dtype=torch.int32, device=mu_q.device))
        keys.append(decoder.decode(mu_q[:, a:b], e[:, a:b], r[:, a:b], probes=probes[-1]))
    return torch.cat(keys, dim=-1), torch.cat(probes, dim=-1)


def check_cpp_coder(keys, mu_q, e, r, dtype, num_lanes, words, lane_words, w_wide=em.W_WIDE, kappa=em.KAPPA):
    """The C++ coder (kernels/rans_cpu.cpp) writes the same words and decodes them to the keys."""
    assert rc.available(), "the C++ coder did not build (gcc and ninja are test requirements)"
    keys, mu_q, e, r = (t.cpu() for t in (keys, mu_q, e, r))
    cum = rc.cdf(keys, mu_q, e, r, dtype, w_wide, kappa)
    words_cpp, lanes_cpp = rc.encode(cum, rc.cdf(keys + 1, mu_q, e, r, dtype, w_wide, kappa) - cum, num_lanes)
    assert torch.equal(words_cpp, words.cpu()) and torch.equal(lanes_cpp, lane_words.cpu())
    dec = rc.Decoder(words_cpp, lanes_cpp, keys.shape[1], dtype, w_wide, kappa)
    assert torch.equal(dec.decode(mu_q, e, r), keys) and dec.finish().all()


def check_probes(probes, must_bisect_far=True):
    """The decode's search paths: guesses that hit (no probe), near misses that gallop, and
    far ones that gallop GALLOP_ROUNDS times and then bisect (the tails, garbage mu)."""
    gallop, bisect = probes[0], probes[1]
    assert (gallop >= 0).all() and (gallop <= rt.GALLOP_ROUNDS).all()
    assert ((gallop == 0) & (bisect == 0)).any(), "no guess hit"
    assert ((gallop > 0) & (gallop < rt.GALLOP_ROUNDS)).any(), "no near miss"
    if must_bisect_far:
        assert ((gallop == rt.GALLOP_ROUNDS) & (bisect > 4)).any(), "no far miss"


# ---- The entropy model ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_cdf_matches_reference_on_every_key(dtype):
    """C(k) over ALL keys [0, 2^B] under garbage and ordinary (mu, sigma) and both mixture
    extremes (the default one is in every other test): negative boundaries exercise the
    arithmetic >> of t, the saturations the shift clamps and the int32 narrowing."""
    b = em.symbol_bits(dtype)
    if b == 8:
        mu = torch.tensor(GARBAGE_MU + [0.5, -2.0])
        sigma = torch.tensor(GARBAGE_SIGMA[: len(GARBAGE_MU)] + [1.0, 0.001])
    else:  # 65537 keys per parameter set: the extremes of e and mu_q only
        mu = torch.tensor([-3e38, float("nan"), float("inf"), 0.5])
        sigma = torch.tensor([1e-45, 3e38, 0.37, 1.0])
    mu_q, e, r = (t[:, None].to(DEVICE) for t in em.quantize_params(mu, sigma))
    keys = torch.arange((1 << b) + 1, device=DEVICE)[None, :]
    for w_wide, kappa in ((0, 0), (255, em.KAPPA_MAX)):
        got = rt.cdf(keys, mu_q, e, r, dtype, w_wide, kappa)
        want = em.cdf(keys, mu_q, e, r, dtype, w_wide, kappa)
        assert torch.equal(got, want), f"{dtype} w_wide={w_wide} kappa={kappa}"
    assert (got[:, 1:] > got[:, :-1]).all() and (got[:, 0] == 0).all() and (got[:, -1] == em.M).all()


def test_int32_headroom_of_the_kernels():
    """The kernels hold t (saturated at T_MAX << KAPPA_MAX), PHI values and the interpolation
    product in int32 (rans_triton.py, "The entropy model"); this pins the facts that makes
    exact, should the model's constants change."""
    table = em.phi_table()
    assert em.T_MAX << em.KAPPA_MAX < 2**31 and int(table.max()) < 2**31
    assert int((table[1:] - table[:-1]).max()) * ((1 << em.INTERP_BITS) - 1) < 2**31
    assert em.M < 2**31 and (1 << 32) // (1 << em.R) < 2**31


# ---- Encode and decode ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_bytes_and_staged_decode_match_reference(dtype):
    """Two adversarial pages: identical words and lane table; the Triton decoder, staged
    (cuts mid-step, an empty stage, a one-symbol stage), returns the keys and a clean
    finish(), through every path of its search; so do the reference decoder on the Triton
    bytes and the C++ coder (same words, same keys)."""
    num_lanes = 48  # 600 symbols: 12.5 steps per lane, a ragged last step
    keys, mu_q, e, r = make_pages(dtype, num_pages=2, n=600, seed=1)
    cum = rt.cdf(keys, mu_q, e, r, dtype)
    freq = rt.cdf(keys + 1, mu_q, e, r, dtype) - cum
    cum_ref, freq_ref = cum_freq_reference(keys, mu_q, e, r, dtype)
    assert torch.equal(cum, cum_ref) and torch.equal(freq, freq_ref)
    words, lane_words = rt.encode(cum, freq, num_lanes)
    words_ref, lane_words_ref = ref.encode(cum_ref, freq_ref, num_lanes)
    assert torch.equal(words, words_ref) and torch.equal(lane_words, lane_words_ref)

    cuts = [13, 13, 14, 300]  # mid-step, empty, one symbol, mid-step
    dec = rt.Decoder(words, lane_words, keys.shape[1], dtype)
    got, probes = decode_counting_probes(dec, mu_q, e, r, cuts)
    assert torch.equal(got, keys)
    assert dec.finish().tolist() == [True, True]
    check_probes(probes)
    check_cpp_coder(keys, mu_q, e, r, dtype, num_lanes, words, lane_words)
    dec_ref = ref.Decoder(words, lane_words, keys.shape[1], dtype)
    assert torch.equal(decode_staged(dec_ref, mu_q, e, r, [250]), keys)
    assert dec_ref.finish().tolist() == [True, True]


@pytest.mark.parametrize(
    ("num_pages", "n", "num_lanes"),
    [
        (1, 20, 1),  # one lane: every symbol is a step
        (3, 101, 8),  # N not a multiple of NL: ragged last step
        (2, 30, 48),  # more lanes than symbols: empty lanes flush L alone
        (2, 0, 4),  # empty pages
    ],
)
def test_lane_layouts(num_pages, n, num_lanes):
    """Every layout: bytes equal to the reference's, staged decode exact. (Ragged layouts
    found a bug in the reference, since fixed: its (0, M) pad steps emitted a word because
    M << 35 overflowed int64. The Triton encoder masks idle lanes instead.)"""
    dtype, w_wide, kappa = "fp8_e5m2", 255, 7
    keys, mu_q, e, r = make_pages(dtype, num_pages, n, seed=n + num_lanes)
    cum, freq = cum_freq_reference(keys, mu_q, e, r, dtype, w_wide, kappa)
    words, lane_words = rt.encode(cum, freq, num_lanes)
    words_ref, lane_words_ref = ref.encode(cum, freq, num_lanes)
    assert torch.equal(words, words_ref) and torch.equal(lane_words, lane_words_ref)
    dec = rt.Decoder(words, lane_words, n, dtype, w_wide, kappa)
    assert torch.equal(decode_staged(dec, mu_q, e, r, [n // 2]), keys)
    assert dec.finish().all()


def test_single_page_1d_interface():
    """[N] inputs work like the reference's: lane_words [1, NL], 1-D keys back."""
    keys, mu_q, e, r = (t[0] for t in make_pages("bf16", 1, 200, seed=7))
    cum, freq = cum_freq_reference(keys, mu_q, e, r, "bf16")
    words, lane_words = rt.encode(cum, freq, 20)
    assert lane_words.shape == (1, 20) and torch.equal(words, ref.encode(cum, freq, 20)[0])
    dec = rt.Decoder(words, lane_words, 200, "bf16")
    got = dec.decode(mu_q, e, r)
    assert got.shape == (200,) and torch.equal(got, keys) and dec.finish().tolist() == [True]


@pytest.mark.parametrize("dtype", ["fp8_e4m3", "bf16"])
def test_decode_search_at_the_ends_of_the_key_space(dtype):
    """Guesses pinned at the ends of the key space (mu = +-inf, +-3e38, NaN; sigma tiny or
    huge) against the extreme keys (both NaN ends, +-inf, +-0, the largest finites), and
    keys 1, 15, 16 and 1000 past the value nearest mu: the gallop clamps at keys 0 and 2^B,
    stops early, or gives way to bisection; the three coders agree on every byte."""
    b = em.symbol_bits(dtype)
    top = 1 << b
    mu = torch.tensor([float("inf"), -float("inf"), 3e38, -3e38, float("nan"), 0.0, 1.0, -2.5])
    sigma = torch.tensor([1e-45, 3e38, 0.37, 1e-30, float("nan"), 1e-20, 0.01, 0.1])
    mu_q, e, r = em.quantize_params(mu, sigma)  # [8]
    # the key nearest mu (NaN: 0; out of the dtype's range: its inf or NaN)
    near = em.keys_from_bits(em.storage_bits(mu.nan_to_num(0.0).to(em.TORCH_DTYPES[dtype])), dtype)
    extremes = em.keys_from_bits(em.storage_bits(torch.tensor(
        [0.0, -0.0, float("inf"), -float("inf"), 1e-40, -1e-40, 448.0, -448.0]).to(em.TORCH_DTYPES[dtype])), dtype)
    columns = [torch.full((8,), k) for k in (0, 1, top - 2, top - 1)]  # -NaN .. +NaN ends
    columns += [extremes[i].expand(8) for i in range(8)]
    columns += [(near + d).clamp(0, top - 1) for d in (-1000, -16, -15, -1, 0, 1, 15, 16, 1000)]
    keys = torch.stack(columns, dim=1)  # [8 parameter sets, 21 keys]
    mu_q, e, r = (t[:, None].expand_as(keys).contiguous() for t in (mu_q, e, r))
    keys, mu_q, e, r = (t.to(DEVICE) for t in (keys, mu_q, e, r))
    cum, freq = cum_freq_reference(keys, mu_q, e, r, dtype)
    num_lanes = 4
    words, lane_words = rt.encode(cum, freq, num_lanes)
    assert torch.equal(words, ref.encode(cum, freq, num_lanes)[0])
    dec = rt.Decoder(words, lane_words, keys.shape[1], dtype)
    got, probes = decode_counting_probes(dec, mu_q, e, r, [10])
    assert torch.equal(got, keys) and dec.finish().all()
    check_probes(probes)
    check_cpp_coder(keys, mu_q, e, r, dtype, num_lanes, words, lane_words)


# ---- Corrupt streams: same keys and the same (negative) verdict as the reference ----------


def _corruptions(words, lane_words):
    """(name, words, lane_words) variants of a valid 2-page stream."""
    flipped = words.clone()
    flipped[words.numel() // 2] ^= 1 << 7
    moved = lane_words.clone()
    moved[0, 0] += 1
    moved[0, 1] -= 1
    short = lane_words.clone()
    short[1, -1] -= 1
    starved = lane_words.clone()  # a lane with a single word cannot hold a state
    starved[0, 2] = 1
    starved[0, 3] += lane_words[0, 2] - 1
    high = words.clone()
    high[1] = 0xFFFFFFFF  # initial state >= 2^63
    rand = torch.randint(0, 1 << 32, words.shape, generator=torch.Generator().manual_seed(3)).to(words.device)
    return [
        ("bit flip", flipped, lane_words),
        ("lane boundary moved", words, moved),
        ("truncated", words[:-1], short),
        ("one-word lane", words, starved),
        ("state out of range", high, lane_words),
        ("random words", rand, lane_words),
        ("no words", words[:0], torch.zeros_like(lane_words)),
    ]


def test_corrupt_streams_decode_like_reference():
    dtype = "fp8_e4m3"
    keys, mu_q, e, r = make_pages(dtype, num_pages=2, n=144, seed=11)
    words, lane_words = ref.encode(*cum_freq_reference(keys, mu_q, e, r, dtype), 24)
    for name, bad_words, bad_lanes in _corruptions(words, lane_words):
        dec = rt.Decoder(bad_words, bad_lanes, keys.shape[1], dtype)
        dec_ref = ref.Decoder(bad_words, bad_lanes, keys.shape[1], dtype)
        got = decode_staged(dec, mu_q, e, r, [70])
        want = decode_staged(dec_ref, mu_q, e, r, [70])
        assert torch.equal(got, want), name
        verdict = dec.finish()
        assert torch.equal(verdict, dec_ref.finish()), name
        # rANS alone may accept a corrupt stream (it is a bijection: a flipped bit can decode
        # to other keys that end at L); the blob's page hash of the decoded page catches those.
        assert not verdict.all() or not torch.equal(got, keys), f"{name}: went unnoticed"


# ---- The value-level entry points (what the codec calls) ---------------------------------

# sigma values at the edges of quantize_params: its clamps (2^-60, 2^60), round-half-even
# ties of 1.m * 2^R (1 + 2^-9 rounds down to even, 1 + 3 * 2^-9 up), the carry of 1.m -> 2
# into the exponent, and float32 subnormals; mu values that saturate mu_q or round at a tie.
EDGE_SIGMA = [2.0**-60, 2.0**60, 2.0**-61, 2.0**61, 1 + 2**-9, 1 + 3 * 2**-9, 2 - 2**-10, 2 - 2**-23,
              3 * 2**-9, 1e-38, 1.4e-45, -0.0]
EDGE_MU = [2.0**30, -(2.0**30), 0.5, 1.5, 2.5, -2.5, 2.0**-21, 3 * 2.0**-21, 1e30, -1e-30, 2.0**-149, 7.0]


def make_value_pages(dtype: str, num_pages: int, n: int, seed: int):
    """(bits, mu, sigma) [P, n] on the CPU: storage patterns (int16 / uint8; the special
    ones, random ones and values drawn around mu) and float32 (mu, sigma) whose first
    symbols run through every pair of garbage values, then the edges of quantize_params."""
    mu, sigma, bits = draw_pages(dtype, num_pages, n, seed)
    pairs = [(m, sg) for m in GARBAGE_MU for sg in GARBAGE_SIGMA] + list(zip(EDGE_MU, EDGE_SIGMA))
    pairs = pairs[:n]
    mu[:, : len(pairs)] = torch.tensor([m for m, _ in pairs])
    sigma[:, : len(pairs)] = torch.tensor([sg for _, sg in pairs])
    special = (SPECIAL_BITS[dtype] * 3)[:n]
    start = min(100, n - len(special))  # under garbage (mu, sigma) too
    bits[:, start : start + len(special)] = torch.tensor(special)
    if em.symbol_bits(dtype) == 16:
        return (bits - ((bits >> 15) << 16)).to(torch.int16), mu, sigma  # the patterns as int16
    return bits.to(torch.uint8), mu, sigma


def decode_values_staged(decoder, mu, sigma, cuts, like):
    """Decode with stage boundaries ``cuts`` into fresh patterns shaped like ``like``."""
    out_bits = torch.zeros_like(like)
    bounds = [0, *cuts, mu.shape[-1]]
    for a, b in zip(bounds[:-1], bounds[1:]):
        decoder.decode_values(mu[:, a:b], sigma[:, a:b], out_bits)
    return out_bits


@triton.jit
def _quantize_test_kernel(mu_ptr, sigma_ptr, mu_q_ptr, e_ptr, r_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    mu_q, e, r = rt._quantize(tl.load(mu_ptr + offs, mask=mask), tl.load(sigma_ptr + offs, mask=mask, other=1.0))
    tl.store(mu_q_ptr + offs, mu_q, mask=mask)
    tl.store(e_ptr + offs, e.to(tl.int64), mask=mask)
    tl.store(r_ptr + offs, r, mask=mask)


# Widening a signalling NaN (random bit patterns hold some) quiets it, and numpy, which runs
# the interpreted kernel, warns about that; the NaN is replaced right after, as in torch.
@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")
def test_quantize_matches_quantize_params():
    """The kernels' fused quantize_params gives the reference's (mu_q, e, r) for every class
    of float32: random bit patterns (NaN payloads, +-inf, subnormals, both zeros, huge and
    tiny), the garbage values and the edges (clamps, ties, the carry)."""
    gen = torch.Generator().manual_seed(2)
    n = 4096
    mu = torch.randint(-(2**31), 2**31, (n,), generator=gen, dtype=torch.int64).to(torch.int32).view(torch.float32)
    sigma = torch.randint(-(2**31), 2**31, (n,), generator=gen, dtype=torch.int64).to(torch.int32).view(torch.float32)
    sigma[1::2] = sigma[1::2].abs() % 4 + 2.0**-20  # ordinary sigmas too
    listed = torch.tensor(GARBAGE_MU + EDGE_MU)
    mu[: len(listed) ** 2] = listed.repeat(len(listed))
    sigma[: len(listed) ** 2] = torch.tensor(GARBAGE_SIGMA + EDGE_SIGMA).repeat_interleave(len(listed))
    mu, sigma = mu.to(DEVICE), sigma.to(DEVICE)
    got = [torch.empty(n, dtype=torch.int64, device=DEVICE) for _ in range(3)]
    _quantize_test_kernel[(triton.cdiv(n, 1024),)](mu, sigma, *got, n, BLOCK=1024)
    want = em.quantize_params(mu, sigma)
    for name, g, w in zip(("mu_q", "e", "r"), got, want):
        assert torch.equal(g, w), name


@pytest.mark.parametrize("dtype", DTYPES)
def test_value_level_matches_cpp_and_reference(dtype):
    """encode_values and Decoder.decode_values (the codec's entry points), Triton vs C++ vs
    torch reference on hostile pages: identical words (int32 holding u32) and lane tables;
    staged decode (cuts mid-step, an empty stage) of the Triton words by all three gives the
    patterns back, with clean verdicts."""
    num_pages, n, num_lanes = 2, 200, 16  # 12.5 steps per lane: a ragged last step
    bits, mu, sigma = make_value_pages(dtype, num_pages, n, seed=4)
    words, lane_words = rt.encode_values(bits.to(DEVICE), mu.to(DEVICE), sigma.to(DEVICE), dtype, num_lanes)
    assert words.dtype == torch.int32 and lane_words.dtype == torch.int64
    words_cpp, lanes_cpp = rc.encode_values(bits, mu, sigma, dtype, num_lanes)
    words_ref, lanes_ref = ref.encode_values(bits, mu, sigma, dtype, num_lanes)
    assert torch.equal(words.cpu(), words_ref) and torch.equal(lane_words.cpu(), lanes_ref)
    assert torch.equal(words_cpp, words_ref) and torch.equal(lanes_cpp, lanes_ref)

    cuts = [37, 37, 120]
    dec = rt.Decoder(words, lane_words, n, dtype)
    got_bits = decode_values_staged(dec, mu.to(DEVICE), sigma.to(DEVICE), cuts, bits.to(DEVICE))
    assert dec.finish().tolist() == [True, True]
    assert torch.equal(got_bits.cpu(), bits)
    for coder in (rc, ref):
        dec = coder.Decoder(words.cpu(), lane_words.cpu(), n, dtype)
        got_bits = decode_values_staged(dec, mu, sigma, cuts, bits)
        assert dec.finish().tolist() == [True, True]
        assert torch.equal(got_bits, bits), coder.__name__


def test_value_level_corrupt_streams_decode_like_cpp_and_reference():
    """Corrupt int32 streams through decode_values: the same patterns and verdicts from all
    three decoders."""
    dtype, n, num_lanes = "bf16", 64, 16
    bits, mu, sigma = make_value_pages(dtype, 2, n, seed=5)
    words, lane_words = rc.encode_values(bits, mu, sigma, dtype, num_lanes)
    for name, bad_words, bad_lanes in _corruptions(words.to(torch.int64) & 0xFFFFFFFF, lane_words):
        bad_words = ref.as_u32(bad_words)  # int32 holding u32, as the codec passes them
        results = []
        for coder, device in ((rt, DEVICE), (rc, "cpu"), (ref, "cpu")):
            dec = coder.Decoder(bad_words.to(device), bad_lanes.to(device), n, dtype)
            got_bits = decode_values_staged(dec, mu.to(device), sigma.to(device), [40], bits.to(device))
            results.append((got_bits.cpu(), dec.finish().cpu()))
        for got_bits, verdict in results[1:]:
            assert torch.equal(got_bits, results[0][0]) and torch.equal(verdict, results[0][1]), name
        assert not results[0][1].all() or not torch.equal(results[0][0], bits), f"{name}: went unnoticed"


# ---- The table model (blob format 3; 16-bit dtypes) ----------------------------------------


def make_table_pages(dtype: str, n: int, seed: int):
    """(bits, mu, sigma) [3, n] on the CPU for the table model: make_value_pages' hostile
    page (garbage and edge (mu, sigma), special patterns, a third random bits: escapes); a
    page drawn around (mu, sigma), dense on the lattice (cells off zero, zero-cell points); and one
    whose odd symbols have |mu| >> sigma (not dense: the exact model's one step) between
    dense ones."""
    bits, mu, sigma = make_value_pages(dtype, 1, n, seed)
    gen = torch.Generator().manual_seed(seed)
    mu2 = torch.randn(2, n, generator=gen)
    sigma2 = torch.rand(2, n, generator=gen) + 0.05
    mu2[1, 1::2] = (torch.rand(n // 2, generator=gen) * 2 - 1) * 2000.0
    sigma2[1, 1::2] *= 0.1
    drawn = (mu2 + sigma2 * torch.randn(2, n, generator=gen)).to(em.TORCH_DTYPES[dtype]).view(torch.int16)
    return torch.cat([bits, drawn]), torch.cat([mu, mu2]), torch.cat([sigma, sigma2])


@triton.jit
def _table_steps_test_kernel(bits_ptr, mu_q_ptr, e_ptr, out_ptr, n,
                             BITS: tl.constexpr, MAN_BITS: tl.constexpr, BIAS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    pattern = tl.load(bits_ptr + offs, mask=mask, other=0).to(tl.int32)
    mq = rt._mu_cell(tl.load(mu_q_ptr + offs, mask=mask, other=0), mask)  # dense parameters only
    e = tl.load(e_ptr + offs, mask=mask, other=0).to(tl.int32)
    outs = rt._table_steps(pattern, mq, e, BITS, MAN_BITS, BIAS)
    for i in tl.static_range(4):  # entry, cum2, freq2, scale2
        tl.store(out_ptr + i * n + offs, outs[i].to(tl.int64), mask=mask)


@triton.jit
def _level2_test_kernel(entry_ptr, x_ptr, mu_q_ptr, e_ptr, out_ptr, n, BITS: tl.constexpr, MAN_BITS: tl.constexpr,
                        BIAS: tl.constexpr, BLOCK: tl.constexpr, LIVE: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    entry = tl.load(entry_ptr + offs, mask=mask, other=0).to(tl.int32)
    x16 = tl.load(x_ptr + offs, mask=mask, other=0).to(tl.int32)
    mq = rt._mu_cell(tl.load(mu_q_ptr + offs, mask=mask, other=0), mask)  # dense parameters only
    e = tl.load(e_ptr + offs, mask=mask, other=0).to(tl.int32)
    pattern, d, rem, freq, scale, ok = rt._decode_level2(entry, x16, mq - rt._TJ, e, mask & LIVE,  # no live lane:
                                                         BITS, MAN_BITS, BIAS)  # no general path
    for i, out in enumerate((pattern, rem, freq, scale, ok, d)):  # rem = slot - cum
        tl.store(out_ptr + i * n + offs, out.to(tl.int64), mask=mask)


def dense_parameters(dtype):
    """Quantised (mu_q, e, r) [S] of the garbage, edge and some ordinary (mu, sigma) that are
    dense for ``dtype``: the table's symbols (the kernels' table helpers hold mu's cell in
    int32 for those only)."""
    mu = torch.tensor(GARBAGE_MU + EDGE_MU + [0.0, 3.0, -2.5, 100.0, 0.0, -7e-5, 0.0, 1.0])
    sigma = torch.tensor(GARBAGE_SIGMA + EDGE_SIGMA + [1e-4, 1.0, 0.3, 2.0, 1e-5, 3e-6, 3e38, 0.02])
    mu_q, e, r = em.quantize_params(mu, sigma)
    dense = tm.dense(mu_q, e, r, dtype)
    cells = {}  # one parameter set per (mu's cell, e): the table steps depend on nothing else but the row
    for i in dense.nonzero().squeeze(1).tolist():
        cells.setdefault((int(mu_q[i]) >> tm.CELL_SHIFT, int(e[i])), i)
    pick = torch.tensor(sorted(cells.values()))
    assert len(pick) >= 8, len(pick)
    return mu_q[pick], e[pick], r[pick]


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_table_model_maps_match_reference(dtype):
    """The kernels' table-model helpers equal table_model's on dense parameters at
    quantize_params' edges (huge and tiny sigma, mu far from zero, garbage): the encoder's
    level-1 entry and level-2 step of EVERY pattern (cells off zero, zero-cell points, ESC:
    table_model.symbol_steps), and level 2 of the decoder (table_model.decode_level2) at
    random cells near and far from zero and random states, ok or not (a corrupt stream)."""
    b, man_bits, bias, _ = em.DTYPE_SPECS[dtype]
    spec = dict(BITS=b, MAN_BITS=man_bits, BIAS=bias)
    mu_q, e, r = dense_parameters(dtype)
    bits = torch.arange(1 << b)
    pp, mm, ee, rr = (t.reshape(-1).contiguous() for t in torch.broadcast_tensors(bits, mu_q[:, None], e[:, None],
                                                                                  r[:, None]))
    n = pp.numel()
    got = torch.empty(4 * n, dtype=torch.int64, device=DEVICE)
    _table_steps_test_kernel[(triton.cdiv(n, 1 << b),)](pp.to(DEVICE), mm.to(DEVICE), ee.to(DEVICE), got, n, **spec,
                                                        BLOCK=1 << b)
    entry, cum2, freq2, scale2 = got.cpu().view(4, n)
    cum, freq, scale = tm.symbol_steps(em.keys_from_bits(pp, dtype), mm, ee, rr, dtype, em.W_WIDE, em.KAPPA)
    esc = scale[:, 1] == em.PROB_BITS
    assert torch.equal(entry == tm.ESC, esc)
    cum1 = tm.level1_table(em.W_WIDE, em.KAPPA).reshape(-1)
    at = tm.row_index(mm, rr) * tm.ROW + entry
    assert torch.equal(cum1[at], cum[:, 0]) and torch.equal(cum1[at + 1] - cum1[at], freq[:, 0])
    for name, g, w in zip(("cum2", "freq2", "scale2"), (cum2, freq2, scale2), (cum[:, 1], freq[:, 1], scale[:, 1])):
        assert torch.equal(g[~esc], w[~esc]), name
    assert (scale2[~esc] == tm.P2).sum() > 1000 and (scale2[~esc] == tm.PT).sum() > 1000 and esc.sum() > 1000

    gen = torch.Generator().manual_seed(10)
    n = 1 << 14
    pick = torch.randint(0, len(mu_q), (n,), generator=gen)
    mu_q, e = mu_q[pick], e[pick]
    entry = torch.randint(0, tm.NCELL, (n,), generator=gen)
    near = tm.TJ - (mu_q >> tm.CELL_SHIFT) + torch.randint(-3, 3, (n,), generator=gen)  # the zero cells and beside
    entry[: n // 2] = near[: n // 2].clamp(0, tm.NCELL - 1)
    x = torch.randint(0, 1 << tm.P2, (n,), generator=gen)
    key, slot, cum, *want = tm.decode_level2(entry, x, mu_q, e, dtype)
    want = [em.bits_from_keys(key, dtype), slot - cum, *want]
    ok, zero = want[-1], want[-2] == tm.P2
    # every lane live (fp16: an impossible cell among them, so the general path redoes them
    # all), then none (the float32 path alone: the reference's where ok, and ok itself)
    for live in (True, False):
        got = torch.empty(6 * n, dtype=torch.int64, device=DEVICE)
        _level2_test_kernel[(1,)](entry.to(DEVICE), x.to(DEVICE), mu_q.to(DEVICE), e.to(DEVICE), got, n, **spec,
                                  BLOCK=n, LIVE=live)
        got = got.cpu().view(6, n)
        for name, g, w in zip(("pattern", "rem", "freq", "scale", "ok"), got, want):
            assert torch.equal(g[ok], w[ok].to(torch.int64)), name
            if live or name == "ok":
                assert torch.equal(g, w.to(torch.int64)), name
        if dtype == "bf16":  # the decoder's step without a multiply (_rans_pop_bits): x's bits [scale - d, scale)
            assert torch.equal(got[2], 1 << (got[3] - got[5])) and torch.equal(got[1], x & (got[2] - 1))
    assert zero.sum() > 1000 and (ok & ~zero).sum() > 1000
    # dense bf16 cells are always possible (test_table_model_impossible_cell_fails_the_page)
    assert (dtype == "bf16") == bool(ok.all())


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_table_model_matches_reference(dtype):
    """encode_values(model="table") writes the reference's words and lane table on pages
    that take every path of the model (cells off zero and their offset bits, zero-cell
    points, ESC with the exact model's step, symbols that are not dense, dense and not dense
    lanes in one program); the staged decode_values gives the patterns back with clean
    verdicts."""
    n, num_lanes = 120, 8  # 15 symbols per lane, 30 rANS steps
    bits, mu, sigma = make_table_pages(dtype, n, seed=8)
    keys = em.keys_from_bits(em.storage_bits(bits), dtype)
    mu_q, e, r = em.quantize_params(mu, sigma)
    _, _, scale = tm.symbol_steps(keys, mu_q, e, r, dtype, em.W_WIDE, em.KAPPA)
    dense, level2 = tm.dense(mu_q, e, r, dtype), scale[..., 1]
    assert (~dense).sum() >= 10 and (dense & (level2 == em.PROB_BITS)).sum() >= 10  # the exact model alone, ESC
    assert (dense & (level2 == tm.PT)).sum() >= 10 and (dense & (level2 == tm.P2)).sum() >= 10  # offsets, points
    words, lane_words = rt.encode_values(bits.to(DEVICE), mu.to(DEVICE), sigma.to(DEVICE), dtype, num_lanes,
                                         model="table")
    words_ref, lanes_ref = ref.encode_values(bits, mu, sigma, dtype, num_lanes, model="table")
    assert words.dtype == torch.int32 and torch.equal(words.cpu(), words_ref)
    assert torch.equal(lane_words.cpu(), lanes_ref)

    dec = rt.Decoder(words, lane_words, n, dtype, model="table")
    got_bits = decode_values_staged(dec, mu.to(DEVICE), sigma.to(DEVICE), [37, 37, 38], bits.to(DEVICE))
    assert dec.finish().tolist() == [True, True, True]
    assert torch.equal(got_bits.cpu(), bits)


@pytest.mark.parametrize("dtype, model", [("fp8_e4m3", "exact"), ("bf16", "table")])
def test_chunked_encoder_matches_reference(dtype, model):
    """Encoder, coding the pages a chunk at a time, last chunk first (chunks of one symbol,
    cut mid-step, spanning steps; patterns as one [P, N] tensor or a tensor per page),
    writes the reference's words and lane table on hostile pages (every path of the model)."""
    n, num_lanes = 120, 8  # 15 symbols per lane
    if model == "table":
        bits, mu, sigma = make_table_pages(dtype, n, seed=15)
    else:
        bits, mu, sigma = make_value_pages(dtype, 3, n, seed=15)
    words_ref, lanes_ref = ref.encode_values(bits, mu, sigma, dtype, num_lanes, model=model)
    bounds = [0, 3, 37, 38, 61, 64, n]  # encoded from the end back
    for pages in (bits.to(DEVICE), list(bits.to(DEVICE))):
        encoder = rt.Encoder(pages, dtype, num_lanes, model=model)
        for a, b in reversed(list(zip(bounds[:-1], bounds[1:]))):
            encoder.encode(mu[:, a:b].to(DEVICE), sigma[:, a:b].to(DEVICE))
        assert len(encoder.chunks) == len(bounds) - 1
        words, lane_words = encoder.finish()
        assert words.dtype == torch.int32 and torch.equal(words.cpu(), words_ref)
        assert torch.equal(lane_words.cpu(), lanes_ref)
    encoder = rt.Encoder(bits.to(DEVICE), dtype, num_lanes, model=model)
    with pytest.raises(ValueError, match="before symbol 120"):
        encoder.encode(mu.repeat(1, 2).to(DEVICE), sigma.repeat(1, 2).to(DEVICE))  # more than the pages hold
    encoder.encode(mu[:, 60:].to(DEVICE), sigma[:, 60:].to(DEVICE))
    with pytest.raises(ValueError, match="not coded"):
        encoder.finish()


class _StagedPredictor:
    """A multi-stage predictor for the codec's Triton encode: a stage per (kv, layer) block,
    mu the previous block's values (what the decoder has decoded), sigma from the page's
    spread (side info: the page's float32 std)."""

    id, name, fingerprint = 249, "staged_test", 0x5EED

    def stages(self, meta):
        per_layer = meta.numel // (meta.shape[0] * meta.shape[1])
        return list(range(0, meta.numel + 1, per_layer))


def test_codec_triton_encode_matches_cpp(monkeypatch):
    """The codec's Triton route (rans_triton.Encoder, a stage at a time, a chunk of
    materialised rows at a time) writes the C++ coder's blobs byte for byte: page_stats
    (one stage, rows broadcast over the tokens) on bf16 (table model) and fp8 (exact), and
    a multi-stage predictor (a stage per (kv, layer) block, predicted from the decoded
    blocks), in several chunks."""
    from sglang_speckv import codec
    from sglang_speckv.kernels import format as fmt
    from sglang_speckv.predictors.base import PageMeta, Predictor
    from sglang_speckv.predictors.page_stats import PageStatsPredictor

    class Staged(_StagedPredictor, Predictor):
        def predict(self, meta, side, values, stage):
            flat = values.reshape(meta.shape[0] * meta.shape[1], -1)  # [stages, per_layer]
            mu = torch.zeros(flat.shape[1]) if stage == 0 else flat[stage - 1].to(torch.float32)
            return mu, torch.full((flat.shape[1],), 0.3)

    shape = (2, 2, 32, 2, 16)  # [kv, layers, tokens, heads, dim]: 4096 symbols, 16 lanes: 256 steps
    gen = torch.Generator().manual_seed(16)
    base = torch.randn(1, 1, 32, 2, 16, generator=gen)
    for dtype, predictor in (("bf16", PageStatsPredictor()), ("fp8_e4m3", PageStatsPredictor()), ("bf16", Staged())):
        scale = 16.0 if dtype.startswith("fp8") else 1.0
        pages = [((base + 0.2 * torch.randn(shape, generator=gen)) * s * scale).to(em.TORCH_DTYPES[dtype])
                 for s in (1.0, 0.5)]
        metas = [PageMeta(dtype, shape)] * 2
        expect = codec.encode_pages(pages, metas, predictor, num_lanes=16)  # the C++ coder
        assert not any(fmt.parse_blob(b).header.raw for b in expect)
        calls = []
        real = rt.Encoder.encode

        def counting(self, mu, sigma):
            calls.append(mu.shape[-1])
            return real(self, mu, sigma)

        with monkeypatch.context() as m:
            m.setattr(codec, "_coder", lambda device: rt)
            m.setattr(codec, "ENCODE_SHARE", 0.3)  # chunks of at most a (kv, layer) block
            m.setattr(rt.Encoder, "encode", counting)
            got = codec.encode_pages([p.to(DEVICE) for p in pages], metas, predictor, num_lanes=16)
        assert got == expect, (dtype, predictor.name)
        assert len(calls) >= 4, calls  # chunks of whole rows: page_stats' (kv, layer) blocks


def test_table_model_corrupt_streams_decode_like_reference():
    """Corrupt table-model streams: the Triton decoder gives the reference's patterns, lane
    verdicts and page verdicts."""
    dtype, n, num_lanes = "bf16", 32, 8
    bits, mu, sigma = make_table_pages(dtype, n, seed=9)
    words, lane_words = ref.encode_values(bits, mu, sigma, dtype, num_lanes, model="table")
    for name, bad_words, bad_lanes in _corruptions(words.to(torch.int64) & 0xFFFFFFFF, lane_words):
        bad_words = ref.as_u32(bad_words)
        results = []
        for coder, device in ((rt, DEVICE), (ref, "cpu")):
            dec = coder.Decoder(bad_words.to(device), bad_lanes.to(device), n, dtype, model="table")
            got_bits = decode_values_staged(dec, mu.to(device), sigma.to(device), [20], bits.to(device))
            results.append((got_bits.cpu(), dec.finish().cpu(), dec.lane_ok.cpu()))
        (got_bits, verdict, lane_ok), (want_bits, want_verdict, want_lane_ok) = results
        assert torch.equal(got_bits, want_bits) and torch.equal(verdict, want_verdict), name
        assert torch.equal(lane_ok, want_lane_ok), name
        assert not verdict.all() or not torch.equal(got_bits, bits), f"{name}: went unnoticed"


def test_table_model_impossible_cell_fails_the_page():
    """A cell no encoder writes (off zero, beyond the largest finite binade or narrower than
    the key spacing) clears its lane's verdict, as in the reference. Dense bf16 symbols
    cannot reach one (their cells lie within 2^7 u of zero, inside bf16's finite binades and
    at least one key wide); fp16 with a sigma so large that the lattice reaches past 65504
    can: random words land in the cells beyond it."""
    dtype, n, num_lanes = "fp16", 32, 4
    gen = torch.Generator().manual_seed(12)
    mu, sigma = torch.zeros(1, n), torch.full((1, n), 1e4)
    bits = (sigma * torch.randn(1, n, generator=gen)).to(torch.float16).view(torch.int16)
    _, lane_words = ref.encode_values(bits, mu, sigma, dtype, num_lanes, model="table")
    words = ref.as_u32(torch.randint(0, 1 << 32, (int(lane_words.sum()),), generator=gen))
    results = []
    for coder, device in ((rt, DEVICE), (ref, "cpu")):
        dec = coder.Decoder(words.to(device), lane_words.to(device), n, dtype, model="table")
        got_bits = decode_values_staged(dec, mu.to(device), sigma.to(device), [10], bits.to(device))
        results.append((got_bits.cpu(), dec.finish().cpu(), dec.lane_ok.cpu()))
    (got_bits, verdict, lane_ok), (want_bits, want_verdict, want_lane_ok) = results
    assert torch.equal(got_bits, want_bits) and torch.equal(lane_ok, want_lane_ok)
    assert not lane_ok.all() and verdict.tolist() == want_verdict.tolist() == [False]


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")  # as above
def test_table_params_match_reference_and_the_codec_broadcasts_them(monkeypatch):
    """table_params (the table decoder's int32 parameters) unpack to quantize_params' e, the
    row, r's low bits, the dense test (bit 15, set where not dense) and mu's cell on hostile
    (mu, sigma); and the codec's Triton route, which computes them once per channel under
    page_stats and broadcasts them over the tokens, decodes the C++ coder's blobs to the
    pages."""
    from sglang_speckv import codec
    from sglang_speckv.kernels import format as fmt
    from sglang_speckv.predictors.base import PageMeta
    from sglang_speckv.predictors.page_stats import PageStatsPredictor

    for dtype in ("bf16", "fp16"):
        _, mu, sigma = make_table_pages(dtype, 256, seed=13)
        got = rt.table_params(mu.to(DEVICE), sigma.to(DEVICE), dtype).cpu().long()
        mu_q, e, r = em.quantize_params(mu, sigma)
        dense = tm.dense(mu_q, e, r, dtype)
        assert torch.equal((got & 255) - 128, e)
        assert torch.equal((got >> 8) & (tm.ROWS - 1), tm.row_index(mu_q, r))
        assert torch.equal((got & (tm.ROWS << 8)) == 0, dense)  # bit 15: not dense (the exact model's lookup rows)
        assert not (got & (1 << 16)).any()  # bit 16: the decoder's masked lanes only
        assert torch.equal((got >> 17) & 31, r & 31)  # r's bits below the row's sigma bucket
        assert torch.equal(got >> 22, torch.where(dense, mu_q >> tm.CELL_SHIFT, 0) - tm.TJ)  # mu's cell - TJ
    shape = (2, 1, 32, 1, 16)  # [kv, layers, tokens, heads, dim]
    gen = torch.Generator().manual_seed(14)
    pages = [(torch.randn(shape, generator=gen) * s).to(torch.bfloat16) for s in (1.0, 0.05)]
    metas = [PageMeta("bf16", shape)] * 2
    blobs = codec.encode_pages(pages, metas, PageStatsPredictor(), num_lanes=16)  # the C++ coder
    assert not any(fmt.parse_blob(b).header.raw for b in blobs)  # coded by the table model
    monkeypatch.setattr(codec, "_coder", lambda device: rt)
    got_pages, errors = codec.decode_pages(blobs, PageStatsPredictor(), metas=metas, device=DEVICE)
    assert errors == [None, None]
    assert all(torch.equal(g.cpu().view(torch.int16), p.view(torch.int16)) for g, p in zip(got_pages, pages))


# ---- Launchers ------------------------------------------------------------------------------


def test_launchers_reject_bad_arguments():
    keys, mu_q, e, r = make_pages("fp8_e4m3", 1, 16, seed=0)
    cum, freq = cum_freq_reference(keys, mu_q, e, r, "fp8_e4m3")
    with pytest.raises(ValueError, match="same shape"):
        rt.encode(cum, freq[:, :8], 4)
    with pytest.raises(ValueError, match="int64"):
        rt.encode(cum.int(), freq.int(), 4)
    with pytest.raises(ValueError, match="num_lanes"):
        rt.encode(cum, freq, 0)
    with pytest.raises(ValueError, match="unknown KV dtype"):
        rt.cdf(keys, mu_q, e, r, "int4")
    with pytest.raises(ValueError, match="w_wide"):
        rt.cdf(keys, mu_q, e, r, "fp8_e4m3", w_wide=256)
    words, lane_words = rt.encode(cum, freq, 4)
    dec = rt.Decoder(words, lane_words, 16, "fp8_e4m3")
    dec.decode(mu_q[:, :10], e[:, :10], r[:, :10])
    with pytest.raises(ValueError, match="does not fit"):
        dec.decode(mu_q[:, :10], e[:, :10], r[:, :10])  # 20 > 16 symbols
    with pytest.raises(ValueError, match="does not fit"):
        dec.decode(mu_q[:, :2].repeat(2, 1), e[:, :2].repeat(2, 1), r[:, :2].repeat(2, 1))  # 2 pages
    with pytest.raises(ValueError, match="int64"):
        dec.decode(mu_q.int(), e.int(), r.int())
    with pytest.raises(ValueError, match="probes must be"):
        dec.decode(mu_q[:, :2], e[:, :2], r[:, :2], probes=torch.zeros(2, 1, 3, dtype=torch.int32, device=DEVICE))


def test_value_level_launchers_reject_bad_arguments():
    bits, mu, sigma = (t.to(DEVICE) for t in make_value_pages("bf16", 1, 16, seed=0))
    with pytest.raises(ValueError, match="bits must be int16"):
        rt.encode_values(bits.int(), mu, sigma, "bf16", 4)
    with pytest.raises(ValueError, match="float32"):
        rt.encode_values(bits, mu.double(), sigma, "bf16", 4)
    with pytest.raises(ValueError, match="num_lanes"):
        rt.encode_values(bits, mu, sigma, "bf16", 0)
    with pytest.raises(ValueError, match="unknown entropy model"):
        rt.encode_values(bits, mu, sigma, "bf16", 4, model="tables")
    with pytest.raises(ValueError, match="16-bit dtypes only"):
        rt.encode_values(bits.to(torch.uint8), mu, sigma, "fp8_e4m3", 4, model="table")
    words, lane_words = rt.encode_values(bits, mu, sigma, "bf16", 4)
    with pytest.raises(ValueError, match="unknown entropy model"):
        rt.Decoder(words, lane_words, 16, "bf16", model="tables")
    with pytest.raises(NotImplementedError, match="decode_values"):
        rt.Decoder(words, lane_words, 16, "bf16", model="table").decode(*em.quantize_params(mu, sigma))
    dec = rt.Decoder(words, lane_words, 16, "bf16")
    with pytest.raises(ValueError, match="out_bits must be"):
        dec.decode_values(mu, sigma, bits.to(torch.uint8))
    with pytest.raises(ValueError, match="float32"):
        dec.decode_values(mu.double(), sigma.double(), bits.clone())


# ---- Real compilation (no GPU needed) and real GPU runs -----------------------------------

# Compiles every kernel for an H100 (sm_90) through Triton's real pipeline (TTIR -> PTX ->
# ptxas -> cubin), which the interpreter never exercises: type errors in loop-carried values,
# unsupported ops, register spills would surface only on a GPU machine otherwise. Runs in a
# subprocess because this process has TRITON_INTERPRET=1. Pointer arguments (``*_ptr``) are
# int64 tensors (the decoder's quantiles float32, its probe counts int32; the value-level
# kernels' storage patterns int16 / uint8, mu and sigma float32, words int32),
# UPPER_CASE ones constexprs, the rest int32 scalars.
_COMPILE_SCRIPT = """
import os, subprocess, tempfile, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sglang_speckv.kernels import entropy_model as em, rans_triton as rt
for dtype in ("fp8_e4m3", "bf16"):  # both NaN conventions, both symbol widths
    spec = dict(zip(("BITS", "MAN_BITS", "BIAS", "FN_NAN"), em.DTYPE_SPECS[dtype]))
    decode = {"BLOCK_LANES": rt.DECODE_LANES, "GALLOP_ROUNDS": rt.GALLOP_ROUNDS, "COUNT_PROBES": False}
    kernels = [(rt._cdf_kernel, {"BLOCK": rt.BLOCK_ELEMS}), (rt._decode_kernel, decode),
               (rt._encode_values_kernel, {"BLOCK_LANES": rt.BLOCK_LANES}),
               (rt._decode_values_kernel, decode)]
    if dtype == "bf16":  # the encoder does not depend on the dtype; the probe counts (tests) neither
        kernels += [(rt._encode_kernel, {"BLOCK_LANES": rt.BLOCK_LANES}), (rt._compact_kernel, {"BLOCK": rt.BLOCK_ELEMS}),
                    (rt._gather_kernel, {"BLOCK": rt.BLOCK_ELEMS}),
                    (rt._decode_kernel, {**decode, "COUNT_PROBES": True}),
                    (rt._encode_table_kernel, {"BLOCK_LANES": rt.BLOCK_LANES}),  # the table model: 16-bit only
                    (rt._decode_table_kernel, decode), (rt._table_params_kernel, {"BLOCK": rt.BLOCK_ELEMS})]
    for fn, block in kernels:
        consts = {k: v for k, v in {**spec, **block}.items() if k in fn.arg_names}
        values = fn in (rt._encode_values_kernel, rt._decode_values_kernel, rt._encode_table_kernel,
                        rt._decode_table_kernel)
        bits = "*i16" if spec["BITS"] == 16 else "*u8"
        types = {"q_ptr": "*fp32", "probes_ptr": "*i32", "bits_ptr": bits, "out_bits_ptr": bits,
                 "mu_ptr": "*fp32", "sigma_ptr": "*fp32", "cum1_ptr": "*i32", "lane_ok_ptr": "*u8",
                 "params_ptr": "*i32", "lookup_ptr": "*i64", "count_ptr": "*i32",
                 **({"words_ptr": "*i32", "scratch_ptr": "*i32"} if values else {})}
        sig = {a: "constexpr" if a in consts else types.get(a, "*i64" if a.endswith("_ptr") else "i32")
               for a in fn.arg_names}
        # as the launchers run them
        warps = rt.DECODE_WARPS if fn in (rt._decode_kernel, rt._decode_values_kernel, rt._decode_table_kernel) else 4
        kernel = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": warps})
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
            f.write(kernel.asm["ptx"])
            f.flush()
            ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
            info = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                                  capture_output=True, text=True, check=True).stderr
        assert "0 bytes spill stores" in info, (fn.__name__, dtype, info)
        print(fn.__name__, dtype, "ok")
"""


def test_kernels_compile_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(" ok") == 15, done.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_value_level_large_pages(dtype):
    """The codec's entry points compiled on CUDA, 4 pages of 2^16 symbols, 256 lanes: words
    equal to the C++ coder's on the CPU (cross-device determinism), staged decode_values
    gives the patterns back."""
    bits, mu, sigma = make_value_pages(dtype, 4, 1 << 16, seed=6)
    words, lane_words = rt.encode_values(bits.cuda(), mu.cuda(), sigma.cuda(), dtype, 256)
    words_cpp, lanes_cpp = rc.encode_values(bits, mu, sigma, dtype, 256)
    assert torch.equal(words.cpu(), words_cpp) and torch.equal(lane_words.cpu(), lanes_cpp)
    dec = rt.Decoder(words, lane_words, bits.shape[1], dtype)
    got_bits = decode_values_staged(dec, mu.cuda(), sigma.cuda(), [1000, 40000], bits.cuda())
    assert dec.finish().all() and torch.equal(got_bits.cpu(), bits)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_gpu_table_model_large_pages(dtype):
    """The table model compiled on CUDA, 4 pages of 2^16 symbols, 256 lanes: words equal to
    the torch reference's on the CPU (cross-device determinism), staged decode_values gives
    the patterns back."""
    bits, mu, sigma = make_value_pages(dtype, 4, 1 << 16, seed=7)
    words, lane_words = rt.encode_values(bits.cuda(), mu.cuda(), sigma.cuda(), dtype, 256, model="table")
    words_ref, lanes_ref = ref.encode_values(bits, mu, sigma, dtype, 256, model="table")
    assert torch.equal(words.cpu(), words_ref) and torch.equal(lane_words.cpu(), lanes_ref)
    dec = rt.Decoder(words, lane_words, bits.shape[1], dtype, model="table")
    got_bits = decode_values_staged(dec, mu.cuda(), sigma.cuda(), [1000, 40000], bits.cuda())
    assert dec.finish().all() and torch.equal(got_bits.cpu(), bits)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_large_pages(dtype):
    """Compiled kernels on CUDA, 8 pages of 2^16 symbols, 256 lanes: bytes equal to the
    reference run on the CPU (cross-device determinism), staged decode exact."""
    keys, mu_q, e, r = make_pages(dtype, num_pages=8, n=1 << 16, seed=5)
    cum = rt.cdf(keys, mu_q, e, r, dtype)
    freq = rt.cdf(keys + 1, mu_q, e, r, dtype) - cum
    words, lane_words = rt.encode(cum, freq, 256)
    cpu = [t.cpu() for t in (keys, mu_q, e, r)]
    words_ref, lane_words_ref = ref.encode(*cum_freq_reference(*cpu, dtype), 256)
    assert torch.equal(words.cpu(), words_ref) and torch.equal(lane_words.cpu(), lane_words_ref)
    dec = rt.Decoder(words, lane_words, keys.shape[1], dtype)
    assert torch.equal(decode_staged(dec, mu_q, e, r, [1000, 40000]), keys)
    assert dec.finish().all()
