"""Django system checks for ``DSM_REDIS`` (``manage.py check``).

=================  =========================================================================
``dsm_redis.E001``  a value has the wrong type or is out of range (``TTL <= 0``, ...)
``dsm_redis.E002``  an unknown key (usually a typo: the hint names the closest known key)
``dsm_redis.E003``  ``BACKEND`` cannot be imported
``dsm_redis.E004``  ``BACKEND`` is not a ``dsm_redis.backends.LockBackend`` subclass
``dsm_redis.E005``  ``LOCATION`` is unusable for the Redis backend (URL scheme, unknown ``CACHES``
                    alias, a cache that is not a Redis cache, a Sentinel URL without a service)
``dsm_redis.E006``  a ``FencingTokenField`` on a multi-table-inheritance child (the mark belongs to
                    the root model's row)
``dsm_redis.W001``  ``LocalLockBackend`` with ``DEBUG = False``: it excludes the threads of one
                    process only, not gunicorn or Celery worker processes
``dsm_redis.W002``  ``ActorMiddleware`` in ``MIDDLEWARE`` before Django's ``AuthenticationMiddleware``,
                    or without it: the request has no user yet, and no transition records an actor
``dsm_redis.W101``  Celery: ``AUTO_RENEW`` is off and a task time limit is unset or longer than the
                    lease ``TTL`` (a locked task may outlive its lease; its commit is refused)
``dsm_redis.W102``  Celery: the Redis broker's ``visibility_timeout`` is shorter than a task time
                    limit (a running ``acks_late`` task is delivered again while it runs)
=================  =========================================================================

The W1xx checks run only when the project has imported Celery (its app module), against the
current Celery app; a worker also logs them when it is ready (``dsm_redis.tasks``).

E001, E002 and E005 for the setting's own values are the ids ``conf.validate()`` gives its
problems; E003 and E004 (importing ``BACKEND``), the ``CACHES`` alias of E005, E006, W001, W002 and
the W1xx are found here. The E001-E005 problems also raise ``ImproperlyConfigured`` with the same message at first use (a
transition, ``object_lock``, a locked task), in processes that run no checks: Celery workers (they
run them but discard the result), scripts. Not when the app is ready, which would pre-empt these
checks. Messages never echo a ``LOCATION`` URL (it may carry a password).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from django.conf import settings
from django.core import checks
from django.utils.module_loading import import_string

from .conf import BAD_LOCATION, DEFAULT_BACKEND, OPTIONS, SETTING, TOP_LEVEL_KEYS, UNKNOWN, Problem, validate

HINT = "See the configuration reference (DSM_REDIS) in dsm_redis's README."
REDIS_CACHES = frozenset({"django.core.cache.backends.redis.RedisCache", "django_redis.cache.RedisCache"})


@checks.register("dsm_redis")
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    raw = getattr(settings, SETTING, None)
    messages: list[checks.CheckMessage] = [_error(problem) for problem in validate(raw)]
    if not isinstance(raw, Mapping):
        raw = {}
    path = raw.get("BACKEND", DEFAULT_BACKEND)
    if not (isinstance(path, str) and "." in path):
        return messages  # already reported as E001
    backend = _backend_class(path, messages)
    if backend is None:
        return messages
    from .backends.local import LocalLockBackend
    from .backends.redis import RedisLockBackend

    location = raw.get("LOCATION")
    if (
        issubclass(backend, RedisLockBackend)
        and isinstance(location, str)
        and location.startswith("cache:")
        and location[6:]
    ):
        messages += _check_cache_alias(location[len("cache:") :])
    if issubclass(backend, LocalLockBackend) and not settings.DEBUG:
        messages.append(
            checks.Warning(
                "DSM_REDIS uses LocalLockBackend with DEBUG = False: it excludes threads of one process "
                "only, not gunicorn or Celery worker processes, which would run transitions of one "
                "object concurrently.",
                hint="Use dsm_redis.backends.redis.RedisLockBackend in production (or silence "
                "dsm_redis.W001 in SILENCED_SYSTEM_CHECKS for a single-process deployment).",
                id="dsm_redis.W001",
            )
        )
    return messages


def _error(problem: Problem) -> checks.CheckMessage:
    hint = HINT
    if problem.check_id == UNKNOWN:
        close = difflib.get_close_matches(str(problem.key).upper(), sorted(TOP_LEVEL_KEYS | set(OPTIONS)), n=1)
        hint = f"Did you mean {close[0]!r}? {HINT}" if close else HINT
    elif problem.check_id == BAD_LOCATION:
        hint = (
            "For example redis://:password@host:6379/0, rediss://..., unix:///path/redis.sock, "
            "redis+cluster://host:7000/0 (one node of a Redis Cluster), "
            "redis+sentinel://:password@host1:26379,host2:26379/mymaster/0 (a Sentinel service), "
            "or cache:default. " + HINT
        )
    return checks.Error(problem.message, hint=hint, id=problem.check_id)


def _backend_class(path: str, messages: list[checks.CheckMessage]) -> type | None:
    from .backends import LockBackend

    try:
        backend = import_string(path)
    except Exception as exc:  # noqa: BLE001 - ImportError, or whatever the module raised on import
        messages.append(
            checks.Error(
                f"DSM_REDIS['BACKEND'] {path!r} cannot be imported: {type(exc).__name__}: {exc}",
                hint="The default is dsm_redis.backends.redis.RedisLockBackend; "
                "dsm_redis.backends.local.LocalLockBackend is the in-process one. " + HINT,
                id="dsm_redis.E003",
            )
        )
        return None
    if not (isinstance(backend, type) and issubclass(backend, LockBackend)):
        messages.append(
            checks.Error(
                f"DSM_REDIS['BACKEND'] {path!r} is not a dsm_redis.backends.LockBackend subclass",
                hint="A custom backend subclasses dsm_redis.backends.LockBackend and implements "
                "acquire, renew, release, reanchor and describe. " + HINT,
                id="dsm_redis.E004",
            )
        )
        return None
    return backend


def _check_cache_alias(alias: str) -> list[checks.CheckMessage]:
    caches = getattr(settings, "CACHES", {}) or {}
    if alias not in caches:
        return [
            checks.Error(
                f"DSM_REDIS['LOCATION'] names the cache alias {alias!r}, which is not in CACHES "
                f"(aliases: {', '.join(map(repr, caches)) or 'none'})",
                hint=HINT,
                id=BAD_LOCATION,
            )
        ]
    path = (caches[alias] or {}).get("BACKEND", "")
    try:
        cache_class = import_string(path)
        names = {f"{c.__module__}.{c.__qualname__}" for c in cache_class.__mro__}
    except Exception:  # noqa: BLE001 - Django's own cache checks report an unimportable cache
        names = set()
    if names & REDIS_CACHES:
        return []
    return [
        checks.Error(
            f"DSM_REDIS['LOCATION'] names CACHES[{alias!r}], whose BACKEND {path!r} is not a Redis cache",
            hint="Point it at a django.core.cache.backends.redis.RedisCache or "
            "django_redis.cache.RedisCache alias (dsm_redis borrows its redis-py client), or give a "
            "redis:// URL. " + HINT,
            id=BAD_LOCATION,
        )
    ]


@checks.register("dsm_redis")
def check_celery(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Celery's own timeouts against the lease; only when the project uses Celery."""
    import sys

    if sys.modules.get("celery") is None:  # the project does not use Celery (or it is not installed)
        return []
    from celery import current_app

    return celery_timeout_warnings(current_app)


def celery_timeout_warnings(app: Any) -> list[checks.CheckMessage]:
    """W101/W102 for a Celery app: its ``task_time_limit`` and the time limits of its locked tasks."""
    from django.core.exceptions import ImproperlyConfigured

    from .conf import get_config

    try:
        config = get_config()
    except ImproperlyConfigured:
        return []  # reported as E00x
    conf = app.conf
    limits: list[tuple[str, Any, float]] = [("task_time_limit", conf.task_time_limit, config.ttl)]
    if app.finalized:  # never import the project's task modules just to check them
        for name, task in sorted(app.tasks.items()):
            locked = getattr(getattr(task, "run", None), "_dsm_locked", None)
            # (a task's time_limit defaults to task_time_limit: report only its own)
            if locked is not None and task.time_limit not in (None, conf.task_time_limit):
                limits.append((f"{name}.time_limit", task.time_limit, locked.get("ttl") or config.ttl))
    messages: list[checks.CheckMessage] = []
    if not config.auto_renew:
        for what, limit, ttl in limits:
            if limit is None or limit > ttl:
                messages.append(
                    checks.Warning(
                        f"DSM_REDIS['OPTIONS']['AUTO_RENEW'] is False, and Celery's {what} "
                        + ("is unset" if limit is None else f"({limit}s) is longer than the lease TTL ({ttl}s)")
                        + ": a locked task that runs past its TTL loses its lease, and its work is refused at commit.",
                        hint="Turn AUTO_RENEW on, or give such tasks a time limit no longer than the TTL "
                        "(or a locked_task(ttl=...) that covers it).",
                        id="dsm_redis.W101",
                    )
                )
    visibility = _redis_visibility_timeout(conf)
    for what, limit, _ in limits:
        if visibility is not None and limit is not None and visibility < limit:
            messages.append(
                checks.Warning(
                    f"Celery's Redis broker redelivers an unacknowledged message after its visibility_timeout "
                    f"({visibility}s), which is shorter than {what} ({limit}s): an acks_late task still running "
                    "then is delivered again. The lease keeps the copy from running beside it, but the copy "
                    "runs the task a second time afterwards.",
                    hint="Set CELERY_BROKER_TRANSPORT_OPTIONS = {'visibility_timeout': ...} above the longest "
                    "task time limit (and above the longest countdown or ETA you use).",
                    id="dsm_redis.W102",
                )
            )
    return messages


def _redis_visibility_timeout(conf: Any) -> float | None:
    """The broker's visibility timeout when it is Redis (kombu's default: one hour), else None."""
    url = conf.broker_read_url or conf.broker_url
    if isinstance(url, (list, tuple)):
        url = url[0] if url else None
    if not isinstance(url, str):
        return None
    scheme = url.split(";")[0].partition("://")[0].lower()
    if not (scheme.startswith(("redis", "rediss")) or scheme in ("sentinel", "socket")):
        return None
    options = conf.broker_transport_options or {}
    return float(options.get("visibility_timeout", 3600))


@checks.register("dsm_redis")
def check_fencing_fields(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    from django.apps import apps

    configs = app_configs if app_configs is not None else apps.get_app_configs()
    return misplaced_fencing_fields(model for config in configs for model in config.get_models())


def misplaced_fencing_fields(models: Any) -> list[checks.CheckMessage]:
    """A FencingTokenField below the root of a multi-table inheritance chain would be ignored."""
    from .fence import FencingTokenField
    from .keys import root_model

    errors: list[checks.CheckMessage] = []
    for model in models:
        root = root_model(model)
        for field in model._meta.local_concrete_fields:
            if isinstance(field, FencingTokenField) and root is not model._meta.concrete_model:
                errors.append(
                    checks.Error(
                        f"{model._meta.label}.{field.name}: a FencingTokenField on a multi-table-inheritance "
                        f"child is not used; the row's lease and mark belong to its root model {root._meta.label}",
                        hint=f"Declare the FencingTokenField on {root._meta.label}.",
                        obj=model,
                        id="dsm_redis.E006",
                    )
                )
    return errors


ACTOR_MIDDLEWARE = "dsm_redis.middleware.ActorMiddleware"
AUTH_MIDDLEWARE = "django.contrib.auth.middleware.AuthenticationMiddleware"


@checks.register("dsm_redis")
def check_actor_middleware(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """``ActorMiddleware`` reads ``request.user``, which ``AuthenticationMiddleware`` sets: placed
    before it (or without it) every request records no actor, silently."""
    middleware = list(getattr(settings, "MIDDLEWARE", None) or [])
    if ACTOR_MIDDLEWARE not in middleware:
        return []
    if AUTH_MIDDLEWARE in middleware and middleware.index(AUTH_MIDDLEWARE) < middleware.index(ACTOR_MIDDLEWARE):
        return []
    where = "before" if AUTH_MIDDLEWARE in middleware else "without"
    return [
        checks.Warning(
            f"{ACTOR_MIDDLEWARE} is in MIDDLEWARE {where} {AUTH_MIDDLEWARE}: requests have no user when it "
            f"runs, so the transitions they make record no actor.",
            hint=f"List {ACTOR_MIDDLEWARE} after {AUTH_MIDDLEWARE}.",
            id="dsm_redis.W002",
        )
    ]
