"""Signals, as deus-state-machina sent them; both fire once per *committed* transition.

``state_changed`` is sent with ``instance``, ``state`` and ``field_name`` after the transaction
commits and the lease is released (a rolled-back transition never sends it). Receivers run with
``send_robust``: one that raises is logged and does not turn a committed transition into an error.
"""

from __future__ import annotations

from typing import Any

from django.dispatch import Signal

__all__ = ["state_changed", "emit_signal_on_state"]

state_changed = Signal()


def emit_signal_on_state(model: Any, target_field_name: str, target_state: Any, signal: Signal) -> None:
    """Send ``signal(sender=model, instance=...)`` whenever ``model`` enters ``target_state``."""
    from .machine import plain

    target = plain(target_state)

    def handler(instance: Any, state: Any, field_name: str, **kwargs: Any) -> None:
        if field_name == target_field_name and plain(state) == target:
            signal.send(sender=model, instance=instance)

    state_changed.connect(handler, sender=model, weak=False)
