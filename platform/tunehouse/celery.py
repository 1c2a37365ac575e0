"""The Celery app: queue `cpu` for light work (validation, tokenization), queue `gpu` for training.

Start a worker with `celery -A tunehouse worker -Q cpu` (or `-Q gpu --concurrency 1` per accelerator).
"""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tunehouse.settings")

app = Celery("tunehouse", include=["workers.tasks.datasets", "workers.tasks.training"])
app.config_from_object("django.conf:settings", namespace="CELERY")
