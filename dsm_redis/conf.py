"""The ``DSM_REDIS`` setting: parsed and validated strictly, in this one place.

``validate()`` lists every problem at once; the system checks in ``checks.py`` turn them into
``manage.py check`` errors with ids (so do runserver, migrate and every command that runs the checks).
``get_config()`` returns a frozen :class:`Config` or raises ``ImproperlyConfigured`` naming the
offending keys; it runs at first use (a transition, ``object_lock``, a locked task), so a process that
runs no checks (a Celery worker, a script) fails there with the same messages. The app's ``ready()``
does not validate: raising there would keep ``manage.py check`` from ever showing the ids.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed

SETTING = "DSM_REDIS"
DEFAULT_BACKEND = "dsm_redis.backends.redis.RedisLockBackend"
DEFAULT_LOCATION = "redis://127.0.0.1:6379/0"
TOP_LEVEL_KEYS = frozenset({"BACKEND", "LOCATION", "OPTIONS"})


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive(value: Any) -> str | None:
    return None if _number(value) and value > 0 else "must be a number > 0"


def _non_negative_or_none(value: Any) -> str | None:
    if value is None or (_number(value) and value >= 0):
        return None
    return "must be a number >= 0, or None to wait forever"


def _positive_or_none(value: Any) -> str | None:
    return None if value is None else _positive(value)


def _bool(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be True or False"


def _prefix(value: Any) -> str | None:
    if isinstance(value, str) and value and not any(c in value for c in "{} "):
        return None
    return "must be a non-empty string without braces or spaces (braces would break the hash tag)"


class Problem(str):
    """One problem ``validate()`` found: a message (a ``str``), tagged with its class for the system
    checks' ids: ``"invalid"`` (a wrong type or value), ``"unknown"`` (an unknown key, ``.key``) or
    ``"location"`` (a ``LOCATION`` the Redis backend cannot use)."""

    kind: str = "invalid"
    key: str | None = None

    def __new__(cls, message: str, kind: str = "invalid", key: str | None = None) -> Problem:
        problem = super().__new__(cls, message)
        problem.kind, problem.key = kind, key
        return problem


LOCATION_SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")


def _location(value: str) -> str | None:
    """What is wrong with a string ``LOCATION`` for the Redis backend. Never echoes the value: a URL
    may carry a password."""
    if value.startswith("cache:"):
        return None if value[len("cache:") :] else "names no CACHES alias after 'cache:'"
    scheme, sep, _ = value.partition("://")
    if sep and scheme.lower() in LOCATION_SCHEMES:
        return None
    shown = f"scheme {scheme!r}" if sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]{0,19}", scheme) else "no URL scheme"
    return f"must be a {'://, '.join(LOCATION_SCHEMES)}:// URL or 'cache:<alias>' (it has {shown})"


_USERINFO = re.compile(r"^(?P<head>[^/?#@]*?//)?[^/?#@]*@")
_QUERY_SECRET = re.compile(r"(?i)(?P<head>[?&](?:password|username)=)[^&#]*")


def redact(url: str) -> str:
    """``url`` with its user and password (``user:pw@`` and ``?password=``) replaced by ``***``."""
    url = _USERINFO.sub(lambda m: f"{m['head'] or ''}***@", str(url), count=1)
    return _QUERY_SECRET.sub(lambda m: f"{m['head']}***", url)


class SecretLocation(str):
    """A ``LOCATION`` URL whose ``repr()`` hides its credentials.

    It is still the URL for everything else (``str()``, formatting, ``redis.from_url``), so a backend
    uses it as a plain string; only ``repr()``, which ``repr(config)``, tracebacks with their frames'
    locals (Sentry, Rollbar, Django's debug page) and ``%r`` use, shows ``redis://***@host:6379/0``.
    The pieces ``partition()`` splits off it hide theirs too (``":pw@host"`` is still a secret).
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return repr(redact(self))

    def partition(self, sep: str, /) -> tuple[str, str, str]:
        return tuple(SecretLocation(part) for part in super().partition(sep))  # type: ignore[return-value]

    def rpartition(self, sep: str, /) -> tuple[str, str, str]:
        return tuple(SecretLocation(part) for part in super().rpartition(sep))  # type: ignore[return-value]


# key -> (default, validator). A validator returns None or what is wrong with the value.
OPTIONS: dict[str, tuple[Any, Callable[[Any], str | None]]] = {
    "TTL": (30.0, _positive),
    "AUTO_RENEW": (True, _bool),
    "ACQUIRE_TIMEOUT": (10.0, _non_negative_or_none),
    "ROW_LOCK_TIMEOUT": (None, _positive_or_none),
    "KEY_PREFIX": ("dsm", _prefix),
    "SOCKET_TIMEOUT": (5.0, _positive),
    "SOCKET_CONNECT_TIMEOUT": (2.0, _positive),
}


@dataclass(frozen=True)
class Config:
    backend: str = DEFAULT_BACKEND
    location: Any = DEFAULT_LOCATION
    ttl: float = 30.0
    auto_renew: bool = True
    acquire_timeout: float | None = 10.0
    # None: bounded by acquire_timeout (or unbounded when that is None too).
    row_lock_timeout: float | None = None
    key_prefix: str = "dsm"
    socket_timeout: float = 5.0
    socket_connect_timeout: float = 2.0
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # The URL may carry a password: every repr of the config (and of a traceback's locals that
        # hold it) shows it redacted.
        if isinstance(self.location, str) and not isinstance(self.location, SecretLocation):
            object.__setattr__(self, "location", SecretLocation(self.location))

    @property
    def effective_row_lock_timeout(self) -> float | None:
        return self.row_lock_timeout if self.row_lock_timeout is not None else self.acquire_timeout


def validate(raw: Any) -> list[str]:
    """Every problem with a ``DSM_REDIS`` value, as messages naming the key; empty when valid."""
    if raw is None:
        return []
    if not isinstance(raw, Mapping):
        return [f"{SETTING} must be a dict, not {type(raw).__name__}"]
    problems: list[str] = [
        Problem(f"{SETTING} has an unknown key {key!r} (known: {', '.join(sorted(TOP_LEVEL_KEYS))})", "unknown", key)
        for key in raw
        if key not in TOP_LEVEL_KEYS
    ]
    backend = raw.get("BACKEND", DEFAULT_BACKEND)
    if not isinstance(backend, str) or "." not in backend:
        problems.append(f"{SETTING}['BACKEND'] must be a dotted path to a backend class, not {backend!r}")
    location = raw.get("LOCATION", DEFAULT_LOCATION)
    if not (isinstance(location, str) or callable(location)):
        problems.append(f"{SETTING}['LOCATION'] must be a URL, 'cache:<alias>', or a callable returning a client")
    elif isinstance(location, str) and backend == DEFAULT_BACKEND and (wrong := _location(location)):
        problems.append(Problem(f"{SETTING}['LOCATION'] {wrong}", "location"))
    options = raw.get("OPTIONS", {})
    if not isinstance(options, Mapping):
        return [*problems, f"{SETTING}['OPTIONS'] must be a dict, not {type(options).__name__}"]
    for key, value in options.items():
        if key not in OPTIONS:
            problems.append(
                Problem(
                    f"{SETTING}['OPTIONS'] has an unknown key {key!r} (known: {', '.join(sorted(OPTIONS))})",
                    "unknown",
                    key,
                )
            )
            continue
        wrong = OPTIONS[key][1](value)
        if wrong:
            problems.append(f"{SETTING}['OPTIONS']['{key}'] {wrong}; got {value!r}")
    return problems


def parse(raw: Any) -> Config:
    problems = validate(raw)
    if problems:
        raise ImproperlyConfigured("; ".join(problems))
    raw = raw or {}
    options = {key: raw.get("OPTIONS", {}).get(key, default) for key, (default, _) in OPTIONS.items()}
    return Config(
        backend=raw.get("BACKEND", DEFAULT_BACKEND),
        location=raw.get("LOCATION", DEFAULT_LOCATION),
        ttl=float(options["TTL"]),
        auto_renew=options["AUTO_RENEW"],
        acquire_timeout=None if options["ACQUIRE_TIMEOUT"] is None else float(options["ACQUIRE_TIMEOUT"]),
        row_lock_timeout=None if options["ROW_LOCK_TIMEOUT"] is None else float(options["ROW_LOCK_TIMEOUT"]),
        key_prefix=options["KEY_PREFIX"],
        socket_timeout=float(options["SOCKET_TIMEOUT"]),
        socket_connect_timeout=float(options["SOCKET_CONNECT_TIMEOUT"]),
    )


_cache: tuple[Any, Config] | None = None


def get_config() -> Config:
    """The parsed setting; parsed again only when the setting object changes (it is on the hot path)."""
    global _cache
    raw = getattr(settings, SETTING, None)
    cached = _cache
    if cached is not None and cached[0] is raw:
        return cached[1]
    try:
        config = parse(raw)
    except ImproperlyConfigured as exc:
        # Raised afresh from here with the raw setting (which may hold a password in a URL) out of
        # this frame's locals, for tracebacks that capture them; the messages never echo a URL.
        message = str(exc)
        raw = cached = exc = None  # type: ignore[assignment]
        raise ImproperlyConfigured(message) from None
    _cache = (raw, config)
    return config


def _forget(*, setting: str, **kwargs: Any) -> None:
    global _cache
    if setting == SETTING:
        _cache = None


setting_changed.connect(_forget, dispatch_uid="dsm_redis.conf.forget")
