"""speckv dump-kv on the real SmolLM2-135M checkpoint: what it writes, and its errors."""

from __future__ import annotations

import json

import pytest
import torch

from sglang_speckv.tools import dump_kv
from sglang_speckv.cli import main

TEXT = "The quick brown fox jumps over the lazy dog. Lossless coding keeps every bit of the cache."


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "t.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def model(model_dir):
    return dump_kv.load_model(model_dir)


@pytest.mark.parametrize("kv_dtype", ["bf16", "fp8_e4m3"])
def test_cli_writes_a_dump_the_codec_reads(model_dir, text_file, tmp_path, kv_dtype):
    out = tmp_path / "kv.safetensors"
    assert main(["dump-kv", "--model", str(model_dir), "--text", str(text_file), "--out", str(out), "--kv-dtype", kv_dtype]) == 0
    d = dump_kv.KVDump.load(out)
    t = len(d.token_ids)
    assert d.k.shape == d.v.shape == (30, 3, t, 64) and t > 10
    assert d.k.dtype == {"bf16": torch.bfloat16, "fp8_e4m3": torch.float8_e4m3fn}[kv_dtype]
    assert d.kv_dtype == kv_dtype and d.position == 0 and len(d.model) == 16
    if kv_dtype == "fp8_e4m3":
        assert d.scale.shape == (2, 30) and bool((d.scale > 0).all())
        # absmax scaling: every layer reaches the e4m3 maximum and nothing is NaN
        amax = torch.stack([d.k.float().abs().amax(dim=(1, 2, 3)), d.v.float().abs().amax(dim=(1, 2, 3))])
        assert torch.equal(amax, torch.full_like(amax, 448.0))
    else:
        assert d.scale is None
    # speckv compress reads it and restores k, v bit for bit
    blob, back = tmp_path / "kv.speckv", tmp_path / "back.safetensors"
    assert main(["compress", str(out), "--out", str(blob)]) == 0
    assert main(["decompress", str(blob), "--out", str(back)]) == 0
    d2 = dump_kv.KVDump.load(back)
    assert torch.equal(d.k.view(torch.uint8), d2.k.view(torch.uint8)) and torch.equal(d.v.view(torch.uint8), d2.v.view(torch.uint8))


def test_keys_are_stored_after_rope(model, text_file):
    """Layer 0's keys equal RoPE(k_proj(norm(embed(ids)))) at each position, as SGLang stores them."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    m, tok = model
    ids = dump_kv.tokenize(tok, TEXT, 64)
    k, v = dump_kv.compute_kv(m, ids, progress=False)
    with torch.no_grad():
        x = m.model.layers[0].input_layernorm(m.model.embed_tokens(ids[None]))
        k_pre = m.model.layers[0].self_attn.k_proj(x).view(1, len(ids), 3, 64).transpose(1, 2)
        v_ref = m.model.layers[0].self_attn.v_proj(x).view(1, len(ids), 3, 64).transpose(1, 2)
        cos, sin = m.model.rotary_emb(x, torch.arange(len(ids))[None])
        k_ref, _ = apply_rotary_pos_emb(k_pre, k_pre, cos, sin)
    assert torch.equal(v[0], v_ref[0])
    torch.testing.assert_close(k[0].float(), k_ref[0].float(), atol=0.05, rtol=0.02)
    # and they are not the un-rotated keys (position > 0 moves them)
    assert (k[0, :, 5:].float() - k_pre[0, :, 5:].float()).abs().max() > 0.5


def test_prefill_chunking_and_gguf_identity(model, model_dir):
    m, _ = model
    layout = dump_kv.kv_layout(m)
    assert {k: layout[k] for k in ("layers", "kv_heads", "head_dim", "max_positions", "rotary_dim")} == {
        "layers": 30, "kv_heads": 3, "head_dim": 64, "max_positions": 8192, "rotary_dim": 64}
    # the model's own float32 RoPE frequencies (theta 1e5), one RoPE for every layer
    want = (1.0 / 100000.0 ** (torch.arange(0, 64, 2, dtype=torch.int64).float() / 64)).tolist()
    assert layout["rope_inv_freq"] == [want] and layout["layer_rope"] == [0] * 30
    from sglang_speckv.tools.prepare_model import gguf_path

    gguf_model, _ = dump_kv.load_model(gguf_path())
    assert dump_kv.model_identity(gguf_model) == dump_kv.model_identity(m)


def test_clear_errors(model_dir, text_file, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dump_kv.read_texts([tmp_path / "missing.txt"])
    with pytest.raises(FileNotFoundError, match="prepare-model"):
        dump_kv.load_model(tmp_path / "no-model")
    # refused from the config alone, naming the architecture and what is missing
    for model_type, arch, extra, missing in (
        ("gpt2", "GPT2LMHeadModel", {}, "other than RoPE"),
        ("deepseek_v2", "DeepseekV2ForCausalLM", {"kv_lora_rank": 512}, "MLA latent layout"),
    ):
        foreign = tmp_path / model_type
        foreign.mkdir()
        (foreign / "config.json").write_text(json.dumps({"model_type": model_type, "architectures": [arch], **extra}))
        with pytest.raises(dump_kv.UnsupportedModel, match=f"{arch}.*{missing}"):
            dump_kv.load_model(foreign)
    with pytest.raises(FileNotFoundError, match="dump-kv"):
        dump_kv.KVDump.load(tmp_path / "nothing.safetensors")
