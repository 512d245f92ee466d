"""Delivery guarantees under faults: a real worker and beat on the configured broker (RabbitMQ in
CI), PostgreSQL, and an SMTP server each test scripts."""

import os
import signal
import socket
import subprocess
import sys
import uuid
from datetime import timedelta

import pytest
import requests
from django.utils import timezone

from email_service import actions, outbox, sending
from email_service.models import EmailAttempt, EmailRequest, EmailStatus
from email_service.tasks import send_email_task
from medcor_backend2.celery import app as celery_app

from .conftest import ROOT, free_port, service_env, start_worker, wait_for

pytestmark = pytest.mark.integration

FINAL = (EmailStatus.SENT, EmailStatus.FAILED, EmailStatus.CANCELLED)


def submit(**fields):
    """Create a request the way the API does, dispatching after commit."""
    data = {
        "full_name": "Test Patient",
        "email": f"p-{uuid.uuid4().hex[:10]}@example.org",
        "subject": "Guarantee test",
        "message": "Hello",
        **fields,
    }
    return outbox.create_email_request(data=data)


def final_row(pk, timeout=40):
    return wait_for(
        lambda: EmailRequest.objects.filter(pk=pk, status__in=FINAL).first(),
        timeout=timeout,
        message=f"request {pk} to reach a final status",
    )


def support_copies(smtp, pk):
    return [
        m
        for m in smtp.messages
        if m["message"]["X-Email-Request-ID"] == str(pk)
        and m["message"]["Subject"].startswith("[MedCor contact]")
    ]


def assert_nothing_comes_back(pk):
    """Run in this process what beat and a redelivered task would run: neither may take `pk` again.

    This stands in for waiting to see that nothing happens: the relay and the claim decide from
    the row alone, so what they do here, at any later time, is what the worker and beat would do.
    """
    later = timezone.now() + timedelta(hours=1)
    assert not EmailRequest.objects.undispatched(later).filter(pk=pk).exists()
    assert not EmailRequest.objects.stale_claims(later).filter(pk=pk).exists()
    assert outbox.dispatch_due() == {"dispatched": 0, "reclaimed": 0}
    assert sending.send_email_request(pk, worker="test") is None


def task_runs(worker, task_id):
    """How many copies of the task `task_id` the worker has finished."""
    return worker.output().count(f"send_email_task[{task_id}] succeeded")


def test_421_twice_then_accepted_is_sent_once_after_three_attempts(celery_worker, smtp, settings):
    settings.EMAIL_SEND_CONFIRMATION = False
    smtp.script = ["421 4.3.2 Service not available, try later", "421 4.3.2 Still busy"]
    row = final_row(submit().pk)
    assert row.status == EmailStatus.SENT
    assert row.retry_count == 2
    assert len(support_copies(smtp, row.pk)) == 1
    attempts = list(row.attempts.order_by("number"))
    assert [(a.number, a.outcome, a.smtp_code) for a in attempts] == [
        (1, "transient", 421),
        (2, "transient", 421),
        (3, "sent", 250),
    ]
    assert all(a.worker and a.finished_at and a.duration_ms is not None for a in attempts)
    # Backoff: each retry waited at least half the configured delay.
    assert (attempts[1].started_at - attempts[0].finished_at).total_seconds() >= 0.9


def test_550_fails_at_once_without_retry(celery_worker, smtp):
    smtp.script = ["550 5.1.1 Mailbox unavailable"]
    row = final_row(submit().pk)
    assert row.status == EmailStatus.FAILED
    assert row.error_message.startswith("550")
    assert "Mailbox unavailable" in row.error_message
    assert_nothing_comes_back(row.pk)
    row.refresh_from_db()
    assert (row.status, row.retry_count, row.attempts.count()) == (EmailStatus.FAILED, 0, 1)
    assert smtp.data_commands == 1


def test_a_server_that_never_answers_is_retried_then_failed_and_the_worker_survives(
    celery_worker, smtp, settings
):
    settings.EMAIL_SEND_CONFIRMATION = False
    # Each DATA hangs past EMAIL_TIMEOUT (2 s in the worker), then would refuse.
    smtp.script = [("hang", 3, "451 too slow")] * 4
    row = final_row(submit().pk, timeout=60)
    assert row.status == EmailStatus.FAILED, list(
        row.attempts.values_list("outcome", "error_class", "error_text", "duration_ms")
    )
    assert row.retry_count == 3
    assert [a.outcome for a in row.attempts.order_by("number")] == ["transient"] * 4
    assert support_copies(smtp, row.pk) == []
    assert celery_app.control.ping(timeout=5), "the worker stopped answering"
    healthy = final_row(submit().pk)
    assert healthy.status == EmailStatus.SENT


def test_the_same_task_delivered_twice_at_once_sends_one_mail(celery_worker, smtp, settings):
    settings.EMAIL_SEND_CONFIRMATION = False
    smtp.script = [("hang", 1.5)]  # the first copy is still sending when the second arrives
    row = submit()
    for _ in range(2):
        send_email_task.apply_async(args=[str(row.pk)], task_id=row.celery_task_id)
    row = final_row(row.pk)
    # Three copies under one task id (the dispatch after commit and the two above) all finish,
    # the later ones finding nothing to claim; Celery logs the end of each.
    wait_for(lambda: task_runs(celery_worker, row.celery_task_id) >= 3, message="every copy to finish")
    row.refresh_from_db()
    assert task_runs(celery_worker, row.celery_task_id) == 3
    assert row.status == EmailStatus.SENT
    assert len(support_copies(smtp, row.pk)) == 1
    assert row.attempts.count() == 1


def test_cancel_while_waiting_for_a_retry_is_never_sent(celery_worker, smtp, settings):
    settings.EMAIL_SEND_CONFIRMATION = False
    smtp.script = ["421 4.3.2 Try later"]
    pk = submit().pk
    wait_for(
        lambda: EmailRequest.objects.filter(pk=pk, status=EmailStatus.PENDING, retry_count=1).exists(),
        timeout=20,
        interval=0.02,
        message="the first deferral",
    )
    actions.cancel_email_request(EmailRequest.objects.get(pk=pk))
    assert_nothing_comes_back(pk)
    row = EmailRequest.objects.get(pk=pk)
    assert row.status == EmailStatus.CANCELLED
    assert row.attempts.count() == 1
    assert support_copies(smtp, pk) == []


def claimed_with_data_on_the_wire(pk, smtp):
    """Wait until row `pk` is claimed and its mail's DATA has begun; return the claimed row."""
    row = wait_for(
        lambda: EmailRequest.objects.filter(pk=pk, status=EmailStatus.PROCESSING).first(),
        timeout=20,
        interval=0.05,
        message="the claim",
    )
    wait_for(lambda: smtp.data_commands >= 1, timeout=10, interval=0.05, message="DATA on the wire")
    return row


def test_a_pool_process_killed_mid_send_is_sent_again_without_waiting_for_its_lease(
    celery_worker, smtp, settings
):
    settings.EMAIL_SEND_CONFIRMATION = False
    smtp.script = [("hang", 4)]
    pk = submit().pk
    row = claimed_with_data_on_the_wire(pk, smtp)
    pool_pid = int(row.claimed_by.rsplit(":", 1)[1])
    lease_ends = row.lease_expires_at
    os.kill(pool_pid, signal.SIGKILL)

    row = final_row(pk, timeout=90)
    assert row.status == EmailStatus.SENT
    copies = len(support_copies(smtp, pk))
    # The killed send reached the server's DATA phase, so the server may keep that copy too.
    print(f"\nkilled mid-send: {copies} copy(ies) received, {copies - 1} duplicate(s)")
    assert 1 <= copies <= 2
    attempts = list(row.attempts.order_by("number"))
    assert attempts[0].outcome == "crashed" and attempts[-1].outcome == "sent"
    # The pool process started in place of the killed one took the row back: its lease had not run out.
    assert attempts[0].finished_at < lease_ends
    assert celery_app.control.ping(timeout=5)


def test_a_node_killed_mid_send_and_started_again_takes_its_rows_back_at_start(
    smtp, smtp_server, transactional_db, settings, tmp_path
):
    """The whole worker (main process and pool) killed, then the same node started again, as a
    supervisor would: the row its dead pool process held is sent without waiting for the lease."""
    settings.EMAIL_SEND_CONFIRMATION = False
    smtp.script = [("hang", 4)]
    # A queue of its own: the session's worker never sees these messages.
    queue = f"{os.environ.get('CELERY_TASK_DEFAULT_QUEUE', 'emails')}-phoenix"
    env = {"CELERY_TASK_DEFAULT_QUEUE": queue, "EMAIL_CLAIM_LEASE": "600"}
    for run in ("first", "again"):
        (tmp_path / run).mkdir()
    worker = start_worker(tmp_path / "first", smtp_server.port, name="phoenix", **env)
    try:
        pk = submit_to(queue)
        row = claimed_with_data_on_the_wire(pk, smtp)
        lease_ends = row.lease_expires_at
        worker.kill()
        worker.process.wait(timeout=10)
    finally:
        worker.stop()
    again = start_worker(tmp_path / "again", smtp_server.port, name="phoenix", **env)
    try:
        row = final_row(pk, timeout=60)
    finally:
        again.stop()
    assert row.status == EmailStatus.SENT
    attempts = list(row.attempts.order_by("number"))
    assert [a.outcome for a in attempts] == ["crashed", "sent"]
    # Taken back at start, ten minutes before its lease would have ended.
    assert attempts[0].finished_at < lease_ends and attempts[1].started_at < lease_ends
    assert 1 <= len(support_copies(smtp, pk)) <= 2


def submit_to(queue):
    """Create a request, and publish its send task to `queue` rather than the default one."""
    row = outbox.create_email_request(
        data={"full_name": "Test Patient", "email": "phoenix@example.org", "message": "Hello"},
        dispatch_on_commit=False,
    )
    send_email_task.apply_async(args=[str(row.pk)], queue=queue)
    return row.pk


class SilentBroker:
    """A port that accepts connections and never says a word, until closed."""

    def __init__(self):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.connections = []

    def accept(self):
        """Take the connections waiting; return whether anyone has connected so far."""
        while True:
            try:
                self.connections.append(self.listener.accept()[0])
            except BlockingIOError:
                return bool(self.connections)

    def close(self):
        """Hang up on every client and refuse new ones, so a waiting publish fails at once."""
        self.listener.close()
        for connection in self.connections:
            connection.close()


@pytest.mark.parametrize("broker", ["closed port", "silent port"])
def test_post_answers_without_waiting_for_an_unreachable_broker_and_beat_delivers_later(
    celery_worker, smtp, smtp_server, tmp_path, broker
):
    """The web side talks to a dead broker; worker and beat to the real one, as after an outage.

    Against the silent port the web process's publish hangs for its whole connection timeout,
    made far longer than any POST takes; the POST must answer while that publish still hangs,
    which is an order of events, not a measured time.
    """
    silent = SilentBroker()
    dead_port = free_port() if broker == "closed port" else silent.port
    web_port = free_port()
    env = service_env(
        smtp_server.port,
        CELERY_BROKER_URL=f"amqp://guest:guest@127.0.0.1:{dead_port}//",
        CELERY_BROKER_CONNECTION_TIMEOUT="30",
        DJANGO_ALLOWED_HOSTS="127.0.0.1",
    )
    web_log = tmp_path / "web.log"
    log = open(web_log, "wb")
    web = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "medcor_backend2.wsgi:application",
            "--bind",
            f"127.0.0.1:{web_port}",
            "--workers",
            "1",
            "--threads",
            "4",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:

        def up():
            try:
                return requests.get(f"http://127.0.0.1:{web_port}/api/email/emails/statistics/", timeout=2).ok
            except requests.RequestException:
                return False

        wait_for(up, timeout=30, message="gunicorn")
        # The timeout only bounds a hung test: a POST that waited for the publish would answer
        # after the publish failed, and the log read below would show it.
        response = requests.post(
            f"http://127.0.0.1:{web_port}/api/email/emails/",
            timeout=120,
            json={"full_name": "Outage Test", "email": "outage@example.org"},
        )
        log_when_answered = web_log.read_text()
        assert response.status_code == 201, response.text
        assert response.json()["status"] == "PENDING"
        if broker == "silent port":
            wait_for(silent.accept, timeout=30, message="the web process to try the broker")
            assert "Broker unavailable" not in log_when_answered, "the POST waited for the publish"
        silent.close()  # the hung publish fails now, as it would at its timeout
        pk = response.json()["email_request_id"]
        row = final_row(pk, timeout=40)
        assert row.status == EmailStatus.SENT
        assert EmailAttempt.objects.filter(request_id=pk).count() == 1
        wait_for(
            lambda: "Broker unavailable" in web_log.read_text(), timeout=30, message="the failed publish"
        )
    finally:
        web.terminate()
        web.wait(timeout=10)
        log.close()
        silent.close()
