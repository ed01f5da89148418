"""``manage.py dsm_graph app_label.Model [--field NAME] [--format mermaid|dot]``.

Prints a model's state machine as a diagram: states labelled from the state field's choices, one
edge per transition labelled with its side effect's name (unlabelled when it has none), edges with
a precondition marked ``[guarded]`` (dashed in DOT), the start state (``start``, else the state
field's default) entered from ``[*]``, and states without outgoing edges leading to ``[*]``.
"""

from __future__ import annotations

from typing import Any

from django.apps import apps
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db.models import NOT_PROVIDED, Model

from dsm_redis.fields import StateMachineField
from dsm_redis.machine import StateMachine, Transition, plain

GUARDED = "[guarded]"


def machine_fields(model: type[Model]) -> dict[str, StateMachineField]:
    """The ``StateMachineField``s of ``model`` (inherited ones included), by attribute name."""
    found: dict[str, StateMachineField] = {}
    for klass in reversed(model.__mro__):
        for name, value in vars(klass).items():
            if isinstance(value, StateMachineField):
                found[name] = value
    return found


class Graph:
    """The machine as plain data: states (value, label) in a stable order, edges, start, ends."""

    def __init__(self, model: type[Model], field: StateMachineField) -> None:
        machine = field.machine
        assert machine is not None
        self.title = f"{model._meta.label}.{field.name} ({type(machine).__name__})"
        self.transitions: tuple[Transition, ...] = machine.edges
        states: list[Any] = []
        for t in self.transitions:
            for state in (t.start, t.end):
                if state not in states:
                    states.append(state)
        self.ids = {state: f"s{index}" for index, state in enumerate(states)}
        self.labels = {state: _label(model, machine, state) for state in states}
        self.start = _start(model, machine)
        self.ends = [s for s in states if not any(t.start == s for t in self.transitions)]

    def edge_label(self, t: Transition) -> str:
        parts = [t.name or ""]
        if t.precondition is not None:
            parts.append(GUARDED)
        return " ".join(p for p in parts if p)

    def mermaid(self) -> str:
        lines = [f"%% {self.title}", "stateDiagram-v2"]
        for state, ident in self.ids.items():
            # Mermaid: a quoted description; '"' has no escape but its entity code.
            lines.append(f'    state "{self.labels[state].replace(chr(34), "#quot;")}" as {ident}')
        if self.start in self.ids:
            lines.append(f"    [*] --> {self.ids[self.start]}")
        for t in self.transitions:
            label = self.edge_label(t).replace(":", " ").replace(";", " ")
            lines.append(f"    {self.ids[t.start]} --> {self.ids[t.end]}" + (f" : {label}" if label else ""))
        for state in self.ends:
            lines.append(f"    {self.ids[state]} --> [*]")
        return "\n".join(lines) + "\n"

    def dot(self) -> str:
        lines = [f"digraph {_dot_quote(self.title)} {{", "    rankdir=LR;", "    node [shape=box, style=rounded];"]
        if self.start in self.ids:
            lines.append('    __start__ [shape=point, label=""];')
        for state, ident in self.ids.items():
            extra = ", peripheries=2" if state in self.ends else ""
            lines.append(f"    {ident} [label={_dot_quote(self.labels[state])}{extra}];")
        if self.start in self.ids:
            lines.append(f"    __start__ -> {self.ids[self.start]};")
        for t in self.transitions:
            attrs = [f"label={_dot_quote(self.edge_label(t))}"]
            if t.precondition is not None:
                attrs.append("style=dashed")
            lines.append(f"    {self.ids[t.start]} -> {self.ids[t.end]} [{', '.join(attrs)}];")
        lines.append("}")
        return "\n".join(lines) + "\n"


def _label(model: type[Model], machine: StateMachine, state: Any) -> str:
    """The state field's choices label for ``state``, else the value itself."""
    try:
        choices = getattr(model._meta.get_field(machine.state_field_name), "flatchoices", None) or []
    except Exception:  # noqa: BLE001 - no such field: the machine's own checks report it
        choices = []
    for value, text in choices:
        if plain(value) == state:
            return str(text)
    return str(state)


def _start(model: type[Model], machine: StateMachine) -> Any:
    if machine.start is not None:
        return plain(machine.start)
    try:
        field = model._meta.get_field(machine.state_field_name)
    except Exception:  # noqa: BLE001
        return None
    default = getattr(field, "default", NOT_PROVIDED)
    if default is NOT_PROVIDED:
        return None
    return plain(default() if callable(default) else default)


def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class Command(BaseCommand):
    help = (
        "Print a model's state machine as a Mermaid (default) or Graphviz DOT diagram: states "
        "labelled from the state field's choices, edges named after their side effects, "
        f"edges with a precondition marked {GUARDED}."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("model", metavar="app_label.Model", help="the model, e.g. shop.Order")
        parser.add_argument(
            "--field",
            help="the StateMachineField attribute to draw, when the model has several",
        )
        parser.add_argument("--format", choices=("mermaid", "dot"), default="mermaid")

    def handle(self, *args: Any, **options: Any) -> None:
        label: str = options["model"]
        if label.count(".") != 1:
            raise CommandError(f"{label!r}: name the model as app_label.Model, e.g. shop.Order")
        try:
            model = apps.get_model(label)
        except LookupError as exc:
            raise CommandError(f"{label!r} is not an installed model: {exc}") from None
        fields = machine_fields(model)
        if not fields:
            raise CommandError(f"{model._meta.label} has no StateMachineField")
        name = options["field"]
        if name is None:
            if len(fields) > 1:
                raise CommandError(
                    f"{model._meta.label} has several state machines; pick one with --field "
                    f"({', '.join(sorted(fields))})"
                )
            (name,) = fields
        elif name not in fields:
            raise CommandError(
                f"{model._meta.label} has no StateMachineField {name!r} (it has: {', '.join(sorted(fields))})"
            )
        graph = Graph(model, fields[name])
        self.stdout.write(graph.mermaid() if options["format"] == "mermaid" else graph.dot(), ending="")
