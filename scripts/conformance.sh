#!/usr/bin/env bash
# Runs the shared conformance suite against a freshly started embedded Relay whose routes point at the
# suite's mock provider. SUITE=<dir> picks another copy of the suite; extra args go to pytest.
set -euo pipefail
source "$(dirname "$0")/relay-for-mock.sh"
SUITE="${SUITE:-$ROOT/../shared/conformance}"
[ -x "$SUITE/run.sh" ] || { echo "conformance suite not found at $SUITE (set SUITE=...)" >&2; exit 2; }
relay_start

export RELAY_BASE_URL="$RELAY_URL/v1" RELAY_API_KEY="$RELAY_KEY"
export RELAY_MODEL_OPENAI=relay-openai RELAY_MODEL_ANTHROPIC=relay-anthropic RELAY_MODEL_GEMINI=relay-gemini
export RELAY_MODEL_EMBEDDING=relay-embed RELAY_MODEL_FAILOVER=relay-failover
export MOCK_PORT RELAY_UPSTREAM_KEY=mock-upstream-key
set +e
"$SUITE/run.sh" "$@"
rc=$?
set -e
[ $rc -eq 0 ] || { echo "--- relay log (tail) ---"; tail -50 "$RELAY_LOG"; }
exit $rc
