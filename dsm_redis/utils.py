"""Deprecated: deus-state-machina's ``deus_state_machina.utils`` names, so that renaming the import
lines is enough. See :mod:`dsm_redis.compat` for what each one means now."""

from __future__ import annotations

from .compat import lock_object, thread_lock_object

__all__ = ["lock_object", "thread_lock_object"]
