"""``manage.py dsm_locks``: the leases held now; ``--release KEY`` releases a stuck one, owner-safely.

Listing SCANs the lock keys of this ``KEY_PREFIX`` (every primary of a Redis Cluster) and reads
each lease's owner, TTL left and fencing counter in one script call per key; it is a snapshot, not
an atomic view. ``--release`` reads the lease, then deletes it only if the owner it read (or the
one given with ``--owner``) still holds it — python-redis-lock's UNLOCK script, which also pushes
the wake-up signal so a waiter takes the lease at once. A lease whose TTL is still running belongs
to a holder that may be alive: that needs ``--force``. Forcing keeps the database safe: once a
newer holder has committed, the database refuses the old holder's writes (its fencing token is
older), and the old holder's renewer marks its lease lost at its next renewal (TTL/3), after which
it refuses to commit (``LockLost``). It does not stop the old holder's side effects outside the
database that ignore the fencing token.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from dsm_redis.backends import LockBackend, get_backend
from dsm_redis.conf import get_config
from dsm_redis.exceptions import LockBackendUnavailable

logger = logging.getLogger("dsm_redis")


class Command(BaseCommand):
    help = (
        "List the leases held now (object, owner, TTL left, fencing token), or release one with "
        "--release app_label.model:pk (owner-checked; --force when its TTL is still running)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="print the leases as a JSON list")
        parser.add_argument(
            "--release",
            metavar="KEY",
            help="release the lease on this object (app_label.model:pk as listed, or the Redis lock key)",
        )
        parser.add_argument(
            "--owner",
            help="with --release: release only if this owner (as listed) still holds the lease",
        )
        parser.add_argument(
            "--force",
            action="store_true",
            help="with --release: release even though the lease's TTL is still running "
            "(its holder may be alive; it will find its lease lost)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        backend = get_backend()
        try:
            if options["release"]:
                self._release(backend, options["release"], options["owner"], options["force"])
            else:
                if options["owner"] or options["force"]:
                    raise CommandError("--owner and --force go with --release KEY")
                self._list(backend, options["json"])
        except LockBackendUnavailable as exc:
            raise CommandError(str(exc)) from exc

    def _list(self, backend: LockBackend, as_json: bool) -> None:
        try:
            leases = list(backend.iter_leases())
        except NotImplementedError as exc:
            raise CommandError(str(exc)) from exc
        if as_json:
            rows = [
                {"object": lease.key, "owner": lease.owner, "ttl": lease.ttl, "fencing_token": lease.fencing_token}
                for lease in leases
            ]
            self.stdout.write(json.dumps(rows, indent=2))
            return
        prefix = get_config().key_prefix
        if not leases:
            self.stdout.write(f"No leases held (KEY_PREFIX {prefix!r}).")
            return
        table = [("OBJECT", "OWNER", "TTL LEFT", "FENCING TOKEN")] + [
            (
                lease.key,
                lease.owner or "",
                "no expiry" if lease.ttl is None else f"{lease.ttl:.1f}s",
                "" if lease.fencing_token is None else str(lease.fencing_token),
            )
            for lease in leases
        ]
        widths = [max(len(row[i]) for row in table) for i in range(4)]
        for row in table:
            self.stdout.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
        self.stdout.write(f"{len(leases)} lease{'s' if len(leases) != 1 else ''} held (KEY_PREFIX {prefix!r}).")

    def _release(self, backend: LockBackend, raw: str, expected: str | None, force: bool) -> None:
        key = _object_key(raw, get_config().key_prefix)
        info = backend.describe(key)
        owner, ttl = info["owner"], info["ttl"]
        if owner is None:
            self.stdout.write(f"No lease is held on {key} (released or expired): nothing to release.")
            return
        if expected is not None and expected != owner:
            raise CommandError(f"The lease on {key} is held by {owner}, not {expected}: nothing released.")
        if ttl is not None and not force:
            raise CommandError(
                f"The lease on {key} is held by {owner} for {ttl:.1f}s more: its holder may be alive and "
                "working. It expires by itself; to release it now, pass --force (the holder's writes are then "
                "refused once a newer holder has committed, and it refuses to commit once its next renewal "
                "finds the lease gone)."
            )
        if not backend.release(key, owner):
            raise CommandError(f"The lease on {key} changed hands or expired since it was read: nothing released.")
        logger.warning(
            "lease on %s held by %s released by an operator (dsm_locks --release%s)",
            key,
            owner,
            " --force" if force else "",
        )
        self.stdout.write(self.style.SUCCESS(f"Released the lease on {key} held by {owner}."))


def _object_key(raw: str, prefix: str) -> str:
    """``app_label.model:pk`` from what the operator typed (the listed key or the Redis lock key)."""
    text = raw.strip()
    if text.startswith("lock:"):
        head = f"lock:{prefix}:{{"
        if not (text.startswith(head) and text.endswith("}")):
            raise CommandError(
                f"{raw!r} is not a lock key of KEY_PREFIX {prefix!r} (lock:{prefix}:{{app_label.model:pk}})"
            )
        text = text[len(head) : -1]
    label, sep, pk = text.partition(":")
    if not sep or not pk or label.count(".") != 1:
        raise CommandError(f"{raw!r} is not an object key: expected app_label.model:pk, as dsm_locks lists them")
    return f"{label.lower()}:{pk}"
