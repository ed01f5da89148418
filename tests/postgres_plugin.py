"""The suite's PostgreSQL, started before pytest-django imports ``tests.settings``.

Enabled with ``-p tests.postgres_plugin`` in setup.cfg's ``addopts`` (a conftest is loaded after the
settings, too late). ``DSM_TEST_DATABASE_URL`` if set names a server you run; else PostgreSQL from
the pgserver wheel (or ``initdb``/``pg_ctl`` on ``PATH``) is started once, its URL exported for
the settings and for the processes the tests spawn, and stopped when the session ends. The
suite's Redis comes the same way from ``dsm_redis.tools.pytest_plugin`` (``DSM_TEST_REDIS_URL``).
"""

from __future__ import annotations

import pytest

ENV_VAR = "DSM_TEST_DATABASE_URL"


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config, parser: pytest.Parser, args: list[str]) -> None:
    # tryfirst: before pytest-django's implementation of this hook imports tests.settings.
    from dsm_redis.tools.pytest_plugin import export_for_session, server_wanted
    from dsm_redis.tools.servers import PostgresServer

    if server_wanted(parser, args, ENV_VAR):
        export_for_session(early_config, ENV_VAR, PostgresServer().start())
