"""The Celery app: ``celery -A shop worker``. Its configuration is the ``CELERY_*`` settings."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shop.settings")

app = Celery("shop")
app.config_from_object("django.conf:settings", namespace="CELERY")
# Finds shop.tasks and dsm_redis.tasks (the task behind async_transition_to / as_task=True).
app.autodiscover_tasks()
