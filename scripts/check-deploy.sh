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
# Dashboards and alert rules: PromQL parses, names only catalogued metrics.
"$PY" scripts/check-observability.py

# Three installs: minimal, production HA, embedded single pod (ci/*-values.yaml).
SETS=(-f deploy/helm/relay/ci/minimal-values.yaml)
"$PY" .ci/helm_offline.py lint deploy/helm/relay --strict "${SETS[@]}"
"$PY" .ci/helm_offline.py template deploy/helm/relay "${SETS[@]}" --name relay --namespace relay > "$OUT/rendered.yaml"
"$PY" .ci/helm_offline.py lint deploy/helm/relay --strict -f deploy/helm/relay/ci/production-values.yaml
"$PY" .ci/helm_offline.py template deploy/helm/relay -f deploy/helm/relay/ci/production-values.yaml \
  --name relay --namespace relay > "$OUT/production.yaml"
# Embedded single pod (one Deployment running all five services on SQLite), with the monitoring objects.
"$PY" .ci/helm_offline.py lint deploy/helm/relay --strict -f deploy/helm/relay/ci/embedded-values.yaml
"$PY" .ci/helm_offline.py template deploy/helm/relay -f deploy/helm/relay/ci/embedded-values.yaml \
  --name relay --namespace relay > "$OUT/embedded.yaml"
# The two newest Kubernetes minors kubernetes-validate knows (CRD kinds, ServiceMonitor and
# PrometheusRule, have no built-in schema: they are checked below against the files they carry).
for k in 1.36.0 1.37.0; do
  for f in rendered production embedded; do
    kubernetes-validate -k "$k" --strict "$OUT/$f.yaml" >/dev/null
  done
done
"$PY" - "$OUT/embedded.yaml" "$OUT/embedded.toml" <<'PYEOF'
import json, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
for kind in ["Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy"]:
    assert (kind, "relay-relay-all") in kinds, f"embedded: {kind} missing: {kinds}"
assert sum(k == "Deployment" for k, _ in kinds) == 1, kinds
assert not any(k in ("Job", "HorizontalPodAutoscaler") for k, _ in kinds), kinds
assert not any("helm.sh/hook" in (d["metadata"].get("annotations") or {}) for d in docs), "embedded needs no hooks"
dep = next(d for d in docs if d["kind"] == "Deployment")
assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate", dep["spec"]
c = dep["spec"]["template"]["spec"]["containers"][0]
assert c["args"] == ["serve", "--config", "/etc/relay/relay.toml"], c["args"]
assert {"name": "data", "mountPath": "/var/lib/relay"} in c["volumeMounts"], c["volumeMounts"]
rule = next(d for d in docs if d["kind"] == "PrometheusRule")
assert rule["spec"] == yaml.safe_load(open("deploy/prometheus/relay-alerts.yaml")), "PrometheusRule differs from the rules file"
mon = next(d for d in docs if d["kind"] == "ServiceMonitor")
assert mon["spec"]["endpoints"][0]["port"] == "admin", mon
dash = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard"))
assert json.loads(dash["data"]["relay-overview.json"]) == json.load(open("deploy/grafana/relay-overview.json"))
toml = next(d for d in docs if d["kind"] == "ConfigMap" and "relay.toml" in d["data"])["data"]["relay.toml"]
assert "sqlite://" in toml and "nats_url" not in toml and "[remote]" not in toml, toml
open(sys.argv[2], "w").write(toml)
PYEOF
# A bad value must fail the schema.
if "$PY" .ci/helm_offline.py template deploy/helm/relay "${SETS[@]}" --set services.edge.replicas=-1 >/dev/null 2>&1; then
  echo "check-deploy: the chart accepted services.edge.replicas=-1" >&2; exit 1
fi
for rendered in "$OUT/rendered.yaml" "$OUT/production.yaml"; do
"$PY" - "$rendered" "$OUT/relay.toml" <<'PYEOF'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
assert sum(k == "Deployment" for k, _ in kinds) == 5, kinds
# Each service: its Deployment, Service, PDB and NetworkPolicy; hardened pods that drain in order.
for svc in ["edge", "auth", "routing", "adapter", "billing"]:
    name = f"relay-relay-{svc}"
    for kind in ["Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy"]:
        assert (kind, name) in kinds, f"{kind} {name} missing"
    dep = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == name)
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] and c["securityContext"]["readOnlyRootFilesystem"], name
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], name
    assert c["resources"].get("requests"), f"{name} has no resource requests"
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"]:
        assert probe in c, f"{name} has no {probe}"
    grace = int(next(e["value"] for e in c["env"] if e["name"] == "RELAY__SERVER__SHUTDOWN_GRACE_SECS"))
    assert pod["terminationGracePeriodSeconds"] > grace + c["lifecycle"]["preStop"]["sleep"]["seconds"], name
    pol = next(d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == name)
    first = pol["spec"]["ingress"][0]
    if svc == "edge":
        assert "from" not in first and first["ports"] == [{"port": "http"}], "only the edge's HTTP port is open"
    else:
        assert first["from"] and first["ports"] == [{"port": "grpc"}], f"{name}: gRPC only from Relay pods"
assert {n for k, n in kinds if k == "HorizontalPodAutoscaler"} == {"relay-relay-edge", "relay-relay-adapter"}, kinds
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
        # Names not rendered at all are the operator's (existingSecret), created before the install.
        rendered = {x["metadata"]["name"] for x in docs}
        missing = [r for r in refs(d.get("spec", {})) if r in rendered and r not in hooks]
        assert not missing, f"hook {d['kind']}/{d['metadata']['name']} needs non-hook resources {missing}: a first install would hang"
assert any(d["kind"] == "Job" for d in docs if d["metadata"]["name"] in hooks), "no migration hook"
PYEOF
done
"$PY" - "$OUT/rendered.yaml" "$OUT/relay.toml" <<'PYEOF'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
open(sys.argv[2], "w").write(next(d for d in docs if d["kind"] == "ConfigMap")["data"]["relay.toml"])
PYEOF
cargo build -q --bin relay
for s in edge auth routing adapter billing; do
  RELAY__AUTH__PEPPER=chart-check-pepper-0123 RELAY__DATABASE__URL=postgres://relay@db:5432/relay \
    RELAY__SERVER__SERVICE_TOKEN=chart-check-service-token \
    ./target/debug/relay check --config "$OUT/relay.toml" --services "$s" >/dev/null
done
RELAY__AUTH__PEPPER=chart-check-pepper-0123 ./target/debug/relay check --config "$OUT/embedded.toml" >/dev/null
echo "check-deploy: compose, helm chart and rendered config are valid"
