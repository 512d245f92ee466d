"""The Celery application of the MedCor backend."""

import os

from celery import Celery, signals

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "medcor_backend2.settings")


def _defer_admin(**kwargs):
    # A worker or beat, about to load its modules: Celery's Django fixup calls django.setup() on
    # this same signal, and receivers run in the order they connected, so this one, connected
    # before the app (and its fixup) exists, runs first (medcor_backend2/apps.py says why).
    from .apps import defer_discovery

    defer_discovery()


signals.import_modules.connect(_defer_admin, weak=False)

app = Celery("medcor_backend2")
# Every Celery setting lives in Django settings under the CELERY_ prefix.
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
