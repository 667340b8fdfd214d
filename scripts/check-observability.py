#!/usr/bin/env python3
"""Validates the Grafana dashboard and the Prometheus alert rules without a Prometheus or a Grafana:
every PromQL expression parses (promql-parser, the Rust PromQL parser's Python binding), every metric it
selects is in Relay's metric catalogue (crates/relay-telemetry/src/catalogue.rs) or is a recording rule of
the rules file, every alert has a severity and a summary, and every dashboard panel has a query. That the
catalogued metrics really appear in /metrics is the e2e test `observability`."""
import json
import pathlib
import re
import sys

import promql_parser
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
catalogue = set(re.findall(r'(?:counter|gauge|histogram)\(\s*"(relay_[a-z0-9_]+)"',
                           (ROOT / "crates/relay-telemetry/src/catalogue.rs").read_text()))
assert len(catalogue) > 40, catalogue
histograms = set(re.findall(r'histogram\(\s*"(relay_[a-z0-9_]+)"',
                            (ROOT / "crates/relay-telemetry/src/catalogue.rs").read_text()))

# Grafana's variables, as Grafana substitutes them before the query reaches Prometheus.
GRAFANA = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "6h", "${datasource}": "prom",
           "$model": ".*", "$deployment": ".*"}


def selected(node, out):
    """Metric names of every vector selector in a parsed expression."""
    if isinstance(node, promql_parser.VectorSelector):
        out.add(node.name)
    for attr in ("expr", "lhs", "rhs", "param", "vector_selector"):
        child = getattr(node, attr, None)
        if child is not None and not isinstance(child, (str, int, float)):
            selected(child, out)
    for child in getattr(node, "args", None) or []:
        selected(child, out)
    return out


def check(expr, where, known_rules):
    for k, v in GRAFANA.items():
        expr = expr.replace(k, v)
    try:
        ast = promql_parser.parse(expr)
    except Exception as e:  # the parser raises ValueError with the position
        sys.exit(f"check-observability: {where}: PromQL does not parse: {e}\n{expr}")
    names = selected(ast, set())
    assert names, f"{where}: selects no metric"
    for name in names:
        base = re.sub(r"_(bucket|count|sum)$", "", name)
        if name in known_rules:
            continue
        if name.startswith("relay_"):
            assert base in catalogue, f"{where}: {name} is not a Relay metric"
            if base != name:
                assert base in histograms, f"{where}: {name}: {base} is not a histogram"
        else:
            assert name == "up", f"{where}: unexpected metric {name}"
    return names


rules = yaml.safe_load((ROOT / "deploy/prometheus/relay-alerts.yaml").read_text())
recorded = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
alerts = 0
for group in rules["groups"]:
    assert group["name"] and group["rules"], group
    for rule in group["rules"]:
        name = rule.get("alert") or rule.get("record")
        assert name and set(rule) <= {"alert", "record", "expr", "for", "labels", "annotations"}, rule
        check(rule["expr"], f"rule {name}", recorded)
        if "alert" in rule:
            alerts += 1
            assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
            assert rule["annotations"]["summary"], name
assert alerts >= 8, alerts

dash = json.loads((ROOT / "deploy/grafana/relay-overview.json").read_text())
queries = 0
for panel in dash["panels"]:
    if panel["type"] == "row":
        continue
    assert panel["title"] and panel["targets"], panel
    for t in panel["targets"]:
        check(t["expr"], f"panel {panel['title']!r}", recorded)
        queries += 1
for var in dash["templating"]["list"]:
    if var["type"] == "query":
        m = re.search(r"label_values\((.*),\s*\w+\)$", var["definition"])
        assert m, var
        check(m.group(1), f"variable {var['name']}", recorded)
print(f"check-observability: {alerts} alerts, {len(recorded)} recording rules, {queries} panel queries OK")
