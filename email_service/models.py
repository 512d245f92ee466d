"""Contact-form submissions, their delivery state machine and their delivery attempts.

The state machine has one owner: the QuerySet methods below. Each transition is one guarded
`UPDATE ... WHERE status = <expected>`, so two processes racing on a row cannot both win, and
nothing else in the app assigns `status`. Each logs the rows it moved, with both statuses, in
one line per row (`_log_transition`).

    PENDING --claim--> PROCESSING --complete--> SENT
       ^                  |  |
       |---- defer -------+  +------ fail ----> FAILED --retry--> PENDING
       |---- hold --------+  (sending stopped as a whole: no retry spent)
    PENDING --cancel--> CANCELLED
    PROCESSING (lease expired) --reclaim--> PENDING or FAILED
"""

import functools
import logging
import uuid
from datetime import timedelta

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import connections, models, transaction
from django.db.models import Count, Exists, Max, OuterRef, Q
from django.db.models.functions import TruncDate
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from . import conf
from .aggregates import SecondsBetweenPercentile
from .encryption import DecryptionError, address_index, domain_index
from .fields import (
    EncryptedCharField,
    EncryptedEmailField,
    EncryptedGenericIPAddressField,
    EncryptedTextField,
)
from .outcomes import AttemptOutcome
from .storage import attachment_upload_to

logger = logging.getLogger(__name__)


class EmailStatus(models.TextChoices):
    PENDING = "PENDING", _("Pending")
    PROCESSING = "PROCESSING", _("Processing")
    SENT = "SENT", _("Sent")
    FAILED = "FAILED", _("Failed")
    CANCELLED = "CANCELLED", _("Cancelled")


class VirusScan(models.TextChoices):
    """What the virus scanner said about a request's file; blank when there is no file."""

    CLEAN = "clean", _("Scanned: clean")
    UNAVAILABLE = "unavailable", _("Not scanned: the scanner was unavailable")
    DISABLED = "disabled", _("Not scanned: scanning is off")


class RowKind(models.TextChoices):
    """What an outbox row carries: a submission to support, or a staff reply to its submitter."""

    REQUEST = "REQUEST", _("Contact request")
    REPLY = "REPLY", _("Reply to the submitter")


FINAL_STATUSES = (EmailStatus.SENT, EmailStatus.FAILED, EmailStatus.CANCELLED)
# What the submitter wrote: editable by staff until the request is SENT.
CONTACT_FIELDS = ("full_name", "email", "phone", "job_profession", "subject", "message")
# What anyone may see of a request (EmailRequestPublicSerializer), decoys included (honeypot.py).
PUBLIC_FIELDS = ("id", "status", "has_attachment", "created_at", "sent_at")
# Seconds of clock difference between web and worker hosts that a claim tolerates.
CLAIM_CLOCK_TOLERANCE = 5
# The error of a claimed row that cannot be sent because it cannot be read; says nothing it holds.
UNREADABLE_ERROR = (
    "A stored value of this request cannot be decrypted under the configured keys "
    "(MEDCOR_ENCRYPTION_KEYS): restore the key it was written under, then retry it."
)
# The fields the staff's free-text search decrypts and matches.
SEARCH_FIELDS = ("full_name", "email", "subject", "message")


class EmailRequestQuerySet(models.QuerySet):
    # --- reads -----------------------------------------------------------------------------
    def submissions(self):
        """Contact requests only: what lists, filters and statistics are about (replies aside)."""
        return self.filter(kind=RowKind.REQUEST)

    def replies(self):
        """Staff replies to submitters, oldest first."""
        return self.filter(kind=RowKind.REPLY).order_by("created_at")

    def due(self, now=None):
        """PENDING rows whose next attempt time has come."""
        return self.filter(status=EmailStatus.PENDING, next_attempt_at__lte=now or timezone.now())

    def is_pending(self, pk):
        """Say whether row `pk` is still PENDING: one read of the primary key's index."""
        return self.filter(pk=pk, status=EmailStatus.PENDING).exists()

    def undispatched(self, now=None):
        """Due rows with no message on the broker, or whose message went unclaimed too long."""
        now = now or timezone.now()
        stale = now - timedelta(seconds=conf.dispatch_stale_after())
        return self.due(now).filter(Q(dispatched_at__isnull=True) | Q(dispatched_at__lt=stale))

    def stale_claims(self, now=None):
        """PROCESSING rows whose lease ran out: their worker died or hung."""
        return self.filter(status=EmailStatus.PROCESSING, lease_expires_at__lt=now or timezone.now())

    def for_address(self, address):
        """Rows from this address, found by its keyed index: the same mailbox however it was typed."""
        return self.filter(email_index=address_index(address))

    def matching_text(self, text, *, limit=None):
        """Rows among these, newest first and at most `limit` of them read, with `text` in a
        personal field; return (queryset, rows scanned, whether the limit stopped the scan).

        The columns are encrypted, so the database cannot search them: the rows are decrypted
        here, one batch at a time, and matched case-insensitively.
        """
        limit = conf.search_scan_limit() if limit is None else limit
        wanted = text.casefold()
        matched, scanned = [], 0
        candidates = self.order_by("-created_at", "-pk").only("pk", *SEARCH_FIELDS)[: limit + 1]
        for row in candidates.iterator(chunk_size=500):
            if scanned == limit:
                return self.filter(pk__in=matched), scanned, True
            scanned += 1
            if any(wanted in (getattr(row, name) or "").casefold() for name in SEARCH_FIELDS):
                matched.append(row.pk)
        return self.filter(pk__in=matched), scanned, False

    def only_public(self):
        """These rows with only the columns of PUBLIC_FIELDS read: none is personal, none decrypted."""
        return self.only(*("file_attached" if name == "has_attachment" else name for name in PUBLIC_FIELDS))

    def with_attachment(self):
        return self.exclude(file_attached="")

    def without_attachment(self):
        return self.filter(file_attached="")

    def expired(self, now=None):
        """Rows in a final status older than the retention period, whose replies are too."""
        cutoff = (now or timezone.now()) - timedelta(days=conf.retention_days())
        # Deleting a request deletes its replies (CASCADE): a request is as old as its newest
        # reply, and is kept while one is still to be sent.
        live_replies = self.model._default_manager.filter(parent=OuterRef("pk")).filter(
            Q(created_at__gte=cutoff) | ~Q(status__in=FINAL_STATUSES)
        )
        return self.filter(status__in=FINAL_STATUSES, created_at__lt=cutoff).exclude(Exists(live_replies))

    def oldest_pending_age(self, now=None):
        """Seconds since the oldest PENDING row was created, or None when none is waiting."""
        oldest = (
            self.filter(status=EmailStatus.PENDING)
            .order_by("created_at")
            .values_list("created_at", flat=True)
            .first()
        )
        return round(((now or timezone.now()) - oldest).total_seconds(), 1) if oldest else None

    def statistics(self, now=None):
        """Count the rows by status, by attachment and over the last 24 hours, and the median and
        95th percentile seconds from creation to SENT, in one query."""
        day_ago = (now or timezone.now()) - timedelta(hours=24)
        counts = self.aggregate(
            total_requests=Count("id"),
            pending_requests=Count("id", filter=Q(status=EmailStatus.PENDING)),
            processing_requests=Count("id", filter=Q(status=EmailStatus.PROCESSING)),
            sent_requests=Count("id", filter=Q(status=EmailStatus.SENT)),
            failed_requests=Count("id", filter=Q(status=EmailStatus.FAILED)),
            cancelled_requests=Count("id", filter=Q(status=EmailStatus.CANCELLED)),
            with_attachments=Count("id", filter=~Q(file_attached="")),
            unverified_requests=Count("id", filter=Q(captcha_unverified=True)),
            unscanned_attachments=Count("id", filter=Q(virus_scan=VirusScan.UNAVAILABLE)),
            requests_last_24h=Count("id", filter=Q(created_at__gte=day_ago)),
            sent_last_24h=Count("id", filter=Q(status=EmailStatus.SENT, sent_at__gte=day_ago)),
            failed_last_24h=Count("id", filter=Q(status=EmailStatus.FAILED, updated_at__gte=day_ago)),
            median_delivery_seconds=SecondsBetweenPercentile(
                "sent_at", "created_at", 0.5, filter=Q(status=EmailStatus.SENT)
            ),
            p95_delivery_seconds=SecondsBetweenPercentile(
                "sent_at", "created_at", 0.95, filter=Q(status=EmailStatus.SENT)
            ),
        )
        for key in ("median_delivery_seconds", "p95_delivery_seconds"):
            if counts[key] is not None:
                counts[key] = round(counts[key], 3)
        counts["success_rate"] = success_rate(counts["sent_requests"], counts["failed_requests"])
        return counts

    def daily_counts(self, first_day, days):
        """Submitted, SENT and FAILED rows per day of creation from `first_day`, zeros included."""
        rows = {
            row["day"]: row
            for row in self.filter(created_at__date__gte=first_day)
            .annotate(day=TruncDate("created_at"))
            .values("day")
            .annotate(
                submitted=Count("id"),
                sent=Count("id", filter=Q(status=EmailStatus.SENT)),
                failed=Count("id", filter=Q(status=EmailStatus.FAILED)),
            )
            .order_by("day")
        }
        return [
            {"day": day, **{key: rows.get(day, {}).get(key, 0) for key in ("submitted", "sent", "failed")}}
            for day in (first_day + timedelta(days=offset) for offset in range(days))
        ]

    # --- transitions ---------------------------------------------------------------------------
    def claim(self, pk, *, worker, now=None, lease=None):
        """Take one due PENDING row for sending; return its claim token, or None if not ours."""
        token, _ = self.claim_batch(worker=worker, first=pk, limit=1, now=now, lease=lease)
        return token

    def claim_batch(self, *, worker, first=None, limit=1, now=None, lease=None, start_attempts=False):
        """Take up to `limit` due PENDING rows, `first` before the oldest others; return (token, rows).

        On PostgreSQL every candidate, `first` too, is locked with `FOR UPDATE SKIP LOCKED`: a row
        another worker is claiming is theirs, so claimers take different rows and never wait for
        each other (two that waited for each other's `first` would deadlock). The guarded UPDATE
        decides in every database: a row another worker took meanwhile is not ours.

        A row created a moment ago on a host whose clock runs slightly ahead still counts as due:
        CLAIM_CLOCK_TOLERANCE covers that skew for rows never tried. A retry waits its whole
        backoff, however short: the tolerance would otherwise let the loop that just deferred a
        row take it straight back.

        With `start_attempts`, each row comes with its next attempt started and saved
        (`row.started_attempt`, numbered after the row's earlier ones), as the send loop needs.
        On PostgreSQL the whole claim, attempts included, is one statement (`_claim_batch_sql`):
        the send loop claims once per batch, and the ORM's five statements and their compiling
        cost the worker more CPU than the rows' decryption.
        """
        now = now or timezone.now()
        if first is not None:
            # A malformed id raises ValidationError here, as the ORM's lookup would.
            first = self.model._meta.pk.to_python(first)
        token = uuid.uuid4()
        claim = {
            "token": token,
            "worker": worker[:255],
            "now": now,
            "lease_expires_at": now + timedelta(seconds=lease or conf.lease_seconds()),
        }
        if connections[self.db].vendor == "postgresql" and not self.query.has_filters():
            rows = self._claim_in_one_statement(first, limit, start_attempts, **claim)
        else:
            rows = self._claim_with_the_orm(first, limit, **claim)
            if rows and start_attempts:
                _start_attempts(rows, worker=claim["worker"], now=now)
        for row in rows:
            _log_transition(row.pk, EmailStatus.PENDING, EmailStatus.PROCESSING, f"by {claim['worker']}")
        return (token if rows else None), rows

    def _due(self, now):
        early = now + timedelta(seconds=CLAIM_CLOCK_TOLERANCE)
        return self.filter(
            Q(next_attempt_at__lte=now) | Q(retry_count=0, next_attempt_at__lte=early),
            status=EmailStatus.PENDING,
        )

    def _claim_with_the_orm(self, first, limit, *, token, worker, now, lease_expires_at):
        due = self._due(now)
        with transaction.atomic(using=self.db):
            pick = due.select_for_update(skip_locked=True)
            candidates = list(pick.filter(pk=first).values_list("pk", flat=True)) if first is not None else []
            if limit > len(candidates):
                others = pick.exclude(pk=first) if first is not None else pick
                oldest = others.order_by("next_attempt_at").values_list("pk", flat=True)
                candidates += oldest[: limit - len(candidates)]
            if not candidates:
                return []
            claimed = due.filter(pk__in=candidates).update(
                status=EmailStatus.PROCESSING,
                claim_token=token,
                claimed_by=worker,
                lease_expires_at=lease_expires_at,
                updated_at=now,
            )
        if not claimed:
            return []
        # In the order claimed: `first` first, then the longest waiting.
        position = {str(pk): index for index, pk in enumerate(candidates)}
        ours = self.filter(pk__in=candidates, claim_token=token)
        pks = sorted(ours.values_list("pk", flat=True), key=lambda pk: position.get(str(pk), len(position)))
        return self._readable_claimed(ours, pks, token)

    def _claim_in_one_statement(self, first, limit, start_attempts, *, token, worker, now, lease_expires_at):
        params = {
            "first": first,
            "limit": limit,
            "pending": EmailStatus.PENDING,
            "processing": EmailStatus.PROCESSING,
            "now": now,
            "early": now + timedelta(seconds=CLAIM_CLOCK_TOLERANCE),
            "token": token,
            "worker": worker,
            "lease_expires_at": lease_expires_at,
        }
        claimed = self.raw(_claim_batch_sql(first is not None, start_attempts), params)
        try:
            rows = list(claimed)
        except DecryptionError:
            # The claim is committed: the readable rows are sent, each unreadable one fails alone.
            return self._readable_after_commit(token, first, start_attempts)
        if start_attempts:
            for row in rows:
                _attach_started_attempt(row, row.attempt_id, row.attempt_number, worker=worker, now=now)
        return rows

    def _readable_after_commit(self, token, first, start_attempts):
        ours = self.filter(claim_token=token)
        # In claim order: `first` first (a stable sort keeps the others' due order).
        pks = sorted(
            ours.order_by("next_attempt_at").values_list("pk", flat=True), key=lambda pk: pk != first
        )
        started = (
            {
                attempt.request_id: attempt
                for attempt in EmailAttempt.objects.using(self.db).filter(
                    request__in=pks, finished_at__isnull=True, request__claim_token=token
                )
            }
            if start_attempts
            else {}
        )
        rows = self._readable_claimed(ours, pks, token)
        # An unreadable row was never tried: its attempt goes.
        readable = {row.pk for row in rows}
        EmailAttempt.objects.using(self.db).filter(
            pk__in=[attempt.pk for pk, attempt in started.items() if pk not in readable]
        ).delete()
        for row in rows:
            if row.pk in started:
                attempt = started[row.pk]
                _attach_started_attempt(
                    row, attempt.pk, attempt.number, worker=attempt.worker, now=attempt.started_at
                )
        return rows

    def _readable_claimed(self, claimed, pks, token):
        """Load the claimed rows `pks` in order; fail on its own each one that cannot be decrypted.

        Decrypting happens as a row loads, so one value under a removed key (or corrupt) would
        otherwise raise for the whole batch after its claim committed, leaving every row of it
        PROCESSING until the lease ends.
        """
        try:
            rows = {str(row.pk): row for row in claimed}
        except DecryptionError:
            rows = {}
            for pk in pks:
                try:
                    rows[str(pk)] = claimed.get(pk=pk)
                except DecryptionError:
                    self.fail(pk, token, error=UNREADABLE_ERROR, note="unreadable")
        return [rows[str(pk)] for pk in pks if str(pk) in rows]

    def release_untried(self, pks, token):
        """Give claimed rows whose send never started back to PENDING, due now, for the relay."""
        now = timezone.now()
        return self.filter(pk__in=pks, claim_token=token)._move(
            EmailStatus.PROCESSING,
            EmailStatus.PENDING,
            "never tried",
            claim_token=None,
            lease_expires_at=None,
            next_attempt_at=now,
            dispatched_at=None,
            updated_at=now,
        )

    def hold(self, pks, token, *, until=None, error="", note="held by the sending brake"):
        """Give claimed rows back to PENDING when sending stops as a whole, spending no retry.

        Nothing was wrong with these mails (a quota, a throttle, a login the provider refused),
        so retry_count stays as it was; they are due again when the brake's wait ends, which is
        exactly their next_attempt_at (what `wake_held` knows them by).
        """
        now = timezone.now()
        fields = {"error_message": error} if error else {}
        return self.filter(pk__in=pks, claim_token=token)._move(
            EmailStatus.PROCESSING,
            EmailStatus.PENDING,
            note,
            claim_token=None,
            lease_expires_at=None,
            next_attempt_at=max(until or now, now),
            dispatched_at=None,
            updated_at=now,
            **fields,
        )

    def _move(self, source, target, note="", **fields):
        """Move the rows among these that are in `source` to `target`; log each, return how many.

        The rows are locked first, so that the log names exactly the rows this call moved.
        """
        with transaction.atomic(using=self.db):
            pks = list(
                self.model._default_manager.using(self.db)
                .filter(pk__in=self.values("pk"), status=source)
                .select_for_update()
                .values_list("pk", flat=True)
            )
            if pks:
                self.model._default_manager.using(self.db).filter(pk__in=pks, status=source).update(
                    status=target, **fields
                )
        for pk in pks:
            _log_transition(pk, source, target, note)
        return len(pks)

    def _release(self, pk, token, note="", log_fields=None, **fields):
        fields.setdefault("updated_at", timezone.now())
        released = bool(
            self.filter(pk=pk, status=EmailStatus.PROCESSING, claim_token=token).update(
                claim_token=None, lease_expires_at=None, **fields
            )
        )
        if released:
            _log_transition(pk, EmailStatus.PROCESSING, fields["status"], note, **(log_fields or {}))
        return released

    def complete(self, pk, token, *, now=None, attempt=None, note="", log_fields=None):
        """Mark a claimed row SENT, and save `attempt` (already filled in) in the same transaction.

        `note` and `log_fields` go on the transition's log line (here and in `defer` and `fail`).

        This runs once per mail sent, so on PostgreSQL both writes go in one statement: the ORM's
        two updates cost five times its CPU, and the worker's CPU is what bounds delivery. Its
        commit does not wait for the disk unless EMAIL_SYNCHRONOUS_OUTCOMES (conf.py says why).
        """
        now = now or timezone.now()
        fields = {"status": EmailStatus.SENT, "sent_at": now, "error_message": "", "updated_at": now}
        if attempt is None:
            return self._release(pk, token, note, log_fields, **fields)
        if connections[self.db].vendor != "postgresql":
            with transaction.atomic(using=self.db):
                attempt.save(using=self.db, update_fields=ATTEMPT_RESULT_FIELDS)
                return self._release(pk, token, note, log_fields, **fields)
        fields.update(claim_token=None, lease_expires_at=None)
        with connections[self.db].cursor() as cursor:
            cursor.execute(
                _complete_with_attempt_sql(
                    tuple(fields),
                    # Within a caller's transaction the relaxed setting would last to its commit.
                    conf.synchronous_outcomes() or not connections[self.db].get_autocommit(),
                ),
                _complete_with_attempt_params(attempt, fields, pk, token, connections[self.db]),
            )
            completed = cursor.rowcount == 1
        if completed:
            _log_transition(pk, EmailStatus.PROCESSING, EmailStatus.SENT, note, **(log_fields or {}))
        return completed

    def defer(self, pk, token, *, error, retry_count, next_attempt_at, note="", log_fields=None):
        """Put a claimed row back to PENDING to be tried again at `next_attempt_at`."""
        return self._release(
            pk,
            token,
            note,
            log_fields,
            status=EmailStatus.PENDING,
            error_message=error,
            retry_count=retry_count,
            next_attempt_at=next_attempt_at,
            dispatched_at=None,
        )

    def fail(self, pk, token, *, error, retry_count=None, note="", log_fields=None):
        """Mark a claimed row FAILED."""
        fields = {"status": EmailStatus.FAILED, "error_message": error}
        if retry_count is not None:
            fields["retry_count"] = retry_count
        return self._release(pk, token, note, log_fields, **fields)

    def cancel(self):
        """Cancel the PENDING rows among these (also those waiting for a retry); return how many."""
        return self._move(
            EmailStatus.PENDING, EmailStatus.CANCELLED, claim_token=None, updated_at=timezone.now()
        )

    def requeue_failed(self, *, now=None):
        """Move FAILED rows back to PENDING with a fresh retry budget; return how many."""
        now = now or timezone.now()
        return self._move(
            EmailStatus.FAILED,
            EmailStatus.PENDING,
            "requeued",
            retry_count=0,
            max_retries=conf.max_retries(),
            next_attempt_at=now,
            dispatched_at=None,
            manual_retries=models.F("manual_retries") + 1,
            updated_at=now,
        )

    def edit_unsent(self, **fields):
        """Write `fields` on the rows among these not yet SENT; return how many were changed."""
        if "email" in fields:
            fields.update(_address_indexes(fields["email"]))
        return self.exclude(status=EmailStatus.SENT).update(**fields, updated_at=timezone.now())

    def claims_of(self, prefix):
        """PROCESSING rows whose claimer's name starts with `prefix` (a worker node's processes)."""
        return self.filter(status=EmailStatus.PROCESSING, claimed_by__startswith=prefix)

    def reclaim(self, row, *, now=None, lost=False):
        """Take back a row whose worker lost its lease: PENDING again, or FAILED once out of retries.

        `lost` says the claimer is known to be gone (its process no longer exists): the row is
        taken back whatever is left of its lease, still only under the claim it was read with.
        """
        now = now or timezone.now()
        error = f"Worker {row.claimed_by or 'unknown'} stopped before finishing the send."
        if row.has_retries_left():
            fields = {
                "status": EmailStatus.PENDING,
                "retry_count": row.retry_count + 1,
                "next_attempt_at": now,
                "dispatched_at": None,
            }
        else:
            fields = {"status": EmailStatus.FAILED}
        claims = self.filter(status=EmailStatus.PROCESSING) if lost else self.stale_claims(now)
        reclaimed = bool(
            claims.filter(pk=row.pk, claim_token=row.claim_token).update(
                claim_token=None, lease_expires_at=None, error_message=error, updated_at=now, **fields
            )
        )
        if reclaimed:
            _log_transition(
                row.pk,
                EmailStatus.PROCESSING,
                fields["status"],
                f"reclaimed from lost worker {row.claimed_by or 'unknown'}",
                level=logging.WARNING,
                worker=row.claimed_by,
            )
        return reclaimed

    def wake_held(self, until, *, now=None):
        """Make PENDING rows held until `until` (the brake's end) due now; return how many."""
        now = now or timezone.now()
        # `hold` sets the brake's own end as the row's next attempt: exactly `until` marks the rows
        # it held, where a retry's backoff (jittered to the microsecond) is its own and stays.
        return self.filter(status=EmailStatus.PENDING, next_attempt_at=until).update(
            next_attempt_at=now, dispatched_at=None, updated_at=now
        )

    def mark_dispatched(self, pks, *, now=None):
        return self.filter(pk__in=pks, status=EmailStatus.PENDING).update(dispatched_at=now or timezone.now())

    def forget_dispatch(self, pk):
        """Note that a dispatch did not reach the broker, so the next periodic run sends it."""
        return self.filter(pk=pk, status=EmailStatus.PENDING).update(dispatched_at=None)

    def forget_due_dispatches(self):
        """Leave every due PENDING row to the relay: rows whose shared wake message is gone."""
        return self.due().filter(dispatched_at__isnull=False).update(dispatched_at=None)


def _address_indexes(email):
    """The index columns of an address: its mailbox's keyed hash and its domain's."""
    if not email:
        return {"email_index": "", "email_domain_index": ""}
    return {"email_index": address_index(email), "email_domain_index": domain_index(email)}


def success_rate(sent, failed):
    """Percent of finished requests (SENT or FAILED) that were SENT, to 2 places; 0.0 when none."""
    finished = sent + failed
    return round(100.0 * sent / finished, 2) if finished else 0.0


def _log_transition(pk, source, target, note="", *, level=logging.INFO, **extra):
    """Log one row's move between two statuses, with the fields that JSON logs index."""
    logger.log(
        level,
        "Email request %s: %s -> %s%s",
        pk,
        source,
        target,
        f" ({note})" if note else "",
        extra={"email_request_id": str(pk), "status": target, **extra},
    )


@functools.cache
def _complete_with_attempt_sql(request_fields, synchronous=True):
    """PostgreSQL: finish an attempt and set `request_fields` on its claimed row, in one statement.

    Not `synchronous`: the statement's own transaction commits without waiting for its WAL to be
    flushed (synchronous_commit off for it alone, as set_config(..., true) sets it: the session
    keeps its setting).
    """
    attempt_meta, request_meta = EmailAttempt._meta, EmailRequest._meta
    attempt_columns = ", ".join(
        f"{attempt_meta.get_field(name).column} = %s" for name in ATTEMPT_RESULT_FIELDS
    )
    request_columns = ", ".join(f"{request_meta.get_field(name).column} = %s" for name in request_fields)
    # Joined by the UPDATE, so that PostgreSQL evaluates it: a CTE that nothing reads is not run.
    relaxed, joined = (
        ("", "")
        if synchronous
        else ("relaxed AS (SELECT set_config('synchronous_commit', 'off', true)), ", "FROM relaxed ")
    )
    return (
        f"WITH {relaxed}finished AS (UPDATE {attempt_meta.db_table} SET {attempt_columns} WHERE id = %s) "
        f"UPDATE {request_meta.db_table} SET {request_columns} {joined}"
        f"WHERE id = %s AND status = %s AND claim_token = %s"
    )


def _complete_with_attempt_params(attempt, fields, pk, token, connection):
    """The parameters of _complete_with_attempt_sql(tuple(fields), ...), in its order."""
    return [
        # Prepared as the ORM would: error_text is stored encrypted.
        *(
            EmailAttempt._meta.get_field(name).get_db_prep_save(getattr(attempt, name), connection)
            for name in ATTEMPT_RESULT_FIELDS
        ),
        attempt.pk,
        *fields.values(),
        pk,
        EmailStatus.PROCESSING,
        token,
    ]


class EmailRequest(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    # Personal fields are encrypted at rest (fields.py); `email_index` finds an address without
    # decrypting (encryption.address_index), and is set from `email` on every save.
    full_name = EncryptedCharField(max_length=200)
    email = EncryptedEmailField(max_length=254)
    email_index = models.CharField(max_length=64, blank=True, editable=False)
    # The same for the mailbox's domain, for the acknowledgements' daily share per domain.
    email_domain_index = models.CharField(max_length=64, blank=True, editable=False)
    phone = EncryptedCharField(max_length=32, blank=True)
    job_profession = EncryptedCharField(max_length=200, blank=True)
    subject = EncryptedCharField(max_length=200, blank=True)
    message = EncryptedTextField(max_length=10000, blank=True)
    file_attached = models.FileField(upload_to=attachment_upload_to, max_length=255, blank=True)
    attachment_name = EncryptedCharField(
        max_length=255, blank=True, help_text="The file's original name, used in the mail."
    )
    attachment_size = models.PositiveBigIntegerField(null=True, blank=True)
    attachment_content_type = models.CharField(max_length=100, blank=True)

    status = models.CharField(
        max_length=16, choices=EmailStatus.choices, default=EmailStatus.PENDING, editable=False
    )
    # An SMTP error may quote an address, so error texts are encrypted too.
    error_message = EncryptedTextField(blank=True, editable=False)
    retry_count = models.PositiveIntegerField(default=0, editable=False)
    max_retries = models.PositiveIntegerField(default=conf.max_retries)
    manual_retries = models.PositiveIntegerField(default=0, editable=False)
    celery_task_id = models.CharField(max_length=255, blank=True, editable=False)
    message_id = models.CharField(max_length=255, blank=True, editable=False)

    next_attempt_at = models.DateTimeField(default=timezone.now, editable=False)
    dispatched_at = models.DateTimeField(null=True, blank=True, editable=False)
    claim_token = models.UUIDField(null=True, blank=True, editable=False)
    claimed_by = models.CharField(max_length=255, blank=True, editable=False)
    lease_expires_at = models.DateTimeField(null=True, blank=True, editable=False)

    confirmation_sent_at = models.DateTimeField(null=True, blank=True, editable=False, db_index=True)
    confirmation_error = EncryptedTextField(blank=True, editable=False)
    client_ip = EncryptedGenericIPAddressField(null=True, blank=True, editable=False)
    # Intake checks that could not be made: accepted rather than lose a person's message.
    captcha_unverified = models.BooleanField(
        default=False,
        editable=False,
        help_text="The CAPTCHA provider could not be reached; the form was accepted unverified.",
    )
    virus_scan = models.CharField(
        max_length=16,
        choices=VirusScan.choices,
        blank=True,
        editable=False,
        help_text="What the virus scanner said about the file; blank without a file.",
    )

    created_at = models.DateTimeField(default=timezone.now, editable=False, db_index=True)
    updated_at = models.DateTimeField(auto_now=True)
    sent_at = models.DateTimeField(null=True, blank=True, editable=False, db_index=True)

    # A staff reply to a submission is a row of the same outbox, so that it is claimed, leased,
    # retried, logged and relayed by the same code: `message` is its body, `parent` the request it
    # answers (the recipient is the parent's address), `author` who wrote it.
    kind = models.CharField(max_length=8, choices=RowKind.choices, default=RowKind.REQUEST, editable=False)
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.CASCADE, related_name="replies", editable=False
    )
    author = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        editable=False,
    )

    objects = EmailRequestQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["status", "-created_at"], name="email_status_created_idx"),
            models.Index(fields=["status", "next_attempt_at"], name="email_status_due_idx"),
            models.Index(fields=["status", "lease_expires_at"], name="email_status_lease_idx"),
            models.Index(fields=["email_index", "-created_at"], name="email_index_created_idx"),
            models.Index(
                fields=["email_domain_index", "confirmation_sent_at"], name="email_domain_confirmed_idx"
            ),
        ]
        # Subject access and erasure (GDPR art. 15 and 17), granted apart from the model's own.
        permissions = [
            ("export_subject", "Can export everything kept about a person"),
            ("erase_subject", "Can erase everything kept about a person"),
        ]

    def __str__(self):
        return f"{self.id} ({self.status})"

    def save(self, *args, **kwargs):
        for name, value in _address_indexes(self.email).items():
            setattr(self, name, value)
        update_fields = kwargs.get("update_fields")
        if update_fields is not None and "email" in update_fields:
            kwargs["update_fields"] = {*update_fields, "email_index", "email_domain_index"}
        super().save(*args, **kwargs)

    @property
    def has_attachment(self):
        return bool(self.file_attached)

    @property
    def is_reply(self):
        return self.kind == RowKind.REPLY

    def is_editable(self):
        """Say whether staff may still edit the contact fields (see `edit_unsent`)."""
        return self.status != EmailStatus.SENT

    def has_retries_left(self):
        """Say whether a transient failure or a lost worker may still lead to another attempt."""
        return self.retry_count < self.max_retries


# What an attempt learns when it ends; the rest is set when it starts.
ATTEMPT_RESULT_FIELDS = (
    "started_at",
    "finished_at",
    "outcome",
    "smtp_code",
    "error_class",
    "error_text",
    "duration_ms",
)


class EmailAttempt(models.Model):
    request = models.ForeignKey(EmailRequest, on_delete=models.CASCADE, related_name="attempts")
    number = models.PositiveIntegerField()
    started_at = models.DateTimeField()
    finished_at = models.DateTimeField(null=True, blank=True)
    outcome = models.CharField(max_length=16, choices=AttemptOutcome.choices, blank=True)
    smtp_code = models.PositiveIntegerField(null=True, blank=True)
    error_class = models.CharField(max_length=100, blank=True)
    error_text = EncryptedTextField(blank=True)
    worker = models.CharField(max_length=255, blank=True)
    duration_ms = models.PositiveIntegerField(null=True, blank=True)

    class Meta:
        ordering = ["request", "number"]
        constraints = [
            models.UniqueConstraint(fields=["request", "number"], name="email_attempt_unique_number")
        ]

    def __str__(self):
        return f"attempt {self.number} of {self.request_id}: {self.outcome or 'running'}"


@functools.cache
def _claim_batch_sql(with_first, start_attempts):
    """PostgreSQL: claim a batch (see claim_batch) and, with `start_attempts`, start an attempt for
    each row, in one statement that returns the claimed rows in claim order."""
    request, attempt = EmailRequest._meta.db_table, EmailAttempt._meta.db_table
    due = (
        "status = %(pending)s AND (next_attempt_at <= %(now)s "
        "OR (retry_count = 0 AND next_attempt_at <= %(early)s))"
    )
    others = f"SELECT id, 1 AS claim_pos, next_attempt_at FROM {request} WHERE {due}"
    if with_first:
        # `first` is locked on its own (an indexed lookup), the oldest others in due order.
        picked = (
            f"first_row AS (SELECT id, 0 AS claim_pos, next_attempt_at FROM {request} "
            f"WHERE id = %(first)s AND {due} FOR UPDATE SKIP LOCKED), "
            f"others AS ({others} AND id <> %(first)s ORDER BY next_attempt_at LIMIT %(limit)s "
            "FOR UPDATE SKIP LOCKED), "
            "picked AS (SELECT * FROM first_row UNION ALL SELECT * FROM others "
            "ORDER BY claim_pos, next_attempt_at LIMIT %(limit)s)"
        )
    else:
        picked = f"picked AS ({others} ORDER BY next_attempt_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
    claimed = (
        f"claimed AS (UPDATE {request} r SET status = %(processing)s, claim_token = %(token)s, "
        "claimed_by = %(worker)s, lease_expires_at = %(lease_expires_at)s, updated_at = %(now)s "
        "FROM picked WHERE r.id = picked.id AND r.status = %(pending)s RETURNING r.*, picked.claim_pos)"
    )
    order = "ORDER BY claimed.claim_pos, claimed.next_attempt_at"
    if not start_attempts:
        return f"WITH {picked}, {claimed} SELECT * FROM claimed {order}"
    # Every column of an attempt is given: the model's defaults are Python's, not the table's.
    values = {
        "request_id": "c.id",
        "number": f"1 + COALESCE((SELECT max(a.number) FROM {attempt} a WHERE a.request_id = c.id), 0)",
        "started_at": "%(now)s",
        "worker": "%(worker)s",
        "finished_at": "NULL",
        "outcome": "''",
        "smtp_code": "NULL",
        "error_class": "''",
        "error_text": "''",
        "duration_ms": "NULL",
    }
    columns = {field.column for field in EmailAttempt._meta.concrete_fields if not field.primary_key}
    if columns != set(values):
        raise ImproperlyConfigured(
            f"_claim_batch_sql does not know the attempt columns {columns ^ set(values)}"
        )
    started = (
        f"started AS (INSERT INTO {attempt} ({', '.join(values)}) SELECT {', '.join(values.values())} "
        "FROM claimed c RETURNING id AS attempt_id, request_id, number AS attempt_number)"
    )
    return (
        f"WITH {picked}, {claimed}, {started} SELECT claimed.*, started.attempt_id, started.attempt_number "
        f"FROM claimed JOIN started ON started.request_id = claimed.id {order}"
    )


def _start_attempts(rows, *, worker, now):
    """Start and save the next attempt of each claimed row (`row.started_attempt`)."""
    numbers = dict(
        EmailAttempt.objects.filter(request__in=rows)
        .values_list("request")
        .annotate(n=Max("number"))
        .order_by()
    )
    attempts = EmailAttempt.objects.bulk_create(
        EmailAttempt(request=row, number=(numbers.get(row.pk) or 0) + 1, started_at=now, worker=worker)
        for row in rows
    )
    for row, attempt in zip(rows, attempts, strict=True):
        row.started_attempt = attempt


def _attach_started_attempt(row, pk, number, *, worker, now):
    """Give `row` the attempt the claim statement saved for it, as a saved model instance."""
    attempt = EmailAttempt(id=pk, request=row, number=number, started_at=now, worker=worker)
    attempt._state.adding = False
    attempt._state.db = row._state.db
    row.started_attempt = attempt


class EmailReplyManager(models.Manager.from_queryset(EmailRequestQuerySet)):
    def get_queryset(self):
        return super().get_queryset().filter(kind=RowKind.REPLY)


class EmailReply(EmailRequest):
    """A staff reply to a submitter: the REPLY rows of the outbox, `parent` the request answered.

    A proxy, not a table: a reply is sent by the same state machine and send loop as a request
    (see replies.py); this names those rows for the code that reads them apart (subject export).
    """

    objects = EmailReplyManager()

    class Meta:
        proxy = True
        ordering = ["created_at"]
        verbose_name = "reply"
        verbose_name_plural = "replies"


# The audit trail's model lives in its own module; imported here so the app registry finds it.
from .audit import AuditEntry  # noqa: E402, F401
from .authentication import ApiToken  # noqa: E402, F401

# The sender-wide brake's row, likewise.
from .brake import SendingBrake  # noqa: E402, F401

# The honeypot's stand-ins for the submissions it caught, likewise in their own module.
from .decoys import Decoy  # noqa: E402, F401
