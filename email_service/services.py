"""The work that crosses a boundary: create-and-dispatch, claim-and-send, cancel, retry, purge.

Views, admin actions, tasks and management commands call these functions; the status rules
themselves live on `EmailRequestQuerySet`.
"""

import contextlib
import functools
import hashlib
import logging
import os
import random
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

from celery.exceptions import SoftTimeLimitExceeded
from django.core.cache import cache
from django.core.files.storage import default_storage
from django.db import OperationalError, connection, transaction
from django.db.models import Count
from django.utils import timezone

from . import conf, delivery
from .models import ATTEMPT_RESULT_FIELDS, EmailAttempt, EmailRequest, EmailStatus
from .storage import clean_filename

logger = logging.getLogger(__name__)


class TransitionNotAllowed(Exception):
    """The request is not in a status that allows this action."""


# --- creating and dispatching ----------------------------------------------------------------

_executor = None


def _dispatch_executor():
    # Created lazily, so that each process forked by gunicorn gets its own thread.
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="email-dispatch")
    return _executor


def worker_name():
    return f"{socket.gethostname()}:{os.getpid()}"


def create_email_request(*, data, upload=None, content_type="", client_ip=None, dispatch_on_commit=True):
    """Store a submission and queue its delivery once the row is committed."""
    email_request = EmailRequest(
        **data,
        client_ip=client_ip,
        message_id=delivery.new_message_id(),
        celery_task_id=str(uuid.uuid4()),
        # Counted as dispatched from the start: the periodic run only picks it up if the
        # publish after commit fails or its message goes unclaimed.
        dispatched_at=timezone.now(),
    )
    try:
        # A row alone is one INSERT, atomic by itself; a file and its row commit or go together.
        with transaction.atomic() if upload is not None else contextlib.nullcontext():
            if upload is not None:
                email_request.attachment_name = clean_filename(upload.name or "")
                email_request.attachment_size = upload.size
                email_request.attachment_content_type = content_type
                email_request.file_attached.save(upload.name or "attachment", upload, save=False)
            email_request.save(force_insert=True)
            if dispatch_on_commit:
                # robust: this runs after COMMIT, so a failure here must not look like a rollback
                # (the except below would delete the committed row's file); the relay retries.
                transaction.on_commit(lambda: dispatch(email_request), robust=True)
    except BaseException:
        # The row is gone with the rollback; its file must go too.
        if email_request.file_attached:
            default_storage.delete(email_request.file_attached.name)
        raise
    logger.info(
        "Email request %s created: %s",
        email_request.pk,
        email_request.status,
        extra={"email_request_id": str(email_request.pk), "status": email_request.status},
    )
    return email_request


def dispatch(email_request):
    """Publish the send task without ever making the caller wait for the broker."""
    if conf.dispatch_async():
        _dispatch_executor().submit(_publish_or_forget, email_request.pk, email_request.celery_task_id)
    else:
        _publish_or_forget(email_request.pk, email_request.celery_task_id)


def publish(email_request):
    """Publish the send task now, raising if the broker cannot be reached."""
    _publish(email_request.pk, email_request.celery_task_id)


def _publish(pk, task_id):
    from .tasks import send_email_task

    send_email_task.apply_async(
        args=[str(pk)],
        task_id=task_id or None,
        soft_time_limit=conf.soft_time_limit(),
        time_limit=conf.hard_time_limit(),
        retry=False,
    )


def _publish_or_forget(pk, task_id):
    try:
        _publish(pk, task_id)
    except Exception as exc:
        logger.warning(
            "Email request %s not published: Broker unavailable, the periodic dispatch will send it: %s",
            pk,
            exc,
            extra={"email_request_id": str(pk)},
        )
        try:
            EmailRequest.objects.forget_dispatch(pk)
        finally:
            if not connection.in_atomic_block:
                connection.close()


def dispatch_due(*, limit=500):
    """Reclaim dead workers' rows, then publish every due row with no live message; return counts."""
    reclaimed = reclaim_stale_claims()
    # Oldest due first; each republish gets a task id of its own, so that revoking one message
    # (celery revoke) never silences every later attempt at the same row.
    rows = list(
        EmailRequest.objects.undispatched().order_by("next_attempt_at").values_list("pk", flat=True)[:limit]
    )
    published = []
    for pk in rows:
        try:
            _publish(pk, str(uuid.uuid4()))
        except Exception as exc:
            logger.warning("Dispatch stopped, broker unavailable: %s", exc)
            break
        published.append(pk)
    EmailRequest.objects.mark_dispatched(published)
    if published or reclaimed:
        logger.info("Dispatched %d due emails, reclaimed %d", len(published), reclaimed)
    return {"dispatched": len(published), "reclaimed": reclaimed}


def reclaim_stale_claims(now=None):
    """Hand rows whose worker died back to PENDING (or FAILED); return how many."""
    now = now or timezone.now()
    count = 0
    for row in EmailRequest.objects.stale_claims(now):
        if EmailRequest.objects.reclaim(row, now=now):
            count += 1
            row.attempts.filter(finished_at__isnull=True).update(
                finished_at=now, outcome="crashed", error_text="Worker lost before the send finished."
            )
            logger.warning(
                "Email request %s reclaimed from lost worker %s: PROCESSING -> %s",
                row.pk,
                row.claimed_by,
                "PENDING" if row.retry_count < row.max_retries else "FAILED",
                extra={"email_request_id": str(row.pk), "worker": row.claimed_by},
            )
    return count


# --- sending --------------------------------------------------------------------------------


def retry_backoff(retry_number):
    """Seconds to wait before retry `retry_number` (1-based): exponential, capped, jittered."""
    delay = min(conf.retry_backoff_max(), conf.retry_delay() * 2 ** (retry_number - 1))
    # Half fixed, half random, so a burst of failures does not come back all at once.
    return delay / 2 + random.uniform(0, delay / 2)


def send_email_request(pk, *, worker=None, lease=None):
    """Claim one due request, send it once, and record the outcome; return the new status or None."""
    return send_due_emails(pk, worker=worker, lease=lease, batch_size=1, more=False).get(str(pk))


class SendPace:
    """How long this process's recent sends took, to size its next batch.

    A batch is sent one mail after another by one process, so its size is a trade: against a
    fast relay, 20 mails in one claim save 19 claims; against a server that takes half a second
    per mail (Gmail), they would wait in line while other workers sit idle. A batch is sized to
    take about BATCH_SECONDS at the recent pace, between 1 and EMAIL_SEND_BATCH_SIZE; a process
    that has sent nothing yet starts with 1.
    """

    BATCH_SECONDS = 0.25
    # Rows of a claimed batch that would wait longer than this at the pace just seen are given
    # back, for any idle worker to take.
    WAIT_SECONDS = 1.0

    def __init__(self):
        self.seconds = None

    def record(self, seconds):
        # A slow send counts at once; a return to speed is believed over a few sends.
        self.seconds = (
            seconds
            if self.seconds is None or seconds > self.seconds
            else (0.8 * self.seconds + 0.2 * seconds)
        )

    def batch_size(self, largest):
        if self.seconds is None:
            return 1
        return max(1, min(largest, int(self.BATCH_SECONDS / max(self.seconds, 1e-4))))


send_pace = SendPace()


def send_due_emails(first=None, *, worker=None, lease=None, batch_size=None, more=True):
    """Claim due requests a batch at a time, `first` first, and send each once over this worker's
    SMTP connection; return {id: new status} for the rows tried.

    One task thus drains a backlog: it claims a batch of rows in one statement (`batch_size`, or
    as many as `send_pace` says fit in a quarter second) and goes on while rows are due (`more`)
    and its send window lasts; the messages of the rows it took find nothing to claim. Each
    outcome is committed right after its send, so a crash repeats one mail at most.
    """
    worker = (worker or worker_name())[:255]
    window_ends = time.monotonic() + conf.send_window()
    statuses = {}
    while True:
        limit = batch_size or send_pace.batch_size(conf.send_batch_size())
        token, rows = _insist(
            functools.partial(
                EmailRequest.objects.claim_batch, worker=worker, first=first, limit=limit, lease=lease
            )
        )
        if first is not None and str(first) not in {str(row.pk) for row in rows}:
            logger.info(
                "Email request %s not claimed (sent, cancelled, not due or taken)",
                first,
                extra={"email_request_id": str(first)},
            )
        first = None
        if not rows:
            return statuses
        sent, gave_back = _send_batch(rows, token, worker, window_ends=window_ends, started=bool(statuses))
        statuses.update(sent)
        # Rows given back went with a task of their own: this one stops rather than take them again.
        if gave_back or not more or len(rows) < limit or time.monotonic() > window_ends:
            return statuses


def _send_batch(rows, token, worker, *, window_ends, started):
    """Send claimed rows in order until the window closes; give the untried ones back."""
    numbers = dict(
        EmailAttempt.objects.filter(request__in=rows)
        .values_list("request")
        .annotate(n=Count("id"))
        .order_by()
    )
    now = timezone.now()
    attempts = EmailAttempt.objects.bulk_create(
        EmailAttempt(request=row, number=numbers.get(row.pk, 0) + 1, started_at=now, worker=worker)
        for row in rows
    )
    statuses = {}
    tried = 0
    try:
        for row, attempt in zip(rows, attempts, strict=True):
            # The first mail of a task always goes; each later one only while another send fits.
            if (started or tried) and time.monotonic() > window_ends:
                break
            # Once one of this batch has gone: the rest only if they would not wait long at the
            # server's present pace (other workers may be idle: they get them).
            if tried and (send_pace.seconds or 0) * (len(rows) - tried) > SendPace.WAIT_SECONDS:
                break
            tried += 1
            statuses[str(row.pk)] = _send_claimed(row, attempt, token)
    finally:
        untried = rows[tried:]
        if untried:
            _give_back(untried, attempts[tried:], token)
    return statuses, bool(untried)


def _send_claimed(email_request, attempt, token):
    pk = email_request.pk
    attempt.started_at = timezone.now()
    logger.info(
        "Email request %s claimed: PENDING -> PROCESSING, attempt %d by %s",
        pk,
        attempt.number,
        attempt.worker,
        extra={"email_request_id": str(pk), "attempt": attempt.number, "status": EmailStatus.PROCESSING},
    )
    started = time.monotonic()
    try:
        result = delivery.send(delivery.build_support_message(email_request))
    except Exception as exc:
        result = delivery.classify(exc)
    send_pace.record(time.monotonic() - started)
    # The outcome is written first and insistently: once SMTP has accepted the mail, a row left
    # PROCESSING would be reclaimed and sent again when its lease runs out.
    status = _insist(lambda: _record_outcome(email_request, attempt, token, result))
    if status == EmailStatus.SENT:
        send_confirmation(email_request)
    return status


def _record_outcome(email_request, attempt, token, result):
    """Record the row's new status and the finished attempt together."""
    _fill_attempt(attempt, result)
    if result.outcome == delivery.SENT:
        # The common case, one statement where the database allows (see EmailRequestQuerySet.complete).
        return _record_result(email_request, token, result, attempt=attempt)
    with transaction.atomic():
        attempt.save(update_fields=ATTEMPT_RESULT_FIELDS)
        return _record_result(email_request, token, result, attempt=attempt)


def _give_back(rows, attempts, token):
    """Release claimed rows that were never tried, and publish a task to carry on with them."""
    try:
        with transaction.atomic():
            EmailAttempt.objects.filter(pk__in=[attempt.pk for attempt in attempts]).delete()
            released = EmailRequest.objects.release_untried([row.pk for row in rows], token)
    except Exception:
        # Their lease runs out and the relay reclaims them; nothing is lost.
        logger.exception("%d claimed email requests not released", len(rows))
        return
    logger.info(
        "Released %d claimed email requests untried: the send window closed or sends slowed", released
    )
    if released:
        _publish_or_forget(rows[0].pk, str(uuid.uuid4()))


def _insist(write, tries=4):
    """Run a database write, again after a passing database error or the soft time limit."""
    for attempt in range(tries):
        try:
            return write()
        except (OperationalError, SoftTimeLimitExceeded):
            if attempt == tries - 1:
                raise
            time.sleep(0.2 * 2**attempt)


def _fill_attempt(attempt, result):
    attempt.finished_at = timezone.now()
    attempt.outcome = result.outcome
    # smtplib reports -1 for a reply it could not read; that is no SMTP code.
    attempt.smtp_code = result.smtp_code if result.smtp_code and result.smtp_code > 0 else None
    attempt.error_class = result.error_class
    attempt.error_text = result.error_text
    attempt.duration_ms = int((attempt.finished_at - attempt.started_at).total_seconds() * 1000)


def _record_result(email_request, token, result, *, attempt):
    pk = email_request.pk
    log_extra = {"email_request_id": str(pk), "smtp_code": result.smtp_code}
    if result.outcome == delivery.SENT:
        new_status = EmailStatus.SENT
        changed = EmailRequest.objects.complete(pk, token, now=attempt.finished_at, attempt=attempt)
    elif result.outcome == delivery.TRANSIENT and email_request.retry_count < email_request.max_retries:
        new_status = EmailStatus.PENDING
        retry_number = email_request.retry_count + 1
        changed = EmailRequest.objects.defer(
            pk,
            token,
            error=result.error_message,
            retry_count=retry_number,
            next_attempt_at=timezone.now() + timedelta(seconds=retry_backoff(retry_number)),
        )
    else:
        new_status = EmailStatus.FAILED
        changed = EmailRequest.objects.fail(pk, token, error=result.error_message)
    if not changed:
        logger.error("Email request %s lost its claim before recording the outcome", pk, extra=log_extra)
        return None
    logger.info(
        "Email request %s attempt %s: PROCESSING -> %s (smtp code %s)",
        pk,
        result.outcome,
        new_status,
        result.smtp_code or "-",
        extra={**log_extra, "outcome": result.outcome, "status": new_status},
    )
    return new_status


def send_confirmation(email_request):
    """Acknowledge receipt to the submitter, at most once per address per interval; never raise."""
    if not conf.send_confirmation():
        return False
    now = timezone.now()
    interval = conf.confirmation_interval()
    address_key = hashlib.sha256(email_request.email.strip().lower().encode()).hexdigest()
    recently = EmailRequest.objects.filter(
        email__iexact=email_request.email, confirmation_sent_at__gte=now - timedelta(seconds=interval)
    ).exists()
    # The cache key makes the check atomic across workers; the row check survives a cache flush.
    if recently or not cache.add(f"email-confirmation:{address_key}", 1, timeout=interval):
        return False
    try:
        result = delivery.send(delivery.build_confirmation_message(email_request))
    except Exception as exc:
        result = delivery.classify(exc)
    if result.outcome == delivery.SENT:
        EmailRequest.objects.filter(pk=email_request.pk).update(confirmation_sent_at=timezone.now())
        return True
    cache.delete(f"email-confirmation:{address_key}")
    EmailRequest.objects.filter(pk=email_request.pk).update(confirmation_error=result.error_message)
    logger.warning(
        "Email request %s acknowledgement not sent: %s",
        email_request.pk,
        result.error_message,
        extra={"email_request_id": str(email_request.pk)},
    )
    return False


# --- reads shared by many callers ----------------------------------------------------------

STATISTICS_CACHE_KEY = "email-service:statistics"


def cached_statistics():
    """Return the statistics, computed at most once per EMAIL_STATISTICS_CACHE_SECONDS for everyone.

    The aggregate reads the whole table (over a second at a million rows), and the endpoint is
    public: callers within the period share one result, marked with the time it was taken.
    """
    seconds = conf.statistics_cache_seconds()
    body = cache.get(STATISTICS_CACHE_KEY) if seconds else None
    if body is None:
        body = {**EmailRequest.objects.statistics(), "as_of": timezone.now().isoformat()}
        if seconds:
            cache.set(STATISTICS_CACHE_KEY, body, timeout=seconds)
    return body


# --- operator actions -------------------------------------------------------------------------


def cancel_email_request(email_request):
    """Cancel a PENDING request; raise TransitionNotAllowed otherwise."""
    if not EmailRequest.objects.filter(pk=email_request.pk).cancel():
        email_request.refresh_from_db(fields=["status"])
        raise TransitionNotAllowed(f"A {email_request.status} request cannot be cancelled.")
    logger.info(
        "Email request %s cancelled: PENDING -> CANCELLED",
        email_request.pk,
        extra={"email_request_id": str(email_request.pk), "status": "CANCELLED"},
    )


def retry_failed(queryset=None):
    """Requeue FAILED requests with a fresh retry budget and dispatch them; return how many."""
    queryset = EmailRequest.objects.all() if queryset is None else queryset
    with transaction.atomic():
        # Lock the rows first so that the log names exactly the rows this call requeued.
        pks = list(
            EmailRequest.objects.filter(pk__in=queryset.values("pk"), status=EmailStatus.FAILED)
            .select_for_update()
            .values_list("pk", flat=True)
        )
        count = EmailRequest.objects.filter(pk__in=pks).requeue_failed()
    for pk in pks:
        logger.info(
            "Email request %s requeued: FAILED -> PENDING",
            pk,
            extra={"email_request_id": str(pk), "status": EmailStatus.PENDING},
        )
    if count:
        transaction.on_commit(_dispatch_due_soon)
    return count


def _dispatch_due_soon():
    from .tasks import dispatch_due_emails

    def publish():
        try:
            dispatch_due_emails.apply_async(retry=False)
        except Exception as exc:
            logger.warning("Broker unavailable, the periodic dispatch will send them: %s", exc)

    _dispatch_executor().submit(publish)


# --- retention ------------------------------------------------------------------------------


def purge_expired(*, dry_run=False):
    """Delete final rows past the retention period and orphaned attachment files; return counts."""
    expired = EmailRequest.objects.expired()
    rows = expired.count()
    files = expired.with_attachment().count()
    if not dry_run:
        # Deleting row by row fires post_delete, which removes each file from storage.
        for email_request in expired.iterator():
            # Checked again row by row: staff may have requeued it since the count.
            for row in EmailRequest.objects.expired().filter(pk=email_request.pk):
                row.delete()
    orphans = purge_orphan_files(dry_run=dry_run)
    return {"rows": rows, "files": files, "orphans": orphans}


def purge_orphan_files(*, dry_run=False, root="email_attachments", min_age=timedelta(hours=1)):
    """Delete attachment files no row refers to; return how many.

    A file younger than `min_age` is kept: its row may still be in an uncommitted transaction.
    """
    known = set(EmailRequest.objects.with_attachment().values_list("file_attached", flat=True))
    cutoff = timezone.now() - min_age
    orphans = [
        name
        for name in _walk_storage(root)
        if name not in known and default_storage.get_modified_time(name) < cutoff
    ]
    if not dry_run:
        for name in orphans:
            default_storage.delete(name)
    return len(orphans)


def _walk_storage(path):
    try:
        directories, files = default_storage.listdir(path)
    except FileNotFoundError:
        return
    for name in files:
        yield f"{path}/{name}"
    for directory in directories:
        yield from _walk_storage(f"{path}/{directory}")
