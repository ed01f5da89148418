"""The demo's Django app. It is installed only by ``python -m dsm_redis demo``, in its own database."""

from __future__ import annotations

from django.apps import AppConfig


class DemoConfig(AppConfig):
    name = "dsm_redis.tools.demo"
    label = "dsm_redis_demo"
    verbose_name = "dsm_redis demo"
    default_auto_field = "django.db.models.BigAutoField"
