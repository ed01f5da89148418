"""``settings.configure`` for the bench process and for every spawned worker (same values)."""

from __future__ import annotations

from typing import Any


def configure(database: dict[str, Any], redis_url: str, run_id: str) -> None:
    import django
    from django.conf import settings

    if settings.configured:
        return
    settings.configure(
        DEBUG=False,
        SECRET_KEY="bench",
        USE_TZ=True,
        TIME_ZONE="UTC",
        INSTALLED_APPS=["django.contrib.contenttypes", "dsm_redis", "django_logic", "bench.benchapp"],
        DATABASES={"default": database},
        # django-logic's state lock goes through the default cache: Django's own RedisCache, as
        # its README says, on the same Redis as dsm_redis's leases.
        CACHES={
            "default": {
                "BACKEND": "django.core.cache.backends.redis.RedisCache",
                "LOCATION": redis_url,
                "KEY_PREFIX": f"bench-{run_id}",
            }
        },
        DSM_REDIS={
            "LOCATION": redis_url,
            # Defaults (TTL 30 s, auto-renew on) except the acquire timeout: 8 processes queue on
            # one hot object, and a LockTimeout would be counted as a failed call, not retried.
            "OPTIONS": {"KEY_PREFIX": f"bench-{run_id}", "ACQUIRE_TIMEOUT": 60},
        },
        DEFAULT_AUTO_FIELD="django.db.models.AutoField",
        LOGGING_CONFIG=None,
    )
    django.setup()
    # django-logic logs every step at INFO through its own logger; nothing is configured to
    # print it (LOGGING_CONFIG=None), as in a deployment that keeps INFO off.
