"""Table-model study (issue #10): what would context-quantised CDF tables cost in bits on
real KV, against today's exact per-scalar model (kernels/entropy_model.py)?

Ideal code lengths only (no coder): every table is built as the integer table a kernel would
ship (probabilities out of 2^PT, at least 1 per entry) and each symbol's bits are read off it.

    PYTHONPATH=. python examples/table_model_study.py      # ~5-10 min on 2 cores

Data: SmolLM2-135M (speckv prepare-model) on tests/data/text/heldout.txt (--tokens), KV as
bf16 and as fp8_e4m3 (per-layer absmax scales fitted on the calibration text); predictors
page_stats (64-token pages, as bench_frontier) and `context`, calibrated here on
--calib-tokens of calibration.txt (calibrate.calibrate, context only).

Variants (sigma_q = r 2^(e-R) and mu_q from entropy_model.quantize_params):
  A  value lattice anchored at mu: u = 2^(e-S) (sigma/u in [2^S, 2^(S+1))), cell
     j = floor((x - mu)/u) in [-J, J) else escape; level 1: cell table per sigma bucket (top
     Bs bits of r); level 2: the key inside its cell, uniform in value on a grid of 2^P2
     steps per cell (each step belongs to the key nearest to it; a key with no step escapes).
  B  key offsets d = key - key(nearest(mu)) in [-D, D] else escape; table per (quarter-octave
     bucket of sigma/ulp(mu), quarter of mu's position between its neighbouring keys), built on
     a canonical evenly spaced grid (binade crossings ignored; "B, true grid" puts the same
     bucketed Gaussian on the real keys to price that).
  C  hybrid: A where sigma >= 2^S ulp(mu), else B (tables of both ship).
  A-geo       A with cells 8u wide beyond +-FINE sigmas (few entries for the wide tail).
  C-bound     C with "B, true grid": per symbol, not a table; what format-aware key tables
              could reach at best.
  A-adaptive  (this study's proposal) per symbol S = clamp(floor(log2(sigma / ulp at
              |mu| + 2 sigma)) - guard, 0, s_max) with A-geo's tables, B where sigma < ulp(mu);
              its second row shapes level 2 by the mixture over 2^l2 sub-cells per cell
              (a table per cell) instead of uniform in value.
  T2          (docs/DESIGN.md "The table model") cells aligned to multiples of u,
              rows per (sigma bucket, mu's position in its cell), level 2 = L2 raw bits off
              zero and points in the two cells at zero, the dense rule (--t2-dense) else
              the exact model; its "A share" column is the share the table codes.
Escapes: the escape entry, then today's exact model ("esc exact") or B raw bits ("esc raw").
The rows of one (dtype, predictor) see the same --scalars random held-out scalars.
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path

import torch

from sglang_speckv.kernels import entropy_model as em
from sglang_speckv.tools import bench_frontier as bf
from sglang_speckv.tools import calibrate as cal
from sglang_speckv.tools import dump_kv

TEXT = Path(__file__).resolve().parents[1] / "tests" / "data" / "text"
CHUNK = 1 << 21  # scalars per evaluation chunk (bounds the int64 temporaries)


# ---- the data ------------------------------------------------------------------------------


def real_kv(args) -> dict:
    """{(dtype, predictor): (stored [N], mu [N], sigma [N] float32, w_wide, kappa)}, the
    held-out KV flattened."""
    from sglang_speckv.predictors.base import PageMeta
    from sglang_speckv.predictors.linear import LinearGaussianPredictor
    from sglang_speckv.predictors.page_stats import PageStatsPredictor
    from sglang_speckv.tools.prepare_model import prepare_model

    model, tok = dump_kv.load_model(prepare_model())
    layout, identity = dump_kv.kv_layout(model), dump_kv.model_identity(model)
    ids_cal = dump_kv.tokenize(tok, dump_kv.read_texts([TEXT / "calibration.txt"]), args.calib_tokens)
    ids_held = dump_kv.tokenize(tok, dump_kv.read_texts([TEXT / "heldout.txt"]), args.tokens)
    seq = args.calib_tokens // 4
    cal_kv = [cal.to_pages(*dump_kv.compute_kv(model, ids_cal[s : s + seq], progress=False)) for s in range(0, len(ids_cal), seq)]
    held_kv = cal.to_pages(*dump_kv.compute_kv(model, ids_held, progress=False))  # bf16 [2, L, T, H, D]
    print(f"KV of {len(ids_cal)} calibration and {len(ids_held)} held-out tokens computed", flush=True)
    out = {}
    for dtype in args.dtypes:
        scale, seqs, held = None, cal_kv, held_kv
        if dtype != "bf16":
            scale = dump_kv.fp8_scales(*[torch.cat([s[i] for s in cal_kv], dim=2).permute(0, 2, 1, 3) for i in (0, 1)])
            quant = lambda p: torch.stack([dump_kv.to_fp8(p[0], scale[0]), dump_kv.to_fp8(p[1], scale[1])])  # noqa: E731
            seqs, held = [quant(s) for s in cal_kv], quant(held_kv)
        calib = cal.calibrate(seqs, model=identity, layout=layout, kv_dtype=dtype, fp8_scale=scale, names=("context",), progress=False)
        pred = LinearGaussianPredictor(calib, "context")
        mu, sigma = bf.predict_page(pred, held)
        out[(dtype, "context")] = (held.reshape(-1), mu.reshape(-1), sigma.reshape(-1), pred.w_wide, pred.kappa)
        ps, mus, sigmas, pages = PageStatsPredictor(), [], [], []
        for start in range(0, held.shape[2] - bf.PAGE_STATS_TOKENS + 1, bf.PAGE_STATS_TOKENS):
            p = held[:, :, start : start + bf.PAGE_STATS_TOKENS].contiguous()
            meta, values = PageMeta(dtype, tuple(p.shape), start), p.to(torch.float32)
            m, s = ps.predict(meta, ps.side_info(values, meta), values, 0)
            pages.append(p.reshape(-1)), mus.append(m), sigmas.append(s)
        out[(dtype, "page_stats")] = (torch.cat(pages), torch.cat(mus), torch.cat(sigmas), em.W_WIDE, em.KAPPA)
        print(f"[{dtype}] context calibrated (mixture {calib.mixture['context']}), predictions made", flush=True)
    return out


# ---- tables (built in float64 once, offline; what a kernel ships is the integer table) --------


def mixture_cdf(z: torch.Tensor, w_wide: int, kappa: int) -> torch.Tensor:
    """The coder's 2-Gaussian mixture (without its uniform floor) at z sigmas, float64."""
    return ((em.W_TOTAL - w_wide) * torch.special.ndtr(z) + w_wide * torch.special.ndtr(z / 2.0**kappa)) / em.W_TOTAL


def quantize_table(p: torch.Tensor, pt: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of probabilities [T, n] -> int64 frequencies max(1, round(p * scale)) (0 where not
    ``valid``), the scale per row the largest (bisection) whose row sums to <= 2^pt; the few
    counts left are given to the row's largest entry, so every row sums to 2^pt."""
    valid = torch.ones_like(p, dtype=torch.bool) if valid is None else valid

    def freqs(scale):
        return torch.where(valid, (p * scale[:, None]).round().clamp_min(1), torch.zeros_like(p)).to(torch.int64)

    lo, hi = torch.zeros(len(p), dtype=torch.float64), torch.full((len(p),), 2.0**pt, dtype=torch.float64)
    for _ in range(60):
        mid = (lo + hi) / 2
        fits = freqs(mid).sum(dim=1) <= (1 << pt)
        lo, hi = torch.where(fits, mid, lo), torch.where(fits, hi, mid)
    f = freqs(lo)
    if (f.sum(dim=1) > (1 << pt)).any():
        raise ValueError(f"more table entries than 2^{pt}: raise --pt")
    return f.scatter_add(1, f.argmax(dim=1, keepdim=True), (1 << pt) - f.sum(dim=1, keepdim=True))


def table_a(edges: torch.Tensor, s: int, bs: int, w_wide: int, kappa: int, pt: int, p2: int, l2: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A's tables for sigma bucket b (sigma/u = 2^s (1 + (b + 1/2) / 2^bs)): level 1 [2^bs,
    cells + 1], the cells [edges[i], edges[i+1]) (units of u, relative to mu) then the escape,
    out of 2^pt; level 2 [2^bs, cells, 2^l2], the cell's 2^l2 equal sub-cells out of 2^p2
    (l2 = 0: uniform in value over the cell)."""
    ratio = 2.0**s * (1 + (torch.arange(1 << bs, dtype=torch.float64) + 0.5) / (1 << bs))
    g = mixture_cdf(edges.to(torch.float64)[None, :] / ratio[:, None], w_wide, kappa)
    cells = g[:, 1:] - g[:, :-1]
    level1 = quantize_table(torch.cat([cells, 1 - cells.sum(dim=1, keepdim=True)], dim=1), pt)
    e = edges.to(torch.float64)
    x = e[:-1, None] + (e[1:] - e[:-1])[:, None] * torch.arange((1 << l2) + 1, dtype=torch.float64) / (1 << l2)
    g = mixture_cdf(x[None] / ratio[:, None, None], w_wide, kappa)  # [2^bs, cells, 2^l2 + 1]
    sub = g[..., 1:] - g[..., :-1]
    total = sub.sum(dim=-1, keepdim=True)
    sub = torch.where(total > 0, sub / total, torch.full_like(sub, 1.0 / (1 << l2)))
    return level1, quantize_table(sub.reshape(-1, 1 << l2), p2).reshape(sub.shape)


# ---- per-symbol quantities -----------------------------------------------------------------


def key_values(dtype: str) -> torch.Tensor:
    """float64 value of every key in key order (NaN keys -> +-inf): non-decreasing."""
    sig, ex, sgn = em.key_fields(dtype, "cpu")
    v = sgn.to(torch.float64) * torch.ldexp(sig.to(torch.float64), ex.clamp(max=200))
    return torch.where(ex == em.SATURATE_EX, sgn * torch.tensor(math.inf, dtype=torch.float64), v)


def symbols(stored, mu, sigma, dtype, w_wide, kappa) -> dict:
    """Everything the variants read, for one chunk of scalars (int64 unless noted)."""
    top = 1 << em.symbol_bits(dtype)
    keys = em.keys_from_bits(em.storage_bits(stored), dtype)
    mu_q, e, r = em.quantize_params(mu, sigma)
    two_mu, off, inv = em.prepare(mu_q, e, r)
    freq = em.cdf_prepared(keys + 1, two_mu, off, inv, dtype, w_wide, kappa) - em.cdf_prepared(keys, two_mu, off, inv, dtype, w_wide, kappa)
    s = dict(keys=keys, mu_q=mu_q, e=e, r=r, exact=em.PROB_BITS - torch.log2(freq.to(torch.float64)))
    for name, k in (("xm", (keys - 1).clamp(0, top - 1)), ("x0", keys), ("xp", (keys + 1).clamp(0, top - 1))):
        s[name] = em.value_units(k, e, dtype) - mu_q  # relative to mu, units of delta = 2^(e - F)
    # B: mu's neighbouring keys on the real grid (finite keys only)
    vals = key_values(dtype)
    finite = torch.isfinite(vals).nonzero().flatten()
    mu_hat = mu_q.to(torch.float64) * em.pow2_f64(e - em.F)  # exact
    lo = (torch.searchsorted(vals, mu_hat, right=True) - 1).clamp(int(finite[0]), int(finite[-1]) - 1)
    v_lo = vals[lo]
    ulp = vals[lo + 1] - v_lo
    frac = ((mu_hat - v_lo) / ulp).clamp(0, 1 - 1e-12)
    s["sigma_hat"] = r.to(torch.float64) * em.pow2_f64(e - em.R)
    s["lb"] = torch.floor(4 * torch.log2(s["sigma_hat"] / ulp)).to(torch.int64).clamp(-1000, 1000)
    s["q"] = (4 * frac).to(torch.int64)
    s["nearest"] = lo + (frac >= 0.5).to(torch.int64)
    s.update(mu_hat=mu_hat, v_lo=v_lo, ulp=ulp, vals=vals)
    # A-adaptive: the key spacing at |mu| + 2 sigma (where A's cells first go empty)
    edge = torch.searchsorted(vals, mu_hat.abs() + 2 * s["sigma_hat"], right=True).clamp(int(finite[0]) + 1, int(finite[-1]))
    s["ulp_edge"] = vals[edge] - vals[edge - 1]
    return s


def bits_a(s: dict, edges: torch.Tensor, sh: int, freq: torch.Tensor, sub: torch.Tensor, bs: int, p2: int, pt: int):
    """(bits without the escape's payload [N] float64, escaped [N] bool) of variant A with cell
    edges (units of u = 2^sh delta, relative to mu) and table_a's tables (freq, sub). Level 2:
    the cell's 2^p2 counts are spread over its sub-cells by ``sub`` and uniformly inside each;
    a key takes the counts of the part of the cell nearer to it than to the cell's other keys."""
    ed = edges << sh  # units of delta
    cells, l2 = len(edges) - 1, sub.shape[-1].bit_length() - 1

    def cell(x):  # cell index of a value (units of delta, relative to mu); -1 or cells: outside
        return torch.searchsorted(ed, x, right=True) - 1

    c = cell(s["x0"])
    inside = (c >= 0) & (c < cells)
    cc = c.clamp(0, cells - 1)
    b = (s["r"] >> (em.R - bs)) - (1 << bs)
    a0, a1 = 2 * ed[cc], 2 * ed[cc + 1]  # the cell in units of delta / 2
    lo = torch.where(cell(s["xm"]) == c, s["xm"] + s["x0"], a0)  # the key's share of the cell
    hi = torch.where(cell(s["xp"]) == c, s["x0"] + s["xp"], a1)
    sub_shift = torch.log2((a1 - a0).to(torch.float64)).round().to(torch.int64) - l2  # sub-cell width 2^shift
    cum = torch.cat([torch.zeros_like(sub[..., :1]), sub.cumsum(dim=-1)], dim=-1)

    def counts_below(y):  # level-2 counts of the cell's first y half-units (integer, exact)
        i = (y >> sub_shift).clamp(0, (1 << l2) - 1)  # (escaped keys: any index, result unused)
        return cum[b, cc, i] + ((sub[b, cc, i] * (y - (i << sub_shift))) >> sub_shift)

    count = counts_below(hi - a0) - counts_below(lo - a0)
    esc = ~inside | (count <= 0)
    coded = pt - torch.log2(freq[b, cc].to(torch.float64)) + p2 - torch.log2(count.clamp_min(1).to(torch.float64))
    return torch.where(esc, pt - torch.log2(freq[b, -1].to(torch.float64)), coded), esc


def bits_b(s: dict, tb: dict, pt: int, true_grid: bool = False):
    """(bits without the escape's payload, escaped) of variant B: tables tb (see tables_b);
    ``true_grid``: the same bucketed (mu, sigma) put on the real keys instead (per symbol)."""
    lbc = s["lb"].clamp(tb["lb0"], tb["lb1"] - 1)
    idx = (lbc - tb["lb0"]) * 4 + s["q"]
    dmax, dl = tb["dmax"], tb["d"][idx]
    d = s["keys"] - s["nearest"]
    esc = d.abs() > dl
    if not true_grid:
        f = tb["freq"][idx, (d + dmax).clamp(0, 2 * dmax)].to(torch.float64)
        return torch.where(esc, pt - torch.log2(tb["freq"][idx, -1].to(torch.float64)), pt - torch.log2(f)), esc
    vals, top = s["vals"], len(s["vals"]) - 1
    sig = 2.0 ** ((lbc.to(torch.float64) + 0.5) / 4) * s["ulp"]
    mu = s["v_lo"] + (s["q"].to(torch.float64) + 0.5) / 4 * s["ulp"]
    w_wide, kappa = tb["mix"]

    def boundary(k):  # value boundary below key k (midpoint to k - 1), as a CDF
        lo, hi = vals[(k - 1).clamp(0, top)], vals[k.clamp(0, top)]
        return mixture_cdf(((lo + hi) / 2 - mu) / sig, w_wide, kappa)

    p = boundary(s["keys"] + 1) - boundary(s["keys"])
    p_esc = 1 - (boundary(s["nearest"] + dl + 1) - boundary(s["nearest"] - dl))
    floor = 2.0**-pt  # each of the 2 D + 2 entries gets >= 2^-pt, and they still sum to 1
    keep = 1 - (2 * dl + 2).to(torch.float64) * floor
    return torch.where(esc, -torch.log2(keep * p_esc + floor), -torch.log2(keep * p + floor)), esc


def tables_b(w_wide: int, kappa: int, window: float, pt: int, lb0: int = -16, lb1: int = 16) -> dict:
    """B's tables for sigma/ulp buckets lb in [lb0, lb1) (quarter octaves, sigma/ulp taken as
    2^((lb + 1/2) / 4); clamped outside) x 4 quarters of mu's position between its keys; key
    offsets on the canonical grid (keys 1 ulp apart) within +-D = ceil(window 2^((lb + 1) / 4))."""
    lb = torch.arange(lb0, lb1).repeat_interleave(4)
    t = (torch.arange(4).repeat(lb1 - lb0).to(torch.float64) + 0.5) / 4  # mu, ulps above its lower key
    off = torch.where(t < 0.5, t, t - 1)  # mu relative to its nearest key, in ulps
    d = torch.ceil(window * 2.0 ** ((lb.to(torch.float64) + 1) / 4)).to(torch.int64)
    dmax = int(d.max())
    ratio = 2.0 ** ((lb.to(torch.float64) + 0.5) / 4)  # the bucket's sigma/ulp
    edges = torch.arange(-dmax, dmax + 2, dtype=torch.float64) - 0.5  # key boundaries, canonical grid
    g = mixture_cdf((edges[None, :] - off[:, None]) / ratio[:, None], w_wide, kappa)
    cells = g[:, 1:] - g[:, :-1]
    valid = torch.arange(-dmax, dmax + 1).abs()[None, :] <= d[:, None]
    cells = torch.where(valid, cells, torch.zeros_like(cells))
    p = torch.cat([cells, (1 - cells.sum(dim=1)).clamp_min(0)[:, None]], dim=1)
    freq = quantize_table(p, pt, torch.cat([valid, torch.ones_like(valid[:, :1])], dim=1))
    return dict(freq=freq, d=d, dmax=dmax, lb0=lb0, lb1=lb1, mix=(w_wide, kappa), lb=lb)


def b_bytes(tb: dict, lb1: int) -> tuple[int, int]:
    """(tables, bytes as 16-bit CDF entries) of B's tables with lb < lb1."""
    used = tb["lb"] < lb1
    return int(used.sum()), int(((2 * tb["d"][used] + 2) * 2).sum())


def empty_mass(s: dict, sub: torch.Tensor, edges: torch.Tensor, s_bits: int, freq: torch.Tensor, bs: int, pt: int) -> float:
    """Mean level-1 probability of cells holding no key, over the symbols ``sub``."""
    u = em.pow2_f64(s["e"][sub] - s_bits)[:, None]
    bounds = s["mu_hat"][sub][:, None] + edges.to(torch.float64)[None, :] * u  # [n, cells + 1]
    count = torch.searchsorted(s["vals"], bounds.contiguous())
    empty = (count[:, 1:] - count[:, :-1]) == 0
    b = (s["r"][sub] >> (em.R - bs)) - (1 << bs)
    return float((freq[b, :-1].to(torch.float64) * empty).sum(dim=1).mean()) / 2**pt


# ---- the study ------------------------------------------------------------------------------


def geo_edges(s_bits: int, fine: int, window: int, coarse: int = 8) -> torch.Tensor:
    """A-geo cells (units of u): width 1 within +-fine sigmas, `coarse` out to +-window sigmas
    (sigma < 2^(s+1) u; both ends rounded to multiples of `coarse`)."""
    jf, jw = fine << (s_bits + 1), window << (s_bits + 1)
    jf, jw = -(-jf // coarse) * coarse, -(-jw // coarse) * coarse
    return torch.cat([torch.arange(-jw, -jf, coarse), torch.arange(-jf, jf), torch.arange(jf, jw + 1, coarse)])


def tables_t2(w_wide: int, kappa: int, pt: int, ts: int, tb: int, tj: int, fb: int) -> torch.Tensor:
    """T2's level-1 rows, int64 [2^tb, 2^fb, 2 tj + 2]: for sigma bucket b and mu's position
    in its cell (bucket f of frac(mu / u), centre (f + 1/2) / 2^fb), cells c in [-tj, tj) of
    the absolute lattice (cell floor(mu / u) + c), then the escape; built in integers from the
    coder's own mixture (entropy_model.phi), each entry >= 1 (as the coder would ship it)."""
    b = torch.arange(1 << tb, dtype=torch.int64)[:, None, None]
    f = torch.arange(1 << fb, dtype=torch.int64)[None, :, None]
    c = torch.arange(-tj, tj + 1, dtype=torch.int64)[None, None, :]
    # the edge c - (f + 1/2) / 2^fb (units of u) over the bucket's centre sigma / u, in units of sigma / 2^T_BITS
    num = ((c << (fb + 1)) - 2 * f - 1) << (em.T_BITS + tb + 1 - ts)
    t = torch.div(num, ((1 << (tb + 1)) + 2 * b + 1) << (fb + 1), rounding_mode="floor")
    phi = em.phi_table()
    g = (em.W_TOTAL - w_wide) * em.phi(t, phi) + w_wide * em.phi(t >> kappa, phi)
    i = torch.arange(2 * tj + 1, dtype=torch.int64)
    cum = i + (((g - g[..., :1]) * ((1 << pt) - 2 * tj - 1)) >> 32)
    return torch.cat([cum, torch.full((1 << tb, 1 << fb, 1), 1 << pt, dtype=torch.int64)], dim=-1)


def bits_t2(s: dict, dtype: str, cum1: torch.Tensor, args, dense_log: int):
    """(bits without the escape's payload, escaped, regime) of T2, the aligned lattice of
    docs/DESIGN.md "The table model": level 1 = the key's absolute cell (rows by
    sigma bucket and mu's position in its cell); level 2 = L2 = log2(u / ulp) raw bits in a
    cell off zero, or, in the two cells at zero (magnitude < u), the key's share of 2^P2
    points (first points of a magnitude are ceil(|value| 2^P2 / u)). Escape (level-1 ESC, then
    the exact model): inf / NaN, cells beyond +-tj, cells narrower than the key spacing, zero-
    cell keys without a point. Symbols that are not dense (fewer than 2^dense_log keys per
    cell at |mu| + 2 sigma): the exact model alone (regime -1)."""
    ts, tb, tj, fb, p2 = args.t2_ts, 3, 64, args.t2_fb, args.p2
    keys, mu_q, e, r = s["keys"], s["mu_q"], s["e"], s["r"]
    nbits, mbits, bias, _ = em.DTYPE_SPECS[dtype]
    sig_t, ex_t, sgn_t = em.key_fields(dtype, "cpu")
    sig, ex, sgn = em.lookup(sig_t, keys), em.lookup(ex_t, keys), em.lookup(sgn_t, keys)
    finite = ex != em.SATURATE_EX
    sh = ex - (e - ts)  # the key's ulp over u, as a power of two
    mag_u = torch.where(sh >= 0, sig << sh.clamp(0, 40), sig >> (-sh).clamp(0, 62))  # floor(|value| / u)
    m = torch.where(sgn < 0, -1 - mag_u, mag_u)
    c = m - (mu_q >> (em.F - ts))
    frac = (mu_q >> (em.F - ts - fb)) & ((1 << fb) - 1)
    b = (r >> (em.R - tb)) - (1 << tb)
    flat = cum1.reshape(-1)
    row = (b * (1 << fb) + frac) * cum1.shape[-1]  # where the symbol's row starts in flat
    idx = row + (c + tj).clamp(0, 2 * tj)
    f1 = em.lookup(flat, idx + 1) - em.lookup(flat, idx)
    f_esc = (1 << args.pt) - em.lookup(flat, row + 2 * tj)
    # level 2
    raw = (-sh).clamp(min=0).to(torch.float64)  # L2 raw bits in a cell off zero
    # zero cells: the key's points (magnitude pattern + 1 = the next larger magnitude)
    mag_pat = em.bits_from_keys(keys, dtype) & ((1 << (nbits - 1)) - 1)
    nxt = em.keys_from_bits((mag_pat + 1).clamp(max=(1 << (nbits - 1)) - 1), dtype)
    sig2, ex2 = em.lookup(sig_t, nxt), em.lookup(ex_t, nxt)

    def first(sg, x):  # ceil(sg 2^x / w), w = u / 2^p2
        k = x - (e - ts - p2)
        return torch.where(k >= 0, sg << k.clamp(0, 40), -((-sg) >> (-k).clamp(0, 62)))

    cnt = first(sig2, ex2) - first(sig, ex)
    zero = mag_u == 0
    esc = ~finite | (c < -tj) | (c >= tj) | (sh > 0) | (zero & (cnt <= 0))
    bits2 = torch.where(zero, p2 - torch.log2(cnt.clamp(min=1).to(torch.float64)), raw)
    coded = args.pt - torch.log2(f1.clamp(min=1).to(torch.float64)) + bits2
    escaped = args.pt - torch.log2(f_esc.to(torch.float64))
    v = mu_q.abs() + (r << (em.F - em.R + 1))  # the dense rule of T1 (table_model.dense)
    lv = torch.frexp(v.to(torch.float64))[1].to(torch.int64) - 1
    dense = torch.maximum(lv, (1 - bias) + em.F - e) - mbits <= em.F - ts - dense_log
    bits = torch.where(dense, torch.where(esc, escaped, coded), s["exact"])
    return bits, dense & esc, torch.where(dense, torch.zeros_like(keys), torch.full_like(keys, -1))


def variants(args, w_wide: int, kappa: int) -> list[dict]:
    """Every variant's tables and description, for one mixture."""
    out, pt = [], args.pt
    tb = tables_b(w_wide, kappa, args.window, pt, lb1=args.b_lb1)
    n, nbytes = b_bytes(tb, tb["lb1"])
    out.append(dict(name=f"B alone (sigma/ulp >= 2^{args.b_lb1 / 4:g} clamped)", kind="B", tb=tb, tables=(n, nbytes)))
    out.append(dict(name="B, true grid (binade crossings priced)", kind="Btrue", tb=tb, tables=None))

    def a_variant(s_bits, bs, geo, l2=0):
        j = args.window << (s_bits + 1)
        edges = geo_edges(s_bits, args.fine, args.window_geo) if geo else torch.arange(-j, j + 1)
        freq, sub = table_a(edges, s_bits, bs, w_wide, kappa, pt, args.p2, l2)
        label = f"{'A-geo' if geo else 'A'} S={s_bits} Bs={bs}"
        nbytes = 2 * (freq.numel() + (sub.numel() if l2 else 0))  # 16-bit entries
        return dict(name=label, kind="A", edges=edges, s=s_bits, bs=bs, freq=freq, sub=sub, tables=((1 << bs) * (2 if l2 else 1), nbytes))

    for s_bits in args.s:
        for bs in args.bs if s_bits in (2, 3, 4) else [args.bs_c]:
            a = a_variant(s_bits, bs, geo=False)
            out.append(a)
            if bs == args.bs_c:
                n, nbytes = b_bytes(tb, 4 * s_bits)
                out.append(dict(a, name=f"C = {a['name']} + B", kind="C", tables=(a["tables"][0] + n, a["tables"][1] + nbytes)))
    for s_bits in args.s_geo:
        a = a_variant(s_bits, args.bs_c, geo=True)
        n, nbytes = b_bytes(tb, 4 * s_bits)
        out += [a, dict(a, name=f"C = {a['name']} + B", kind="C", tables=(a["tables"][0] + n, a["tables"][1] + nbytes)),
                dict(a, name=f"C-bound = {a['name']} + B true grid", kind="Ctrue", tables=None)]
    n, nbytes = b_bytes(tb, 0)
    for l2 in (0, args.l2):
        parts = [a_variant(s_bits, args.bs_c, geo=True, l2=l2) for s_bits in range(args.s_max + 1)]
        out.append(dict(name=f"A-adaptive (new), guard {args.guard}, S <= {args.s_max}" + (f", level 2 in {1 << l2} sub-cells" if l2 else ""),
                        kind="Aad", parts=parts, tables=(sum(a["tables"][0] for a in parts) + n, sum(a["tables"][1] for a in parts) + nbytes)))
    cum1 = tables_t2(w_wide, kappa, pt, args.t2_ts, 3, 64, args.t2_fb)
    for dense_log in args.t2_dense:
        out.append(dict(name=f"T2 aligned (proposal), TS={args.t2_ts}, 8 x {1 << args.t2_fb} rows, dense >= {1 << dense_log} keys/cell",
                        kind="T2", cum1=cum1, dense_log=dense_log, tables=(cum1.shape[0] * cum1.shape[1], 2 * cum1.numel())))
    return out


def variant_bits(s: dict, v: dict, args, plain_b, true_b):
    """(bits without the escape's payload, escaped, regime) of variant v on symbols s; regime
    [N]: the S of the A tables that coded the symbol, -1 where B did."""
    minus_one = torch.full_like(s["keys"], -1)
    if v["kind"] == "T2":
        return bits_t2(s, args.dtype_now, v["cum1"], args, v["dense_log"])
    if v["kind"] in ("B", "Btrue"):
        return (*(plain_b if v["kind"] == "B" else true_b), minus_one)
    if v["kind"] == "Aad":
        t = torch.floor(torch.log2(s["sigma_hat"] / s["ulp_edge"])).to(torch.int64) - args.guard
        regime = torch.where(s["sigma_hat"] < s["ulp"], minus_one, t.clamp(0, len(v["parts"]) - 1))
        bits, esc = plain_b
        for part in v["parts"]:
            pb, pe = bits_a(s, part["edges"], em.F - part["s"], part["freq"], part["sub"], part["bs"], args.p2, args.pt)
            mine = regime == part["s"]
            bits, esc = torch.where(mine, pb, bits), torch.where(mine, pe, esc)
        return bits, esc, regime
    bits, esc = bits_a(s, v["edges"], em.F - v["s"], v["freq"], v["sub"], v["bs"], args.p2, args.pt)
    regime = torch.full_like(minus_one, v["s"])
    if v["kind"] in ("C", "Ctrue"):
        use_a = s["sigma_hat"] >= 2.0 ** v["s"] * s["ulp"]
        b = plain_b if v["kind"] == "C" else true_b
        bits, esc, regime = torch.where(use_a, bits, b[0]), torch.where(use_a, esc, b[1]), torch.where(use_a, regime, minus_one)
    return bits, esc, regime


def evaluate(data, dtype: str, args, variants_) -> dict:
    """{variant name: mean bits/scalar with either escape payload, escape rate, A's share,
    empty-cell mass, A-adaptive's split by regime} over all scalars of one (dtype, predictor)."""
    stored, mu, sigma, w_wide, kappa = data
    raw, n = em.symbol_bits(dtype), len(stored)
    acc = {v: dict(exact=0.0, raw=0.0, esc=0, a=0, empty=[], split={}) for v in ["EXACT"] + [v["name"] for v in variants_]}
    tb = next(v["tb"] for v in variants_ if v["kind"] == "B")
    for start in range(0, n, CHUNK):
        s = symbols(*(t[start : start + CHUNK] for t in (stored, mu, sigma)), dtype, w_wide, kappa)
        sub = torch.arange(0, len(s["keys"]), max(1, n // args.empty_sample))  # for empty_mass
        acc["EXACT"]["exact"] += float(s["exact"].sum())
        acc["EXACT"]["raw"] += float(s["exact"].sum())
        plain_b, true_b = bits_b(s, tb, args.pt), bits_b(s, tb, args.pt, true_grid=True)
        for v in variants_:
            a = acc[v["name"]]
            bits, esc, regime = variant_bits(s, v, args, plain_b, true_b)
            total = bits + torch.where(esc, s["exact"], torch.zeros_like(bits))
            for part in v.get("parts", [v] if "edges" in v else []):  # A tables: their empty cells
                sub_a = sub[regime[sub] == part["s"]]
                if len(sub_a):  # weighted by the number of symbols sampled
                    a["empty"].append((empty_mass(s, sub_a, part["edges"], part["s"], part["freq"], part["bs"], args.pt) * len(sub_a), len(sub_a)))
            if v["kind"] == "Aad":  # regime -> [symbols, bits over EXACT]
                for r in [-1] + [part["s"] for part in v["parts"]]:
                    mine, key = regime == r, "B" if r < 0 else f"S={r}"
                    old = a["split"].get(key, [0, 0.0])
                    a["split"][key] = [old[0] + int(mine.sum()), old[1] + float((total - s["exact"])[mine].sum())]
            a["a"] += int((regime >= 0).sum())
            a["exact"] += float(total.sum())
            a["raw"] += float((bits + raw * esc).sum())
            a["esc"] += int(esc.sum())
        print(f"  [{dtype}] {min(start + CHUNK, n)}/{n} scalars", flush=True)
    for a in acc.values():
        w = sum(c for _, c in a["empty"])
        a.update(exact=a["exact"] / n, raw=a["raw"] / n, esc=a["esc"] / n, a=a["a"] / n,
                 empty=sum(m for m, _ in a["empty"]) / w if w else None)
    return acc


def kraft_check(data, dtype: str, args, variants_, symbols_: int = 4) -> float:
    """For a few of the scalars' (mu, sigma): every variant's sum over ALL keys of 2^-bits
    (escapes included) must be <= 1, i.e. its tables are a code. Returns the smallest sum."""
    _, mu, sigma, w_wide, kappa = data
    nk = 1 << em.symbol_bits(dtype)
    pick = torch.randperm(len(mu), generator=torch.Generator().manual_seed(1))[:symbols_]
    keys = torch.arange(nk).repeat(symbols_)
    pattern = em.bits_from_keys(keys, dtype)
    stored = pattern.to(torch.uint8).view(torch.float8_e4m3fn) if nk == 256 else pattern.to(torch.int16).view(torch.bfloat16)
    s = symbols(stored, mu[pick].repeat_interleave(nk), sigma[pick].repeat_interleave(nk), dtype, w_wide, kappa)
    tb = next(v["tb"] for v in variants_ if v["kind"] == "B")
    plain_b, true_b = bits_b(s, tb, args.pt), bits_b(s, tb, args.pt, true_grid=True)
    low = 1.0
    for v in [dict(name="EXACT", kind="EXACT")] + variants_:
        if v["kind"] == "EXACT":
            total = s["exact"]
        else:
            bits, esc, _ = variant_bits(s, v, args, plain_b, true_b)
            total = bits + torch.where(esc, s["exact"], torch.zeros_like(bits))
        kraft = torch.exp2(-total).view(symbols_, nk).sum(dim=1)
        if float(kraft.max()) > 1 + 1e-9:
            raise AssertionError(f"{v['name']}: sum of 2^-bits over all keys is {float(kraft.max())} > 1")
        low = min(low, float(kraft.min()))
    return low


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1024, help="held-out tokens")
    ap.add_argument("--calib-tokens", type=int, default=2048, help="calibration tokens for `context` (4 sequences)")
    ap.add_argument("--scalars", type=int, default=3_000_000, help="random held-out scalars evaluated per row")
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp8_e4m3"])
    ap.add_argument("--pt", type=int, default=15, help="table probability bits")
    ap.add_argument("--p2", type=int, default=16, help="A's level-2 grid bits per cell")
    ap.add_argument("--s", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="A's lattice: sigma/u in [2^S, 2^(S+1))")
    ap.add_argument("--bs", type=int, nargs="+", default=[2, 3, 4], help="A's sigma-bucket bits (S in 2..4; others: --bs-c)")
    ap.add_argument("--bs-c", type=int, default=3, help="Bs of the hybrids C, A-geo and A-adaptive")
    ap.add_argument("--s-geo", type=int, nargs="*", default=[1, 2], help="S of the A-geo rows")
    ap.add_argument("--guard", type=int, default=1, help="A-adaptive: S = log2(sigma / ulp(abs(mu) + 2 sigma)) - guard")
    ap.add_argument("--l2", type=int, default=2, help="A-adaptive's second row: level 2 shaped over 2^l2 sub-cells per cell")
    ap.add_argument("--s-max", type=int, default=2, help="A-adaptive's largest S")
    ap.add_argument("--window", type=int, default=16, help="A and B cover +-window sigmas (A: J = window 2^(S+1))")
    ap.add_argument("--b-lb1", type=int, default=16, help="B's tables cover sigma/ulp up to 2^(b_lb1 / 4) (clamped above)")
    ap.add_argument("--fine", type=int, default=6, help="A-geo: cells of width u within +-fine sigmas")
    ap.add_argument("--window-geo", type=int, default=32, help="A-geo: cells of 8u out to +-window-geo sigmas")
    ap.add_argument("--empty-sample", type=int, default=2000, help="symbols sampled for the empty-cell mass")
    ap.add_argument("--t2-ts", type=int, default=1, help="T2's lattice: u = 2^(e - TS)")
    ap.add_argument("--t2-fb", type=int, default=4, help="T2's rows per sigma bucket: 2^fb positions of mu in its cell")
    ap.add_argument("--t2-dense", type=int, nargs="+", default=[3, 0], help="T2's dense rule(s): >= 2^d keys per cell")
    ap.add_argument("--cache", help="torch file holding the KV and predictions (made if missing)")
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    if args.cache and Path(args.cache).exists():
        data = torch.load(args.cache)
    else:
        data = real_kv(args)
        if args.cache:
            torch.save(data, args.cache)
    rows, notes = [], []
    for (dtype, pred), d in data.items():
        args.dtype_now = dtype  # T2 reads the key fields of the dtype
        if args.scalars < len(d[0]):  # a random subset of the scalars, the same for every row
            keep = torch.randperm(len(d[0]), generator=torch.Generator().manual_seed(0))[: args.scalars].sort().values
            d = (d[0][keep], d[1][keep], d[2][keep], d[3], d[4])
        vs = variants(args, d[3], d[4])
        low = kraft_check(d, dtype, args, vs)
        print(f"  [{dtype}, {pred}] Kraft check: every variant's 2^-bits over all keys sums to <= 1 (smallest sum {low:.3f})", flush=True)
        acc = evaluate(d, dtype, args, vs)
        base = acc["EXACT"]["exact"]
        for v in [dict(name="EXACT", kind="", tables=None)] + vs:
            a = acc[v["name"]]
            tables = "" if v["kind"] == "" else "per symbol" if v["tables"] is None else f"{v['tables'][0]} = {v['tables'][1] / 1024:.1f} KiB"
            empty = "" if a["empty"] is None else f"{100 * a['empty']:.3f}%"
            share = f"{100 * a['a']:.1f}%" if v["kind"] in ("C", "Ctrue", "Aad", "T2") else ""
            rows.append(f"| {dtype} | {pred} (w {d[3]}, k {d[4]}) | {v['name']} | {a['exact']:.4f} | {100 * (a['exact'] / base - 1):+.2f}% | "
                        f"{a['raw']:.4f} | {100 * a['esc']:.3f}% | {empty} | {share} | {tables} |")
        for v in (v for v in vs if v["kind"] == "Aad"):  # regime: (share of symbols, bits over EXACT per symbol of the regime)
            notes.append(f"- {dtype}, {pred}, {v['name']}: " + ", ".join(
                f"{k} {100 * c / len(d[0]):.1f}% {x / max(c, 1):+.4f}" for k, (c, x) in acc[v["name"]]["split"].items()))
        print(f"[{dtype}, {pred}] done at {time.perf_counter() - t0:.0f} s", flush=True)
    n = min(args.scalars, len(next(iter(data.values()))[0]))
    print(f"\nSmolLM2-135M KV, {n} random scalars per row of {args.tokens} held-out tokens; ideal code lengths, PT={args.pt}, "
          f"P2={args.p2}, window +-{args.window} sigma; machine: {platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; {time.perf_counter() - t0:.0f} s\n")
    print("| KV dtype | predictor (mixture) | model | bits/scalar (esc exact) | vs EXACT | bits (esc raw) | escape rate | empty-cell mass | A share | tables = bytes |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\n" + "\n".join(notes))


if __name__ == "__main__":
    main()
