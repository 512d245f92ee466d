"""The Celery app, as post_office's documentation sets it up (autodiscovered post_office.tasks)."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "post_office_site.settings")

app = Celery("post_office_site")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
