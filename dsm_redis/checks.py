"""Django system checks for ``DSM_REDIS`` (``manage.py check``)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core import checks

from .conf import SETTING, validate


@checks.register("dsm_redis")
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    raw = getattr(settings, SETTING, None)
    errors: list[checks.CheckMessage] = [
        checks.Error(problem, hint="See the configuration reference in dsm_redis's README.", id="dsm_redis.E001")
        for problem in validate(raw)
    ]
    if errors:
        return errors
    backend = (raw or {}).get("BACKEND", "")
    if backend.endswith("LocalLockBackend") and not settings.DEBUG:
        errors.append(
            checks.Warning(
                "DSM_REDIS uses LocalLockBackend with DEBUG = False: it excludes threads of one process "
                "only, not gunicorn or Celery worker processes.",
                hint="Use dsm_redis.backends.redis.RedisLockBackend in production.",
                id="dsm_redis.W001",
            )
        )
    return errors
