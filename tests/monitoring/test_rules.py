"""The farm's Prometheus rules (k8s/components/monitoring/videofarm-rules.yaml) under promtool.

``promtool check rules`` must be clean, and ``promtool test rules`` runs a unit test per alert:
each alert fires on series that show its trouble (with the labels it must carry), and no alert
fires on a healthy farm's series. A new alert without a firing case here fails
``test_every_alert_has_a_firing_case``.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "k8s" / "components" / "monitoring" / "videofarm-rules.yaml"

# Ray's exporter writes histogram bounds as floats (le="60.0"); the rules match "60" too.
MODEL = 'model="wan-tiny"'
DENOISER = 'application="videofarm",deployment="Denoiser:wan-tiny:transformer:0"'


def _series(name: str, labels: str, values: str) -> dict:
    return {"series": f"{name}{{{labels}}}" if labels else name, "values": values}


def _wait_histogram(good_per_min: int, total_per_min: int, samples: int) -> list[dict]:
    """Interactive queue waits: ``good_per_min`` of ``total_per_min`` claimed within 60 s."""
    base = 'priority="interactive",' + MODEL
    return [
        _series("ray_videofarm_queue_wait_seconds_bucket", base + ',le="60.0"', f"0+{good_per_min}x{samples}"),
        _series("ray_videofarm_queue_wait_seconds_bucket", base + ',le="+Inf"', f"0+{total_per_min}x{samples}"),
        _series("ray_videofarm_queue_wait_seconds_count", base, f"0+{total_per_min}x{samples}"),
    ]


# A healthy farm for 7 hours, a sample a minute: every alert must stay quiet on it.
HEALTHY = [
    *_wait_histogram(10, 10, 420),
    _series("ray_videofarm_jobs_created_total", MODEL + ',priority="interactive"', "0+10x420"),
    _series("ray_videofarm_jobs_completed_total", MODEL, "0+10x420"),
    _series("ray_videofarm_jobs_failed_total", MODEL + ',reason="cancelled"', "0x420"),
    _series("ray_videofarm_queue_depth", 'priority="interactive"', "3x420"),
    _series("ray_videofarm_queue_depth", 'priority="bulk"', "40x420"),
    _series("ray_videofarm_step_seconds_count", 'pool="wan-tiny:transformer"', "0+100x420"),
    _series("ray_serve_deployment_status", DENOISER, "6x420"),
    _series("ray_videofarm_http_request_seconds_count", 'method="POST",route="/v1/videos",status="201"', "0+10x420"),
    _series("ray_videofarm_http_request_seconds_count", 'method="POST",route="/v1/videos",status="429"', "0+3x420"),
    _series("ray_videofarm_upload_seconds_bucket", MODEL + ',le="1.0"', "0+10x420"),
    _series("ray_videofarm_upload_seconds_bucket", MODEL + ',le="+Inf"', "0+10x420"),
    _series("ray_videofarm_storage_errors_total", 'stage="finisher"', "0+1x420"),  # one error in 10 min: noise
    _series("ray_videofarm_webhook_backlog", "", "2x420"),
]

# alert → (series showing its trouble, when to evaluate, the labels it must carry besides severity)
TROUBLE: dict[str, tuple[list[dict], str, dict]] = {
    "VideofarmQueueWaitBudgetBurnFast": (_wait_histogram(5, 10, 90), "70m", {}),
    "VideofarmQueueWaitBudgetBurnSlow": (_wait_histogram(8, 10, 420), "7h", {}),  # 20 % late: slow burn only
    "VideofarmInteractiveQueueBacklog": ([_series("ray_videofarm_queue_depth", 'priority="interactive"', "80x90")],
                                         "40m", {}),
    "VideofarmNoProgress": ([_series("ray_videofarm_queue_depth", 'priority="bulk"', "3x90"),
                             _series("ray_videofarm_step_seconds_count", 'pool="wan-tiny:transformer"', "50x90")],
                            "60m", {}),
    "VideofarmJobsFailing": ([_series("ray_videofarm_jobs_failed_total", MODEL + ',reason="out_of_memory"', "0+1x90"),
                              _series("ray_videofarm_jobs_completed_total", MODEL, "0+4x90")], "40m", {}),
    "VideofarmNoJobsCompleting": ([_series("ray_videofarm_jobs_created_total", MODEL + ',priority="bulk"', "0+2x90"),
                                   _series("ray_videofarm_jobs_completed_total", MODEL, "7x90")], "60m", {}),
    "VideofarmReplicaDown": ([_series("ray_serve_deployment_status", DENOISER, "6x10 2x60")], "40m",
                             {"application": "videofarm", "deployment": "Denoiser:wan-tiny:transformer:0"}),
    "VideofarmGatewayErrors": (
        [_series("ray_videofarm_http_request_seconds_count", 'method="POST",route="/v1/videos",status="500"', "0+1x90"),
         _series("ray_videofarm_http_request_seconds_count", 'method="POST",route="/v1/videos",status="201"', "0+9x90")],
        "40m", {}),
    "VideofarmS3Errors": ([_series("ray_videofarm_storage_errors_total", 'stage="finisher"', "0+10x90")], "40m", {}),
    "VideofarmUploadsSlow": ([_series("ray_videofarm_upload_seconds_bucket", MODEL + ',le="10.0"', "0x90"),
                              _series("ray_videofarm_upload_seconds_bucket", MODEL + ',le="30.0"', "0+5x90"),
                              _series("ray_videofarm_upload_seconds_bucket", MODEL + ',le="+Inf"', "0+5x90")],
                             "40m", {}),
    "VideofarmWebhookBacklog": ([_series("ray_videofarm_webhook_backlog", "", "150x90")], "40m", {}),
}

# Too early: the trouble has not lasted the alert's `for` yet (or its window has not filled).
TOO_EARLY = {
    "VideofarmQueueWaitBudgetBurnFast": "2m",
    "VideofarmReplicaDown": "13m",
    "VideofarmWebhookBacklog": "10m",
}


def _rules() -> dict:
    return yaml.safe_load(RULES.read_text())


def _alerts() -> dict[str, dict]:
    return {r["alert"]: r for g in _rules()["groups"] for r in g["rules"] if "alert" in r}


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is not installed: scripts/install-system-packages.sh installs Debian's 'prometheus' "
                    "(it brings promtool)", pytrace=False)
    return found


def _run_promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([_promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def _tests() -> list[dict]:
    alerts = _alerts()
    cases = []
    for name, (series, at, labels) in TROUBLE.items():
        expected = {"severity": alerts[name]["labels"]["severity"], **labels}
        checks = [{"eval_time": at, "alertname": name, "exp_alerts": [{"exp_labels": expected}]}]
        if name in TOO_EARLY:
            checks.append({"eval_time": TOO_EARLY[name], "alertname": name, "exp_alerts": []})
        cases.append({"name": f"{name} fires", "interval": "1m", "input_series": series, "alert_rule_test": checks})
    cases.append({
        "name": "a healthy farm", "interval": "1m", "input_series": HEALTHY,
        "alert_rule_test": [{"eval_time": "7h", "alertname": name, "exp_alerts": []} for name in sorted(alerts)],
        # The recording rules' values on it: no late interactive job, no failure.
        "promql_expr_test": [
            {"expr": "videofarm:queue_wait_slo_errors:ratio_rate1h", "eval_time": "7h",
             "exp_samples": [{"labels": "videofarm:queue_wait_slo_errors:ratio_rate1h", "value": 0}]},
            {"expr": "videofarm:job_failures:ratio_rate15m", "eval_time": "7h",
             "exp_samples": [{"labels": "videofarm:job_failures:ratio_rate15m", "value": 0}]},
        ],
    })
    cases.append({
        "name": "half the interactive jobs late", "interval": "1m", "input_series": _wait_histogram(5, 10, 90),
        "promql_expr_test": [
            {"expr": "videofarm:queue_wait_slo_errors:ratio_rate5m", "eval_time": "60m",
             "exp_samples": [{"labels": "videofarm:queue_wait_slo_errors:ratio_rate5m", "value": 0.5}]},
        ],
    })
    return cases


def test_rules_pass_promtool_check():
    done = _run_promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_has_a_firing_case_and_a_runbook():
    alerts = _alerts()
    assert set(TROUBLE) == set(alerts), f"without a case: {sorted(set(alerts) - set(TROUBLE))}; " \
                                        f"no such alert: {sorted(set(TROUBLE) - set(alerts))}"
    for name, rule in alerts.items():
        assert rule["annotations"].get("runbook", "").strip(), f"{name} has no runbook annotation"


def _write_tests(tmp_path: Path, cases: list[dict]) -> None:
    """The rules without annotations (promtool 2.42 compares them too; their text is not the point)
    and the cases, side by side in ``tmp_path``."""
    rules = _rules()
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(
        {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": cases}, sort_keys=False))


def test_alerts_fire_on_trouble_and_stay_quiet_on_a_healthy_farm(tmp_path):
    _write_tests(tmp_path, _tests())
    done = _run_promtool("test", "rules", "tests.yaml", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_rule_tests_can_fail(tmp_path):
    """The harness notices a wrong expectation: the healthy farm made to expect a backlog alert."""
    cases = [c for c in _tests() if c["name"] == "a healthy farm"]
    cases[0]["alert_rule_test"] = [{"eval_time": "7h", "alertname": "VideofarmWebhookBacklog",
                                    "exp_alerts": [{"exp_labels": {"severity": "warning"}}]}]
    _write_tests(tmp_path, cases)
    done = _run_promtool("test", "rules", "tests.yaml", cwd=tmp_path)
    assert done.returncode != 0 and "VideofarmWebhookBacklog" in done.stdout + done.stderr
