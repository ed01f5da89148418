"""The example shop: the demo's ``Subscription`` machine served over HTTP and worked on by Celery.

The Celery app is imported here so that every process that sends a task (gunicorn workers
included) uses the app that names the Redis broker, not Celery's default AMQP URL.
"""

from .celery import app as celery_app

__all__ = ("celery_app",)
