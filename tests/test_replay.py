"""``speckv replay``: the report arithmetic offline, then a short replay of the real Mooncake
trace against a real CPU SGLang server with speckv as its L3 tier."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from sglang_speckv.cli import main
from sglang_speckv.replay.client import Result, Run
from sglang_speckv.replay.report import summarize, write_replay_report
from sglang_speckv.replay.synth import page_keys
from sglang_speckv.replay.traces import load_trace
from sglang_speckv.sglang.serve import CPU_PAGE_SIZE

MOONCAKE = Path(__file__).parents[1] / "examples" / "traces" / "mooncake_conversation_trace.jsonl.gz"


def _run(label: str, results: list[Result], samples: list[dict] | None = None) -> Run:
    return Run(label, "http://127.0.0.1:1", results, samples or [], seconds=10.0, stopped=None)


def _result(i: int, ttft: float, prompt: int, cached: dict, error: str | None = None) -> Result:
    return Result(i, None, release_s=float(i), start_s=i + 0.5, ttft_s=ttft, e2e_s=ttft + 1, prompt_tokens=prompt,
                  output_tokens=4, cached=cached, error=error)


def test_summary_and_report(tmp_path):
    results = [
        _result(0, 1.0, 100, {"device": 0, "host": 0, "storage": 0}),
        _result(1, 2.0, 100, {"device": 20, "host": 10, "storage": 50}),
        _result(2, 3.0, 200, {"device": 0, "host": 0, "storage": 100}),
        _result(3, 9.0, 999, {"device": 999}, error="HTTP 500: boom"),  # failed: counted apart
    ]
    samples = [{"t": 1.0, "tiers": {"ram": {"raw_bytes": 0, "coded_bytes": 0, "pages": 0}}},
               {"t": 9.0, "tiers": {"ram": {"raw_bytes": 3000, "coded_bytes": 1000, "pages": 3}}}]
    s = summarize(_run("speckv", results, samples))
    assert (s["requests"], s["ok"], s["errors"]) == (4, 3, 1)
    assert s["error_examples"] == ["HTTP 500: boom"]
    assert s["prompt_tokens"] == 400
    assert s["hit_rate"] == pytest.approx({"device": 0.05, "host": 0.025, "storage": 0.375, "total": 0.45})
    assert s["ttft_ms"]["p50"] == pytest.approx(2000) and s["ttft_ms"]["mean"] == pytest.approx(2000)
    assert s["queue_ms"]["p50"] == pytest.approx(500)
    assert s["store_ratio"] == {"ram": 3.0, "total": 3.0}

    other = _run("file", results[:2])
    paths = write_replay_report(tmp_path, {"trace": "t.jsonl", "requests": 4, "speedup": 1.0, "concurrency": 2,
                                           "seed": 0}, [_run("speckv", results, samples), other])
    assert all(p.stat().st_size > 0 for p in paths)
    assert {p.name for p in paths} >= {"replay.json", "REPLAY.md", "ttft_cdf.png", "hit_rate.png", "stored_bytes.png"}
    md = (tmp_path / "REPLAY.md").read_text()
    assert "| hit rate storage | 37.5% | 25.0% |" in md
    assert "| ratio raw / stored | 3.00x | - |" in md
    assert "`HTTP 500: boom`" in md
    data = json.loads((tmp_path / "replay.json").read_text())
    assert "output_ids" not in data["runs"][0]["requests"][0]


def test_bad_arguments(capsys):
    assert main(["replay", "--trace", "gen:sessions=1", "--url", "http://127.0.0.1:1", "--report", "/tmp/x",
                 "--labels", "a,b"]) == 2
    assert "--labels names 2 servers" in capsys.readouterr().err
    assert main(["replay", "--trace", "nope.jsonl", "--url", "http://127.0.0.1:1", "--report", "/tmp/x"]) == 2
    assert "no such trace file" in capsys.readouterr().err


def test_no_server(tmp_path, capsys):
    # Port 1 on loopback: nothing listens; the replay says so and writes nothing.
    assert main(["replay", "--trace", "gen:sessions=1", "--url", "http://127.0.0.1:1", "--report", str(tmp_path / "r"),
                 "--request-timeout", "5"]) == 1
    assert "no server at http://127.0.0.1:1" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------- real server


@pytest.fixture(scope="module")
def speckv_server(sglang_server, tmp_path_factory):
    """A real CPU SGLang server with speckv (one ram tier in a temporary directory) and its
    stats file; ``speckv serve``'s defaults otherwise."""
    root = tmp_path_factory.mktemp("speckv")
    stats = root / "stats.json"
    config = root / "speckv.toml"
    config.write_text(
        f'stats_file = "{stats}"\n'
        f'[[tiers]]\nname = "ram"\npath = "{root / "ram"}"\ncapacity = "256MiB"\nsync = "none"\n'
    )
    server = sglang_server(["--hicache-storage", "speckv", "--speckv-config", str(config)], name="replay")
    yield server, stats
    server.stop()  # now, not at the end of the session: one server of ~3 GB at a time


def _stored_pages(stats: Path) -> int:
    if not stats.exists():
        return 0
    return sum(t["pages"] for t in json.loads(stats.read_text())["store"]["tiers"])


def _wait_for_pages(stats: Path, pages: int, timeout_s: float) -> None:
    """Until speckv's stats file counts ``pages`` stored pages (the server backs pages up to
    L3 after answering; the CPU coder takes seconds per batch)."""
    deadline = time.monotonic() + timeout_s
    stored = 0
    while time.monotonic() < deadline:
        stored = _stored_pages(stats)
        if stored >= pages:
            return
        time.sleep(1.0)
    pytest.fail(f"speckv stored {stored} of {pages} pages within {timeout_s:.0f} s")


@pytest.mark.server
def test_replay_against_a_real_server(speckv_server, tmp_path):
    """The first Mooncake requests (blocks shrunk to 32 tokens) against a real server: a cold
    run; then, once speckv holds every full prompt page, the same trace again after
    /flush_cache emptied the device and host caches, so shared prefixes can only come back
    from speckv's store."""
    server, stats = speckv_server
    args = ["replay", "--trace", str(MOONCAKE), "--url", server.url, "--block-tokens", "32", "--max-requests", "6",
            "--max-output-tokens", "4", "--speedup", "1000", "--concurrency", "2", "--store", str(stats),
            "--settle", "5", "--no-progress"]
    trace = load_trace(MOONCAKE, block_tokens=32, max_output_tokens=4, max_requests=6)
    pages = len({k for r in trace for k in page_keys([(c.key, c.n_tokens) for c in r.chunks], CPU_PAGE_SIZE)})

    assert main([*args, "--labels", "cold", "--report", str(tmp_path / "cold")]) == 0, server.log_tail()
    _wait_for_pages(stats, pages, timeout_s=300)
    assert main([*args, "--labels", "after-flush", "--report", str(tmp_path / "warm")]) == 0, server.log_tail()

    runs = [json.loads((tmp_path / name / "replay.json").read_text())["runs"][0] for name in ("cold", "warm")]
    cold, warm = (run["summary"] for run in runs)
    assert cold["errors"] == 0 and warm["errors"] == 0, (cold["error_examples"], warm["error_examples"])
    assert cold["ok"] == warm["ok"] == 6
    assert cold["cached_tokens"]["storage"] == 0
    # every prompt's full pages are in L3; the device keeps what the run itself computed or
    # loaded (Mooncake block 0 is in every prompt), the rest can only come from storage
    full = sum(r.prompt_tokens // CPU_PAGE_SIZE * CPU_PAGE_SIZE for r in trace)
    assert sum(warm["cached_tokens"].values()) <= full
    assert warm["cached_tokens"]["storage"] > 0
    for run in runs:
        assert [r["output_tokens"] for r in run["requests"]] == [t.output_tokens for t in trace]
        assert [r["prompt_tokens"] for r in run["requests"]] == [t.prompt_tokens for t in trace]
        assert all(r["ttft_s"] > 0 for r in run["requests"])
    # speckv's stats file gave the stored bytes: raw vs as stored
    assert warm["stored"]["ram"]["pages"] >= pages
    assert warm["stored_raw_bytes"] > warm["stored_coded_bytes"] > 0
    for name in ("REPLAY.md", "ttft_cdf.png", "hit_rate.png", "stored_bytes.png"):
        assert (tmp_path / "warm" / name).stat().st_size > 0
    assert "| hit rate storage |" in (tmp_path / "warm" / "REPLAY.md").read_text()
    # All of it should come back: only the pages of block 0, on the device, are not read from L3.
    backend = json.loads(stats.read_text())
    assert not backend.get("verify_failures"), f"pages failed verification; see {server.log_path}"
    assert warm["cached_tokens"]["storage"] > full // 2


def _multiturn_trace(path: Path, sessions: int, turns: int, system_blocks: int, first_blocks: int) -> Path:
    """Mooncake JSONL of multi-turn sessions: every first turn is ``system_blocks`` blocks
    that all sessions share plus its own blocks (``first_blocks`` in all), and each later
    turn repeats the previous prompt and adds one block. Hash ids from 10^9 on: no block
    of the bundled trace."""
    lines = []
    for s in range(sessions):
        ids = list(range(10**9, 10**9 + system_blocks))
        ids += [10**9 + 1000 * (s + 1) + k for k in range(first_blocks - system_blocks)]
        for t in range(turns):
            if t:
                ids = [*ids, 10**9 + 1000 * (s + 1) + 100 * t]
            lines.append({"timestamp": s * 1000 + t * 60_000, "input_length": 512 * len(ids),
                          "output_length": 64, "hash_ids": list(ids)})
    lines.sort(key=lambda r: r["timestamp"])
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.mark.server
def test_multiturn_sessions_restore_from_l3(speckv_server, tmp_path):
    """Issue #9: sessions sharing a system prompt, replayed after /flush_cache. Once the
    first session has put the shared prefix back on the device, the others lack only their
    own pages; SGLang's default prefetch threshold (256 tokens) skipped L3 for them, `speckv
    serve` sets it to the page size. Every turn must find every full page of its prompt in
    some tier, and each session's first turn must take what the device lacks from L3."""
    server, stats = speckv_server
    first_blocks = 2
    trace = _multiturn_trace(tmp_path / "sessions.jsonl", sessions=3, turns=2, system_blocks=1,
                             first_blocks=first_blocks)
    # 32-token blocks, 4 output tokens: every prompt is whole pages, so the pages a turn
    # stores are exactly its prompt's pages (page_keys). One request at a time, in trace
    # order (speedup): the first session restores the shared prefix, the others find it.
    args = ["replay", "--trace", str(trace), "--url", server.url, "--block-tokens", "32", "--max-output-tokens", "4",
            "--speedup", "1000", "--concurrency", "1", "--seed", "9", "--no-progress"]
    requests_ = load_trace(trace, block_tokens=32, max_output_tokens=4)
    pages = len({k for r in requests_ for k in page_keys([(c.key, c.n_tokens) for c in r.chunks], CPU_PAGE_SIZE)})
    before = _stored_pages(stats)

    assert main([*args, "--report", str(tmp_path / "cold")]) == 0, server.log_tail()
    _wait_for_pages(stats, before + pages, timeout_s=300)
    assert main([*args, "--report", str(tmp_path / "warm")]) == 0, server.log_tail()

    warm = json.loads((tmp_path / "warm" / "replay.json").read_text())["runs"][0]["requests"]
    assert [r["error"] for r in warm] == [None] * len(requests_)
    first_turns = 0
    for req, res in zip(requests_, warm):
        full = (req.prompt_tokens - 1) // CPU_PAGE_SIZE * CPU_PAGE_SIZE  # what SGLang can match
        cached = res["cached"]
        where = f"request {req.index} (hash ids from {req.chunks[-1].key}): {cached} of {full} matchable tokens"
        assert cached["device"] + cached["host"] + cached["storage"] == full, where
        if len(req.chunks) == first_blocks:  # a first turn: the device holds at most the shared block
            first_turns += 1
            assert cached["storage"] >= full - 32 > 0, where
    assert first_turns == 3


@pytest.mark.server
def test_replay_time_limit_gives_a_partial_report(speckv_server, tmp_path):
    server, _ = speckv_server
    spec = "gen:sessions=3,turns=4,system=64,tools=64,user=16,tool_output=32,reply=4,think=0"
    rc = main(["replay", "--trace", spec, "--url", server.url, "--time-limit", "3", "--concurrency", "1", "--report", str(tmp_path),
               "--no-progress"])
    assert rc == 0
    summary = json.loads((tmp_path / "replay.json").read_text())["runs"][0]["summary"]
    assert summary["stopped"] == "time limit"
    assert summary["requests"] < len(load_trace(spec))  # the later turns were never sent


@pytest.mark.server
def test_agentic_trace_against_a_real_server(speckv_server, tmp_path):
    """Messages tokenised by the server, and the real reply of turn 1 inside turn 2's prompt."""
    server, _ = speckv_server
    trace = tmp_path / "agentic.json"
    trace.write_text(json.dumps({"conversations": [[
        {"messages": [{"role": "system", "content": "You are a coding agent."},
                      {"role": "user", "content": "Fix the failing test."}]},
        {"messages": [{"role": "tool", "content": "1 failed, 12 passed"}]},
    ]]}))
    rc = main(["replay", "--trace", str(trace), "--url", server.url, "--max-output-tokens", "4",
               "--report", str(tmp_path / "r"), "--no-progress"])
    assert rc == 0
    first, second = json.loads((tmp_path / "r" / "replay.json").read_text())["runs"][0]["requests"]
    assert first["error"] is None and second["error"] is None
    (tokens,) = server.client.tokenize(["tool: 1 failed, 12 passed\n"])
    assert second["prompt_tokens"] == first["prompt_tokens"] + first["output_tokens"] + len(tokens)
    assert second["cached"]["device"] >= first["prompt_tokens"] // CPU_PAGE_SIZE * CPU_PAGE_SIZE
