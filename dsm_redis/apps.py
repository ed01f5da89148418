from __future__ import annotations

from django.apps import AppConfig


class DsmRedisConfig(AppConfig):
    name = "dsm_redis"
    label = "dsm_redis"
    verbose_name = "dsm_redis state machines"
    default_auto_field = "django.db.models.AutoField"

    def ready(self) -> None:
        from . import checks  # noqa: F401  (registers the system checks)
        from .backends import load_backend_class
        from .conf import get_config

        # Fatal misconfiguration stops every process at start-up, Celery workers included: they
        # never run the system checks.
        load_backend_class(get_config().backend)
