"""What is kept of a submission the honeypot caught: an id and times, nothing the bot sent.

Anonymous callers who ask about such an id get the answer a real request would give
(email_service/honeypot.py); staff never see these rows.
"""

import uuid

from django.db import models
from django.utils import timezone


class DecoyQuerySet(models.QuerySet):
    def with_attachment(self):
        return self.filter(has_attachment=True)

    def without_attachment(self):
        return self.filter(has_attachment=False)

    def older_than(self, cutoff):
        return self.filter(created_at__lt=cutoff)


class Decoy(models.Model):
    """The stand-in for one caught submission: PENDING until `sent_at`, then SENT, to anyone asking."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    has_attachment = models.BooleanField(default=False)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    sent_at = models.DateTimeField(help_text="When it starts to read as SENT.")

    objects = DecoyQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]

    def __str__(self):
        return f"decoy {self.id}"
