"""The Redis password in ``DSM_REDIS['LOCATION']`` never shows in a repr or in a traceback's
captured locals (what Sentry, Rollbar and Django's debug page record), on a real Redis that
requires it."""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from django.core.exceptions import ImproperlyConfigured

from dsm_redis import LockBackendUnavailable, LockTimeout, object_lock
from dsm_redis.backends import get_backend
from dsm_redis.conf import get_config, parse, redact
from tests.helpers import dsm_options
from tests.procs import in_background
from tests.testapp.models import ALIVE, Cat

PASSWORD = "s3cret-pw-7f1c"
USER = "dsm-secrets-test"


def with_credentials(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{USER}:{PASSWORD}@{parts.netloc}"))


def formatted(exc: BaseException) -> str:
    """The traceback as an error tracker records it: every frame's locals, every chained cause."""
    return "".join(traceback.TracebackException.from_exception(exc, capture_locals=True).format())


@pytest.fixture
def secret_location(redis: Any, settings: Any) -> Iterator[str]:
    """The suite's Redis through an ACL user with a password; DSM_REDIS points at it."""
    redis.execute_command("ACL", "SETUSER", USER, "on", f">{PASSWORD}", "~*", "&*", "+@all")
    url = with_credentials(settings.REDIS_URL)
    dsm_options(settings, url)
    yield url
    redis.execute_command("ACL", "DELUSER", USER)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@h:6379/0", "redis://***@h:6379/0"),
        ("rediss://user:pw@h/0?ssl_cert_reqs=required", "rediss://***@h/0?ssl_cert_reqs=required"),
        ("unix:///run/redis.sock?db=1&password=pw", "unix:///run/redis.sock?db=1&password=***"),
        ("redis+cluster://:pw@10.0.0.1:7000/0", "redis+cluster://***@10.0.0.1:7000/0"),
        ("redis://h:6379/0", "redis://h:6379/0"),
        (
            "redis+sentinel://:pw@h1:26379,h2:26379/mymaster/0?sentinel_password=pw",
            "redis+sentinel://***@h1:26379,h2:26379/mymaster/0?sentinel_password=***",
        ),
    ],
)
def test_the_config_repr_hides_credentials(url, shown):
    config = parse({"LOCATION": url})
    assert redact(url) == shown and f"location={shown!r}" in repr(config)
    assert "pw" not in repr(config) and "pw" not in repr(config.location.partition("://"))
    assert config.location == url and str(config.location) == url  # still the URL for connecting


@pytest.mark.django_db(transaction=True)
def test_a_lock_timeout_traceback_with_locals_holds_no_password(secret_location):
    cat = Cat.objects.create()
    cat.state_machine.survive()  # the URL connects: Redis checked the password
    assert Cat.objects.get(pk=cat.pk).state == ALIVE
    errors: list[BaseException] = []

    def contend() -> None:
        try:
            with object_lock(Cat.objects.get(pk=cat.pk), timeout=0):
                pass
        except LockTimeout as exc:
            errors.append(exc)

    with object_lock(cat):
        in_background(contend)()
    (error,) = errors
    text = formatted(error)
    assert "hold" in text and "config = Config(" in text  # the frames and locals are there
    assert PASSWORD not in text
    backend = get_backend()
    assert PASSWORD not in repr(get_config()) + repr(backend.config) + repr(vars(backend))


UNREACHABLE = {  # by name: a URL in the test's own locals would be in the traceback
    "redis": f"redis://{USER}:{PASSWORD}@127.0.0.1:1/0",
    "sentinel": f"redis+sentinel://{USER}:{PASSWORD}@127.0.0.1:1,127.0.0.1:2/mymaster/0?sentinel_password={PASSWORD}",
}


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("kind", sorted(UNREACHABLE))
def test_an_unreachable_redis_traceback_with_locals_holds_no_password(settings, kind):
    dsm_options(settings, UNREACHABLE[kind])
    cat = Cat.objects.create()
    with pytest.raises(LockBackendUnavailable) as info:
        cat.state_machine.survive()
    text = formatted(info.value)
    assert "ConnectionError" in text and PASSWORD not in text


def test_a_broken_setting_traceback_with_locals_holds_no_password(settings):
    settings.DSM_REDIS = {"LOCATION": f"redis://:{PASSWORD}@h:6379/0", "OPTIONS": {"TTL": 0}}
    with pytest.raises(ImproperlyConfigured, match="TTL") as info:
        get_config()
    assert PASSWORD not in formatted(info.value)
