"""A minimal project for the subprocess tests of ``manage.py check``: ``DSM_REDIS`` comes from the
environment variable ``DSM_CHECK_SETTING`` (JSON), the database is SQLite in memory, and no server
is started or needed."""

from __future__ import annotations

import json
import os

SECRET_KEY = "tests"
DEBUG = True
USE_TZ = True
INSTALLED_APPS = ["django.contrib.contenttypes", "dsm_redis", "tests.testapp"]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
DSM_REDIS = json.loads(os.environ["DSM_CHECK_SETTING"])
