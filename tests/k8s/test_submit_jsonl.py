"""k8s/base/jobs/submit_jsonl.py, the batch jobs' entrypoint: parsing, input, idempotency, submission.

Submission runs the real ``openai`` SDK against a small HTTP server on 127.0.0.1 that answers
as the farm's gateway does (201 + video object; 429 ``queue_full`` with Retry-After; 400 in the
OpenAI error shape), so the requests checked are the bytes the SDK sends.
"""

from __future__ import annotations

import datetime as dt
import email.policy
import io
import json
import threading
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.k8s import kube

sj = kube.submit_jsonl()

GOOD = "\n".join([
    json.dumps({"prompt": "雪の森を走る赤いキツネ", "model": "wan-tiny", "size": "128x128", "seconds": 2, "seed": 7}),
    "",
    json.dumps({"prompt": "a dog on a beach", "seconds": "1", "steps": 4, "priority": "interactive"}),
    json.dumps({"prompt": "timelapse", "scheduler": "flow-euler"}),
]) + "\n"


def test_parses_each_line_into_the_request_it_sends():
    lines = sj.parse_jsonl(GOOD)
    assert [line.number for line in lines] == [1, 3, 4]  # blank lines are skipped, numbers are the file's
    assert lines[0].request == {"prompt": "雪の森を走る赤いキツネ", "model": "wan-tiny", "size": "128x128",
                                "seconds": 2, "seed": 7, "priority": "bulk"}
    assert lines[1].request == {"prompt": "a dog on a beach", "seconds": 1, "steps": 4, "priority": "interactive"}
    assert lines[2].request == {"prompt": "timelapse", "priority": "bulk", "scheduler": "flow-euler"}
    assert sj.parse_jsonl(GOOD, default_priority="interactive")[0].request["priority"] == "interactive"


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ('{"prompt": "x", "promt": "y"}', "line 2: unknown field(s) 'promt'"),
        ('{"prompt": "   "}', "line 2: prompt: required"),
        ('{"model": "wan-tiny"}', "line 2: prompt: required"),
        ('["a list"]', "line 2: expected a JSON object, got list"),
        ('{"prompt": "x", "size": "big"}', "line 2: size: 'big' is not WIDTHxHEIGHT"),
        ('{"prompt": "x", "seconds": true}', "line 2: seconds: must be a whole number"),
        ('{"prompt": "x", "seconds": 0}', "line 2: seconds: must be at least 1"),
        ('{"prompt": "x", "seed": -1}', "line 2: seed: must be at least 0"),
        ('{"prompt": "x", "steps": 2.5}', "line 2: steps: must be a whole number"),
        ('{"prompt": "x", "priority": "urgent"}', "line 2: priority: 'urgent'; allowed: interactive, bulk"),
        ('{"prompt": "x", "scheduler": "ddim"}', "line 2: scheduler: 'ddim'"),
        ('{"prompt": "x"', "line 2: not valid JSON"),
    ],
)
def test_a_bad_line_is_named_and_nothing_is_returned(line, needle):
    with pytest.raises(sj.BatchError, match="nothing submitted") as caught:
        sj.parse_jsonl('{"prompt": "fine"}\n' + line + "\n")
    assert needle in str(caught.value)


def test_every_bad_line_is_counted_and_an_empty_file_refused():
    text = "\n".join(["{}"] * 12 + ['{"prompt": "ok"}'])
    with pytest.raises(sj.BatchError, match=r"^12 bad line\(s\).*\(and 2 more\)$"):
        sj.parse_jsonl(text)
    with pytest.raises(sj.BatchError, match="no prompts"):
        sj.parse_jsonl("\n\n")


def test_reads_a_local_file_and_refuses_what_is_not_one(tmp_path):
    path = tmp_path / "batch.jsonl"
    path.write_text(GOOD)
    assert sj.read_input(str(path), max_bytes=10_000) == GOOD.encode()
    with pytest.raises(sj.BatchError, match="bytes; allowed: at most 10"):
        sj.read_input(str(path), max_bytes=10)
    with pytest.raises(sj.BatchError, match="is not a file"):
        sj.read_input(str(tmp_path / "missing.jsonl"), max_bytes=10_000)
    with pytest.raises(sj.BatchError, match="not UTF-8"):
        sj.decode(b"\xff\xfe{", "x.jsonl")


def test_reads_an_s3_object_through_boto3():
    from botocore.stub import Stubber

    client = sj.s3_client("http://127.0.0.1:1", "us-east-1")
    with Stubber(client) as stub:
        stub.add_response("head_object", {"ContentLength": len(GOOD.encode())},
                          {"Bucket": "videofarm-batches", "Key": "in/batch.jsonl"})
        body = __import__("botocore.response", fromlist=["StreamingBody"]).StreamingBody(
            io.BytesIO(GOOD.encode()), len(GOOD.encode()))
        stub.add_response("get_object", {"Body": body}, {"Bucket": "videofarm-batches", "Key": "in/batch.jsonl"})
        stub.add_client_error("head_object", service_error_code="404", http_status_code=404)
        data = sj.read_input("s3://videofarm-batches/in/batch.jsonl", max_bytes=10_000, client_factory=lambda: client)
        assert data == GOOD.encode()
        with pytest.raises(sj.BatchError, match=r"cannot read s3://videofarm-batches/gone.jsonl \(404\)"):
            sj.read_input("s3://videofarm-batches/gone.jsonl", max_bytes=10_000, client_factory=lambda: client)
    for bad in ("s3://", "s3://bucket", "s3://bucket/"):
        with pytest.raises(sj.BatchError, match="is not s3://BUCKET/KEY"):
            sj.split_s3_uri(bad)


def test_keys_replay_the_same_batch_and_change_with_the_line():
    lines = sj.parse_jsonl(GOOD)
    now = dt.datetime(2026, 5, 1, 2, 0, tzinfo=dt.timezone.utc)
    batch = sj.batch_id("{content}", GOOD.encode(), now)
    assert batch == sj.batch_id("{content}", GOOD.encode(), now + dt.timedelta(days=1))
    assert sj.batch_id("nightly-{date}", b"", now) == "nightly-2026-05-01"
    keys = [sj.idempotency_key(batch, line) for line in lines]
    assert len(set(keys)) == 3 and all(len(k) <= 255 for k in keys)
    assert keys == [sj.idempotency_key(batch, line) for line in sj.parse_jsonl(GOOD)]
    edited = sj.parse_jsonl(GOOD.replace("timelapse", "timelapse at dusk"))
    assert sj.idempotency_key(batch, edited[2]) != keys[2] and sj.idempotency_key(batch, edited[0]) == keys[0]
    with pytest.raises(sj.BatchError, match="only {content} and {date}"):
        sj.batch_id("{nope}", b"", now)


def _form(content_type: str, raw: bytes) -> dict:
    """The fields of a JSON or multipart/form-data body (the SDK sends videos.create as multipart)."""
    if content_type.startswith("application/json"):
        return json.loads(raw)
    message = BytesParser(policy=email.policy.HTTP).parsebytes(
        f"content-type: {content_type}\r\n\r\n".encode() + raw)
    return {part.get_param("name", header="content-disposition"): part.get_payload(decode=True).decode()
            for part in message.iter_parts()}


class _Gateway(BaseHTTPRequestHandler):
    """Answers POST /v1/videos like the farm: the script cannot tell the difference."""

    def do_POST(self):  # noqa: N802
        body = _form(self.headers["content-type"], self.rfile.read(int(self.headers["content-length"])))
        server = self.server
        server.requests.append({"path": self.path, "body": body, "key": self.headers.get("idempotency-key"),
                                "auth": self.headers.get("authorization")})
        if server.full_answers > 0:
            server.full_answers -= 1
            return self._send(429, {"error": {"message": "the farm's render queue is full", "type": "rate_limit_error",
                                              "param": None, "code": "queue_full"}}, {"retry-after": "7"})
        if "refuse" in body["prompt"]:
            return self._send(400, {"error": {"message": "size: '999x999' is not offered by wan-tiny",
                                              "type": "invalid_request_error", "param": "size", "code": None}})
        vid = server.ids.setdefault(self.headers.get("idempotency-key"), f"video_{len(server.ids) + 1}")
        return self._send(201, {"id": vid, "object": "video", "created_at": 1, "model": body.get("model", "wan-tiny"),
                                "progress": 0, "seconds": body.get("seconds", "2"), "size": body.get("size", "128x128"),
                                "status": "queued"})

    def _send(self, status, payload, headers=None):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def gateway():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Gateway)
    server.requests, server.ids, server.full_answers = [], {}, 0
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _client(server):
    import openai

    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_port}/v1", api_key="vf_sk_test", max_retries=0)


def test_submits_each_line_through_the_openai_sdk_with_its_key(gateway):
    lines = sj.parse_jsonl(GOOD)
    printed = []
    outcomes = sj.submit_all(_client(gateway), lines, "b1", deadline=1e12, echo=printed.append)
    assert [o.video_id for o in outcomes] == ["video_1", "video_2", "video_3"]
    first, second, _ = gateway.requests
    assert first["path"] == "/v1/videos" and first["auth"] == "Bearer vf_sk_test"
    # Multipart form fields, as the SDK sends them: numbers as decimal strings, which the farm accepts.
    assert first["body"] == {"prompt": "雪の森を走る赤いキツネ", "model": "wan-tiny", "size": "128x128", "seconds": "2",
                             "seed": "7", "priority": "bulk"}
    assert second["body"] == {"prompt": "a dog on a beach", "seconds": "1", "steps": "4", "priority": "interactive"}
    assert [r["key"] for r in gateway.requests] == [sj.idempotency_key("b1", line) for line in lines]
    assert printed == ["line 1: video_1 queued", "line 3: video_2 queued", "line 4: video_3 queued"]
    # A rerun of the same batch sends the same keys: the farm replays the same videos.
    again = sj.submit_all(_client(gateway), lines, "b1", deadline=1e12, echo=lambda _: None)
    assert [o.video_id for o in again] == ["video_1", "video_2", "video_3"]
    assert sj.summary(outcomes, 3, waited=False) == ("batch: 3 line(s), submitted 3, refused 0, not sent 0", 0)


def test_waits_out_a_full_queue_as_retry_after_says(gateway):
    gateway.full_answers = 2
    slept = []
    lines = sj.parse_jsonl('{"prompt": "one"}\n')
    outcomes = sj.submit_all(_client(gateway), lines, "b", deadline=1e12, sleep=slept.append, echo=lambda _: None)
    assert slept == [7.0, 7.0] and outcomes[0].video_id == "video_1"
    assert len({r["key"] for r in gateway.requests}) == 1, "the retries are the same request"


def test_a_refused_line_is_reported_and_the_rest_go_on(gateway):
    lines = sj.parse_jsonl('{"prompt": "refuse me", "size": "999x999"}\n{"prompt": "fine"}\n')
    printed = []
    outcomes = sj.submit_all(_client(gateway), lines, "b", deadline=1e12, echo=printed.append)
    assert printed == ["line 1: refused: size: '999x999' is not offered by wan-tiny", "line 2: video_1 queued"]
    assert sj.summary(outcomes, 2, waited=False) == ("batch: 2 line(s), submitted 1, refused 1, not sent 0", 1)


def test_gives_up_on_a_full_queue_at_the_deadline(gateway):
    gateway.full_answers = 100
    outcomes = sj.submit_all(_client(gateway), sj.parse_jsonl('{"prompt": "x"}\n'), "b", deadline=0.0,
                             sleep=lambda _: None, echo=lambda _: None)
    assert outcomes[0].video_id is None and "--deadline-s" in outcomes[0].error


def test_an_unreachable_farm_stops_the_run_and_counts_what_was_not_sent(gateway):
    port = gateway.server_port
    gateway.shutdown()
    gateway.server_close()
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
    clock = iter(range(0, 10_000, 100))
    outcomes = sj.submit_all(client, sj.parse_jsonl('{"prompt": "a"}\n{"prompt": "b"}\n'), "b", deadline=1e12,
                             patience_s=250, clock=lambda: next(clock), sleep=lambda _: None, echo=lambda _: None)
    assert outcomes == []
    assert sj.summary(outcomes, 2, waited=False) == ("batch: 2 line(s), submitted 0, refused 0, not sent 2", 1)


def test_main_checks_everything_before_sending(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("VIDEOFARM_API_KEY", raising=False)
    path = tmp_path / "batch.jsonl"
    path.write_text(GOOD + '{"prompt": ""}\n')
    assert sj.main(["--input", str(path), "--base-url", "http://127.0.0.1:9/v1", "--api-key", "k"]) == 2
    assert "line 5: prompt: required" in capsys.readouterr().err
    assert sj.main(["--input", str(path), "--base-url", "http://127.0.0.1:9/v1"]) == 2
    assert "no API key" in capsys.readouterr().err
    path.write_text(GOOD)
    assert sj.main(["--input", str(path), "--base-url", "http://127.0.0.1:9/v1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "3 line(s), nothing sent (--dry-run)" in out and '"prompt": "timelapse"' in out


def test_main_submits_and_summarises(tmp_path, capsys, monkeypatch, gateway):
    monkeypatch.setenv("VIDEOFARM_API_KEY", "vf_sk_env")
    path = Path(tmp_path / "batch.jsonl")
    path.write_text(GOOD)
    status = sj.main(["--input", str(path), "--base-url", f"http://127.0.0.1:{gateway.server_port}/v1"])
    assert status == 0
    assert capsys.readouterr().out.strip().endswith("batch: 3 line(s), submitted 3, refused 0, not sent 0")
    assert {r["auth"] for r in gateway.requests} == {"Bearer vf_sk_env"}
