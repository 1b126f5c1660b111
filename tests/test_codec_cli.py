"""``speckv compress`` / ``speckv decompress`` (sglang_speckv/codec_cli.py): byte-exact
round trips of KV dump files, and clear errors."""

import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sglang_speckv.cli import main

LAYERS, HEADS, TOKENS, DIM = 3, 2, 24, 16


def kv_pair(scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    channel = torch.randn(LAYERS, HEADS, 1, DIM, generator=g) * scale
    k = channel + 0.3 * scale * torch.randn(LAYERS, HEADS, TOKENS, DIM, generator=g)
    v = 0.5 * scale * torch.randn(LAYERS, HEADS, TOKENS, DIM, generator=g)
    return k, v


def write_dump(path, k, v, metadata=None, **extra):
    save_file({"k": k.contiguous(), "v": v.contiguous(), **extra}, str(path), metadata=metadata)


def assert_same_file_contents(a, b):
    ta, tb = load_file(str(a)), load_file(str(b))
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and ta[name].shape == tb[name].shape, name
        assert torch.equal(ta[name].view(torch.uint8), tb[name].view(torch.uint8)), name
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        assert (fa.metadata() or {}) == (fb.metadata() or {})  # safetensors: no metadata == {}


def cli(*args):
    return main([str(a) for a in args])


@pytest.mark.parametrize(
    "dtype,scale,metadata",
    [
        (torch.bfloat16, 1.0, {"kv_dtype": "bf16", "position": "128"}),
        (torch.float16, 1.0, None),
        (torch.float8_e4m3fn, 40.0, {"kv_dtype": "fp8_e4m3"}),
        (torch.float8_e5m2, 40.0, {}),
        ("uint8:fp8_e4m3", 40.0, {"kv_dtype": "fp8_e4m3"}),
        ("uint8:fp8_e5m2", 40.0, {"kv_dtype": "fp8_e5m2", "model": "x"}),
    ],
)
def test_round_trip_is_byte_exact(tmp_path, capsys, dtype, scale, metadata):
    k, v = kv_pair(scale)
    if isinstance(dtype, str):
        fp8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}[dtype.split(":")[1]]
        k, v = k.to(fp8).view(torch.uint8), v.to(fp8).view(torch.uint8)
    else:
        k, v = k.to(dtype), v.to(dtype)
    extra = {"token_ids": torch.arange(TOKENS), "k_scale": torch.ones(LAYERS)}
    write_dump(tmp_path / "kv.safetensors", k, v, metadata, **extra)
    assert cli("compress", tmp_path / "kv.safetensors", "--out", tmp_path / "kv.speckv", "--lanes", 8) == 0
    summary = capsys.readouterr().out
    assert "bits/scalar" in summary and "ratio" in summary and "MB/s" in summary
    assert cli("decompress", tmp_path / "kv.speckv", "--out", tmp_path / "back.safetensors") == 0
    assert "verified" in capsys.readouterr().out
    assert_same_file_contents(tmp_path / "kv.safetensors", tmp_path / "back.safetensors")


@pytest.mark.parametrize("page_tokens", [1, 7, TOKENS])
def test_paged_round_trip(tmp_path, capsys, page_tokens):
    """The dump is cut into pages along the tokens (7 leaves a ragged last page); each page
    is one blob with its own position and token ids."""
    k, v = kv_pair()
    extra = {"token_ids": torch.arange(TOKENS) * 3}
    write_dump(tmp_path / "kv.safetensors", k.to(torch.bfloat16), v.to(torch.bfloat16), {"position": "40"}, **extra)
    assert cli("compress", tmp_path / "kv.safetensors", "--out", tmp_path / "kv.speckv", "--page-tokens", page_tokens) == 0
    pages = -(-TOKENS // page_tokens)
    assert f"in {pages} pages of {page_tokens} tokens" in capsys.readouterr().out
    with safe_open(str(tmp_path / "kv.speckv"), "pt") as f:
        assert f.metadata()["speckv.pages"] == str(pages)
    assert cli("decompress", tmp_path / "kv.speckv", "--out", tmp_path / "back.safetensors") == 0
    assert_same_file_contents(tmp_path / "kv.safetensors", tmp_path / "back.safetensors")


def test_files_of_one_blob_still_decode(tmp_path, capsys):
    """Files written before pages hold the whole KV as one blob in ``speckv.blob``."""
    from sglang_speckv import codec
    from sglang_speckv.predictors.base import PageMeta
    from sglang_speckv.predictors.page_stats import PageStatsPredictor

    k, v = (t.to(torch.bfloat16) for t in kv_pair())
    write_dump(tmp_path / "kv.safetensors", k, v)
    page = torch.stack([k, v]).permute(0, 1, 3, 2, 4).contiguous()
    (blob,) = codec.encode_pages([page], [PageMeta("bf16", tuple(page.shape))], PageStatsPredictor())
    blob_tensor = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    save_file({"speckv.blob": blob_tensor}, str(tmp_path / "old.speckv"), metadata={"speckv.kv_tensor_dtype": "bfloat16"})
    assert cli("decompress", tmp_path / "old.speckv", "--out", tmp_path / "back.safetensors") == 0
    assert_same_file_contents(tmp_path / "kv.safetensors", tmp_path / "back.safetensors")


def test_compressed_file_is_smaller_for_kv_like_data(tmp_path, capsys):
    k, v = kv_pair()
    write_dump(tmp_path / "kv.safetensors", k.to(torch.bfloat16), v.to(torch.bfloat16))
    assert cli("compress", tmp_path / "kv.safetensors", "--out", tmp_path / "kv.speckv", "--lanes", "32") == 0
    assert (tmp_path / "kv.speckv").stat().st_size < (tmp_path / "kv.safetensors").stat().st_size
    assert "page_stats" in capsys.readouterr().out


def test_entry_point_in_a_fresh_process(tmp_path):
    k, v = kv_pair()
    write_dump(tmp_path / "kv.safetensors", k.to(torch.bfloat16), v.to(torch.bfloat16))
    run = [sys.executable, "-m", "sglang_speckv"]
    subprocess.run([*run, "compress", tmp_path / "kv.safetensors", "--out", tmp_path / "c", "--lanes", "32"], check=True)
    subprocess.run([*run, "decompress", tmp_path / "c", "--out", tmp_path / "d"], check=True)
    assert_same_file_contents(tmp_path / "kv.safetensors", tmp_path / "d")


def test_errors_are_clear(tmp_path, capsys):
    k, v = kv_pair()
    good = tmp_path / "kv.safetensors"
    write_dump(good, k.to(torch.bfloat16), v.to(torch.bfloat16))

    def fails(*args, says):
        assert cli(*args) == 2
        assert says in capsys.readouterr().err

    fails("compress", tmp_path / "missing", "--out", tmp_path / "x", says="no such file")
    (tmp_path / "junk").write_bytes(b"not a safetensors file")
    fails("compress", tmp_path / "junk", "--out", tmp_path / "x", says="not a readable safetensors")
    save_file({"k": k.to(torch.bfloat16)}, str(tmp_path / "only_k"))
    fails("compress", tmp_path / "only_k", "--out", tmp_path / "x", says="expected tensors 'k' and 'v'")
    write_dump(tmp_path / "u8", k.to(torch.uint8), v.to(torch.uint8))
    fails("compress", tmp_path / "u8", "--out", tmp_path / "x", says="kv_dtype must be fp8_e4m3 or fp8_e5m2")
    write_dump(tmp_path / "f32", k, v)
    fails("compress", tmp_path / "f32", "--out", tmp_path / "x", says="expected one of bf16")
    write_dump(tmp_path / "mismatch", k.to(torch.bfloat16), v[:, :, :5].to(torch.bfloat16))
    fails("compress", tmp_path / "mismatch", "--out", tmp_path / "x", says="must both be")
    fails("compress", good, "--out", tmp_path / "x", "--calib", "c.safetensors", says="does not exist (write one with `speckv calibrate`)")
    fails("decompress", good, "--out", tmp_path / "x", says="not written by speckv compress")

    assert cli("compress", good, "--out", tmp_path / "c", "--lanes", "32") == 0
    capsys.readouterr()
    tensors = load_file(str(tmp_path / "c"))
    with safe_open(str(tmp_path / "c"), "pt") as f:
        metadata = f.metadata()
    tensors["speckv.page.0"][-5] ^= 0x40  # corrupt the stream
    save_file(tensors, str(tmp_path / "bad"), metadata=metadata)
    fails("decompress", tmp_path / "bad", "--out", tmp_path / "x", says="cannot decode")
    tensors["speckv.page.0"][6] ^= 0x40  # corrupt the header
    save_file(tensors, str(tmp_path / "bad"), metadata=metadata)
    fails("decompress", tmp_path / "bad", "--out", tmp_path / "x", says="checksum")
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit):
        cli("compress", good, "--out", tmp_path / "x", "--lanes", 0)


def test_output_is_byte_deterministic(tmp_path, capsys):
    # safetensors writes metadata in hash-map order, which changes from one file to the
    # next; compress and decompress sort it, so the same input gives the same bytes.
    k, v = kv_pair()
    metadata = {"kv_dtype": "bf16", "position": "64", "model": "m", "layer_types": "full", "note": "é"}
    write_dump(tmp_path / "kv.safetensors", k.to(torch.bfloat16), v.to(torch.bfloat16), metadata,
               token_ids=torch.arange(TOKENS))
    for i in range(4):
        assert cli("compress", tmp_path / "kv.safetensors", "--out", tmp_path / f"c{i}.speckv", "--page-tokens", 8) == 0
        assert cli("decompress", tmp_path / f"c{i}.speckv", "--out", tmp_path / f"d{i}.safetensors") == 0
    for name in ("c{}.speckv", "d{}.safetensors"):
        files = [(tmp_path / name.format(i)).read_bytes() for i in range(4)]
        assert all(f == files[0] for f in files), name
    assert_same_file_contents(tmp_path / "kv.safetensors", tmp_path / "d0.safetensors")
