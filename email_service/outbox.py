"""The outbox: store a request, then publish its send task after commit, and relay what was missed.

Tasks are published by name, so this module never imports `tasks` (which imports the services).
"""

import contextlib
import functools
import logging
import os
import random
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from celery import current_app
from django.core.cache import cache
from django.core.files.storage import default_storage
from django.db import connection, transaction
from django.utils import timezone

from . import brake, conf, delivery, journal
from .models import EmailRequest
from .outcomes import AttemptOutcome
from .storage import clean_filename

logger = logging.getLogger(__name__)

SEND_TASK = "email_service.tasks.send_email_task"
DISPATCH_TASK = "email_service.tasks.dispatch_due_emails"
# Set while a wake message of that slot waits on the broker; its task clears it, then claims.
WAKE_KEY = "email-service:send-wake:{}"
# For this long after a process found a slot taken, its new rows count on that slot's message
# without asking the cache again: its task clears the slot, and claims on until at least this
# long after (sending.send_due_emails), so each of them is committed before one of its claims.
WAKE_SEEN_TAKEN_SECONDS = 0.25

# When this process last found a wake slot taken (time.monotonic(), taken before it asked).
_seen_taken_at = None

_executor = None


def dispatch_executor():
    """Return this process's one background thread for publishing."""
    # Created lazily, so that each process forked by gunicorn gets its own thread.
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="email-dispatch")
    return _executor


def worker_name():
    """Name this process as a claimer: host and pid."""
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
    if counts_on_a_taken_slot():
        # Decided here, in memory: under load most rows need neither the cache nor the broker, and
        # handing them to the publishing thread only to learn that cost each a thread switch.
        return
    if conf.dispatch_async():
        dispatch_executor().submit(wake_or_publish, email_request.pk, email_request.celery_task_id)
    else:
        wake_or_publish(email_request.pk, email_request.celery_task_id)


def wake_or_publish(pk, task_id):
    """After the row's commit: publish a send message for it, unless one is waiting already.

    A send task drains every due row, so a message still waiting on the broker will take this
    row too: its task clears its wake slot first and claims after, and this row was committed
    before the slot was found taken (or at most WAKE_SEEN_TAKEN_SECONDS after this process last
    found it so, a time the task goes on claiming for after its clear). Up to
    EMAIL_DISPATCH_WAKE_SLOTS such messages wait at once, so that as many workers drain side by
    side.
    """
    slot = _take_wake_slot()
    if slot is False:
        return
    publish_or_forget(pk, task_id, wake=slot)


def _take_wake_slot():
    """Return a free wake slot, now taken; False if the one tried is taken; None: no slots.

    Found taken, a slot is taken for the next WAKE_SEEN_TAKEN_SECONDS without asking: under load
    most rows then cost no round trip to the cache (one per process and quarter second).
    """
    global _seen_taken_at
    slots = conf.dispatch_wake_slots()
    if not slots:
        return None
    asked_at = time.monotonic()
    if counts_on_a_taken_slot(asked_at):
        return False
    slot = random.randrange(slots)
    try:
        # It expires when the relay would publish a dispatched row again: a lost message holds
        # a slot no longer than it would have held its own row.
        taken = cache.add(WAKE_KEY.format(slot), 1, timeout=conf.dispatch_stale_after())
    except Exception as exc:
        logger.warning("Wake slots unavailable, publishing for every row: %s", exc)
        return None
    if taken:
        return slot
    _seen_taken_at = asked_at
    return False


def counts_on_a_taken_slot(now=None):
    """Whether this process found a wake slot taken less than WAKE_SEEN_TAKEN_SECONDS ago.

    A row committed by then is taken by that slot's task, which claims until at least that long
    after it cleared the slot, and it cleared the slot after this process found it taken.
    """
    seen = _seen_taken_at
    return (
        seen is not None and (now if now is not None else time.monotonic()) - seen < WAKE_SEEN_TAKEN_SECONDS
    )


def clear_wake(slot):
    """Free a wake slot, so that the next new row publishes again; called before claiming."""
    global _seen_taken_at
    _seen_taken_at = None  # what this process saw is over; other processes' sightings expire
    try:
        cache.delete(WAKE_KEY.format(slot))
    except Exception as exc:
        # The slot frees itself when its key expires; new rows wait for the relay until then.
        logger.warning("Wake slot %s not cleared: %s", slot, exc)


def publish(email_request):
    """Publish the send task now, raising if the broker cannot be reached."""
    _publish(email_request.pk, email_request.celery_task_id)


def _publish(pk, task_id, *, carry_on=False, wake=None):
    kwargs = {}
    if carry_on:
        kwargs["carry_on"] = True
    if wake is not None:
        kwargs["wake"] = wake
    current_app.send_task(
        SEND_TASK,
        args=[str(pk)],
        kwargs=kwargs or None,
        task_id=task_id or None,
        soft_time_limit=conf.soft_time_limit(),
        time_limit=conf.hard_time_limit(),
        retry=False,
    )


def publish_or_forget(pk, task_id, *, carry_on=False, wake=None):
    """Publish the send task for `pk`; if the broker is down, leave the row to the periodic relay."""
    try:
        _publish(pk, task_id, carry_on=carry_on, wake=wake)
    except Exception as exc:
        logger.warning(
            "Email request %s not published: Broker unavailable, the periodic dispatch will send it: %s",
            pk,
            exc,
            extra={"email_request_id": str(pk)},
        )
        try:
            if wake is not None:
                # Rows that found this slot taken counted on this message: the relay takes them all.
                clear_wake(wake)
                EmailRequest.objects.forget_due_dispatches()
            else:
                EmailRequest.objects.forget_dispatch(pk)
        finally:
            if not connection.in_atomic_block:
                connection.close()


def dispatch_due_soon():
    """Ask a worker, in the background, to run the relay now rather than at its next period."""
    dispatch_executor().submit(publish_relay)


def publish_relay():
    """Ask a worker to run the relay now rather than at its next period."""
    try:
        current_app.send_task(DISPATCH_TASK, retry=False)
    except Exception as exc:
        logger.warning("Broker unavailable, the periodic dispatch will send them: %s", exc)


def dispatch_due(*, limit=500):
    """Reclaim dead workers' rows, then publish every due row with no live message; return counts."""
    reclaimed = reclaim_stale_claims()
    # While the brake holds the rows wait unpublished; when its wait is over, one goes as the probe.
    gate = brake.current(refresh=True).gate()
    limit = {brake.Gate.RUN: limit, brake.Gate.PROBE: 1, brake.Gate.HOLD: 0}[gate]
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
    return _reclaim(EmailRequest.objects.stale_claims(now), now=now)


def _reclaim(claims, *, now, lost=False, keep=lambda row: False, accepted=lambda row: False):
    count = 0
    # Only the columns reclaiming needs: none is encrypted, so an unreadable row cannot stop it.
    for row in claims.only("pk", "claim_token", "claimed_by", "retry_count", "max_retries"):
        if keep(row):
            continue
        if accepted(row):
            _record_accepted(row, now=now)
            continue
        if EmailRequest.objects.reclaim(row, now=now, lost=lost):
            count += 1
            row.attempts.filter(finished_at__isnull=True).update(
                finished_at=now,
                outcome=AttemptOutcome.CRASHED,
                error_text="Worker lost before the send finished.",
            )
    return count


def _record_accepted(row, *, now):
    """Mark SENT a row whose mail the server accepted before its worker stopped (journal.py)."""
    note = f"accepted by the server before {row.claimed_by} stopped (its delivery journal)"
    if EmailRequest.objects.complete(row.pk, row.claim_token, now=now, note=note):
        row.attempts.filter(finished_at__isnull=True).update(
            finished_at=now, outcome=AttemptOutcome.SENT, smtp_code=250
        )
        # Its acknowledgement to the submitter, if one was due, is not sent: it is best effort.
        logger.warning(
            "Email request %s was accepted before its worker stopped: recorded SENT, not sent again",
            row.pk,
            extra={"email_request_id": str(row.pk)},
        )


def _process_runs(pid):
    """Whether a process with this pid exists on this host and has not ended.

    A pool process killed with its parent is a zombie until its new parent (often pid 1) gets
    round to reaping it, which can take seconds after its node has started again: it holds its pid
    but will never finish a send, so it counts as gone (its state in /proc, where there is one).
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # there, under another user
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # "pid (comm) state ...": comm may hold spaces and parentheses, the state follows the last ")".
            state = stat.read().rpartition(b")")[2].split()[:1]
    except FileNotFoundError:
        return False  # reaped since the signal
    except OSError:
        return True  # no /proc: the signal's answer stands
    return state not in ([b"Z"], [b"X"])


def reclaim_from_gone_processes(node, *, now=None):
    """Take back, without waiting for their leases, the rows this worker node's gone processes held.

    A worker node (`celery@host`) started again after a crash, or a pool process started in place
    of a killed one, finds the rows claimed under the node's name by processes that no longer
    exist: their sends can never finish, so they are reclaimed now, and the relay publishes them.
    Only where the node runs on this host (its name after "@" is this host's name), since a
    process id says nothing on another machine; a claimer whose pid is alive, or whose name does
    not parse, keeps its claim until its lease ends, as before. Node names must be unique, as
    Celery requires (it warns of duplicates at start-up): two live nodes with the same name on
    one host name, in separate pid namespaces, would take each other's rows back.
    """
    if not node or node.partition("@")[2] != socket.gethostname():
        return 0
    prefix = f"{node}:"

    def runs(claimer):
        pid = claimer[len(prefix) :]
        return not pid.isdigit() or _process_runs(int(pid))

    # Each gone claimer's journal is read once, for all of its rows.
    journal_of = functools.cache(journal.accepted)
    count = _reclaim(
        EmailRequest.objects.claims_of(prefix),
        now=now or timezone.now(),
        lost=True,
        keep=lambda row: runs(row.claimed_by),
        accepted=lambda row: (str(row.pk), str(row.claim_token)) in journal_of(row.claimed_by),
    )
    # The journals of this node's gone processes have served: their rows are settled now.
    for claimer in journal.claimers_with_journals(node):
        if not runs(claimer):
            journal.forget(claimer)
    if count:
        logger.warning("Reclaimed %d rows from gone processes of %s", count, node)
        # Called from a thread of its own already (see tasks.py): published from here, not from
        # the publishing executor, which a pool process forked later would inherit without its thread.
        publish_relay()
    return count
