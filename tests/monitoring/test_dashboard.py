"""The Grafana dashboard's shape (k8s/components/monitoring/dashboards/videofarm.json), and the
Prometheus harness failing loudly. That every panel's query returns data from a real farm is
tests/serve/test_dashboards.py.
"""

from __future__ import annotations

import json
import re

import pytest
import yaml

from tests.k8s.kube import ROOT, load_script
from tests.monitoring.promkit import PrometheusError, running_prometheus

monitoring = load_script("k8s_monitoring", ROOT / "scripts" / "k8s-monitoring.py")

UNITS = {"s", "percentunit", "reqps", "cps", "Bps", "short"}


def _dashboard() -> dict:
    return json.loads(monitoring.DASHBOARD.read_text())


def _panels() -> list[dict]:
    return [p for p in _dashboard()["panels"] if p["type"] != "row"]


def _families() -> set[str]:
    return set(re.findall(r'"(videofarm_[a-z_]+)"', (ROOT / "farm" / "metrics.py").read_text()))


def test_the_written_dashboard_is_the_scripts():
    assert _dashboard() == monitoring.dashboard(), "run: .venv/bin/python scripts/k8s-monitoring.py"


def test_datasource_variable_and_filters_follow_rays_dashboards():
    dashboard = _dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name, variable in variables.items():
        if name != "datasource":
            assert variable["datasource"] == "${datasource}" and variable["includeAll"], name
            assert variable["allValue"] == ".*", f"{name}: All must also match series without the label"
    for panel in _panels():
        assert panel["datasource"] == "${datasource}", panel["title"]
        assert panel["fieldConfig"]["defaults"]["unit"] in UNITS, panel["title"]
        assert panel["description"] and panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == "${datasource}" and target["legendFormat"], panel["title"]
            if "ray_" in target["expr"]:  # every raw metric is filtered by cluster, as Ray's dashboards do
                selectors = re.findall(r"\bray_[a-z_]+\{([^}]*)\}", target["expr"])
                assert selectors and all('ray_io_cluster=~"$Cluster"' in s for s in selectors), target["expr"]


def test_rows_hold_the_panels_without_overlap():
    panels = _dashboard()["panels"]
    assert panels[0]["type"] == "row"
    taken = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24
        cells = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))


def test_panels_use_only_metrics_the_farm_or_ray_serve_export_or_recorded_series():
    families = _families()
    recorded = {r["record"] for g in yaml.safe_load(monitoring.RULES.read_text())["groups"]
                for r in g["rules"] if "record" in r}
    for panel in _panels():
        for target in panel["targets"]:
            for name in re.findall(r"\bray_videofarm_[a-z_]+", target["expr"]):
                family = re.sub(r"_(bucket|count|sum)$", "", name.removeprefix("ray_"))
                assert family in families, f"{panel['title']}: {name} is not in farm/metrics.py"
            for name in re.findall(r"\bvideofarm:[a-z0-9_:]+", target["expr"]):
                assert name in recorded, f"{panel['title']}: {name} is not a recording rule"


def test_the_issues_panels_are_there():
    titles = {p["title"] for p in _panels()}
    assert {"Queue depth by priority", "Queue wait by priority", "Shard latency by pool", "Shard handoff by pool",
            "Replica busy fraction", "Jobs completed by model", "Jobs failed by reason", "Upload latency",
            "Upload bytes by variant", "HTTP requests by route and status"} <= titles


def test_a_prometheus_that_cannot_start_fails_with_its_reason(tmp_path):
    bad = {"global": {"scrape_interval": "forever"}}
    with pytest.raises(PrometheusError, match=r"exited with status \d+[\s\S]*forever"):
        with running_prometheus(tmp_path, targets=[], config=bad):
            pass
