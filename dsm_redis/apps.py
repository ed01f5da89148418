"""The Django app: registers the system checks (``checks.py``) when Django is ready; validates nothing itself."""

from __future__ import annotations

from django.apps import AppConfig


class DsmRedisConfig(AppConfig):
    name = "dsm_redis"
    label = "dsm_redis"
    verbose_name = "dsm_redis state machines"
    default_auto_field = "django.db.models.AutoField"

    def ready(self) -> None:
        # Registers the system checks, and validates nothing itself: as for Django's own settings, a
        # broken DSM_REDIS is reported by the checks (manage.py check, runserver, migrate: every
        # problem with its id and hint), which raising here would pre-empt. A process that runs no
        # checks (a Celery worker, a script) gets ImproperlyConfigured with the same message at first
        # use: conf.get_config() and backends.get_backend() raise it.
        from . import checks  # noqa: F401
