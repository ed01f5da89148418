"""Celery tasks of the example. ``deposit`` holds the subscription's lease while it runs, whichever
worker process (on whichever host) picks it up; the transition inside re-enters that lease."""

from celery import shared_task

from dsm_redis.celery import locked_task


@shared_task(bind=True, acks_late=True)
@locked_task("dsm_redis_demo.Subscription", pk_arg="subscription_id", on_contention="retry")
def deposit(self, subscription_id, *, lease):
    from dsm_redis.tools.demo.models import Subscription

    sub = Subscription.objects.get(pk=subscription_id)
    sub.machine.deposit()  # fenced with lease.fencing_token, committed before the lease is released
    return sub.balance
