"""The send loop: claim due requests a batch at a time, send each once, and record the outcome.

Before each claim the loop asks the sender-wide brake (`brake`) whether it may send, and before
each mail the quotas (`quotas`); a provider-wide outcome engages the brake and holds the rows
(PENDING, no retry spent) instead of deferring or failing them.
"""

import functools
import logging
import random
import time
import uuid
from datetime import UTC, datetime, timedelta

from celery.exceptions import SoftTimeLimitExceeded
from django.core.cache import cache
from django.db import OperationalError, transaction
from django.utils import timezone

from . import audit, brake, conf, delivery, journal, outbox, quotas
from .acknowledgements import send_confirmation
from .models import ATTEMPT_RESULT_FIELDS, EmailAttempt, EmailRequest, EmailStatus
from .outcomes import AttemptOutcome, BrakeKind

logger = logging.getLogger(__name__)


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


def send_due_emails(
    first=None, *, worker=None, lease=None, batch_size=None, more=True, carry_on=False, wake=None
):
    """Claim due requests a batch at a time, `first` first, and send each once over this worker's
    SMTP connection; return {id: new status} for the rows tried.

    One task thus drains a backlog: it claims a batch of rows in one statement (`batch_size`, or
    as many as `send_pace` says fit in a quarter second) and goes on while rows are due (`more`)
    and its send window lasts; the messages of the rows it took find nothing to claim. Each
    outcome is committed right after its send, so a crash repeats one mail at most.

    A wake message (`wake`, see outbox.wake_or_publish) stands for every row committed while
    its slot was taken: its slot is cleared before the first claim, and it drains like `carry_on`.
    Processes that saw the slot taken go on counting on it for WAKE_SEEN_TAKEN_SECONDS, so it
    claims until at least that long after the clear, waiting out the rest if it runs dry sooner.
    """
    claim_until = None
    if wake is not None:
        outbox.clear_wake(wake)
        claim_until = time.monotonic() + outbox.WAKE_SEEN_TAKEN_SECONDS
        carry_on = True
    # Most messages of a backlog find their row already taken by another task's batch: one
    # indexed read, and they are done (their ack is all the broker still needs). Every other due
    # row has a message of its own, or the relay's; a task that carries on after given-back rows
    # (`carry_on`) drains whatever its row's state.
    if first is not None and not carry_on and not EmailRequest.objects.is_pending(first):
        logger.debug("Email request %s no longer pending", first, extra={"email_request_id": str(first)})
        return {}
    worker = (worker or outbox.worker_name())[:255]
    window_ends = time.monotonic() + conf.send_window()
    statuses = {}
    while True:
        # No connection while the brake holds: the rows wait PENDING, their retries untouched.
        probe = None
        gate = brake.current().gate()
        if gate is not brake.Gate.RUN:
            probe = brake.take_probe(worker) if gate is brake.Gate.PROBE else None
            if probe is None:
                _wait_for_brake(first, carry_on=carry_on)
                return statuses
        limit = 1 if probe else batch_size or send_pace.batch_size(conf.send_batch_size())
        token, rows = _insist(
            functools.partial(
                EmailRequest.objects.claim_batch,
                worker=worker,
                first=first,
                limit=limit,
                lease=lease,
                start_attempts=True,
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
            if probe:
                brake.drop_probe(probe)
            elif _wait_to_claim_again(claim_until):
                continue
            return statuses
        sent, gave_back = _send_batch(
            rows, token, worker, window_ends=window_ends, started=bool(statuses), probe=probe
        )
        statuses.update(sent)
        # Rows given back went with a task of their own: this one stops rather than take them again.
        if gave_back or not more:
            return statuses
        if len(rows) < limit and (probe or not _wait_to_claim_again(claim_until)):
            return statuses
        if time.monotonic() > window_ends:
            # Rows may still be due that have no message of their own (they found a wake slot
            # taken): a continuation drains them.
            outbox.publish_or_forget(rows[-1].pk, str(uuid.uuid4()), carry_on=True)
            return statuses


def _wait_to_claim_again(claim_until):
    """Sleep until `claim_until` (a time.monotonic() value) if it is still ahead; whether it was."""
    remaining = claim_until - time.monotonic() if claim_until is not None else 0
    if remaining <= 0:
        return False
    time.sleep(remaining)
    return True


def _wait_for_brake(first, *, carry_on=False):
    """Leave `first` to the relay, which publishes it again once sending resumes.

    A task that drains for others (`carry_on`) leaves every due row to the relay: some of them
    have no message of their own.
    """
    if carry_on:
        EmailRequest.objects.forget_due_dispatches()
    elif first is not None:
        EmailRequest.objects.forget_dispatch(first)


def _send_batch(rows, token, worker, *, window_ends, started, probe=None):
    """Send claimed rows in order until the window closes; give the untried ones back.

    When sending stops as a whole (the brake engaged, a quota reached), the untried rows are
    held instead, due when it may start again and with no task published for them.
    """
    # Started with the claim (EmailRequestQuerySet.claim_batch): a crash from here on leaves each
    # row's attempt unfinished, and the reclaim records it CRASHED.
    attempts = [row.started_attempt for row in rows]
    statuses = {}
    tried = 0
    # Once sending stopped as a whole: (when the untried rows may go, None for "when resumed").
    held = None
    try:
        for row, attempt in zip(rows, attempts, strict=True):
            # The first mail of a task always goes; each later one only while another send fits.
            if (started or tried) and time.monotonic() > window_ends:
                break
            # Once one of this batch has gone: the rest only if they would not wait long at the
            # server's present pace (other workers may be idle: they get them).
            if tried and (send_pace.seconds or 0) * (len(rows) - tried) > SendPace.WAIT_SECONDS:
                break
            # Counted before any connection opens, so a limit reached costs no SMTP session.
            try:
                reservation = quotas.reserve()
            except quotas.QuotaReached as reached:
                held = (_quota_reached(reached, probe),)
                break
            turn = _login_turn(worker)
            if turn is False:
                quotas.give_back(reservation)
                held = (brake.current().until,)
                break
            tried += 1
            try:
                status, result = _send_claimed(row, attempt, token, reservation=reservation, probe=probe)
            finally:
                if turn:
                    _end_login_turn(worker)
            statuses[str(row.pk)] = status
            if result.is_provider_wide:
                held = (brake.current().until,)
                break
    finally:
        if probe is not None and not tried:
            # Nothing went: let the next mail probe now rather than every worker wait out its lease.
            brake.drop_probe(probe)
        untried = rows[tried:]
        if untried and held is not None:
            _hold_untried(untried, attempts[tried:], token, held[0])
        if held is not None and conf.dispatch_wake_slots():
            # Due rows that found a wake slot taken have no message: the relay publishes them
            # once sending may start again.
            EmailRequest.objects.forget_due_dispatches()
        if untried and held is None:
            _give_back(untried, attempts[tried:], token)
    return statuses, bool(untried)


LOGIN_TURN_KEY = "email-service:smtp-login-turn"


def _login_turn(worker):
    """Wait for this worker's turn to open an SMTP connection: True once it has the turn, None when
    its connection is open already (no turn needed), False if the brake engaged meanwhile.

    Workers log in one at a time, so a refused password is tried by one worker, once, and the
    brake it engages stops the others before they try it too (a burst of failed logins is what
    gets an account locked). A worker with an open connection needs no turn.
    """
    if delivery.is_connected():
        return None
    deadline = time.monotonic() + conf.smtp_timeout()
    while not cache.add(LOGIN_TURN_KEY, worker, timeout=conf.smtp_timeout() * 2 + 5):
        if brake.current(refresh=True).gate() is brake.Gate.HOLD:
            return False
        if time.monotonic() > deadline:
            return None  # a turn-holder that hung: its key expires; this send goes anyway
        time.sleep(0.05)
    # The turn came after another worker's login: if that one engaged the brake, stop here.
    if brake.current(refresh=True).gate() is brake.Gate.HOLD:
        _end_login_turn(worker)
        return False
    return True


def _end_login_turn(worker):
    if cache.get(LOGIN_TURN_KEY) == worker:
        cache.delete(LOGIN_TURN_KEY)


def _quota_reached(reached, probe):
    """Stop at a limit of our own: the daily one engages the brake, the minute one waits it out."""
    free_at = datetime.fromtimestamp(reached.free_at, tz=UTC)
    if reached.limit != "daily":
        if probe:
            brake.drop_probe(probe)
        return free_at
    state = brake.engage(
        BrakeKind.QUOTA, f"EMAIL_DAILY_LIMIT of {conf.daily_limit()} reached", probe=probe, until=free_at
    )
    return state.until or free_at


def _hold_untried(rows, attempts, token, until):
    """Give back rows never tried because sending stopped, due when it may start again."""
    with transaction.atomic():
        EmailAttempt.objects.filter(pk__in=[attempt.pk for attempt in attempts]).delete()
        EmailRequest.objects.hold([row.pk for row in rows], token, until=until, note="never tried")


def _send_claimed(email_request, attempt, token, *, reservation=None, probe=None):
    attempt.started_at = timezone.now()
    started = time.monotonic()
    try:
        result = delivery.send(delivery.build_message(email_request))
    except Exception as exc:
        result = delivery.classify(exc)
    if result.outcome == AttemptOutcome.SENT:
        # First thing after the server's 250: a crash from here until the outcome's commit must
        # not send it again (journal.py).
        journal.record(attempt.worker, email_request.pk, token)
    send_pace.record(time.monotonic() - started)
    if result.outcome != AttemptOutcome.SENT and reservation is not None:
        quotas.give_back(reservation)
    hold_until = None
    if result.is_provider_wide:
        # Engaged before the row is written, so other workers stop as soon as possible.
        state = brake.engage_for(result, probe=probe)
        hold_until = state.until if state.is_engaged else None
    elif probe is not None and brake.release(probe):
        # The rows that waited have no message on the broker: the relay publishes them now.
        outbox.dispatch_due_soon()
    # The outcome is written first and insistently: once SMTP has accepted the mail, a row left
    # PROCESSING would be reclaimed and sent again when its lease runs out.
    status = _insist(lambda: _record_outcome(email_request, attempt, token, result, hold_until=hold_until))
    journal.settle()
    if status == EmailStatus.SENT:
        send_confirmation(email_request)
    return status, result


def _record_outcome(email_request, attempt, token, result, *, hold_until=None):
    """Record the row's new status and the finished attempt together."""
    _fill_attempt(attempt, result)
    if result.outcome == AttemptOutcome.SENT:
        # The common case, one statement where the database allows (see EmailRequestQuerySet.complete).
        return _record_result(email_request, token, result, attempt=attempt)
    with transaction.atomic():
        attempt.save(update_fields=ATTEMPT_RESULT_FIELDS)
        return _record_result(email_request, token, result, attempt=attempt, hold_until=hold_until)


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
        outbox.publish_or_forget(rows[0].pk, str(uuid.uuid4()), carry_on=True)


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


def _record_result(email_request, token, result, *, attempt, hold_until=None):
    pk = email_request.pk
    # Said on the transition's log line: which attempt this was, how it ended, the server's code.
    log = {
        "note": f"attempt {attempt.number} {result.outcome}, smtp code {result.smtp_code or '-'}",
        "log_fields": {"attempt": attempt.number, "outcome": result.outcome, "smtp_code": result.smtp_code},
    }
    if result.outcome == AttemptOutcome.SENT:
        changed = EmailRequest.objects.complete(pk, token, now=attempt.finished_at, attempt=attempt, **log)
        new_status = EmailStatus.SENT
    elif result.is_provider_wide:
        # About the account, not this mail: it waits for the brake and keeps its retries.
        changed = EmailRequest.objects.hold(
            [pk], token, until=hold_until, error=result.error_message, note=f"{log['note']}, {result.brake}"
        )
        new_status = EmailStatus.PENDING
    elif result.outcome == AttemptOutcome.TRANSIENT and email_request.has_retries_left():
        retry_number = email_request.retry_count + 1
        changed = EmailRequest.objects.defer(
            pk,
            token,
            error=result.error_message,
            retry_count=retry_number,
            next_attempt_at=timezone.now() + timedelta(seconds=retry_backoff(retry_number)),
            **log,
        )
        new_status = EmailStatus.PENDING
    else:
        changed = EmailRequest.objects.fail(pk, token, error=result.error_message, **log)
        new_status = EmailStatus.FAILED
    if not changed:
        logger.error(
            "Email request %s lost its claim before recording the outcome",
            pk,
            extra={"email_request_id": str(pk), "smtp_code": result.smtp_code},
        )
        return None
    return new_status


# --- what operators call (the `sending` command and the admin) -------------------------------


def pause_sending(reason="", *, channel, actor=None, request=None):
    """Pause every worker's sending as an operator, with an audit entry; return the new state."""
    if brake.pause(reason):
        audit.record(audit.AuditAction.PAUSE, channel=channel, actor=actor, request=request)
    return brake.current(refresh=True)


def resume_sending(*, channel, actor=None, request=None):
    """Resume sending as an operator, whatever engaged the brake, and send the rows that waited."""
    before = brake.current(refresh=True)
    if brake.resume():
        audit.record(audit.AuditAction.RESUME, channel=channel, actor=actor, request=request)
        # Rows held until a quota's window ends are due now: the operator says it is over.
        if before.until is not None:
            EmailRequest.objects.wake_held(before.until)
        outbox.dispatch_due_soon()
    return brake.current(refresh=True)
