"""``StateMachineAdminMixin``: a model's state machines on its Django admin change form.

For each machine of the model: the state field read-only; one button per edge allowed from the
current state (preconditions on the displayed object, ``@permission`` for the user), each its own
CSRF-protected POST form (a small form for the side effect's arguments); a click runs the edge
through the normal protected path (lease, row lock, fencing) as the user (``dsm_redis.actor``). A
refused transition (``TransitionException``), a lease not obtained in time (``LockTimeout``) or any
other ``LockError`` (``StaleFencingToken``...) becomes an admin message, never a server error. The
current lease holder (owner, TTL left, fencing token) is shown while the object is locked, and the
machine's history (``history.py``) is a read-only table under the form. One bulk action per edge
transitions the selected objects one by one and reports successes and refusals.

Usage: ``class OrderAdmin(StateMachineAdminMixin, admin.ModelAdmin): ...``. Needs
``django.contrib.admin`` and ``django.contrib.messages`` (this module is only imported by a
project's ``admin.py``).
"""

from __future__ import annotations

import inspect
import json
from functools import partial
from typing import TYPE_CHECKING, Any

from django import forms
from django.contrib import messages
from django.contrib.admin.utils import quote, unquote
from django.core.exceptions import PermissionDenied
from django.db.models import Model
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, HttpResponseRedirect
from django.urls import path, reverse

from . import protocol
from .backends import get_backend
from .exceptions import DsmRedisError, LockError, TransitionException
from .history import actor, history_of
from .keys import object_key
from .lease import object_lock
from .machine import plain
from .management.commands.dsm_graph import machine_fields
from .permissions import has_permission

if TYPE_CHECKING:
    from .fields import StateMachineField
    from .machine import StateMachine, Transition

__all__ = ["StateMachineAdminMixin"]

_EMPTY = inspect.Parameter.empty
_TYPES: dict[Any, type[forms.Field]] = {
    int: forms.IntegerField,
    "int": forms.IntegerField,
    float: forms.FloatField,
    "float": forms.FloatField,
    bool: forms.BooleanField,
    "bool": forms.BooleanField,
    str: forms.CharField,
    "str": forms.CharField,
}


def edge_id(transition: Transition) -> str:
    """How a button names its edge: the side effect's name, or ``to:<target as JSON>`` for a None edge."""
    return transition.name or f"to:{json.dumps(transition.end)}"


def state_text(machine: StateMachine, model: Any, state: Any) -> str:
    """A state as a person reads it: its choice's text when the state field has choices."""
    value = plain(state)
    meta = model._meta
    for choice, text in meta.get_field(machine.state_field_name).flatchoices:
        if plain(choice) == value:
            return str(text)
    return str(value)


def edge_label(machine: StateMachine, model: Any, transition: Transition) -> str:
    return transition.name or f"to {state_text(machine, model, transition.end)}"


def arguments_form(machine: StateMachine, transition: Transition) -> type[forms.Form]:
    """A form of the side effect's arguments (after ``machine, instance, transition``), typed by
    their annotations or defaults; an untyped value is read as JSON, else kept as text."""
    fields: dict[str, forms.Field] = {}
    if transition.side_effect is not None:
        secret = set(getattr(machine, "history_redact", ()))
        params = list(inspect.signature(transition.side_effect).parameters.values())[3:]
        for p in params:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            kind = _TYPES.get(p.annotation) or (_TYPES.get(type(p.default)) if p.default is not _EMPTY else None)
            field_class = kind or forms.CharField
            required = p.default is _EMPTY and field_class is not forms.BooleanField
            options: dict[str, Any] = {"required": required, "label": p.name.replace("_", " ")}
            if p.name in secret and field_class is forms.CharField:
                options["widget"] = forms.PasswordInput
            if kind is None:
                options["help_text"] = "JSON, or text"
            fields[p.name] = field_class(**options)
            fields[p.name].untyped = kind is None  # type: ignore[attr-defined]
    return type("TransitionArguments", (forms.Form,), fields)


def _arguments(form: forms.Form) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, field in form.fields.items():
        value = form.cleaned_data.get(name)
        if value in (None, "") and not field.required:
            continue  # the side effect's default
        if getattr(field, "untyped", False) and isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                pass
        values[name] = value
    return values


class StateMachineAdminMixin:
    """Mix into a ``ModelAdmin`` of a model with ``StateMachineField``s (before ``ModelAdmin``)."""

    change_form_template = "admin/dsm_redis/change_form.html"
    #: The machine fields shown (default: every ``StateMachineField`` of the model).
    state_machine_fields: tuple[str, ...] | None = None
    #: Seconds a click waits for the object's lease before reporting it busy (``LockTimeout``).
    transition_lock_timeout: float = 2.0
    #: History records shown under the form (the newest).
    history_limit: int = 50

    model: type[Model]
    admin_site: Any
    opts: Any

    # -- the machines -------------------------------------------------------------------------

    def get_state_machine_fields(self) -> dict[str, StateMachineField]:
        found = machine_fields(self.model)
        if self.state_machine_fields is not None:
            return {name: found[name] for name in self.state_machine_fields}
        return found

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        readonly = list(super().get_readonly_fields(request, obj))  # type: ignore[misc]
        for field in self.get_state_machine_fields().values():
            if field.state_field_name not in readonly:
                readonly.append(field.state_field_name)
        return readonly

    def allowed_edges(self, request: HttpRequest, obj: Any, field: StateMachineField) -> list[Transition]:
        """The edges shown as buttons: allowed from the displayed state, for this user."""
        if not self.has_change_permission(request, obj):  # type: ignore[attr-defined]
            return []
        bound = getattr(obj, field.name)
        return list(bound.allowed_transitions(request.user))

    def may_take(self, request: HttpRequest, obj: Any, transition: Transition) -> bool:
        """Whether the user may run ``transition`` on ``obj``: the object-level change permission
        (as the change form asks it) and the edge's ``@permission``."""
        return bool(self.has_change_permission(request, obj)) and has_permission(  # type: ignore[attr-defined]
            transition, request.user, obj
        )

    # -- the change form ----------------------------------------------------------------------

    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        """Save an edited object's changed columns only, never its state columns nor its fencing
        mark: a plain ``save()`` writes every column as the form read it, undoing a transition
        that committed since (its history record would then disagree with the row)."""
        if not change or obj._meta.pk.name in form.changed_data:  # a new row (an edited key inserts one)
            super().save_model(request, obj, form, change)  # type: ignore[misc]
            return
        from .fence import FencingTokenField

        owned = {f.state_field_name for f in machine_fields(self.model).values()}
        columns = [
            f.name
            for f in obj._meta.concrete_fields
            if f.name not in owned
            and not isinstance(f, FencingTokenField)
            and (f.name in form.changed_data or getattr(f, "auto_now", False))
        ]
        obj.save(update_fields=columns)


    def render_change_form(
        self, request: HttpRequest, context: dict[str, Any], add: bool = False, change: bool = False,
        form_url: str = "", obj: Any = None,
    ) -> Any:  # fmt: skip
        if obj is not None and obj.pk is not None and not add:
            context["dsm_machines"] = [
                self._panel(request, obj, name, f) for name, f in self.get_state_machine_fields().items()
            ]
        return super().render_change_form(request, context, add=add, change=change, form_url=form_url, obj=obj)  # type: ignore[misc]

    def _panel(self, request: HttpRequest, obj: Any, name: str, field: StateMachineField) -> dict[str, Any]:
        machine = field.machine
        assert machine is not None
        edges = [
            {
                "id": edge_id(t),
                "slug": edge_id(t).replace(":", "-").replace('"', ""),
                "label": edge_label(machine, obj, t),
                "form": arguments_form(machine, t)(),
            }
            for t in self.allowed_edges(request, obj, field)
        ]
        return {
            "field": name,
            "title": name.replace("_", " "),
            "state": state_text(machine, obj, machine.current_state(obj)),
            "edges": edges,
            "action": reverse(
                f"{self.admin_site.name}:{self.opts.app_label}_{self.opts.model_name}_transition", args=[quote(obj.pk)]
            ),
            "lease": self.lease_holder(obj),
            "history_on": machine.history,
            "history": [
                (r, json.dumps(r.kwargs, ensure_ascii=False) if r.kwargs else "")
                for r in (history_of(machine, obj)[: self.history_limit] if machine.history else [])
            ],
        }

    def lease_holder(self, obj: Any) -> dict[str, Any] | None:
        """The current holder of the object's lease (owner, ttl, fencing_token), None when free."""
        try:
            info = get_backend().describe(object_key(obj))
        except DsmRedisError:
            return {"owner": "(the lock backend is unavailable)", "ttl": None, "fencing_token": None}
        return info if info.get("owner") else None

    # -- the buttons ----------------------------------------------------------------------------

    def get_urls(self) -> list[Any]:
        name = f"{self.opts.app_label}_{self.opts.model_name}_transition"
        view = self.admin_site.admin_view(self.transition_view)  # login, staff and CSRF checks
        return [path("<path:object_id>/transition/", view, name=name), *super().get_urls()]  # type: ignore[misc]

    def transition_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])  # a transition is never a GET
        obj = self.get_object(request, unquote(object_id))  # type: ignore[attr-defined]
        if obj is None:
            raise PermissionDenied
        if not self.has_change_permission(request, obj):  # type: ignore[attr-defined]
            raise PermissionDenied
        change_url = reverse(
            f"{self.admin_site.name}:{self.opts.app_label}_{self.opts.model_name}_change", args=[quote(obj.pk)]
        )
        field = self.get_state_machine_fields().get(request.POST.get("_machine", ""))
        if field is None or field.machine is None:
            messages.error(request, "No such state machine.")
            return HttpResponseRedirect(change_url)
        machine = field.machine
        wanted = request.POST.get("_edge", "")
        edges = [t for t in machine.edges if edge_id(t) == wanted]
        if not edges:
            messages.error(request, f"{type(machine).__name__} has no edge {wanted!r}.")
            return HttpResponseRedirect(change_url)
        current = machine.current_state(obj)
        transition = next((t for t in edges if t.start == current), edges[0])
        if not has_permission(transition, request.user, obj):
            raise PermissionDenied
        form = arguments_form(machine, transition)(request.POST)
        if not form.is_valid():
            errors = "; ".join(f"{name}: {' '.join(str(m) for m in e)}" for name, e in form.errors.items())
            messages.error(request, f"{edge_label(machine, obj, transition)}: {errors}")
            return HttpResponseRedirect(change_url)
        self.run_transition(request, obj, field, transition, _arguments(form))
        return HttpResponseRedirect(change_url)

    def run_transition(
        self, request: HttpRequest, obj: Any, field: StateMachineField, transition: Transition, kwargs: dict[str, Any]
    ) -> bool:
        """Run one edge as the request's user; report the outcome as a message. True if it committed
        to the edge's own target (a ``TransitionFailed`` diversion is reported as a warning)."""
        machine = field.machine
        assert machine is not None
        label = edge_label(machine, obj, transition)
        before = state_text(machine, obj, machine.current_state(obj))
        try:
            # The lease first, bounded: a busy object is reported within the timeout, not after the
            # lock's default wait; the transition inside re-enters it,
            # and judges the permissions again on the row it locks (_judged).
            with actor(request.user), object_lock(obj, timeout=self.transition_lock_timeout):
                state = protocol.run(machine, obj, partial(self._judged, request, obj, field, transition), (), kwargs)
        except PermissionDenied:
            messages.error(request, f"{obj}: you may not take {label}.")
            return False
        except LockError as exc:
            messages.error(request, f"{obj}: {label} not run: {_lock_message(exc)}")
            return False
        except (TransitionException, TypeError) as exc:
            messages.error(request, f"{obj}: {label} refused: {exc}")
            return False
        after = state_text(machine, obj, state)
        if plain(state) != transition.end:
            messages.warning(request, f"{obj}: {label} failed; it moved from {before} to {after}.")
            return False
        messages.success(request, f"{obj}: {label}: {before} → {after}.")
        return True

    def _judged(
        self, request: HttpRequest, obj: Any, field: StateMachineField, transition: Transition, row: Any
    ) -> Any:
        """``transition`` on ``row`` (read under the row lock), if the user may take it there.

        The view judged the permissions on the object as it read it; another holder may have
        changed the row since, and a check on its fields would pass on stale values. Judged again
        here, inside the transition's transaction, on the row the edge runs on.
        """
        chosen = getattr(obj, field.name)._exactly(transition, row)
        if not self.may_take(request, row, chosen):
            raise PermissionDenied  # rolls the transaction back: nothing ran
        return chosen

    # -- the bulk actions -----------------------------------------------------------------------

    def get_actions(self, request: HttpRequest) -> Any:
        actions = super().get_actions(request)  # type: ignore[misc]
        if getattr(self, "actions", ()) is None or not self.has_change_permission(request):  # type: ignore[attr-defined]
            return actions
        for name, field in self.get_state_machine_fields().items():
            machine = field.machine
            assert machine is not None
            seen: set[str] = set()
            for t in machine.edges:
                ident = edge_id(t)
                if ident in seen or any(f.required for f in arguments_form(machine, t)().fields.values()):
                    continue  # one action per edge name; edges needing arguments take them one by one
                seen.add(ident)
                action_name = f"dsm_{name}_{ident}".replace(":", "_").replace('"', "")
                description = f"{name.replace('_', ' ')}: {edge_label(machine, self.model, t)}"
                actions[action_name] = (self._bulk_action(field, ident), action_name, description)
        return actions

    def _bulk_action(self, field: StateMachineField, ident: str) -> Any:
        def action(modeladmin: Any, request: HttpRequest, queryset: Any) -> None:
            machine = field.machine
            assert machine is not None
            done = refused = 0
            for obj in queryset:  # one by one: each its own lease and transaction
                current = machine.current_state(obj)
                edge = next((t for t in machine.edges_from(current) if edge_id(t) == ident), None)
                if edge is None:
                    messages.error(request, f"{obj}: no edge {ident!r} from {state_text(machine, obj, current)}.")
                    refused += 1
                elif not self.may_take(request, obj, edge):  # per object, as a button click is
                    messages.error(request, f"{obj}: you may not take {edge_label(machine, obj, edge)}.")
                    refused += 1
                elif self.run_transition(request, obj, field, edge, {}):
                    done += 1
                else:
                    refused += 1
            messages.info(request, f"{done} transitioned, {refused} refused.")

        return action


def _lock_message(exc: LockError) -> str:
    from .exceptions import LockTimeout, StaleFencingToken

    if isinstance(exc, LockTimeout):
        return "another process holds this object's lease; try again in a moment."
    if isinstance(exc, StaleFencingToken):
        return "a newer holder of this object's lease has written it; reload and try again."
    return f"{type(exc).__name__}: {exc}"
