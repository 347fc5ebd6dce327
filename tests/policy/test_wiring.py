"""The farm's own assembly passes batch lines through the configured content policy (no Ray needed:
the batch runner is built by a plain function of the settings)."""

from __future__ import annotations

import json

import pytest

from farm.config import FarmSettings, embedded_models
from farm.db import Database
from farm.jobs.store import JobStore
from farm.policy.registry import PolicyStore
from farm.serve.deployments import _batch_runner


def line(prompt: str) -> bytes:
    return json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/videos", "body": {"prompt": prompt}}).encode()


def test_the_farms_batch_runner_moderates_lines(tmp_path) -> None:
    settings = FarmSettings(state_dir=tmp_path, models=embedded_models(tmp_path), policy={"refresh_s": 0})
    db = Database(settings.job_store_url())
    db.migrate()
    PolicyStore(db).create(kind="work", name="ゴジラ", aliases=["Godzilla"], holder="TOHO")
    runner = _batch_runner(settings, db, JobStore(db), leading=lambda: True, wake=lambda: None)
    refused = runner.rules.check(line("GODZILLA in Tokyo"), "acct_x").error
    assert refused["body"]["error"]["code"] == "content_policy_violation"
    assert runner.rules.check(line("a fox in Tokyo"), "acct_x").error is None
    db.close()


def test_an_operator_moderator_that_cannot_be_imported_stops_the_assembly(tmp_path) -> None:
    settings = FarmSettings(state_dir=tmp_path, models=embedded_models(tmp_path),
                            policy={"moderators": ["no_such_module:Classifier"]})
    db = Database(settings.job_store_url())
    db.migrate()
    with pytest.raises(ValueError, match="cannot import 'no_such_module:Classifier'"):
        _batch_runner(settings, db, JobStore(db), leading=lambda: True, wake=lambda: None)
    db.close()
