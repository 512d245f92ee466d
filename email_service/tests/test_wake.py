"""Wake slots: new rows share a few waiting send messages, and every row is still sent.

A row publishes its own message only if the wake slot it tries is free; a task of a wake message
frees its slot, then claims every due row. These run in-process against the session's SMTP server.
"""

import random
import threading
import time

import pytest
from django.db import connection

from email_service import outbox, sending
from email_service.models import EmailRequest, EmailStatus

from .conftest import require_postgresql
from .test_batches import make_rows


@pytest.fixture
def one_slot(settings, monkeypatch):
    """One wake slot, no acknowledgements, and publishes recorded instead of sent."""
    settings.EMAIL_DISPATCH_WAKE_SLOTS = 1
    settings.EMAIL_SEND_CONFIRMATION = False
    monkeypatch.setattr(sending, "send_pace", sending.SendPace())
    published = []
    monkeypatch.setattr(
        outbox, "_publish", lambda pk, task_id, carry_on=False, wake=None: published.append((pk, wake))
    )
    return published


def test_a_new_row_publishes_only_while_its_wake_slot_is_free(db, one_slot):
    first, second, third = make_rows(3)
    outbox.wake_or_publish(first.pk, first.celery_task_id)
    outbox.wake_or_publish(second.pk, second.celery_task_id)
    assert one_slot == [(first.pk, 0)]  # the second counts on the first's message

    outbox.clear_wake(0)  # what that message's task does before it claims
    outbox.wake_or_publish(third.pk, third.celery_task_id)
    assert one_slot == [(first.pk, 0), (third.pk, 0)]


def test_without_wake_slots_every_row_publishes_its_own_message(db, one_slot, settings):
    settings.EMAIL_DISPATCH_WAKE_SLOTS = 0
    rows = make_rows(2)
    for row in rows:
        outbox.wake_or_publish(row.pk, row.celery_task_id)
    assert one_slot == [(rows[0].pk, None), (rows[1].pk, None)]


def test_a_wake_message_frees_its_slot_and_sends_the_rows_that_did_not_publish(smtp, db, one_slot):
    rows = make_rows(3)
    for row in rows:
        outbox.wake_or_publish(row.pk, row.celery_task_id)
    assert one_slot == [(rows[0].pk, 0)]
    sending.send_pace.record(0.001)  # full batches

    # Its own row went with another task already: the wake message drains all the same.
    assert sending.send_email_request(rows[0].pk, worker="other") == EmailStatus.SENT
    statuses = sending.send_due_emails(rows[0].pk, worker="test", wake=0)

    assert statuses == {str(rows[1].pk): EmailStatus.SENT, str(rows[2].pk): EmailStatus.SENT}
    assert len(smtp.messages) == 3
    late = make_rows(1)[0]
    outbox.wake_or_publish(late.pk, late.celery_task_id)
    assert one_slot[-1] == (late.pk, 0)  # the slot was freed


def test_rows_that_count_on_a_slot_seen_taken_are_claimed_by_its_task_which_claims_for_that_long(
    smtp, db, one_slot, monkeypatch
):
    asked = []  # the wake slots this process asked the cache for
    real_add = outbox.cache.add

    def add(key, *args, **kwargs):
        if key.startswith(outbox.WAKE_KEY.format("")):
            asked.append(key)
        return real_add(key, *args, **kwargs)

    monkeypatch.setattr(outbox.cache, "add", add)
    first, second, third = make_rows(3)
    outbox.wake_or_publish(first.pk, first.celery_task_id)  # takes the slot: its message waits
    outbox.wake_or_publish(second.pk, second.celery_task_id)  # finds it taken
    outbox.wake_or_publish(third.pk, third.celery_task_id)  # counts on it without asking
    assert one_slot == [(first.pk, 0)]
    assert len(asked) == 2
    sending.send_pace.record(0.001)

    # Another process saw the slot taken just before the task cleared it, and commits a row
    # after the task's first claim: it does not ask, and the task's later claim takes it.
    late = []
    claim_batch = EmailRequest.objects.claim_batch

    def claim_then_commit_one(**kwargs):
        claimed = claim_batch(**kwargs)
        if not late:
            late.append(make_rows(1)[0])
            outbox._seen_taken_at = time.monotonic()
            outbox.wake_or_publish(late[0].pk, late[0].celery_task_id)
        return claimed

    monkeypatch.setattr(EmailRequest.objects, "claim_batch", claim_then_commit_one)
    started = time.monotonic()
    statuses = sending.send_due_emails(first.pk, worker="test", wake=0)

    assert time.monotonic() - started >= outbox.WAKE_SEEN_TAKEN_SECONDS
    assert one_slot == [(first.pk, 0)]  # the late row published nothing
    assert len(asked) == 2
    assert set(statuses) == {str(row.pk) for row in (first, second, third, late[0])}
    assert set(statuses.values()) == {EmailStatus.SENT}
    assert len(smtp.messages) == 4


def test_a_row_committed_while_its_process_counts_on_a_taken_slot_wakes_no_thread(
    smtp, db, one_slot, settings, monkeypatch
):
    settings.EMAIL_DISPATCH_ASYNC = True
    handed = []  # the rows handed to the publishing thread

    class Executor:
        def submit(self, function, pk, task_id):
            handed.append(pk)

    monkeypatch.setattr(outbox, "dispatch_executor", Executor)
    first, second = make_rows(2)
    outbox.wake_or_publish(first.pk, first.celery_task_id)  # takes the slot: its message waits
    outbox.wake_or_publish(second.pk, second.celery_task_id)  # finds it taken

    third = make_rows(1)[0]
    outbox.dispatch(third)  # what the POST's on_commit calls: decided in the request's thread
    assert handed == []
    assert one_slot == [(first.pk, 0)]
    sending.send_pace.record(0.001)
    statuses = sending.send_due_emails(first.pk, worker="test", wake=0)
    assert statuses == {str(row.pk): EmailStatus.SENT for row in (first, second, third)}

    # Once its task cleared the slot, the next row goes to the publishing thread again.
    fourth = make_rows(1)[0]
    outbox.dispatch(fourth)
    assert handed == [fourth.pk]


def test_a_task_without_a_wake_slot_stops_at_its_first_empty_claim(smtp, db, one_slot):
    row = make_rows(1)[0]
    started = time.monotonic()
    assert sending.send_due_emails(row.pk, worker="test") == {str(row.pk): EmailStatus.SENT}
    assert time.monotonic() - started < outbox.WAKE_SEEN_TAKEN_SECONDS


def test_a_wake_message_that_cannot_be_published_leaves_every_row_counting_on_it_to_the_relay(
    db, one_slot, monkeypatch
):
    first, second = make_rows(2)
    slot = outbox._take_wake_slot()
    outbox.wake_or_publish(second.pk, second.celery_task_id)  # finds the slot taken

    def broker_down(*args, **kwargs):
        raise OSError("connection refused")

    monkeypatch.setattr(outbox, "_publish", broker_down)
    outbox.publish_or_forget(first.pk, first.celery_task_id, wake=slot)

    assert set(EmailRequest.objects.undispatched().values_list("pk", flat=True)) == {first.pk, second.pk}
    assert outbox._take_wake_slot() == 0  # free again


@pytest.mark.django_db(transaction=True)
def test_a_row_committed_while_a_wake_task_starts_is_sent_by_it_or_publishes_its_own(smtp, one_slot):
    """The race: the row commits, then tries the slot; the task frees the slot, then claims.

    Whichever comes first, the row is either claimed by that task or finds the slot free and
    publishes a message of its own: never left without one.
    """
    require_postgresql()  # threads with their own connections, claims with SKIP LOCKED
    sending.send_pace.record(0.001)
    outcomes = {"sent by the task": 0, "published its own": 0}
    for _ in range(30):
        outbox.clear_wake(0)
        assert outbox._take_wake_slot() == 0  # a wake message is waiting on the broker
        before = len(one_slot)
        start = threading.Barrier(2)
        created = []
        threads = [
            threading.Thread(target=_submit, args=(start, created)),
            threading.Thread(target=_drain, args=(start,)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        row = created[0]
        status = EmailRequest.objects.get(pk=row.pk).status
        published = [pk for pk, _ in one_slot[before:]]
        assert status == EmailStatus.SENT or published == [row.pk], (status, published)
        outcomes["sent by the task" if status == EmailStatus.SENT else "published its own"] += 1
        # A row left PENDING is its own message's: send it, so the next round starts empty.
        sending.send_due_emails(worker="test")
    assert sum(outcomes.values()) == 30


def _submit(start, created):
    try:
        start.wait()
        time.sleep(random.uniform(0, 0.004))
        row = make_rows(1)[0]  # committed on return (autocommit)
        created.append(row)
        outbox.wake_or_publish(row.pk, row.celery_task_id)
    finally:
        connection.close()


def _drain(start):
    try:
        start.wait()
        time.sleep(random.uniform(0, 0.004))
        sending.send_due_emails(worker="test", wake=0)
    finally:
        connection.close()
