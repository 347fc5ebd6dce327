"""The Grafana dashboard and the rules against a real Prometheus scraping the shared farm.

Debian's ``prometheus`` starts on loopback (a free port, its own data folder) with the farm's
rule file, scraping the farm's Ray metrics endpoint. A short load, run twice (the first pass
makes every series exist), gives every panel something to show: interactive and bulk clips at 64x64, a job the chaos settings fail (``non_finite_latents``),
a cancelled one, a 400, retrieves and a download. Then every panel's every query, as Grafana
would send it with "All" selected, must return at least one finite value through the HTTP API;
the failure names each panel and query still empty. The pool and route variables must offer
values, and Prometheus must have loaded the rules without an error.
"""

from __future__ import annotations

import json
import math
import time

import httpx
import pytest
import yaml

from tests.k8s.kube import ROOT, load_script
from tests.monitoring.promkit import running_prometheus
from tests.serve.farmkit import wait_for

pytestmark = pytest.mark.slow

monitoring = load_script("k8s_monitoring", ROOT / "scripts" / "k8s-monitoring.py")

SMALL = {"size": "64x64", "seconds": "1"}
RATE_INTERVAL = "1m"  # what Grafana's $__rate_interval is at a 2 s scrape and a short time range
REPORT_S = 12  # Ray's processes report their metrics to the node's agent every 10 s
DATA_WAIT_S = 150  # Ray's agent refreshes its values every few seconds; a rate needs two of them


def _dashboard() -> dict:
    return json.loads(monitoring.DASHBOARD.read_text())


def _as_grafana_sends_it(expr: str, variables: list[dict]) -> str:
    """The query with every template variable at "All" (its allValue) and $__rate_interval set."""
    expr = expr.replace("$__rate_interval", RATE_INTERVAL)
    for variable in variables:
        if variable["type"] == "query":
            expr = expr.replace(f"${variable['name']}", variable["allValue"])
    assert "$" not in expr, f"an unknown variable is left in {expr!r}"
    return expr


def _queries() -> list[tuple[str, str]]:
    dashboard = _dashboard()
    variables = dashboard["templating"]["list"]
    return [(panel["title"], _as_grafana_sends_it(target["expr"], variables))
            for panel in dashboard["panels"] if panel["type"] != "row" for target in panel["targets"]]


def _finite(matrix: list[dict]) -> bool:
    return any(math.isfinite(float(value)) for series in matrix for _, value in series["values"])


def _scraped_value(prom, expr: str) -> float:
    now = time.time()
    matrix = prom.query_range(expr, now - 10, now)
    return max((float(v) for series in matrix for _, v in series["values"]), default=0.0)


def _load(farm) -> list[str]:
    """A short mixed load; returns the ids of the jobs it waits for to end."""
    key = farm.new_api_key("dashboards")
    client = farm.client(key)
    ids = []
    for i, priority in enumerate(["interactive", "interactive", "bulk"]):
        ids.append(client.videos.create(model="wan-tiny", prompt=f"a lighthouse in fog {i}", **SMALL,
                                        extra_body={"steps": 4, "seed": i, "priority": priority}).id)
    ids.append(client.videos.create(model="wan-tiny", prompt="chaos-nan: the dashboard's failure", **SMALL,
                                    extra_body={"steps": 4, "seed": 9}).id)
    cancelled = client.videos.create(model="wan-tiny", prompt="chaos-slow: cancelled at once", **SMALL,
                                     extra_body={"steps": 4, "seed": 5, "priority": "bulk"}).id
    ids.append(cancelled)
    headers = {"Authorization": f"Bearer {key}"}
    reply = httpx.post(f"{farm.url}/v1/videos/{cancelled}/cancel", headers=headers, timeout=30)
    assert reply.status_code == 200, reply.text
    # A 4xx: a size the model does not offer.
    reply = httpx.post(f"{farm.url}/v1/videos", headers=headers, timeout=30,
                       json={"model": "wan-tiny", "prompt": "too big", "size": "7x7", "seconds": "1"})
    assert reply.status_code == 400, reply.text
    store = farm.store()
    wait_for(lambda: all((job := store.get(i)) is not None and job.terminal for i in ids), 240, interval=0.5,
             what="the dashboard load's jobs to end")
    completed = ids[:3]
    assert [store.get(i).status for i in ids[:4]] == ["completed"] * 3 + ["failed"], \
        {i: (store.get(i).status, store.get(i).error_code) for i in ids}
    for video_id in completed:
        client.videos.retrieve(video_id)
    client.videos.download_content(completed[0], variant="thumbnail").read()
    return ids


def test_every_dashboard_panel_has_data_from_a_real_prometheus(shared_farm, tmp_path):
    farm = shared_farm
    with running_prometheus(tmp_path / "prometheus", targets=[f"127.0.0.1:{farm.metrics_port}"],
                            rule_files=[monitoring.RULES]) as prom:
        wait_for(lambda: any(t["health"] == "up" for t in prom.targets()), 60,
                 what=f"prometheus to scrape the farm at {farm.metrics_url} ({prom.targets()})")
        # A first pass makes every series exist and be scraped; the second is what the panels show.
        # (Prometheus' rate() sees no increase in a series' first sample: a histogram that appears
        # with all its observations already in it would give the quantile panels NaN.)
        _load(farm)
        wait_for(lambda: _scraped_value(prom, "sum(ray_videofarm_job_seconds_count)") >= 3, 90, interval=1,
                 what="prometheus to scrape the first pass's completed jobs")
        time.sleep(REPORT_S)  # the other processes' series of the first pass too
        started = time.time()
        _load(farm)

        queries = _queries()
        empty = list(queries)
        deadline = time.monotonic() + DATA_WAIT_S
        while empty and time.monotonic() < deadline:
            empty = [(title, expr) for title, expr in empty
                     if not _finite(prom.query_range(expr, started - 60, time.time()))]
            if empty:
                time.sleep(5)
        assert not empty, (f"{len(empty)} of {len(queries)} dashboard queries returned no data within "
                           f"{DATA_WAIT_S}s of the load:\n" + "\n".join(f"  {t}: {e}" for t, e in empty))

        for group in prom.rule_groups():
            for rule in group["rules"]:
                assert rule["health"] == "ok", f"{group['name']}/{rule['name']}: {rule.get('lastError')}"
        loaded = {g["name"] for g in prom.rule_groups()}
        assert loaded == {g["name"] for g in yaml.safe_load(monitoring.RULES.read_text())["groups"]}

        for name, label, metric in monitoring.VARIABLES:
            if name == "Cluster":
                continue  # ray_io_cluster comes from KubeRay's relabeling (the PodMonitor), not from the farm
            values = prom.label_values(label, metric)
            assert values, f"template variable {name}: no {label} values on {metric}"
        assert "wan-tiny:transformer" in prom.label_values("pool", "ray_videofarm_replica_busy_seconds_total")

