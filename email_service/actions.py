"""What staff do to requests, from the API or the admin: cancel, retry, edit."""

from django.db import transaction

from .models import EmailRequest, EmailStatus
from .outbox import dispatch_due_soon


class TransitionNotAllowed(Exception):
    """The request is not in a status that allows this action."""


def cancel_email_request(email_request):
    """Cancel a PENDING request; raise TransitionNotAllowed otherwise."""
    if not EmailRequest.objects.filter(pk=email_request.pk).cancel():
        email_request.refresh_from_db(fields=["status"])
        raise TransitionNotAllowed(f"A {email_request.status} request cannot be cancelled.")


def retry_failed_requests(queryset=None):
    """Requeue FAILED requests (of `queryset`, or all) with a fresh retry budget and dispatch them;
    return the ids of those requeued."""
    failed = EmailRequest.objects.filter(status=EmailStatus.FAILED)
    if queryset is not None:
        failed = failed.filter(pk__in=queryset.values("pk"))
    with transaction.atomic():
        # Locked first, so that the ids returned are exactly the rows the requeue moves.
        pks = list(failed.select_for_update().values_list("pk", flat=True))
        count = EmailRequest.objects.filter(pk__in=pks).requeue_failed() if pks else 0
    if count:
        transaction.on_commit(dispatch_due_soon)
    return pks


def edit_email_request(email_request, fields):
    """Write the contact `fields` of a request not yet SENT; raise TransitionNotAllowed once it is."""
    # Guarded like every transition: a worker may have sent the row since it was read.
    if not EmailRequest.objects.filter(pk=email_request.pk).edit_unsent(**fields):
        email_request.refresh_from_db(fields=["status"])
        raise TransitionNotAllowed(f"A {email_request.status} request can no longer be edited.")
    for name, value in fields.items():
        setattr(email_request, name, value)
