"""Webhook fixtures: a real SQLite database, a real job store emitting events, real HTTP receivers."""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from farm.accounts.tables import Account
from farm.db import Database, utcnow
from farm.jobs.store import Job, JobStore
from farm.webhooks.store import WebhookStore
from tests.clock import Clock

ACCOUNT_A = "acct_a"
ACCOUNT_B = "acct_b"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db_url(database_url: str) -> Iterator[str]:
    """A migrated database with two accounts (SQLite, and PostgreSQL when one is given)."""
    yield from _with_accounts(database_url)


def _with_accounts(url: str) -> Iterator[str]:
    db = Database(url)
    db.migrate()
    with db.writer.begin() as conn:
        for account in (ACCOUNT_A, ACCOUNT_B):
            conn.execute(Account.__table__.insert().values(id=account, name=account, created_at=utcnow()))
    db.close()
    yield url


@pytest.fixture
def jobs(db_url: str) -> Iterator[JobStore]:
    store = JobStore(db_url)
    yield store
    store.close()


@pytest.fixture
def hooks(db_url: str, clock: Clock) -> Iterator[WebhookStore]:
    store = WebhookStore(db_url, clock=clock)
    yield store
    store.close()


def finish_job(jobs: JobStore, owner: str, outcome: str = "completed") -> Job:
    """A job of ``owner`` taken through claim to ``outcome``: the store logs its event."""
    job = jobs.create(model="wan-tiny", prompt="a red fox", size="128x128", seconds=2, params={"steps": 2},
                      owner=owner)
    claimed = jobs.claim_next("test-worker", lease_s=60)
    assert claimed is not None and claimed.id == job.id
    if outcome == "completed":
        assert jobs.complete(job.id, "test-worker", {"video": f"videos/{job.id}/video.mp4"})
    elif outcome == "failed":
        assert jobs.fail(job.id, "test-worker", "model_error", "NaN latents")
    else:
        jobs.request_cancel(job.id)
        assert jobs.finish_cancelled(job.id, "test-worker")
    return job


@dataclasses.dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    host: str


class Receiver:
    """A real HTTP server on a loopback address that answers POSTs from a script.

    ``script`` holds responses in order (a status code, or ``("redirect", url, code)``);
    when it runs out, ``default`` answers.
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.requests: list[Received] = []
        self.script: list[int | tuple[str, str, int]] = []
        self.default: int | tuple[str, str, int] = 200
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver._lock:
                    receiver.requests.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()},
                                                      body, self.headers.get("Host", "")))
                    answer = receiver.script.pop(0) if receiver.script else receiver.default
                if isinstance(answer, tuple):
                    _, location, code = answer
                    self.send_response(code)
                    self.send_header("Location", location)
                else:
                    self.send_response(answer)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.host = host
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def url(self, path: str = "/hook") -> str:
        return f"http://{self.host}:{self.port}{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def bodies(self) -> list[dict]:
        return [json.loads(r.body) for r in self.requests]


@pytest.fixture
def make_receiver() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []

    def make(host: str = "127.0.0.1") -> Receiver:
        receiver = Receiver(host)
        made.append(receiver)
        return receiver

    yield make
    for receiver in made:
        receiver.close()


@pytest.fixture
def receiver(make_receiver: Callable[..., Receiver]) -> Receiver:
    return make_receiver()
