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

The quantisation itself lives in predictors/model.py, whose serving-path model predictor
runs these copies deterministically (fixed shapes and threads, fingerprinted device kind).
``prefill_macs`` gives the compute each one spends as a fraction of the target's prefill.
"""

from __future__ import annotations

import copy

import torch

from sglang_speckv.predictors import model as serving

SCHEMES = tuple(s for s in serving.SCHEMES if s != "none")


def quantized_copy(target, scheme: str, exact_layers: int = 0):
    """A copy of ``target`` whose decoder-layer linear layers are quantised as ``scheme``,
    except the first ``exact_layers`` layers (kept exact: their KV is the target's)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; expected one of {SCHEMES}")
    q = copy.deepcopy(target)
    serving.quantize_in_place(q, scheme, exact_layers)
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
