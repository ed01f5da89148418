"""``ActorMiddleware``: the transitions a request runs record its user as their actor.

Add ``"dsm_redis.middleware.ActorMiddleware"`` to ``MIDDLEWARE`` after Django's
``AuthenticationMiddleware``. An anonymous request records no actor; the user is read lazily,
only when a transition writes its record (``history.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction

from .history import actor

__all__ = ["ActorMiddleware"]


class ActorMiddleware:
    # Both: under ASGI an async view stays on the server's event loop (a synchronous-only
    # middleware would make Django run it in an event loop of its own, in a thread).
    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request: Any) -> Any:
        if iscoroutinefunction(self):
            return self._acall(request)
        with actor(getattr(request, "user", None)):
            return self.get_response(request)

    async def _acall(self, request: Any) -> Any:
        with actor(getattr(request, "user", None)):  # a context variable: the task's own
            return await self.get_response(request)
