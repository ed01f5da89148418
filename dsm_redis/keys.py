"""Naming: one object, one lease, one fencing mark.

``object_key(obj)`` is ``app_label.model:pk`` of the row's root concrete model (proxies and
multi-table-inheritance children share their parent's key) — the unit of mutual exclusion and of
fencing. Every
Redis key of one object carries it as a hash tag (``{app_label.model:pk}``) so that, on Redis
Cluster, the lock, its signal list and its fencing counter share a slot and one Lua script may
touch all three.
"""

from __future__ import annotations

from typing import Any

from django.db.models import Model


def root_model(model: type[Model]) -> type[Model]:
    """The concrete model at the top of ``model``'s multi-table inheritance chain."""
    root: type[Model] = model._meta.concrete_model or model
    while root._meta.parents:
        root = next(iter(root._meta.parents))
    return root


def object_key(obj: Model | type[Model], pk: Any = None) -> str:
    # One row, one key: a proxy model and the model it proxies, or a multi-table-inheritance child
    # and its parents, must contend for the same lease and share one fencing mark.
    meta = root_model(obj if isinstance(obj, type) else type(obj))._meta
    if pk is None:
        pk = getattr(obj, "pk", None)
    if pk is None:
        raise ValueError(f"{meta.label_lower} object has no primary key yet; save it first")
    return f"{meta.label_lower}:{pk}"


def redis_name(prefix: str, key: str) -> str:
    """The lock name handed to python-redis-lock, which prepends ``lock:`` / ``lock-signal:``."""
    return f"{prefix}:{{{key}}}"


def counter_key(prefix: str, key: str) -> str:
    return f"{prefix}:{{{key}}}:fence"
