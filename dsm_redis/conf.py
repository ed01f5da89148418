"""The ``DSM_REDIS`` setting: declared, parsed and validated strictly, in this one place.

Each key is declared once, as a field of :class:`Config` made by ``option()`` (its key, type,
default, check and check id); validation, parsing and the known keys are derived from those
declarations. ``validate()`` lists every problem at once as :class:`Problem` values carrying their
system check id; ``checks.py`` turns them into ``manage.py check`` errors with those ids (so do
runserver, migrate and every command that runs the checks).
``get_config()`` returns a frozen :class:`Config` or raises ``ImproperlyConfigured`` naming the
offending keys; it runs at first use (a transition, ``object_lock``, a locked task), so a process that
runs no checks (a Celery worker, a script) fails there with the same messages. The app's ``ready()``
does not validate: raising there would keep ``manage.py check`` from ever showing the ids.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Final
from urllib.parse import parse_qsl, unquote

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed

SETTING = "DSM_REDIS"
DEFAULT_BACKEND = "dsm_redis.backends.redis.RedisLockBackend"
DEFAULT_LOCATION = "redis://127.0.0.1:6379/0"

# The system check ids of the problems validate() finds (checks.py reports them under these).
INVALID: Final = "dsm_redis.E001"  # a wrong type or value
UNKNOWN: Final = "dsm_redis.E002"  # an unknown key
BAD_LOCATION: Final = "dsm_redis.E005"  # a LOCATION the Redis backend cannot use


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


def _dotted_path(value: Any) -> str | None:
    return (
        None if isinstance(value, str) and "." in value else f"must be a dotted path to a backend class, not {value!r}"
    )


def _url_or_callable(value: Any) -> str | None:
    if isinstance(value, str) or callable(value):
        return None
    return "must be a URL, 'cache:<alias>', or a callable returning a client"  # never echoes a URL


def _replica_count(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return None
    return "must be a whole number of replicas >= 0 (0: do not wait for replicas)"


def _seconds(value: Any) -> float:
    return float(value)


def _seconds_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class Problem:
    """One problem ``validate()`` found: its message and the system check id it is reported under
    (``INVALID``, ``UNKNOWN`` or ``BAD_LOCATION``); ``key`` is the unknown key, for the hint."""

    message: str
    check_id: str = INVALID
    key: str | None = None

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Option:
    """One key of ``DSM_REDIS``, declared once: where it lives, its default, its check, and how a
    valid value becomes the :class:`Config` attribute ``attr``."""

    key: str
    attr: str
    default: Any
    check: Callable[[Any], str | None]  # None, or what is wrong with the value
    convert: Callable[[Any], Any] = _same
    top_level: bool = False  # DSM_REDIS[key], not DSM_REDIS['OPTIONS'][key]
    echo: bool = True  # the message shows the value (never for BACKEND, which says it, or LOCATION)
    check_id: str = INVALID

    @property
    def where(self) -> str:
        return f"{SETTING}['{self.key}']" if self.top_level else f"{SETTING}['OPTIONS']['{self.key}']"

    def problem(self, value: Any) -> Problem | None:
        wrong = self.check(value)
        if wrong is None:
            return None
        return Problem(f"{self.where} {wrong}" + (f"; got {value!r}" if self.echo else ""), self.check_id)


def option(key: str, default: Any, check: Callable[[Any], str | None], **how: Any) -> Any:
    """A :class:`Config` field declaring the key ``key`` (``how``: the other fields of :class:`Option`)."""
    return field(default=default, metadata={"option": Option(key, "", default, check, **how)})


LOCATION_SCHEMES = (
    "redis", "rediss", "unix", "redis+cluster", "rediss+cluster", "redis+sentinel", "rediss+sentinel"
)  # fmt: skip
SENTINEL_FORM = "redis+sentinel://[:password@]host:26379[,host:26379...]/<service>[/<db>]"
_SENTINEL_QUERY = frozenset({"sentinel_password", "sentinel_username"})


@dataclass(frozen=True, repr=False)
class SentinelLocation:
    """A ``redis+sentinel://`` (or ``rediss+sentinel://``) ``LOCATION``, parsed.

    ``username``/``password`` are the primary's (the URL's user info); ``sentinel_username`` and
    ``sentinel_password`` (query parameters) the sentinels' own, when they require one.
    """

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    ssl: bool = False

    def __repr__(self) -> str:  # never the passwords
        hosts = ",".join(f"{h}:{p}" for h, p in self.sentinels)
        return f"<SentinelLocation {hosts} service={self.service!r} db={self.db} ssl={self.ssl}>"


def split_host_port(hostport: str) -> tuple[str, str]:
    """``host:port``, ``[IPv6]:port`` or a bare host → (host, port or ""), as written."""
    if hostport.startswith("["):  # [IPv6]:port
        host, _, rest = hostport[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else ""
    host, colon, port = hostport.rpartition(":")
    return (host, port) if colon else (hostport, "")


def _sentinel_host(part: str) -> tuple[str, int]:
    host, port = split_host_port(part)
    if not host:
        raise ValueError("names a sentinel without a host")
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError("names a sentinel port that is not a number from 1 to 65535")
    return unquote(host), int(port) if port else 26379


def parse_sentinel_location(url: str) -> SentinelLocation:
    """Parse a Sentinel ``LOCATION``; ``ValueError`` saying what is wrong (never echoing the URL,
    which may carry a password)."""
    scheme, sep, rest = str(url).partition("://")
    if not sep or scheme.lower() not in ("redis+sentinel", "rediss+sentinel"):
        raise ValueError("is not a redis+sentinel:// or rediss+sentinel:// URL")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        raw_user, colon, raw_password = userinfo.partition(":")
        username = unquote(raw_user) or None
        password = unquote(raw_password) if colon else None
    if not hosts:
        raise ValueError(f"names no sentinel host (the form is {SENTINEL_FORM})")
    sentinels = tuple(_sentinel_host(part) for part in hosts.split(","))
    service, _, db = path.strip("/").partition("/")
    if not service:
        raise ValueError(f"names no Sentinel service (the form is {SENTINEL_FORM})")
    if db and not db.isdigit():
        raise ValueError("has a database number that is not a whole number >= 0")
    params = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(params) - _SENTINEL_QUERY)
    if unknown:
        raise ValueError(f"has unknown query parameters {unknown} (known: {sorted(_SENTINEL_QUERY)})")
    return SentinelLocation(
        sentinels=sentinels,
        service=unquote(service),
        db=int(db) if db else 0,
        username=username,
        password=password,
        sentinel_username=params.get("sentinel_username") or None,
        sentinel_password=params.get("sentinel_password") or None,
        ssl=scheme.lower() == "rediss+sentinel",
    )


def _location(value: str) -> str | None:
    """What is wrong with a string ``LOCATION`` for the Redis backend. Never echoes the value: a URL
    may carry a password."""
    if value.startswith("cache:"):
        return None if value[len("cache:") :] else "names no CACHES alias after 'cache:'"
    scheme, sep, _ = value.partition("://")
    if sep and scheme.lower().endswith("+sentinel") and scheme.lower() in LOCATION_SCHEMES:
        try:
            parse_sentinel_location(value)
        except ValueError as exc:
            return str(exc)
        return None
    if sep and scheme.lower() in LOCATION_SCHEMES:
        return None
    shown = f"scheme {scheme!r}" if sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]{0,19}", scheme) else "no URL scheme"
    return f"must be a {'://, '.join(LOCATION_SCHEMES)}:// URL or 'cache:<alias>' (it has {shown})"


_USERINFO = re.compile(r"^(?P<head>[^/?#@]*?//)?[^/?#@]*@")
_QUERY_SECRET = re.compile(r"(?i)(?P<head>[?&](?:sentinel_)?(?:password|username)=)[^&#]*")


def redact(url: str) -> str:
    """``url`` with its user and password (``user:pw@``, ``?password=``, ``?sentinel_password=``)
    replaced by ``***``."""
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


@dataclass(frozen=True)
class Config:
    """The parsed setting. Each ``option()`` field declares one key; ``extra`` is not a key."""

    backend: str = option("BACKEND", DEFAULT_BACKEND, _dotted_path, top_level=True, echo=False)
    # option() is a dataclasses.field() (its default is the str below), not a shared mutable default.
    location: str | Callable[[], Any] = option(  # noqa: RUF009
        "LOCATION", DEFAULT_LOCATION, _url_or_callable, top_level=True, echo=False
    )
    ttl: float = option("TTL", 30.0, _positive, convert=_seconds)
    auto_renew: bool = option("AUTO_RENEW", True, _bool)
    acquire_timeout: float | None = option("ACQUIRE_TIMEOUT", 10.0, _non_negative_or_none, convert=_seconds_or_none)
    # None: bounded by acquire_timeout (or unbounded when that is None too).
    row_lock_timeout: float | None = option("ROW_LOCK_TIMEOUT", None, _positive_or_none, convert=_seconds_or_none)
    key_prefix: str = option("KEY_PREFIX", "dsm", _prefix)
    socket_timeout: float = option("SOCKET_TIMEOUT", 5.0, _positive, convert=_seconds)
    socket_connect_timeout: float = option("SOCKET_CONNECT_TIMEOUT", 2.0, _positive, convert=_seconds)
    # How long a lease handed over to a waiter is held for it until its next call extends it.
    handover_grace: float = option("HANDOVER_GRACE", 2.0, _positive, convert=_seconds)
    # An object's fencing counter expires from Redis after this long unused; None: never.
    counter_idle_ttl: float | None = option(
        "COUNTER_IDLE_TTL", 7 * 24 * 3600.0, _positive_or_none, convert=_seconds_or_none
    )
    # After taking a lease, wait (Redis WAIT) until this many replicas hold it, for at most
    # REPLICA_ACK_TIMEOUT; fewer in time: LockNotReplicated, and the lease is given back. 0: off.
    replica_acks: int = option("REPLICA_ACKS", 0, _replica_count)
    replica_ack_timeout: float = option("REPLICA_ACK_TIMEOUT", 1.0, _positive, convert=_seconds)
    # OpenTelemetry spans and metrics (telemetry.py), when opentelemetry-api is installed.
    telemetry: bool = option("TELEMETRY", True, _bool)
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # The URL may carry a password: every repr of the config (and of a traceback's locals that
        # hold it) shows it redacted.
        if isinstance(self.location, str) and not isinstance(self.location, SecretLocation):
            object.__setattr__(self, "location", SecretLocation(self.location))

    @property
    def effective_row_lock_timeout(self) -> float | None:
        return self.row_lock_timeout if self.row_lock_timeout is not None else self.acquire_timeout


#: Every key, in declaration order: the top-level ones (beside ``OPTIONS``), then those of ``OPTIONS``.
DECLARED: Final = tuple(replace(f.metadata["option"], attr=f.name) for f in fields(Config) if "option" in f.metadata)
TOP_LEVEL: Final = {o.key: o for o in DECLARED if o.top_level}
OPTIONS: Final = {o.key: o for o in DECLARED if not o.top_level}
TOP_LEVEL_KEYS: Final = frozenset({*TOP_LEVEL, "OPTIONS"})


def validate(raw: Any) -> list[Problem]:
    """Every problem with a ``DSM_REDIS`` value, naming the key; empty when valid."""
    if raw is None:
        return []
    if not isinstance(raw, Mapping):
        return [Problem(f"{SETTING} must be a dict, not {type(raw).__name__}")]
    problems = [
        Problem(f"{SETTING} has an unknown key {key!r} (known: {', '.join(sorted(TOP_LEVEL_KEYS))})", UNKNOWN, key)
        for key in raw
        if key not in TOP_LEVEL_KEYS
    ]
    for declared in TOP_LEVEL.values():
        if (found := declared.problem(raw.get(declared.key, declared.default))) is not None:
            problems.append(found)
    location = raw.get("LOCATION", DEFAULT_LOCATION)
    if isinstance(location, str) and raw.get("BACKEND", DEFAULT_BACKEND) == DEFAULT_BACKEND:
        # Only the Redis backend's LOCATION is ours to judge; a custom backend's is its own.
        if wrong := _location(location):
            problems.append(Problem(f"{TOP_LEVEL['LOCATION'].where} {wrong}", BAD_LOCATION))
    options = raw.get("OPTIONS", {})
    if not isinstance(options, Mapping):
        return [*problems, Problem(f"{SETTING}['OPTIONS'] must be a dict, not {type(options).__name__}")]
    for key, value in options.items():
        if key not in OPTIONS:
            known = ", ".join(sorted(OPTIONS))
            problems.append(Problem(f"{SETTING}['OPTIONS'] has an unknown key {key!r} (known: {known})", UNKNOWN, key))
        elif (found := OPTIONS[key].problem(value)) is not None:
            problems.append(found)
    problems += _ack_timeout_within_socket_timeout(options)
    return problems


def _ack_timeout_within_socket_timeout(options: Mapping[str, Any]) -> list[Problem]:
    # WAIT holds the connection for up to REPLICA_ACK_TIMEOUT: a socket timeout below it would
    # call the connection dead before Redis answers.
    wait = options.get("REPLICA_ACK_TIMEOUT", OPTIONS["REPLICA_ACK_TIMEOUT"].default)
    socket = options.get("SOCKET_TIMEOUT", OPTIONS["SOCKET_TIMEOUT"].default)
    acks = options.get("REPLICA_ACKS", 0)
    if _replica_count(acks) is None and acks > 0 and _number(wait) and _number(socket) and 0 < socket <= wait:
        return [
            Problem(
                f"{OPTIONS['REPLICA_ACK_TIMEOUT'].where} ({wait}s) must be shorter than "
                f"{OPTIONS['SOCKET_TIMEOUT'].where} ({socket}s): WAIT holds the connection that long"
            )
        ]
    return []


def parse(raw: Any) -> Config:
    problems = validate(raw)
    if problems:
        raise ImproperlyConfigured("; ".join(p.message for p in problems))
    raw = raw or {}
    given = {**{k: v for k, v in raw.items() if k in TOP_LEVEL}, **raw.get("OPTIONS", {})}
    return Config(**{o.attr: o.convert(given.get(o.key, o.default)) for o in DECLARED})


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
