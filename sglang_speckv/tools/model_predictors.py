"""Model predictors, measured offline: the target's own weights, made cheaper, run on the
same tokens. Their mu is a KV cache computed by a cheaper model; sigma is a per-(kv, layer,
channel) residual RMS from calibration text (bench_frontier.py fits and measures them).

* ``quantized_copy(model, scheme)``: the target with its linear layers quantised
  (fake-quantised in bf16: the numbers a real low-precision kernel would see):
  - ``int8``: W8A8, int8 weights per output channel, int8 activations per token (dynamic);
  - ``fp8``: W8A8, float8 e4m3 weights per output channel and activations per token;
  - ``int8_w``, ``fp8_w``: W8A16, the same weights, activations left in bf16;
  - ``int4``: W4A16, symmetric int4 weights in groups of 64 along the input.
  The embeddings, norms, attention and lm_head stay as they are.
* Early exit (``hidden_states``): the target's first k layers exactly (their KV is the
  target's, bit for bit, if the decoder recomputes them with the same kernels), then linear
  probes from the hidden state entering layer k to every deeper layer's K (before RoPE) and
  V, fitted by ridge regression on calibration text.

Not serving-path predictors yet: they run float kernels whose results may differ across
devices and batch shapes, which the coder does not tolerate (docs/DESIGN.md invariant 3).
``prefill_macs`` gives the compute each one spends as a fraction of the target's prefill.
"""

from __future__ import annotations

import copy

import torch

SCHEMES = ("int8", "fp8", "int8_w", "fp8_w", "int4")
# W4A16 group size: GPTQ/AWQ use 64-128; 64 divides SmolLM2's 576 and 1536. Not the GGUF's
# Q4_1 (asymmetric, groups of 32), whose grid would reproduce the target's weights exactly.
INT4_GROUP = 64
WEIGHT_KIND = {"int8": "int8", "fp8": "fp8", "int8_w": "int8", "fp8_w": "fp8", "int4": "int4"}
QUANTIZED_ACTIVATIONS = ("int8", "fp8")  # W8A8 schemes
FP8_MAX = 448.0


def _fake_quant_rows(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Quantise-dequantise the rows of x (float32 [..., n]) with one absmax scale per row."""
    amax = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)
    if kind == "int8":
        s = amax / 127
        return (x / s).round().clamp(-127, 127) * s
    if kind == "fp8":
        s = amax / FP8_MAX
        return (x / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(torch.float32) * s
    if kind == "int4":
        s = amax / 7
        return (x / s).round().clamp(-8, 7) * s
    raise ValueError(f"unknown quantisation {kind!r}")


def quantize_weight(w: torch.Tensor, scheme: str) -> torch.Tensor:
    """Weight [out, in] quantised as ``scheme`` says (module docstring), same dtype."""
    x = w.detach().to(torch.float32)
    if scheme == "int4":
        out, n = x.shape
        if n % INT4_GROUP:
            raise ValueError(f"int4 groups of {INT4_GROUP} need in_features % {INT4_GROUP} == 0, got {n}")
        q = _fake_quant_rows(x.reshape(out, n // INT4_GROUP, INT4_GROUP), "int4").reshape(out, n)
    else:
        q = _fake_quant_rows(x, WEIGHT_KIND[scheme])
    return q.to(w.dtype)


def quantized_copy(model, scheme: str, exact_layers: int = 0):
    """A copy of ``model`` whose decoder-layer linear layers are quantised as ``scheme``,
    except the first ``exact_layers`` layers (kept exact: their KV is the target's)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; expected one of {SCHEMES}")
    q = copy.deepcopy(model)

    def quantize_input(module, args):
        (x,) = args
        return (_fake_quant_rows(x.to(torch.float32), scheme).to(x.dtype),)

    for layer in q.model.layers[exact_layers:]:
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.data = quantize_weight(module.weight.data, scheme)
                if scheme in QUANTIZED_ACTIVATIONS:
                    module.register_forward_pre_hook(quantize_input)
    return q


@torch.no_grad()
def hidden_states(model, token_ids: torch.Tensor) -> torch.Tensor:
    """float32 [layers + 1, tokens, hidden]: entry k is the residual stream entering layer k
    (0: the embeddings). An early-exit predictor at k needs only the first k layers; this
    offline helper runs the whole model once and serves every k."""
    out = model.model(input_ids=token_ids.unsqueeze(0), output_hidden_states=True, use_cache=False)
    return torch.stack([h[0] for h in out.hidden_states]).to(torch.float32)


def prefill_macs(config, tokens: int) -> dict[str, float]:
    """Multiply-accumulates per token of a prefill of ``tokens`` tokens: ``layer`` (one
    decoder layer: projections, MLP, attention over tokens/2 keys on average) and
    ``prefill`` (all layers; the lm_head runs on the last token only and is left out)."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    d = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    proj = h * (q + 2 * kv) + q * h + 3 * h * inter
    attention = 2 * q * tokens / 2  # QK^T and PV over tokens/2 keys on average
    return {"layer": proj + attention, "prefill": layers * (proj + attention), "kv_proj": h * 2 * kv}
