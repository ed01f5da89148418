"""Settings for the test suite.

They start no server: the Redis and PostgreSQL URLs come from ``DSM_TEST_REDIS_URL`` and
``DSM_TEST_DATABASE_URL``. Under pytest both are set before this module is imported, by the early
plugins setup.cfg enables: ``dsm_redis.tools.pytest_plugin`` (Redis) and ``tests.postgres_plugin``
(PostgreSQL) start servers unless the variables already name servers you run. Worker processes
spawned by the tests inherit them.
"""

from __future__ import annotations

import os
import tempfile

from django.core.exceptions import ImproperlyConfigured

from dsm_redis.tools.servers import database_settings_from_url


def _url(name: str) -> str:
    try:
        return os.environ[name]
    except KeyError:
        raise ImproperlyConfigured(
            f"{name} is not set: run the suite with pytest (setup.cfg enables the plugins that start the "
            "servers), or set it to a server you run"
        ) from None


REDIS_URL = _url("DSM_TEST_REDIS_URL")
_default = database_settings_from_url(_url("DSM_TEST_DATABASE_URL"))
# Worker processes connect to the test database pytest-django created, not to the base one.
if os.environ.get("DSM_TEST_DB_NAME"):
    _default["NAME"] = os.environ["DSM_TEST_DB_NAME"]
_default["TEST"] = {"NAME": os.environ.get("DSM_TEST_DB_NAME") or f"test_dsm_{os.getpid()}"}

SECRET_KEY = "tests"
DEBUG = True
USE_TZ = True
TIME_ZONE = "UTC"
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    # The admin of tests/testapp/admin.py (test_admin.py, test_admin_browser.py): sessions live in
    # signed cookies, so django.contrib.sessions adds no table.
    "django.contrib.auth",
    "django.contrib.messages",
    "django.contrib.admin",
    "django.contrib.staticfiles",  # the admin's styles in test_admin_browser.py's live server
    "dsm_redis",
    "tests.testapp",
]
ROOT_URLCONF = "tests.urls"
SESSION_ENGINE = "django.contrib.sessions.backends.signed_cookies"
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "dsm_redis.middleware.ActorMiddleware",
]
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
STATIC_URL = "/static/"
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
