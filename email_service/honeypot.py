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
from django.db import connections
from django.db.models import (
    BooleanField,
    Case,
    CharField,
    DateTimeField,
    ExpressionWrapper,
    F,
    Q,
    Value,
    When,
)
from django.db.models.functions import Cast, Now
from django.utils import timezone

from . import conf
from .decoys import Decoy
from .models import PUBLIC_FIELDS, EmailStatus

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
    minimum = conf.min_fill_seconds()
    return minimum > 0 and (now if now is not None else time.time()) - served < minimum


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


def decoys_as_rows():
    """Return every decoy with `status` and `shown_sent_at` as a request of its age would show them."""
    # The database's clock, not a parameter: the list's SQL stays the same from call to call, so
    # the paginator's shared count (keyed by that SQL) is shared as it is without decoys.
    sent = Q(sent_at__lte=Now())
    return Decoy.objects.annotate(
        # Cast to the requests' own column type: PostgreSQL merges the two halves of a UNION ALL
        # through their indexes only when every column's type is the same on both sides.
        status=Cast(
            Case(When(sent, then=Value(EmailStatus.SENT)), default=Value(EmailStatus.PENDING)),
            CharField(max_length=16),
        ),
        shown_sent_at=Case(When(sent, then=F("sent_at")), default=None, output_field=DateTimeField()),
    )


class RequestsWithDecoys:
    """The anonymous list: filtered requests and decoys in the requests' order, as one sequence.

    Each page is one UNION ALL query whose halves are each sorted and cut at the page's end
    first, so each comes off its own index (created_at, sent_at) as the list did without decoys;
    left to weigh the union as a whole, PostgreSQL may sort every matching request instead. The
    count is one query over both, keyed for the shared count by the union's SQL.
    """

    def __init__(self, requests, decoys):
        self.ordering = tuple(requests.query.order_by or requests.model._meta.ordering)
        self.rows = (
            requests.order_by()
            .annotate(has_attachment=ExpressionWrapper(~Q(file_attached=""), output_field=BooleanField()))
            .values(*PUBLIC_FIELDS)
        )
        # The same columns in the same order, the shown sent_at last in place of the raw one.
        self.stand_ins = decoys.order_by().values(*PUBLIC_FIELDS[:-1], "shown_sent_at")
        self.combined = self.rows.union(self.stand_ins, all=True).order_by(*self.ordering)
        self.query = self.combined.query

    def count(self):
        return self.combined.count()

    def __len__(self):
        return self.count()

    def __iter__(self):
        return iter(self.combined)

    def __getitem__(self, index):
        if not isinstance(index, slice):
            return self[index : index + 1][0]
        if index.stop is None or not connections[self.rows.db].features.supports_slicing_ordering_in_compound:
            return list(self.combined[index])
        # A decoy's shown sent_at is its annotation: the raw column is a time in the future.
        decoy_ordering = [term.replace("sent_at", "shown_sent_at") for term in self.ordering]
        rows = self.rows.order_by(*self.ordering)[: index.stop]
        stand_ins = self.stand_ins.order_by(*decoy_ordering)[: index.stop]
        return list(rows.union(stand_ins, all=True).order_by(*self.ordering)[index])


def purge_decoys(cutoff):
    """Delete the decoys created before `cutoff`, as real rows of that age go; return how many."""
    deleted, _ = Decoy.objects.older_than(cutoff).delete()
    return deleted
