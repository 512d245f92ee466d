"""Staff actions (cancel, retry, edit) and the log line every transition writes about itself."""

import logging
from datetime import timedelta

import pytest
from django.utils import timezone

from email_service import actions, outbox, sending
from email_service.models import EmailRequest, EmailStatus

FORM = {"full_name": "Ada Lovelace", "email": "ada@example.org", "subject": "Hello", "message": "Hi"}


@pytest.fixture
def row(db):
    return outbox.create_email_request(data=FORM, dispatch_on_commit=False)


def transitions(caplog, pk):
    return [
        (record.getMessage(), record.status)
        for record in caplog.records
        if record.name == "email_service.models" and record.email_request_id == str(pk)
    ]


def test_editing_an_unsent_request_writes_only_the_given_fields(row):
    before = EmailRequest.objects.get(pk=row.pk).updated_at
    actions.edit_email_request(row, {"subject": "New subject"})
    stored = EmailRequest.objects.get(pk=row.pk)
    assert (stored.subject, stored.full_name, stored.status) == ("New subject", "Ada Lovelace", "PENDING")
    assert stored.updated_at >= before
    assert row.subject == "New subject"


def test_a_request_sent_since_it_was_read_is_not_edited(row):
    token = EmailRequest.objects.claim(row.pk, worker="test")
    assert EmailRequest.objects.complete(row.pk, token)
    # `row` still says PENDING, as a form loaded before the send would.
    with pytest.raises(actions.TransitionNotAllowed, match="SENT"):
        actions.edit_email_request(row, {"subject": "Too late"})
    assert EmailRequest.objects.get(pk=row.pk).subject == "Hello"
    assert row.status == EmailStatus.SENT


@pytest.mark.parametrize("status", [EmailStatus.PROCESSING, EmailStatus.FAILED, EmailStatus.CANCELLED])
def test_every_status_but_sent_may_be_edited(row, status):
    token = EmailRequest.objects.claim(row.pk, worker="test")
    if status == EmailStatus.FAILED:
        EmailRequest.objects.fail(row.pk, token, error="550 refused")
    elif status == EmailStatus.CANCELLED:
        EmailRequest.objects.release_untried([row.pk], token)
        EmailRequest.objects.filter(pk=row.pk).cancel()
    assert EmailRequest.objects.get(pk=row.pk).status == status
    assert EmailRequest.objects.filter(pk=row.pk).edit_unsent(phone="+44 20 7946 0000") == 1


def test_each_transition_logs_the_statuses_it_moved_between(row, caplog):
    caplog.set_level(logging.INFO, logger="email_service")
    token = EmailRequest.objects.claim(row.pk, worker="w1")
    EmailRequest.objects.fail(row.pk, token, error="550 refused", note="attempt 1 permanent")
    assert actions.retry_failed_requests() == [row.pk]
    actions.cancel_email_request(row)
    assert transitions(caplog, row.pk) == [
        (f"Email request {row.pk}: PENDING -> PROCESSING (by w1)", "PROCESSING"),
        (f"Email request {row.pk}: PROCESSING -> FAILED (attempt 1 permanent)", "FAILED"),
        (f"Email request {row.pk}: FAILED -> PENDING (requeued)", "PENDING"),
        (f"Email request {row.pk}: PENDING -> CANCELLED", "CANCELLED"),
    ]


def test_a_refused_transition_logs_nothing(row, caplog):
    caplog.set_level(logging.INFO, logger="email_service")
    actions.cancel_email_request(row)
    with pytest.raises(actions.TransitionNotAllowed, match="CANCELLED"):
        actions.cancel_email_request(row)
    assert actions.retry_failed_requests() == []
    assert len(transitions(caplog, row.pk)) == 1


@pytest.mark.parametrize(
    ("retry_count", "target"), [(0, EmailStatus.PENDING), (3, EmailStatus.FAILED)], ids=["budget", "spent"]
)
def test_reclaim_logs_the_status_it_chose_once(row, caplog, retry_count, target):
    caplog.set_level(logging.INFO, logger="email_service")
    EmailRequest.objects.filter(pk=row.pk).update(retry_count=retry_count, max_retries=3)
    EmailRequest.objects.claim(row.pk, worker="lost-worker", lease=1)
    assert outbox.reclaim_stale_claims(now=timezone.now() + timedelta(seconds=5)) == 1
    assert EmailRequest.objects.get(pk=row.pk).status == target
    reclaimed = [line for line in transitions(caplog, row.pk) if "lost worker" in line[0]]
    assert reclaimed == [
        (f"Email request {row.pk}: PROCESSING -> {target} (reclaimed from lost worker lost-worker)", target)
    ]


def test_the_retry_budget_is_one_predicate(row):
    row.retry_count, row.max_retries = 2, 3
    assert row.has_retries_left()
    row.retry_count = 3
    assert not row.has_retries_left()


def test_the_outcome_line_carries_the_attempt_its_outcome_and_the_smtp_code(row, smtp, settings, caplog):
    settings.EMAIL_SEND_CONFIRMATION = False
    caplog.set_level(logging.INFO, logger="email_service")
    assert sending.send_email_request(row.pk, worker="w1") == EmailStatus.SENT
    (record,) = [
        r for r in caplog.records if r.name == "email_service.models" and "-> SENT" in r.getMessage()
    ]
    assert (
        record.getMessage() == f"Email request {row.pk}: PROCESSING -> SENT (attempt 1 sent, smtp code 250)"
    )
    assert (record.status, record.attempt, record.outcome, record.smtp_code) == ("SENT", 1, "sent", 250)
