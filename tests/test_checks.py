"""System checks for ``DSM_REDIS``: one id per class of problem, each with a hint; the fatal ones
also stop the process at start-up with ``ImproperlyConfigured`` naming the setting."""

from __future__ import annotations

import pytest
from django.apps import apps
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import SystemCheckError

from dsm_redis.backends.local import LocalLockBackend

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


def test_manage_py_check_fails_on_an_error_and_shows_the_hint(settings, capsys):
    settings.DSM_REDIS = {"OPTIONS": {"TLL": 5}}
    with pytest.raises(SystemCheckError) as info:
        call_command("check", "--tag", "dsm_redis")
    assert "dsm_redis.E002" in str(info.value) and "Did you mean 'TTL'?" in str(info.value)


def test_a_fatal_setting_stops_the_app_at_start_up_naming_the_setting(settings):
    settings.DSM_REDIS = {"OPTIONS": {"TTL": 0}}
    with pytest.raises(ImproperlyConfigured, match=r"DSM_REDIS\['OPTIONS'\]\['TTL'\]"):
        apps.get_app_config("dsm_redis").ready()
    settings.DSM_REDIS = {"LOCATION": "http://x"}
    with pytest.raises(ImproperlyConfigured, match=r"DSM_REDIS\['LOCATION'\]"):
        apps.get_app_config("dsm_redis").ready()


def test_an_unimportable_backend_is_improperly_configured_naming_the_setting():
    from dsm_redis.backends import load_backend_class

    with pytest.raises(ImproperlyConfigured, match=r"DSM_REDIS\['BACKEND'\]: cannot import"):
        load_backend_class("dsm_redis.backends.nope.Backend")
    with pytest.raises(ImproperlyConfigured, match=r"not a dsm_redis\.backends\.LockBackend subclass"):
        load_backend_class("collections.OrderedDict")
    assert load_backend_class("tests.test_checks.MyLocal") is MyLocal
