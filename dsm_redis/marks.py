"""Where an object's fencing mark is kept, and how each database judges a token against it.

One strategy per database vendor for the shared mark table ``dsm_redis_fencing_mark``, chosen once
per database alias (``mark_table``): PostgreSQL's stored function ``dsm_redis_fence`` (one round
trip, which also bounds the row-lock wait, and can judge inside the row's own ``SELECT ... FOR
UPDATE``); SQLite's single upsert; the portable ORM path for any other database. The opt-in
``FencingTokenField`` column keeps the mark in the object's own row instead (``column_value`` /
``column_verdict``); ``fence.py`` reads and writes that column with the row.

A verdict is ``None`` when the token is accepted, else the mark that refused it. A token is
accepted when it is higher than the mark, or equal to it *and from the same lease* (a lease writing
in several transactions). An equal token from another lease is refused: after Redis loses its
counter, a re-anchored lease can be minted a token that a lease from before the loss still holds,
and the two must not both be accepted.
"""

from __future__ import annotations

from typing import Any, ClassVar

from django.db import connections
from django.db.models.expressions import RawSQL

from .keys import stored_key
from .token import Token

__all__: list[str] = []


class MarkTable:
    """The mark table through the ORM: any database Django supports.

    The base is the portable path; a vendor's subclass replaces what its database does better.
    """

    vendor: ClassVar[str] = ""
    # Row locks (``SELECT ... FOR UPDATE`` locks one row). Without them (SQLite) a transaction that
    # reads first and writes later deadlocks with another doing the same, so the fence writes first.
    row_locks: ClassVar[bool] = False

    def lock_timeout(self, seconds: float | None) -> str | None:
        """The per-transaction ``lock_timeout`` value bounding a row-lock wait by ``seconds``, where
        the database has one (elsewhere the connection's own timeout bounds it)."""
        return None

    def judge_in_scan(self, token: Token, timeout: str | None) -> RawSQL | None:
        """An annotation that judges ``token`` inside the row's own ``SELECT ... FOR UPDATE``, in
        the scan, before the row lock is waited for; ``None`` where the database cannot."""
        return None

    def scan_verdict(self, result: int) -> int | None:
        """The verdict in what ``judge_in_scan``'s annotation returned."""
        raise NotImplementedError

    def verdict(self, token: Token, using: str, timeout: str | None) -> int | None:
        """Judge ``token`` against its object's mark, raising the mark when it is accepted."""
        from .models import FencingMark  # the app registry is ready only once a judgement runs

        marks = FencingMark.objects.using(using)
        key = stored_key(token.key)
        mark: Any = marks.select_for_update().filter(pk=key).first()
        if mark is None:
            marks.create(object_key=key, token=token.number, owner=token.owner)
            return None
        verdict = _verdict(mark.token, mark.owner, token)
        if verdict is None:
            marks.filter(pk=key).update(token=token.number, owner=token.owner)
        return verdict


class SqliteMarkTable(MarkTable):
    """One upsert that raises the mark only when the token is accepted (its row count says so)."""

    vendor = "sqlite"

    def verdict(self, token: Token, using: str, timeout: str | None) -> int | None:
        key = stored_key(token.key)
        # The row count, not RETURNING: SQLite parses RETURNING from 3.35 on, and Django supports
        # older SQLite (upserts need 3.24). A DO UPDATE whose WHERE is false changes no row.
        with connections[using].cursor() as cursor:
            cursor.execute(
                "INSERT INTO dsm_redis_fencing_mark (object_key, token, owner) VALUES (%s, %s, %s) "
                "ON CONFLICT (object_key) DO UPDATE SET token = excluded.token, owner = excluded.owner "
                "WHERE dsm_redis_fencing_mark.token < excluded.token "
                "OR (dsm_redis_fencing_mark.token = excluded.token "
                "AND dsm_redis_fencing_mark.owner = excluded.owner)",
                [key, token.number, token.owner],
            )
            accepted = cursor.rowcount == 1
        if accepted:
            return None
        return int(execute(using, "SELECT token FROM dsm_redis_fencing_mark WHERE object_key = %s", [key]))


class PostgresMarkTable(MarkTable):
    """The stored function ``dsm_redis_fence(key, token, owner, lock_timeout)`` (a migration)."""

    vendor = "postgresql"
    row_locks = True

    def lock_timeout(self, seconds: float | None) -> str | None:
        return None if seconds is None else f"{max(1, int(seconds * 1000))}ms"

    def judge_in_scan(self, token: Token, timeout: str | None) -> RawSQL:
        # The function bounds the row-lock wait (SET LOCAL lock_timeout) and judges the mark; it
        # runs in the scan, before FOR UPDATE waits for the row.
        return RawSQL("dsm_redis_fence(%s, %s, %s, %s)", (stored_key(token.key), token.number, token.owner, timeout))

    def scan_verdict(self, result: int) -> int | None:
        # dsm_redis_fence returns the token when it accepts it, minus the mark when it refuses.
        return None if result > 0 else -result

    def verdict(self, token: Token, using: str, timeout: str | None) -> int | None:
        result = execute(
            using, "SELECT dsm_redis_fence(%s, %s, %s, %s)", [stored_key(token.key), token.number, token.owner, timeout]
        )
        return self.scan_verdict(result)


_VENDORS: dict[str, type[MarkTable]] = {cls.vendor: cls for cls in (SqliteMarkTable, PostgresMarkTable)}
_CHOSEN: dict[str, tuple[str, MarkTable]] = {}  # alias -> (its vendor, its strategy)


def mark_table(using: str) -> MarkTable:
    """The strategy for database ``using``, chosen once per alias (again only if its vendor changes)."""
    vendor = connections[using].vendor
    chosen = _CHOSEN.get(using)
    if chosen is None or chosen[0] != vendor:
        chosen = _CHOSEN[using] = (vendor, _VENDORS.get(vendor, MarkTable)())
    return chosen[1]


# -- the FencingTokenField column: "<number>:<owner>" of the latest committed transition ---------


def column_value(token: Token) -> str:
    """The value of a ``FencingTokenField`` that a write under ``token`` leaves behind."""
    return f"{token.number}:{token.owner}"


def column_verdict(stored: str | None, token: Token) -> int | None:
    """Judge ``token`` against the mark a ``FencingTokenField`` holds (``stored``)."""
    number, _, owner = (stored or "0:").partition(":")
    return _verdict(int(number or 0), owner, token)


def _verdict(number: int, owner: str, token: Token) -> int | None:
    if token.number > number or (token.number == number and token.owner == owner):
        return None
    return number


def execute(using: str, sql: str, params: list[Any]) -> Any:
    """The first column of the first row ``sql`` returns on ``using`` (``None`` for no row)."""
    with connections[using].cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    return None if row is None else row[0]
