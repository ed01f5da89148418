"""``manage.py dsm_prune``: bound the library's tables.

``--applied-older-than AGE`` deletes ``dsm_redis_applied_task`` records older than ``AGE`` (``90s``,
``12h``, ``7d``). A record is what makes a redelivered copy of an asynchronous transition a no-op:
keep them longer than your broker can redeliver a message (a Redis broker's ``visibility_timeout``,
a task's retries and countdowns).

``--marks-of-deleted`` deletes the fencing mark (``dsm_redis_fencing_mark``) of every object whose
row no longer exists. Each is deleted under that object's lease (skipped when the lease is busy) in a
transaction that checks the row is still absent, so no transition of the object is in flight. Safe
as long as Redis keeps the object's fencing counter (this command leaves counters alone): a row
created later with the same primary key gets tokens above every token of the old one. Marks stored
hashed (object keys longer than 255 characters) cannot be traced to their row and are kept.

``--dry-run`` counts without deleting. ``--database`` picks the database (default: ``default``).
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction
from django.utils import timezone

from dsm_redis.exceptions import LockTimeout
from dsm_redis.keys import STORED_KEY_LENGTH, object_of
from dsm_redis.lease import hold
from dsm_redis.models import AppliedTask, FencingMark

_AGE = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_age(text: str) -> timedelta:
    match = _AGE.match(text.strip())
    if match is None:
        raise CommandError(f"--applied-older-than: {text!r} is not an age such as 90s, 30m, 12h or 7d")
    return timedelta(seconds=float(match.group(1)) * _UNIT[match.group(2)])


class Command(BaseCommand):
    help = (
        "Delete applied-task records older than an age (--applied-older-than 7d) and the fencing "
        "marks of deleted objects (--marks-of-deleted)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--applied-older-than", metavar="AGE", help="e.g. 90s, 30m, 12h, 7d")
        parser.add_argument(
            "--marks-of-deleted", action="store_true", help="fencing marks of rows that no longer exist"
        )
        parser.add_argument("--dry-run", action="store_true", help="count, delete nothing")
        parser.add_argument("--database", default="default", help="the database to prune (default: default)")

    def handle(self, *args: Any, **options: Any) -> None:
        if not options["applied_older_than"] and not options["marks_of_deleted"]:
            raise CommandError("nothing to do: give --applied-older-than AGE and/or --marks-of-deleted")
        using, dry = options["database"], options["dry_run"]
        verb = "would delete" if dry else "deleted"
        if options["applied_older_than"]:
            cutoff = timezone.now() - parse_age(options["applied_older_than"])
            old = AppliedTask.objects.using(using).filter(applied_at__lt=cutoff)
            count = old.count() if dry else old.delete()[0]
            self.stdout.write(f"applied-task records: {verb} {count} older than {cutoff.isoformat()}")
        if options["marks_of_deleted"]:
            deleted, busy, untraced = self._prune_marks(using, dry)
            self.stdout.write(
                f"fencing marks of deleted objects: {verb} {deleted}; {busy} skipped (lease busy), "
                f"{untraced} kept (hashed keys or unknown models)"
            )

    def _prune_marks(self, using: str, dry: bool) -> tuple[int, int, int]:
        deleted = busy = untraced = 0
        keys = FencingMark.objects.using(using).values_list("object_key", flat=True).order_by("object_key")
        for key in keys.iterator(chunk_size=1000):
            try:
                # A key of the full stored length may be a hashed one: its pk part is not a pk.
                model, pk = (None, None) if len(key) >= STORED_KEY_LENGTH else object_of(key)
            except (ValidationError, ValueError):
                model = None
            if model is None:
                untraced += 1
                continue
            if model._base_manager.db_manager(using).filter(pk=pk).exists():
                continue
            if dry:
                deleted += 1
                continue
            try:
                # Under the object's lease, the row checked absent again: no transition of it is
                # running, and none can start without this lease.
                with hold(key, timeout=0), transaction.atomic(using=using):
                    if not model._base_manager.db_manager(using).filter(pk=pk).exists():
                        deleted += FencingMark.objects.using(using).filter(pk=key).delete()[0]
            except LockTimeout:
                busy += 1
        return deleted, busy, untraced
