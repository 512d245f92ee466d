"""WSGI entry point of the django-mailer peer."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mailer_site.settings")
application = get_wsgi_application()
