"""post_office's documented set-up: its EmailBackend in front of SMTP, its Celery integration on."""

import os

from base_settings import *  # noqa: F403 - the peers' shared settings

INSTALLED_APPS = [*INSTALLED_APPS, "post_office"]  # noqa: F405
ROOT_URLCONF = "post_office_site.urls"
EMAIL_BACKEND = "post_office.EmailBackend"
POST_OFFICE = {
    "BACKENDS": {"default": "django.core.mail.backends.smtp.EmailBackend"},
    "CELERY_ENABLED": True,
    "DEFAULT_PRIORITY": "medium",
    # Its lock file in the run's directory, not in /tmp where another bench's would collide.
    "LOCK_FILE_NAME": os.path.join(os.environ.get("PEER_VAR_DIR", "/tmp"), "post_office"),
}
CELERY_BROKER_URL = os.environ["CELERY_BROKER_URL"]
CELERY_TASK_DEFAULT_QUEUE = os.environ.get("CELERY_TASK_DEFAULT_QUEUE", "celery")
CELERY_TASK_IGNORE_RESULT = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# As the service: a message is acknowledged after its task ran, so a killed worker's is redelivered.
CELERY_TASK_ACKS_LATE = True
