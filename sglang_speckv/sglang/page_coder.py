"""Page coding for the backend: canonical pages <-> stored values, on the device SGLang uses.

The predictors a configuration names (its ``predictor`` and each tier's) are built once;
new pages are coded with the first, reads pick each blob's predictor by the (id,
fingerprint) in its header, and tiers with their own predictor re-code pages demoted into
them (``recode``, the store's hook).

With a live calibration (config ``calibrate = "auto"``, predictors/live.py) written pages
are fed to it, and once it is ready its predictor codes new pages instead of the
configured one and is what tier predictor ``"live"`` re-codes with; it is known to reads
(by its blob identity) from then on. It is not part of ``identity()``: the store's
namespace stays the same before and after the switch and across restarts.

Nothing here raises into SGLang: ``encode`` returns None for a page it could not code
(logged once per cause), ``decode_into`` reports how many pages verified. Start-up problems
(a predictor that cannot code this pool's pages) raise ConfigError from ``check``.

On CUDA, coding runs on one stream per calling thread with pages staged through device
memory; on the CPU, in place (the C++ coder).
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections import Counter

import torch

from sglang_speckv import codec
from sglang_speckv.config import LIVE, ConfigError
from sglang_speckv.kernels.format import BlobError, parse_blob
from sglang_speckv.predictors import PAGE_STATS, PredictorSpecError, predictor_from_spec
from sglang_speckv.predictors.base import PageMeta, Predictor
from sglang_speckv.sglang.geometry import PageGeometry

logger = logging.getLogger(__name__)


class PageCoder:
    """Pages of one geometry <-> stored values (codec.pack_value: token ids + blob)."""

    def __init__(self, default: str, tier_predictors: list[str], batch_bytes: int):
        """``batch_bytes``: raw bytes the codec codes at once (config coding_batch_bytes)."""
        self.batch_bytes = batch_bytes
        specs = dict.fromkeys([default, *(s for s in tier_predictors if s != LIVE), PAGE_STATS])
        try:
            self.predictors: dict[str, Predictor] = {s: predictor_from_spec(s) for s in specs}
        except PredictorSpecError as e:
            raise ConfigError(f"predictor: {e}") from None
        self.default = self.predictors[default]
        # where a predictor cannot code a page (e.g. a model predictor, a page without token ids)
        self.fallback = self.predictors[PAGE_STATS]
        # values carry every token before the page too when some predictor needs them
        self.wants_prefix = any(p.needs_prefix for p in self.predictors.values())
        # ... up to the longest prefix a predictor uses
        self.max_prefix_tokens = max(getattr(p, "max_prefix_tokens", 0) for p in self.predictors.values())
        self._by_blob = {(p.id, p.fingerprint): p for p in self.predictors.values()}
        self.geometry: PageGeometry | None = None
        self.device = torch.device("cpu")
        self._streams = threading.local()
        self._warned: set[str] = set()  # causes already logged (one line each)
        self.live = None  # predictors/live.py LiveCalibration (calibrate = "auto"), from open()
        self._live_predictor: Predictor | None = None  # its predictor, once checked and known to reads
        self._written_lock = threading.Lock()
        self._written: dict[str, Counter] = {}  # predictor name -> pages, raw and coded bytes written

    def open(self, geometry: PageGeometry, device: torch.device, live=None) -> None:
        """Code pages of ``geometry`` on ``device``, with live calibration ``live`` if
        given. ConfigError, naming the predictor and what to do, if a configured predictor
        cannot code such pages."""
        for spec, predictor in self.predictors.items():
            try:
                predictor.check(geometry.dtype, geometry.shape)
            except ValueError as e:
                raise ConfigError(f"predictor {spec!r}: {e}") from None
        self.geometry, self.device, self.live = geometry, device, live
        self.live_predictor()  # a calibration saved by an earlier run: known to reads at once
        self._warm_up()

    def _warm_up(self) -> None:
        """codec.warm_up on the pool's page shape and device, so that a restore's first run
        costs what its hundredth does: page_stats first (it compiles or loads the coder,
        which every predictor shares), then each other predictor that can code a page
        without token ids (its mixture's tables and its parameters on the device; a model
        predictor, which needs token ids, warms up with its first page). A failure is
        logged; pages then fail as they would have anyway (per page, never into SGLang)."""
        t0 = time.perf_counter()
        warmed = []
        live = self._live_predictor
        predictors = dict.fromkeys([self.predictors[PAGE_STATS], *self.predictors.values(), *([live] if live else [])])
        for predictor in predictors:
            try:
                codec.warm_up(self.geometry.dtype, self.geometry.shape, self.device, predictor)
            except ValueError as e:  # needs token ids: nothing to warm up without them
                logger.info("speckv: no start-up warm-up for predictor %s: %s", predictor.name, e)
                continue
            except Exception as e:  # noqa: BLE001 - start-up goes on; coding failures are per page
                logger.warning("speckv: coder warm-up with predictor %s on %s failed (%s: %s); pages may fail "
                               "to code", predictor.name, self.device, type(e).__name__, e)
                continue
            warmed.append(predictor.name)
        if warmed:
            logger.info("speckv: coder ready on %s after %.1f s (compiled or loaded at start-up; warmed up: %s)",
                        self.device, time.perf_counter() - t0, ", ".join(warmed))

    def identity(self) -> str:
        """The configured predictors' ids and fingerprints (for the store's namespace), in a
        fixed order; page_stats alone (fingerprint 0, parameters in every blob) gives ""."""
        calibrated = sorted({(p.id, p.fingerprint) for p in self.predictors.values() if p.fingerprint})
        return ",".join(f"{pid}:{fp:016x}" for pid, fp in calibrated)

    def live_predictor(self) -> Predictor | None:
        """The live calibration's predictor once it is ready (registered for reads on first
        sight), else None."""
        if self._live_predictor is not None or self.live is None:
            return self._live_predictor
        predictor = self.live.predictor()
        if predictor is None:
            return None
        try:
            predictor.check(self.geometry.dtype, self.geometry.shape)
        except ValueError as e:  # for_served_model checked the layout: not expected
            self.warn_once("live-check", "speckv: the live calibration cannot code these pages, page_stats "
                           "goes on: %s (logged once)", e)
            return None
        self._by_blob[predictor.id, predictor.fingerprint] = predictor
        self._live_predictor = predictor
        logger.info("speckv: live calibration ready (%s, fingerprint %016x): new pages are coded with it",
                    predictor.name, predictor.fingerprint)
        return predictor

    def writer(self) -> Predictor:
        """The predictor new pages are coded with: the live calibration's once ready, else
        the configured one."""
        return self.live_predictor() or self.default

    def tier_predictor(self, spec: str) -> Predictor | None:
        """The predictor a tier's ``predictor`` field names (None: 'live', not ready yet)."""
        return self.live_predictor() if spec == LIVE else self.predictors[spec]

    def feed(self, pages: torch.Tensor, metas: list[PageMeta]) -> None:
        """Offer written pages ([P, *canonical shape], storage dtype, a private copy) at
        their positions to the live calibration while it samples. Never raises."""
        if self.live is None or self.live.status()["state"] != "sampling":
            return
        try:
            if self.geometry.dtype == "fp8_e4m3":  # SGLang keeps fp8 KV as uint8
                pages = pages.view(torch.float8_e4m3fn)
            for page, meta in zip(pages, metas):
                self.live.feed(page, meta.position)
        except Exception as e:  # noqa: BLE001 - sampling must not fail a write
            self.warn_once(f"feed:{type(e).__name__}", "speckv: live calibration sampling failed: %s: %s "
                           "(logged once)", type(e).__name__, e)

    def stats(self) -> dict:
        """For the stats file: pages, raw and coded bytes written per predictor (and the
        ratio), and the live calibration's status."""
        with self._written_lock:
            written = {name: dict(c) for name, c in self._written.items()}
        for c in written.values():
            c["ratio"] = round(c["raw_bytes"] / c["coded_bytes"], 3) if c["coded_bytes"] else None
        return {"written_by_predictor": written, "live_calibration": self.live.status() if self.live else None}

    def warn_once(self, cause: str, message: str, *args) -> None:
        if cause not in self._warned:
            self._warned.add(cause)
            logger.warning(message, *args)

    # --- writes --------------------------------------------------------------------------

    def encode(self, pages: torch.Tensor, metas: list[PageMeta],
               predictor: Predictor | None = None) -> list[bytes | None]:
        """Stored values of ``pages`` ([P, *canonical shape], storage dtype, a private
        copy) with the tokens ``metas`` know; None for every page of a batch that failed to
        code (logged once per cause). Pages ``predictor`` (default: ``writer()``, and then
        they are counted as written in ``stats()``) cannot code (``can_code``) are coded
        with the fallback (page_stats), logged once per cause."""
        count = predictor is None
        predictor = predictor or self.writer()
        groups: dict[Predictor, list[int]] = {}
        for i, meta in enumerate(metas):
            why = predictor.can_code(meta)
            if why is not None:
                self.warn_once(f"fallback:{predictor.name}:{why}", "speckv: predictor %s cannot code some pages "
                               "(%s); they are coded with %s (logged once)", predictor.name, why, self.fallback.name)
            groups.setdefault(self.fallback if why else predictor, []).append(i)
        values: list[bytes | None] = [None] * len(metas)
        for pred, members in groups.items():
            try:
                blobs = self._encode(pages[members], [metas[i] for i in members], pred)
            except Exception as e:  # noqa: BLE001 - a predictor or coder bug must not reach SGLang's thread
                self.warn_once(f"encode:{pred.name}:{type(e).__name__}",
                               "speckv: coding with predictor %s failed, pages not stored: %s: %s "
                               "(logged once)", pred.name, type(e).__name__, e)
                return [None] * len(metas)
            for i, blob in zip(members, blobs):
                values[i] = codec.pack_value(self._stored_tokens(metas[i]), blob)
            if count:
                coded = sum(len(values[i]) for i in members)
                with self._written_lock:
                    self._written.setdefault(pred.name, Counter()).update(
                        pages=len(members), raw_bytes=pages[0].numel() * pages.element_size() * len(members),
                        coded_bytes=coded)
        return values

    def _stored_tokens(self, meta: PageMeta) -> bytes | None:
        """The token ids stored with a page (uint32 LE): the page's own, preceded by every
        token before it when some predictor needs them and they are known."""
        if meta.token_ids is None:
            return None
        ids = meta.token_ids
        if (self.wants_prefix and meta.prefix_ids is not None and len(meta.prefix_ids) == meta.position
                and meta.position <= self.max_prefix_tokens):
            ids = meta.prefix_ids + tuple(ids)
        return struct.pack(f"<{len(ids)}I", *ids)

    def _meta(self, header, tokens: bytes | None) -> PageMeta:
        """What a reader knows of a stored page: its geometry, position and tokens (the
        page's own are the last ``page_size``; a longer run also holds the prefix)."""
        ids = codec.token_tuple(tokens)
        t = header.shape[2]
        prefix = None
        if ids is not None and len(ids) == header.position + t:
            ids, prefix = ids[-t:], ids[:-t]
        elif ids is not None and len(ids) != t:
            ids = None
        return PageMeta(header.dtype, header.shape, header.position, ids, prefix)

    def _encode(self, pages: torch.Tensor, metas: list[PageMeta], predictor: Predictor) -> list[bytes]:
        if self.device.type != "cuda":
            return codec.encode_pages(list(pages), metas, predictor, w_wide=predictor.w_wide, kappa=predictor.kappa,
                                      batch_bytes=self.batch_bytes)
        with torch.cuda.stream(self._stream()):
            staged = pages.pin_memory().to(self.device, non_blocking=True)
            blobs = codec.encode_pages(list(staged), metas, predictor, w_wide=predictor.w_wide, kappa=predictor.kappa,
                                       batch_bytes=self.batch_bytes)
        return blobs  # encode_pages returns host bytes: the stream's work is done

    # --- reads ---------------------------------------------------------------------------

    def decode_into(self, keys: list[str], values: list, targets: list[torch.Tensor]) -> int:
        """Decode ``values`` (stored under ``keys``, in chain order) into ``targets``
        (canonical views of host memory), up to the first that fails any check; returns how
        many pages were filled. Only the first ``filled`` targets hold verified pages (a
        target past them may hold unspecified bytes: see _decode)."""
        g = self.geometry
        blobs, metas, predictors = [], [], []
        for key, value in zip(keys, values):
            try:
                tokens, blob = codec.unpack_value(value)
                header = parse_blob(blob).header
                predictor = self._by_blob.get((header.predictor_id, header.fingerprint))
                if predictor is None:
                    raise BlobError(f"coded by predictor {header.predictor_id} (fingerprint "
                                    f"{header.fingerprint:#x}), which this configuration does not name")
            except BlobError as e:
                logger.warning("speckv: stored page %s is unreadable, treated as a miss: %s", key, e)
                break
            blobs.append(blob)
            # The position recorded in the blob, not one derived from the read's prefix
            # keys: SGLang 0.5.23 passes a prefetch only the matched node's ancestors'
            # hashes, so the read-side count can fall short; the key fixes it anyway.
            meta = self._meta(header, tokens)
            metas.append(PageMeta(g.dtype, g.shape, meta.position, meta.token_ids, meta.prefix_ids))
            predictors.append(predictor)
        done = 0
        while done < len(blobs):  # runs of pages coded by the same predictor
            end = done + 1
            while end < len(blobs) and predictors[end] is predictors[done]:
                end += 1
            run = slice(done, end)
            errors = self._decode(predictors[done], blobs[run], metas[run], targets[run])
            for i, error in enumerate(errors, done):
                if error is not None:
                    logger.warning("speckv: stored page %s failed verification, treated as a miss: %s", keys[i], error)
                    return i
            done = end
        return done

    def _decode(self, predictor: Predictor, blobs: list, metas: list[PageMeta],
                targets: list[torch.Tensor]) -> list[Exception | None]:
        """The error (or None) per blob. Verified pages are in ``targets``; on the CPU the
        codec decodes into the targets in place, strided views of the host buffer included
        (every supported layout: no scratch page, no copy), so a page that fails
        verification may leave unspecified bytes in its target (and nowhere else in the
        buffer): it is reported as not read (a miss), and HiCache never reads the host slots
        of pages not read (it frees them). On CUDA the codec decodes on the device and the
        pages are copied into the targets."""
        try:
            if self.device.type != "cuda":
                _, errors = codec.decode_pages(blobs, predictor, metas=metas, out=targets, device=self.device,
                                                 batch_bytes=self.batch_bytes)
                return errors
            with torch.cuda.stream(self._stream()):
                pages, errors = codec.decode_pages(blobs, predictor, metas=metas, device=self.device,
                                                   batch_bytes=self.batch_bytes)
                for page, target in zip(pages, targets):
                    if page is not None:
                        target.copy_(page)  # device -> host, in order on this stream
                self._stream().synchronize()  # host memory must hold the page before we return
            return errors
        except Exception as e:  # noqa: BLE001 - a predictor or coder bug is a miss, not a crash
            self.warn_once(f"decode:{predictor.name}:{type(e).__name__}",
                           "speckv: decoding with predictor %s failed: %s: %s (logged once)",
                           predictor.name, type(e).__name__, e)
            return [e] * len(blobs)

    # --- demotion ------------------------------------------------------------------------

    def recode(self, target: Predictor | None, value: memoryview) -> bytes | memoryview:
        """The store's demotion hook for a tier with its own predictor: the stored value
        re-coded with ``target`` (None: moves unchanged). Raises BlobError if it cannot
        (the store then moves the value unchanged)."""
        if target is None:
            return value
        tokens, blob = codec.unpack_value(value)
        header = parse_blob(blob).header
        source = self._by_blob.get((header.predictor_id, header.fingerprint))
        if source is None:
            raise BlobError(f"coded by unknown predictor {header.predictor_id}")
        if source is target:
            return value  # already coded for this tier: moves unchanged
        meta = self._meta(header, tokens)
        why = target.can_code(meta)
        if why is not None:
            self.warn_once(f"recode:{target.name}:{why}", "speckv: predictor %s cannot re-code some pages (%s); "
                           "they move as they are (logged once)", target.name, why)
            return value
        pages, errors = codec.decode_pages([blob], source, metas=[meta], device=self.device)
        if errors[0] is not None:
            raise errors[0]
        (new,) = self.encode(pages[0].unsqueeze(0).cpu(), [meta], target)
        if new is None:
            raise BlobError(f"re-coding with {target.name} failed")
        return new

    def _stream(self) -> torch.cuda.Stream:
        """This thread's CUDA stream for coding (SGLang's threads never share one)."""
        stream = getattr(self._streams, "stream", None)
        if stream is None:
            stream = self._streams.stream = torch.cuda.Stream(self.device)
        return stream
