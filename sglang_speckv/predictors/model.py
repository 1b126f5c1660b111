"""The model predictor: the served model itself, re-run on the CPU on the page's tokens.

A KV cache is a deterministic function of the weights and the tokens, so the same model
(optionally made cheaper: a quantised copy after ``exact`` exact layers) run on the same
tokens predicts it closely, and only the residual is coded. Spec (predictors.predictor_from_spec):

    model:CHECKPOINT_DIR[?quant=none|int8|fp8|int8_w|fp8_w|int4&exact=K&threads=N&max_tokens=M&cache=C]

Context. A token's KV depends on every token before it: on SmolLM2-135M a page predicted
from its own 16 tokens (at their true positions) costs 9.3 bits per bf16 scalar, with 64
tokens of context before it 7.4, with the whole prefix 4.0 (ideal bits on 512 held-out
tokens, a one-off measurement, not a recorded benchmark). So the predictor needs the tokens of the
whole sequence up to the page's end: ``PageMeta.prefix_ids`` (positions 0 .. position-1)
and ``token_ids`` (the page's own). The backend stores them with the page
(sglang/page_coder.py); a page whose prefix is unknown, or longer than ``max_tokens``,
cannot be coded by this predictor (``can_code``), and the page coder leaves it as it is.

Chunked, hence shareable and deterministic. The prediction of the page at position p (T
tokens, p a multiple of T) is the KV of chunk p / T of a chunked prefill from position 0 in
chunks of exactly T tokens, each chunk attending to the cache of the chunks before it.
Every chunk's computation has fixed shapes (T queries, p + T keys) whichever run it is part
of, so a run that decodes pages n..m of a chain computes each chunk once and gives each page
the same bits as the run that coded it alone; computed chunks are kept in a small LRU cache
(``cache`` chunks, keyed by the xxh64 of the tokens through that chunk), so demoting or
restoring a chain page by page costs one prefill, not one per page.

Determinism (docs/DESIGN.md invariant 3, as this predictor meets it). The model runs in
float32 on the CPU with eager attention, one sequence at a time, with ``threads`` intra-op
threads (set for the run, under a process-wide lock, and restored). On one kind of CPU and
one software stack this gives the same bits in every process; across CPU kinds (vector
ISA) or torch/transformers versions it may not, so the fingerprint covers them: the xxh64
of every weight as the predictor runs it (after quantisation), the spec's parameters,
CODE_VERSION, the device kind (machine, torch's CPU capability) and the torch and
transformers versions. A blob whose fingerprint the reader does not reproduce is a miss
(codec.WrongPredictor / page_coder: "coded by predictor ... which this configuration does
not name"), never a wrong page.

sigma travels in the blob: per (kv, layer, head) the RMS of the page's residual against
the prediction, one byte each on page_stats' eighth-of-an-octave grid (180 bytes per
SmolLM2 page, 0.004 bits per scalar at 16 tokens). No calibration file is needed.
"""

from __future__ import annotations

import platform
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np
import torch
import xxhash

from sglang_speckv.predictors.base import PageMeta, Predictor
from sglang_speckv.predictors.page_stats import REL_SIGMA_FLOOR, SIGMA_MIN_LOG2, STEPS_PER_OCTAVE, sigma_from_codes

PREFIX = "model:"
CODE_VERSION = 1  # bump when anything that changes the predicted bits changes
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
KV_DTYPES = ("bf16", "fp16")  # fp8 KV needs SGLang's per-layer scales: not supported yet

# ---- quantised copies (also measured offline by tools/bench_frontier.py) ------------------

SCHEMES = ("none", "int8", "fp8", "int8_w", "fp8_w", "int4")
# W4A16 group size: GPTQ/AWQ use 64-128; 64 divides SmolLM2's 576 and 1536.
INT4_GROUP = 64
WEIGHT_KIND = {"int8": "int8", "fp8": "fp8", "int8_w": "int8", "fp8_w": "fp8", "int4": "int4"}
QUANTIZED_ACTIVATIONS = ("int8", "fp8")  # W8A8 schemes
FP8_MAX = 448.0


def fake_quant_rows(x: torch.Tensor, kind: str) -> torch.Tensor:
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
    """Weight [out, in] quantised as ``scheme`` says (W8A8 / W8A16: per output channel;
    int4: symmetric groups of INT4_GROUP along the input), same dtype."""
    x = w.detach().to(torch.float32)
    if scheme == "int4":
        out, n = x.shape
        if n % INT4_GROUP:
            raise ValueError(f"int4 groups of {INT4_GROUP} need in_features % {INT4_GROUP} == 0, got {n}")
        q = fake_quant_rows(x.reshape(out, n // INT4_GROUP, INT4_GROUP), "int4").reshape(out, n)
    else:
        q = fake_quant_rows(x, WEIGHT_KIND[scheme])
    return q.to(w.dtype)


def quantize_in_place(model, scheme: str, exact_layers: int = 0) -> None:
    """Quantise the decoder-layer linear layers of ``model`` as ``scheme`` says, except the
    first ``exact_layers`` layers; W8A8 schemes also quantise each linear layer's input per
    token. Embeddings, norms, attention and lm_head stay as they are."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantisation {scheme!r}; expected one of {SCHEMES}")
    if scheme == "none":
        return

    def quantize_input(module, args):
        (x,) = args
        return (fake_quant_rows(x.to(torch.float32), scheme).to(x.dtype),)

    for layer in model.model.layers[exact_layers:]:
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.data = quantize_weight(module.weight.data, scheme)
                if scheme in QUANTIZED_ACTIVATIONS:
                    module.register_forward_pre_hook(quantize_input)


# ---- the spec --------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """What ``model:PATH?k=v&...`` names (module docstring)."""

    path: str
    quant: str = "none"
    exact: int = 0  # first layers left unquantised
    threads: int = 1  # intra-op threads of every run: part of the fingerprint
    max_tokens: int = 8192  # pages ending beyond this position are not coded by it
    cache: int = 256  # computed chunks kept (LRU)

    @classmethod
    def parse(cls, spec: str) -> ModelSpec:
        """ValueError saying what to write for anything malformed."""
        body = spec[len(PREFIX):] if spec.startswith(PREFIX) else spec
        path, _, query = body.partition("?")
        if not path:
            raise ValueError(f"{spec!r}: write 'model:CHECKPOINT_DIR[?quant=...&exact=K&threads=N]'")
        known = {f.name: f.type for f in fields(cls) if f.name != "path"}
        args = {}
        for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)):
            if key not in known:
                raise ValueError(f"{spec!r}: unknown parameter {key!r}; known: {sorted(known)}")
            try:
                args[key] = value if known[key] == "str" else int(value)
            except ValueError:
                raise ValueError(f"{spec!r}: {key} must be an integer, got {value!r}") from None
        out = cls(path, **args)
        if out.quant not in SCHEMES:
            raise ValueError(f"{spec!r}: quant must be one of {SCHEMES}")
        if out.exact < 0 or out.threads < 1 or out.max_tokens < 1 or out.cache < 1:
            raise ValueError(f"{spec!r}: exact >= 0, threads >= 1, max_tokens >= 1 and cache >= 1 please")
        return out


def device_kind() -> str:
    """What, besides the weights and the code, decides the bits of a CPU float run."""
    import transformers

    return (f"cpu/{platform.machine()}/{torch.backends.cpu.get_cpu_capability()}/"
            f"torch {torch.__version__}/transformers {transformers.__version__}")


_RUN_LOCK = threading.Lock()  # one model run at a time per process: the thread count is global


@contextmanager
def fixed_threads(n: int):
    """Run with ``n`` intra-op threads (restored after), one run at a time."""
    with _RUN_LOCK:
        old = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            yield
        finally:
            torch.set_num_threads(old)


def load_float32(path: str):
    """The checkpoint as a float32 eager-attention model on the CPU. FileNotFoundError /
    ValueError saying what to do."""
    import os

    from transformers import AutoConfig, AutoModelForCausalLM

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model predictor: {folder} is not a checkpoint directory with config.json "
                                "(name the served model's directory, e.g. the one `speckv prepare-model` prints)")
    config = AutoConfig.from_pretrained(str(folder))
    archs = tuple(getattr(config, "architectures", None) or ())
    if not set(archs) & set(SUPPORTED_ARCHITECTURES):
        raise ValueError(f"model predictor: architecture {archs} is not supported (supported: {SUPPORTED_ARCHITECTURES})")
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="eager")
    return model.eval()


# ---- the predictor ---------------------------------------------------------------------


class ModelPredictor(Predictor):
    """See the module docstring. ``id`` 6; one stage; sigma codes as side info."""

    id = 6
    name = "model"
    uses_position = True
    needs_prefix = True  # predicts from PageMeta.prefix_ids + token_ids

    def __init__(self, spec: ModelSpec | str):
        self.spec = ModelSpec.parse(spec) if isinstance(spec, str) else spec
        self.model = load_float32(self.spec.path)
        quantize_in_place(self.model, self.spec.quant, self.spec.exact)
        cfg = self.model.config
        self._layers, self._heads = cfg.num_hidden_layers, cfg.num_key_value_heads
        self._dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        h = xxhash.xxh64()
        for name, p in sorted(self.model.state_dict().items()):
            h.update(name.encode())
            h.update(p.detach().contiguous().view(torch.uint8).numpy().tobytes())
        params = {f.name: getattr(self.spec, f.name) for f in fields(self.spec) if f.name not in ("path", "cache")}
        h.update(f"{params}/code {CODE_VERSION}/{device_kind()}".encode())
        self.fingerprint = h.intdigest()
        self._chunks: OrderedDict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._chunks_lock = threading.Lock()

    def check(self, dtype: str, shape: tuple[int, ...]) -> None:
        if dtype not in KV_DTYPES:
            raise ValueError(f"the model predictor codes {KV_DTYPES} KV, the pages are {dtype}: use page_stats "
                             "or a calibrated predictor for this tier")
        want = (2, self._layers, shape[2] if len(shape) == 5 else "T", self._heads, self._dim)
        if tuple(shape) != want:
            raise ValueError(f"pages of shape {tuple(shape)} [K/V, layers, tokens, kv_heads, head_dim] are not "
                             f"{self.spec.path}'s {want}: name the served model's checkpoint")

    @property
    def max_prefix_tokens(self) -> int:
        """The most tokens before a page this predictor reads (the backend stores them)."""
        return self.spec.max_tokens

    def can_code(self, meta: PageMeta) -> str | None:
        """Why this page cannot be coded by this predictor, or None if it can."""
        t = meta.shape[2]
        if meta.token_ids is None or len(meta.token_ids) != t:
            return "the page's token ids are unknown"
        if meta.prefix_ids is None or len(meta.prefix_ids) != meta.position:
            return "the tokens before the page are unknown"
        if meta.position % t:
            return f"position {meta.position} is not a multiple of the page size {t}"
        if meta.position + t > self.spec.max_tokens:
            return f"the page ends beyond max_tokens={self.spec.max_tokens}"
        return None

    # ---- contract ---------------------------------------------------------------------

    def side_info(self, values: torch.Tensor, meta: PageMeta) -> bytes:
        """u8 sigma code per (kv, layer, head): RMS of values - prediction (finite only).
        Computed a (kv, layer) block at a time: float64 scratch of a block, not the page's."""
        keys, vals = self.chunk(meta)  # [L, H, T, D] float32 each
        kv_n, layers, _, heads, _ = meta.shape
        sigma = torch.empty((kv_n, layers, heads), dtype=torch.float64)
        for kv, layer in ((kv, layer) for kv in range(kv_n) for layer in range(layers)):
            mu = (keys, vals)[kv][layer].permute(1, 0, 2).to(torch.float64)  # [T, H, D]
            x = values[kv, layer].detach().to("cpu", torch.float64)
            finite = torch.isfinite(x)
            r = torch.where(finite, x - mu, torch.zeros_like(x)).square()
            count = finite.sum(dim=(0, 2)).clamp(min=1)
            rms = (r.sum(dim=(0, 2)) / count).sqrt()  # [H]
            floor = mu.square().mean(dim=(0, 2)).sqrt() * REL_SIGMA_FLOOR
            sigma[kv, layer] = torch.maximum(rms, floor)
        code = (torch.log2(sigma) - SIGMA_MIN_LOG2) * STEPS_PER_OCTAVE
        return code.nan_to_num(0.0).round().clamp(0, 255).to(torch.uint8).contiguous().numpy().tobytes()

    def parts(self, meta: PageMeta, stage: int) -> int:
        """A part per (kv, layer) block: the rows are per symbol."""
        return meta.shape[0] * meta.shape[1]

    def predict(self, meta: PageMeta, side: bytes, values: torch.Tensor, stage: int):
        mu, sigma = self.predict_rows(meta, side, values, stage)
        return mu.reshape(-1), sigma.reshape(-1)

    def predict_rows(self, meta: PageMeta, side: bytes, values: torch.Tensor, stage: int,
                     parts: tuple[int, int] | None = None):
        """Rows [blocks, T, H, D], float32, a (kv, layer) block each (blocks p0 .. p1 - 1
        of the page's 2L with ``parts``): mu the model's KV of the block, sigma the side
        info's per (kv, layer, head) value broadcast over tokens and channels (stride 0)."""
        kv_n, layers, t, heads, dim = meta.shape
        if len(side) != kv_n * layers * heads:
            raise ValueError(f"model side info of {len(side)} bytes, expected {kv_n * layers * heads}")
        p0, p1 = parts or (0, kv_n * layers)
        if not 0 <= p0 < p1 <= kv_n * layers:
            raise ValueError(f"model: parts [{p0}, {p1}) of a stage of {kv_n * layers}")
        codes = torch.from_numpy(np.frombuffer(side, dtype=np.uint8).copy())
        sigma = sigma_from_codes(codes).view(kv_n * layers, 1, heads, 1)[p0:p1].expand(p1 - p0, t, heads, dim)
        keys, vals = self.chunk(meta)  # [L, H, T, D] each
        mu = torch.empty((p1 - p0, t, heads, dim), dtype=torch.float32)
        for i, block in enumerate(range(p0, p1)):
            mu[i] = (keys, vals)[block // layers][block % layers].permute(1, 0, 2)
        return mu.to(values.device), sigma.to(values.device)

    # ---- the model run ------------------------------------------------------------------

    def forget(self) -> None:
        """Empty the chunk cache (benchmarks: decode as a fresh process would)."""
        with self._chunks_lock:
            self._chunks.clear()

    def kv(self, meta: PageMeta) -> torch.Tensor:
        """float32 [2, L, T, H, D]: the page's KV as chunk position/T of the chunked prefill
        (module docstring). ValueError if ``can_code`` says no."""
        keys, vals = self.chunk(meta)
        return torch.stack([keys, vals]).permute(0, 1, 3, 2, 4)

    def chunk(self, meta: PageMeta) -> tuple[torch.Tensor, torch.Tensor]:
        """The page's chunk of the chunked prefill as cached: (K, V) float32 [L, H, T, D]
        each (not copied: read only). ValueError if ``can_code`` says no."""
        why = self.can_code(meta)
        if why is not None:
            raise ValueError(f"model predictor cannot code this page: {why}")
        tokens, t = meta.prefix_ids + tuple(meta.token_ids), meta.shape[2]
        last = self._keys(tokens, t)[-1]
        with self._chunks_lock:  # cached (as when a page's parts are predicted one by one)
            if last in self._chunks:
                self._chunks.move_to_end(last)
                return self._chunks[last]
        return self.kv_run(tokens, t)[-1]

    @staticmethod
    def _keys(tokens: tuple[int, ...], t: int) -> list[tuple[int, int]]:
        """The chunk cache's key of every chunk of ``t`` tokens of ``tokens``: the xxh3-128
        of the tokens through it."""
        if len(tokens) % t:
            raise ValueError(f"{len(tokens)} tokens are not whole chunks of {t}")
        keys = []
        arr = np.asarray(tokens, dtype="<u4")
        h = xxhash.xxh3_128()  # 128 bits: a collision would only make a page a miss (its checksum)
        for j in range(len(tokens) // t):
            h.update(arr[j * t:(j + 1) * t].tobytes())
            keys.append((t, h.intdigest()))
        return keys

    @torch.no_grad()
    def kv_run(self, tokens: tuple[int, ...], t: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(K, V) float32 [L, H, T, D] of every chunk of ``t`` tokens of ``tokens`` (a
        multiple of t long), computing only those not in the chunk cache."""
        keys = self._keys(tokens, t)
        n = len(keys)
        arr = np.asarray(tokens, dtype="<u4")
        with self._chunks_lock:
            have = 0
            while have < n and keys[have] in self._chunks:
                have += 1
            cached = [self._chunks[k] for k in keys[:have]]
            for k in keys[:have]:
                self._chunks.move_to_end(k)
        if have < n:
            from transformers import DynamicCache

            with fixed_threads(self.spec.threads):
                cache = DynamicCache(config=self.model.config)
                if cached:
                    for layer in range(self._layers):
                        k = torch.cat([c[0][layer] for c in cached], dim=1)[None]  # [1, H, p, D]
                        v = torch.cat([c[1][layer] for c in cached], dim=1)[None]
                        cache.update(k, v, layer)
                ids = torch.tensor(arr.astype(np.int64))
                for j in range(have, n):
                    self.model.model(input_ids=ids[None, j * t:(j + 1) * t], past_key_values=cache, use_cache=True)
                    chunk = (torch.stack([lay.keys[0, :, -t:] for lay in cache.layers]).clone(),  # [L, H, T, D]
                             torch.stack([lay.values[0, :, -t:] for lay in cache.layers]).clone())
                    cached.append(chunk)
            with self._chunks_lock:
                for k, c in zip(keys[have:], cached[have:]):
                    self._chunks[k] = c
                while len(self._chunks) > self.spec.cache:
                    self._chunks.popitem(last=False)
        return cached
