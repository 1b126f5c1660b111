"""``speckv calibrate``: fit the token-free predictors (predictors/linear.py) to a model.

Pipeline (all on the CPU, float64):
1. Run the model on the calibration text (dump_kv), in sequences of ``--seq-len`` tokens from
   position 0; for fp8 quantise with per-layer absmax scales (recorded). The last quarter
   of the sequences (at least one) is held back as the *validation split*.
2. Means: for every (kv, layer) block, one ridge regression over the union of the inputs
   any predictor uses (so the Gram matrix is accumulated once and each predictor solves its
   sub-system) on the *fit split*, its ridge strength picked from RIDGE_GRID by the squared
   error on the validation split (a few thousand tokens, as live calibration samples, need
   a strong ridge: a V block of `context` has 5 x C inputs); coefficients are rounded to the
   fixed point of calibration.py (the integer model that predicts is the one that is saved).
3. Residual model, on the validation split, measured with the coder's own integer entropy
   model (kernels/entropy_model.py), i.e. the bits a blob really costs:
   a. sigma = RMS of the residual per channel (keys before RoPE for rotary predictors);
   b. the mixture (w_wide, kappa) of the coder: grid search (``residual`` "wide");
   c. a per-channel multiplier of sigma from 2^(i/8), i in SIGMA_STEPS (``residual``
      "sigma"): the best sigma of a Gaussian-plus-wide mixture is not the RMS.
   The bench reports each of a-c separately ("what each addition buys").

The grid searches see a deterministic subsample of the validation tokens (TOKENS_MIXTURE,
TOKENS_SIGMA per block): steps 2-3 took 30 s for 16k fp8 tokens on 2 idle cores (plus the
model's prefill; several times that on a loaded machine).
"""

from __future__ import annotations

import math

import torch

from sglang_speckv.kernels import entropy_model as em
from sglang_speckv.kernels import table_model as tm
from sglang_speckv.predictors.calibration import (
    BIAS_BITS,
    COEF_BITS,
    INPUT_BITS,
    SHIFT_RANGE,
    Block,
    Calibration,
    rope_tables,
)
from sglang_speckv.predictors.linear import K, SPECS, LinearGaussianPredictor, block_features, rope_cos_sin, rotate

# Ridge strength relative to the mean diagonal of the inputs' Gram matrix: small enough to
# leave well-determined fits alone (1e-5..1e-3 gave the same bits on SmolLM2), large enough
# to keep near-collinear inputs (neighbouring layers) from blowing up coefficients.
RIDGE = 1e-4
# Ridge strengths tried per block when a validation split is given (fit_means).
RIDGE_GRID = (1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1)
# Mixture grid: w_wide / 256 of the mass at 2^kappa sigma. 0 = plain Gaussian (+ floor).
W_WIDE_GRID = (0, 3, 6, 13, 26)
KAPPA_GRID = (2, 3, 4)
# sigma multipliers 2^(i/8): -4..+1 eighths of an octave (x0.71 .. x1.09); on SmolLM2 over
# 99% of channels chose -3..+1 from a grid of -6..+3.
SIGMA_STEPS = tuple(range(-4, 2))
TOKENS_MIXTURE = 32  # validation tokens per block for the mixture grid (~0.37M scalars)
TOKENS_SIGMA = 128  # validation tokens per block for the per-channel sigma multipliers
RESIDUAL_FULL = ("wide", "sigma")
# What `speckv calibrate` fits unless told: the best predictor and the two static ones
# (a few hundred kB); prev_layer only adds file size (context beats it everywhere).
CLI_PREDICTORS = ("static", "static_rope", "context")
DEFAULT_SEQ_LEN = 2048
DEFAULT_MAX_TOKENS = 16384


def to_pages(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Dump layout k, v [layers, kv_heads, tokens, head_dim] -> canonical page layout
    [2, layers, tokens, kv_heads, head_dim] (one page holding all tokens)."""
    return torch.stack([k, v]).permute(0, 1, 3, 2, 4).contiguous()


def scalar_bits(
    stored: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, kv_dtype: str, w_wide: int, kappa: int, model: str = "exact"
) -> torch.Tensor:
    """float64 bits (-log2 f/M) the coder spends on each scalar of ``stored`` (bf16 or fp8
    tensor) under (mu, sigma) float32 of the same shape: the integer model, exactly.
    ``model``: "exact" (entropy_model, what calibration fits) or "table" (table_model)."""
    keys = em.keys_from_bits(em.storage_bits(stored), kv_dtype)
    mu_q, e, r = em.quantize_params(mu, sigma)
    if model == tm.MODEL_TABLE:
        return tm.ideal_bits(keys, mu_q, e, r, kv_dtype, w_wide, kappa)
    freq = em.cdf(keys + 1, mu_q, e, r, kv_dtype, w_wide, kappa) - em.cdf(keys, mu_q, e, r, kv_dtype, w_wide, kappa)
    return em.PROB_BITS - torch.log2(freq.to(torch.float64))


def fixed_point(coef: torch.Tensor | None, bias: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Float coefficients [C, F] (per unit of fixed-point input) and bias [C] -> (coef_q int16,
    bias_q int64, shift int32) with mu = (coef_q . x_q + bias_q) * 2^-shift, |coef_q| <=
    2^COEF_BITS and |bias_q| <= 2^BIAS_BITS; the shift keeps as many bits as both allow."""

    def exponent(m: torch.Tensor) -> torch.Tensor:  # smallest e with m <= 2^e (m > 0)
        return torch.frexp(m)[1].to(torch.int64)

    tiny = torch.finfo(torch.float64).tiny
    shift = BIAS_BITS - exponent(bias.abs().clamp_min(tiny))
    if coef is not None:
        shift = torch.minimum(shift, COEF_BITS - exponent(coef.abs().amax(dim=1).clamp_min(tiny)))
    shift = shift.clamp(*SHIFT_RANGE)
    unit = torch.ldexp(torch.ones_like(bias), shift)
    bias_q = (bias * unit).round().clamp(-(1 << BIAS_BITS), 1 << BIAS_BITS).to(torch.int64)
    coef_q = None
    if coef is not None:
        top = (1 << COEF_BITS) - 1  # int16
        coef_q = (coef * unit[:, None]).round().clamp(-top, top).to(torch.int16)
    return coef_q, bias_q, shift.to(torch.int32)


def _input_exponents(seqs: list[torch.Tensor]) -> torch.Tensor:
    """int32 [2, layers]: in_exp with absmax * 2^in_exp <= 2^(INPUT_BITS - 1) (a factor 2 of
    headroom over the calibration data before inputs clamp; the un-rotation of a key pair can
    grow one coordinate by at most sqrt 2 < 2, absorbed by the same factor)."""
    amax = torch.stack([s.abs().to(torch.float32).amax(dim=(2, 3, 4)) for s in seqs]).amax(dim=0).to(torch.float64)
    amax = torch.where(torch.isfinite(amax) & (amax > 0), amax, torch.ones_like(amax))
    return (INPUT_BITS - 1 - torch.frexp(amax * math.sqrt(2))[1]).clamp(-60, 60).to(torch.int32)


def _target(seq: torch.Tensor, kv: int, layer: int, rotary: bool, cos_sin) -> torch.Tensor:
    """Block (kv, layer) of seq as float64 [T, H, D], before RoPE if rotary."""
    y = seq[kv, layer].to(torch.float64)
    if rotary:
        cos, sin = cos_sin[layer]
        y = rotate(y, cos, -sin)
    return y


def _positions(seqs: list[torch.Tensor], positions) -> list[torch.Tensor]:
    """Each sequence's token positions: ``positions`` if given, else 0, 1, ... (predictions
    are per token, so a "sequence" may be any set of tokens with their positions)."""
    return [torch.arange(s.shape[2]) for s in seqs] if positions is None else list(positions)


def _normal_equations(calib, seqs, cs, inputs, kv, layer, rots):
    """(X'X, {rot: X'Y}) over ``seqs`` for the union ``inputs`` plus a constant."""
    c = calib.layout["kv_heads"] * calib.layout["head_dim"]
    f = len(inputs) * c
    gram = torch.zeros(f + 1, f + 1, dtype=torch.float64)
    cross = {rot: torch.zeros(f + 1, c, dtype=torch.float64) for rot in rots}
    for seq, cos_sin in zip(seqs, cs):
        t = seq.shape[2]
        x = torch.cat([block_features(seq, skv, sl, cos_sin, rot, int(calib.in_exp[skv, sl])) for skv, sl, rot in inputs] + [torch.ones(t, 1, dtype=torch.float64)], dim=1)
        gram += x.t() @ x
        for rot in cross:
            cross[rot] += x.t() @ _target(seq, kv, layer, rot, cos_sin).reshape(t, c)
    return gram, cross


def fit_means(calib: Calibration, fit: list[torch.Tensor], names, progress: bool = True, positions=None,
              val: list[torch.Tensor] | None = None, val_positions=None) -> None:
    """Step 2: fill calib.blocks[name] with fixed-point means (sigma = sigma_scale = 1).
    With ``val``, each block's ridge strength is the one of RIDGE_GRID whose fit has the
    least squared error on ``val`` (few calibration tokens, e.g. live calibration, need a
    strong ridge; many need almost none); else RIDGE."""
    from tqdm import tqdm

    lay = calib.layout
    n_layers, c = lay["layers"], lay["kv_heads"] * lay["head_dim"]
    specs = {n: SPECS[n] for n in names}
    cs = [rope_cos_sin(calib.rope, p, lay["layer_rope"]) for p in _positions(fit, positions)]
    cs_val = [rope_cos_sin(calib.rope, p, lay["layer_rope"]) for p in _positions(val, val_positions)] if val else []
    for name in specs:
        calib.blocks[name] = {}
        calib.mixture[name] = {"w_wide": em.W_WIDE, "kappa": em.KAPPA}
    for kv, layer in tqdm([(kv, l) for kv in (0, 1) for l in range(n_layers)], desc="fit means", disable=not progress):
        inputs = []  # union of (kv', layer', rotary) over the predictors
        for spec in specs.values():
            for skv, sl in spec.sources(kv, layer, n_layers):
                key = (skv, sl, spec.rope and skv == K)
                if key not in inputs:
                    inputs.append(key)
        f = len(inputs) * c
        rots = {spec.rope and kv == K for spec in specs.values()}
        gram, cross = _normal_equations(calib, fit, cs, inputs, kv, layer, rots)
        if val:
            gram_val, cross_val = _normal_equations(calib, val, cs_val, inputs, kv, layer, rots)
        for name, spec in specs.items():
            # the predictor's inputs, in its feature order, as rows of the union's system
            mine = [inputs.index((skv, sl, spec.rope and skv == K)) for skv, sl in spec.sources(kv, layer, n_layers)]
            rows = [i * c + j for i in mine for j in range(c)]
            idx = torch.tensor(rows + [f], dtype=torch.int64)
            rot = spec.rope and kv == K
            g, y = gram[idx][:, idx], cross[rot][idx]
            w = _ridge_solve(g, y, RIDGE)  # [F + 1, C]
            if rows and val:
                gv, yv = gram_val[idx][:, idx], cross_val[rot][idx]
                # validation SSE up to a constant: w'Gw - 2 w'y
                sse = lambda w: float((w * (gv @ w)).sum() - 2 * (w * yv).sum())  # noqa: E731
                w = min((_ridge_solve(g, y, r) for r in RIDGE_GRID), key=sse)
            coef, bias = (w[:-1].t().contiguous() if rows else None), w[-1]
            coef_q, bias_q, shift = fixed_point(coef, bias)
            ones = torch.ones(c, dtype=torch.float32)
            calib.blocks[name][(kv, layer)] = Block(coef_q, bias_q, shift, ones, ones.clone())


def _ridge_solve(g: torch.Tensor, y: torch.Tensor, strength: float) -> torch.Tensor:
    """Solve (g + ridge) w = y; the ridge is strength x the mean diagonal of g's inputs (not
    the constant, last row)."""
    g = g.clone()
    if g.shape[0] > 1:
        g.diagonal()[:-1] += strength * g.diagonal()[:-1].mean()
    return torch.linalg.solve(g, y)


def fit_residuals(calib: Calibration, val: list[torch.Tensor], names, residual=RESIDUAL_FULL, progress: bool = True, positions=None) -> None:
    """Step 3 on the validation split: sigma (RMS), then the mixture and the per-channel
    multipliers named in ``residual`` (a subset of RESIDUAL_FULL)."""
    from tqdm import tqdm

    lay = calib.layout
    h, d = lay["kv_heads"], lay["head_dim"]
    cs = [rope_cos_sin(calib.rope, p, lay["layer_rope"]) for p in _positions(val, positions)]
    # floor of sigma: a channel that is constant on the calibration data still gets a
    # spread of one part in 2^9 of its typical magnitude (finer than a bf16 step).
    for name in tqdm(names, desc="fit residuals", disable=not progress):
        pred = LinearGaussianPredictor(calib, name)  # means only: sigma is set below
        params = pred.params(torch.device("cpu"))
        for (kv, layer), block in calib.blocks[name].items():
            sq, mag, n = torch.zeros(h, d, dtype=torch.float64), torch.zeros(h, d, dtype=torch.float64), 0
            for seq, cos_sin in zip(val, cs):
                y = _target(seq, kv, layer, pred.rotary(kv), cos_sin)
                sq += (y - pred.mean(params, seq, kv, layer, cos_sin)).square().sum(dim=0)
                mag += y.square().sum(dim=0)
                n += y.shape[0]
            rms, floor = (sq / n).sqrt(), (mag / n).sqrt() * 2.0**-9
            sigma = torch.maximum(rms, floor).clamp_min(torch.finfo(torch.float32).tiny)
            block.sigma = sigma.reshape(-1).to(torch.float32)
            block.sigma_scale = torch.ones_like(block.sigma)
        if "wide" in residual:
            calib.mixture[name] = _fit_mixture(calib, name, val, cs)
        else:
            calib.mixture[name] = {"w_wide": 0, "kappa": 0}
        if "sigma" in residual:
            _fit_sigma_scale(calib, name, val, cs)


def _subsample(val: list[torch.Tensor], cs, per_block: int):
    """[(seq, cos_sin, token index)] picking ~per_block evenly spaced validation tokens."""
    total = sum(s.shape[2] for s in val)
    step = max(1, total // per_block)
    out = []
    for seq, cos_sin in zip(val, cs):
        idx = torch.arange(0, seq.shape[2], step)
        picked = {id(c): (c[idx], s[idx]) for c, s in cos_sin}  # layers sharing a RoPE share tensors
        out.append((seq[:, :, idx], [picked[id(c)] for c, _ in cos_sin]))
    return out


def _predict_blocks(pred: LinearGaussianPredictor, sample, params=None):
    """Yield (stored block [T, H, D], mu, sigma float32) for every block of every sample."""
    params = params or pred.params(torch.device("cpu"))
    for seq, cos_sin in sample:
        for kv, layer in pred.blocks:
            mu, sigma = pred.predict_block(params, seq, kv, layer, cos_sin)
            yield seq[kv, layer], mu.to(torch.float32), sigma.to(torch.float32)


def _fit_mixture(calib: Calibration, name: str, val, cs) -> dict[str, int]:
    pred = LinearGaussianPredictor(calib, name)
    blocks = list(_predict_blocks(pred, _subsample(val, cs, TOKENS_MIXTURE)))
    stored = torch.cat([b[0].reshape(-1) for b in blocks])
    mu = torch.cat([b[1].reshape(-1) for b in blocks])
    sigma = torch.cat([b[2].reshape(-1) for b in blocks])
    return fit_mixture(stored, mu, sigma, calib.kv_dtype)


def fit_mixture(stored: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, kv_dtype: str) -> dict[str, int]:
    """{"w_wide", "kappa"} from W_WIDE_GRID x KAPPA_GRID that code ``stored`` (any shape)
    in the fewest bits under (mu, sigma) float32 of the same shape."""
    best = None
    for w in W_WIDE_GRID:
        for kappa in KAPPA_GRID if w else (0,):
            bits = float(scalar_bits(stored, mu, sigma, kv_dtype, w, kappa).sum())
            if best is None or bits < best[0]:
                best = (bits, w, kappa)
    return {"w_wide": best[1], "kappa": best[2]}


def _fit_sigma_scale(calib: Calibration, name: str, val, cs) -> None:
    pred = LinearGaussianPredictor(calib, name)
    mix = calib.mixture[name]
    sample = _subsample(val, cs, TOKENS_SIGMA)
    params = pred.params(torch.device("cpu"))
    for key, block in calib.blocks[name].items():
        stored, mu, sigma = [], [], []
        for seq, cos_sin in sample:
            m, s = pred.predict_block(params, seq, key[0], key[1], cos_sin)
            stored.append(seq[key[0], key[1]])
            mu.append(m.to(torch.float32))
            sigma.append(s)
        stored, mu, sigma = torch.cat(stored), torch.cat(mu), torch.cat(sigma)  # [T, H, D]
        costs = []
        for i in SIGMA_STEPS:
            scaled = (sigma * 2.0 ** (i / 8)).to(torch.float32)
            costs.append(scalar_bits(stored, mu, scaled, calib.kv_dtype, mix["w_wide"], mix["kappa"]).sum(dim=0).reshape(-1))
        best = torch.stack(costs).argmin(dim=0)  # [C]
        steps = torch.tensor(SIGMA_STEPS, dtype=torch.float64)[best]
        block.sigma_scale = torch.exp2(steps / 8).to(torch.float32)


def calibrate(
    seqs: list[torch.Tensor],
    *,
    model: str,
    layout: dict,
    kv_dtype: str,
    fp8_scale: torch.Tensor | None = None,
    names=tuple(SPECS),
    residual=RESIDUAL_FULL,
    progress: bool = True,
    positions: list[torch.Tensor] | None = None,
) -> Calibration:
    """Fit the predictors ``names`` on sequences of stored KV (canonical layout
    [2, layers, tokens, heads, dim], bf16 or float8_e4m3fn, each from position 0 unless
    ``positions`` gives each one's int64 [tokens] positions). The last quarter of ``seqs``
    (at least one) is the validation split; at least two are needed."""
    if len(seqs) < 2:
        raise ValueError("calibration needs at least two sequences (fit and validation)")
    n_val = max(1, len(seqs) // 4)
    fit, val = seqs[:-n_val], seqs[-n_val:]
    pos = _positions(seqs, positions)
    calib = Calibration(
        model=model,
        kv_dtype=kv_dtype,
        layout=dict(layout),
        fp8_scale=(fp8_scale if fp8_scale is not None else torch.ones(2, layout["layers"])).to(torch.float32),
        in_exp=_input_exponents(fit),
        rope=rope_tables(layout),
    )
    fit_means(calib, fit, names, progress, pos[:-n_val], val, pos[-n_val:])
    fit_residuals(calib, val, names, residual, progress, pos[-n_val:])
    return calib


def calibration_sequences(model, token_ids: torch.Tensor, kv_dtype: str, seq_len: int, progress: bool = True):
    """(sequences in canonical layout and stored dtype, fp8 scales or None): the model's KV
    over ``token_ids`` cut into sequences of ``seq_len`` tokens (a single one is halved)."""
    from sglang_speckv.tools import dump_kv

    if len(token_ids) <= seq_len:
        seq_len = max(1, len(token_ids) // 2)
    chunks = [token_ids[s : s + seq_len] for s in range(0, len(token_ids), seq_len)]
    kvs = [dump_kv.compute_kv(model, ids, progress=progress) for ids in chunks]
    if kv_dtype == "bf16":
        return [to_pages(k.to(torch.bfloat16), v.to(torch.bfloat16)) for k, v in kvs], None
    scale = dump_kv.fp8_scales(torch.cat([k for k, _ in kvs], dim=2), torch.cat([v for _, v in kvs], dim=2))
    return [to_pages(dump_kv.to_fp8(k, scale[0]), dump_kv.to_fp8(v, scale[1])) for k, v in kvs], scale


def calibrate_command(parser):
    from sglang_speckv.tools import dump_kv

    parser.add_argument("--model", required=True, help="HF checkpoint directory or .gguf file")
    parser.add_argument("--text", required=True, nargs="+", help="calibration text file(s); keep them apart from evaluation text")
    parser.add_argument("--out", required=True, help="output calibration .safetensors")
    parser.add_argument("--kv-dtype", default="bf16", choices=dump_kv.KV_DTYPES)
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="calibration tokens (default %(default)s)")
    parser.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="tokens per sequence (default %(default)s)")
    parser.add_argument("--predictors", nargs="+", default=list(CLI_PREDICTORS), choices=list(SPECS),
                        help="predictors to fit (default %(default)s; prev_layer is a bench ablation, 4 MB more)")

    def run(args) -> int:
        model, tokenizer = dump_kv.load_model(args.model)
        ids = dump_kv.tokenize(tokenizer, dump_kv.read_texts(args.text), args.max_tokens)
        seqs, scale = calibration_sequences(model, ids, args.kv_dtype, args.seq_len)
        calib = calibrate(
            seqs, model=dump_kv.model_identity(model), layout=dump_kv.kv_layout(model),
            kv_dtype=args.kv_dtype, fp8_scale=scale, names=args.predictors,
        )
        calib.save(args.out)
        mix = ", ".join(f"{n} (w_wide {m['w_wide']}, kappa {m['kappa']})" for n, m in calib.mixture.items())
        print(f"wrote {args.out}: {len(ids)} tokens, {args.kv_dtype}, fingerprint {calib.fingerprint:016x}; {mix}")
        return 0

    return run
