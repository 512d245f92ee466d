"""The honeypot's answers: a caught submission is answered, and later read, as a real one would be.

Two things catch a bot: the hidden `website` field filled in, and the contact page's signed form
stamp sent back sooner than EMAIL_MIN_FILL_SECONDS after the page was served (or forged). Nothing
the bot sent is stored; a Decoy keeps only an id and times, so that anonymous callers who ask
about that id see PENDING and then, after a delay like a real delivery's, SENT.
"""

import random
import time
from datetime import timedelta

from django.core import signing
from django.core.exceptions import ValidationError
from django.utils import timezone

from . import conf
from .decoys import Decoy
from .models import EmailStatus

STAMP_SALT = "email_service.honeypot.form-stamp"
# Seconds from submission to SENT that a decoy shows: what a real delivery takes on a quiet day.
DECOY_DELIVERY_SECONDS = (1.5, 6.0)


def form_stamp(now=None):
    """Sign the time the form is being served, for the page's hidden `form_stamp` field."""
    return signing.dumps(round(now if now is not None else time.time(), 3), salt=STAMP_SALT)


def served_at(stamp):
    """Return the time a genuine form stamp was signed, or None for a forged or malformed one."""
    try:
        return float(signing.loads(stamp, salt=STAMP_SALT))
    except (signing.BadSignature, TypeError, ValueError):
        return None


def genuine_stamp(stamp):
    """Return `stamp` if it is one of ours, else None."""
    return stamp if stamp and served_at(stamp) is not None else None


def is_filled_too_fast(stamp, now=None):
    """Say whether a form stamp is forged or younger than EMAIL_MIN_FILL_SECONDS.

    No stamp is not too fast: the website posts JSON without ever serving the page.
    """
    if not stamp:
        return False
    served = served_at(stamp)
    if served is None:
        return True
    return (now if now is not None else time.time()) - served < conf.min_fill_seconds()


def create_decoy(*, has_attachment, now=None):
    """Keep the stand-in for a caught submission and return it."""
    now = now or timezone.now()
    delay = timedelta(seconds=random.uniform(*DECOY_DELIVERY_SECONDS))
    return Decoy.objects.create(has_attachment=has_attachment, created_at=now, sent_at=now + delay)


def decoy_row(pk, now=None):
    """Return a decoy as the public shape shows a request (a dict of its fields), or None."""
    try:
        decoy = Decoy.objects.filter(pk=pk).first()
    except (ValidationError, ValueError):
        return None
    if decoy is None:
        return None
    sent = decoy.sent_at <= (now or timezone.now())
    return {
        "id": decoy.pk,
        "status": EmailStatus.SENT if sent else EmailStatus.PENDING,
        "has_attachment": decoy.has_attachment,
        "created_at": decoy.created_at,
        "sent_at": decoy.sent_at if sent else None,
    }


def purge_decoys(cutoff):
    """Delete the decoys created before `cutoff`, as real rows of that age go; return how many."""
    deleted, _ = Decoy.objects.older_than(cutoff).delete()
    return deleted
