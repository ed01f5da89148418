"""The database side of fencing: the highest fencing token committed per object."""

from __future__ import annotations

from django.db import models


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
