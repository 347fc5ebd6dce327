"""Every metric the farm exports, defined in one place.

Metrics are Ray metrics (``ray.util.metrics``): each replica records its own, and
Ray's metrics agent serves all of them — every actor on every node — at one
Prometheus endpoint per node (``farm up`` sets its port; ``farm status`` prints
it). Ray prefixes every name with ``ray_``, so ``videofarm_jobs_completed_total``
is scraped as ``ray_videofarm_jobs_completed_total``.

Objects are created on first use inside a Ray process, never at import time.
"""

from __future__ import annotations

from functools import cached_property

# Buckets in seconds: shard and step latencies are milliseconds on GPUs, seconds on CPU.
_FAST = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
_SLOW = [0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800]
_BYTES = [1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9]


class FarmMetrics:
    """The farm's metric families; any stage uses the ones it records."""

    @cached_property
    def _m(self):
        from ray.util import metrics

        return metrics

    # Gateway ------------------------------------------------------------------------
    @cached_property
    def requests(self):
        return self._m.Histogram(
            "videofarm_http_request_seconds", description="Gateway request latency.",
            boundaries=_FAST, tag_keys=("method", "route", "status"),
        )

    @cached_property
    def jobs_created(self):
        return self._m.Counter(
            "videofarm_jobs_created_total", description="Jobs accepted by the gateway.", tag_keys=("model", "priority")
        )

    @cached_property
    def policy_refusals(self):
        # Refusals at create, before anything exists; failures while rendering are jobs_failed_total.
        return self._m.Counter(
            "videofarm_policy_refusals_total",
            description="Creates refused by the content policy, by rule, what it found (kind) and create path.",
            tag_keys=("rule", "kind", "path"),
        )

    def request_finished(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.observe(seconds, tags={"method": method, "route": route, "status": str(status)})

    def video_created(self, model: str, priority: str) -> None:
        self.jobs_created.inc(1, tags={"model": model, "priority": str(priority)})

    def video_refused(self, rule: str, kind: str, path: str) -> None:
        self.policy_refusals.inc(1, tags={"rule": rule, "kind": kind, "path": path})

    # Dispatcher ---------------------------------------------------------------------
    @cached_property
    def jobs_completed(self):
        return self._m.Counter("videofarm_jobs_completed_total", description="Jobs completed.", tag_keys=("model",))

    @cached_property
    def jobs_failed(self):
        return self._m.Counter(
            "videofarm_jobs_failed_total", description="Jobs failed, by error code.", tag_keys=("model", "reason")
        )

    @cached_property
    def queue_depth(self):
        return self._m.Gauge("videofarm_queue_depth", description="Queued jobs.", tag_keys=("priority",))

    @cached_property
    def queue_wait(self):
        return self._m.Histogram(
            "videofarm_queue_wait_seconds", description="Time from creation to first claim.",
            boundaries=_SLOW, tag_keys=("model", "priority"),
        )

    @cached_property
    def job_latency(self):
        return self._m.Histogram(
            "videofarm_job_seconds", description="End-to-end job latency, creation to completed.",
            boundaries=_SLOW, tag_keys=("model",),
        )

    @cached_property
    def shard_handoff(self):
        return self._m.Histogram(
            "videofarm_shard_handoff_seconds",
            description="Shard round trip minus compute: routing and moving the state through the object store.",
            boundaries=_FAST, tag_keys=("pool",),
        )

    @cached_property
    def replica_busy(self):
        return self._m.Counter(
            "videofarm_replica_busy_seconds_total",
            description="Seconds a replica held stage calls (the dispatcher's view), counted as each call ends.",
            tag_keys=("pool", "replica"),
        )

    # Denoiser pools -----------------------------------------------------------------
    @cached_property
    def shard_latency(self):
        return self._m.Histogram(
            "videofarm_shard_seconds", description="Compute time of one shard on a replica (of a whole batch, "
            "once, when shards ran batched).",
            boundaries=_SLOW, tag_keys=("pool",),
        )

    @cached_property
    def batch_size(self):
        return self._m.Histogram(
            "videofarm_batch_size", description="Shards a denoiser replica ran together in one batched loop "
            "(step-level batching; 1 when it ran one alone), counted once per shard.",
            boundaries=[1, 2, 3, 4, 6, 8, 12, 16, 32, 64], tag_keys=("pool",),
        )

    @cached_property
    def step_latency(self):
        return self._m.Histogram(
            "videofarm_step_seconds", description="Compute time of one denoising step (a batched shard's "
            "share of its batch's time).",
            boundaries=_FAST, tag_keys=("pool",),
        )

    @cached_property
    def cache_lookups(self):
        return self._m.Counter(
            "videofarm_cache_lookups_total",
            description="Denoiser transformer forwards that asked a cache hook whether to skip (farm.render.accel).",
            tag_keys=("model", "kind"),
        )

    @cached_property
    def cache_hits(self):
        return self._m.Counter(
            "videofarm_cache_hits_total",
            description="Denoiser transformer forwards whose remaining blocks a cache hook skipped, reusing cached "
            "residuals; hits / lookups is the hit rate.",
            tag_keys=("model", "kind"),
        )

    def cache_counted(self, model: str, kind: str, lookups: int, hits: int) -> None:
        """One shard's cache counts (nothing for a shard that ran without a cache)."""
        if lookups:
            tags = {"model": model, "kind": kind}
            self.cache_lookups.inc(lookups, tags=tags)
            if hits:
                self.cache_hits.inc(hits, tags=tags)

    # Usage (recorded by the dispatcher as each stage completes, once per job and stage) ---
    @cached_property
    def accelerator_seconds(self):
        return self._m.Counter(
            "videofarm_accelerator_seconds_total",
            description="Replica wall time of completed denoise shards, decodes and finishes, by tenant, pool, device.",
            tag_keys=("tenant", "pool", "device"),
        )

    # Decode pool and finisher ------------------------------------------------------------
    @cached_property
    def decode_latency(self):
        return self._m.Histogram(
            "videofarm_decode_seconds", description="VAE decode of one clip's latents into frames.",
            boundaries=_SLOW, tag_keys=("model",),
        )

    @cached_property
    def finish_latency(self):
        return self._m.Histogram(
            "videofarm_finish_seconds", description="Watermark, H.264 encode, thumbnail and C2PA signing of one clip.",
            boundaries=_SLOW, tag_keys=("model",),
        )

    @cached_property
    def upload_latency(self):
        return self._m.Histogram(
            "videofarm_upload_seconds", description="Upload of one clip's objects to S3.",
            boundaries=_FAST, tag_keys=("model",),
        )

    @cached_property
    def upload_bytes(self):
        return self._m.Counter(
            "videofarm_upload_bytes_total", description="Bytes uploaded to S3, by variant.", tag_keys=("variant",)
        )

    # S3 ---------------------------------------------------------------------------------
    @cached_property
    def storage_errors(self):
        return self._m.Counter(
            "videofarm_storage_errors_total",
            description="Transient S3 errors (unreachable, 5xx, throttled) that a storage call retried or gave up on.",
            tag_keys=("stage",),
        )

    # Expiry (the clip reaper, farm.jobs.reaper) ---------------------------------------------
    @cached_property
    def clips_reaped(self):
        return self._m.Counter(
            "videofarm_clips_reaped_total",
            description="Expired clips whose objects the reaper removed from S3 (their records are kept, marked expired).",
        )

    @cached_property
    def reaped_objects(self):
        return self._m.Counter(
            "videofarm_reaped_objects_total", description="S3 objects the reaper deleted (clip variants, records, checkpoints).",
        )

    @cached_property
    def reap_failures(self):
        return self._m.Counter(
            "videofarm_reap_failures_total",
            description="Expired clips whose objects could not be removed on a reaper turn (retried on the next turn).",
        )

    def clips_reaped_observe(self, reaped: int, objects: int, failed: int) -> None:
        for counter, value in ((self.clips_reaped, reaped), (self.reaped_objects, objects),
                               (self.reap_failures, failed)):
            if value > 0:  # Ray counters refuse non-positive increments
                counter.inc(value)

    # Webhooks -----------------------------------------------------------------------------
    @cached_property
    def webhook_backlog(self):
        return self._m.Gauge(
            "videofarm_webhook_backlog",
            description="Webhook deliveries due now and not yet being sent (pending, attempt time passed, endpoint enabled).",
        )
