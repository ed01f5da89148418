"""``manage.py dsm_history app_label.Model pk [--field NAME] [--json]``.

Prints an object's transition history, newest first: a table (time, machine field, edge, source,
target, fencing token, actor, task id), or one JSON list of records with ``--json``.
"""

from __future__ import annotations

import json
from typing import Any

from django.apps import apps
from django.core.management.base import BaseCommand, CommandError, CommandParser

from dsm_redis.history import history_of
from dsm_redis.management.commands.dsm_graph import machine_fields


def as_dict(record: Any) -> dict[str, Any]:
    return {
        "id": record.pk,
        "time": record.created_at.isoformat(),
        "field": record.field,
        "edge": record.edge,
        "failed_edge": record.failed_edge,
        "source": record.source,
        "target": record.target,
        "kwargs": record.kwargs,
        "fencing_token": record.fencing_token,
        "lease_owner": record.lease_owner,
        "actor": record.actor_label,
        "actor_model": record.actor_model,
        "actor_id": record.actor_id,
        "task_id": record.task_id,
    }


class Command(BaseCommand):
    help = "Print an object's transition history (newest first)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("model", help="app_label.Model")
        parser.add_argument("pk", help="the object's primary key")
        parser.add_argument("--field", help="one state machine field of the model (default: all of them)")
        parser.add_argument("--json", action="store_true", help="print the records as a JSON list")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            model = apps.get_model(options["model"])
        except (LookupError, ValueError) as exc:
            raise CommandError(f"no model {options['model']!r}: {exc}") from None
        fields = machine_fields(model)
        if options["field"] is not None:
            if options["field"] not in fields:
                raise CommandError(f"{model._meta.label} has no state machine field {options['field']!r}")
            fields = {options["field"]: fields[options["field"]]}
        if not fields:
            raise CommandError(f"{model._meta.label} has no state machine field")
        try:
            instance = model._base_manager.get(pk=options["pk"])
        except (model.DoesNotExist, ValueError, TypeError):
            # A deleted object's history stays readable: its records name it by primary key.
            instance = model(pk=model._meta.pk.to_python(options["pk"]))
        records = sorted(
            (r for f in fields.values() if f.machine is not None for r in history_of(f.machine, instance)),
            key=lambda r: -r.pk,
        )
        if options["json"]:
            self.stdout.write(json.dumps([as_dict(r) for r in records], indent=2))
            return
        if not records:
            self.stdout.write(f"No history for {model._meta.label} {options['pk']}.")
            return
        table = [("TIME", "FIELD", "EDGE", "SOURCE", "TARGET", "TOKEN", "ACTOR", "TASK")] + [
            (
                r.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                r.field,
                (r.edge or "-") + (f" (failed: {r.failed_edge})" if r.failed_edge else ""),
                "(created)" if r.source is None else json.dumps(r.source),
                json.dumps(r.target),
                "" if r.fencing_token is None else str(r.fencing_token),
                r.actor_label,
                r.task_id,
            )
            for r in records
        ]
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        for row in table:
            self.stdout.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
