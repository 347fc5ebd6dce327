"""The Serve ingress: the FastAPI gateway app, wired to the job store and the dispatcher.

CPU-only and torch-free: it imports neither the render stages nor diffusers.
"""

from __future__ import annotations

from ray import serve

from farm.serve.loopback import bind_replica_grpc_to_node_address


@serve.deployment(max_ongoing_requests=200)
@serve.ingress()
class Gateway:
    def __init__(self, settings: dict, dispatcher, notifier=None) -> None:
        bind_replica_grpc_to_node_address()
        from farm.config import FarmSettings
        from farm.db import Database
        from farm.jobs.store import JobStore

        self.settings = FarmSettings.model_validate(settings)
        self.dispatcher = dispatcher
        self.notifier = notifier  # the webhook deliverer; bound here so it is part of the application
        # One engine (one connection pool) for the jobs, accounts and webhooks this replica reads.
        self.db = Database(self.settings.job_store_url())
        self.db.migrate()
        self.store = JobStore(self.db)

    async def _queue_snapshot(self):
        """The dispatcher's queue snapshot (``farm.jobs.estimates.QueueSnapshot``), over its handle."""
        return await self.dispatcher.snapshot.remote()

    def __serve_build_asgi_app__(self):
        from farm.accounts.admin import resolve_admin_key
        from farm.accounts.store import AccountStore
        from farm.api.app import GatewayDeps, create_app
        from farm.api.auth import GatewayAuth
        from farm.api.queue_view import QueueView
        from farm.secrets import SharedSecrets
        from farm.api.uploads import UploadLimits
        from farm.api.image_refs import ImageFetch
        from farm.jobs.batches import BatchStore
        from farm.jobs.expiry import Lifetimes
        from farm.jobs.schedules import ScheduleStore
        from farm.webhooks.store import WebhookStore
        from farm.metrics import FarmMetrics
        from farm.policy.index import RegistryCache
        from farm.policy.cameos import CharacterStore
        from farm.policy.moderation import build_moderator
        from farm.policy.registry import PolicyStore
        from farm.storage.connect import open_store

        settings = self.settings

        def wake(_video_id: str) -> None:
            self.dispatcher.wake.remote()

        ss = settings.serve
        configured = settings.auth.admin_key.get_secret_value() if settings.auth.admin_key else None
        limits_url = None
        if ss.shared_limits:
            from farm.redis_server import EmbeddedRedis

            limits_url = ss.redis_url.get_secret_value() if ss.redis_url else EmbeddedRedis(settings.redis_dir).url()
            if limits_url is None:
                raise RuntimeError(f"serve.rate_limit_store needs Redis and none runs for {settings.state_dir} "
                                   "(`farm up` starts one) and serve.redis_url is unset")
        auth = GatewayAuth(AccountStore(self.db),
                           resolve_admin_key(settings.state_dir, configured, SharedSecrets(self.db)),
                           rate_limit=ss.rate_limit,
                           anonymous_rate_limit=ss.anonymous_rate_limit, link_rate_limit=ss.link_rate_limit,
                           key_cache_s=ss.key_cache_s,
                           revocation_check_s=ss.revocation_check_s, limits_url=limits_url)
        registry = RegistryCache(PolicyStore(self.db), refresh_s=settings.policy.refresh_s)
        characters = CharacterStore(self.db)
        deps = GatewayDeps(
            store=self.store,
            objects=lambda: open_store(settings, start=False),
            models=settings.models,
            aliases=settings.model_aliases,
            max_queued=ss.max_queued,
            max_queued_per_account=ss.max_queued_per_account,
            poll_after_ms=ss.poll_after_ms,
            poll_after_min_ms=ss.poll_after_min_ms,
            poll_after_max_ms=ss.poll_after_max_ms,
            queue=QueueView(self.store, self._queue_snapshot, ttl_s=ss.queue_view_s),
            events_tick_s=ss.events_tick_s,
            event_stream_max_s=ss.event_stream_max_s,
            on_created=wake,
            auth=auth,
            invite_ttl_s=settings.auth.invite_ttl_s,
            webhooks=WebhookStore(self.db),
            webhook_settings=settings.webhooks,
            metrics=FarmMetrics(),
            batches=BatchStore(self.db), schedules=ScheduleStore(self.db), batch_settings=settings.batches,
            max_prompt_chars=ss.max_prompt_chars,
            budgets=settings.budgets.rule(),
            lifetimes=Lifetimes(self.db, settings.expiry.rule()),
            content_redirect_s=ss.content_redirect_s if ss.content_redirect else None,
            moderator=build_moderator(settings.policy, registry, characters),
            policy_registry=registry,
            characters=characters,
            cameo_limits=settings.cameos.limits(),
            max_body_bytes=int(ss.max_body_mb * 1024 * 1024),
            upload_limits=UploadLimits(max_bytes=int(ss.max_upload_mb * 1024 * 1024),
                                       max_pixels=ss.max_upload_pixels),
            image_fetch=ImageFetch(allow_hosts=tuple(ss.image_url_allow_hosts),
                                   max_bytes=int(ss.image_url_max_mb * 1024 * 1024), timeout_s=ss.image_url_timeout_s),
        )
        return create_app(deps)
