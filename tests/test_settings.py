"""``DSM_REDIS`` validation: every mistake is a clear error naming the key; checks report them."""

from __future__ import annotations

import pytest
from django.core.exceptions import ImproperlyConfigured

from dsm_redis.conf import parse, validate


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("redis://x", "must be a dict"),
        ({"LOCATON": "redis://x"}, "unknown key 'LOCATON'"),
        ({"OPTIONS": {"TTL": 0}}, r"\['TTL'\] must be a number > 0"),
        ({"OPTIONS": {"TTL": "30"}}, r"\['TTL'\] must be a number > 0"),
        ({"OPTIONS": {"TTL": float("nan")}}, r"\['TTL'\]"),
        ({"OPTIONS": {"ACQUIRE_TIMEOUT": -1}}, r"\['ACQUIRE_TIMEOUT'\] must be a number >= 0"),
        ({"OPTIONS": {"AUTO_RENEW": "yes"}}, r"\['AUTO_RENEW'\] must be True or False"),
        ({"OPTIONS": {"TELEMETRY": 1}}, r"\['TELEMETRY'\] must be True or False"),
        ({"OPTIONS": {"KEY_PREFIX": "a{b}"}}, "braces"),
        ({"OPTIONS": {"TIMEOUT": 3}}, "unknown key 'TIMEOUT'"),
        ({"OPTIONS": []}, r"\['OPTIONS'\] must be a dict"),
        ({"BACKEND": "RedisLockBackend"}, "dotted path"),
        ({"LOCATION": 6379}, "LOCATION"),
        ({"LOCATION": "redis+sentinel://h1:26379,h2:26379/"}, "names no Sentinel service"),
        ({"LOCATION": "redis+sentinel:///mymaster/0"}, "names no sentinel host"),
        ({"LOCATION": "redis+sentinel://h1:99999/mymaster"}, "sentinel port"),
        ({"OPTIONS": {"REPLICA_ACKS": 1.5}}, r"\['REPLICA_ACKS'\] must be a whole number"),
        ({"OPTIONS": {"REPLICA_ACK_TIMEOUT": 0}}, r"\['REPLICA_ACK_TIMEOUT'\] must be a number > 0"),
    ],
)
def test_bad_settings_are_named(raw, message):
    with pytest.raises(ImproperlyConfigured, match=message):
        parse(raw)


def test_every_problem_is_listed_at_once():
    assert len(validate({"X": 1, "OPTIONS": {"TTL": -1, "KEY_PREFIX": ""}})) == 3


def test_a_sentinel_location_is_parsed():
    from dsm_redis.conf import parse_sentinel_location

    where = parse_sentinel_location("rediss+sentinel://u:p%40w@h1:26379,[::1]/mymaster/3?sentinel_password=s")
    assert where.sentinels == (("h1", 26379), ("::1", 26379))
    assert (where.service, where.db, where.username, where.password) == ("mymaster", 3, "u", "p@w")
    assert (where.sentinel_password, where.ssl) == ("s", True)
    assert "p@w" not in repr(where) and "'s'" not in repr(where)
    assert parse_sentinel_location("redis+sentinel://h/m").db == 0


def test_defaults_and_fractional_values_survive():
    config = parse({"OPTIONS": {"TTL": 0.5, "ACQUIRE_TIMEOUT": None}})
    assert (config.ttl, config.acquire_timeout, config.effective_row_lock_timeout) == (0.5, None, None)
    assert parse(None).backend == "dsm_redis.backends.redis.RedisLockBackend"


def test_system_check_reports_a_broken_setting(settings):
    from django.core import checks

    settings.DSM_REDIS = {"OPTIONS": {"TTL": 0}}
    errors = [e for e in checks.run_checks() if e.id.startswith("dsm_redis")]
    assert [e.id for e in errors] == ["dsm_redis.E001"]
    assert "TTL" in errors[0].msg


def test_system_check_warns_about_local_backend_in_production(settings):
    from django.core import checks

    settings.DEBUG = False
    settings.DSM_REDIS = {"BACKEND": "dsm_redis.backends.local.LocalLockBackend"}
    assert [e.id for e in checks.run_checks() if e.id.startswith("dsm_redis")] == ["dsm_redis.W001"]


@pytest.mark.django_db(transaction=True)
def test_broken_setting_stops_a_transition_and_changes_nothing(settings):
    from tests.testapp.models import Cat

    cat = Cat.objects.create()
    settings.DSM_REDIS = {"OPTIONS": {"TTL": -5}}
    with pytest.raises(ImproperlyConfigured, match="TTL"):
        cat.state_machine.survive()
    assert Cat.objects.get(pk=cat.pk).state == 0 and cat.state == 0


@pytest.mark.django_db(transaction=True)
def test_unknown_backend_path_is_a_clear_error(settings):
    from tests.testapp.models import Cat

    cat = Cat.objects.create()
    settings.DSM_REDIS = {"BACKEND": "dsm_redis.backends.nope.Backend"}
    with pytest.raises(ImproperlyConfigured, match=r"cannot import 'dsm_redis\.backends\.nope\.Backend'"):
        cat.state_machine.survive()
    assert Cat.objects.get(pk=cat.pk).state == 0


def test_each_key_is_declared_once_and_the_rest_is_derived():
    from dataclasses import fields

    from dsm_redis.conf import DECLARED, OPTIONS, TOP_LEVEL_KEYS, Config

    assert TOP_LEVEL_KEYS == {"BACKEND", "LOCATION", "OPTIONS"}
    assert set(OPTIONS) == {
        "TTL", "AUTO_RENEW", "ACQUIRE_TIMEOUT", "ROW_LOCK_TIMEOUT", "KEY_PREFIX", "SOCKET_TIMEOUT",
        "SOCKET_CONNECT_TIMEOUT", "HANDOVER_GRACE", "COUNTER_IDLE_TTL", "REPLICA_ACKS", "REPLICA_ACK_TIMEOUT",
        "TELEMETRY",
    }  # fmt: skip
    defaults = Config()
    assert {o.attr for o in DECLARED} == {f.name for f in fields(Config)} - {"extra"}
    assert all(getattr(defaults, o.attr) == o.default for o in DECLARED)
    assert parse(None) == defaults


def test_a_problem_carries_its_check_id():
    from dsm_redis.conf import Problem

    problems = validate({"X": 1, "LOCATION": "http://h", "OPTIONS": {"TTL": 0}})
    assert [p.check_id for p in problems] == ["dsm_redis.E002", "dsm_redis.E005", "dsm_redis.E001"]
    assert problems[0] == Problem(
        "DSM_REDIS has an unknown key 'X' (known: BACKEND, LOCATION, OPTIONS)", "dsm_redis.E002", "X"
    )
    assert str(problems[2]) == "DSM_REDIS['OPTIONS']['TTL'] must be a number > 0; got 0"
    with pytest.raises(AttributeError):
        problems[0].message = "changed"  # type: ignore[misc]
