"""Live calibration (``calibrate = "auto"``): fit the token-free predictors from the first
pages a server writes, with no calibration file and no offline step.

The backend hands every page it writes to ``feed`` (cheap: a copy into a bounded sample,
nothing else, never blocks on the fit). Once ``sample_tokens`` tokens are in, a background
thread writes the sample to a file and runs the fit in a child process at the lowest CPU
priority (``python -m sglang_speckv.predictors.live``: tools/calibrate.py on the sampled
tokens at their own positions), which saves the calibration beside the first tier under a
name that holds the served model's key and the KV dtype; from then on ``predictor()``
returns the calibrated predictor for new writes. A process, not a thread: the fit is
thousands of small torch calls, and in SGLang's process each would wait for the GIL that
the scheduler's busy loop holds (a 2048-token SmolLM2 fit that takes ~35 s alone had not
finished after 14 minutes as a thread of a CPU server), and would slow that loop in turn. Until then (and if the fit fails) it returns None: the backend
keeps coding with page_stats, and pages coded before the switch are re-coded when they move
to a tier whose predictor is the calibrated one.

A restart finds the saved file and is ready at once; another model or KV dtype has another
key, so it starts a new calibration (the old file stays for that model). A file that does
not load (corrupt, other format) is refitted and overwritten.

    live = LiveCalibration(tier_dir, layout=layout_from_config(cfg), model_key=key, kv_dtype="bf16")
    live = for_served_model(tier_dir, model_path, "bf16", page_shape)   # the same, as a server does
    live.feed(page, position)         # [2, layers, tokens, kv_heads, head_dim], stored dtype
    pred = live.predictor()           # LinearGaussianPredictor or None
    live.status()                     # {"state": ..., "tokens": ..., "path": ..., ...}
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

import torch

from sglang_speckv.predictors import DEFAULT_CALIBRATED
from sglang_speckv.predictors.calibration import Calibration, CalibrationError, load_calibration

# Predictors fitted live: the default calibrated one, and the static fallback (tiny).
LIVE_PREDICTORS = ("static", DEFAULT_CALIBRATED)
# Tokens sampled before fitting: 4096 tokens of SmolLM2 KV are 94 MB in bf16 and fit in
# about a minute on 2 cores; the bench's 16k-token calibrations gain a few hundredths of a bit.
DEFAULT_SAMPLE_TOKENS = 4096
# Sampled tokens are dealt into this many groups; the last is the validation split.
GROUPS = 4
STORED_DTYPES = {"bf16": torch.bfloat16, "fp8_e4m3": torch.float8_e4m3fn}


class FitFailed(Exception):
    """The fitting process failed; the message is its last line of stderr."""


def model_key(layout: dict, config_json: bytes) -> str:
    """16 hex digits naming a served model for live calibration: its KV layout and the
    bytes of its config.json (a server does not hash weights; a fine-tune with the same
    config should use its own tier directory or an offline calibration)."""
    import xxhash

    h = xxhash.xxh64(json.dumps(layout, sort_keys=True).encode())
    h.update(config_json)
    return h.hexdigest()


def for_served_model(directory: str | Path, model_path: str, kv_dtype: str, page_shape: tuple[int, ...],
                     **kwargs) -> LiveCalibration:
    """The live calibration of the model at ``model_path`` (a checkpoint directory or a
    Hugging Face id in the local cache: only its config.json is read) for pages of
    ``page_shape`` ([2, layers, tokens, kv_heads, head_dim]) and ``kv_dtype``. Raises
    ValueError (UnsupportedModel for a model the predictors do not cover) or OSError, with
    the architecture and what is missing, before anything is sampled."""
    from transformers import AutoConfig
    from transformers.utils import cached_file

    from sglang_speckv.tools.dump_kv import architecture, layout_from_config

    try:
        config_path = cached_file(model_path, "config.json")
        config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"cannot read the config.json of model {model_path!r}: {exc}") from None
    layout = layout_from_config(config)
    want = (2, layout["layers"], layout["kv_heads"], layout["head_dim"])
    have = (page_shape[0], page_shape[1], *page_shape[3:])
    if have != want:
        raise ValueError(f"{architecture(config)}: this server's pages hold {have[1]} layers x {have[2]} KV heads x "
                         f"{have[3]} dims, the model {want[1]} x {want[2]} x {want[3]} (missing: live calibration "
                         "of tensor- or pipeline-parallel shards)")
    key = model_key(layout, Path(config_path).read_bytes())
    return LiveCalibration(directory, layout=layout, model_key=key, kv_dtype=kv_dtype, **kwargs)


def calibration_path(directory: str | Path, key: str, kv_dtype: str) -> Path:
    return Path(directory) / f"speckv-live-calibration-{key}-{kv_dtype}.safetensors"


class LiveCalibration:
    """See the module docstring. Thread-safe: ``feed``, ``predictor`` and ``status`` may be
    called from any thread; none of them raises for bad pages or a failed fit."""

    def __init__(self, directory: str | Path, *, layout: dict, model_key: str, kv_dtype: str,
                 sample_tokens: int = DEFAULT_SAMPLE_TOKENS, names=LIVE_PREDICTORS, nice: int = 19,
                 on_done: Callable[[], None] | None = None):
        """``on_done``: called (from the fitting thread) once a fit has ended, ready or failed."""
        if kv_dtype not in STORED_DTYPES:
            raise ValueError(f"live calibration covers KV dtypes {', '.join(STORED_DTYPES)}, not {kv_dtype}")
        if sample_tokens < 2 * GROUPS:
            raise ValueError(f"sample_tokens must be at least {2 * GROUPS}")
        self.layout, self.key, self.kv_dtype, self.names = dict(layout), model_key, kv_dtype, tuple(names)
        self.path = calibration_path(directory, model_key, kv_dtype)
        self.sample_tokens = sample_tokens
        self.nice = nice  # CPU priority of the fitting process (19: the lowest)
        self.on_done = on_done
        self._shape = (2, layout["layers"], layout["kv_heads"], layout["head_dim"])  # without tokens
        self._lock = threading.Lock()
        self._pages: list[tuple[torch.Tensor, int]] = []
        self._tokens = 0
        self._ignored = 0
        self._predictor = None
        self._error = ""
        self._thread: threading.Thread | None = None
        self._state = "sampling"
        if self.path.is_file():
            self._load()

    # ---- the narrow interface ----------------------------------------------------------

    def feed(self, page: torch.Tensor, position: int) -> None:
        """Offer one written page ([2, layers, tokens, kv_heads, head_dim] in the stored
        dtype, on any device) whose first token is at ``position``. Copied only while
        sampling; pages of another shape or dtype are counted and ignored."""
        if self._state != "sampling":
            return
        if page.dtype != STORED_DTYPES[self.kv_dtype] or page.dim() != 5 or (page.shape[0], *page.shape[1:2], *page.shape[3:]) != self._shape:
            self._ignored += 1
            return
        copy = page.detach().to("cpu", copy=True)
        with self._lock:
            if self._state != "sampling":
                return
            self._pages.append((copy, int(position)))
            self._tokens += copy.shape[2]
            if self._tokens < self.sample_tokens:
                return
            self._state = "fitting"
        self._thread = threading.Thread(target=self._fit, name="speckv-live-calibration", daemon=True)
        self._thread.start()

    def predictor(self):
        """The calibrated predictor once fitted or loaded, else None (keep page_stats)."""
        return self._predictor

    def status(self) -> dict:
        """For the stats file and metrics: what codes new pages, and where the fit stands."""
        pred = self._predictor
        return {
            "state": self._state,  # sampling | fitting | ready | failed
            "predictor": pred.name if pred else None,
            "fingerprint": f"{pred.fingerprint:016x}" if pred else None,
            "tokens_sampled": self._tokens,
            "sample_tokens": self.sample_tokens,
            "pages_ignored": self._ignored,
            "path": str(self.path),
            "error": self._error,
        }

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for a running fit (tests, shutdown); True if none is running any more."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True

    # ---- internals ---------------------------------------------------------------------

    def _load(self) -> None:
        try:
            calib = load_calibration(self.path)
            if (calib.model, calib.kv_dtype, calib.layout) != (self.key, self.kv_dtype, self.layout):
                raise CalibrationError(f"{self.path} was fitted to another model, KV dtype or layout")
            self._ready(calib)
        except CalibrationError as exc:  # refit and overwrite
            self._error = f"saved calibration not used: {exc}"

    def _ready(self, calib: Calibration) -> None:
        from sglang_speckv.predictors.linear import LinearGaussianPredictor

        self._predictor = LinearGaussianPredictor(calib, DEFAULT_CALIBRATED)
        self._state = "ready"

    def _fit(self) -> None:
        sample = self.path.with_name(self.path.name + f".sample{os.getpid()}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            save_sample(sample, self._pages)
            self._pages = []  # the sample is in the file now
            params = {"model_key": self.key, "layout": self.layout, "kv_dtype": self.kv_dtype,
                      "names": list(self.names), "nice": self.nice}
            # In SGLang's process group: stopping the server stops the fit too.
            root = str(Path(__file__).resolve().parents[2])  # this copy of sglang_speckv, first
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
            run = subprocess.run([sys.executable, "-m", __name__, str(sample), str(self.path), json.dumps(params)],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 text=True, check=False, env=env)
            if run.returncode != 0:
                lines = run.stderr.strip().splitlines()
                raise FitFailed(lines[-1] if lines else f"the fitting process exited with {run.returncode}")
            self._ready(load_calibration(self.path))
        except Exception as exc:  # noqa: BLE001 - a background fit must never reach SGLang's threads
            self._error = str(exc) if isinstance(exc, FitFailed) else f"{type(exc).__name__}: {exc}"
            self._state = "failed"
        finally:
            self._pages = []
            sample.unlink(missing_ok=True)
        if self.on_done is not None:
            try:
                self.on_done()
            except Exception:  # noqa: BLE001 - e.g. a stats file write; the fit itself is done
                pass


def save_sample(path: Path, pages: list[tuple[torch.Tensor, int]]) -> None:
    """The sampled pages and their first positions, as one safetensors file."""
    from safetensors.torch import save_file

    tensors = {f"page{i}": p.contiguous() for i, (p, _) in enumerate(pages)}
    tensors["positions"] = torch.tensor([pos for _, pos in pages], dtype=torch.int64)
    save_file(tensors, str(path))


def load_sample(path: Path) -> list[tuple[torch.Tensor, int]]:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    positions = tensors.pop("positions").tolist()
    return [(tensors[f"page{i}"], pos) for i, pos in enumerate(positions)]


def fit_pages(pages: list[tuple[torch.Tensor, int]], *, model_key: str, layout: dict, kv_dtype: str,
              names=LIVE_PREDICTORS) -> Calibration:
    """Fit on sampled (page, position) pairs: pages with non-finite values are dropped, the
    rest are dealt round-robin into GROUPS sequences of tokens with their own positions."""
    from sglang_speckv.tools.calibrate import calibrate

    pages = [(p, pos) for p, pos in pages if bool(torch.isfinite(p.to(torch.float32)).all())]
    groups = [pages[i::GROUPS] for i in range(GROUPS)]
    if any(not g for g in groups):
        raise ValueError(f"only {len(pages)} finite pages sampled; need at least {GROUPS}")
    seqs = [torch.cat([p for p, _ in g], dim=2) for g in groups]
    positions = [torch.cat([torch.arange(pos, pos + p.shape[2]) for p, pos in g]) for g in groups]
    return calibrate(seqs, model=model_key, layout=layout, kv_dtype=kv_dtype, names=tuple(names),
                     progress=False, positions=positions)


def _main(sample: str, out: str, params: str) -> int:
    """The fitting process: SAMPLE file -> calibration at OUT (written aside, then renamed).
    At the lowest priority, with half the machine's cores at most."""
    p = json.loads(params)
    os.nice(p["nice"])
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    pages = load_sample(Path(sample))
    Path(sample).unlink(missing_ok=True)
    calib = fit_pages(pages, model_key=p["model_key"], layout=p["layout"], kv_dtype=p["kv_dtype"], names=p["names"])
    tmp = f"{out}.tmp{os.getpid()}"
    calib.save(tmp)
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(_main(*sys.argv[1:]))
    except Exception as exc:  # noqa: BLE001 - the parent reports the last line of stderr
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)
