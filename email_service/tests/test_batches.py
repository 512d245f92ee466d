"""Batch sending: one task claims due rows a batch at a time and sends them over one connection.

These run in-process against the real SMTP server of the test session and the configured database
(PostgreSQL in CI, where the claim uses SKIP LOCKED and the outcome is written in one statement).
"""

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from datetime import timedelta

import pytest
from django.db import connection, transaction
from django.utils import timezone

from email_service import actions, journal, outbox, sending
from email_service.models import EmailAttempt, EmailRequest, EmailStatus

from .conftest import require_postgresql


def make_rows(count, **fields):
    rows = []
    for number in range(count):
        rows.append(
            outbox.create_email_request(
                data={
                    "full_name": f"Patient {number}",
                    "email": f"p{number}-{uuid.uuid4().hex[:6]}@example.org",
                    "subject": f"Batch {number}",
                    "message": "Hello",
                    **fields,
                },
                dispatch_on_commit=False,
            )
        )
    return rows


def subjects(smtp):
    return [m["message"]["Subject"] for m in smtp.messages]


@pytest.fixture
def quiet(settings, monkeypatch):
    """No acknowledgements, batches of 3, and a pace as of a fast server (full batches)."""
    settings.EMAIL_SEND_CONFIRMATION = False
    settings.EMAIL_SEND_BATCH_SIZE = 3
    pace = sending.SendPace()
    pace.record(0.001)
    monkeypatch.setattr(sending, "send_pace", pace)
    return pace


def test_the_pace_sizes_batches_to_a_quarter_second_between_1_and_the_setting():
    pace = sending.SendPace()
    assert pace.batch_size(20) == 1  # nothing sent yet: one at a time
    pace.record(0.002)
    assert pace.batch_size(20) == 20
    pace.record(0.5)  # a slow send counts at once
    assert pace.batch_size(20) == 1
    for _ in range(30):  # speed is believed over a few sends
        pace.record(0.002)
    assert pace.batch_size(20) == 20
    pace.record(0.05)
    assert pace.batch_size(20) == 5


def test_after_a_slow_send_a_task_gives_back_the_rest_of_its_batch_for_other_workers(
    smtp, db, quiet, monkeypatch
):
    rows = make_rows(3)
    smtp.script = [("hang", 0.6)]  # two rows waiting behind a 0.6 s send: over a second
    published = []
    monkeypatch.setattr(
        outbox, "publish_or_forget", lambda pk, task_id, carry_on=False: published.append((pk, carry_on))
    )

    statuses = sending.send_due_emails(rows[0].pk, worker="test")

    assert statuses == {str(rows[0].pk): EmailStatus.SENT}
    assert published == [(rows[1].pk, True)]  # the task for the rest; this one stopped
    for row in EmailRequest.objects.filter(pk__in=[rows[1].pk, rows[2].pk]):
        assert (row.status, row.claim_token, row.dispatched_at, row.attempts.count()) == (
            EmailStatus.PENDING,
            None,
            None,
            0,
        )

    # The published task, at the slow pace, claims one row at a time and sends both.
    limits = []
    claim_batch = EmailRequest.objects.claim_batch

    def recording_claim(**kwargs):
        limits.append(kwargs["limit"])
        return claim_batch(**kwargs)

    monkeypatch.setattr(EmailRequest.objects, "claim_batch", recording_claim)
    assert set(sending.send_due_emails(published[0][0], worker="test", carry_on=True).values()) == {
        EmailStatus.SENT
    }
    assert limits[:2] == [1, 1]
    assert len(smtp.messages) == 3 and published == [(rows[1].pk, True)]


def test_at_a_slow_pace_a_task_sends_one_row_per_claim_and_never_gives_back_a_single_row(
    smtp, db, quiet, monkeypatch
):
    quiet.record(2.0)  # this process last saw a slow server
    published = []
    monkeypatch.setattr(
        outbox, "publish_or_forget", lambda pk, task_id, carry_on=False: published.append((pk, carry_on))
    )
    rows = make_rows(3)

    statuses = sending.send_due_emails(rows[0].pk, worker="test")

    assert list(statuses) == [str(row.pk) for row in rows]
    assert published == []


def test_one_call_sends_its_own_row_first_then_every_due_row_in_batches_over_one_connection(smtp, db, quiet):
    rows = make_rows(7)
    waiting = make_rows(1)[0]
    EmailRequest.objects.filter(pk=waiting.pk).update(next_attempt_at=timezone.now() + timedelta(hours=1))
    cancelled = make_rows(1)[0]
    actions.cancel_email_request(cancelled)

    statuses = sending.send_due_emails(str(rows[4].pk), worker="test")  # as the task gets it

    assert statuses == {str(row.pk): EmailStatus.SENT for row in rows}
    assert subjects(smtp)[0] == "[MedCor contact] Batch 4"
    assert sorted(subjects(smtp)) == sorted(f"[MedCor contact] Batch {n}" for n in range(7))
    assert smtp.connections == 1
    assert EmailRequest.objects.get(pk=waiting.pk).status == EmailStatus.PENDING
    assert EmailRequest.objects.get(pk=cancelled.pk).status == EmailStatus.CANCELLED
    for row in EmailRequest.objects.filter(pk__in=[row.pk for row in rows]):
        assert (row.status, row.claim_token, row.lease_expires_at, row.sent_at is not None) == (
            EmailStatus.SENT,
            None,
            None,
            True,
        )
        [attempt] = row.attempts.all()
        assert (attempt.number, attempt.outcome, attempt.smtp_code, attempt.worker) == (
            1,
            "sent",
            250,
            "test",
        )
        assert attempt.finished_at >= attempt.started_at and attempt.duration_ms is not None


def test_a_message_whose_row_was_already_sent_costs_one_read_and_leaves_other_rows_to_their_own(
    smtp, db, quiet, django_assert_num_queries
):
    first, second = make_rows(2)
    assert sending.send_email_request(first.pk, worker="test") == EmailStatus.SENT

    with django_assert_num_queries(1):
        assert sending.send_due_emails(first.pk, worker="test") == {}

    assert subjects(smtp) == ["[MedCor contact] Batch 0"]
    assert EmailRequest.objects.get(pk=second.pk).status == EmailStatus.PENDING


def test_a_continuation_whose_row_was_taken_still_drains_the_other_due_rows(smtp, db, quiet):
    first, second = make_rows(2)
    assert sending.send_email_request(first.pk, worker="test") == EmailStatus.SENT
    assert len(smtp.messages) == 1

    statuses = sending.send_due_emails(first.pk, worker="test", carry_on=True)

    assert statuses == {str(second.pk): EmailStatus.SENT}
    assert subjects(smtp) == ["[MedCor contact] Batch 0", "[MedCor contact] Batch 1"]
    assert EmailAttempt.objects.filter(request=first).count() == 1


def test_send_email_request_sends_only_its_own_row(smtp, db, quiet):
    first, second = make_rows(2)
    assert sending.send_email_request(second.pk, worker="test") == EmailStatus.SENT
    assert subjects(smtp) == ["[MedCor contact] Batch 1"]
    assert EmailRequest.objects.get(pk=first.pk).status == EmailStatus.PENDING


def test_outcomes_in_one_batch_are_recorded_row_by_row(smtp, db, quiet):
    rows = make_rows(3)
    smtp.script = ["accept", "421 4.3.2 Busy", "550 5.1.1 No such mailbox"]

    statuses = sending.send_due_emails(rows[0].pk, worker="test")

    assert list(statuses.values()) == [EmailStatus.SENT, EmailStatus.PENDING, EmailStatus.FAILED]
    by_pk = {row.pk: row for row in EmailRequest.objects.filter(pk__in=[row.pk for row in rows])}
    deferred, failed = by_pk[rows[1].pk], by_pk[rows[2].pk]
    assert (deferred.retry_count, deferred.claim_token, deferred.dispatched_at) == (1, None, None)
    assert deferred.next_attempt_at > timezone.now()
    assert deferred.error_message.startswith("421")
    assert failed.error_message.startswith("550")
    outcomes = dict(EmailAttempt.objects.filter(request__in=rows).values_list("request", "outcome"))
    assert outcomes == {rows[0].pk: "sent", rows[1].pk: "transient", rows[2].pk: "permanent"}


def test_when_the_send_window_closes_untried_rows_go_back_and_a_task_is_published_for_them(
    smtp, db, quiet, settings, monkeypatch
):
    # A soft limit that leaves no window after the first mail: 2 x EMAIL_TIMEOUT (2 s) + 10 s.
    settings.EMAIL_SEND_TIME_LIMIT = 14
    published = []
    monkeypatch.setattr(
        outbox, "publish_or_forget", lambda pk, task_id, carry_on=False: published.append((pk, carry_on))
    )
    rows = make_rows(3)

    statuses = sending.send_due_emails(rows[0].pk, worker="test")

    assert statuses == {str(rows[0].pk): EmailStatus.SENT}
    assert len(smtp.messages) == 1
    untried = EmailRequest.objects.filter(pk__in=[rows[1].pk, rows[2].pk])
    for row in untried:
        assert (row.status, row.claim_token, row.retry_count, row.dispatched_at) == (
            EmailStatus.PENDING,
            None,
            0,
            None,
        )
        assert row.next_attempt_at <= timezone.now()
    assert EmailAttempt.objects.filter(request__in=untried).count() == 0
    assert len(published) == 1 and published[0] in {(rows[1].pk, True), (rows[2].pk, True)}

    # The next task picks them up.
    settings.EMAIL_SEND_TIME_LIMIT = None
    assert set(sending.send_due_emails(published[0][0], worker="test", carry_on=True).values()) == {
        EmailStatus.SENT
    }
    assert len(smtp.messages) == 3


def test_a_worker_lost_mid_batch_loses_no_row(db, quiet):
    rows = make_rows(3)
    token, claimed = EmailRequest.objects.claim_batch(worker="dead", first=rows[0].pk, limit=3, lease=1)
    assert [row.pk for row in claimed] == [row.pk for row in rows]
    for row in claimed:
        EmailAttempt.objects.create(request=row, number=1, started_at=timezone.now(), worker="dead")

    assert outbox.reclaim_stale_claims(now=timezone.now() + timedelta(seconds=2)) == 3

    for row in EmailRequest.objects.filter(pk__in=[row.pk for row in rows]):
        assert (row.status, row.retry_count, row.claim_token) == (EmailStatus.PENDING, 1, None)
        assert [a.outcome for a in row.attempts.all()] == ["crashed"]


def _state(pid):
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rpartition(")")[2].split()[0]


def test_a_restarted_node_takes_back_at_once_what_its_gone_processes_held(db, quiet, monkeypatch):
    published = []
    monkeypatch.setattr(outbox, "publish_relay", lambda: published.append("relay"))
    node = f"phoenix@{socket.gethostname()}"
    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: no process has this pid now
    # Ended but not yet reaped (as a killed node's pool processes are until pid 1 reaps them).
    zombie = subprocess.Popen(["true"])
    deadline = time.monotonic() + 10
    while _state(zombie.pid) != "Z" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _state(zombie.pid) == "Z"
    rows = make_rows(5)
    claims = {
        "gone": (rows[0], f"{node}:{gone.pid}"),
        "zombie": (rows[4], f"{node}:{zombie.pid}"),
        "alive": (rows[1], f"{node}:{os.getpid()}"),
        "another node": (rows[2], f"other@{socket.gethostname()}:{gone.pid}"),
        "unparsable": (rows[3], f"{node}:main"),
    }
    for row, worker in claims.values():
        # A lease far from over: only the claimer's absence may end it.
        EmailRequest.objects.claim_batch(worker=worker, first=row.pk, limit=1, lease=3600)
        EmailAttempt.objects.create(request=row, number=1, started_at=timezone.now(), worker=worker)

    # On another host the pids say nothing: nothing is touched.
    assert outbox.reclaim_from_gone_processes("phoenix@elsewhere.example") == 0
    assert outbox.reclaim_from_gone_processes(node) == 2
    assert published == ["relay"]
    zombie.wait()

    def state(name):
        row = EmailRequest.objects.get(pk=claims[name][0].pk)
        return row.status, row.retry_count, [a.outcome for a in row.attempts.all()]

    assert state("gone") == (EmailStatus.PENDING, 1, ["crashed"])
    assert state("zombie") == (EmailStatus.PENDING, 1, ["crashed"])
    for name in ("alive", "another node", "unparsable"):
        assert state(name) == (EmailStatus.PROCESSING, 0, [""]), name


def test_a_mail_the_server_accepted_before_its_worker_died_is_recorded_sent_not_sent_again(
    smtp, db, quiet, settings, tmp_path, monkeypatch
):
    settings.VAR_DIR = tmp_path
    monkeypatch.setattr(outbox, "publish_relay", lambda: None)
    node = f"phoenix@{socket.gethostname()}"
    gone = subprocess.Popen(["true"])
    gone.wait()
    worker = f"{node}:{gone.pid}"
    accepted, unsent = make_rows(2)

    # The worker dies right after the server's 250: the outcome never reaches the database.
    def killed(*args, **kwargs):
        raise SystemExit("killed")

    with monkeypatch.context() as patch:
        patch.setattr(sending, "_record_outcome", killed)
        with pytest.raises(SystemExit):
            sending.send_due_emails(accepted.pk, worker=worker, batch_size=1, more=False)
    assert len(smtp.messages) == 1
    assert journal.accepted(worker) == {
        (str(accepted.pk), str(EmailRequest.objects.get(pk=accepted.pk).claim_token))
    }
    # Another row it had claimed but not sent yet.
    EmailRequest.objects.claim_batch(worker=worker, first=unsent.pk, limit=1, lease=3600)
    EmailAttempt.objects.create(request=unsent, number=1, started_at=timezone.now(), worker=worker)

    assert outbox.reclaim_from_gone_processes(node) == 1  # the unsent row; the other is settled

    accepted_row = EmailRequest.objects.get(pk=accepted.pk)
    assert (accepted_row.status, accepted_row.retry_count) == (EmailStatus.SENT, 0)
    assert [(a.outcome, a.smtp_code) for a in accepted_row.attempts.all()] == [("sent", 250)]
    unsent_row = EmailRequest.objects.get(pk=unsent.pk)
    assert (unsent_row.status, [a.outcome for a in unsent_row.attempts.all()]) == (
        EmailStatus.PENDING,
        ["crashed"],
    )
    assert not journal.journal_path(worker).exists()

    sending.send_due_emails(worker="relay", carry_on=True)
    assert len(smtp.messages) == 2  # the unsent row once; the accepted one not again
    assert EmailRequest.objects.get(pk=unsent.pk).status == EmailStatus.SENT


def test_the_delivery_journal_is_blank_once_each_outcome_is_committed(smtp, db, quiet, settings, tmp_path):
    settings.VAR_DIR = tmp_path
    rows = make_rows(3)
    assert sending.send_due_emails(rows[0].pk, worker="steady:1", batch_size=3) == {
        str(row.pk): EmailStatus.SENT for row in rows
    }
    assert journal.journal_path("steady:1").read_text().strip() == ""
    assert journal.accepted("steady:1") == set()


def test_the_sent_outcome_is_one_write_even_when_the_claim_was_lost(smtp, db, quiet):
    [row] = make_rows(1)
    token, [claimed] = EmailRequest.objects.claim_batch(worker="test", first=row.pk, limit=1)
    attempt = EmailAttempt.objects.create(request=claimed, number=1, started_at=timezone.now(), worker="test")
    attempt.finished_at, attempt.outcome, attempt.smtp_code, attempt.duration_ms = (
        timezone.now(),
        "sent",
        250,
        5,
    )

    assert EmailRequest.objects.complete(row.pk, uuid.uuid4(), attempt=attempt) is False
    assert EmailRequest.objects.get(pk=row.pk).status == EmailStatus.PROCESSING
    assert EmailRequest.objects.complete(row.pk, token, attempt=attempt) is True
    row.refresh_from_db()
    attempt.refresh_from_db()
    assert (row.status, row.claim_token, row.lease_expires_at) == (EmailStatus.SENT, None, None)
    assert (attempt.outcome, attempt.smtp_code, attempt.duration_ms) == ("sent", 250, 5)


def claimed_with_a_sent_attempt():
    """A claimed row and its attempt filled in as the server's 250 leaves it, not yet saved."""
    [row] = make_rows(1)
    token, _ = EmailRequest.objects.claim_batch(worker="test", first=row.pk, limit=1)
    attempt = EmailAttempt.objects.create(request=row, number=1, started_at=timezone.now(), worker="test")
    attempt.finished_at, attempt.outcome, attempt.smtp_code, attempt.duration_ms = (
        timezone.now(),
        "sent",
        250,
        5,
    )
    return row, token, attempt


@pytest.mark.parametrize("synchronous", [False, True])
def test_on_postgresql_the_send_loops_outcome_relaxes_only_its_own_commit(
    transactional_db, settings, synchronous
):
    from django.test.utils import CaptureQueriesContext

    require_postgresql()
    settings.EMAIL_SYNCHRONOUS_OUTCOMES = synchronous
    row, token, attempt = claimed_with_a_sent_attempt()
    # As the send loop runs it, in autocommit: the statement is a transaction of its own.
    with CaptureQueriesContext(connection) as queries:
        assert EmailRequest.objects.complete(row.pk, token, attempt=attempt) is True
    assert ("set_config('synchronous_commit'" in queries[-1]["sql"]) is not synchronous
    with connection.cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        assert cursor.fetchone() == ("on",)  # the session keeps its setting
    with transaction.atomic():
        # Inside someone's transaction the setting would last to that one's commit: not relaxed.
        claimed, other_token, other = claimed_with_a_sent_attempt()
        with CaptureQueriesContext(connection) as queries:
            assert EmailRequest.objects.complete(claimed.pk, other_token, attempt=other) is True
        assert "set_config" not in queries[-1]["sql"]
    row.refresh_from_db()
    attempt.refresh_from_db()
    assert (row.status, attempt.outcome) == (EmailStatus.SENT, "sent")


def test_on_postgresql_a_sent_outcome_commits_without_waiting_for_the_disk_unless_set_to(db, settings):
    require_postgresql()
    from email_service.models import _complete_with_attempt_params, _complete_with_attempt_sql

    row, token, attempt = claimed_with_a_sent_attempt()
    fields = {"status": EmailStatus.SENT, "updated_at": timezone.now()}
    values = _complete_with_attempt_params(attempt, fields, row.pk, token, connection)
    seen = {}
    for synchronous in (True, False):
        statement = _complete_with_attempt_sql(tuple(fields), synchronous)
        assert statement.count("%s") == len(values)
        # What the row's own commit runs under, read by the statement itself; rolled back after.
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(statement + " RETURNING current_setting('synchronous_commit')", values)
            [(seen[synchronous],)] = cursor.fetchall()
            transaction.set_rollback(True)
    assert seen == {True: "on", False: "off"}
    # The service's setting picks the statement.
    assert "set_config" not in _complete_with_attempt_sql(tuple(fields), True)
    settings.EMAIL_SYNCHRONOUS_OUTCOMES = False
    from email_service import conf

    assert conf.synchronous_outcomes() is False


def test_on_postgresql_the_send_loop_runs_its_statements_prepared(smtp, db, quiet):
    require_postgresql()
    rows = make_rows(8)
    # One at a time, so the outcome's statement runs once per mail, as in a long batch.
    for row in rows:
        assert sending.send_email_request(row.pk, worker="test") == EmailStatus.SENT

    with connection.cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements WHERE from_sql = false")
        prepared = [statement for (statement,) in cursor.fetchall()]
    # The outcome's write (models._complete_with_attempt_sql) and the claim (_claim_batch_sql) among them.
    assert any(statement.startswith("WITH finished AS (UPDATE") for statement in prepared), prepared
    assert any(statement.startswith("WITH first_row AS (SELECT") for statement in prepared), prepared
    assert set(
        EmailRequest.objects.filter(pk__in=[row.pk for row in rows]).values_list("status", flat=True)
    ) == {EmailStatus.SENT}


@pytest.mark.parametrize(
    ("threshold", "options"),
    [
        (None, {"server_side_binding": True, "prepare_threshold": 5}),
        ("0", {"server_side_binding": True, "prepare_threshold": 0}),
        ("", {}),  # off, for a pooler in transaction mode that cannot keep prepared statements
    ],
)
def test_database_prepare_threshold_sets_djangos_psycopg_options(threshold, options):
    from medcor_backend2.keys import generate_key

    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "medcor_backend2.settings",
        "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/test",
        "DJANGO_DEBUG": "false",
        "DJANGO_SECRET_KEY": "settings-test",
        "AUDIT_HMAC_KEY": "settings-test",
        "MEDCOR_ENCRYPTION_KEYS": generate_key(),
        "MEDCOR_INDEX_KEY": generate_key(),
    }
    env.pop("DATABASE_PREPARE_THRESHOLD", None)
    if threshold is not None:
        env["DATABASE_PREPARE_THRESHOLD"] = threshold
    shown = subprocess.run(
        [
            sys.executable,
            "-c",
            "from django.conf import settings; o = settings.DATABASES['default']['OPTIONS']; "
            "print({k: o[k] for k in ('server_side_binding', 'prepare_threshold') if k in o})",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert shown.strip() == repr(options)


@pytest.mark.django_db(transaction=True)
def test_concurrent_claimers_take_disjoint_rows_and_together_all_of_them(settings):
    require_postgresql()  # SKIP LOCKED; SQLite serialises writers instead
    settings.EMAIL_SEND_CONFIRMATION = False
    rows = make_rows(40)
    start = threading.Barrier(4)
    taken = []

    def claimer(name):
        try:
            start.wait()
            while True:
                _, claimed = EmailRequest.objects.claim_batch(worker=name, limit=3)
                if not claimed:
                    return
                taken.extend(row.pk for row in claimed)
        finally:
            connection.close()

    threads = [threading.Thread(target=claimer, args=(f"w{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert sorted(taken) == sorted(row.pk for row in rows)
    workers = set(EmailRequest.objects.values_list("claimed_by", flat=True))
    assert len(workers) > 1, "one claimer took every row"


@pytest.mark.django_db(transaction=True)
def test_a_claim_skips_its_own_row_while_another_worker_holds_it_instead_of_waiting(settings):
    require_postgresql()  # SQLite takes the write lock up front: claims never interleave there
    settings.EMAIL_SEND_CONFIRMATION = False
    held, other = make_rows(2)
    locked, release = threading.Event(), threading.Event()

    def other_claimer():
        # Another worker in the middle of its claim: the row is locked, its UPDATE not yet run.
        try:
            with transaction.atomic():
                list(EmailRequest.objects.select_for_update().filter(pk=held.pk))
                locked.set()
                release.wait(10)
        finally:
            connection.close()

    thread = threading.Thread(target=other_claimer)
    thread.start()
    try:
        assert locked.wait(10)
        result = []
        claimer = threading.Thread(
            target=lambda: (
                result.append(EmailRequest.objects.claim_batch(worker="w", first=held.pk, limit=2)),
                connection.close(),
            )
        )
        claimer.start()
        claimer.join(5)
        assert not claimer.is_alive(), "the claim waited for the other worker's lock"
        [(token, rows)] = result
        assert [row.pk for row in rows] == [other.pk]
    finally:
        release.set()
        thread.join(10)
    assert EmailRequest.objects.get(pk=held.pk).status == EmailStatus.PENDING
