"""django-mailer's documented set-up: mail queued in its table, sent by its send_mail command."""

import os

from base_settings import *  # noqa: F403 - the peers' shared settings

INSTALLED_APPS = [*INSTALLED_APPS, "mailer"]  # noqa: F405
ROOT_URLCONF = "mailer_site.urls"
MAILER_EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
# Its lock file in the run's directory, not in the working directory another bench shares.
MAILER_LOCK_PATH = os.path.join(os.environ.get("PEER_VAR_DIR", "/tmp"), "send_mail")
