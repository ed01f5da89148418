"""``dsm_redis.tools.pytest_plugin`` in a project of its own: pytest runs a tiny Django project in a
subprocess (pytester) against real Redis, and the test checks what the run left behind.

The README's example runs as written, with the plugin starting a Redis of its own before the
settings are imported; with ``DSM_TEST_REDIS_URL`` set it uses that server, gives each test a key
prefix of its own, deletes the test's keys after it and undoes the setting.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import redis as redis_py

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()

# The project the README's example assumes: its own settings, which settings_test.py extends.
MYSITE_SETTINGS = """
SECRET_KEY = "tests"
USE_TZ = True
INSTALLED_APPS = ["django.contrib.contenttypes", "dsm_redis"]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
DSM_REDIS = {"LOCATION": "redis://127.0.0.1:1/0", "OPTIONS": {"KEY_PREFIX": "mysite"}}
"""

# Two tests on the same object key: the first never releases its lease, the second must not wait.
ISOLATION_TESTS = """
import os

from django.conf import settings


def report(backend):
    print("\\nPREFIX", settings.DSM_REDIS["OPTIONS"]["KEY_PREFIX"], "URL", settings.DSM_REDIS["LOCATION"])
    print("ENV", os.environ.get("DSM_TEST_REDIS_URL"))


def test_first_leaves_its_lease_behind(dsm_redis_backend):
    dsm_redis_backend.acquire("shop.order:7", ttl=300, timeout=0)
    report(dsm_redis_backend)


def test_second_takes_the_same_object_at_once(dsm_redis_backend):
    dsm_redis_backend.acquire("shop.order:7", ttl=300, timeout=0)
    report(dsm_redis_backend)
"""


def readme_files() -> dict[str, str]:
    """The files of the README's pytest plugin section, as written there."""
    section = README.split("\n## Testing your project", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^`([\w/.]+)`[^\n]*\n\n```\w+\n(.*?)^```$", section, re.S | re.M))


def reported(outcome: pytest.RunResult) -> list[dict[str, str]]:
    lines = [line.split() for line in outcome.outlines if line.startswith(("PREFIX ", "ENV "))]
    return [
        {"prefix": prefix[1], "url": prefix[3], "env": env[1]}
        for prefix, env in zip(lines[::2], lines[1::2], strict=True)
    ]


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    # The run must read its own settings, not the ones pytest-django exported for this suite.
    monkeypatch.delenv("DJANGO_SETTINGS_MODULE", raising=False)
    pytester.mkpydir("mysite")
    (pytester.path / "mysite" / "settings.py").write_text(MYSITE_SETTINGS)
    pytester.makepyfile(test_isolation=ISOLATION_TESTS)
    return pytester


def test_the_readme_example_runs_as_written_and_starts_redis_before_the_settings(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = readme_files()
    assert set(files) == {"conftest.py", "tests/test_leases.py", "pyproject.toml", "mysite/settings_test.py"}
    for name, text in files.items():
        (project.path / name).parent.mkdir(parents=True, exist_ok=True)
        (project.path / name).write_text(text)
    # No Redis given: settings_test.py reads DSM_TEST_REDIS_URL at import, so the plugin must have
    # started a server (and exported its URL) before pytest-django imported them.
    monkeypatch.delenv("DSM_TEST_REDIS_URL", raising=False)
    outcome = project.runpytest_subprocess("-s", timeout=180)
    outcome.assert_outcomes(passed=3)
    first, second = reported(outcome)
    assert first["url"] == first["env"] == second["url"]
    assert first["prefix"].startswith("mysite-tests-") and second["prefix"].startswith("mysite-tests-")
    assert first["prefix"] != second["prefix"]
    with pytest.raises(redis_py.ConnectionError):  # stopped at the end of that session
        redis_py.Redis.from_url(first["url"], socket_connect_timeout=5).ping()


def test_a_given_redis_is_used_each_test_has_its_prefix_and_its_keys_go_after_it(
    project: pytest.Pytester, redis: Any, dsm_redis_url: str
) -> None:
    project.makeini("[pytest]\nDJANGO_SETTINGS_MODULE = mysite.settings\n")
    project.makeconftest('pytest_plugins = ["dsm_redis.tools.pytest_plugin"]\n')
    project.makepyfile(
        test_undone="""
from django.conf import settings


def test_the_setting_is_the_projects_again_after_a_test_that_changed_it():
    assert settings.DSM_REDIS == {"LOCATION": "redis://127.0.0.1:1/0", "OPTIONS": {"KEY_PREFIX": "mysite"}}
"""
    )
    outcome = project.runpytest_subprocess("-s", "test_isolation.py", "test_undone.py", timeout=180)
    outcome.assert_outcomes(passed=3)
    first, second = reported(outcome)
    assert first["url"] == second["url"] == dsm_redis_url  # DSM_TEST_REDIS_URL, which this run set
    assert first["prefix"].startswith("mysite-") and second["prefix"].startswith("mysite-")
    assert first["prefix"] != second["prefix"]
    for prefix in (first["prefix"], second["prefix"]):
        assert list(redis.scan_iter(match=f"*{prefix}*")) == []  # the lease left behind included
    assert redis.ping()  # a server the plugin did not start is left running
