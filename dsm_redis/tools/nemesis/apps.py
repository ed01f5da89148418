"""The nemesis's Django app. It is installed only by ``python -m dsm_redis nemesis``, in its own database."""

from __future__ import annotations

from django.apps import AppConfig


class NemesisConfig(AppConfig):
    name = "dsm_redis.tools.nemesis"
    label = "dsm_redis_nemesis"
    verbose_name = "dsm_redis nemesis"
    default_auto_field = "django.db.models.BigAutoField"
