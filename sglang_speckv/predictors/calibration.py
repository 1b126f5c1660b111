"""Calibration files: the fitted parameters of the calibrated predictors, and what they fit.

A calibration belongs to one model (``model`` = dump_kv.model_identity), one KV dtype and
one head layout; ``speckv calibrate`` writes it (sglang_speckv/calibrate.py) and
``load_calibration`` reads it back, refusing anything inconsistent with a CalibrationError
that says what is wrong. The file is safetensors (tensors + string metadata), never pickle.

Metadata:
    format       FORMAT ("speckv-calibration/1"); any other value is refused
    model        xxh64 hex of the model's KV-relevant weights (dump_kv.model_identity)
    kv_dtype     "bf16" or "fp8_e4m3": the stored dtype the parameters are fitted to
    layout       JSON {layers, kv_heads, head_dim, max_positions, rotary_dim, rope_inv_freq,
                 layer_rope} (dump_kv.kv_layout: the RoPE frequency vectors, float32 values
                 as exact floats, and which of them each layer uses)
    predictors   JSON {name: {"w_wide": int, "kappa": int}} (the coder's mixture, fitted)
    fingerprint  16 hex digits: xxh64 of everything above and of every tensor (name,
                 dtype, shape, bytes); recomputed and checked at load

Tensors (C = kv_heads * head_dim outputs of one (kv, layer) block, kv 0 = K, 1 = V):
    fp8_scale       float32 [2, layers]  per-layer K/V scale of the fp8 cache (1 for bf16)
    in_exp          int32 [2, layers]    fixed-point exponent of each block used as input
    rope.cos_lo, rope.sin_lo  float64 [kinds, ROPE_LO, rotary_dim/2]  cos/sin(p * inv_freq), p < ROPE_LO
    rope.cos_hi, rope.sin_hi  float64 [kinds, n_hi, rotary_dim/2]     same at p = i * ROPE_LO
                              (kinds = len(rope_inv_freq): one per distinct RoPE, e.g. Gemma 3's
                              sliding and full layers)
    {name}.{k|v}{layer}.coef         int16 [C, F]  fixed-point coefficients (absent if F = 0)
    {name}.{k|v}{layer}.bias         int64 [C]
    {name}.{k|v}{layer}.shift        int32 [C]     mu = (coef . x_q + bias) * 2^-shift
    {name}.{k|v}{layer}.sigma        float32 [C]   residual std (keys: before RoPE if rotary)
    {name}.{k|v}{layer}.sigma_scale  float32 [C]   calibrated multiplier of the final sigma

The RoPE tables are data, not recomputed: cos/sin from two libms can differ in the last
bit, and both sides of a blob must see the same values (docs/DESIGN.md invariant 3).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import xxhash

FORMAT = "speckv-calibration/2"  # /2: per-layer-type and partial RoPE, int16 coefficients
KV_DTYPES = ("bf16", "fp8_e4m3")
# Positions p = hi * ROPE_LO + lo; cos/sin(p) from the two tables by the angle-addition
# formula. 256 rows keep both tables small (256 + max_positions / 256 rows).
ROPE_LO = 256
# Fixed-point bounds of the linear predictors (see linear.py): inputs |x_q| <= 2^INPUT_BITS,
# coefficients |c_q| <= 2^COEF_BITS, |bias| <= 2^BIAS_BITS, at most 2^FEATURE_BITS inputs:
# 2^16 * 2^15 * 2^15 + 2^50 < 2^53, so every dot product is an integer that float64 holds
# exactly, whatever the summation order.
INPUT_BITS = 15
# Coefficients are int16 (COEF_BITS 15): they are most of the file (half the size of int32),
# and 15 bits relative to a channel's largest coefficient are far below the residual's spread.
COEF_BITS = 15
BIAS_BITS = 50
FEATURE_BITS = 16
SHIFT_RANGE = (-60, 110)  # 2^-shift stays a normal float64 and mu stays finite


class CalibrationError(ValueError):
    """A calibration file that is missing, corrupt, or does not fit what it is used with."""


@dataclass
class Block:
    """Parameters of one (kv, layer) block of one predictor (shapes in the module docstring)."""

    coef: torch.Tensor | None  # int16 [C, F] or None when the block has no inputs
    bias: torch.Tensor  # int64 [C]
    shift: torch.Tensor  # int32 [C]
    sigma: torch.Tensor  # float32 [C]
    sigma_scale: torch.Tensor  # float32 [C]


@dataclass
class Calibration:
    model: str
    kv_dtype: str
    layout: dict
    fp8_scale: torch.Tensor  # float32 [2, layers]
    in_exp: torch.Tensor  # int32 [2, layers]
    rope: dict[str, torch.Tensor]  # cos_lo, sin_lo, cos_hi, sin_hi
    blocks: dict[str, dict[tuple[int, int], Block]] = field(default_factory=dict)  # name -> (kv, layer) -> Block
    mixture: dict[str, dict[str, int]] = field(default_factory=dict)  # name -> {"w_wide", "kappa"}

    @property
    def fingerprint(self) -> int:
        """u64 identifying this calibration (also recorded in the file and checked at load)."""
        meta, tensors = self._serialise()
        return _digest(meta, tensors)

    def _serialise(self) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
        meta = {
            "format": FORMAT,
            "model": self.model,
            "kv_dtype": self.kv_dtype,
            "layout": json.dumps(self.layout, sort_keys=True),
            "predictors": json.dumps(self.mixture, sort_keys=True),
        }
        tensors = {"fp8_scale": self.fp8_scale, "in_exp": self.in_exp}
        tensors.update({f"rope.{k}": v for k, v in self.rope.items()})
        for name, blocks in self.blocks.items():
            for (kv, layer), b in blocks.items():
                prefix = f"{name}.{'kv'[kv]}{layer}."
                if b.coef is not None:
                    tensors[prefix + "coef"] = b.coef
                tensors[prefix + "bias"] = b.bias
                tensors[prefix + "shift"] = b.shift
                tensors[prefix + "sigma"] = b.sigma
                tensors[prefix + "sigma_scale"] = b.sigma_scale
        return meta, {k: v.contiguous() for k, v in tensors.items()}

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        meta, tensors = self._serialise()
        meta["fingerprint"] = f"{_digest(meta, tensors):016x}"
        save_file(tensors, str(path), metadata=meta)


def _digest(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> int:
    h = xxhash.xxh64()
    for key in sorted(meta):
        if key != "fingerprint":
            h.update(f"{key}={meta[key]}\n".encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.intdigest()


_BLOCK_DTYPES = {"coef": torch.int16, "bias": torch.int64, "shift": torch.int32, "sigma": torch.float32, "sigma_scale": torch.float32}


def load_calibration(path: str | Path) -> Calibration:
    """Read and validate a calibration file. Raises CalibrationError (what is wrong, what to
    do) for a missing file, a foreign or corrupt file, or inconsistent parameters."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration {path} does not exist (write one with `speckv calibrate`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CalibrationError(f"{path} is not a readable safetensors file: {exc}") from None
    if meta.get("format") != FORMAT:
        raise CalibrationError(f"{path} is not a {FORMAT} file (format={meta.get('format')!r}); recalibrate with this version")
    if meta.get("fingerprint") != f"{_digest(meta, tensors):016x}":
        raise CalibrationError(f"{path} is corrupt: its fingerprint does not match its contents")
    try:
        calib = _from_parts(meta, tensors)
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise CalibrationError(f"{path} is incomplete or malformed ({exc!r}); recalibrate") from None
    validate(calib)
    return calib


def _from_parts(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> Calibration:
    mixture = json.loads(meta["predictors"])
    blocks: dict[str, dict[tuple[int, int], Block]] = {}
    layers = json.loads(meta["layout"])["layers"]
    for name in mixture:
        blocks[name] = {}
        for kv in (0, 1):
            for layer in range(layers):
                prefix = f"{name}.{'kv'[kv]}{layer}."
                blocks[name][(kv, layer)] = Block(
                    tensors.get(prefix + "coef"), *(tensors[prefix + p] for p in ("bias", "shift", "sigma", "sigma_scale"))
                )
    rope = {k: tensors[f"rope.{k}"] for k in ("cos_lo", "sin_lo", "cos_hi", "sin_hi")}
    return Calibration(meta["model"], meta["kv_dtype"], json.loads(meta["layout"]), tensors["fp8_scale"], tensors["in_exp"], rope, blocks, mixture)


def validate(calib: Calibration) -> None:
    """Check every shape, dtype and fixed-point bound the predictors rely on."""

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise CalibrationError(f"calibration for model {calib.model}: {what}; recalibrate")

    need(calib.kv_dtype in KV_DTYPES, f"unknown kv dtype {calib.kv_dtype!r}")
    lay = calib.layout
    need(all(isinstance(lay.get(k), int) and lay[k] > 0 for k in ("layers", "kv_heads", "head_dim", "max_positions")), f"bad layout {lay}")
    freqs, layer_rope = lay.get("rope_inv_freq"), lay.get("layer_rope")
    need(isinstance(freqs, list) and len(freqs) > 0 and all(isinstance(f, list) for f in freqs), "layout has no rope_inv_freq")
    need(isinstance(lay.get("rotary_dim"), int) and 0 < lay["rotary_dim"] <= lay["head_dim"] and lay["rotary_dim"] % 2 == 0
         and all(2 * len(f) == lay["rotary_dim"] for f in freqs), f"rotary_dim {lay.get('rotary_dim')} does not fit the layout")
    need(isinstance(layer_rope, list) and len(layer_rope) == lay["layers"] and all(0 <= i < len(freqs) for i in layer_rope),
         "layer_rope must name a RoPE for every layer")
    n_layers, c = lay["layers"], lay["kv_heads"] * lay["head_dim"]
    need(calib.fp8_scale.dtype == torch.float32 and calib.fp8_scale.shape == (2, n_layers), "fp8_scale must be float32 [2, layers]")
    need(bool(torch.isfinite(calib.fp8_scale).all() and (calib.fp8_scale > 0).all()), "fp8 scales must be finite and positive")
    need(calib.in_exp.dtype == torch.int32 and calib.in_exp.shape == (2, n_layers), "in_exp must be int32 [2, layers]")
    need(bool((calib.in_exp.abs() <= 60).all()), "in_exp out of range")
    half, n_hi, kinds = lay["rotary_dim"] // 2, -(-lay["max_positions"] // ROPE_LO), len(freqs)
    for k, rows in (("cos_lo", ROPE_LO), ("sin_lo", ROPE_LO), ("cos_hi", n_hi), ("sin_hi", n_hi)):
        t = calib.rope[k]
        need(t.dtype == torch.float64 and t.shape == (kinds, rows, half) and bool(torch.isfinite(t).all()),
             f"rope table {k} must be float64 [{kinds}, {rows}, {half}]")
    for name, blocks in calib.blocks.items():
        mix = calib.mixture[name]
        need(0 <= mix.get("w_wide", -1) <= 255 and 0 <= mix.get("kappa", -1) <= 7, f"{name}: bad mixture {mix}")
        for (kv, layer), b in blocks.items():
            where = f"{name} block {'KV'[kv]}{layer}"
            for p, dt in _BLOCK_DTYPES.items():
                t = getattr(b, p)
                if t is None and p == "coef":
                    continue
                need(t.dtype == dt and t.shape[0] == c, f"{where}.{p} must be {dt} with {c} rows")
            if b.coef is not None:
                need(b.coef.dim() == 2 and 0 < b.coef.shape[1] <= 1 << FEATURE_BITS, f"{where}.coef has a bad shape")
                need(bool((b.coef.to(torch.int32).abs() < 1 << COEF_BITS).all()), f"{where}.coef reaches 2^{COEF_BITS}")
            need(bool((b.bias.abs() <= 1 << BIAS_BITS).all()), f"{where}.bias exceeds 2^{BIAS_BITS}")
            need(bool(((b.shift >= SHIFT_RANGE[0]) & (b.shift <= SHIFT_RANGE[1])).all()), f"{where}.shift out of range")
            for p in ("sigma", "sigma_scale"):
                t = getattr(b, p)
                need(bool(torch.isfinite(t).all() and (t > 0).all()), f"{where}.{p} must be finite and positive")


def rope_tables(layout: dict) -> dict[str, torch.Tensor]:
    """cos/sin tables (module docstring) of every RoPE in ``layout["rope_inv_freq"]`` (the
    model's own float32 frequencies, whatever theta or frequency scaling made them), computed
    once in float64 and then stored as data."""
    inv_freq = torch.tensor(layout["rope_inv_freq"], dtype=torch.float64)  # [kinds, R/2]
    lo = torch.arange(ROPE_LO, dtype=torch.float64)[None, :, None] * inv_freq[:, None, :]
    hi = torch.arange(-(-layout["max_positions"] // ROPE_LO), dtype=torch.float64)[None, :, None] * ROPE_LO * inv_freq[:, None, :]
    return {"cos_lo": lo.cos(), "sin_lo": lo.sin(), "cos_hi": hi.cos(), "sin_hi": hi.sin()}
