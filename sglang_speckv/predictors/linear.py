"""Token-free calibrated predictors: a linear-Gaussian model of each (kv, layer) block.

Every scalar of block (kv, layer) of a page [2 (K, V), layers, tokens, kv_heads, head_dim]
is predicted from values of the same token in blocks decoded before it (flat C order puts
all K layers before all V layers):

    mu = bias + coef . x          sigma = residual std * calibrated scale

where x concatenates the token's values in the source blocks named by the predictor's
Spec. With no sources this is a static per-(kv, layer, head, channel) Gaussian. Needs only
the page and its absolute position: no token ids, no model.

RoPE (``Spec.rope``). Keys are stored after RoPE; their statistics are much tighter before
it. A rotary predictor un-rotates K sources to position-free features, predicts keys
before RoPE (mean m, std s per channel), and rotates the prediction to each token's
position p: for the pair (i, i + R/2) (transformers' rotate_half on the first R =
rotary_dim channels; the others pass through) with angle a = p * inv_freq_i of the layer's
RoPE (layout["layer_rope"]: Gemma 3's sliding and full layers differ),
mu_i = m_i cos a - m_j sin a, mu_j = m_j cos a + m_i sin a, and
sigma_i^2 = (s_i cos a)^2 + (s_j sin a)^2 (independent residuals). cos/sin come from the
calibration's tables (two-level, angle addition), never from the local libm.

Determinism (docs/DESIGN.md invariant 3): (mu, sigma) are bit-identical on every device
and for every batch composition because
- the dot products are exact integer arithmetic: inputs are rounded to fixed point
  (x_q = round(x * 2^in_exp), |x_q| <= 2^15), coefficients are stored as integers
  (|c_q| < 2^15, at most 2^16 of them) and the sums are done in float64, which holds
  every partial sum exactly (< 2^53) whatever the order, blocking or FMA of the BLAS;
- everything else is elementwise IEEE float64 (each op correctly rounded, one op per torch
  call, so nothing can be fused): multiplications by powers of two, the rotation, a sqrt;
  the result is rounded once to float32;
- NaN/inf in decoded values (a page may hold any bit pattern) are clamped/zeroed before the
  rounding to fixed point, so garbage pages give finite, deterministic predictions.

Stages: one per (kv, layer) block when the predictor has sources (60 for SmolLM2: all
tokens, heads and channels of a layer at once, parallel enough for a GPU); one stage for
static predictors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import xxhash

from sglang_speckv.predictors.base import PageMeta, Predictor
from sglang_speckv.predictors.calibration import INPUT_BITS, ROPE_LO, Calibration, CalibrationError

K, V = 0, 1


@dataclass(frozen=True)
class Spec:
    """Which already-decoded blocks feed block (kv, layer), as layer offsets.

    ``k_from_k``: K[layer] <- K[layer + o]; ``v_from_k``: V[layer] <- K[layer + o];
    ``v_from_v``: V[layer] <- V[layer + o]. Offsets pointing outside [0, layers) are
    dropped; K sources must have o < 0 (K layers decode in order), V from V too."""

    id: int
    rope: bool
    k_from_k: tuple[int, ...] = ()
    v_from_k: tuple[int, ...] = ()
    v_from_v: tuple[int, ...] = ()
    help: str = ""

    def sources(self, kv: int, layer: int, layers: int) -> list[tuple[int, int]]:
        """[(kv', layer')] feeding block (kv, layer), in feature order."""
        if kv == K:
            cand = [(K, layer + o) for o in self.k_from_k]
        else:
            cand = [(K, layer + o) for o in self.v_from_k] + [(V, layer + o) for o in self.v_from_v]
        return [(k, l) for k, l in cand if 0 <= l < layers]


# The calibrated predictors (ids are written in blob headers: page_stats is 1; each id is
# unique and every K/V-from-same-kind offset is negative: tests/test_predictors.py checks).
SPECS: dict[str, Spec] = {
    "static": Spec(2, rope=False, help="per-(kv, layer, head, channel) mean and std"),
    "static_rope": Spec(3, rope=True, help="static, keys modelled before RoPE and rotated to the position"),
    "prev_layer": Spec(4, rope=True, k_from_k=(-1,), v_from_v=(-1,), help="K from the previous layer's K, V from V"),
    "context": Spec(
        5, rope=True, k_from_k=(-1, -2, -3), v_from_k=(-1, 0, 1), v_from_v=(-1, -2),
        help="K from 3 previous K layers; V from K of layers l-1..l+1 and 2 previous V layers",
    ),
}
def _pow2(n: torch.Tensor) -> torch.Tensor:
    """2.0^n as float64 from its bits (exact; n int64 in the normal range)."""
    return ((n.to(torch.int64) + 1023) << 52).view(torch.float64)


def rope_cos_sin(rope: dict[str, torch.Tensor], positions: torch.Tensor, layer_rope: list[int], device=None) -> list:
    """Per layer, (cos, sin) float64 [tokens, rotary_dim/2] at int64 ``positions`` from the
    calibration's tables (angle addition, elementwise), on ``device``; layers sharing a RoPE
    share the tensors. Raises ValueError beyond the model's positions."""
    hi, lo = positions // ROPE_LO, positions % ROPE_LO
    if len(positions) and (int(positions.min()) < 0 or int(hi.max()) >= rope["cos_hi"].shape[1]):
        raise ValueError(f"positions {int(positions.min())}..{int(positions.max())} are outside the model's RoPE range")
    ch, sh, cl, sl = rope["cos_hi"][:, hi], rope["sin_hi"][:, hi], rope["cos_lo"][:, lo], rope["sin_lo"][:, lo]
    cos, sin = (ch * cl - sh * sl).to(device), (sh * cl + ch * sl).to(device)  # [kinds, T, R/2]
    kinds = [(cos[i], sin[i]) for i in range(cos.shape[0])]
    return [kinds[i] for i in layer_rope]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE (rotate_half on the first R = 2 * cos.shape[-1] channels, the rest unchanged) of
    x [tokens, heads, D] float64 by angles with cos/sin [tokens, R/2]."""
    half = cos.shape[-1]
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    c, s = cos[:, None, :], sin[:, None, :]
    out = torch.empty_like(x)  # filled op by op (each rounded once, as x1 * c - x2 * s): a half block of scratch
    torch.mul(x1, c, out=out[..., :half]).sub_(x2 * s)
    torch.mul(x2, c, out=out[..., half : 2 * half]).add_(x1 * s)
    out[..., 2 * half :] = rest
    return out


def rotate_sigma(sigma: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Std after RoPE of independent residuals with std ``sigma`` [heads, D] before it: [tokens, heads, D]."""
    half = cos.shape[-1]
    s1, s2, rest = sigma[..., :half], sigma[..., half : 2 * half], sigma[..., 2 * half :]
    c, s = cos[:, None, :], sin[:, None, :]
    a, b = s1 * c, s2 * s
    d, e = s2 * c, s1 * s
    return torch.cat([(a * a + b * b).sqrt(), (d * d + e * e).sqrt(), rest.expand(cos.shape[0], -1, -1)], dim=-1)


def block_features(values: torch.Tensor, kv: int, layer: int, cos_sin, rotary: bool, in_exp: int) -> torch.Tensor:
    """Fixed-point inputs from block (kv, layer) of ``values`` [2, L, T, H, D]: float64
    [T, H*D] holding integers in [-2^15, 2^15] (keys un-rotated first if ``rotary``;
    ``cos_sin`` is rope_cos_sin's per-layer list)."""
    scale = 2.0**in_exp  # a Python float (exact: |in_exp| <= 60), valid on every device
    limit = float(1 << INPUT_BITS)
    x = values[kv, layer].to(torch.float64, copy=True)  # [T, H, D]; the ops below in place (one block of scratch)
    x.clamp_(-2 * limit / scale, 2 * limit / scale)  # +-inf -> finite; rotation cannot overflow
    x.masked_fill_(torch.isnan(x), 0.0)
    if rotary:
        cos, sin = cos_sin[layer]
        x = rotate(x, cos, -sin)  # back to before RoPE
    x.mul_(scale).clamp_(-limit, limit).round_()
    return x.reshape(x.shape[0], -1)


class LinearGaussianPredictor(Predictor):
    """One of SPECS, with parameters from a Calibration (see the module docstring)."""

    def __init__(self, calib: Calibration, name: str):
        if name not in SPECS:
            raise CalibrationError(f"unknown predictor {name!r}; calibrated predictors: {sorted(SPECS)}")
        if name not in calib.blocks:
            raise CalibrationError(f"calibration has no parameters for predictor {name!r} (it has {sorted(calib.blocks)})")
        self.spec = SPECS[name]
        self.id = self.spec.id
        self.name = name
        self.calib = calib
        self.blocks = calib.blocks[name]
        self.w_wide = calib.mixture[name]["w_wide"]
        self.kappa = calib.mixture[name]["kappa"]
        self.fingerprint = xxhash.xxh64_intdigest(f"{calib.fingerprint:016x}/{name}".encode())
        lay = calib.layout
        self._layers, self._heads, self._dim = lay["layers"], lay["kv_heads"], lay["head_dim"]
        c = self._heads * self._dim
        for (kv, layer), b in self.blocks.items():
            n_in = len(self.spec.sources(kv, layer, self._layers)) * c
            got = 0 if b.coef is None else b.coef.shape[1]
            if got != n_in:
                raise CalibrationError(f"{name} block {'KV'[kv]}{layer} has {got} inputs, its spec needs {n_in}; recalibrate")
        self._device_cache: dict[torch.device, dict] = {}

    # ---- contract ---------------------------------------------------------------------

    def stages(self, meta: PageMeta) -> list[int]:
        if not self._has_sources():
            return [0, meta.numel]
        n = meta.numel // (2 * self._layers)  # one (kv, layer) block
        return [i * n for i in range(2 * self._layers + 1)]

    def predict(self, meta: PageMeta, side: bytes, values: torch.Tensor, stage: int):
        mu, sigma = self.predict_rows(meta, side, values, stage)
        return mu.reshape(-1), sigma.reshape(-1)

    def parts(self, meta: PageMeta, stage: int) -> int:
        """static_rope: a part per (kv, layer) block of its one stage (per-symbol rows);
        static: one (broadcast rows); with sources: one (the stage is a block)."""
        return 2 * self._layers if self.spec.rope and not self._has_sources() else 1

    def predict_rows(self, meta: PageMeta, side: bytes, values: torch.Tensor, stage: int,
                     parts: tuple[int, int] | None = None):
        """Rows [blocks, tokens, heads * dim], float32: one block per stage with sources, all
        2L blocks in the one stage of a static predictor (``parts``: blocks p0 .. p1 - 1 of
        them, static_rope). Computed a block at a time (float64, rounded once into the rows);
        static without RoPE is the same for every token, so its rows are per-channel values
        broadcast over the tokens (stride 0: nothing per symbol)."""
        self._check(meta, values)
        t, c = meta.shape[2], self._heads * self._dim
        params = self.params(values.device)
        targets = [divmod(stage, self._layers)] if self._has_sources() else [(kv, l) for kv in (K, V) for l in range(self._layers)]
        p0, p1 = parts or (0, self.parts(meta, stage))
        if not 0 <= p0 < p1 <= self.parts(meta, stage):
            raise ValueError(f"{self.name}: parts [{p0}, {p1}) of a stage of {self.parts(meta, stage)}")
        if self.parts(meta, stage) > 1:
            targets = targets[p0:p1]
        if not self._has_sources() and not self.spec.rope:
            p = [params[key] for key in targets]
            mu = torch.stack([b["bias"] * b["unit"] for b in p])  # [blocks, C]: what mean() gives every token
            sigma = torch.stack([(b["sigma"] * b["sigma_scale"]).reshape(-1) for b in p])
            shape = (len(targets), t, c)
            return mu.to(torch.float32)[:, None].expand(shape), sigma.to(torch.float32)[:, None].expand(shape)
        positions = torch.arange(meta.position, meta.position + t, dtype=torch.int64)
        cos_sin = rope_cos_sin(self.calib.rope, positions, self.calib.layout["layer_rope"], values.device)
        mu = torch.empty((len(targets), t, c), dtype=torch.float32, device=values.device)
        sigma = torch.empty_like(mu)
        for i, (kv, layer) in enumerate(targets):
            block_mu, block_sigma = self.predict_block(params, values, kv, layer, cos_sin)  # float64 [T, H, D]
            mu[i] = block_mu.reshape(t, c)  # rounded to float32 once
            sigma[i] = block_sigma.reshape(t, c)
        return mu, sigma

    # ---- internals --------------------------------------------------------------------

    def _has_sources(self) -> bool:
        s = self.spec
        return bool(s.k_from_k or s.v_from_k or s.v_from_v)

    @property
    def uses_position(self) -> bool:
        return self.spec.rope

    def check(self, dtype: str, shape: tuple[int, ...]) -> None:
        want = (2, self._layers, shape[2] if len(shape) == 5 else "T", self._heads, self._dim)
        if dtype != self.calib.kv_dtype:
            raise ValueError(f"predictor {self.name} is calibrated for {self.calib.kv_dtype} KV, the pages are "
                             f"{dtype}: calibrate for {dtype} (`speckv calibrate --kv-dtype ...`)")
        if tuple(shape) != want:
            raise ValueError(f"pages of shape {tuple(shape)} [K/V, layers, tokens, kv_heads, head_dim] do not match "
                             f"the calibration's layout {want} (model {self.calib.model!r}): calibrate for the served model")

    def _check(self, meta: PageMeta, values: torch.Tensor) -> None:
        self.check(meta.dtype, tuple(meta.shape))
        if tuple(values.shape) != tuple(meta.shape):
            raise ValueError(f"values of shape {tuple(values.shape)}, the page is {tuple(meta.shape)}")

    def params(self, device: torch.device) -> dict:
        """Per-block tensors on ``device`` as float64 (coefficients transposed for x @ coef)."""
        if device not in self._device_cache:
            out = {}
            for key, b in self.blocks.items():
                out[key] = {
                    "coef_t": None if b.coef is None else b.coef.to(torch.float64).t().contiguous().to(device),  # [F, C]
                    "bias": b.bias.to(torch.float64).to(device),  # exact: |bias| <= 2^50
                    "unit": _pow2(-b.shift.to(torch.int64)).to(device),  # 2^-shift
                    "sigma": b.sigma.to(torch.float64).reshape(self._heads, self._dim).to(device),
                    "sigma_scale": b.sigma_scale.to(torch.float64).reshape(self._heads, self._dim).to(device),
                }
            self._device_cache[device] = out
        return self._device_cache[device]

    def predict_block(self, params: dict, values: torch.Tensor, kv: int, layer: int, cos_sin):
        """(mu, sigma) float64 [T, H, D] of block (kv, layer)."""
        p = params[(kv, layer)]
        mu = self.mean(params, values, kv, layer, cos_sin)
        sigma = p["sigma"].expand(mu.shape[0], -1, -1)
        if self.rotary(kv):
            cos, sin = cos_sin[layer]
            mu = rotate(mu, cos, sin)
            sigma = rotate_sigma(p["sigma"], cos, sin)
        return mu, sigma * p["sigma_scale"]

    def rotary(self, kv: int) -> bool:
        """True if block kind ``kv`` is modelled before RoPE."""
        return self.spec.rope and kv == K

    def mean(self, params: dict, values: torch.Tensor, kv: int, layer: int, cos_sin) -> torch.Tensor:
        """The predicted mean of block (kv, layer), float64 [T, H, D], before RoPE if rotary."""
        p = params[(kv, layer)]
        t = values.shape[2]
        acc = p["bias"].expand(t, -1)  # [T, C]
        sources = self.spec.sources(kv, layer, self._layers)
        if sources:
            x = torch.cat(
                [block_features(values, skv, sl, cos_sin, self.rotary(skv), int(self.calib.in_exp[skv, sl])) for skv, sl in sources],
                dim=1,
            )  # [T, F]
            acc = (x @ p["coef_t"]).add_(acc)  # exact integers (module docstring)
            return acc.mul_(p["unit"]).reshape(t, self._heads, self._dim)
        return (acc * p["unit"]).reshape(t, self._heads, self._dim)
