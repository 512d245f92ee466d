"""What is kept of a submission the honeypot caught: an id and times, nothing the bot sent.

Anonymous callers who ask about such an id get the answer a real request would give
(email_service/honeypot.py); staff never see these rows.
"""

import uuid
from datetime import timedelta

from django.db import models
from django.db.models import Count, Q
from django.utils import timezone


class DecoyQuerySet(models.QuerySet):
    def with_attachment(self):
        return self.filter(has_attachment=True)

    def without_attachment(self):
        return self.filter(has_attachment=False)

    def older_than(self, cutoff):
        return self.filter(created_at__lt=cutoff)

    def statistics(self, now=None):
        """Count these decoys as requests of their age count in the statistics: PENDING until
        their planned `sent_at`, SENT from then on."""
        now = now or timezone.now()
        day_ago = now - timedelta(hours=24)
        sent = Q(sent_at__lte=now)
        return self.aggregate(
            total_requests=Count("id"),
            pending_requests=Count("id", filter=~sent),
            sent_requests=Count("id", filter=sent),
            with_attachments=Count("id", filter=Q(has_attachment=True)),
            requests_last_24h=Count("id", filter=Q(created_at__gte=day_ago)),
            sent_last_24h=Count("id", filter=sent & Q(sent_at__gte=day_ago)),
        )


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
