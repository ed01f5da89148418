"""System checks for ``DSM_REDIS``: one id per class of problem, each with a hint, shown by
``manage.py check`` in a fresh process; a process that runs no checks fails at first use with
``ImproperlyConfigured`` and the same message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import SystemCheckError

from dsm_redis.backends.local import LocalLockBackend

ROOT = Path(__file__).resolve().parent.parent

LOCMEM = {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}


def dsm_messages() -> list[checks.CheckMessage]:
    """The DSM_REDIS setting's messages (the Celery ones, W1xx, depend on the Celery app in use)."""
    return [
        m
        for m in checks.run_checks(tags=["dsm_redis"])
        if m.id and m.id.startswith("dsm_redis.") and not m.id.startswith("dsm_redis.W1")
    ]


def ids() -> list[str]:
    return [m.id for m in dsm_messages() if m.id]


class MyLocal(LocalLockBackend):
    pass


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, []),
        ({}, []),
        ({"LOCATION": "rediss://:pw@redis.example.com:6380/2"}, []),
        ({"LOCATION": "redis+cluster://10.0.0.1:7000/0"}, []),
        ({"LOCATION": "unix:///run/redis.sock?db=1"}, []),
        ({"LOCATION": lambda: None}, []),
        ({"OPTIONS": {"TTL": 0}}, ["dsm_redis.E001"]),
        ({"OPTIONS": {"TTL": -1.5}}, ["dsm_redis.E001"]),
        ({"OPTIONS": {"AUTO_RENEW": 1}}, ["dsm_redis.E001"]),
        ({"OPTIONS": {"ACQUIRE_TIMEOUT": "10"}}, ["dsm_redis.E001"]),
        ({"OPTIONS": []}, ["dsm_redis.E001"]),
        ("redis://127.0.0.1", ["dsm_redis.E001"]),
        ({"BACKEND": 3}, ["dsm_redis.E001"]),
        ({"LOCATON": "redis://x"}, ["dsm_redis.E002"]),
        ({"OPTIONS": {"TLL": 5}}, ["dsm_redis.E002"]),
        ({"BACKEND": "dsm_redis.backends.nope.Backend"}, ["dsm_redis.E003"]),
        ({"BACKEND": "dsm_redis.backends.redis.NoSuchClass"}, ["dsm_redis.E003"]),
        ({"BACKEND": "collections.OrderedDict"}, ["dsm_redis.E004"]),
        ({"BACKEND": "dsm_redis.backends.redis.logger"}, ["dsm_redis.E004"]),
        ({"LOCATION": "http://127.0.0.1:6379"}, ["dsm_redis.E005"]),
        ({"LOCATION": "127.0.0.1:6379"}, ["dsm_redis.E005"]),
        ({"LOCATION": "cache:"}, ["dsm_redis.E005"]),
        ({"LOCATION": "cache:nope"}, ["dsm_redis.E005"]),
        ({"LOCATION": "cache:locmem"}, ["dsm_redis.E005"]),
        ({"LOCATION": "cache:redis"}, []),
        ({"LOCATION": "redis+sentinel://:pw@h1:26379,h2:26379/mymaster/0"}, []),
        ({"LOCATION": "redis+sentinel://:pw@h1:26379,h2:26379"}, ["dsm_redis.E005"]),  # no service
        ({"LOCATION": "rediss+sentinel://h1:26379/mymaster/zero"}, ["dsm_redis.E005"]),
        ({"OPTIONS": {"REPLICA_ACKS": -1}}, ["dsm_redis.E001"]),
        ({"OPTIONS": {"REPLICA_ACKS": 1, "REPLICA_ACK_TIMEOUT": 9}}, ["dsm_redis.E001"]),  # > SOCKET_TIMEOUT
        # every problem at once, each with its own id
        (
            {"X": 1, "BACKEND": "nope.Backend", "OPTIONS": {"TTL": 0}},
            ["dsm_redis.E002", "dsm_redis.E001", "dsm_redis.E003"],
        ),
    ],
)
def test_each_problem_has_its_id(settings, value, expected):
    settings.CACHES = {
        "default": LOCMEM,
        "locmem": LOCMEM,
        "redis": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": settings.REDIS_URL},
    }
    settings.DSM_REDIS = value
    assert ids() == expected
    assert all(m.hint for m in dsm_messages())


def test_a_typo_gets_a_did_you_mean_hint(settings):
    settings.DSM_REDIS = {"LOCATON": "redis://x", "OPTIONS": {"ttl": 3}}
    hints = [m.hint for m in dsm_messages()]
    assert "Did you mean 'LOCATION'?" in hints[0]
    assert "Did you mean 'TTL'?" in hints[1]


def test_a_sentinel_location_without_a_service_is_named_without_its_password(settings):
    settings.DSM_REDIS = {"LOCATION": "redis+sentinel://:s3cret-pw@h1:26379,h2:26379/"}
    (message,) = dsm_messages()
    assert "names no Sentinel service" in message.msg and "redis+sentinel://" in (message.hint or "")
    assert "s3cret" not in message.msg + (message.hint or "")


def test_no_message_echoes_a_location_password(settings):
    settings.DSM_REDIS = {"LOCATION": "http://user:s3cret-pw@example.com:6379/0"}
    (message,) = dsm_messages()
    assert "s3cret" not in message.msg and "s3cret" not in (message.hint or "")
    assert "'http'" in message.msg


def test_custom_backends_are_accepted_and_their_location_is_theirs(settings):
    settings.DEBUG = True  # pytest-django runs tests with DEBUG = False
    settings.DSM_REDIS = {"BACKEND": "tests.test_checks.MyLocal", "LOCATION": "anything-my-backend-understands"}
    assert ids() == []


@pytest.mark.parametrize("backend", ["dsm_redis.backends.local.LocalLockBackend", "tests.test_checks.MyLocal"])
def test_local_backend_without_debug_is_a_warning(settings, backend):
    settings.DEBUG = False
    settings.DSM_REDIS = {"BACKEND": backend}
    assert ids() == ["dsm_redis.W001"]
    settings.DEBUG = True
    assert ids() == []


def test_actor_middleware_before_the_authentication_middleware_is_a_warning(settings):
    actor, auth = "dsm_redis.middleware.ActorMiddleware", "django.contrib.auth.middleware.AuthenticationMiddleware"
    assert actor in settings.MIDDLEWARE and ids() == []  # the test settings' order: after it
    others = [m for m in settings.MIDDLEWARE if m not in (actor, auth)]
    settings.MIDDLEWARE = [actor, *others, auth]
    assert ids() == ["dsm_redis.W002"]
    settings.MIDDLEWARE = [*others, actor]
    assert ids() == ["dsm_redis.W002"]
    settings.MIDDLEWARE = others
    assert ids() == []


def test_manage_py_check_fails_on_an_error_and_shows_the_hint(settings, capsys):
    settings.DSM_REDIS = {"OPTIONS": {"TLL": 5}}
    with pytest.raises(SystemCheckError) as info:
        call_command("check", "--tag", "dsm_redis")
    assert "dsm_redis.E002" in str(info.value) and "Did you mean 'TTL'?" in str(info.value)


def run_project(setting: object, *argv: str) -> subprocess.CompletedProcess[str]:
    """``python -m django ARGV`` (or ``python -c`` code) in a fresh process whose ``DSM_REDIS`` is ``setting``."""
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.check_settings", "DSM_CHECK_SETTING": json.dumps(setting)}
    command = [sys.executable, *argv] if argv[0] == "-c" else [sys.executable, "-m", "django", *argv]
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)


BROKEN = [
    ({"LOCATON": "redis://x"}, "dsm_redis.E002", "Did you mean 'LOCATION'?"),
    ({"OPTIONS": {"TTL": 0}}, "dsm_redis.E001", "DSM_REDIS['OPTIONS']['TTL'] must be a number > 0; got 0"),
    ({"BACKEND": "dsm_redis.backends.nope.Backend"}, "dsm_redis.E003", "cannot be imported"),
    ({"LOCATION": "http://127.0.0.1:6379/0"}, "dsm_redis.E005", "DSM_REDIS['LOCATION'] must be a redis://"),
]


@pytest.mark.parametrize(("setting", "check_id", "text"), BROKEN)
def test_manage_py_check_in_a_fresh_process_shows_the_id_of_a_broken_setting(setting, check_id, text):
    result = run_project(setting, "check")
    assert result.returncode == 1, result.stderr
    assert f"{check_id}" in result.stderr and text in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_manage_py_check_shows_every_problem_at_once():
    result = run_project({"LOCATON": "redis://x", "OPTIONS": {"TTL": 0}}, "check", "--tag", "dsm_redis")
    assert "dsm_redis.E002" in result.stderr and "dsm_redis.E001" in result.stderr, result.stderr
    assert "2 issues" in result.stderr


def test_migrate_runs_the_checks_and_refuses_a_broken_setting():
    result = run_project({"OPTIONS": {"TLL": 5}}, "migrate")
    assert result.returncode == 1 and "dsm_redis.E002" in result.stderr and "Did you mean 'TTL'?" in result.stderr


FIRST_USE = """
import django
django.setup()
from django.core.management import call_command
from tests.testapp.models import Cat
call_command("migrate", verbosity=0, skip_checks=True)
cat = Cat.objects.create()
print("setup ok", flush=True)
try:
    cat.state_machine.survive()
finally:
    cat.refresh_from_db()
    print("state", cat.state, flush=True)
"""


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"OPTIONS": {"TTL": 0}}, "ImproperlyConfigured: DSM_REDIS['OPTIONS']['TTL'] must be a number > 0; got 0"),
        ({"LOCATON": "redis://x"}, "ImproperlyConfigured: DSM_REDIS has an unknown key 'LOCATON'"),
        ({"BACKEND": "dsm_redis.backends.nope.Backend"}, "ImproperlyConfigured: DSM_REDIS['BACKEND']: cannot import"),
    ],
)
def test_a_process_that_runs_no_checks_fails_at_first_use_with_the_message(setting, message):
    # A script (or a Celery worker, which discards the check results) starts, and its first
    # transition raises, changing nothing.
    result = run_project(setting, "-c", FIRST_USE)
    assert result.stdout == "setup ok\nstate 0\n", result.stderr
    assert result.returncode == 1 and message in result.stderr, result.stderr


def test_an_unimportable_backend_is_improperly_configured_naming_the_setting():
    from dsm_redis.backends import load_backend_class

    with pytest.raises(ImproperlyConfigured, match=r"DSM_REDIS\['BACKEND'\]: cannot import"):
        load_backend_class("dsm_redis.backends.nope.Backend")
    with pytest.raises(ImproperlyConfigured, match=r"not a dsm_redis\.backends\.LockBackend subclass"):
        load_backend_class("collections.OrderedDict")
    assert load_backend_class("tests.test_checks.MyLocal") is MyLocal
