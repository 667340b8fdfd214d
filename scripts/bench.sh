#!/usr/bin/env bash
# `make bench`: builds Relay and relay-bench in release, starts private NATS / Redis / Postgres, and runs
# every mode side by side with the bare proxy floor; the markdown table goes to stdout and bench.md.
# BENCH_ARGS="--quick" for a short run.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
export REQUIRE_SERVICES="${REQUIRE_SERVICES:-1}"
# shellcheck source=install-tools.sh
source "$ROOT/scripts/install-tools.sh"
# shellcheck source=../.ci/test-services.sh
source "$ROOT/.ci/test-services.sh"
SVC_FORCE_PRIVATE=1 svc_up
cargo build --release -p relay -p relay-bench
# shellcheck disable=SC2086
./target/release/relay-bench run --out bench.md ${BENCH_ARGS:-}
