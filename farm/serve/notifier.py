"""The Serve deployment that delivers webhooks: one loop draining the outbox the job store fills.

Separate from the dispatcher so a slow or failing receiver never delays rendering; safe to run
more than one replica (deliveries are claimed under a lease).
"""

from __future__ import annotations

import asyncio
import logging

from ray import serve

from farm.serve.loopback import bind_replica_grpc_to_node_address

log = logging.getLogger(__name__)
# Ray exports metrics every 10 s: counting the backlog more often than this would be unseen work.
BACKLOG_EVERY_S = 5.0


@serve.deployment(num_replicas=1, max_ongoing_requests=4)
class Notifier:
    def __init__(self, settings: dict) -> None:
        bind_replica_grpc_to_node_address()
        from farm.config import FarmSettings
        from farm.db import Database
        from farm.jobs.store import JobStore
        from farm.metrics import FarmMetrics
        from farm.webhooks.deliverer import WebhookDeliverer
        from farm.webhooks.store import WebhookStore

        self.settings = FarmSettings.model_validate(settings)
        db = Database(self.settings.job_store_url())  # one engine for both stores
        db.migrate()
        self.webhooks = WebhookStore(db)
        self.deliverer = WebhookDeliverer(self.webhooks, JobStore(db), self.settings.webhooks)
        self.metrics = FarmMetrics()
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self.deliverer.run())
        self._backlog_task = loop.create_task(self._report_backlog())

    async def _report_backlog(self) -> None:
        """Set the webhook-backlog gauge every BACKLOG_EVERY_S (what the backlog alert watches)."""
        while True:
            try:
                self.metrics.webhook_backlog.set(await asyncio.to_thread(self.webhooks.backlog))
            except Exception:  # the database blinked: try again next time
                log.exception("could not count the webhook backlog")
            await asyncio.sleep(BACKLOG_EVERY_S)

    def wake(self) -> None:
        self.deliverer.wake()

    async def __del__(self) -> None:  # Serve calls this on graceful replica shutdown
        self.deliverer.stop()
        self._backlog_task.cancel()
        await asyncio.gather(self._task, self._backlog_task, return_exceptions=True)
