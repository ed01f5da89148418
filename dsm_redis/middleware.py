"""``ActorMiddleware``: the transitions a request runs record its user as their actor.

Add ``"dsm_redis.middleware.ActorMiddleware"`` to ``MIDDLEWARE`` after Django's
``AuthenticationMiddleware``. An anonymous request records no actor; the user is read lazily,
only when a transition writes its record (``history.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .history import actor

__all__ = ["ActorMiddleware"]


class ActorMiddleware:
    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response

    def __call__(self, request: Any) -> Any:
        with actor(getattr(request, "user", None)):
            return self.get_response(request)
