"""What staff do to requests, from the API or the admin: cancel, retry, edit."""

from django.db import transaction

from .models import EmailRequest
from .outbox import dispatch_due_soon


class TransitionNotAllowed(Exception):
    """The request is not in a status that allows this action."""


def cancel_email_request(email_request):
    """Cancel a PENDING request; raise TransitionNotAllowed otherwise."""
    if not EmailRequest.objects.filter(pk=email_request.pk).cancel():
        email_request.refresh_from_db(fields=["status"])
        raise TransitionNotAllowed(f"A {email_request.status} request cannot be cancelled.")


def retry_failed(queryset=None):
    """Requeue FAILED requests with a fresh retry budget and dispatch them; return how many."""
    queryset = EmailRequest.objects.all() if queryset is None else queryset
    count = queryset.requeue_failed()
    if count:
        transaction.on_commit(dispatch_due_soon)
    return count


def edit_email_request(email_request, fields):
    """Write the contact `fields` of a request not yet SENT; raise TransitionNotAllowed once it is."""
    # Guarded like every transition: a worker may have sent the row since it was read.
    if not EmailRequest.objects.filter(pk=email_request.pk).edit_unsent(**fields):
        email_request.refresh_from_db(fields=["status"])
        raise TransitionNotAllowed(f"A {email_request.status} request can no longer be edited.")
    for name, value in fields.items():
        setattr(email_request, name, value)
