"""Naming: one object, one lease, one fencing mark.

``object_key(obj)`` is ``app_label.model:pk`` of the row's root concrete model (proxies and
multi-table-inheritance children share their parent's key), the primary key in the form the row is
read back in (an instance may hold it as it was given: ``"7.5"``, an upper-case UUID) — the unit of
mutual exclusion and of fencing. Every Redis key of one object carries it as a hash tag
(``{app_label.model:pk}``) so that, on Redis Cluster, the lock, its signal list and its fencing
counter share a slot and one Lua script may touch all three.
"""

from __future__ import annotations

from decimal import Decimal
from hashlib import sha256
from typing import Any

from django.core.exceptions import ValidationError
from django.db.models import DecimalField, Model

__all__ = ["object_key"]


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
    return f"{meta.label_lower}:{_stored_form(meta.pk, pk)}"


def _stored_form(field: Any, pk: Any) -> Any:
    """``pk`` as the row read back holds it. An instance keeps its primary key as it was given
    (``create(pk="7.5")``, an upper-case UUID string): keyed as given, one row would have two
    leases and two marks, and a holder of one would not exclude, nor be fenced by, the other."""
    while field.is_relation:  # a one-to-one primary key: its target's form
        field = field.target_field
    try:
        value = field.to_python(pk)
        if isinstance(field, DecimalField) and isinstance(value, Decimal):
            # The database keeps decimal_places digits (7.5 is read back as 7.50).
            value = value.quantize(Decimal(1).scaleb(-field.decimal_places), context=field.context)
    except (ValidationError, ArithmeticError, TypeError, ValueError):
        return pk  # not a value of this field: the database refuses it anyway
    return value


def object_of(key: str) -> tuple[type[Model] | None, Any]:
    """The model and primary key an object key names; ``(None, None)`` for an unknown model."""
    from django.apps import apps

    label, _, pk = key.partition(":")
    try:
        model = apps.get_model(label)
    except LookupError:
        return None, None
    return model, model._meta.pk.to_python(pk)


def redis_name(prefix: str, key: str) -> str:
    """The lock name handed to python-redis-lock, which prepends ``lock:`` / ``lock-signal:``."""
    return f"{prefix}:{{{key}}}"


def counter_key(prefix: str, key: str) -> str:
    return f"{prefix}:{{{key}}}:fence"


# The library's tables keep object keys in varchar(255) columns (portable to every database Django
# supports as a primary key).
STORED_KEY_LENGTH = 255


def stored_key(key: str) -> str:
    """``key`` as the library's tables store it: unchanged when it fits, else its head and the
    SHA-256 of the whole — the same for the same key, distinct for distinct keys (short keys never
    contain a ``#`` followed by 64 hex digits at that position, since they fit)."""
    if len(key) <= STORED_KEY_LENGTH:
        return key
    digest = sha256(key.encode()).hexdigest()
    return f"{key[: STORED_KEY_LENGTH - len(digest) - 1]}#{digest}"
