"""What the extras promise, read from the installed distribution's metadata.

``.ci/run`` (``.ci/extras.py``) installs each extra alone in a fresh venv and runs it; these checks
only keep the metadata from drifting between CI runs.
"""

from __future__ import annotations

from importlib.metadata import requires

from packaging.requirements import Requirement


def extra_requirements(extra: str) -> dict[str, Requirement]:
    found = {}
    for line in requires("dsm_redis") or []:
        requirement = Requirement(line)
        if requirement.marker is not None and requirement.marker.evaluate({"extra": extra}):
            found[requirement.name] = requirement
    return found


def test_the_celery_extra_brings_the_redis_transport_dependencies():
    # kombu's Redis transport imports packaging, which kombu lists only under its own redis extra.
    celery = extra_requirements("celery")["celery"]
    assert "redis" in celery.extras
