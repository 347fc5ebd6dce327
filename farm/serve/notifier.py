"""The Serve deployment that delivers webhooks: one loop draining the outbox the job store fills.

Separate from the dispatcher so a slow or failing receiver never delays rendering; safe to run
more than one replica (deliveries are claimed under a lease).
"""

from __future__ import annotations

import asyncio

from ray import serve

from farm.serve.loopback import bind_replica_grpc_to_node_address


@serve.deployment(num_replicas=1, max_ongoing_requests=4)
class Notifier:
    def __init__(self, settings: dict) -> None:
        bind_replica_grpc_to_node_address()
        from farm.config import FarmSettings
        from farm.db import Database
        from farm.jobs.store import JobStore
        from farm.webhooks.deliverer import WebhookDeliverer
        from farm.webhooks.store import WebhookStore

        self.settings = FarmSettings.model_validate(settings)
        db = Database(self.settings.job_store_url())  # one engine for both stores
        db.migrate()
        self.deliverer = WebhookDeliverer(WebhookStore(db), JobStore(db), self.settings.webhooks)
        self._task = asyncio.get_running_loop().create_task(self.deliverer.run())

    def wake(self) -> None:
        self.deliverer.wake()

    async def __del__(self) -> None:  # Serve calls this on graceful replica shutdown
        self.deliverer.stop()
        await asyncio.gather(self._task, return_exceptions=True)
