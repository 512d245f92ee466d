"""WSGI entry point of the post_office peer."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "post_office_site.settings")
application = get_wsgi_application()
