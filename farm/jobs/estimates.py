"""Queue positions and completion estimates: what a client is told about when its job will be done.

The dispatcher knows what the scheduler is doing (which jobs wait in which pool, with how much
work ahead of them, and the measured seconds per step of every pool); the job store knows the
jobs it has not claimed yet. :class:`QueueSnapshot` is the dispatcher's half as plain data, made
in one pass over the jobs it drives; the gateway adds its half (a queued job's rank among the
store's queued jobs of its model, in claim order) and asks :func:`estimate_in_flight` or
:func:`estimate_queued`. Pure: no Ray, SQL or clock inside (``at`` is the snapshot's time).

The estimate is a fluid one: a pool's replicas work through the work ahead together, so a job
waits for (work ahead) ÷ (replicas of its slowest pool), then runs for its own measured cost
(encode + its steps × seconds per step + decode + finish). Until every stage of a model has been
measured once (a farm that has not finished a job of it yet), estimates are None: no guess is
sent as a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PRIORITY_ORDER = {"interactive": 0, "bulk": 1}


@dataclass(frozen=True)
class InFlight:
    """One job the dispatcher drives (status ``in_progress`` in the store)."""

    model: str
    priority: str  # "interactive" | "bulk"
    started: bool  # its first denoising shard has begun: it left the queue
    ahead: int | None  # jobs whose call starts in its pool before its next one; None: not waiting
    wait_s: float  # the work ahead of it in that pool ÷ the pool's replicas (0 when not waiting)
    remaining_s: float | None  # its own work left; None until every stage it needs was measured


@dataclass(frozen=True)
class ModelCosts:
    """Measured costs of one model's stages, and the parallelism its pools give."""

    slots: int  # replicas of its smallest denoiser pool: how many of its jobs run at once
    encode_s: float | None
    step_s: float | None  # one denoising step, averaged over the model's pools
    decode_s: float | None
    finish_s: float | None
    backlog_s: float = 0.0  # the in-flight jobs' remaining work (ones not yet measured count 0)

    def job_s(self, steps: int) -> float | None:
        """The measured cost of one whole job of ``steps`` steps; None until every stage was measured."""
        parts = (self.encode_s, self.step_s, self.decode_s, self.finish_s)
        if any(p is None for p in parts):
            return None
        return self.encode_s + steps * self.step_s + self.decode_s + self.finish_s  # type: ignore[operator]


@dataclass(frozen=True)
class QueueSnapshot:
    """The dispatcher's view at wall time ``at`` (epoch seconds)."""

    at: float
    jobs: dict[str, InFlight] = field(default_factory=dict)
    models: dict[str, ModelCosts] = field(default_factory=dict)

    def waiting_to_start(self, model: str, priority: str) -> int:
        """In-flight jobs of ``model`` that have not started, at ``priority`` or a more urgent one."""
        rank = PRIORITY_ORDER.get(priority, len(PRIORITY_ORDER))
        return sum(1 for j in self.jobs.values()
                   if j.model == model and not j.started and PRIORITY_ORDER.get(j.priority, 9) <= rank)


@dataclass(frozen=True)
class Estimate:
    queue_position: int | None  # jobs that start before it (0: next); None once it has started
    completion_at: float | None  # epoch seconds; None while its model's costs are unmeasured


def estimate_in_flight(snapshot: QueueSnapshot, job_id: str) -> Estimate | None:
    """A job the dispatcher drives; None if the snapshot does not know it (just claimed, or done)."""
    job = snapshot.jobs.get(job_id)
    if job is None:
        return None
    position = None if job.started else (job.ahead or 0)
    done_at = None if job.remaining_s is None else snapshot.at + job.wait_s + job.remaining_s
    return Estimate(position, done_at)


def estimate_queued(snapshot: QueueSnapshot, model: str, priority: str, steps: int, rank: int) -> Estimate:
    """A job still queued in the store, ``rank`` jobs of its model ahead of it in claim order.

    Ahead of it: the in-flight jobs of its model that have not started (at its priority or more
    urgent), then the queued ones. It completes after the in-flight backlog and the queued jobs
    ahead (each costed like itself) have shared the model's slots, plus its own run."""
    position = snapshot.waiting_to_start(model, priority) + rank
    costs = snapshot.models.get(model)
    own = costs.job_s(steps) if costs is not None else None
    if costs is None or own is None:
        return Estimate(position, None)
    slots = max(costs.slots, 1)
    return Estimate(position, snapshot.at + (costs.backlog_s + rank * own) / slots + own)


def poll_after_ms(completion_at: float | None, now: float, *, fallback_ms: int, min_ms: int, max_ms: int) -> int:
    """The ``openai-poll-after-ms`` hint: a quarter of the time left, within [min_ms, max_ms], so
    far-off jobs are polled rarely and nearly-done ones promptly; ``fallback_ms`` without an estimate."""
    if completion_at is None:
        return fallback_ms
    left_ms = max(completion_at - now, 0.0) * 1000
    return int(min(max(left_ms / 4, min_ms), max_ms))
