"""The database side of fencing (the highest fencing token committed per object), the applied
asynchronous transitions, and the transition history (``TransitionRecord``, written by ``history.py``)."""

from __future__ import annotations

from typing import Any

from django.apps import apps
from django.db import models
from django.utils.timezone import now


class FencingMark(models.Model):
    """Written in the same transaction as the object's row; a lower token is refused (``fence.py``)."""

    object_key = models.CharField(max_length=255, primary_key=True)
    token = models.BigIntegerField()
    # The lease that wrote ``token``: an equal token from another lease is refused (fence.py).
    owner = models.CharField(max_length=64, default="")

    class Meta:
        db_table = "dsm_redis_fencing_mark"
        verbose_name = "fencing mark"

    def __str__(self) -> str:
        return f"{self.object_key} @ {self.token}"


class AppliedTask(models.Model):
    """Asynchronous transitions already applied, written in the transition's own transaction.

    A redelivered or duplicated task finds its id here and does nothing, even for a self-loop edge
    whose state alone cannot tell a duplicate apart. One row per asynchronous edge or
    ``async_transition_to`` (its task id), one per step of an ``async_transition_through`` walk
    (``<task id>:<hash of the step's source state>``); prune old rows (beyond your broker's
    redelivery horizon) as you like.
    """

    task_id = models.CharField(max_length=255, primary_key=True)
    object_key = models.CharField(max_length=255)
    applied_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        db_table = "dsm_redis_applied_task"

    def __str__(self) -> str:
        return f"{self.task_id} on {self.object_key}"


class TransitionRecord(models.Model):
    """One committed transition (or the creation of an object) of a machine with history on.

    Written in the transition's own transaction (``history.py``): it exists exactly when the
    transition committed. ``source`` is None for a creation; ``failed_edge`` names the edge whose
    ``TransitionFailed`` diverted the object to ``target``.
    """

    # The object: its model's label (``app_label.model``, the content type's natural key, so that
    # ``django.contrib.contenttypes`` stays optional) and its primary key as text.
    model = models.CharField(max_length=100)
    object_id = models.CharField(max_length=255)
    field = models.CharField(max_length=100)
    edge = models.CharField(max_length=100, blank=True)
    failed_edge = models.CharField(max_length=100, blank=True)
    source = models.JSONField(null=True)
    target = models.JSONField(null=True)
    kwargs = models.JSONField(default=dict, blank=True)
    fencing_token = models.BigIntegerField(null=True)
    lease_owner = models.CharField(max_length=64, blank=True)
    # The actor: a model's label and primary key (a user), or only a string id (``actor_model`` empty).
    actor_model = models.CharField(max_length=100, blank=True)
    actor_id = models.CharField(max_length=255, blank=True)
    actor_label = models.CharField(max_length=255, blank=True)
    task_id = models.CharField(max_length=255, blank=True)
    created_at = models.DateTimeField(default=now, db_index=True)

    class Meta:
        db_table = "dsm_redis_transition_record"
        ordering = ["-id"]
        indexes = [models.Index(fields=["model", "object_id"], name="dsm_redis_record_object")]
        verbose_name = "transition record"

    def __str__(self) -> str:
        if self.source is None:
            return f"created in {self.target!r}"
        return f"{self.source!r} -[{self.edge or 'None'}]-> {self.target!r}"

    @property
    def actor(self) -> Any:
        """The actor as an object when it was one (None if deleted since), else its string id."""
        if not self.actor_model:
            return self.actor_id or None
        try:
            model = apps.get_model(self.actor_model)
        except (LookupError, ValueError):
            return None
        return model._default_manager.filter(pk=self.actor_id).first()
