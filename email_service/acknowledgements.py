"""The short acknowledgement to the submitter, sent after their request went out."""

import hashlib
import logging
from datetime import timedelta

from django.core.cache import cache
from django.utils import timezone

from . import conf, delivery
from .models import EmailRequest
from .outcomes import AttemptOutcome

logger = logging.getLogger(__name__)


def send_confirmation(email_request):
    """Acknowledge receipt to the submitter, at most once per address per interval; never raise."""
    if not conf.send_confirmation():
        return False
    now = timezone.now()
    interval = conf.confirmation_interval()
    address_key = hashlib.sha256(email_request.email.strip().lower().encode()).hexdigest()
    recently = (
        EmailRequest.objects.for_address(email_request.email)
        .filter(confirmation_sent_at__gte=now - timedelta(seconds=interval))
        .exists()
    )
    # The cache key makes the check atomic across workers; the row check survives a cache flush.
    if recently or not cache.add(f"email-confirmation:{address_key}", 1, timeout=interval):
        return False
    try:
        result = delivery.send(delivery.build_confirmation_message(email_request))
    except Exception as exc:
        result = delivery.classify(exc)
    if result.outcome == AttemptOutcome.SENT:
        EmailRequest.objects.filter(pk=email_request.pk).update(confirmation_sent_at=timezone.now())
        return True
    cache.delete(f"email-confirmation:{address_key}")
    EmailRequest.objects.filter(pk=email_request.pk).update(confirmation_error=result.error_message)
    logger.warning(
        "Email request %s acknowledgement not sent: %s",
        email_request.pk,
        result.error_message,
        extra={"email_request_id": str(email_request.pk)},
    )
    return False
