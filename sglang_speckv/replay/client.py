"""``speckv replay``: send a trace to a running SGLang server and measure every request.

Requests go to SGLang's native ``/generate`` as token ids (``input_ids``), streamed, greedy,
with ``ignore_eos`` so each produces exactly its trace's output length. Per request we keep
the time to first token (first streamed chunk carrying an output token), the end-to-end
latency, the output tokens and the cached prompt tokens by tier from
``meta_info.cached_tokens_details`` (``device`` = GPU/L1, ``host`` = host RAM/L2,
``storage`` = the L3 backend: speckv or whatever the server runs).

Scheduling: a request with no predecessor is released at ``arrival_s / speedup``; a turn of
a session is released ``gap_s / speedup`` after the previous turn of that session completes
(its prompt contains that turn's real reply). At most ``concurrency`` requests are in
flight; a released request waits for a slot (the wait shows as ``start_s - release_s``).

Polite by construction: only the given URL is contacted (no redirects followed), every
call has a timeout, the run stops at ``time_limit`` or Ctrl-C (in-flight streams are
closed, which makes SGLang abort them) and what was measured is still reported.
"""

from __future__ import annotations

import argparse
import heapq
import json
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import requests as http

from sglang_speckv.replay.synth import DEFAULT_VOCAB, chunk_tokens, key_of
from sglang_speckv.replay.traces import Request

# Prompt tokens of the warm-up request: fewer than the page sizes `speckv serve` uses (16 on
# the CPU engine, 64 on GPUs), so it leaves no full page behind in L3.
WARMUP_TOKENS = 8
# /flush_cache is refused until the scheduler has run an idle step after the last request
# (milliseconds on a GPU, up to seconds on a loaded CPU): retry that often, for that long.
FLUSH_RETRY_S = 0.5
FLUSH_WAIT_S = 60.0
# speckv rewrites its stats file after each batch it reads or writes, at most once a second
# (backend.py): this long without a change means its writes are done, when batches take
# milliseconds (a GPU). The CPU coder takes seconds per batch: pass a longer quiet time.
SETTLE_QUIET_S = 3.0
# Texts per /tokenize call: large enough to amortise the round trip, small enough to keep a
# single call well under its timeout on a slow CPU server.
TOKENIZE_BATCH = 64


class ServerError(RuntimeError):
    """The server could not be reached or answered something unexpected."""


@dataclass
class Result:
    """What one request measured. Times in seconds from the start of the run."""

    index: int
    session: int | None
    release_s: float
    start_s: float = 0.0
    ttft_s: float | None = None  # from start_s to the first output token
    e2e_s: float | None = None  # from start_s to the end of the stream
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached: dict[str, int] = field(default_factory=dict)  # device / host / storage tokens
    error: str | None = None
    output_ids: list[int] = field(default_factory=list, repr=False)  # fed to later turns; not saved

    def to_json(self) -> dict:
        d = dict(vars(self))
        del d["output_ids"]
        return d


class Server:
    """The one HTTP client of SGLang's native API (the replay, the test server, the
    benchmarks): every call has a timeout, only the base URL is contacted."""

    def __init__(self, url: str, timeout_s: float):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.session = http.Session()

    def _post(self, path: str, payload: dict | None = None, timeout: float | None = None) -> http.Response:
        try:
            resp = self.session.post(self.url + path, json=payload, timeout=timeout or self.timeout_s, allow_redirects=False)
        except http.RequestException as e:
            raise ServerError(f"{self.url}{path}: {e}") from None
        if resp.status_code != 200:
            raise ServerError(f"{self.url}{path}: HTTP {resp.status_code}: {resp.text[:300]}")
        return resp

    def post(self, path: str, payload: dict | None = None, timeout: float | None = None) -> dict:
        """POST ``payload`` as JSON; the JSON answer ({} when there is none)."""
        resp = self._post(path, payload, timeout)
        return resp.json() if resp.content and resp.headers.get("content-type", "").startswith("application/json") else {}

    def healthy(self) -> bool:
        try:
            return self.session.get(self.url + "/health", timeout=10, allow_redirects=False).status_code == 200
        except http.RequestException:
            return False

    def health(self) -> None:
        try:
            resp = self.session.get(self.url + "/health", timeout=self.timeout_s, allow_redirects=False)
        except http.RequestException as e:
            raise ServerError(f"no server at {self.url} ({e}); start one with `speckv serve`") from None
        if resp.status_code != 200:
            raise ServerError(f"{self.url}/health: HTTP {resp.status_code}; is the server still starting?")

    def warm_up(self) -> None:
        """One tiny request, so that the first request of the trace does not pay the
        server's lazy start-up (tens of seconds on CPU). Its WARMUP_TOKENS tokens are fewer
        than a page, so nothing of it is stored in L3."""
        ids = chunk_tokens(key_of("warm-up"), WARMUP_TOKENS).tolist()
        payload = {"input_ids": ids, "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}}
        self._post("/generate", payload)

    def flush_cache(self, wait_s: float = FLUSH_WAIT_S) -> None:
        """Drop the device and host caches (L1, L2); the storage backend keeps its pages.
        SGLang flushes only while no request runs (it waits up to ``wait_s`` for that) and
        refuses for a moment after the last request: retried every FLUSH_RETRY_S until
        ``wait_s`` has passed."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self._post(f"/flush_cache?timeout={wait_s}", timeout=wait_s + self.timeout_s)
                return
            except ServerError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(FLUSH_RETRY_S)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        resp = self._post("/tokenize", {"prompt": texts, "add_special_tokens": False}).json()
        tokens = resp.get("tokens")
        if not isinstance(tokens, list) or len(tokens) != len(texts):
            raise ServerError(f"{self.url}/tokenize: unexpected answer {str(resp)[:200]}")
        return tokens

    def generate_greedy(self, prompt: str | list[int], max_new_tokens: int = 8, salt: str | None = None) -> dict:
        """Greedy generation with logprobs, not streamed. Returns {"tokens", "logprobs",
        "text", "cached": meta_info.cached_tokens_details (device/host/storage),
        "prompt_tokens"}.

        ``salt``: SGLang's ``cache_salt``, which namespaces the request in every cache tier
        (radix tree and L3 keys): a fresh salt gives a run with no cache hits at all, the
        reference that cached runs must reproduce exactly."""
        payload = {
            "sampling_params": {"temperature": 0.0, "max_new_tokens": max_new_tokens, "ignore_eos": True},
            "return_logprob": True,
            ("input_ids" if isinstance(prompt, list) else "text"): prompt,
        }
        if salt is not None:
            payload["cache_salt"] = salt
        out = self.post("/generate", payload)
        meta = out["meta_info"]
        return {
            "text": out["text"],
            "tokens": [t[1] for t in meta["output_token_logprobs"]],
            "logprobs": [t[0] for t in meta["output_token_logprobs"]],
            "cached": meta.get("cached_tokens_details") or {},
            "prompt_tokens": meta["prompt_tokens"],
        }

    def stream(self, input_ids: list[int], max_new_tokens: int, stop: threading.Event, result: Result, t0: float) -> None:
        """Stream one greedy generation, filling ``result`` (times relative to ``t0``)."""
        payload = {
            "input_ids": input_ids,
            "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0.0, "ignore_eos": True},
            "stream": True,
        }
        start = time.monotonic()
        result.start_s = start - t0
        result.prompt_tokens = len(input_ids)
        try:
            with self.session.post(
                self.url + "/generate", json=payload, stream=True, timeout=self.timeout_s, allow_redirects=False
            ) as resp:
                if resp.status_code != 200:
                    result.error = f"HTTP {resp.status_code}: {resp.text[:200]}"
                    return
                for line in resp.iter_lines():
                    if stop.is_set():
                        result.error = "stopped"
                        return
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        break
                    self._absorb(json.loads(data), result, start)
                    if result.error:
                        return
        except (http.RequestException, json.JSONDecodeError) as e:
            result.error = f"{type(e).__name__}: {e}"
            return
        result.e2e_s = time.monotonic() - start
        if result.output_tokens == 0 and result.error is None:
            result.error = "no output tokens"

    @staticmethod
    def _absorb(chunk: dict, result: Result, start: float) -> None:
        if "error" in chunk:
            result.error = str(chunk["error"])[:300]
            return
        meta = chunk.get("meta_info", {})
        done = int(meta.get("completion_tokens", 0))
        ids = chunk.get("output_ids") or []
        # SGLang streams either cumulative output_ids or, with --incremental-streaming-output,
        # only the new ones; completion_tokens tells which.
        if len(ids) == done:
            result.output_ids = list(ids)
        else:
            result.output_ids.extend(ids)
        if done and result.ttft_s is None:
            result.ttft_s = time.monotonic() - start
        result.output_tokens = done
        details = meta.get("cached_tokens_details") or {}
        result.cached = {tier: int(details.get(tier) or 0) for tier in ("device", "host", "storage")}
        if not details and meta.get("cached_tokens"):
            result.cached["device"] = int(meta["cached_tokens"])  # no HiCache: all on device


@dataclass
class Run:
    """One replay of a trace against one server."""

    label: str
    url: str
    results: list[Result]
    store_samples: list[dict]  # {"t": s, "tiers": {name: {"raw_bytes", "coded_bytes", "pages"}}}
    seconds: float
    stopped: str | None  # why the run ended early: "time limit", "interrupted", or None


def prompt_ids(
    req: Request, results: dict[int, Result], texts: dict[int, list[int]], seed: int, vocab: tuple[int, int]
) -> list[int]:
    """The token ids of a request's prompt: synthesised chunks, tokenised texts, and the real
    replies of earlier turns (synthesised if that turn failed)."""
    ids: list[int] = []
    for c in req.chunks:
        if c.text is not None:
            ids.extend(texts[c.key])
        elif c.reply_of is not None and c.reply_of in results and results[c.reply_of].output_ids:
            ids.extend(results[c.reply_of].output_ids)
        else:
            ids.extend(chunk_tokens(c.key, c.n_tokens, seed, vocab).tolist())
    return ids


def tokenize_texts(server: Server, requests: list[Request], progress: bool) -> dict[int, list[int]]:
    """Token ids of every distinct text chunk, by chunk key, from the server's tokenizer."""
    from tqdm import tqdm

    texts = {c.key: c.text for r in requests for c in r.chunks if c.text is not None}
    keys = list(texts)
    out: dict[int, list[int]] = {}
    for i in tqdm(range(0, len(keys), TOKENIZE_BATCH), desc="tokenize", unit="batch", disable=not progress or not keys):
        batch = keys[i : i + TOKENIZE_BATCH]
        for k, ids in zip(batch, server.tokenize([texts[k] for k in batch])):
            out[k] = ids
    return out


def replay(
    requests: list[Request],
    server: Server,
    *,
    label: str = "server",
    speedup: float = 1.0,
    concurrency: int = 4,
    time_limit_s: float | None = None,
    seed: int = 0,
    vocab: tuple[int, int] = DEFAULT_VOCAB,
    store_stats: Callable[[], dict | None] | None = None,
    stats_interval_s: float = 1.0,
    settle_s: float = 120.0,
    settle_quiet_s: float = SETTLE_QUIET_S,
    progress: bool = True,
) -> Run:
    """Replay ``requests`` against ``server``; see the module docstring for the schedule.
    ``store_stats`` (optional) is sampled every ``stats_interval_s`` seconds: the stored
    bytes per tier over time; after the last request, until they have not changed for
    ``settle_quiet_s`` (at most ``settle_s``), so that the server's last writes are counted."""
    from tqdm import tqdm

    if speedup <= 0 or concurrency < 1:
        raise ValueError("speedup must be > 0 and concurrency >= 1")
    texts = tokenize_texts(server, requests, progress)
    by_index = {r.index: r for r in requests}
    successors: dict[int, list[Request]] = {}
    ready: list[tuple[float, int]] = []  # heap of (release time from t0, request index)
    for r in requests:
        if r.after is not None and r.after in by_index:
            successors.setdefault(r.after, []).append(r)
        else:
            ready.append((r.arrival_s / speedup, r.index))
    heapq.heapify(ready)

    results: dict[int, Result] = {}
    done: queue.Queue[Result] = queue.Queue()
    stop = threading.Event()
    samples: list[dict] = []
    stopped: str | None = None
    t0 = time.monotonic()

    def worker(req: Request, res: Result) -> None:
        try:
            ids = prompt_ids(req, results, texts, seed, vocab)
            server.stream(ids, req.output_tokens, stop, res, t0)
        finally:
            done.put(res)

    def sample() -> None:
        if store_stats is not None:
            tiers = store_stats()
            if tiers is not None:
                samples.append({"t": time.monotonic() - t0, "tiers": tiers})

    bar = tqdm(total=len(requests), desc=f"replay {label}", unit="req", disable=not progress)
    in_flight = 0
    next_sample = 0.0
    try:
        while ready or in_flight:
            now = time.monotonic() - t0
            if time_limit_s is not None and now >= time_limit_s:
                stopped = "time limit"
                break
            if now >= next_sample:
                sample()
                next_sample = now + stats_interval_s
            if ready and in_flight < concurrency and ready[0][0] <= now:
                release, index = heapq.heappop(ready)
                req = by_index[index]
                res = Result(index=index, session=req.session, release_s=release)
                results[index] = res
                threading.Thread(target=worker, args=(req, res), daemon=True).start()
                in_flight += 1
                continue
            wait = stats_interval_s
            if ready and in_flight < concurrency:
                wait = min(wait, ready[0][0] - now)
            if time_limit_s is not None:
                wait = min(wait, time_limit_s - now)
            try:
                res = done.get(timeout=max(wait, 0.0))
            except queue.Empty:
                continue
            in_flight -= 1
            bar.update(1)
            end = time.monotonic() - t0
            for nxt in successors.get(res.index, []):
                heapq.heappush(ready, (end + nxt.gap_s / speedup, nxt.index))
    except KeyboardInterrupt:
        stopped = "interrupted"
    finally:
        stop.set()
        while in_flight:  # streams notice `stop` at their next chunk and close
            try:
                done.get(timeout=server.timeout_s)
            except queue.Empty:
                break
            in_flight -= 1
            bar.update(1)
        bar.close()
    seconds = time.monotonic() - t0
    sample()
    if store_stats is not None and stopped != "interrupted":
        # The server backs pages up to L3 after answering: wait until the stored bytes stop
        # changing, so the report's final figures include every write the trace caused.
        stable_since = time.monotonic()
        while time.monotonic() - t0 - seconds < settle_s and time.monotonic() - stable_since < settle_quiet_s:
            time.sleep(stats_interval_s)
            before = samples[-1]["tiers"] if samples else None
            sample()
            if samples and samples[-1]["tiers"] != before:
                stable_since = time.monotonic()
    finished = sorted(results.values(), key=lambda r: r.index)
    return Run(label, server.url, finished, samples, seconds, stopped)


# ----------------------------------------------------------------------------- store stats


def directory_stats(path: Path) -> Callable[[], dict | None]:
    """Stored bytes of a backend that keeps one file per page (SGLang's ``file`` backend):
    the sizes of the files under ``path``; raw and stored bytes are the same."""

    def read() -> dict | None:
        total = pages = 0
        for f in Path(path).rglob("*"):
            try:
                if f.is_file():
                    total += f.stat().st_size
                    pages += 1
            except OSError:  # a file removed while we walk: the next sample sees the change
                continue
        return {"files": {"raw_bytes": total, "coded_bytes": total, "pages": pages}}

    return read


def speckv_stats(path: Path) -> Callable[[], dict | None]:
    """Stored bytes of a speckv server: its backend's stats file (config ``stats_file``,
    rewritten atomically at most once a second while the backend works; sglang_speckv/
    backend.py). Per tier: ``bytes`` as stored (records of coded pages) and ``raw_bytes``
    (the same pages uncoded). None until the server has written the file."""

    def read() -> dict | None:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as e:
            raise ServerError(f"--store {path}: unreadable speckv stats file ({e})") from None
        tiers = (data.get("store") or {}).get("tiers")
        if not isinstance(tiers, list):
            raise ServerError(f"--store {path}: no store.tiers in this stats file; is it a speckv stats_file?")
        return {t["name"]: {"raw_bytes": t["raw_bytes"], "coded_bytes": t["bytes"], "pages": t["pages"]} for t in tiers}

    return read


def store_stats_reader(path: Path) -> Callable[[], dict | None]:
    """The stored-bytes sampler for a ``--store`` path: a directory is a file-per-page
    backend's (sizes of its files); anything else is a speckv stats file."""
    return directory_stats(path) if Path(path).is_dir() else speckv_stats(path)


# ----------------------------------------------------------------------------- command


def replay_command(parser: argparse.ArgumentParser):
    parser.add_argument("--trace", required=True, help="Mooncake JSONL, agentic-trace JSON, or gen:key=value,... (see traces.py)")
    parser.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:30000")
    parser.add_argument("--report", type=Path, required=True, help="directory for replay.json, REPLAY.md and the PNG plots")
    parser.add_argument("--compare", default=None, help="a second server URL: the same trace replayed against it, side by side")
    parser.add_argument("--labels", default=None, help="names of the servers in the report, e.g. speckv,file")
    parser.add_argument("--store", action="append", default=[], metavar="PATH",
                        help="what to sample for a server's stored bytes, once per --store, in server order: "
                             "a speckv stats_file (JSON) or the directory of a file-per-page backend")
    parser.add_argument("--block-tokens", type=int, default=None, help="tokens per Mooncake block (default 512); "
                        "shrinks prompts and outputs to fit a small model, keeping the sharing")
    parser.add_argument("--max-output-tokens", type=int, default=None, help="cap on each request's output tokens")
    parser.add_argument("--max-requests", type=int, default=None, help="replay only N requests")
    parser.add_argument("--skip-requests", type=int, default=0, help="start at this request of the trace (default 0)")
    parser.add_argument("--speedup", type=float, default=1.0, help="divide the trace's times by this (default 1)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight at most (default 4)")
    parser.add_argument("--time-limit", type=float, default=None, help="stop each run after this many seconds")
    parser.add_argument("--request-timeout", type=float, default=300.0,
                        help="seconds without an answer before a request counts as failed (default 300)")
    parser.add_argument("--settle", type=float, default=120.0,
                        help="after the last request, wait up to this many seconds for the stored bytes "
                             "(--store) to stop changing (default 120)")
    parser.add_argument("--settle-quiet", type=float, default=SETTLE_QUIET_S,
                        help=f"seconds without a change that mean the store is done (default {SETTLE_QUIET_S}; "
                             "20 for speckv's CPU coder)")
    parser.add_argument("--passes", type=int, default=1,
                        help="replay the trace this many times per server, flushing the device and host caches "
                             "before each: pass 2 on measures restores from L3 (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthesised tokens (default 0)")
    parser.add_argument("--vocab", default=f"{DEFAULT_VOCAB[0]}:{DEFAULT_VOCAB[1]}",
                        help="token id range LOW:HIGH of synthesised tokens (default %(default)s)")
    parser.add_argument("--no-flush", action="store_true",
                        help="do not flush the device and host caches (after a warm-up request) before each run")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return run_replay


def run_replay(args: argparse.Namespace) -> int:
    from sglang_speckv.replay.report import summarize, write_replay_report
    from sglang_speckv.replay.traces import TraceError, load_trace

    urls = [args.url] + ([args.compare] if args.compare else [])
    labels = args.labels.split(",") if args.labels else ["server", "compare"][: len(urls)]
    try:
        if len(labels) != len(urls):
            raise ValueError(f"--labels names {len(labels)} servers, but there are {len(urls)}")
        if args.passes < 1:
            raise ValueError("--passes must be >= 1")
        if len(args.store) > len(urls):
            raise ValueError(f"{len(args.store)} --store paths for {len(urls)} servers")
        low, _, high = args.vocab.partition(":")
        vocab = (int(low), int(high))
        requests = load_trace(args.trace, args.block_tokens, args.max_output_tokens, args.max_requests, args.skip_requests)
    except (TraceError, ValueError, OSError) as e:
        print(f"speckv replay: {e}", file=sys.stderr)
        return 2
    setup = {
        "trace": str(args.trace),
        "requests": len(requests),
        "block_tokens": args.block_tokens,
        "max_output_tokens": args.max_output_tokens,
        "skip_requests": args.skip_requests,
        "speedup": args.speedup,
        "concurrency": args.concurrency,
        "passes": args.passes,
        "time_limit_s": args.time_limit,
        "seed": args.seed,
        "vocab": list(vocab),
    }
    runs = []
    for k, (url, label) in enumerate(zip(urls, labels)):
        server = Server(url, args.request_timeout)
        stats = store_stats_reader(Path(args.store[k])) if k < len(args.store) else None
        for n in range(args.passes):
            name = label if args.passes == 1 else f"{label} pass {n + 1}"
            try:
                if n == 0:
                    server.health()
                    server.warm_up()
                if not args.no_flush:
                    server.flush_cache()
                run = replay(
                    requests, server, label=name, speedup=args.speedup, concurrency=args.concurrency,
                    time_limit_s=args.time_limit, seed=args.seed, vocab=vocab, store_stats=stats,
                    settle_s=args.settle, settle_quiet_s=args.settle_quiet, progress=not args.no_progress,
                )
            except (ServerError, ValueError) as e:
                print(f"speckv replay: {name}: {e}", file=sys.stderr)
                return 1
            runs.append(run)
            s = summarize(run)
            print(
                f"{name}: {s['ok']}/{s['requests']} ok, TTFT p50 {s['ttft_ms'].get('p50', float('nan')):.0f} ms, "
                f"hit rate {s['hit_rate']['total']:.1%} (storage {s['hit_rate']['storage']:.1%})"
                + (f", ended early: {run.stopped}" if run.stopped else "")
            )
            if run.stopped == "interrupted":
                break
        if runs and runs[-1].stopped == "interrupted":
            break
    paths = write_replay_report(args.report, setup, runs)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
