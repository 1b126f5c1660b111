"""Interleaved rANS64 in C++ for CPUs: the fast twin of kernels/rans_reference.py.

The torch reference advances all lanes one step per Python-dispatched vector operation,
which costs far more than the arithmetic on a CPU. kernels/rans_cpu.cpp runs the same
integer arithmetic as plain loops (lanes in parallel with at::parallel_for, each lane's steps
in order), so it produces the SAME BYTES as ``rans_reference.encode`` and decodes the same
keys with the same verdict as ``rans_reference.Decoder`` on every input, corrupt streams
included (tests/test_rans_cpu.py compares the two bit for bit). The decoder's symbol search
guesses the key as the reference does, then gallops and bisects over exact integer C values;
only its speed depends on the guess.

Interface (identical to the reference, so sglang_speckv/codec.py can dispatch by device):

* ``cdf(keys, mu_q, e, r, dtype, w_wide, kappa)``: ``entropy_model.cdf``, same integers.
* ``encode(cum, freq, num_lanes) -> (words, lane_words)``.
* ``Decoder(words, lane_words, num_symbols, dtype, w_wide, kappa, model)`` with staged
  ``decode(mu_q, e, r) -> keys`` and ``finish() -> ok [P]``; construction (stream
  validation, initial states) and ``finish`` are the reference's own code.
* The value level the codec uses: ``encode_values(bits, mu, sigma, dtype, num_lanes,
  w_wide, kappa, model)`` and ``Decoder.decode_values``, for both entropy models
  (``model``: "exact", entropy_model's C(k), or "table", table_model's aligned lattice
  for 16-bit dtypes; its level-1 table comes from table_model.level1_table).
* ``page_hash(page)``: kernels/page_hash.py's page hash (the blob's ``raw_hash``), same u64
  as ``page_hash.reference``.

The extension is compiled on first use (``torch.utils.cpp_extension.load``, ninja + a C++
compiler, cached under the torch extensions directory in a directory named by a hash of
the source and flags; one build per process at most, guarded by a lock). The coder's
constants reach the C++ as -D macros generated from entropy_model.py, rans_reference.py and
table_model.py, the dtype's fields (entropy_model.DTYPE_SPECS) and the tables (PHI, the
decoder's quantiles, the table model's level-1 rows) as arguments. Where the build
fails (no compiler, no ninja), one warning names the reason and every function here runs
the torch reference instead: slower, same bytes, never a crash.

Run ``python -m sglang_speckv.kernels.rans_cpu`` for the self-check and its speed against
the reference.
"""

from __future__ import annotations

import logging
import platform
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch

from sglang_speckv.kernels import entropy_model as em
from sglang_speckv.kernels import page_hash as ph
from sglang_speckv.kernels import rans_reference as ref
from sglang_speckv.kernels import table_model as tm

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("rans_cpu.cpp")
# What a first build took on a loaded 2-core machine (torch's headers dominate), for the
# one-time notice.
BUILD_SECONDS_TYPICAL = 40
# Older torch guards a build with a lock file whose mere existence blocks, and waits for it
# forever; a process killed mid-build leaves it behind. A build takes well under a minute,
# so such a lock older than this was left by a dead build and is removed before loading.
# (Newer torch holds an flock on a file that stays: removing it would break the lock.)
STALE_LOCK_SECONDS = 600

_build_lock = threading.Lock()
_extension: ModuleType | None = None
_build_failed = False  # the build failed once: the reference runs, warned once


def _macros() -> list[str]:
    """-D flags: the coder's constants, from their one source of truth."""
    constants = {
        "PROB_BITS": em.PROB_BITS, "F": em.F, "R": em.R, "T_BITS": em.T_BITS,
        "X_SHIFT_MAX": em.X_SHIFT_MAX, "DIFF_MAX": em.DIFF_MAX, "T_MAX": em.T_MAX,
        "T_SHIFT": em.T_SHIFT, "INTERP_BITS": em.INTERP_BITS, "W_TOTAL": em.W_TOTAL,
        "RANS_L": ref.RANS_L, "WORD_BITS": ref.WORD_BITS, "ENC_SHIFT": ref.ENC_SHIFT,
        "QUANTILE_BITS": ref.QUANTILE_BITS, "SATURATE_EX": em.SATURATE_EX,
        "TS": tm.TS, "CELL_SHIFT": tm.CELL_SHIFT, "TB": tm.TB, "FB": tm.FB, "TJ": tm.TJ, "NCELL": tm.NCELL,
        "ESC": tm.ESC, "ROW": tm.ROW, "START_BITS": tm.START_BITS,
        "ROWS": tm.ROWS, "PT": tm.PT, "P2": tm.P2, "DENSE_LOG": tm.DENSE_LOG,
        "MAG_SHIFT_MAX": tm.MAG_SHIFT_MAX, "MAX_DIMS": ref.MAX_PAGE_DIMS,
    }  # fmt: skip
    floats = {"SIGMA_MIN": em.SIGMA_MIN, "SIGMA_MAX": em.SIGMA_MAX, "MU_INF": em.MU_INF}  # exact as hex
    return [f"-DSPECKV_{name}={value}LL" for name, value in constants.items()] + [
        f"-DSPECKV_{name}={value.hex()}" for name, value in floats.items()
    ]


# -ffp-contract=off: no fused multiply-add (the float64 steps of quantize_params are exact
# only as separate operations). -fno-trapping-math: lets the vectoriser compute both sides
# of a float select (IEEE results are unchanged; only FP exception flags, which nothing
# reads, may differ). On x86-64, -march=native: AVX-512 / AVX2 gathers and 64-bit lanes for
# the loops over lanes (2.4x on an AVX-512 Xeon); the build is then for this CPU only, so
# its name includes the CPU (_name). Elsewhere the compiler's default target.
CFLAGS = ["-O3", "-ffp-contract=off", "-fno-trapping-math", "-fopenmp"]
if platform.machine().lower() in ("x86_64", "amd64"):
    CFLAGS += ["-march=native", "-mprefer-vector-width=512"]


def _cpu_signature() -> str:
    """The CPU's model and feature flags (Linux /proc/cpuinfo; the machine name elsewhere):
    a -march=native build is named by it, so a cache shared by different CPUs (a network
    home directory) never loads a build that uses instructions this CPU lacks."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    wanted = ("model name", "flags")
    return "\n".join(dict.fromkeys(line for line in lines if line.split(":")[0].strip() in wanted))


def _name(cflags: list[str]) -> str:
    """The extension's name: one per source, flags and CPU (xxh64 of them). torch builds each
    name in its own cache directory under its own lock, so checkouts or versions with
    different sources never wait on, or rebuild over, each other's build."""
    import xxhash

    digest = xxhash.xxh64(SOURCE.read_bytes())
    digest.update("\0".join(cflags).encode())
    digest.update(_cpu_signature().encode())  # -march=native: a build for this CPU only
    return f"speckv_rans_cpu_{digest.hexdigest()[:12]}"


def _load() -> ModuleType:
    """Compile (or load from the cache) and import the extension; raises on failure."""
    from torch.utils import cpp_extension  # imports setuptools: only when building

    cflags = [*CFLAGS, *_macros()]
    name = _name(cflags)
    if not hasattr(cpp_extension, "FileLock"):  # newer torch holds an flock the kernel releases
        lock = Path(cpp_extension._get_build_directory(name, verbose=False)) / "lock"
        if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
            logger.warning("removing a stale build lock left by a killed build: %s", lock)
            lock.unlink(missing_ok=True)
    return cpp_extension.load(
        name=name, sources=[str(SOURCE)], extra_cflags=cflags, extra_ldflags=["-fopenmp"], verbose=False
    )


def extension() -> ModuleType | None:
    """The compiled coder, building it on first call; None (after one warning) if it
    cannot be built. Thread-safe: concurrent first callers wait for one build."""
    global _extension, _build_failed
    if _extension is not None or _build_failed:
        return _extension
    with _build_lock:
        if _extension is None and not _build_failed:
            logger.info(
                "compiling speckv CPU coder (one time, ~%d s) or loading it from the torch extensions cache",
                BUILD_SECONDS_TYPICAL,
            )
            t0 = time.perf_counter()
            try:
                _extension = _load()
            except Exception as err:  # noqa: BLE001 -- any build failure (compiler, ninja, import) means fall back
                _build_failed = True
                logger.warning(
                    "speckv CPU coder could not be built (%s: %s); using the torch reference coder "
                    "(same bytes, much slower). Install a C++ compiler and ninja to speed up CPU coding.",
                    type(err).__name__, _reason(str(err)),
                )  # fmt: skip
            else:
                logger.info("speckv CPU coder ready after %.1f s", time.perf_counter() - t0)
    return _extension


def _reason(message: str) -> str:
    """The telling line of a build error: the compiler's first "error:", else the last line
    (e.g. "Ninja is required to load C++ extensions")."""
    lines = [line.strip() for line in message.splitlines() if line.strip()] or ["(no message)"]
    return next((line for line in lines if "error:" in line), lines[-1])


def available() -> bool:
    """True if the C++ coder is (or could now be) built: False means the reference runs."""
    return extension() is not None


def _check_cpu(*tensors: torch.Tensor) -> None:
    if any(t.device.type != "cpu" for t in tensors):
        raise ValueError(f"the CPU coder needs CPU tensors, got {[str(t.device) for t in tensors]}")


def cdf(
    keys: torch.Tensor,
    mu_q: torch.Tensor,
    e: torch.Tensor,
    r: torch.Tensor,
    dtype: str,
    w_wide: int = em.W_WIDE,
    kappa: int = em.KAPPA,
) -> torch.Tensor:
    """entropy_model.cdf in C++: C(k) for int64 keys in [0, 2^B], broadcast against the
    quantised int64 parameters. Same integers; int64 output of the broadcast shape."""
    ext = extension()
    if ext is None:
        return em.cdf(keys, mu_q, e, r, dtype, w_wide, kappa)
    em.check_mixture(w_wide, kappa)
    em.symbol_bits(dtype)  # a clear error for an unknown dtype name
    if any(t.dtype != torch.int64 for t in (keys, mu_q, e, r)):
        raise ValueError("keys, mu_q, e and r must be int64")
    _check_cpu(keys, mu_q, e, r)
    keys, mu_q, e, r = (t.contiguous() for t in torch.broadcast_tensors(keys, mu_q, e, r))
    return ext.cdf(keys, mu_q, e, r, em.phi_table(), w_wide, kappa, *em.DTYPE_SPECS[dtype])


def encode(cum: torch.Tensor, freq: torch.Tensor, num_lanes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """rans_reference.encode in C++, same bytes: P pages of N symbols, ``num_lanes`` lanes
    per page. cum, freq: int64 [N] or [P, N] with 1 <= freq and 0 <= cum <= M - freq
    (ValueError otherwise). Returns (words int64 [W] in [0, 2^32), lane_words int64 [P, NL])."""
    ext = extension()
    if ext is None:
        return ref.encode(cum, freq, num_lanes)
    cum, freq = ref._as_batch(cum), ref._as_batch(freq)
    if cum.shape != freq.shape or cum.dtype != torch.int64 or freq.dtype != torch.int64:
        raise ValueError("cum and freq must be int64 tensors of the same shape")
    if num_lanes < 1:
        raise ValueError(f"num_lanes must be >= 1, got {num_lanes}")
    _check_cpu(cum, freq)
    words, lane_words = ext.encode(cum.contiguous(), freq.contiguous(), num_lanes)
    return words, lane_words


def page_hash(page: torch.Tensor) -> int:
    """kernels/page_hash.py's page hash (u64) of a CPU page (any dtype, any strides), with
    the C++ loop over all threads; page_hash.reference where the extension cannot be built."""
    ext = extension()
    if ext is None:
        return ph.reference(page)
    _check_cpu(page)
    digest = ext.page_hash(ph.page_bytes(page), *(ph.signed(c) for c in (ph.SEED, ph.GAMMA, ph.MIX1, ph.MIX2)))
    return digest & ph.MASK64


def _level1(model: str, dtype: str, w_wide: int, kappa: int) -> torch.Tensor | None:
    """The C++ coder's model argument: table_model.level1_table for the table model, None
    for the exact model; ValueError for an unknown model or one that cannot code dtype."""
    tm.check_model(model, dtype)
    return tm.level1_table(w_wide, kappa) if model == tm.MODEL_TABLE else None


def encode_values(
    bits: torch.Tensor | Sequence[torch.Tensor],
    mu: torch.Tensor | Sequence[torch.Tensor],
    sigma: torch.Tensor | Sequence[torch.Tensor],
    dtype: str,
    num_lanes: int,
    w_wide: int = em.W_WIDE,
    kappa: int = em.KAPPA,
    model: str = tm.MODEL_EXACT,
) -> tuple[torch.Tensor, torch.Tensor]:
    """rans_reference.encode_values in one C++ pass per symbol (quantize_params, the model
    -- both C values, or the table model's two steps -- and the rANS steps; no int64 [N]
    arrays), same bytes. bits: storage patterns (int16 for 16-bit dtypes, else uint8) [P, N]
    or [N], or one contiguous [N] tensor per page, read in place; mu, sigma float32 [P, N]
    or [N], or one tensor per page whose C-order flattening is its N values
    (Predictor.predict_rows: rows, possibly broadcast views), read in place. model: "exact"
    or "table" (16-bit dtypes). Returns (words int32 [W] holding the u32 words, lane_words
    int64 [P, NL]). One stage of an Encoder."""
    if extension() is None:
        return ref.encode_values(bits, mu, sigma, dtype, num_lanes, w_wide, kappa, model=model)
    encoder = Encoder(bits, dtype, num_lanes, w_wide, kappa, model)
    if encoder.position:  # (pages of no symbols have only their lanes' flush)
        encoder.encode(mu, sigma)
    return encoder.finish()


class Encoder:
    """encode_values a stage at a time (the chunked encoder): the pages' storage patterns
    (as encode_values takes them, read in place) at construction, then ``encode(mu, sigma)``
    for the symbols just before those coded so far, LAST STAGE FIRST (rANS encodes in
    reverse: rans_reference's warning 1), and ``finish()`` for (words, lane_words), the
    bytes encode_values gives for the whole pages. So a multi-stage predictor's (mu, sigma)
    need only exist a stage at a time. Needs the C++ extension (``available()``)."""

    def __init__(self, bits, dtype: str, num_lanes: int, w_wide: int = em.W_WIDE, kappa: int = em.KAPPA,
                 model: str = tm.MODEL_EXACT):
        ext = extension()
        if ext is None:
            raise RuntimeError("the C++ coder is not available (see the log); use encode_values")
        em.check_mixture(w_wide, kappa)
        if num_lanes < 1:
            raise ValueError(f"num_lanes must be >= 1, got {num_lanes}")
        b = em.symbol_bits(dtype)
        pages = list(ref._as_batch(bits)) if isinstance(bits, torch.Tensor) else list(bits)  # [N] each
        want = torch.int16 if b == 16 else torch.uint8
        if not pages or any(p.dtype != want or p.dim() != 1 or p.numel() != pages[0].numel() for p in pages):
            raise ValueError(f"{dtype} bits must be {want}, [P, N] or one [N] tensor per page")
        _check_cpu(*pages)
        self.num_pages, self.position = len(pages), pages[0].numel()  # symbols [position, N) are coded
        self._encoder = ext.ValueEncoder([p.contiguous() for p in pages], num_lanes, em.phi_table(), w_wide, kappa,
                                         *em.DTYPE_SPECS[dtype], _level1(model, dtype, w_wide, kappa))

    def encode(self, mu: torch.Tensor | Sequence[torch.Tensor], sigma: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Code the n symbols before ``position`` of every page from float32 (mu, sigma) of
        those symbols: [P, n] or [n], or one tensor per page of n values (rows, read in place)."""
        n = mu.shape[-1] if isinstance(mu, torch.Tensor) else mu[0].numel()
        if not 1 <= n <= self.position:
            raise ValueError(f"encode of {n} symbols before position {self.position}")
        shape = torch.Size((self.num_pages, n))
        mu, sigma = _rows(mu, shape), _rows(sigma, shape)
        _check_cpu(*mu, *sigma)
        self._encoder.encode(mu, sigma, self.position - n)
        self.position -= n

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(words int32 [W] holding the u32 words, lane_words int64 [P, NL]); every symbol
        must be coded."""
        if self.position:
            raise ValueError(f"finish() with symbols [0, {self.position}) not coded")
        return tuple(self._encoder.finish())


def _rows(params: torch.Tensor | Sequence[torch.Tensor], shape: torch.Size) -> list[torch.Tensor]:
    """encode_values' (or a decoder stage's) mu or sigma as the C++ reads them (rans_cpu.cpp
    Rows): per page, a float32 view of its N values in C order, any strides (no copy up to
    MAX_PAGE_DIMS dims)."""
    pages, n = shape
    if isinstance(params, torch.Tensor):
        params = list(ref._as_batch(params))
    if len(params) != pages or any(t.dtype != torch.float32 or t.numel() != n for t in params):
        raise ValueError("mu and sigma must be float32, [P, N] like bits or one tensor of N values per page")
    return [t if t.dim() <= ref.MAX_PAGE_DIMS else t.reshape(t.shape[0], -1) for t in params]


class Decoder(ref.Decoder):
    """rans_reference.Decoder with its per-stage loop in C++ (same keys, same verdict).

    Construction (stream validation, initial states x and word pointers ptr, int64
    [P * NL]) and ``finish()`` are the reference's own code. ``model="table"`` decodes
    the table model (in C++ with ``decode_values``; ``decode``, the integer level, runs the
    reference's for it).
    """

    def __init__(
        self,
        words: torch.Tensor,
        lane_words: torch.Tensor,
        num_symbols: int,
        dtype: str,
        w_wide: int = em.W_WIDE,
        kappa: int = em.KAPPA,
        model: str = tm.MODEL_EXACT,
    ):
        super().__init__(words, lane_words, num_symbols, dtype, w_wide, kappa, model)
        self.cum1 = _level1(model, dtype, w_wide, kappa)
        # the level-1 lookup on the slot's top bits (table_model.level1_start), decode only
        self.start1 = None if self.cum1 is None else tm.level1_start(w_wide, kappa)

    def decode(self, mu_q: torch.Tensor, e: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """Keys (int64, [P, n] or [n] like the inputs) of the next n symbols of each page,
        given their quantised parameters (int64, from quantize_params). The table model's
        integer level runs the reference (the codec decodes with decode_values)."""
        ext = extension()
        if ext is None or self.model != tm.MODEL_EXACT:
            return super().decode(mu_q, e, r)
        squeeze = mu_q.dim() == 1
        (mu_q, e, r), n = self._stage((mu_q, e, r), torch.int64)
        _check_cpu(self.words, mu_q, e, r)
        self.words = self.words.contiguous()
        self.x, self.ptr = self.x.contiguous(), self.ptr.contiguous()  # updated in place
        keys = ext.decode(
            self.words, self.x, self.ptr, mu_q.contiguous(), e.contiguous(), r.contiguous(),
            self.num_lanes, self.position, em.phi_table(), self.quantiles, self.w_wide, self.kappa,
            *em.DTYPE_SPECS[self.dtype],
        )  # fmt: skip
        self.position += n
        return keys[0] if squeeze else keys


    def decode_values(
        self,
        mu: torch.Tensor | Sequence[torch.Tensor],
        sigma: torch.Tensor | Sequence[torch.Tensor],
        out_bits: torch.Tensor | Sequence[torch.Tensor],
    ) -> None:
        """rans_reference.Decoder.decode_values in C++ (quantize_params, the search and the
        storage patterns per symbol; no int64 [N] arrays). Needs int32 (u32) words. mu,
        sigma: float32 [P, n] or [n], or one tensor per page whose C-order flattening is
        the stage's n values (Predictor.predict_rows' rows, possibly broadcast views), read
        in place as encode_values reads them. out_bits as the reference takes it
        (page_rows): [P, N], or P pages of N elements (e.g. the caller's), any shape and
        strides: each element is written where it lies."""
        ext = extension()
        if ext is None or self.words.dtype != torch.int32:
            return super().decode_values(mu, sigma, out_bits)
        n = mu.shape[-1] if isinstance(mu, torch.Tensor) else mu[0].numel()
        shape = torch.Size((self.num_pages, n))
        mu, sigma = _rows(mu, shape), _rows(sigma, shape)
        if self.position + n > self.num_symbols:
            raise ValueError(f"decode of {n} symbols at position {self.position} does not fit {self.num_symbols}")
        out_bits = ref.page_rows(out_bits, self.num_pages, self.num_symbols)
        _check_cpu(self.words, *mu, *sigma, *out_bits)
        self.x, self.ptr = self.x.contiguous(), self.ptr.contiguous()  # updated in place
        # the table model's lanes that decoded a cell holding no key (a corrupt stream)
        bad = None if self.cum1 is None else torch.zeros(self.x.shape, dtype=torch.uint8)
        ext.decode_values(
            self.words.contiguous(), self.x, self.ptr, mu, sigma, self.num_lanes,
            self.position, out_bits, em.phi_table(), self.quantiles,
            self.w_wide, self.kappa, *em.DTYPE_SPECS[self.dtype], self.cum1, self.start1, bad,
        )  # fmt: skip
        if bad is not None:
            self.lane_ok &= bad == 0
        self.position += n


# ---- Self-check (python -m sglang_speckv.kernels.rans_cpu) -------------------------------


def _self_check() -> None:
    """A realistic batch (8 SmolLM2 bf16 pages of 16 tokens: 184,320 scalars each) coded by
    this coder and the torch reference in the same process: same bytes, same keys, speeds.
    Time it with OMP_NUM_THREADS=1 for per-core figures."""
    import sys

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    t0 = time.perf_counter()
    if not available():
        raise SystemExit("the C++ coder did not build (see the warning above)")
    print(f"extension ready in {time.perf_counter() - t0:.1f} s (compiled now or loaded from the cache)")
    torch.manual_seed(0)
    num_pages, n, dtype = 8, 184_320, "bf16"
    mu = torch.randn(num_pages, n)
    sigma = torch.rand(num_pages, n) + 0.1
    values = (mu + sigma * torch.randn(num_pages, n)).to(em.TORCH_DTYPES[dtype])
    keys = em.keys_from_bits(em.storage_bits(values), dtype)
    mu_q, e, r = em.quantize_params(mu, sigma)
    raw_mb = values.numel() * values.element_size() / 1e6
    em.phi_table(), em.key_fields(dtype, "cpu"), ref._quantile_table(em.W_WIDE, em.KAPPA)  # not timed

    def timed(fn):
        t = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t

    def decode(decoder_cls, words, lane_words):
        dec = decoder_cls(words, lane_words, n, dtype)
        cut = n // 3  # two stages, cut mid-step
        got = torch.cat([dec.decode(mu_q[:, :cut], e[:, :cut], r[:, :cut]),
                         dec.decode(mu_q[:, cut:], e[:, cut:], r[:, cut:])], dim=1)  # fmt: skip
        return got, dec.finish()

    print(f"{num_pages} pages x {n} {dtype} scalars ({raw_mb:.2f} MB), {torch.get_num_threads()} threads")
    for num_lanes in (ref.default_lanes(n), n // 1024):
        cum_ref, t_cdf_ref = timed(lambda: em.cdf(keys, mu_q, e, r, dtype))
        cum, t_cdf = timed(lambda: cdf(keys, mu_q, e, r, dtype))
        freq = cdf(keys + 1, mu_q, e, r, dtype) - cum
        (words_ref, lanes_ref), t_enc_ref = timed(lambda: ref.encode(cum, freq, num_lanes))
        (words, lane_words), t_enc = timed(lambda: encode(cum, freq, num_lanes))
        (got, ok), t_dec = timed(lambda: decode(Decoder, words, lane_words))
        (got_ref, ok_ref), t_dec_ref = timed(lambda: decode(ref.Decoder, words, lane_words))
        same = torch.equal(cum, cum_ref) and torch.equal(words, words_ref) and torch.equal(lane_words, lanes_ref)
        round_trip = torch.equal(got, keys) and torch.equal(got_ref, keys) and bool(ok.all() and ok_ref.all())
        print(
            f"  {num_lanes} lanes/page: {words.numel() * 32 / keys.numel():.4f} bits/symbol; "
            f"bytes == reference: {same}; round trip: {'OK' if round_trip else 'FAILED'}\n"
            f"    cdf    {raw_mb / t_cdf:8.1f} MB/s (torch reference {raw_mb / t_cdf_ref:6.1f} MB/s; encode needs two)\n"
            f"    encode {raw_mb / t_enc:8.1f} MB/s (torch reference {raw_mb / t_enc_ref:6.1f} MB/s; rANS only)\n"
            f"    decode {raw_mb / t_dec:8.1f} MB/s (torch reference {raw_mb / t_dec_ref:6.1f} MB/s)"
        )
        if not (same and round_trip):
            raise SystemExit(1)
    # The value-level path the codec calls, both models on the same pages (the table model's
    # first page against the reference encoder; the reference decoder would take minutes),
    # and on pages of a sharp predictor (sigma / 50: most symbols not dense, so the table
    # model codes them with the exact model's step); decoded into contiguous pages and into
    # strided ones (the pages [2, 30, 16, 3, 64] of a SmolLM2 host buffer in SGLang's
    # layer_first layout, [2, 30, 8 x 16, 3, 64]: the server's read path). Best of 5 in CPU
    # time of the process, the runs interleaved: steadier than wall time on a shared machine.
    num_lanes, repeats = ref.default_lanes(n), 5
    host = torch.empty((2, 30, num_pages * 16, 3, 64), dtype=torch.int16)
    host_pages = [host[:, :, 16 * p : 16 * (p + 1)] for p in range(num_pages)]  # [2, 30, 16, 3, 64] views
    tm.level1_table(em.W_WIDE, em.KAPPA)  # not timed
    print(f"  value level, {num_lanes} lanes/page (encode_values, Decoder.decode_values), CPU time, best of {repeats}:")
    for label, shrink in (("sigma as above", 1.0), ("sigma / 50", 50.0)):
        page_sigma = sigma / shrink
        page_bits = (mu + page_sigma * torch.randn(num_pages, n)).to(em.TORCH_DTYPES[dtype]).view(torch.int16)
        dense = float(tm.dense(*em.quantize_params(mu, page_sigma), dtype).double().mean())
        print(f"    {label} ({dense:.1%} of the symbols dense):")
        best = {model: [float("inf")] * 3 for model in tm.MODELS}  # encode, decode, decode strided seconds
        for _ in range(repeats):
            for model in tm.MODELS:
                t = time.process_time()
                words, lane_words = encode_values(page_bits, mu, page_sigma, dtype, num_lanes, model=model)
                t_enc = time.process_time() - t
                dec = Decoder(words, lane_words, n, dtype, model=model)
                out = torch.empty_like(page_bits)
                t = time.process_time()
                dec.decode_values(mu, page_sigma, out)
                t_dec = time.process_time() - t
                dec_strided = Decoder(words, lane_words, n, dtype, model=model)
                t = time.process_time()
                dec_strided.decode_values(mu, page_sigma, host_pages)
                t_strided = time.process_time() - t
                best[model] = [min(b, t) for b, t in zip(best[model], (t_enc, t_dec, t_strided))]
                strided_same = all(torch.equal(pg.reshape(-1), want) for pg, want in zip(host_pages, page_bits))
                if not (torch.equal(out, page_bits) and bool(dec.finish().all())
                        and strided_same and bool(dec_strided.finish().all())):
                    raise SystemExit(f"{model} model: round trip FAILED")
        for model in tm.MODELS:
            words, lane_words = encode_values(page_bits, mu, page_sigma, dtype, num_lanes, model=model)
            first_page = ref.encode_values(page_bits[:1], mu[:1], page_sigma[:1], dtype, num_lanes, model=model)[0]
            same = torch.equal(words[: int(lane_words[0].sum())], first_page)
            t_enc, t_dec, t_strided = (t / page_bits.numel() * 1e9 for t in best[model])
            print(
                f"      {model:5s} model: {words.numel() * 32 / page_bits.numel():.4f} bits/symbol; "
                f"encode {t_enc:5.1f} ns/symbol, decode {t_dec:5.1f} ns/symbol "
                f"(into layer_first host pages {t_strided:5.1f}); "
                f"first page == reference: {same}; round trip: OK"
            )
            if not same:
                raise SystemExit(1)

if __name__ == "__main__":
    _self_check()
