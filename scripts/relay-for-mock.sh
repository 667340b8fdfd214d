# Sourced by scripts that test Relay against the conformance suite's mock provider: builds Relay and
# starts it (embedded) with routes relay-openai / relay-anthropic / relay-gemini / relay-embed /
# relay-failover pointing at the mock on $MOCK_PORT. Stopped on exit. Sets RELAY_URL, RELAY_LOG.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MOCK_PORT="${MOCK_PORT:-9100}"
RELAY_PORT="${RELAY_PORT:-4100}"
RELAY_KEY="sk-relay-conformance"
PROFILE="${PROFILE:-debug}"

relay_start() {
  (cd "$ROOT" && if [ "$PROFILE" = release ]; then cargo build --release --bin relay; else cargo build --bin relay; fi)
  RELAY_LOG="$(mktemp /tmp/relay-mock.XXXXXX.log)"
  local m="http://127.0.0.1:${MOCK_PORT}"
  RELAY__ADAPTER__PROVIDERS="[{name=\"mock-openai\",kind=\"openai\",base_url=\"$m/v1\",api_key=\"mock-upstream-key\"},\
{name=\"mock-anthropic\",kind=\"anthropic\",base_url=\"$m\",api_key=\"mock-upstream-key\"},\
{name=\"mock-gemini\",kind=\"gemini\",base_url=\"$m/v1beta\",api_key=\"mock-upstream-key\"}]" \
  RELAY__SERVER__HTTP_LISTEN="127.0.0.1:${RELAY_PORT}" RELAY__BUS__OUTBOX_DIR="$(mktemp -d /tmp/relay-outbox.XXXXXX)" \
    "$ROOT/target/$PROFILE/relay" serve --config "$ROOT/deploy/config/relay.conformance.toml" >"$RELAY_LOG" 2>&1 &
  RELAY_PID=$!
  trap 'kill $RELAY_PID 2>/dev/null; wait $RELAY_PID 2>/dev/null || true; relay_on_exit' EXIT
  RELAY_URL="http://127.0.0.1:${RELAY_PORT}"
  for _ in $(seq 1 100); do
    curl -sf -o /dev/null "$RELAY_URL/v1/models" -H "Authorization: Bearer $RELAY_KEY" && return 0
    kill -0 $RELAY_PID 2>/dev/null || { cat "$RELAY_LOG" >&2; return 1; }
    sleep 0.1
  done
  echo "relay did not answer on $RELAY_URL" >&2
  return 1
}

# Scripts may redefine this for their own cleanup.
relay_on_exit() { :; }
