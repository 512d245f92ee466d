"""The named ends of a delivery attempt, shared by `delivery` (which reports them) and `models`."""

from django.db import models
from django.utils.translation import gettext_lazy as _


class AttemptOutcome(models.TextChoices):
    SENT = "sent", _("Sent")
    TRANSIENT = "transient", _("Transient failure")
    PERMANENT = "permanent", _("Permanent failure")
    CRASHED = "crashed", _("Worker lost")
