"""A small Django project sending its contact form with django-post_office and its Celery task."""

from .celery import app as celery_app

__all__ = ["celery_app"]
