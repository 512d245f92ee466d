"""The short acknowledgement to the submitter, sent after their request went out."""

import hashlib
import logging
from datetime import timedelta

from django.core.cache import cache
from django.utils import timezone

from . import brake, conf, delivery, quotas
from .models import EmailRequest
from .outcomes import AttemptOutcome

logger = logging.getLogger(__name__)


def send_confirmation(email_request):
    """Acknowledge receipt to the submitter, at most once per address per interval; never raise."""
    if not conf.send_confirmation() or not _within_sending_limits():
        return False
    now = timezone.now()
    interval = conf.confirmation_interval()
    address_key = hashlib.sha256(email_request.email.strip().lower().encode()).hexdigest()
    recently = EmailRequest.objects.filter(
        email__iexact=email_request.email, confirmation_sent_at__gte=now - timedelta(seconds=interval)
    ).exists()
    # The cache key makes the check atomic across workers; the row check survives a cache flush.
    if recently or not cache.add(f"email-confirmation:{address_key}", 1, timeout=interval):
        return False
    result = _send_counted(delivery.build_confirmation_message(email_request))
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


def _within_sending_limits():
    """Say whether an acknowledgement may go: sending runs, and support mail keeps its share of the day."""
    return brake.current().gate() is brake.Gate.RUN and quotas.allows_acknowledgement()


def _send_counted(message):
    """Send one acknowledgement within the quotas; a provider-wide outcome engages the brake."""
    try:
        reservation = quotas.reserve()
    except quotas.QuotaReached as reached:
        return delivery.DeliveryResult(AttemptOutcome.TRANSIENT, None, "QuotaReached", str(reached))
    try:
        result = delivery.send(message)
    except Exception as exc:
        result = delivery.classify(exc)
    if result.outcome != AttemptOutcome.SENT:
        quotas.give_back(reservation)
    if result.is_provider_wide:
        brake.engage_for(result)
    return result
