"""``speckv bench frontier``: bits per scalar against compute spent predicting, for every
predictor, on real SmolLM2-135M KV, bf16 and fp8, against zstd and the static baseline.

What one run does (all in this process, on the CPU):
1. Runs the model (``--model``, default the prepare-model checkpoint) on the calibration
   text and on disjoint held-out text (defaults: tests/data/text/, see its README).
2. Per KV dtype: calibrates the token-free predictors (calibrate.py) on the calibration
   KV, plus two ablations of ``context`` (plain Gaussian; Gaussian + fitted wide
   component) to show what each part of the residual model buys; fits the model
   predictors' residuals; then measures every predictor on the held-out KV.
3. Bits are the coder's ideal code length under its integer model (calibrate.scalar_bits,
   = entropy_model.ideal_bits per scalar); real blobs add only lane overhead, which the
   speed columns show: ``--speed-pages`` pages of 16 tokens are encoded and decoded with
   the real codec (torch reference coder on CPU), checked bit-exact, and their actual
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
from pathlib import Path

import torch

from sglang_speckv import calibrate as cal
from sglang_speckv import dump_kv
from sglang_speckv.predictors.base import PageMeta
from sglang_speckv.predictors.linear import K, SPECS, LinearGaussianPredictor, rope_cos_sin, rotate, rotate_sigma

TEXT_DIR = Path(__file__).resolve().parent.parent / "tests" / "data" / "text"
PAGE_TOKENS = 16  # SGLang's usual page size; the speed test codes pages of this size
PAGE_STATS_TOKENS = 64  # page_stats sends per-page statistics: measured on 64-token pages
RAW_BITS = {"bf16": 16, "fp8_e4m3": 8}
# Tensor-core cost of a MAC relative to bf16 on H100 (dense): W8A8 fp8 and int8 run at twice
# the bf16 rate; weight-only schemes (W8A16, W4A16) dequantise to bf16 and run bf16 MACs (a
# compute-bound prefill gains nothing from small weights).
COST_PER_MAC = {"int8": 0.5, "fp8": 0.5, "fp8_w": 1.0, "int4": 1.0}
SCHEME_LABEL = {"int8": "W8A8 int8", "fp8": "W8A8 fp8", "fp8_w": "W8A16 fp8", "int4": "W4A16 int4 g64"}


# ---- measuring ---------------------------------------------------------------------------


def block_bits(stored: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, kv_dtype: str, w_wide: int, kappa: int) -> torch.Tensor:
    """Mean bits per scalar of each (kv, layer) block: float64 [2, layers]. All tensors are
    [2, layers, tokens, heads, dim]; mu and sigma float32."""
    out = torch.zeros(stored.shape[:2], dtype=torch.float64)
    for kv in range(stored.shape[0]):
        for layer in range(stored.shape[1]):
            b = cal.scalar_bits(stored[kv, layer], mu[kv, layer], sigma[kv, layer], kv_dtype, w_wide, kappa)
            out[kv, layer] = b.mean()
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
    """[2, L] bits per scalar of the self-contained page_stats predictor on PAGE_STATS_TOKENS
    pages, its side info spread over the scalars of each page."""
    from sglang_speckv.kernels import entropy_model as em
    from sglang_speckv.predictors.page_stats import PageStatsPredictor

    pred = PageStatsPredictor()
    total, side_bits, n = torch.zeros(page.shape[:2], dtype=torch.float64), 0.0, 0
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


def codec_speed(pred, page: torch.Tensor, pages: int) -> tuple[float, float, float]:
    """(encode MB/s, decode MB/s, actual bits/scalar) of the real codec on ``pages`` pages of
    PAGE_TOKENS tokens cut from ``page``; raises if the round trip is not bit-exact."""
    from sglang_speckv.kernels import codec

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
    bits = 8 * sum(len(b) for b in blobs) / sum(p.numel() for p in cut)
    return nbytes / (t1 - t0) / 1e6, nbytes / (t2 - t1) / 1e6, bits


# ---- model predictors --------------------------------------------------------------------


def _residual_fit(stored: torch.Tensor, mu: torch.Tensor, kv_dtype: str):
    """sigma float64 [2, L, H, D] (RMS residual per channel over tokens, floored like
    calibrate.py) and the mixture fitted on a subsample, for a model predictor."""
    resid = (stored.to(torch.float64) - mu).square().mean(dim=2)
    mag = stored.to(torch.float64).square().mean(dim=2)
    sigma = torch.maximum(resid.sqrt(), mag.sqrt() * 2.0**-9).clamp_min(torch.finfo(torch.float32).tiny)
    step = max(1, stored.shape[2] // cal.TOKENS_MIXTURE)
    sub = slice(0, None, step)
    s_full = sigma.unsqueeze(2).expand_as(mu)[:, :, sub]
    mix = cal.fit_mixture(stored[:, :, sub], mu[:, :, sub].to(torch.float32), s_full.to(torch.float32), kv_dtype)
    return sigma, mix


def _to_code(x: torch.Tensor, kv_dtype: str, scale: torch.Tensor | None) -> torch.Tensor:
    """Real-valued KV [2, L, T, H, D] -> the stored dtype's domain (fp8: divided by scale)."""
    if kv_dtype == "bf16":
        return x
    return x / scale.to(x.dtype)[:, :, None, None, None]


def model_predictor_rows(model, cal_chunks: list[torch.Tensor], ids_held: torch.Tensor, held_real: torch.Tensor, cal_real: torch.Tensor,
                         kv_dtype: str, stored_cal: torch.Tensor, stored_held: torch.Tensor, scale, calib, early_exit, progress):
    """Yield (name, [2, L] bits, compute fraction, note) for the model predictors.

    ``cal_chunks``: calibration token sequences (each from position 0); ``*_real``: the
    target's KV as float64 [2, L, T, H, D] (calibration chunks concatenated on T);
    ``stored_*``: the same in the stored dtype. Residuals are fitted on the calibration
    chunks, bits measured on ``ids_held``."""
    from sglang_speckv.predictors import model as mp

    macs = mp.prefill_macs(model.config, len(ids_held))
    n_layers = model.config.num_hidden_layers
    for scheme in mp.SCHEMES:
        q = mp.quantized_copy(model, scheme)
        est = {}
        for split, seqs in (("cal", cal_chunks), ("held", [ids_held])):
            pages = [cal.to_pages(*dump_kv.compute_kv(q, ids, progress=progress)) for ids in seqs]
            est[split] = _to_code(torch.cat(pages, dim=2).to(torch.float64), kv_dtype, scale)
        del q
        sigma, mix = _residual_fit(stored_cal, est["cal"], kv_dtype)
        mu = est["held"].to(torch.float32)
        s = sigma.unsqueeze(2).expand_as(est["held"]).to(torch.float32)
        bits = block_bits(stored_held, mu, s, kv_dtype, mix["w_wide"], mix["kappa"])
        # the KV of the last layer needs neither its attention output nor its MLP
        frac = (macs["prefill"] - macs["layer"] + macs["kv_proj"]) / macs["prefill"]
        cost = frac * COST_PER_MAC[scheme]
        yield f"model {scheme}", bits, cost, f"target quantised {SCHEME_LABEL[scheme]}; MACs {frac:.2f} of prefill x {COST_PER_MAC[scheme]} cost/MAC"
    positions = torch.cat([torch.arange(len(c)) for c in cal_chunks])
    cs_cal = rope_cos_sin(calib.rope, positions)
    cs_held = rope_cos_sin(calib.rope, torch.arange(len(ids_held)))
    for k in early_exit:
        h_cal = torch.cat([mp.hidden_after(model, c, k) for c in cal_chunks]).to(torch.float64)
        h_held = mp.hidden_after(model, ids_held, k).to(torch.float64)

        def targets(real, cos_sin):  # [T, (L-k) * 2 * C], keys before RoPE
            cols = []
            for kv in (0, 1):
                for layer in range(k, n_layers):
                    y = real[kv, layer]
                    cols.append((rotate(y, cos_sin[0], -cos_sin[1]) if kv == K else y).reshape(y.shape[0], -1))
            return torch.cat(cols, dim=1)

        x = torch.cat([h_cal, torch.ones(len(h_cal), 1, dtype=torch.float64)], dim=1)
        g = x.t() @ x
        g.diagonal()[:-1] += cal.RIDGE * g.diagonal()[:-1].mean()
        w = torch.linalg.solve(g, x.t() @ targets(_to_code(cal_real, kv_dtype, scale), cs_cal))

        def estimate(h, real, cos_sin):  # [2, L, T, H, D]: exact below k, probes above
            pre = torch.cat([h, torch.ones(len(h), 1, dtype=torch.float64)], dim=1) @ w
            est = _to_code(real, kv_dtype, scale).clone()
            t, c = len(h), real.shape[3] * real.shape[4]
            blocks = pre.reshape(t, 2, n_layers - k, c)
            for kv in (0, 1):
                for layer in range(k, n_layers):
                    y = blocks[:, kv, layer - k].reshape(t, real.shape[3], real.shape[4])
                    est[kv, layer] = rotate(y, *cos_sin) if kv == K else y
            return est

        est_cal = estimate(h_cal, cal_real, cs_cal)
        sigma, mix = _residual_fit(stored_cal, est_cal, kv_dtype)
        est_held = estimate(h_held, held_real, cs_held)
        s = sigma.unsqueeze(2).expand_as(est_held).clone()
        s[:, :k] = torch.finfo(torch.float32).tiny  # exact layers: the decoder recomputes them
        bits = block_bits(stored_held, est_held.to(torch.float32), s.to(torch.float32), kv_dtype, mix["w_wide"], mix["kappa"])
        frac = (k * macs["layer"] + (n_layers - k) * w.shape[0] * 2 * model.config.num_key_value_heads * model.config.head_dim) / macs["prefill"]
        yield f"early exit k={k}", bits, frac, f"layers < {k} exact (needs bit-exact recompute), linear probes from layer {k}'s input"


# ---- the run -----------------------------------------------------------------------------


def linear_macs(pred: LinearGaussianPredictor) -> int:
    """Multiply-accumulates per token of a calibrated predictor's dot products."""
    return sum(0 if b.coef is None else b.coef.numel() for b in pred.blocks.values())


def run_frontier(args) -> str:
    from sglang_speckv.prepare_model import prepare_model
    from sglang_speckv.predictors import model as mp

    torch.manual_seed(0)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, tokenizer = dump_kv.load_model(args.model or prepare_model())
    layout = dump_kv.kv_layout(model)
    ids_cal = dump_kv.tokenize(tokenizer, dump_kv.read_texts(args.calib_text), args.calib_tokens)
    ids_held = dump_kv.tokenize(tokenizer, dump_kv.read_texts(args.heldout_text), args.heldout_tokens)
    print(f"model {args.model or 'SmolLM2-135M-Instruct'}: calibration {len(ids_cal)} tokens, held-out {len(ids_held)} tokens", flush=True)
    chunks = [ids_cal[s : s + args.seq_len] for s in range(0, len(ids_cal), args.seq_len)]
    cal_kv = [cal.to_pages(*dump_kv.compute_kv(model, c)) for c in chunks]  # bf16 [2, L, T, H, D]
    held_kv = cal.to_pages(*dump_kv.compute_kv(model, ids_held))
    macs = mp.prefill_macs(model.config, len(ids_held))
    identity = dump_kv.model_identity(model)

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
        calib = cal.calibrate(seqs, model=identity, layout=layout, kv_dtype=kv_dtype, fp8_scale=scale, progress=args.progress)
        print(f"[{kv_dtype}] calibrated in {time.perf_counter() - t0:.0f} s: {calib.mixture}", flush=True)

        def add(name, bits, compute, note="", speed=("", "", "")):
            per_layer[(kv_dtype, name)] = bits
            k_bits, v_bits = float(bits[0].mean()), float(bits[1].mean())
            both = (k_bits + v_bits) / 2
            rows.append((name, kv_dtype, k_bits, v_bits, both, RAW_BITS[kv_dtype] / both, compute, *speed, note))
            print(f"  {name:<22} K {k_bits:6.3f}  V {v_bits:6.3f}  K+V {both:6.3f}", flush=True)

        raw = torch.full((2, layout["layers"]), float(RAW_BITS[kv_dtype]), dtype=torch.float64)
        zk, zv = zstd_bits(held, split_bytes=False)
        add("zstd -3", torch.stack([raw[0] * 0 + zk, raw[1] * 0 + zv]), 0.0, "raw bytes")
        if kv_dtype == "bf16":
            zk, zv = zstd_bits(held, split_bytes=True)
            add("zstd -3 byte planes", torch.stack([raw[0] * 0 + zk, raw[1] * 0 + zv]), 0.0, "high/low bytes apart")
        add("page_stats", page_stats_bits(held, kv_dtype), 0.0, f"self-contained, {PAGE_STATS_TOKENS}-token pages, side info included")
        for name in SPECS:
            pred = LinearGaussianPredictor(calib, name)
            mu, sigma = predict_page(pred, held)
            bits = block_bits(held, mu, sigma, kv_dtype, pred.w_wide, pred.kappa)
            speed = ("", "", "")
            if args.speed_pages:
                enc, dec, actual = codec_speed(pred, held, args.speed_pages)
                speed = (f"{enc:.1f}", f"{dec:.1f}", f"{actual:.3f}")
            add(name, bits, linear_macs(pred) / macs["prefill"], SPECS[name].help, speed)
        for label, residual in (("context, Gaussian sigma=RMS", ()), ("context, + wide mixture", ("wide",))):
            ablated = copy.deepcopy(calib)
            n_val = max(1, len(seqs) // 4)
            cal.fit_residuals(ablated, seqs[-n_val:], ["context"], residual, progress=False)
            pred = LinearGaussianPredictor(ablated, "context")
            mu, sigma = predict_page(pred, held)
            add(label, block_bits(held, mu, sigma, kv_dtype, pred.w_wide, pred.kappa), linear_macs(pred) / macs["prefill"], "ablation of the residual model")
        if args.model_predictors:
            n_mp = max(1, args.model_calib_tokens // args.seq_len)  # calibration chunks used
            for name, bits, compute, note in model_predictor_rows(
                model, chunks[:n_mp], ids_held, held_kv.to(torch.float64), torch.cat(cal_kv[:n_mp], dim=2).to(torch.float64),
                kv_dtype, torch.cat(seqs[:n_mp], dim=2), held, scale, calib, args.early_exit, args.progress,
            ):
                add(name, bits, compute, note)
        print(f"[{kv_dtype}] done in {time.perf_counter() - t0:.0f} s", flush=True)

    table = _table(rows, len(ids_cal), len(ids_held), args)
    (out_dir / "frontier.md").write_text(table)
    _plot(rows, per_layer, out_dir / "frontier.png")
    return table + f"\nwrote {out_dir / 'frontier.md'} and {out_dir / 'frontier.png'}"


def _table(rows, n_cal: int, n_held: int, args) -> str:
    cpu = platform.processor() or platform.machine()
    head = (
        f"SmolLM2-135M-Instruct KV, held-out {n_held} tokens (calibration: {n_cal} other tokens); "
        f"bits per scalar = the coder's ideal code length; machine: {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}\n\n"
        "| predictor | KV dtype | K bits | V bits | K+V bits | ratio vs raw | compute (x prefill) | enc MB/s | dec MB/s | real blob bits | notes |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {n} | {d} | {k:.3f} | {v:.3f} | {b:.3f} | {r:.2f}x | {c:.4f} | {e} | {dd} | {a} | {note} |"
        for n, d, k, v, b, r, c, e, dd, a, note in rows
    ]
    notes = (
        "\n\nenc/dec MB/s and real blob bits: the real codec (torch reference rANS on this CPU) on "
        f"{args.speed_pages} pages of {PAGE_TOKENS} tokens, decoded bit-exact; the real blob adds "
        "the header, lane table and final states (a 16-token page is small: see bench_codec for large pages). "
        "compute: multiply-accumulates of the predictor per token over those of the target's prefill "
        "(low-precision predictors times their tensor-core cost per MAC relative to bf16)."
    )
    return head + "\n".join(lines) + notes + "\n"


def _plot(rows, per_layer, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({d for _, d, *_ in rows}, key=lambda d: -RAW_BITS[d])
    fig, axes = plt.subplots(len(dtypes), 3, figsize=(18, 5 * len(dtypes)), squeeze=False)
    for i, d in enumerate(dtypes):
        names = [n for n, dd, *_ in rows if dd == d]
        for j, kv in enumerate("KV"):
            ax = axes[i][j]
            for n in names:
                bits = per_layer[(d, n)][j]
                ax.plot(range(len(bits)), bits.tolist(), marker=".", label=n)
            ax.set_title(f"{kv}, {d}: bits per scalar by layer")
            ax.set_xlabel("layer")
            ax.set_ylabel("bits / scalar")
            ax.grid(alpha=0.3)
        axes[i][0].legend(fontsize=7)
        ax = axes[i][2]
        for n, dd, _, _, both, _, compute, *_ in rows:
            if dd == d:
                x = max(compute, 1e-4)
                ax.scatter([x], [both])
                ax.annotate(n, (x, both), fontsize=7)
        ax.set_xscale("log")
        ax.set_title(f"{d}: K+V bits vs compute (fraction of prefill; 0 drawn at 1e-4)")
        ax.set_xlabel("compute (x prefill)")
        ax.set_ylabel("bits / scalar")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bench_command(parser):
    parser.add_argument("which", choices=["frontier"], help="which benchmark")
    parser.add_argument("--model", default=None, help="checkpoint dir or .gguf (default: the prepare-model checkpoint)")
    parser.add_argument("--calib-text", nargs="+", default=[str(TEXT_DIR / "calibration.txt")])
    parser.add_argument("--heldout-text", nargs="+", default=[str(TEXT_DIR / "heldout.txt")])
    parser.add_argument("--calib-tokens", type=int, default=cal.DEFAULT_MAX_TOKENS)
    parser.add_argument("--heldout-tokens", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=cal.DEFAULT_SEQ_LEN)
    parser.add_argument("--dtypes", nargs="+", default=list(dump_kv.KV_DTYPES), choices=dump_kv.KV_DTYPES)
    parser.add_argument("--speed-pages", type=int, default=4, help="pages coded for real per predictor (0: skip)")
    parser.add_argument("--no-model-predictors", dest="model_predictors", action="store_false")
    parser.add_argument("--model-calib-tokens", type=int, default=4096, help="calibration tokens for the model predictors")
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

