"""Celery tasks: each fetches by id or runs one service function."""

import logging
import os

from celery import shared_task
from celery.signals import worker_process_shutdown
from django.core.exceptions import ValidationError

from . import conf, delivery, outbox, retention, sending

logger = logging.getLogger(__name__)


@shared_task(
    bind=True,
    name="email_service.tasks.send_email_task",
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
)
def send_email_task(self, email_request_id, carry_on=False, wake=None):
    """Send this email request if it can be claimed, and with it other due ones, a batch at a time."""
    try:
        # The time limits came with the message, from the publisher's settings; the claim must
        # outlive the hard one whatever this worker's own settings say.
        hard_limit = (self.request.timelimit or (None, None))[0] or 0
        statuses = sending.send_due_emails(
            email_request_id,
            worker=f"{self.request.hostname or 'worker'}:{os.getpid()}",
            lease=max(conf.lease_seconds(), hard_limit + 10),
            carry_on=carry_on,
            wake=wake,
        )
    except ValidationError:
        logger.error("Malformed email request id %r dropped", email_request_id)
        return None
    return statuses.get(str(email_request_id))


@shared_task(name="email_service.tasks.dispatch_due_emails", ignore_result=True)
def dispatch_due_emails():
    """Publish due PENDING rows whose message was lost or never sent (the outbox relay)."""
    return outbox.dispatch_due()


@shared_task(name="email_service.tasks.purge_old_emails", ignore_result=True)
def purge_old_emails():
    """Delete rows and files past the retention period."""
    return retention.purge_expired()


@worker_process_shutdown.connect
def _close_smtp_connection(**kwargs):
    delivery.close_connection()


@shared_task(name="email_service.tasks.purge_audit_trail", ignore_result=True)
def purge_audit_trail():
    """Delete audit entries past AUDIT_RETENTION_DAYS."""
    from . import audit

    return audit.purge_audit()
