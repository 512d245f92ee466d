"""The named ends of a delivery attempt, shared by `delivery` (which reports them) and `models`."""

from django.db import models
from django.utils.translation import gettext_lazy as _


class AttemptOutcome(models.TextChoices):
    SENT = "sent", _("Sent")
    TRANSIENT = "transient", _("Transient failure")
    PERMANENT = "permanent", _("Permanent failure")
    CRASHED = "crashed", _("Worker lost")


class BrakeKind(models.TextChoices):
    """Why sending stopped as a whole: an outcome about the account or the server, not one mail."""

    QUOTA = "quota", _("Daily sending limit")
    THROTTLE = "throttle", _("Throttled by the server")
    AUTH_TEMPORARY = "auth_temporary", _("Temporary authentication failure")
    CREDENTIALS = "credentials", _("Credentials refused")
    TLS = "tls", _("TLS or certificate failure")
    CONNECTION = "connection", _("SMTP server unreachable")
    OPERATOR = "operator", _("Paused by an operator")
    SUPPORT_ADDRESS = "support_address", _("Support address refused")
    ENCRYPTION_KEYS = "encryption_keys", _("Attachment key missing")


# Waiting cannot fix a setting: these hold until an operator resumes sending.
OPERATOR_ONLY_BRAKES = frozenset(
    {
        BrakeKind.CREDENTIALS,
        BrakeKind.TLS,
        BrakeKind.OPERATOR,
        BrakeKind.SUPPORT_ADDRESS,
        BrakeKind.ENCRYPTION_KEYS,
    }
)
