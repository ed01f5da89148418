"""Async views served by a real ASGI server in ``tests/test_asyncio.py``."""

from __future__ import annotations

import threading

from django.http import HttpRequest, HttpResponse

from tests.testapp.models import Account


async def ping(request: HttpRequest) -> HttpResponse:
    return HttpResponse("pong")


async def deposit(request: HttpRequest, pk: int) -> HttpResponse:
    """Read the account, then deposit 1 through its machine (the lease awaited, the step in a thread).

    Answers the state and where the view ran: on the server's event loop (its main thread), not in
    a loop of its own that a synchronous middleware would have wrapped it in."""
    account = await Account.objects.aget(pk=pk)
    state = await account.machine.adeposit(amount=1, work=0.003)
    where = "loop" if threading.current_thread() is threading.main_thread() else "thread"
    return HttpResponse(f"{state} {where}")
