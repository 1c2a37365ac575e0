"""The Celery app: queue `cpu` for light work (validation, tokenization), queue `gpu` for training.

Start a worker with `celery -A tunehouse worker -Q cpu` (or `-Q gpu --concurrency 1` per accelerator).
"""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tunehouse.settings")

app = Celery(
    "tunehouse",
    include=[
        "workers.tasks.datasets",
        "workers.tasks.preparation",
        "workers.tasks.training",
        "workers.tasks.tuning",
        "workers.tasks.webhooks",
    ],
)
app.config_from_object("django.conf:settings", namespace="CELERY")
# Celery's "current app" is per thread; Django under ASGI runs views in worker threads, where `shared_task` would
# otherwise fall back to an unconfigured default app (and send tasks to amqp://localhost). Make ours the default.
app.set_default()
