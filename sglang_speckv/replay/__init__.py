"""Trace replay against a running server, and the offline tier simulator.

- ``traces``: the three trace formats (Mooncake JSONL, SGLang agentic-trace JSON, a built-in
  agent-session generator) read into one form, a list of ``Request`` of ``Chunk``.
- ``synth``: deterministic token content per chunk, and the page keys the simulator uses.
- ``client``: ``speckv replay``, which sends a trace to a server and measures each request.
- ``simulate``: ``speckv simulate``, the tier model (capacities, LRU, demotion) and sweeps.
- ``report``: summaries, Markdown and PNG plots for both.
"""
