"""The delivery state machine on EmailRequestQuerySet: every transition from every status.

Each row of the table is (from status, action, expected status, allowed). A refused transition
must leave the row exactly as it was: the guarded UPDATE matches nothing. Every row under test
carries the same claim token and an expired lease whatever its status, so a refusal can only come
from the status guard, never from a token or lease that happens not to match.
"""

import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from email_service.models import CLAIM_CLOCK_TOLERANCE, EmailAttempt, EmailRequest, EmailStatus, RowKind

pytestmark = pytest.mark.django_db

TOKEN = uuid.UUID("00000000-0000-4000-8000-000000000001")
STATUSES = list(EmailStatus)


def make_row(status, **fields):
    """Store a row directly in `status`, claimed by a dead worker, due and long dispatched."""
    past = timezone.now() - timedelta(minutes=10)
    values = {
        "full_name": "Model Test",
        "email": f"m-{uuid.uuid4().hex[:10]}@example.org",
        "status": status,
        "claim_token": TOKEN,
        "claimed_by": "host:1234",
        "lease_expires_at": past,
        "next_attempt_at": past,
        "dispatched_at": past,
        "retry_count": 1,
        "max_retries": 3,
        "error_message": "earlier error",
        **fields,
    }
    return EmailRequest.objects.create(**values)


def snapshot(row):
    return EmailRequest.objects.filter(pk=row.pk).values().get()


def new_attempt(row):
    now = timezone.now()
    return EmailAttempt.objects.create(request=row, number=1, started_at=now, worker="w")


def _complete_with_attempt(row):
    attempt = new_attempt(row)
    attempt.finished_at, attempt.outcome, attempt.smtp_code, attempt.duration_ms = (
        timezone.now(),
        "sent",
        250,
        3,
    )
    return EmailRequest.objects.complete(row.pk, TOKEN, attempt=attempt)


def _defer(row):
    later = timezone.now() + timedelta(minutes=5)
    return EmailRequest.objects.defer(row.pk, TOKEN, error="421 later", retry_count=2, next_attempt_at=later)


# Each action runs against one row and returns something truthy when it changed that row.
ACTIONS = {
    "claim": lambda row: EmailRequest.objects.claim(row.pk, worker="new-worker"),
    "claim_batch": lambda row: EmailRequest.objects.claim_batch(worker="new-worker", first=row.pk, limit=5)[
        1
    ],
    "release_untried": lambda row: EmailRequest.objects.release_untried([row.pk], TOKEN),
    "complete": lambda row: EmailRequest.objects.complete(row.pk, TOKEN),
    "complete_with_attempt": _complete_with_attempt,
    "defer": _defer,
    "fail": lambda row: EmailRequest.objects.fail(row.pk, TOKEN, error="550 no"),
    "hold": lambda row: EmailRequest.objects.hold(
        [row.pk], TOKEN, until=timezone.now() + timedelta(minutes=5), error="421 4.7.0 throttled"
    ),
    "cancel": lambda row: EmailRequest.objects.filter(pk=row.pk).cancel(),
    "requeue_failed": lambda row: EmailRequest.objects.filter(pk=row.pk).requeue_failed(),
    "reclaim": lambda row: EmailRequest.objects.reclaim(row),
    "mark_dispatched": lambda row: EmailRequest.objects.mark_dispatched([row.pk]),
    "forget_dispatch": lambda row: EmailRequest.objects.forget_dispatch(row.pk),
    "edit_unsent": lambda row: EmailRequest.objects.filter(pk=row.pk).edit_unsent(subject="Edited"),
}

# The allowed transitions; every other (status, action) pair is refused.
ALLOWED = {
    (EmailStatus.PENDING, "claim"): EmailStatus.PROCESSING,
    (EmailStatus.PENDING, "claim_batch"): EmailStatus.PROCESSING,
    (EmailStatus.PROCESSING, "release_untried"): EmailStatus.PENDING,
    (EmailStatus.PROCESSING, "complete"): EmailStatus.SENT,
    (EmailStatus.PROCESSING, "complete_with_attempt"): EmailStatus.SENT,
    (EmailStatus.PROCESSING, "defer"): EmailStatus.PENDING,
    (EmailStatus.PROCESSING, "fail"): EmailStatus.FAILED,
    (EmailStatus.PROCESSING, "hold"): EmailStatus.PENDING,  # sending stopped as a whole
    (EmailStatus.PENDING, "cancel"): EmailStatus.CANCELLED,
    (EmailStatus.FAILED, "requeue_failed"): EmailStatus.PENDING,
    (EmailStatus.PROCESSING, "reclaim"): EmailStatus.PENDING,  # retries left: 1 of 3 used
    # These two change no status: they only note whether a PENDING row has a message queued.
    (EmailStatus.PENDING, "mark_dispatched"): EmailStatus.PENDING,
    (EmailStatus.PENDING, "forget_dispatch"): EmailStatus.PENDING,
    # Contact fields may be corrected until the mail has gone.
    **{(status, "edit_unsent"): status for status in STATUSES if status != EmailStatus.SENT},
}

TABLE = [
    (status, action, ALLOWED.get((status, action), status), (status, action) in ALLOWED)
    for action in ACTIONS
    for status in STATUSES
]


def _row_id(row):
    status, action, expected, allowed = row
    return f"{status}-{action}-{expected if allowed else 'refused'}"


def _params(table):
    return [pytest.param(*row, id=_row_id(row)) for row in table]


def test_the_table_covers_every_status_for_every_action():
    assert {(status, action) for status, action, _, _ in TABLE} == {
        (status, action) for status in STATUSES for action in ACTIONS
    }
    assert set(ALLOWED) <= {(status, action) for status, action, _, _ in TABLE}


@pytest.mark.parametrize(("start", "action", "expected", "allowed"), _params(TABLE))
def test_transition(start, action, expected, allowed):
    row = make_row(start)
    before = snapshot(row)

    changed = ACTIONS[action](row)

    after = snapshot(row)
    assert bool(changed) is allowed
    assert after["status"] == expected
    if allowed:
        check_effects(action, before, after)
    else:
        assert after == before, "a refused transition changed the row"


def check_effects(action, before, after):
    """Assert what an allowed action writes besides the status."""
    assert after["updated_at"] >= before["updated_at"]
    claim_released = {"claim_token": None, "lease_expires_at": None}
    if action in ("claim", "claim_batch"):
        assert after["claim_token"] not in (None, TOKEN)
        assert after["claimed_by"] == "new-worker"
        assert after["lease_expires_at"] > timezone.now()
    elif action == "release_untried":
        assert subset(after, claim_released) and after["dispatched_at"] is None
        assert after["next_attempt_at"] <= timezone.now()
        assert after["retry_count"] == before["retry_count"]  # never tried, so no retry used
    elif action in ("complete", "complete_with_attempt"):
        assert subset(after, {**claim_released, "error_message": ""}) and after["sent_at"] is not None
    elif action == "defer":
        assert subset(after, {**claim_released, "error_message": "421 later", "retry_count": 2})
        assert after["dispatched_at"] is None and after["next_attempt_at"] > timezone.now()
    elif action == "hold":
        # No retry spent: the mail was not at fault; due when the brake's wait ends.
        assert subset(after, {**claim_released, "error_message": "421 4.7.0 throttled", "retry_count": 1})
        assert after["dispatched_at"] is None and after["next_attempt_at"] > timezone.now()
    elif action == "fail":
        assert subset(after, {**claim_released, "error_message": "550 no", "retry_count": 1})
    elif action == "cancel":
        assert after["claim_token"] is None
    elif action == "requeue_failed":
        assert subset(after, {"retry_count": 0, "dispatched_at": None, "manual_retries": 1})
        assert after["next_attempt_at"] <= timezone.now()
    elif action == "reclaim":
        assert subset(after, {**claim_released, "retry_count": 2, "dispatched_at": None})
        assert "host:1234" in after["error_message"]
    elif action == "mark_dispatched":
        assert after["dispatched_at"] > before["dispatched_at"]
    elif action == "forget_dispatch":
        assert after["dispatched_at"] is None
    elif action == "edit_unsent":
        assert after["subject"] == "Edited"
        assert {k: v for k, v in after.items() if k not in ("subject", "updated_at")} == {
            k: v for k, v in before.items() if k not in ("subject", "updated_at")
        }
    else:
        pytest.fail(f"no effects written down for {action}")


def subset(values, expected):
    """Whether `values` holds every item of `expected`, with a readable failure otherwise."""
    got = {key: values[key] for key in expected}
    assert got == expected
    return True


# --- the guards besides the status -----------------------------------------------------------


@pytest.mark.parametrize(
    "action", ["release_untried", "complete", "complete_with_attempt", "defer", "fail", "hold"]
)
def test_a_processing_row_refuses_a_claim_token_that_is_not_its_own(action):
    row = make_row(EmailStatus.PROCESSING, claim_token=uuid.uuid4())
    before = snapshot(row)
    assert not ACTIONS[action](row)
    assert snapshot(row) == before


def test_reclaim_refuses_a_processing_row_whose_lease_still_runs():
    row = make_row(EmailStatus.PROCESSING, lease_expires_at=timezone.now() + timedelta(minutes=5))
    before = snapshot(row)
    assert not EmailRequest.objects.reclaim(row)
    assert snapshot(row) == before


def test_reclaim_refuses_a_row_claimed_again_since_it_was_read():
    row = make_row(EmailStatus.PROCESSING)
    EmailRequest.objects.filter(pk=row.pk).update(claim_token=uuid.uuid4())
    before = snapshot(row)
    assert not EmailRequest.objects.reclaim(row)  # `row` still carries the old token
    assert snapshot(row) == before


@pytest.mark.parametrize(
    ("wait", "retry_count", "claimed"),
    [
        pytest.param(timedelta(0), 0, True, id="due now"),
        pytest.param(timedelta(seconds=CLAIM_CLOCK_TOLERANCE - 2), 0, True, id="new, within clock tolerance"),
        pytest.param(timedelta(seconds=CLAIM_CLOCK_TOLERANCE - 2), 1, False, id="short retry backoff kept"),
        pytest.param(timedelta(0), 1, True, id="retry due now"),
        pytest.param(timedelta(seconds=CLAIM_CLOCK_TOLERANCE + 30), 1, False, id="waiting for a retry"),
    ],
)
def test_claim_takes_a_pending_row_only_once_it_is_due(wait, retry_count, claimed):
    row = make_row(EmailStatus.PENDING, next_attempt_at=timezone.now() + wait, retry_count=retry_count)
    before = snapshot(row)
    assert bool(EmailRequest.objects.claim(row.pk, worker="w")) is claimed
    if not claimed:
        assert snapshot(row) == before


def test_a_second_claim_of_the_same_row_gets_nothing():
    row = make_row(EmailStatus.PENDING)
    first = EmailRequest.objects.claim(row.pk, worker="a")
    assert first is not None
    assert EmailRequest.objects.claim(row.pk, worker="b") is None
    assert snapshot(row)["claim_token"] == first and snapshot(row)["claimed_by"] == "a"


def test_cancel_and_requeue_touch_only_the_rows_they_may_move():
    rows = {status: make_row(status) for status in STATUSES}
    assert EmailRequest.objects.filter(pk__in=[r.pk for r in rows.values()]).cancel() == 1
    assert EmailRequest.objects.get(pk=rows[EmailStatus.PENDING].pk).status == EmailStatus.CANCELLED
    assert EmailRequest.objects.filter(pk__in=[r.pk for r in rows.values()]).requeue_failed() == 1
    assert EmailRequest.objects.get(pk=rows[EmailStatus.FAILED].pk).status == EmailStatus.PENDING
    others = [EmailStatus.PROCESSING, EmailStatus.SENT]
    assert [EmailRequest.objects.get(pk=rows[s].pk).status for s in others] == others


def test_requeue_gives_a_fresh_retry_budget_from_the_settings(settings):
    settings.EMAIL_MAX_RETRIES = 7
    row = make_row(EmailStatus.FAILED, retry_count=3, max_retries=3, manual_retries=2)
    assert EmailRequest.objects.filter(pk=row.pk).requeue_failed() == 1
    after = snapshot(row)
    assert (after["retry_count"], after["max_retries"], after["manual_retries"]) == (0, 7, 3)


# --- the retry budget ------------------------------------------------------------------------

BUDGET = [
    # (retry_count, max_retries, status after reclaim, retry_count after reclaim)
    (0, 3, EmailStatus.PENDING, 1),
    (2, 3, EmailStatus.PENDING, 3),
    (3, 3, EmailStatus.FAILED, 3),
    (5, 3, EmailStatus.FAILED, 5),
    (0, 0, EmailStatus.FAILED, 0),
]


@pytest.mark.parametrize(("retry_count", "max_retries", "expected", "retries_after"), BUDGET)
def test_reclaim_spends_one_retry_and_fails_the_row_once_none_is_left(
    retry_count, max_retries, expected, retries_after
):
    row = make_row(EmailStatus.PROCESSING, retry_count=retry_count, max_retries=max_retries)
    assert EmailRequest.objects.reclaim(row)
    after = snapshot(row)
    assert (after["status"], after["retry_count"], after["claim_token"]) == (expected, retries_after, None)
    if expected == EmailStatus.PENDING:
        assert after["dispatched_at"] is None and after["next_attempt_at"] <= timezone.now()


@pytest.mark.parametrize(("retry_count", "max_retries", "expected", "retries_after"), BUDGET)
def test_has_retries_left_agrees_with_reclaim(retry_count, max_retries, expected, retries_after):
    row = make_row(EmailStatus.PROCESSING, retry_count=retry_count, max_retries=max_retries)
    assert row.has_retries_left() is (expected == EmailStatus.PENDING)


# --- editing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", STATUSES)
def test_is_editable_until_the_mail_is_sent(status):
    assert make_row(status).is_editable() is (status != EmailStatus.SENT)


@pytest.mark.parametrize("status", STATUSES)
def test_edit_unsent_agrees_with_is_editable(status):
    row = make_row(status)
    changed = EmailRequest.objects.filter(pk=row.pk).edit_unsent(phone="+1 555 0100")
    assert bool(changed) is row.is_editable()
    assert (snapshot(row)["phone"] == "+1 555 0100") is row.is_editable()


def test_edit_unsent_refuses_a_row_sent_since_it_was_read():
    row = make_row(EmailStatus.PROCESSING)
    assert row.is_editable()
    EmailRequest.objects.complete(row.pk, TOKEN)  # a worker finishes meanwhile
    before = snapshot(row)
    assert not EmailRequest.objects.filter(pk=row.pk).edit_unsent(subject="Too late")
    assert snapshot(row) == before


def _seal_message_under_an_unknown_key(row):
    """Rewrite the row's `message` column in SQL under a key that is not configured."""
    from django.db import connection

    from email_service.encryption import Keyring, encrypt_text, parse_key
    from medcor_backend2.keys import generate_key

    sealed = encrypt_text("Under a lost key", ring=Keyring([parse_key(generate_key())]))
    with connection.cursor() as cursor:
        cursor.execute("UPDATE email_service_emailrequest SET message = %s WHERE id = %s", [sealed, row.pk])


def test_a_claimed_row_that_cannot_be_decrypted_fails_alone_and_the_others_are_claimed():
    from email_service.models import UNREADABLE_ERROR

    rows = [make_row(EmailStatus.PENDING, claim_token=None, retry_count=0) for _ in range(3)]
    _seal_message_under_an_unknown_key(rows[1])
    token, claimed = EmailRequest.objects.claim_batch(worker="w", first=rows[0].pk, limit=3)
    assert token is not None and rows[1].pk not in {row.pk for row in claimed}
    assert {row.pk for row in claimed} == {rows[0].pk, rows[2].pk} and claimed[0].pk == rows[0].pk
    assert all(row.status == EmailStatus.PROCESSING for row in claimed)
    broken = EmailRequest.objects.filter(pk=rows[1].pk).values("status", "claim_token", "retry_count").get()
    assert broken == {"status": EmailStatus.FAILED, "claim_token": None, "retry_count": 0}
    error = EmailRequest.objects.filter(pk=rows[1].pk).only("error_message").get().error_message
    assert error == UNREADABLE_ERROR and "Under a lost key" not in error


# The send loop's claim: in one statement on PostgreSQL (an unfiltered queryset), with the ORM's
# statements elsewhere and for a filtered queryset, whose filter the one statement would not apply.
CLAIMERS = {
    "one statement": lambda: EmailRequest.objects,
    "orm": lambda: EmailRequest.objects.filter(kind=RowKind.REQUEST),
}


@pytest.mark.parametrize("claimer", CLAIMERS)
def test_a_claim_with_attempts_takes_first_then_the_oldest_and_numbers_each_attempt(claimer):
    now = timezone.now()
    oldest, older, first = (
        make_row(
            EmailStatus.PENDING, claim_token=None, retry_count=0, next_attempt_at=now - timedelta(minutes=m)
        )
        for m in (30, 20, 1)
    )
    make_row(EmailStatus.PENDING, claim_token=None, retry_count=1, next_attempt_at=now + timedelta(minutes=5))
    make_row(EmailStatus.SENT, claim_token=None)
    for number in (1, 2):
        EmailAttempt.objects.create(
            request=older, number=number, started_at=now, worker="earlier", outcome="transient"
        )

    token, claimed = CLAIMERS[claimer]().claim_batch(
        worker="w:1", first=first.pk, limit=5, start_attempts=True
    )

    assert [row.pk for row in claimed] == [first.pk, oldest.pk, older.pk]
    assert all(row.status == EmailStatus.PROCESSING and row.claim_token == token for row in claimed)
    assert [row.started_attempt.number for row in claimed] == [1, 1, 3]
    for row in claimed:
        stored = EmailAttempt.objects.get(pk=row.started_attempt.pk)
        assert (stored.request_id, stored.number, stored.worker) == (
            row.pk,
            row.started_attempt.number,
            "w:1",
        )
        assert stored.finished_at is None and stored.outcome == "" and not row.started_attempt._state.adding
    stored = EmailRequest.objects.filter(pk__in=[row.pk for row in claimed]).values_list(
        "status", "claim_token", "claimed_by"
    )
    assert set(stored) == {(EmailStatus.PROCESSING, token, "w:1")}
    # Nothing is left due: the next claim takes nothing and starts no attempt.
    attempts = EmailAttempt.objects.count()
    assert CLAIMERS[claimer]().claim_batch(worker="w:2", limit=5, start_attempts=True) == (None, [])
    assert EmailAttempt.objects.count() == attempts


@pytest.mark.parametrize("claimer", CLAIMERS)
def test_a_claim_without_first_takes_the_oldest_up_to_its_limit(claimer):
    now = timezone.now()
    rows = [
        make_row(
            EmailStatus.PENDING, claim_token=None, retry_count=0, next_attempt_at=now - timedelta(minutes=m)
        )
        for m in (3, 9, 6)
    ]
    token, claimed = CLAIMERS[claimer]().claim_batch(worker="w", limit=2)
    assert [row.pk for row in claimed] == [rows[1].pk, rows[2].pk]
    assert not hasattr(claimed[0], "started_attempt") and not EmailAttempt.objects.exists()
    assert EmailRequest.objects.get(pk=rows[0].pk).status == EmailStatus.PENDING


def test_a_filtered_claim_keeps_to_its_filter():
    row = make_row(EmailStatus.PENDING, claim_token=None, retry_count=0)
    assert EmailRequest.objects.filter(kind=RowKind.REPLY).claim_batch(worker="w", first=row.pk, limit=3) == (
        None,
        [],
    )
    assert EmailRequest.objects.get(pk=row.pk).status == EmailStatus.PENDING


def test_a_claim_refuses_a_malformed_first_id():
    from django.core.exceptions import ValidationError

    with pytest.raises(ValidationError):
        EmailRequest.objects.claim_batch(worker="w", first="not-a-uuid", limit=2)


@pytest.mark.parametrize("claimer", CLAIMERS)
def test_an_unreadable_row_in_a_claim_with_attempts_fails_alone_and_keeps_no_attempt(claimer):
    from email_service.models import UNREADABLE_ERROR

    rows = [make_row(EmailStatus.PENDING, claim_token=None, retry_count=0) for _ in range(3)]
    _seal_message_under_an_unknown_key(rows[1])
    # `first` is the newest: the readable rows still come in claim order, `first` first.
    token, claimed = CLAIMERS[claimer]().claim_batch(
        worker="w", first=rows[2].pk, limit=3, start_attempts=True
    )
    assert [row.pk for row in claimed] == [rows[2].pk, rows[0].pk]
    assert [row.started_attempt.request_id for row in claimed] == [rows[2].pk, rows[0].pk]
    assert set(EmailAttempt.objects.values_list("request", flat=True)) == {rows[0].pk, rows[2].pk}
    broken = EmailRequest.objects.filter(pk=rows[1].pk).only("status", "error_message").get()
    assert (broken.status, broken.error_message) == (EmailStatus.FAILED, UNREADABLE_ERROR)


def test_reclaiming_stale_claims_passes_over_values_it_cannot_decrypt():
    from email_service.outbox import reclaim_stale_claims

    rows = [make_row(EmailStatus.PROCESSING) for _ in range(2)]
    _seal_message_under_an_unknown_key(rows[0])
    assert reclaim_stale_claims() == 2
    statuses = EmailRequest.objects.filter(pk__in=[row.pk for row in rows]).values_list("status", flat=True)
    assert list(statuses) == [EmailStatus.PENDING] * 2


def test_a_batch_with_a_row_that_cannot_be_decrypted_sends_the_others(smtp, settings):
    from email_service import outbox, sending

    settings.EMAIL_SEND_CONFIRMATION = False
    rows = [
        outbox.create_email_request(
            data={
                "full_name": f"P {n}",
                "email": f"p{n}@example.org",
                "subject": f"Batch {n}",
                "message": "Hi",
            },
            dispatch_on_commit=False,
        )
        for n in range(3)
    ]
    _seal_message_under_an_unknown_key(rows[1])
    statuses = sending.send_due_emails(rows[0].pk, worker="test", batch_size=3)
    assert statuses == {str(rows[0].pk): EmailStatus.SENT, str(rows[2].pk): EmailStatus.SENT}
    assert len(smtp.messages) == 2
    assert (
        EmailRequest.objects.filter(pk=rows[1].pk).values_list("status", flat=True).get()
        == EmailStatus.FAILED
    )
