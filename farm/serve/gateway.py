"""The Serve ingress: the FastAPI gateway app, wired to the job store and the dispatcher.

CPU-only and torch-free: it imports neither the render stages nor diffusers.
"""

from __future__ import annotations

from ray import serve


@serve.deployment(max_ongoing_requests=200)
@serve.ingress()
class Gateway:
    def __init__(self, settings: dict, dispatcher) -> None:
        from farm.config import FarmSettings
        from farm.jobs.store import JobStore

        self.settings = FarmSettings.model_validate(settings)
        self.dispatcher = dispatcher
        self.store = JobStore(self.settings.job_store_url())
        self.store.migrate()

    def __serve_build_asgi_app__(self):
        from farm.api.app import GatewayDeps, create_app
        from farm.metrics import FarmMetrics
        from farm.storage.connect import open_store

        settings = self.settings

        def wake(_video_id: str) -> None:
            self.dispatcher.wake.remote()

        deps = GatewayDeps(
            store=self.store,
            objects=lambda: open_store(settings, start=False),
            models=settings.models,
            max_queued=settings.serve.max_queued,
            poll_after_ms=settings.serve.poll_after_ms,
            on_created=wake,
            metrics=FarmMetrics(),
        )
        return create_app(deps)
