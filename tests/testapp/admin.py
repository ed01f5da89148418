"""The admin of the test app: ``Invoice`` through ``StateMachineAdminMixin`` (test_admin*.py)."""

from __future__ import annotations

from django.contrib import admin

from dsm_redis.admin import StateMachineAdminMixin
from tests.testapp.models import Invoice


@admin.register(Invoice)
class InvoiceAdmin(StateMachineAdminMixin, admin.ModelAdmin):
    list_display = ("id", "status", "paid")
    transition_lock_timeout = 0.5
