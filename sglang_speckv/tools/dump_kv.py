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
# Model classes whose Hugging Face cache holds post-RoPE keys with the rotate_half RoPE
# convention and a plain [batch, kv_heads, tokens, head_dim] layout. Only Llama has been
# checked against SGLang (SmolLM2 is a Llama); others are refused rather than guessed.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
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


def load_model(path: str | Path, dtype: torch.dtype = torch.bfloat16):
    """(model, tokenizer) from a Hugging Face checkpoint directory or a GGUF file, offline.

    Raises FileNotFoundError for a missing path and ValueError for an architecture whose KV
    layout this module does not know (SUPPORTED_ARCHITECTURES)."""
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
            "(build the SmolLM2 checkpoint with `speckv prepare-model`)"
        )
    config = AutoConfig.from_pretrained(folder, **extra)
    archs = tuple(getattr(config, "architectures", None) or ())
    if not archs and getattr(config, "model_type", "") == "llama":  # GGUF configs omit it
        archs = ("LlamaForCausalLM",)
    if not set(archs) & set(SUPPORTED_ARCHITECTURES):
        raise ValueError(f"unsupported architecture {archs or config.model_type!r}; supported: {SUPPORTED_ARCHITECTURES}")
    tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **extra).eval()
    return model, tokenizer


def model_identity(model) -> str:
    """xxh64 (16 hex digits) of what determines the KV cache's meaning: the KV head layout,
    the RoPE parameters, and the bf16 bytes of every layer's input norm and K/V projections.
    The same model loaded from its GGUF or from a bf16 checkpoint made from it (prepare-model)
    gives the same identity; a different model, or a different quantisation, does not."""
    import xxhash

    h = xxhash.xxh64()
    h.update(json.dumps(kv_layout(model), sort_keys=True).encode())
    for layer in model.model.layers:
        for w in (layer.input_layernorm.weight, layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight):
            h.update(w.detach().to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def kv_layout(model) -> dict:
    """The facts about a model's KV cache that predictors need: layers, kv_heads, head_dim,
    rope_theta and max_positions. Refuses RoPE variants other than the default one."""
    cfg = model.config
    rope = getattr(cfg, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", None))
    if rope_type != "default" or theta is None:
        raise ValueError(f"only the default RoPE is supported (got rope_type={rope_type!r}, theta={theta})")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return {
        "layers": int(cfg.num_hidden_layers),
        "kv_heads": int(cfg.num_key_value_heads),
        "head_dim": int(head_dim),
        "rope_theta": float(theta),
        "max_positions": int(cfg.max_position_embeddings),
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


@torch.no_grad()
def compute_kv(model, token_ids: torch.Tensor, chunk: int = PREFILL_CHUNK, progress: bool = True):
    """(k, v) in the model's dtype, each [layers, kv_heads, tokens, head_dim], keys after
    RoPE: the prefill of ``token_ids`` (positions 0 ..) in chunks of ``chunk`` tokens."""
    from tqdm import tqdm
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    starts = range(0, len(token_ids), chunk)
    for s in tqdm(starts, desc="prefill", unit="chunk", disable=not progress):
        ids = token_ids[s : s + chunk].unsqueeze(0)
        model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    k = torch.stack([layer.keys[0] for layer in cache.layers])  # [L, H, T, D]
    v = torch.stack([layer.values[0] for layer in cache.layers])
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
