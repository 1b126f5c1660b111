"""Trace formats (Mooncake JSONL, agentic-trace JSON, the agent-session generator) and the
deterministic, prefix-consistent token synthesis."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_speckv.replay.client import prompt_ids
from sglang_speckv.replay.synth import DEFAULT_VOCAB, chunk_tokens, key_of, page_keys
from sglang_speckv.replay.traces import (
    AGENTIC_OUTPUT_TOKENS,
    MOONCAKE_BLOCK_TOKENS,
    TraceError,
    load_trace,
)

MOONCAKE = Path(__file__).parents[1] / "examples" / "traces" / "mooncake_conversation_trace.jsonl.gz"


# ----------------------------------------------------------------------------- Mooncake


def test_mooncake_real_trace():
    reqs = load_trace(MOONCAKE)
    assert len(reqs) == 12031
    assert sum(len(r.chunks) for r in reqs) == 288_500  # the published block count
    first = reqs[0]
    assert first.arrival_s == 0.0 and first.output_tokens == 500
    assert [c.key for c in first.chunks] == list(range(14))
    assert first.prompt_tokens == 6758  # 13 full blocks + 102 tokens
    assert [c.n_tokens for c in first.chunks] == [512] * 13 + [102]
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(reqs, reqs[1:]))
    assert all(r.after is None and r.session is None for r in reqs)


def test_mooncake_block_tokens_scales_blocks_and_outputs():
    reqs = load_trace(MOONCAKE, block_tokens=16, max_requests=5)
    assert len(reqs) == 5
    first = reqs[0]
    assert [c.n_tokens for c in first.chunks] == [16] * 13 + [4]  # ceil(102 * 16 / 512)
    assert first.output_tokens == 16  # ceil(500 * 16 / 512)
    assert [c.key for c in first.chunks] == list(range(14))  # sharing structure kept


def test_mooncake_caps_and_slices():
    reqs = load_trace(MOONCAKE, max_output_tokens=7, max_requests=3)
    assert [r.output_tokens for r in reqs] == [7, 7, 7]
    whole = load_trace(MOONCAKE)
    part = load_trace(MOONCAKE, skip_requests=100, max_requests=5)
    assert [r.index for r in part] == list(range(100, 105))
    assert [r.chunks for r in part] == [r.chunks for r in whole[100:105]]
    assert part[0].arrival_s == 0.0
    assert part[4].arrival_s == whole[104].arrival_s - whole[100].arrival_s


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


GOOD = '{"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [1, 2]}'


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"timestamp": -1, "input_length": 600, "output_length": 5, "hash_ids": [1, 2]}', "'timestamp'"),
        ('{"timestamp": 0, "input_length": 0, "output_length": 5, "hash_ids": []}', "'input_length'"),
        ('{"timestamp": 0, "input_length": 600, "output_length": true, "hash_ids": [1, 2]}', "'output_length'"),
        ('{"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [1, "x"]}', "'hash_ids'"),
        ('{"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [1, -2]}', "'hash_ids'"),
        ('{"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [1, 2, 3]}', "need 2"),
        ('{"timestamp": 0, "input_length": 600, "output_length": 5}', "'hash_ids'"),
    ],
)
def test_mooncake_bad_line_names_its_line(tmp_path, bad, message):
    path = _write(tmp_path, "t.jsonl", "\n".join([GOOD, "", bad, GOOD]) + "\n")
    with pytest.raises(TraceError) as e:
        load_trace(path)
    assert f"{path}:3:" in str(e.value) and message in str(e.value)


def test_unknown_or_missing_file(tmp_path):
    with pytest.raises(TraceError, match="no such trace file"):
        load_trace(tmp_path / "nope.jsonl")
    with pytest.raises(TraceError, match="neither Mooncake"):
        load_trace(_write(tmp_path, "x.json", '{"rows": []}'))
    with pytest.raises(TraceError, match="not a UTF-8"):
        load_trace(_write(tmp_path, "x.jsonl.gz", "plain text, not gzip"))


# ----------------------------------------------------------------------------- agentic


AGENTIC = {
    "metadata": {"source": "test"},
    "conversations": [
        [
            {"messages": [{"role": "system", "content": "You are a coding agent."},
                          {"role": "user", "content": "Fix the failing test."}], "prompt_tokens": 12},
            {"messages": [{"role": "tool", "content": [{"type": "text", "text": "1 failed"}]}], "prompt_tokens": 240},
        ],
        [
            {"messages": [{"role": "system", "content": "You are a coding agent."},
                          {"role": "user", "content": "Add a README."}], "prompt_tokens": 11},
        ],
    ],
}


def test_agentic_trace(tmp_path):
    reqs = load_trace(_write(tmp_path, "a.json", json.dumps(AGENTIC, indent=2)))
    # round by round: both first turns, then the second turn of conversation 0
    assert [(r.session, r.after) for r in reqs] == [(0, None), (1, None), (0, 0)]
    first, other, second = reqs
    assert first.chunks[0].text == "system: You are a coding agent.\n"
    assert first.chunks[0].key == other.chunks[0].key  # same system prompt: shared prefix
    assert first.chunks[1].key != other.chunks[1].key
    # turn 2 = turn 1's messages, turn 1's real reply, the tool output
    assert second.chunks[:2] == first.chunks
    assert second.chunks[2].reply_of == first.index and second.chunks[2].n_tokens == AGENTIC_OUTPUT_TOKENS
    assert second.chunks[3].text == "tool: 1 failed\n"
    assert all(r.output_tokens == AGENTIC_OUTPUT_TOKENS for r in reqs)
    # text lengths are estimated from the first turns' prompt_tokens (23 tokens for their text)
    chars = sum(len(c.text) for r in (first, other) for c in r.chunks)
    assert sum(c.n_tokens for r in (first, other) for c in r.chunks) == pytest.approx(23, abs=2)
    assert chars > 23


def test_agentic_caps_replies_too(tmp_path):
    reqs = load_trace(_write(tmp_path, "a.json", json.dumps(AGENTIC)), max_output_tokens=4)
    assert reqs[2].chunks[2].n_tokens == 4 and reqs[2].output_tokens == 4


def test_agentic_bad_turn_names_its_line(tmp_path):
    bad = json.loads(json.dumps(AGENTIC))
    bad["conversations"][1].append({"prompt_tokens": 3})  # no messages
    path = _write(tmp_path, "a.json", json.dumps(bad, indent=2))
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if '"prompt_tokens": 3' in text) - 1
    with pytest.raises(TraceError) as e:
        load_trace(path)
    assert f"{path}:{line}: conversations[1][1]:" in str(e.value) and '"messages"' in str(e.value)


def test_agentic_bad_json_names_its_line(tmp_path):
    path = _write(tmp_path, "a.json", '{"conversations": [\n  [\n    {"messages": [}\n  ]\n]}')
    with pytest.raises(TraceError, match=rf"{path}:3: not valid JSON"):
        load_trace(path)


@pytest.mark.parametrize(
    "conversations, message",
    [
        ([[]], "non-empty list of turns"),
        ([[{"messages": [{"content": "no role"}]}]], '"role" string'),
        ([[{"messages": [], "prompt_tokens": -1}]], "'prompt_tokens'"),
    ],
)
def test_agentic_bad_structure(tmp_path, conversations, message):
    with pytest.raises(TraceError, match=message):
        load_trace(_write(tmp_path, "a.json", json.dumps({"conversations": conversations})))


# ----------------------------------------------------------------------------- generator


SMALL = "gen:sessions=5,turns=4,system=64,tools=32,user=8,tool_output=16,reply=4,think=0.5,interval=1,seed=3"


def test_generator_is_deterministic_and_seeded():
    assert load_trace(SMALL) == load_trace(SMALL)
    assert load_trace(SMALL) != load_trace(SMALL.replace("seed=3", "seed=4"))


def test_generator_sessions_grow_and_share_the_system_prompt():
    reqs = load_trace(SMALL)
    assert {r.session for r in reqs} == set(range(5))
    system = reqs[0].chunks[0]
    for r in reqs:
        assert r.chunks[0] == system and r.chunks[0].n_tokens == 64
        assert r.chunks[1].n_tokens == 32  # one of the tool-definition blocks
        if r.after is None:
            assert len(r.chunks) == 3 and r.gap_s == 0.0
            continue
        prev = reqs[r.after]
        assert prev.session == r.session and prev.index < r.index
        assert r.chunks[: len(prev.chunks)] == prev.chunks  # growing history
        reply, new = r.chunks[len(prev.chunks) :]
        assert reply.reply_of == prev.index and reply.n_tokens == prev.output_tokens
        assert new.reply_of is None and r.gap_s >= 0
        assert r.arrival_s == pytest.approx(prev.arrival_s + r.gap_s)
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(reqs, reqs[1:]))


@pytest.mark.parametrize("spec", ["gen:sessions=0", "gen:bogus=1", "gen:turns=x", "gen:think=-1", "gen:sessions"])
def test_generator_bad_spec(spec):
    with pytest.raises(TraceError, match="gen:"):
        load_trace(spec)


# ----------------------------------------------------------------------------- synthesis


def test_chunk_tokens_golden():
    # Pinned: a change here changes every synthesised trace (and every stored page key).
    assert chunk_tokens(5, 6).tolist() == [7931, 16509, 19329, 5523, 10581, 22800]
    assert chunk_tokens(5, 3, seed=1).tolist() != chunk_tokens(5, 3).tolist()
    assert chunk_tokens(6, 3).tolist() != chunk_tokens(5, 3).tolist()


@settings(max_examples=50, deadline=None)
@given(key=st.integers(0, 2**63 - 1), seed=st.integers(0, 2**64 - 1), n=st.integers(0, 300), more=st.integers(0, 300))
def test_chunk_tokens_prefix_consistent_and_in_range(key, seed, n, more):
    short = chunk_tokens(key, n, seed)
    long = chunk_tokens(key, n + more, seed)
    assert np.array_equal(long[:n], short)
    assert short.dtype == np.int64 and len(short) == n
    assert ((long >= DEFAULT_VOCAB[0]) & (long < DEFAULT_VOCAB[1])).all()


def test_chunk_tokens_vocab_range():
    t = chunk_tokens(1, 1000, vocab=(17, 20))
    assert set(t.tolist()) == {17, 18, 19}
    with pytest.raises(ValueError):
        chunk_tokens(1, 3, vocab=(5, 5))


def test_session_prompts_are_prefix_consistent():
    """The tokens of a turn are a prefix of the tokens of the next turn (replies synthesised,
    as when no server output is known)."""
    reqs = load_trace(SMALL)
    tokens = {r.index: prompt_ids(r, {}, {}, seed=0, vocab=DEFAULT_VOCAB) for r in reqs}
    for r in reqs:
        assert len(tokens[r.index]) == r.prompt_tokens
        if r.after is not None:
            prev = tokens[r.after]
            assert tokens[r.index][: len(prev)] == prev


def test_mooncake_prompts_share_exactly_their_common_blocks():
    a, b = load_trace(MOONCAKE, block_tokens=16, max_requests=2)
    ta, tb = (prompt_ids(r, {}, {}, seed=0, vocab=DEFAULT_VOCAB) for r in (a, b))
    assert a.chunks[0].key == b.chunks[0].key and a.chunks[1].key != b.chunks[1].key
    assert ta[:16] == tb[:16] and ta[16:32] != tb[16:32]


def test_page_keys():
    blocks = [(1, 512), (2, 512), (3, 100)]
    keys = page_keys(blocks, 512)
    assert len(keys) == 2  # the partial tail is no page
    assert page_keys(blocks[:2] + [(4, 600)], 512)[:2] == keys  # same prefix, same keys
    assert page_keys([(9, 512)] + blocks[1:], 512)[1] != keys[1]  # a key covers its prefix
    small = page_keys(blocks, 64)
    assert len(small) == (512 + 512 + 100) // 64
    # a page straddling two chunks depends on both
    assert page_keys([(1, 32), (2, 32)], 64) != page_keys([(1, 32), (3, 32)], 64)
    assert key_of("system") == key_of("system") != key_of("system", 0)
