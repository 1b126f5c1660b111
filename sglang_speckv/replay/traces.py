"""Request traces: three formats read into one form.

A trace is a list of ``Request`` sorted by nominal arrival. A request's prompt is a tuple of
``Chunk``: runs of tokens with one identity (``key``). Equal keys mean equal tokens, and a
shorter chunk with a key is a prefix of a longer one (see synth.py), so two prompts share a
prefix exactly as far as they share chunks. Where the tokens come from:

- a Mooncake hash block, or a generated segment: synthesised from the key (synth.py);
- a message of an agentic trace (``text``): tokenised by the server at replay time;
- an assistant reply (``reply_of``): the server's real output for that earlier request at
  replay time (synthesised offline, with ``n_tokens`` tokens).

Formats (``load_trace``):

1. Mooncake JSONL (kvcache-ai/Mooncake FAST25-release/traces): one object per line,
   ``{"timestamp": ms, "input_length": N, "output_length": M, "hash_ids": [...]}``; hash ids
   name 512-token blocks, the last one possibly partial. ``block_tokens`` shrinks every
   block (and the output, by the same factor) to fit a small model, keeping the sharing.
   Requests are independent and sent at their timestamps.
2. SGLang agentic-trace JSON (``bench_serving --dataset-name agentic-trace``):
   ``{"conversations": [[{"messages": [...], "prompt_tokens": N}, ...], ...]}``; each turn
   lists the new non-assistant messages; the prompt of turn j is every earlier message and
   reply plus these. Turns of a conversation are sequential; conversations start together.
3. ``gen:key=value,...``: the built-in generator of multi-turn agent sessions
   (``AgentSpec``).

Files may be gzipped (``.gz``). Bad input raises ``TraceError`` naming the file and line.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

from sglang_speckv.replay.synth import key_of

# Mooncake's hash_ids name blocks of 512 tokens (FAST25-release/traces README).
MOONCAKE_BLOCK_TOKENS = 512
# Output tokens per agentic-trace turn: the format records none; SGLang's loader uses the
# same 220 (~ the mean assistant reply of OpenHands-style traces, DEFAULT_AGENTIC_OUTPUT_LEN).
AGENTIC_OUTPUT_TOKENS = 220
# Characters per token when an agentic trace gives no prompt_tokens to calibrate against:
# the usual figure for English BPE vocabularies.
DEFAULT_CHARS_PER_TOKEN = 4.0


class TraceError(ValueError):
    """A trace that cannot be read; the message names the file and line."""


@dataclass(frozen=True)
class Chunk:
    key: int  # identity of the tokens (equal keys: equal tokens, prefix-consistent)
    n_tokens: int  # nominal length; text and reply chunks may differ at replay time
    text: str | None = None  # agentic traces: tokenised by the server
    reply_of: int | None = None  # the server's output for request ``reply_of``


@dataclass(frozen=True)
class Request:
    index: int  # position in the trace (sorted by arrival_s)
    arrival_s: float  # nominal arrival, seconds from the trace start
    chunks: tuple[Chunk, ...]
    output_tokens: int
    session: int | None = None
    after: int | None = None  # index of the request this one follows (same session)
    gap_s: float = 0.0  # think time between ``after`` completing and this request

    @property
    def prompt_tokens(self) -> int:
        return sum(c.n_tokens for c in self.chunks)


def load_trace(
    spec: str | Path,
    block_tokens: int | None = None,
    max_output_tokens: int | None = None,
    max_requests: int | None = None,
    skip_requests: int = 0,
) -> list[Request]:
    """Read a trace file (format detected from its content) or generate one (``gen:...``).

    ``block_tokens``: tokens per Mooncake block (default 512, the trace's own).
    ``max_output_tokens``: cap on every request's output (and on the replies fed back).
    ``skip_requests``, ``max_requests``: keep N requests by arrival after skipping some (a
    slice of the trace; times then start at the first kept request). A session's earlier
    turns arrive before its later ones: cutting the end never orphans a turn; a turn whose
    predecessor was skipped is sent at its own time, with its reply chunks synthesised.
    """
    if block_tokens is not None and block_tokens < 1:
        raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
    spec = str(spec)
    if spec.startswith("gen:"):
        requests = generate_agent_sessions(AgentSpec.parse(spec[4:]))
    else:
        path = Path(spec)
        if not path.is_file():
            raise TraceError(f"{path}: no such trace file (or use gen:key=value,... to generate one)")
        raw = path.read_bytes()
        try:
            text = (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TraceError(f"{path}: not a UTF-8 text trace (or a .gz of one): {e}") from None
        first = text.lstrip().split("\n", 1)[0]
        if _is_mooncake_line(first):
            requests = _read_mooncake(path, text, block_tokens or MOONCAKE_BLOCK_TOKENS)
        else:
            requests = _read_agentic(path, text)
    if max_output_tokens is not None:
        requests = _cap_output(requests, max_output_tokens)
    if skip_requests < 0:
        raise ValueError(f"skip_requests must be >= 0, got {skip_requests}")
    end = None if max_requests is None else skip_requests + max_requests
    requests = requests[skip_requests:end]
    if skip_requests and requests:
        t0 = requests[0].arrival_s
        requests = [dataclasses.replace(r, arrival_s=r.arrival_s - t0) for r in requests]
    return requests


def _is_mooncake_line(line: str) -> bool:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return False
    return isinstance(obj, dict) and "hash_ids" in obj


def _cap_output(requests: list[Request], cap: int) -> list[Request]:
    if cap < 1:
        raise ValueError(f"max_output_tokens must be >= 1, got {cap}")
    out = []
    for r in requests:
        chunks = tuple(
            dataclasses.replace(c, n_tokens=min(c.n_tokens, cap)) if c.reply_of is not None else c for c in r.chunks
        )
        out.append(dataclasses.replace(r, chunks=chunks, output_tokens=min(r.output_tokens, cap)))
    return out


# ----------------------------------------------------------------------------- Mooncake


def _read_mooncake(path: Path, text: str, block_tokens: int) -> list[Request]:
    requests = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TraceError(f"{where}: not valid JSON ({e.msg}); expected one Mooncake record per line") from None
        if not isinstance(obj, dict):
            raise TraceError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        ts = obj.get("timestamp")
        n_in = obj.get("input_length")
        n_out = obj.get("output_length")
        ids = obj.get("hash_ids")
        if not _is_number(ts) or ts < 0:
            raise TraceError(f"{where}: 'timestamp' must be a number of milliseconds >= 0, got {ts!r}")
        if not _is_int(n_in) or n_in < 1:
            raise TraceError(f"{where}: 'input_length' must be an integer >= 1, got {n_in!r}")
        if not _is_int(n_out) or n_out < 0:
            raise TraceError(f"{where}: 'output_length' must be an integer >= 0, got {n_out!r}")
        if not isinstance(ids, list) or not all(_is_int(h) and 0 <= h < 2**63 for h in ids):
            raise TraceError(f"{where}: 'hash_ids' must be a list of integers in [0, 2^63)")
        n_blocks = -(-n_in // MOONCAKE_BLOCK_TOKENS)
        if len(ids) != n_blocks:
            raise TraceError(
                f"{where}: {len(ids)} hash_ids for input_length {n_in}; "
                f"{MOONCAKE_BLOCK_TOKENS}-token blocks need {n_blocks}"
            )
        last = n_in - MOONCAKE_BLOCK_TOKENS * (n_blocks - 1)  # tokens in the last block
        sizes = [block_tokens] * (n_blocks - 1) + [-(-last * block_tokens // MOONCAKE_BLOCK_TOKENS)]
        out = n_out if block_tokens == MOONCAKE_BLOCK_TOKENS else -(-n_out * block_tokens // MOONCAKE_BLOCK_TOKENS)
        requests.append(
            Request(
                index=len(requests),
                arrival_s=ts / 1000.0,
                chunks=tuple(Chunk(h, n) for h, n in zip(ids, sizes)),
                output_tokens=max(1, out),
            )
        )
    if not requests:
        raise TraceError(f"{path}: no requests")
    requests.sort(key=lambda r: (r.arrival_s, r.index))  # stable; Mooncake files are sorted
    return [dataclasses.replace(r, index=i) for i, r in enumerate(requests)]


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# ----------------------------------------------------------------------------- agentic trace


def _read_agentic(path: Path, text: str) -> list[Request]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise TraceError(
            f"{path}:{e.lineno}: not valid JSON ({e.msg}); expected Mooncake JSONL "
            '(lines with "hash_ids") or agentic-trace JSON ({"conversations": [...]})'
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("conversations"), list) or not data["conversations"]:
        raise TraceError(
            f"{path}:1: neither Mooncake JSONL (lines with \"hash_ids\") nor agentic-trace JSON "
            '(an object with a non-empty "conversations" list)'
        )
    convs = data["conversations"]

    def fail(i: int, j: int | None, msg: str) -> TraceError:
        line = _agentic_lines(text).get((i, j), 1)
        at = f"conversations[{i}]" + (f"[{j}]" if j is not None else "")
        return TraceError(f"{path}:{line}: {at}: {msg}")

    # rendered[i][j]: the new messages of turn j as text chunks' texts
    rendered: list[list[list[str]]] = []
    for i, conv in enumerate(convs):
        if not isinstance(conv, list) or not conv:
            raise fail(i, None, "a conversation must be a non-empty list of turns")
        turns = []
        for j, turn in enumerate(conv):
            if not isinstance(turn, dict) or not isinstance(turn.get("messages"), list):
                raise fail(i, j, 'a turn must be an object with a "messages" list')
            pt = turn.get("prompt_tokens", 0)
            if not _is_int(pt) or pt < 0:
                raise fail(i, j, f"'prompt_tokens' must be an integer >= 0, got {pt!r}")
            msgs = []
            for m in turn["messages"]:
                if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                    raise fail(i, j, 'each message must be an object with a "role" string')
                msgs.append(_render_message(m))
            turns.append(msgs)
        rendered.append(turns)

    # One characters-per-token figure for the whole trace, from the first turns (whose
    # prompt_tokens count only their own messages), so a text's estimated length depends on
    # the text alone and equal texts stay equal chunks.
    chars = sum(len(t) for turns in rendered for t in turns[0])
    tokens = sum(conv[0].get("prompt_tokens", 0) for conv in convs)
    chars_per_token = chars / tokens if chars and tokens else DEFAULT_CHARS_PER_TOKEN

    def text_chunk(t: str) -> Chunk:
        return Chunk(key_of("text", t), max(1, round(len(t) / chars_per_token)), text=t)

    # Nominal time: turn j of every conversation at j seconds, so sorting interleaves the
    # conversations round by round as a concurrent replay does.
    drafts = []  # (arrival, conv, turn, chunks)
    for i, turns in enumerate(rendered):
        history: list[Chunk] = []
        for j, msgs in enumerate(turns):
            if j:
                history.append(Chunk(key_of("reply", i, j - 1), AGENTIC_OUTPUT_TOKENS, reply_of=-1))
            history.extend(text_chunk(t) for t in msgs)
            drafts.append((float(j), i, j, tuple(history)))
    return _index_sessions(drafts, {d[1:3]: AGENTIC_OUTPUT_TOKENS for d in drafts}, {})


def _render_message(m: dict) -> str:
    """A message as the text sent for it: ``role: content`` and any tool calls, one line
    per message. No chat template: the replay measures caching, and the same text always
    gives the same tokens."""
    content = m.get("content")
    if isinstance(content, str):
        body = content
    elif isinstance(content, list):
        body = "".join(p["text"] if isinstance(p, dict) and isinstance(p.get("text"), str) else json.dumps(p) for p in content)
    else:
        body = "" if content is None else json.dumps(content)
    if m.get("tool_calls") is not None:
        body += json.dumps(m["tool_calls"])
    return f"{m['role']}: {body}\n"


def _agentic_lines(text: str) -> dict[tuple[int, int | None], int]:
    """Line numbers of each conversation and turn of an agentic trace (for error messages):
    walks the "conversations" array with the JSON decoder's raw_decode."""
    found = re.search(r'"conversations"\s*:\s*\[', text)
    if found is None:
        return {}
    decoder = json.JSONDecoder()
    lines: dict[tuple[int, int | None], int] = {}

    def elements(pos: int):
        """Yield (start, end) of each element of the array whose '[' is just before pos."""
        while True:
            pos = _skip_space(text, pos)
            if pos >= len(text) or text[pos] == "]":
                return
            _, end = decoder.raw_decode(text, pos)
            yield pos, end
            pos = _skip_space(text, end)
            if pos < len(text) and text[pos] == ",":
                pos += 1

    for i, (start, _) in enumerate(elements(found.end())):
        lines[(i, None)] = text.count("\n", 0, start) + 1
        if text[start] == "[":
            for j, (tstart, _) in enumerate(elements(start + 1)):
                lines[(i, j)] = text.count("\n", 0, tstart) + 1
    return lines


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _index_sessions(drafts, outputs: dict, gaps: dict) -> list[Request]:
    """Sort session turns (arrival, session, turn, chunks) by arrival and number them; link
    each turn to the previous one of its session (``after``) and each reply chunk
    (``reply_of=-1`` in drafts) to the request it is the output of."""
    drafts = sorted(drafts, key=lambda d: (d[0], d[1], d[2]))
    index = {(s, t): k for k, (_, s, t, _) in enumerate(drafts)}
    requests = []
    for k, (arrival, s, t, chunks) in enumerate(drafts):
        linked = []
        turn = 0
        for c in chunks:
            if c.reply_of is not None:
                linked.append(dataclasses.replace(c, reply_of=index[(s, turn)]))
                turn += 1
            else:
                linked.append(c)
        requests.append(
            Request(
                index=k,
                arrival_s=arrival,
                chunks=tuple(linked),
                output_tokens=outputs[(s, t)],
                session=s,
                after=index[(s, t - 1)] if t else None,
                gap_s=gaps.get((s, t), 0.0),
            )
        )
    return requests


# ----------------------------------------------------------------------------- generator


@dataclass(frozen=True)
class AgentSpec:
    """Multi-turn agent sessions: ``gen:sessions=8,turns=6,seed=0,...``.

    Every session opens with the shared system prompt and one of ``toolsets`` tool
    definition blocks, then a user message; each later turn appends the previous reply and
    a tool output (or, one time in five, a new user message). Token counts are means of
    lognormal draws (sigma ``LENGTH_SIGMA``); gaps are exponential. Defaults are sized for a
    big model serving coding agents; for a CPU model pass smaller counts.
    """

    sessions: int = 8
    turns: int = 6  # mean turns per session (drawn uniformly from [turns/2, 3 turns/2])
    system: int = 2048  # tokens of the system prompt shared by every session
    tools: int = 4096  # tokens of a tool-definition block (agent frameworks ship thousands)
    toolsets: int = 2  # distinct tool-definition blocks; a session uses one
    user: int = 256  # mean tokens of a user message
    tool_output: int = 1024  # mean tokens of a tool result (file views, command output)
    reply: int = 220  # mean tokens of an assistant reply (as AGENTIC_OUTPUT_TOKENS)
    think: float = 2.0  # mean seconds between a reply and the next request (tool runs)
    interval: float = 5.0  # mean seconds between session starts
    seed: int = 0

    @classmethod
    def parse(cls, text: str) -> AgentSpec:
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        values: dict[str, object] = {}
        for item in filter(None, text.split(",")):
            name, sep, value = item.partition("=")
            name = name.strip()
            if not sep or name not in fields:
                raise TraceError(f"gen:{text}: bad item {item!r}; expected key=value with key in {sorted(fields)}")
            try:
                values[name] = float(value) if fields[name] == "float" else int(value)
            except ValueError:
                raise TraceError(f"gen:{text}: {name} must be a {fields[name]}, got {value!r}") from None
        spec = cls(**values)
        if spec.sessions < 1 or spec.turns < 1 or spec.toolsets < 1:
            raise TraceError(f"gen:{text}: sessions, turns and toolsets must be >= 1")
        if min(spec.system, spec.tools, spec.user, spec.tool_output, spec.reply) < 1:
            raise TraceError(f"gen:{text}: token counts must be >= 1")
        if spec.think < 0 or spec.interval < 0:
            raise TraceError(f"gen:{text}: think and interval must be >= 0")
        return spec


# Spread of the lognormal length draws: right-skewed like real message lengths; the means
# matter for caching, the exact shape little.
LENGTH_SIGMA = 0.6
# Share of later turns that bring a new user message instead of a tool output.
USER_TURN_SHARE = 0.2


def generate_agent_sessions(spec: AgentSpec) -> list[Request]:
    """Requests of ``spec.sessions`` agent sessions (Python's random.Random(seed), whose
    sequence is fixed across Python versions)."""
    rng = random.Random(spec.seed)

    def length(mean: int) -> int:
        return max(1, round(rng.lognormvariate(math.log(mean) - LENGTH_SIGMA**2 / 2, LENGTH_SIGMA)))

    def gap(mean: float) -> float:
        return rng.expovariate(1.0 / mean) if mean > 0 else 0.0

    drafts, outputs, gaps = [], {}, {}
    start = 0.0
    for s in range(spec.sessions):
        start += gap(spec.interval) if s else 0.0
        n_turns = rng.randint(max(1, spec.turns // 2), max(1, (3 * spec.turns) // 2))
        history = [
            Chunk(key_of("system"), spec.system),
            Chunk(key_of("tools", rng.randrange(spec.toolsets)), spec.tools),
            Chunk(key_of("user", s, 0), length(spec.user)),
        ]
        t_arrival = start
        for t in range(n_turns):
            if t:
                history.append(Chunk(key_of("reply", s, t - 1), outputs[(s, t - 1)], reply_of=-1))
                kind = "user" if rng.random() < USER_TURN_SHARE else "tool"
                history.append(Chunk(key_of(kind, s, t), length(spec.user if kind == "user" else spec.tool_output)))
                gaps[(s, t)] = gap(spec.think)
                t_arrival += gaps[(s, t)]  # nominal: replies take no time
            outputs[(s, t)] = length(spec.reply)
            drafts.append((t_arrival, s, t, tuple(history)))
    return _index_sessions(drafts, outputs, gaps)
