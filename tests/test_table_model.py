"""The table model (kernels/table_model.py, docs/DESIGN.md "The table model"): its tables
and maps hold their contracts on every key, and the torch reference coder round-trips every
bit pattern under it (the C++ and Triton coders are compared with it byte for byte in
test_rans_cpu.py and test_rans_triton.py)."""

import pytest
import torch
import xxhash

from sglang_speckv.kernels import entropy_model as em
from sglang_speckv.kernels import rans_reference as rr
from sglang_speckv.kernels import table_model as tm

DTYPES = ["bf16", "fp16"]


@pytest.mark.parametrize("w_wide,kappa", [(13, 3), (0, 0), (255, 7)])
def test_level1_rows_are_codes(w_wide, kappa):
    cum1 = tm.level1_table(w_wide, kappa)
    assert cum1.shape == (tm.ROWS, tm.ROW) and cum1.dtype == torch.int64
    assert bool((cum1[:, 0] == 0).all()) and bool((cum1[:, -1] == 1 << tm.PT).all())
    assert bool((cum1[:, 1:] > cum1[:, :-1]).all())  # every entry, ESC included, has freq >= 1


@pytest.mark.parametrize("w_wide,kappa", [(13, 3), (0, 0), (255, 7)])
def test_level1_start_finds_every_slot_of_every_row(w_wide, kappa):
    """level1_start's contract, and the decoders' correction from it (step while CUM1[i + 1]
    <= slot) reaches torch.searchsorted's entry for every slot of every row."""
    cum1, start = tm.level1_table(w_wide, kappa), tm.level1_start(w_wide, kappa)
    assert start.shape == (tm.ROWS, 1 << tm.START_BITS) and start.dtype == torch.uint8
    slots = torch.arange(1 << tm.PT).expand(tm.ROWS, -1)  # [ROWS, 2^PT]
    want = torch.searchsorted(cum1, slots.contiguous(), right=True) - 1
    first = slots[:, :: 1 << (tm.PT - tm.START_BITS)]
    assert torch.equal(start.long(), torch.searchsorted(cum1, first.contiguous(), right=True) - 1)
    entry = start.long().repeat_interleave(1 << (tm.PT - tm.START_BITS), dim=1).reshape(-1)  # each slot's bucket
    flat_cum, base, flat_slot = cum1.reshape(-1), (torch.arange(tm.ROWS) * tm.ROW).repeat_interleave(1 << tm.PT), slots.reshape(-1)
    todo = torch.arange(entry.numel())  # the slots still stepping (few after one step)
    for _ in range(1 << (tm.PT - tm.START_BITS)):  # at most the entries starting inside a bucket
        todo = todo[flat_cum[base[todo] + entry[todo] + 1] <= flat_slot[todo]]
        entry[todo] += 1
    assert todo.numel() == 0 and torch.equal(entry.view(tm.ROWS, -1), want)


def magnitude_values(dtype):
    """float64 value of every magnitude pattern [0, 2^15) (inf and NaN patterns: inf)."""
    pats = torch.arange(1 << 15)
    v = pats.to(torch.int16).view(em.TORCH_DTYPES[dtype]).to(torch.float64)
    return torch.where(torch.isfinite(v), v, torch.full_like(v, float("inf")))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("e", [-60, -25, -1, 0, 7, 17, 60])
def test_trunc_magnitude_is_the_largest_magnitude_at_or_below_a_point(dtype, e):
    vals = magnitude_values(dtype)
    n = torch.arange(1 << tm.P2)
    got = tm.trunc_magnitude(n, torch.full_like(n, e), dtype)
    point = n.to(torch.float64) * 2.0 ** (e - tm.TS - tm.P2)
    want = torch.searchsorted(vals, point, right=True) - 1  # magnitudes increase with the pattern
    assert torch.equal(got, want.clamp(max=int(torch.isfinite(vals).sum()) - 1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("e", [-60, -25, -1, 0, 7, 17, 60])
def test_cells_in_floats(dtype, e):
    """Every finite key's cell, offset bits and zero-cell points against float64 arithmetic:
    m = floor(x / u) (-1 - floor(|x| / u) for negative patterns); off zero, the cell holds
    2^L2 keys whose significand's low L2 bits are the offset; at zero, the points of a
    magnitude are [ceil(v 2^P2 / u), ceil(v' 2^P2 / u)) clipped to 2^P2."""
    keys = torch.arange(1 << 16)
    x = em.bits_from_keys(keys, dtype).to(torch.int16).view(em.TORCH_DTYPES[dtype]).to(torch.float64)
    ee = torch.full_like(keys, e)
    m, sh, sig, finite = tm.cell_of(keys, ee, dtype)
    assert torch.equal(finite, torch.isfinite(x))
    u = 2.0 ** (e - tm.TS)
    neg = torch.signbit(x)
    want_m = torch.where(neg, -1 - torch.floor(x.abs() / u), torch.floor(x / u))
    fin = finite & (want_m.abs() < 2**40)
    assert torch.equal(m[fin], want_m[fin].to(torch.int64))
    off_zero = fin & (m != 0) & (m != -1) & (sh <= 0)
    # the cell's keys: x in [|m'| u, (|m'| + 1) u) is sig 2^ex with sig >> L2 = |m'|
    mag = torch.where(m < 0, -1 - m, m)
    assert torch.equal((sig >> (-sh).clamp(min=0))[off_zero], mag[off_zero])
    zero = fin & ((m == 0) | (m == -1))
    first, cnt = tm.zero_points(keys, ee, dtype)
    vals = magnitude_values(dtype)
    a = x.abs()
    nxt = vals[(em.bits_from_keys(keys, dtype) & 0x7FFF).clamp(max=(1 << 15) - 2) + 1]
    want_first = torch.ceil(a * 2.0**tm.P2 / u)
    want_next = torch.ceil(nxt * 2.0**tm.P2 / u).clamp(max=2**tm.P2)
    assert torch.equal(first[zero], want_first[zero].to(torch.int64))
    assert torch.equal((first + cnt)[zero], want_next[zero].to(torch.int64))


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_key_codable_and_probabilities_sum_to_at_most_one(dtype):
    """For a few (mu, sigma), hostile ones included, all 2^16 keys: freq >= 1, cum + freq
    within the scale, and the probabilities of all keys sum to <= 1 (a code)."""
    params = [(0.0, 1.0), (3.5, 0.01), (-1e-3, 2e-5), (60000.0, 1.0), (float("nan"), float("inf")), (1e30, 0.0), (0.0, 1e-30)]
    keys = torch.arange(1 << 16)
    for mu, sigma in params:
        mu_q, e, r = em.quantize_params(torch.tensor([mu]), torch.tensor([sigma]))
        cum, freq, scale = tm.symbol_steps(keys, mu_q, e, r, dtype, 13, 3)
        assert bool((freq >= 1).all()) and bool((cum >= 0).all()) and bool((cum + freq <= 1 << scale).all())
        p = torch.exp2(-(scale - torch.log2(freq.to(torch.float64))).sum(-1))
        assert float(p.sum()) <= 1 + 1e-12, (mu, sigma, float(p.sum()))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_means_enough_keys_per_cell(dtype):
    """dense() against a float count of the dtype's keys in a cell (u = 2^(e - TS)) at
    |mu| + 2 sigma: at least 2^DENSE_LOG keys per cell, or not dense (away from the edge
    case where the count is exactly a power of two)."""
    g = torch.Generator().manual_seed(3)
    mu = torch.randn(20000, generator=g) * 10.0 ** torch.randint(-6, 6, (20000,), generator=g)
    sigma = torch.rand(20000, generator=g) * 10.0 ** torch.randint(-8, 4, (20000,), generator=g) + 1e-30
    mu_q, e, r = em.quantize_params(mu, sigma)
    _, mbits, bias, _ = em.DTYPE_SPECS[dtype]
    edge = (mu_q.abs().double() + r.double() * 2.0 ** (em.F - em.R + 1)) * 2.0 ** (e - em.F).double()
    spacing = 2.0 ** (torch.floor(torch.log2(edge)).clamp(min=1 - bias) - mbits)
    keys_per_cell = 2.0 ** (e - tm.TS).double() / spacing
    got = tm.dense(mu_q, e, r, dtype)
    clear = (torch.log2(keys_per_cell) - tm.DENSE_LOG).abs() > 1e-9
    assert torch.equal(got[clear], (keys_per_cell >= 2**tm.DENSE_LOG)[clear])
    assert 0.2 < float(got.float().mean()) < 0.8


def hostile_page(num_pages, n, dtype, seed):
    """Gaussian values around (mu, sigma), plus every kind of pattern and parameter the coder
    must survive: random patterns (NaN payloads, inf, -0, subnormals), values far out (escapes),
    garbage (mu, sigma)."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(num_pages, n, generator=g) * 4
    sigma = torch.rand(num_pages, n, generator=g) + 0.01
    bits = (mu + sigma * torch.randn(num_pages, n, generator=g)).to(em.TORCH_DTYPES[dtype]).view(torch.int16)
    bits[:, ::7] = torch.randint(-(1 << 15), 1 << 15, bits[:, ::7].shape, generator=g, dtype=torch.int16)
    bits[:, 1::11] = torch.tensor([0x0000, -0x8000, 0x7F80, -0x80, 0x0001, -0x7FFF, 0x7FC1, 0x7BFF], dtype=torch.int16).repeat(n)[: bits[:, 1::11].shape[1]]
    sigma[:, 2::13] = torch.tensor([0.0, float("nan"), float("inf"), -1.0, 1e-45, 3e38, 1e-30]).repeat(n)[: sigma[:, 2::13].shape[1]]
    mu[:, 3::17] = torch.tensor([float("nan"), float("inf"), float("-inf"), 1e38, -7e4]).repeat(n)[: mu[:, 3::17].shape[1]]
    return bits, mu, sigma


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_pages,n,num_lanes", [(1, 1, 1), (2, 777, 5), (3, 3000, 64)])
def test_reference_round_trip_every_pattern(dtype, num_pages, n, num_lanes):
    bits, mu, sigma = hostile_page(num_pages, n, dtype, seed=n)
    words, lane_words = rr.encode_values(bits, mu, sigma, dtype, num_lanes, model=tm.MODEL_TABLE)
    dec = rr.Decoder(words, lane_words, n, dtype, model=tm.MODEL_TABLE)
    out = torch.zeros_like(bits)
    cut = n // 3 + 1  # two stages, cut mid-step
    dec.decode_values(mu[:, :cut].contiguous(), sigma[:, :cut].contiguous(), out)
    dec.decode_values(mu[:, cut:].contiguous(), sigma[:, cut:].contiguous(), out)
    assert bool(dec.finish().all()) and torch.equal(out, bits)


def test_table_model_is_not_the_exact_model_and_is_pinned():
    """The two models give different streams; the table model's stream of a fixed page is
    pinned (a change to any table, map or step order changes it: a new blob version)."""
    bits, mu, sigma = hostile_page(1, 2000, "bf16", seed=5)
    dense = tm.dense(*em.quantize_params(mu, sigma), "bf16")
    assert 0.5 < float(dense.float().mean()) < 1  # both regimes are pinned
    exact, _ = rr.encode_values(bits, mu, sigma, "bf16", 8)
    table, lane_words = rr.encode_values(bits, mu, sigma, "bf16", 8, model=tm.MODEL_TABLE)
    assert not torch.equal(exact, table)
    digest = xxhash.xxh64_hexdigest(table.numpy().tobytes() + lane_words.numpy().tobytes())
    assert digest == GOLDEN_TABLE_STREAM, digest


GOLDEN_TABLE_STREAM = "ba41ddedf92b339d"


def test_corrupt_table_streams_fail_finish():
    """As for the exact model (test_rans_reference): a flipped bit fails finish() or
    decodes to other symbols (the codec's page hash catches those); never a crash, and the
    other page is untouched."""
    bits, mu, sigma = hostile_page(2, 1500, "bf16", seed=9)
    words, lane_words = rr.encode_values(bits, mu, sigma, "bf16", 32, model=tm.MODEL_TABLE)
    g = torch.Generator().manual_seed(0)
    flagged = 0
    for _ in range(12):
        bad = words.clone()
        i = int(torch.randint(0, int(lane_words[0].sum()), (1,), generator=g))  # in page 0's streams
        bad[i] ^= 1 << int(torch.randint(0, 32, (1,), generator=g))
        dec = rr.Decoder(bad, lane_words, 1500, "bf16", model=tm.MODEL_TABLE)
        out = torch.zeros_like(bits)
        dec.decode_values(mu, sigma, out)
        ok = dec.finish()
        assert bool(ok[1]) and torch.equal(out[1], bits[1])
        assert not bool(ok[0]) or not torch.equal(out[0], bits[0])
        flagged += not bool(ok[0])
    # Offsets are raw bits: a flip that lands only in them leaves the states consistent and
    # changes symbols (the page hash's job), so fewer flips fail finish() than under T1's points.
    assert flagged >= 5


def test_model_argument_errors():
    bits, mu, sigma = hostile_page(1, 10, "bf16", seed=1)
    with pytest.raises(ValueError, match="unknown entropy model"):
        rr.encode_values(bits, mu, sigma, "bf16", 1, model="tables")
    with pytest.raises(ValueError, match="16-bit"):
        rr.encode_values(bits.to(torch.uint8), mu, sigma, "fp8_e4m3", 1, model=tm.MODEL_TABLE)
    with pytest.raises(ValueError, match="16-bit"):
        rr.Decoder(torch.zeros(2, dtype=torch.int32), torch.tensor([[2]]), 1, "fp8_e5m2", model=tm.MODEL_TABLE)
