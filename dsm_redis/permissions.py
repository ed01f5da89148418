"""Permissions per edge: ``@permission("app.perm")`` (or a callable of user and instance) on a side
effect, and the check the admin and ``obj.<machine>.allowed_transitions(user)`` apply.

The protocol does not check permissions: a transition called from code runs as the code decides.
The admin refuses an edge the user may not take, and shows no button for it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .machine import Transition

__all__ = ["permission", "has_permission"]

Check = str | Callable[[Any, Any], bool]


def permission(*checks: Check) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Guard who may take an edge: each check must pass, a permission name (``user.has_perm``,
    asked with the object) or a callable ``check(user, instance) -> bool``."""
    for check in checks:
        if not (isinstance(check, str) or callable(check)):
            raise TypeError(f"@permission takes permission names or callables, not {check!r}")

    def wrap(func: Callable[..., Any]) -> Callable[..., Any]:
        func._permissions = (*getattr(func, "_permissions", ()), *checks)  # type: ignore[attr-defined]
        return func

    return wrap


def required(transition: Transition) -> tuple[Check, ...]:
    return tuple(getattr(transition.side_effect, "_permissions", ()))


def has_permission(transition: Transition, user: Any, instance: Any) -> bool:
    """Whether ``user`` may take ``transition`` on ``instance`` (an edge without checks: anyone)."""
    for check in required(transition):
        if isinstance(check, str):
            # Django's ModelBackend answers object-level questions with False: ask about the model,
            # then let an object-level backend widen it.
            if not (user.has_perm(check) or user.has_perm(check, instance)):
                return False
        elif not check(user, instance):
            return False
    return True
