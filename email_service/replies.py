"""Staff replies to submitters: stored as rows of the outbox and sent by the same send loop.

A reply is an `EmailRequest` of kind REPLY (see models.py): claim, lease, retries, the attempt
log and the relay are the very code that delivers the requests, so a reply has the same
guarantees. What differs is only the mail built for it (`delivery.build_reply_message`) and
that lists, filters and statistics count submissions alone (`EmailRequestQuerySet.submissions`).
"""

import logging

from django.db import transaction

from . import audit, outbox
from .models import EmailReply, RowKind

logger = logging.getLogger(__name__)

# The longest reply: a reply's body is its row's `message`, so a submission's message's bound.
BODY_MAX_LENGTH = EmailReply._meta.get_field("message").max_length


class ReplyNotAllowed(Exception):
    """The request cannot be answered: it is itself a reply, or its address was erased."""


def reply_create(*, email_request, body, author=None, request=None, channel):
    """Store a reply to `email_request`'s submitter, record it in the audit trail, queue it to send.

    `request` (Django's or DRF's) names the author and the client IP for the audit entry.
    """
    if email_request.is_reply:
        raise ReplyNotAllowed("A reply answers a contact request, not another reply.")
    if not email_request.email:
        raise ReplyNotAllowed("This request has no address to reply to.")
    if author is None and request is not None and request.user.is_authenticated:
        author = request.user
    with transaction.atomic():
        # The outbox's own create: a Message-ID, a task id, publication after commit.
        reply = outbox.create_email_request(
            data={"kind": RowKind.REPLY, "parent": email_request, "author": author, "message": body}
        )
        audit.record(audit.AuditAction.REPLY, request=request, channel=channel, request_ids=[email_request])
    logger.info(
        "Reply %s to email request %s queued",
        reply.pk,
        email_request.pk,
        extra={"email_request_id": str(email_request.pk), "reply_id": str(reply.pk)},
    )
    return reply


def replies_of(email_request):
    """The replies to a request, oldest first, with their authors."""
    return EmailReply.objects.filter(parent=email_request).select_related("author").order_by("created_at")
