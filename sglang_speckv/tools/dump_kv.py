"""``speckv dump-kv``: run a causal LM on text, offline, and write its KV cache as a dump file.

The dump is what SGLang would hold for that text: keys after RoPE (SGLang stores rotated
keys), values as they are, in the KV dtype SGLang would store:

* ``bf16``: the model runs in bf16 and its K/V are stored as computed.
* ``fp8_e4m3``: like SGLang's fp8 KV path, every layer's K and V are divided by a per-layer
  scale (one float32 for K and one for V per layer), clamped to the e4m3 range +-448 and
  rounded to e4m3. The scales are recorded in the file; by default they are the dumped
  text's own absmax / 448, or those of a calibration (``--scales-from``) so that the
  calibrated predictors see the scales they were fitted to.

Dump format (safetensors, read by ``speckv compress``):

| tensor | shape | dtype |
|---|---|---|
| ``k``, ``v`` | [layers, kv_heads, tokens, head_dim] | bf16 or float8_e4m3fn |
| ``k_scale``, ``v_scale`` (fp8 only) | [layers] | float32 |
| ``token_ids`` | [tokens] | int64 |

metadata: ``kv_dtype``, ``position`` (absolute position of the first token, 0 here),
``model`` (``model_identity``), ``format`` (DUMP_FORMAT).

The texts are joined (blank line between files) into one sequence, truncated to
``--max-tokens``, and prefilled in chunks (the KV of a causal LM does not depend on how its
prefill is chunked, up to kernel rounding).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

DUMP_FORMAT = "speckv-kv-dump/1"
KV_DTYPES = ("bf16", "fp8_e4m3")
# Largest relative error between the un-rotated stored keys and the pre-RoPE keys that
# check_rope accepts: bf16 rounding of the rotation gives ~0.3%; a wrong RoPE gives ~100%.
ROPE_CHECK_TOLERANCE = 0.03
FP8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn value
DEFAULT_MAX_TOKENS = 2048
# Prefill chunk: bounds the attention matrix ([heads, chunk, tokens] float32) on small hosts.
PREFILL_CHUNK = 512


@dataclass
class KVDump:
    """The KV cache of one token sequence.

    ``k``, ``v``: [layers, kv_heads, tokens, head_dim] in the stored dtype (bf16 or
    float8_e4m3fn); ``scale``: float32 [2, layers] (K, V) for fp8, None for bf16.
    """

    k: torch.Tensor
    v: torch.Tensor
    kv_dtype: str
    token_ids: torch.Tensor  # int64 [tokens]
    position: int = 0
    scale: torch.Tensor | None = None
    model: str = ""

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        tensors = {"k": self.k.contiguous(), "v": self.v.contiguous(), "token_ids": self.token_ids.contiguous()}
        if self.scale is not None:
            tensors["k_scale"] = self.scale[0].contiguous()
            tensors["v_scale"] = self.scale[1].contiguous()
        meta = {"format": DUMP_FORMAT, "kv_dtype": self.kv_dtype, "position": str(self.position), "model": self.model}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> "KVDump":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"KV dump {path} does not exist (write one with `speckv dump-kv`)")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            names = set(f.keys())
            missing = {"k", "v", "token_ids"} - names
            if meta.get("format") != DUMP_FORMAT or missing:
                raise ValueError(f"{path} is not a {DUMP_FORMAT} file (format={meta.get('format')!r}, missing {sorted(missing)})")
            t = {name: f.get_tensor(name) for name in names}
        scale = torch.stack([t["k_scale"], t["v_scale"]]) if "k_scale" in t else None
        return cls(t["k"], t["v"], meta["kv_dtype"], t["token_ids"], int(meta.get("position", 0)), scale, meta.get("model", ""))


class UnsupportedModel(ValueError):
    """A model whose KV cache the calibrated predictors do not cover; the message names the
    architecture and the missing piece."""


def architecture(config) -> str:
    """The model's class name from its config (``model_type`` when the config names none)."""
    archs = getattr(config, "architectures", None) or ()
    return archs[0] if archs else f"model_type {getattr(config, 'model_type', '?')!r}"


def check_config(config) -> None:
    """Refuse, before loading any weight, a model whose KV layout is not per-head K/V with
    RoPE: MLA latents (DeepSeek-V2/V3), position schemes without RoPE, hybrid layers."""
    arch = architecture(config)
    cfg = config.get_text_config()
    if getattr(cfg, "kv_lora_rank", None):
        raise UnsupportedModel(
            f"{arch}: its KV cache is an MLA latent (kv_lora_rank={cfg.kv_lora_rank}); dump-kv, calibrate and the "
            "calibrated predictors cover per-head K/V only (missing: the MLA latent layout). Use predictor 'page_stats'."
        )
    if not getattr(cfg, "rope_parameters", None):
        raise UnsupportedModel(
            f"{arch}: its config has no RoPE parameters (rope_parameters); the calibrated predictors model keys "
            "before RoPE (missing: a position scheme other than RoPE). Use predictor 'page_stats'."
        )
    other = set(getattr(cfg, "layer_types", None) or ()) - {"full_attention", "sliding_attention"}
    if other:
        raise UnsupportedModel(f"{arch}: layer types {sorted(other)} hold no per-head K/V (missing: hybrid/linear-attention layers)")


def load_model(path: str | Path, dtype: torch.dtype = torch.bfloat16):
    """(model, tokenizer) from a Hugging Face checkpoint directory or a GGUF file, offline.

    Raises FileNotFoundError for a missing path and UnsupportedModel (a ValueError) for a
    model whose KV layout the calibrated predictors do not cover (check_config, kv_layout)."""
    import os

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub
    path = Path(path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        folder, extra = str(path.parent), {"gguf_file": path.name}
    elif path.is_dir() and (path / "config.json").is_file():
        folder, extra = str(path), {}
    else:
        raise FileNotFoundError(
            f"model {path} is neither a checkpoint directory with config.json nor a .gguf file "
            "(build a checkpoint with `speckv prepare-model`)"
        )
    try:
        config = AutoConfig.from_pretrained(folder, **extra)
    except (ValueError, KeyError) as exc:  # a model_type this transformers does not know
        raise UnsupportedModel(f"{path}: transformers cannot read its config ({exc})") from None
    check_config(config)
    tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **extra).eval()
    kv_layout(model)  # refuse RoPE variants we cannot tabulate now, not after a long prefill
    return model, tokenizer


def model_identity(model) -> str:
    """xxh64 (16 hex digits) of what determines the KV cache's meaning: the KV layout (heads,
    RoPE frequencies) and the bf16 bytes of every parameter. The same model loaded from its
    GGUF or from a bf16 checkpoint made from it (prepare-model) gives the same identity; a
    different model, or a different quantisation, does not."""
    import xxhash

    h = xxhash.xxh64()
    h.update(json.dumps(kv_layout(model), sort_keys=True).encode())
    for name, w in model.named_parameters():
        h.update(name.encode())
        h.update(w.detach().to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def kv_layout(model) -> dict:
    """The facts about a model's KV cache that predictors need, read from the model's config
    and its own rotary-embedding module (so theta, scaling types that only change the
    frequencies, partial rotary dims and per-layer-type RoPE all come out right):

    layers, kv_heads, head_dim, max_positions; rotary_dim (the first rotary_dim channels of
    a key are rotated, pairs (i, i + rotary_dim/2), the rest pass through); rope_inv_freq
    (the distinct float32 frequency vectors, as exact floats); layer_rope (per layer, its
    index in rope_inv_freq). Raises UnsupportedModel for RoPE that tables cannot describe."""
    return _layout(model.config, getattr(model.get_decoder(), "rotary_emb", None))


def layout_from_config(config) -> dict:
    """kv_layout without weights (e.g. in a server, from the served model's config.json): the
    model is built on the meta device only to find its rotary-embedding class, which is then
    built for real (it holds no weights, only the frequencies)."""
    from transformers import AutoModelForCausalLM

    check_config(config)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    rot = getattr(skeleton.get_decoder(), "rotary_emb", None)
    return _layout(config, None if rot is None else type(rot)(config=config.get_text_config()))


def _layout(config, rot) -> dict:
    cfg = config.get_text_config()
    arch = architecture(config)
    if rot is None:
        raise UnsupportedModel(f"{arch}: no rotary-embedding module (model.rotary_emb) to read RoPE frequencies from")
    layers = int(cfg.num_hidden_layers)
    types = getattr(cfg, "layer_types", None) or [None] * layers
    kinds: list[list[float]] = []
    layer_rope = []
    for t in types:
        inv = getattr(rot, f"{t}_inv_freq", None) if t else None
        inv = inv if inv is not None else getattr(rot, "inv_freq", None)
        scaling = getattr(rot, f"{t}_attention_scaling", None) if t else None
        scaling = scaling if scaling is not None else getattr(rot, "attention_scaling", 1.0)
        rope_type = rot.rope_type.get(t) if isinstance(rot.rope_type, dict) else getattr(rot, "rope_type", "default")
        if inv is None:
            raise UnsupportedModel(f"{arch}: its rotary module has no inv_freq for layer type {t!r}")
        if rope_type in ("dynamic", "longrope"):
            raise UnsupportedModel(f"{arch}: RoPE type {rope_type!r} changes its frequencies with the sequence length (missing: position-dependent RoPE tables)")
        if float(scaling) != 1.0:
            raise UnsupportedModel(f"{arch}: RoPE type {rope_type!r} scales keys by {float(scaling)} (missing: RoPE attention scaling)")
        freqs = [float(f) for f in inv.to(torch.float32).tolist()]
        if freqs not in kinds:
            kinds.append(freqs)
        layer_rope.append(kinds.index(freqs))
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    rotary_dim = 2 * len(kinds[0])
    if any(2 * len(k) != rotary_dim for k in kinds) or not 0 < rotary_dim <= head_dim:
        raise UnsupportedModel(f"{arch}: rotary dims {sorted({2 * len(k) for k in kinds})} do not fit head_dim {head_dim}")
    return {
        "layers": layers,
        "kv_heads": int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads),
        "head_dim": head_dim,
        "max_positions": int(cfg.max_position_embeddings),
        "rotary_dim": rotary_dim,
        "rope_inv_freq": kinds,
        "layer_rope": layer_rope,
    }


def read_texts(paths) -> str:
    """The files' contents joined by blank lines. Clear error for a missing file."""
    parts = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise FileNotFoundError(f"text file {p} does not exist")
        parts.append(p.read_text(encoding="utf-8"))
    if not parts:
        raise ValueError("no text files given")
    return "\n\n".join(parts)


def tokenize(tokenizer, text: str, max_tokens: int) -> torch.Tensor:
    """int64 [tokens] (at most max_tokens) of the text, without special tokens."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if len(ids) == 0:
        raise ValueError("the text has no tokens")
    return ids[:max_tokens].to(torch.int64)


class _RecordingCache:
    """Wraps a transformers DynamicCache: every (key, value) an attention layer hands to the
    cache (what the model attends to, so what SGLang stores: keys after RoPE and after any
    Q/K norm, values as they are) is also kept, whole, per layer. The cache itself may drop
    old tokens (sliding-window layers); the record does not."""

    def __init__(self, config):
        from transformers import DynamicCache

        class Recording(DynamicCache):
            def update(inner, key_states, value_states, layer_idx, *args, **kwargs):
                self.record.setdefault(layer_idx, []).append((key_states[0].clone(), value_states[0].clone()))
                return super().update(key_states, value_states, layer_idx, *args, **kwargs)

        self.record: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.cache = Recording(config=config)


def _attention_modules(model) -> dict[int, torch.nn.Module]:
    return {m.layer_idx: m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "k_proj")}


def _pre_rope_hooks(model, out: dict[int, torch.Tensor]) -> list:
    """Forward hooks recording each layer's keys before RoPE: the output of the attention
    module's k_norm (Qwen3, Gemma 3) or else its k_proj. [] if the modules are not there."""
    handles = []
    for layer, attn in _attention_modules(model).items():
        src = getattr(attn, "k_norm", None) or attn.k_proj
        handles.append(src.register_forward_hook(lambda mod, args, o, layer=layer: out.setdefault(layer, o.detach().clone())))
    return handles


def check_rope(layout: dict, post: dict[int, torch.Tensor], pre: dict[int, torch.Tensor], arch: str) -> None:
    """The keys the model stored (``post`` [H, T, D] per layer, positions 0..T-1), un-rotated
    with the RoPE tables of ``layout``, must equal the keys before RoPE (``pre``, from the
    hooks): proof that the tables describe this model's RoPE (convention, theta, scaling,
    rotary dims, per-layer types). Raises UnsupportedModel naming the first layer that differs."""
    from sglang_speckv.predictors.calibration import rope_tables
    from sglang_speckv.predictors.linear import rope_cos_sin, rotate

    h, t, d = post[0].shape
    cos_sin = rope_cos_sin(rope_tables(layout), torch.arange(t), layout["layer_rope"])
    for layer, k in sorted(post.items()):
        cos, sin = cos_sin[layer]
        back = rotate(k.transpose(0, 1).to(torch.float64), cos, -sin)  # [T, H, D]
        o = pre[layer][0].to(torch.float64)
        candidates = [o.reshape(t, h, d)] if o.dim() == 2 else [o.transpose(0, 1), o]  # [T, H*D], [H, T, D] or [T, H, D]
        errors = [float((back - c).norm() / c.norm().clamp_min(1e-30)) for c in candidates if c.shape == back.shape]
        if not errors or min(errors) > ROPE_CHECK_TOLERANCE:
            raise UnsupportedModel(
                f"{arch}: layer {layer}'s stored keys are not its pre-RoPE keys rotated by rotate_half RoPE with the "
                f"config's frequencies (relative error {min(errors, default=float('nan')):.3f}; missing: this RoPE variant)"
            )


@torch.no_grad()
def compute_kv(model, token_ids: torch.Tensor, chunk: int = PREFILL_CHUNK, progress: bool = True):
    """(k, v) in the model's dtype, each [layers, kv_heads, tokens, head_dim], keys after
    RoPE: the prefill of ``token_ids`` (positions 0 ..) in chunks of ``chunk`` tokens,
    recorded where the attention layers write the cache (_RecordingCache). On the first
    chunk, hooks also record the keys before RoPE and check_rope checks the RoPE tables."""
    import warnings

    from tqdm import tqdm

    layout = kv_layout(model)
    rec = _RecordingCache(model.config)
    pre: dict[int, torch.Tensor] = {}
    handles = _pre_rope_hooks(model, pre)
    if not handles:
        warnings.warn(f"{architecture(model.config)}: no k_proj in its attention modules; RoPE tables not checked")
    try:
        for s in tqdm(range(0, len(token_ids), chunk), desc="prefill", unit="chunk", disable=not progress):
            ids = token_ids[s : s + chunk].unsqueeze(0)
            model(input_ids=ids, past_key_values=rec.cache, use_cache=True, logits_to_keep=1)
            if s == 0 and handles:
                for handle in handles:
                    handle.remove()
                handles = []
                check_rope(layout, {l: kv[0][0] for l, kv in rec.record.items()}, pre, architecture(model.config))
    finally:
        for handle in handles:
            handle.remove()
    if sorted(rec.record) != list(range(layout["layers"])):
        raise UnsupportedModel(f"{architecture(model.config)}: cache written for layers {sorted(rec.record)}, expected 0..{layout['layers'] - 1} (missing: shared/skipped KV layers)")
    k = torch.stack([torch.cat([c[0] for c in rec.record[l]], dim=1) for l in range(layout["layers"])])  # [L, H, T, D]
    v = torch.stack([torch.cat([c[1] for c in rec.record[l]], dim=1) for l in range(layout["layers"])])
    return k, v


def fp8_scales(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """float32 [2, layers]: per-layer absmax / 448 of K and V (1.0 for an all-zero layer)."""
    amax = torch.stack([k.float().abs().amax(dim=(1, 2, 3)), v.float().abs().amax(dim=(1, 2, 3))])
    amax = torch.where(amax > 0, amax, torch.ones_like(amax))
    return (amax / FP8_E4M3_MAX).to(torch.float32)


def to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [layers, ...] / scale [layers] -> float8_e4m3fn, saturated at +-448 (as SGLang's
    scaled fp8 quantisation does; a plain cast would turn out-of-range values into NaN)."""
    s = scale.to(torch.float32).view(-1, *([1] * (x.dim() - 1)))
    return (x.to(torch.float32) / s).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)


def make_dump(model, token_ids: torch.Tensor, kv_dtype: str, scale: torch.Tensor | None = None, progress: bool = True) -> KVDump:
    """The KVDump of ``token_ids`` under ``model`` in ``kv_dtype``; ``scale`` (float32
    [2, layers]) fixes the fp8 scales, default the data's own absmax / 448."""
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv dtype {kv_dtype!r} not supported; expected one of {KV_DTYPES}")
    k, v = compute_kv(model, token_ids, progress=progress)
    if kv_dtype == "bf16":
        return KVDump(k.to(torch.bfloat16), v.to(torch.bfloat16), kv_dtype, token_ids, 0, None, model_identity(model))
    if scale is None:
        scale = fp8_scales(k, v)
    if scale.shape != (2, k.shape[0]):
        raise ValueError(f"fp8 scales have shape {tuple(scale.shape)}, expected (2, {k.shape[0]})")
    return KVDump(to_fp8(k, scale[0]), to_fp8(v, scale[1]), kv_dtype, token_ids, 0, scale, model_identity(model))


def dump_kv_command(parser):
    parser.add_argument("--model", required=True, help="HF checkpoint directory or .gguf file")
    parser.add_argument("--text", required=True, nargs="+", help="UTF-8 text file(s), joined into one sequence")
    parser.add_argument("--out", required=True, help="output .safetensors dump")
    parser.add_argument("--kv-dtype", default="bf16", choices=KV_DTYPES)
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="truncate the sequence (default %(default)s)")
    parser.add_argument("--scales-from", default=None, help="fp8: take the per-layer scales from this calibration file")

    def run(args) -> int:
        scale = None
        if args.scales_from:
            from sglang_speckv.predictors.calibration import load_calibration

            calib = load_calibration(args.scales_from)
            if calib.kv_dtype != args.kv_dtype:
                raise SystemExit(f"--scales-from {args.scales_from} is a {calib.kv_dtype} calibration, not {args.kv_dtype}")
            scale = calib.fp8_scale
        model, tokenizer = load_model(args.model)
        ids = tokenize(tokenizer, read_texts(args.text), args.max_tokens)
        dump = make_dump(model, ids, args.kv_dtype, scale)
        if args.scales_from and dump.model != calib.model:
            raise SystemExit(f"{args.scales_from} was calibrated on model {calib.model}, not {dump.model} ({args.model})")
        dump.save(args.out)
        layers, heads, tokens, dim = dump.k.shape
        print(f"wrote {args.out}: {tokens} tokens, {layers} layers x {heads} kv heads x {dim} dims, {args.kv_dtype}")
        return 0

    return run
