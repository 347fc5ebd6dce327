#!/usr/bin/env python3
"""Write the farm's Grafana dashboard and the PrometheusRule from their one source each.

- The dashboard is defined below (``ROWS``: rows of panels, each panel's PromQL, unit and legend),
  following the conventions of Ray's own Serve dashboard: a hidden ``datasource`` variable every
  panel and target uses as ``${datasource}``, a ``Cluster`` variable over KubeRay's ``ray_io_cluster``
  label (every query filters on it; ``.*`` also matches series without it, as on ``farm up``),
  template variables for pool and route, rows, units and legend formats. It is written to
  ``k8s/components/monitoring/dashboards/videofarm.json``, which the monitoring component ships
  as a ConfigMap for Grafana's sidecar and which Grafana can import as it is.
- The rules' source is ``k8s/components/monitoring/videofarm-rules.yaml`` (a plain Prometheus rule
  file); ``prometheusrule.yaml`` beside it is that file's groups wrapped in a PrometheusRule.

tests/k8s fails while either written file is stale; tests/serve/test_dashboards.py runs every
panel's query against a Prometheus scraping a real farm.

    python scripts/k8s-monitoring.py            # write both
    python scripts/k8s-monitoring.py --check    # exit 1 naming a stale file, write nothing

Needs only PyYAML.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "k8s" / "components" / "monitoring"
RULES = MONITORING / "videofarm-rules.yaml"
PROMETHEUSRULE = MONITORING / "prometheusrule.yaml"
DASHBOARD = MONITORING / "dashboards" / "videofarm.json"

CLUSTER = 'ray_io_cluster=~"$Cluster"'


def m(name: str, *matchers: str) -> str:
    """``name{…}`` with the dashboard's cluster filter and ``matchers``."""
    return f"{name}{{{','.join((CLUSTER, *matchers))}}}"


def rate(name: str, *matchers: str) -> str:
    return f"rate({m(name, *matchers)}[$__rate_interval])"


def quantile(q: float, histogram: str, by: str, *matchers: str) -> str:
    return f"histogram_quantile({q}, sum by ({by}, le) ({rate(histogram + '_bucket', *matchers)}))"


@dataclasses.dataclass(frozen=True)
class Target:
    expr: str
    legend: str


@dataclasses.dataclass(frozen=True)
class Panel:
    title: str
    description: str
    unit: str  # a Grafana unit id: s, percentunit, reqps, cps, Bps, short
    targets: tuple[Target, ...]
    stack: bool = False


@dataclasses.dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


POOL = 'pool=~"$pool"'
ROUTE = 'route=~"$route"'

ROWS = (
    Row("Queue", (
        Panel("Queue depth by priority", "Jobs waiting in the job store for the dispatcher to claim them.", "short",
              (Target(f"max by (priority) ({m('ray_videofarm_queue_depth')})", "{{priority}}"),)),
        Panel("Queue wait by priority", "Time from a job's creation to its first claim (p50 and p95).", "s",
              (Target(quantile(0.5, "ray_videofarm_queue_wait_seconds", "priority"), "p50 {{priority}}"),
               Target(quantile(0.95, "ray_videofarm_queue_wait_seconds", "priority"), "p95 {{priority}}"))),
        Panel("Interactive queue-wait SLO errors",
              "Share of interactive jobs that waited over 60 s for their first claim (SLO: 1 %), from the "
              "recording rules the burn-rate alerts use.", "percentunit",
              (Target("videofarm:queue_wait_slo_errors:ratio_rate5m", "5m"),
               Target("videofarm:queue_wait_slo_errors:ratio_rate1h", "1h"))),
        Panel("Jobs created by priority", "Jobs the gateway accepted, per second.", "cps",
              (Target(f"sum by (priority) ({rate('ray_videofarm_jobs_created_total')})", "{{priority}}"),)),
    )),
    Row("Render pools", (
        Panel("Shard latency by pool", "Compute time of one shard on a denoiser replica (p50 and p95).", "s",
              (Target(quantile(0.5, "ray_videofarm_shard_seconds", "pool", POOL), "p50 {{pool}}"),
               Target(quantile(0.95, "ray_videofarm_shard_seconds", "pool", POOL), "p95 {{pool}}"))),
        Panel("Shard handoff by pool",
              "Shard round trip minus compute: routing and moving the state through Ray's object store (p95).",
              "s", (Target(quantile(0.95, "ray_videofarm_shard_handoff_seconds", "pool", POOL), "p95 {{pool}}"),)),
        Panel("Replica busy fraction",
              "Share of time each replica held a stage call, as the dispatcher schedules them (counted when a "
              "call ends).", "percentunit",
              (Target(f"sum by (pool, replica) ({rate('ray_videofarm_replica_busy_seconds_total', POOL)})",
                      "{{replica}}"),)),
        Panel("Healthy replicas by deployment", "Replicas passing Ray Serve's health check, per deployment.",
              "short",
              (Target(f"sum by (deployment) ({m('ray_serve_deployment_replica_healthy')})", "{{deployment}}"),)),
    )),
    Row("Jobs", (
        Panel("Jobs completed by model", "Jobs that finished with a clip, per second.", "cps",
              (Target(f"sum by (model) ({rate('ray_videofarm_jobs_completed_total')})", "{{model}}"),)),
        Panel("Jobs failed by reason", "Jobs that ended failed, per second, by error code (cancelled jobs are not counted).", "cps",
              (Target(f"sum by (reason) ({rate('ray_videofarm_jobs_failed_total')})", "{{reason}}"),), stack=True),
        Panel("Job latency by model", "Creation to completed (p50 and p95).", "s",
              (Target(quantile(0.5, "ray_videofarm_job_seconds", "model"), "p50 {{model}}"),
               Target(quantile(0.95, "ray_videofarm_job_seconds", "model"), "p95 {{model}}"))),
        Panel("Accelerator-seconds by tenant",
              "Replica-seconds of completed shards, decodes and finishes (the usage ledger), per second, by "
              "account and device kind.", "short",
              (Target(f"sum by (tenant, device) ({rate('ray_videofarm_accelerator_seconds_total')})",
                      "{{tenant}} {{device}}"),), stack=True),
    )),
    Row("Storage", (
        Panel("Upload latency", "Upload of one finished clip's objects to S3 (p50 and p95).", "s",
              (Target(quantile(0.5, "ray_videofarm_upload_seconds", "model"), "p50 {{model}}"),
               Target(quantile(0.95, "ray_videofarm_upload_seconds", "model"), "p95 {{model}}"))),
        Panel("Upload bytes by variant", "Bytes of finished clips uploaded to S3 per second, by object.",
              "Bps", (Target(f"sum by (variant) ({rate('ray_videofarm_upload_bytes_total')})", "{{variant}}"),),
              stack=True),
    )),
    Row("Gateway", (
        Panel("HTTP requests by route and status", "Gateway responses per second.", "reqps",
              (Target(f"sum by (route, status) ({rate('ray_videofarm_http_request_seconds_count', ROUTE)})",
                      "{{status}} {{route}}"),)),
        Panel("HTTP latency by route", "Gateway request latency (p95).", "s",
              (Target(quantile(0.95, "ray_videofarm_http_request_seconds", "route", ROUTE), "p95 {{route}}"),)),
    )),
    Row("Webhooks", (
        Panel("Webhook backlog", "Deliveries due now and not yet being sent (the Notifier's queue).", "short",
              (Target(f"max({m('ray_videofarm_webhook_backlog')})", "due"),)),
    )),
)

# (name, label, metric whose label values the variable offers)
VARIABLES = (
    ("Cluster", "ray_io_cluster", "ray_videofarm_queue_depth"),
    ("pool", "pool", "ray_videofarm_replica_busy_seconds_total"),
    ("route", "route", "ray_videofarm_http_request_seconds_count"),
)


def _variable(name: str, label: str, metric: str) -> dict:
    query = f"label_values({metric}{{{CLUSTER}}}, {label})" if name != "Cluster" else f"label_values({metric}, {label})"
    return {
        "name": name, "label": name, "type": "query", "datasource": "${datasource}",
        "definition": query, "query": {"query": query, "refId": f"{name}-variable"},
        "includeAll": True, "allValue": ".*", "multi": True, "refresh": 2, "sort": 1, "hide": 0,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "options": [], "regex": "",
        "description": "Filter by KubeRay's ray_io_cluster label (All also matches series without it)."
        if name == "Cluster" else f"Filter panels by {label}.",
    }


def _panel(panel: Panel, panel_id: int, x: int, y: int) -> dict:
    return {
        "id": panel_id, "type": "timeseries", "title": panel.title, "description": panel.description,
        "datasource": "${datasource}",
        "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
        "fieldConfig": {
            "defaults": {
                "unit": panel.unit, "min": 0,
                "custom": {"lineWidth": 1, "fillOpacity": 10,
                           "stacking": {"mode": "normal" if panel.stack else "none", "group": "A"}},
            },
            "overrides": [],
        },
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": [{"datasource": "${datasource}", "expr": t.expr, "legendFormat": t.legend, "refId": chr(65 + i)}
                    for i, t in enumerate(panel.targets)],
    }


def dashboard() -> dict:
    """The dashboard as Grafana's JSON model: two panels a line under each row."""
    panels, panel_id, y = [], 1, 0
    for row in ROWS:
        panels.append({"id": panel_id, "type": "row", "title": row.title, "collapsed": False, "panels": [],
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        panel_id, y = panel_id + 1, y + 1
        for index, panel in enumerate(row.panels):
            panels.append(_panel(panel, panel_id, 12 * (index % 2), y + 8 * (index // 2)))
            panel_id += 1
        y += 8 * ((len(row.panels) + 1) // 2)
    datasource = {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
                  "hide": 0, "current": {}, "options": [], "refresh": 1, "regex": "",
                  "description": "The Prometheus that scrapes the farm's Ray metrics endpoints."}
    return {
        "title": "videofarm", "uid": "videofarm-overview", "description": "The render farm: queue, pools, jobs, "
        "storage, gateway, webhooks (metrics from farm/metrics.py, scraped from Ray's metrics agent).",
        "tags": ["videofarm", "ray"], "editable": True, "graphTooltip": 1, "schemaVersion": 39, "version": 1,
        "refresh": "30s", "time": {"from": "now-1h", "to": "now"}, "timezone": "utc",
        "annotations": {"list": []}, "links": [],
        "templating": {"list": [datasource, *(_variable(*v) for v in VARIABLES)]},
        "panels": panels,
    }


def dashboard_text() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


_RULE_HEADER = """\
# GENERATED by scripts/k8s-monitoring.py from videofarm-rules.yaml (the source): edit that file
# and rerun the script. The same recording and alert rules, for the Prometheus Operator.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: videofarm
  labels:
    app.kubernetes.io/name: videofarm
spec:
"""


def prometheusrule_text() -> str:
    """The rule file's ``groups:`` (and every line after it) indented under ``spec:``; its header
    comment is left out. Indenting whole lines keeps block scalars and comments intact."""
    lines = RULES.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("groups:"))
    return _RULE_HEADER + "".join(f"  {line}\n" if line else "\n" for line in lines[start:])


def outputs() -> dict[Path, str]:
    return {DASHBOARD: dashboard_text(), PROMETHEUSRULE: prometheusrule_text()}


def stale() -> list[str]:
    """The written files that differ from what this script would write, relative to the repo root."""
    return [str(p.relative_to(ROOT)) for p, text in outputs().items() if not p.is_file() or p.read_text() != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a written file is stale; write nothing")
    args = parser.parse_args(argv)
    if args.check:
        old = stale()
        for path in old:
            print(f"stale: {path} (run scripts/k8s-monitoring.py)", file=sys.stderr)
        return 1 if old else 0
    for path, text in outputs().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
