"""The short acknowledgement to the submitter, sent after their request went out.

Anyone can type anyone's address into the form, so the acknowledgement is capped where it lands:
at most one per mailbox per EMAIL_CONFIRMATION_INTERVAL, the mailbox being the normalised
address (case, +tags and Gmail's dots do not make a new one), and at most
EMAIL_CONFIRMATION_DOMAIN_DAILY_LIMIT per destination domain in a rolling 24 h. Each cap is
taken atomically in the shared cache (add, incr), so two workers cannot both pass it, and is
checked against the rows too, so a flushed cache does not reopen it.
"""

import logging
import time
from datetime import timedelta

from django.core.cache import cache
from django.utils import timezone

from . import brake, conf, delivery, quotas
from .encryption import address_index, domain_index, normalise_address
from .models import EmailRequest
from .outcomes import AttemptOutcome

logger = logging.getLogger(__name__)

DAY_SECONDS = quotas.DAY_SECONDS
# The rolling day is counted in hourly buckets in the cache: a slot comes back within an hour of
# its acknowledgement turning 24 h old.
BUCKET_SECONDS = 3600
BUCKETS = DAY_SECONDS // BUCKET_SECONDS


def send_confirmation(email_request):
    """Acknowledge receipt to the submitter within the mailbox and domain caps; never raise."""
    # Called after the row was recorded SENT, inside a batch: a failing cache or database here
    # must not stop the batch's other mails.
    try:
        return _send_confirmation(email_request)
    except Exception as exc:
        logger.error(
            "Email request %s acknowledgement not sent: %s",
            email_request.pk,
            type(exc).__name__,
            extra={"email_request_id": str(email_request.pk)},
        )
        return False


def _send_confirmation(email_request):
    # A staff reply is itself the answer: nobody acknowledges it.
    if email_request.is_reply or not conf.send_confirmation() or not _within_sending_limits():
        return False
    mailbox = normalise_address(email_request.email)
    domain = mailbox.rpartition("@")[2]
    claim = _claim(mailbox, domain)
    if claim is None:
        logger.info(
            "Email request %s acknowledgement skipped: its mailbox or domain had one recently",
            email_request.pk,
            extra={"email_request_id": str(email_request.pk)},
        )
        return False
    result = _send_counted(delivery.build_confirmation_message(email_request))
    if result.outcome == AttemptOutcome.SENT:
        EmailRequest.objects.filter(pk=email_request.pk).update(confirmation_sent_at=timezone.now())
        return True
    claim.release()
    EmailRequest.objects.filter(pk=email_request.pk).update(confirmation_error=result.error_message)
    # The server's text often quotes the refused address: the line names the code and class only.
    logger.warning(
        "Email request %s acknowledgement not sent: %s %s",
        email_request.pk,
        result.smtp_code or "-",
        result.error_class,
        extra={"email_request_id": str(email_request.pk), "smtp_code": result.smtp_code},
    )
    return False


class _Claim:
    """The caps one acknowledgement has taken in the cache, to give back if it is not sent."""

    def __init__(self, mailbox_key, bucket_key):
        self.mailbox_key, self.bucket_key = mailbox_key, bucket_key

    def release(self):
        cache.delete(self.mailbox_key)
        if self.bucket_key is not None:
            _decrement(self.bucket_key)


def _claim(mailbox, domain):
    """Take the mailbox's and the domain's cap for one acknowledgement, or return None."""
    if _capped_by_rows(mailbox):
        return None
    interval = conf.confirmation_interval()
    mailbox_key = f"email-confirmation:{address_index(mailbox)}"
    if not cache.add(mailbox_key, 1, timeout=interval):
        return None
    bucket_key = None
    if conf.confirmation_domain_daily_limit() > 0:
        bucket_key = _take_domain_slot(domain)
        if bucket_key is None:
            cache.delete(mailbox_key)
            return None
    return _Claim(mailbox_key, bucket_key)


def _domain_keys(domain, now=None):
    """The cache keys of the domain's hourly buckets of the last 24 h, the current one first."""
    # Keyed, as the rows' index is: a plain hash of a domain is undone by hashing a list of
    # domains, and a clinic's or a family's own domain can name a person.
    digest = domain_index(domain)
    hour = int((time.time() if now is None else now) // BUCKET_SECONDS)
    return [f"email-confirmation-domain:{digest}:{hour - age}" for age in range(BUCKETS)]


def _take_domain_slot(domain, now=None):
    """Count one acknowledgement to `domain` if the rolling day has room; return its bucket's key.

    The current bucket is incremented first and the day summed after, so that of two workers
    racing for the last slot at most one stays counted: neither can see a total without its own.
    """
    limit = conf.confirmation_domain_daily_limit()
    current, *older = _domain_keys(domain, now)
    cache.add(current, 0, timeout=DAY_SECONDS + BUCKET_SECONDS)
    try:
        count = cache.incr(current)
    except ValueError:  # expired between add and incr: start the bucket again
        cache.add(current, 1, timeout=DAY_SECONDS + BUCKET_SECONDS)
        count = 1
    total = count + sum(int(value) for value in cache.get_many(older).values())
    if total > limit:
        _decrement(current)
        return None
    return current


def _decrement(key):
    try:
        cache.decr(key)
    except ValueError:
        pass  # the bucket expired: nothing left to give back


def _capped_by_rows(mailbox):
    """Tell from the rows whether the mailbox had an acknowledgement within the interval, or the
    domain has had its day's share; what a flushed cache forgets, the rows still know.

    Addresses are encrypted at rest, so both are found by their keyed hashes (models.py).
    """
    now = timezone.now()
    interval = timedelta(seconds=conf.confirmation_interval())
    limit = conf.confirmation_domain_daily_limit()
    acknowledged = EmailRequest.objects.filter(confirmation_sent_at__isnull=False)
    if acknowledged.for_address(mailbox).filter(confirmation_sent_at__gte=now - interval).exists():
        return True
    if limit <= 0:
        return False
    day = acknowledged.filter(
        email_domain_index=domain_index(mailbox),
        confirmation_sent_at__gte=now - timedelta(seconds=DAY_SECONDS),
    )
    # Only this domain's acknowledgements of the last day: at most its daily cap of rows.
    return day[:limit].count() >= limit


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
    # The submitter's mailbox refusing it (450 4.2.1: it receives too fast) carries no brake
    # (delivery.classify); only the account's or server's trouble stops all sending.
    if result.is_provider_wide:
        brake.engage_for(result)
    return result
