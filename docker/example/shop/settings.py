"""Settings of the example deployment, read from the environment (see ../../compose.yaml).

Everything that differs between machines comes from environment variables; the defaults are the
compose file's service names. Nothing here is specific to Docker: the same settings run on a
laptop with ``POSTGRES_HOST=/path/to/socket/dir DSM_REDIS_URL=redis://127.0.0.1:6379/0``.
"""

import os


def env(name: str, default: str) -> str:
    return os.environ.get(name, default)


SECRET_KEY = env("DJANGO_SECRET_KEY", "example-only-change-me-" + "x" * 40)
DEBUG = env("DJANGO_DEBUG", "0") == "1"
ALLOWED_HOSTS = env("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1,web").split(",")

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "dsm_redis",
    "dsm_redis.tools.demo",  # the demo's Subscription model and its state machine
    "shop",
]
MIDDLEWARE = ["django.middleware.common.CommonMiddleware"]
ROOT_URLCONF = "shop.urls"
WSGI_APPLICATION = "shop.wsgi.application"
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": env("POSTGRES_HOST", "postgres"),  # a host name, or a unix socket directory
        "PORT": env("POSTGRES_PORT", "5432"),
        "NAME": env("POSTGRES_DB", "shop"),
        "USER": env("POSTGRES_USER", "shop"),
        "PASSWORD": env("POSTGRES_PASSWORD", "shop"),
        "CONN_MAX_AGE": 60,
        "CONN_HEALTH_CHECKS": True,
    }
}

# The lease backend: one Redis for every gunicorn and Celery worker process. The password, if
# any, goes in the URL (redis://:password@redis:6379/0); dsm_redis never logs the URL.
DSM_REDIS = {
    "BACKEND": "dsm_redis.backends.redis.RedisLockBackend",
    "LOCATION": env("DSM_REDIS_URL", "redis://redis:6379/0"),
    "OPTIONS": {
        "TTL": 30,  # renewed every TTL/3 while a transition or a locked task runs
        "ACQUIRE_TIMEOUT": 10,  # a request waits at most this long for a busy object (then 503)
        "KEY_PREFIX": "shop",
    },
}

# Celery: the broker is the same Redis, another database. Locked tasks ack late; the visibility
# timeout exceeds the task time limit (manage.py check warns otherwise: dsm_redis.W102).
CELERY_BROKER_URL = env("CELERY_BROKER_URL", "redis://redis:6379/1")
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 3600}
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_TIME_LIMIT = 300
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {
        # INFO shows what operators care about; DEBUG adds waits and renewals, WARNING is quiet.
        "dsm_redis": {"handlers": ["console"], "level": env("DSM_REDIS_LOG_LEVEL", "INFO"), "propagate": False},
    },
}
