#!/usr/bin/env bash
# Validates the deployment files without Docker or a cluster: the compose file against the compose spec,
# the Helm chart with `helm lint --strict` and a render checked by kubernetes-validate --strict, and the
# relay.toml the chart renders with `relay check` for every service role.
# Needs check-jsonschema, helm-python-sdk and kubernetes-validate on PATH (scripts/test.sh installs them).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PY="${PY:-python3}"
OUT="$(mktemp -d /tmp/relay-deploy.XXXXXX)"
trap 'rm -rf "$OUT"' EXIT

check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml

SETS=(--set pepper=chart-check-pepper-0123 --set databaseUrl=postgres://relay@db:5432/relay --set adminToken=chart-check-admin-token --set serviceToken=chart-check-service-token)
"$PY" .ci/helm_offline.py lint deploy/helm/relay --strict "${SETS[@]}"
"$PY" .ci/helm_offline.py template deploy/helm/relay "${SETS[@]}" --name relay --namespace relay > "$OUT/rendered.yaml"
kubernetes-validate -k 1.32.0 --strict "$OUT/rendered.yaml" >/dev/null
# A bad value must fail the schema.
if "$PY" .ci/helm_offline.py template deploy/helm/relay "${SETS[@]}" --set services.edge.replicas=-1 >/dev/null 2>&1; then
  echo "check-deploy: the chart accepted services.edge.replicas=-1" >&2; exit 1
fi
"$PY" - "$OUT/rendered.yaml" "$OUT/relay.toml" <<'PYEOF'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
assert sum(k == "Deployment" for k, _ in kinds) == 5, kinds
# Install order: Helm runs pre-install hooks before it creates any regular resource, so a hook may
# reference only other hooks (or secrets the operator created beforehand, none in this render).
hooks = {d["metadata"]["name"] for d in docs if "helm.sh/hook" in (d["metadata"].get("annotations") or {})}
def refs(o):
    if isinstance(o, dict):
        for k, v in o.items():
            if k in ("configMap", "secret", "secretRef", "configMapRef", "secretKeyRef", "configMapKeyRef") and isinstance(v, dict):
                yield v.get("name") or v.get("secretName")
            yield from refs(v)
    elif isinstance(o, list):
        for v in o:
            yield from refs(v)
for d in docs:
    if d["metadata"]["name"] in hooks:
        missing = [r for r in refs(d.get("spec", {})) if r not in hooks]
        assert not missing, f"hook {d['kind']}/{d['metadata']['name']} needs non-hook resources {missing}: a first install would hang"
assert any(d["kind"] == "Job" for d in docs if d["metadata"]["name"] in hooks), "no migration hook"
open(sys.argv[2], "w").write(next(d for d in docs if d["kind"] == "ConfigMap")["data"]["relay.toml"])
PYEOF
cargo build -q --bin relay
for s in edge auth routing adapter billing; do
  RELAY__AUTH__PEPPER=chart-check-pepper-0123 RELAY__DATABASE__URL=postgres://relay@db:5432/relay \
    RELAY__SERVER__SERVICE_TOKEN=chart-check-service-token \
    ./target/debug/relay check --config "$OUT/relay.toml" --services "$s" >/dev/null
done
echo "check-deploy: compose, helm chart and rendered config are valid"
