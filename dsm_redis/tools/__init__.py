"""The tools around the library: nothing here is needed to use dsm_redis in an application.

- ``servers``: throwaway Redis and PostgreSQL servers (real ones, in temporary directories) for
  tests, the demo and the nemesis.
- ``pytest_plugin``: fixtures for a project's own test suite (a real Redis, a ``DSM_REDIS``
  override with a key prefix per test, a lock backend), built on ``servers``.
- ``demo``: ``python -m dsm_redis demo``, processes racing on shared objects with and without
  dsm_redis.
- ``nemesis``: ``python -m dsm_redis nemesis``, random faults against real processes and a checker
  of the history they leave.

The tools import the library core; the core (machine, fields, protocol, lease, fence, backends,
conf, checks, celery, tasks, the management commands) never imports ``dsm_redis.tools``. The
layers contract in ``pyproject.toml`` (``lint-imports``) enforces it.
"""
