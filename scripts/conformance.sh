#!/usr/bin/env bash
# Runs the shared conformance suite against a freshly started embedded Relay whose routes point at the
# suite's mock provider. SUITE=<dir> picks another copy of the suite; extra args go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SUITE="${SUITE:-$ROOT/../shared/conformance}"
MOCK_PORT="${MOCK_PORT:-9100}"
RELAY_PORT="${RELAY_PORT:-4100}"
[ -x "$SUITE/run.sh" ] || { echo "conformance suite not found at $SUITE (set SUITE=...)" >&2; exit 2; }

cd "$ROOT"
PROFILE="${PROFILE:-debug}"
if [ "$PROFILE" = release ]; then cargo build --release --bin relay; else cargo build --bin relay; fi
LOG="$(mktemp /tmp/relay-conformance.XXXXXX.log)"
M="http://127.0.0.1:${MOCK_PORT}"
RELAY__ADAPTER__PROVIDERS="[{name=\"mock-openai\",kind=\"openai\",base_url=\"$M/v1\",api_key=\"mock-upstream-key\"},\
{name=\"mock-anthropic\",kind=\"anthropic\",base_url=\"$M\",api_key=\"mock-upstream-key\"},\
{name=\"mock-gemini\",kind=\"gemini\",base_url=\"$M/v1beta\",api_key=\"mock-upstream-key\"}]" \
RELAY__SERVER__HTTP_LISTEN="127.0.0.1:${RELAY_PORT}" \
  "./target/$PROFILE/relay" serve --config deploy/config/relay.conformance.toml >"$LOG" 2>&1 &
RELAY_PID=$!
trap 'kill $RELAY_PID 2>/dev/null; wait $RELAY_PID 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  curl -sf -o /dev/null "http://127.0.0.1:${RELAY_PORT}/v1/models" -H "Authorization: Bearer sk-relay-conformance" && break
  kill -0 $RELAY_PID 2>/dev/null || { cat "$LOG" >&2; exit 1; }
  sleep 0.1
done

export RELAY_BASE_URL="http://127.0.0.1:${RELAY_PORT}/v1" RELAY_API_KEY="sk-relay-conformance"
export RELAY_MODEL_OPENAI=relay-openai RELAY_MODEL_ANTHROPIC=relay-anthropic RELAY_MODEL_GEMINI=relay-gemini
export RELAY_MODEL_EMBEDDING=relay-embed RELAY_MODEL_FAILOVER=relay-failover
export MOCK_PORT RELAY_UPSTREAM_KEY=mock-upstream-key
set +e
"$SUITE/run.sh" "$@"
rc=$?
set -e
[ $rc -eq 0 ] || { echo "--- relay log (tail) ---"; tail -50 "$LOG"; }
exit $rc
