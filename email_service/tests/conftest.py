"""Fixtures: a scriptable SMTP server, a real Celery worker and beat, and service checks.

Integration tests run against whatever DATABASE_URL, CELERY_BROKER_URL and REDIS_URL name
(PostgreSQL, RabbitMQ and Redis in CI), or the embedded defaults when they are unset.
"""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from email import message_from_bytes
from email.policy import default as default_policy
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from django.conf import settings
from django.db import connection

from medcor_backend2.celery import app as celery_app

from .ports import free_port

ROOT = Path(settings.BASE_DIR)
# Set by .ci/run: a test that would skip for a missing service fails instead.
REQUIRE_SERVICES = os.environ.get("MEDCOR_REQUIRE_SERVICES", "").lower() in ("1", "true", "yes")


def skip_or_fail(reason):
    """Skip for a missing service, or fail when the run requires every service."""
    if REQUIRE_SERVICES:
        pytest.fail(f"required service missing: {reason}")
    pytest.skip(reason)


def require_redis():
    if not settings.REDIS_URL:
        skip_or_fail("REDIS_URL is not set; this test needs a Redis server")


def require_postgresql():
    if connection.vendor != "postgresql":
        skip_or_fail("DATABASE_URL does not name PostgreSQL")


def require_rabbitmq():
    if not settings.CELERY_BROKER_URL.startswith(("amqp://", "pyamqp://")):
        skip_or_fail("CELERY_BROKER_URL does not name RabbitMQ")


def wait_for(predicate, timeout=30.0, interval=0.1, message="condition"):
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def contact_markers(tag):
    """A contact form whose every field holds a marker made of `tag`, to look for where it must not be."""
    return {
        "full_name": f"Name{tag}",
        "email": f"mail{tag}@example.org",
        "phone": f"+1 555 {int(tag[:6], 16) % 10**7:07d}",
        "job_profession": f"Job{tag}",
        "subject": f"Subject{tag}",
        "message": f"Message{tag} about my heart condition",
    }


# --- a scriptable SMTP server ------------------------------------------------------------


class ScriptedHandler:
    """aiosmtpd handler that records messages and answers DATA as scripted.

    `script` is a list of replies used one per DATA command, then `accept` forever: an SMTP
    reply such as "421 Try later", or ("hang", seconds[, reply]) to say nothing for that long
    and then give `reply` (accept by default, as a server that was only slow would).
    """

    def __init__(self):
        self.reset()

    def reset(self):
        self.messages = []
        self.script = []
        self.data_commands = 0
        self.connections = 0
        self.rcpt_reply = None
        # Every RCPT address the server was given, refused or not: proof a refusal came from here.
        self.rcpts_seen = []

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        self.connections += 1
        session.host_name = hostname
        return responses

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        self.rcpts_seen.append(address)
        if self.rcpt_reply:
            return self.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.data_commands += 1
        action = self.script.pop(0) if self.script else "accept"
        if isinstance(action, tuple) and action[0] == "hang":
            await asyncio.sleep(action[1])
            action = action[2] if len(action) > 2 else "accept"
        if action != "accept":
            return action
        message = message_from_bytes(envelope.original_content, policy=default_policy)
        self.messages.append(
            {
                "mail_from": envelope.mail_from,
                "rcpt_tos": list(envelope.rcpt_tos),
                "message": message,
                "raw": envelope.original_content,
            }
        )
        return "250 Message accepted"

    def to(self, address):
        """Messages received for `address`."""
        return [m for m in self.messages if address in m["rcpt_tos"]]


@pytest.fixture(scope="session")
def smtp_server():
    handler = ScriptedHandler()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port(), data_size_limit=64 * 1024 * 1024)
    controller.start()
    yield controller
    controller.stop()


@pytest.fixture
def smtp(smtp_server, settings):
    """The session's SMTP server, emptied, and this process's mail settings pointed at it."""
    handler = smtp_server.handler
    handler.reset()
    # Django's test set-up swaps in the in-memory backend; these tests want real SMTP.
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST = "127.0.0.1"
    settings.EMAIL_PORT = smtp_server.port
    settings.EMAIL_USE_TLS = False
    settings.EMAIL_USE_SSL = False
    settings.EMAIL_TIMEOUT = 2
    yield handler
    handler.reset()
    from email_service import delivery

    delivery.close_connection()


@pytest.fixture
def dispatched(request, monkeypatch):
    """Record the requests create_email_request would publish, instead of publishing them.

    A test that also runs the real worker keeps the real dispatch: it needs its message on the
    broker, so its list stays empty.
    """
    from email_service import outbox

    calls = []
    if "celery_worker" not in request.fixturenames:
        monkeypatch.setattr(outbox, "dispatch", calls.append)
    return calls


@pytest.fixture
def media_root(settings, tmp_path):
    """Give this test its own folders for stored attachments and uploads; return the former."""
    settings.MEDIA_ROOT = str(tmp_path / "media")
    settings.FILE_UPLOAD_TEMP_DIR = str(tmp_path / "uploads")
    (tmp_path / "uploads").mkdir(exist_ok=True)
    return tmp_path / "media"


# --- a real Celery worker and beat ----------------------------------------------------------


def database_url():
    """The URL of the test database this process uses, for worker subprocesses."""
    db = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{db['NAME']}"
    auth = db["USER"] + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


def service_env(smtp_port, **overrides):
    """Environment for a worker or beat: the test database, the test SMTP server, short timings."""
    env = dict(os.environ)
    env.update(
        DATABASE_URL=database_url(),
        EMAIL_HOST="127.0.0.1",
        EMAIL_PORT=str(smtp_port),
        EMAIL_USE_TLS="false",
        EMAIL_USE_SSL="false",
        EMAIL_TIMEOUT="2",
        EMAIL_SEND_TIME_LIMIT="8",
        EMAIL_CLAIM_LEASE="12",
        EMAIL_RETRY_DELAY="2",
        EMAIL_RETRY_BACKOFF_MAX="4",
        EMAIL_MAX_RETRIES="3",
        EMAIL_DISPATCH_INTERVAL="1",
        EMAIL_DISPATCH_STALE_AFTER="3",
        DATABASE_CONN_MAX_AGE="0",
        PYTHONUNBUFFERED="1",
    )
    env.update({key: str(value) for key, value in overrides.items()})
    return env


class CeleryProcess:
    """A `celery -A medcor_backend2 <command>` subprocess logging to a file."""

    def __init__(self, command, env, log_path, extra_args=()):
        self.log_path = Path(log_path)
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "medcor_backend2", *command, *extra_args],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self):
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, marker, timeout=60):
        try:
            wait_for(
                lambda: marker in self.output() or self.process.poll() is not None,
                timeout=timeout,
                message=f"celery to print {marker!r}",
            )
        except BaseException:
            self.stop()  # never leave a half-started worker behind
            raise
        if self.process.poll() is not None:
            self.log.close()
            pytest.fail(f"celery exited early:\n{self.output()[-3000:]}")

    def kill(self, sig=signal.SIGKILL):
        """Send `sig` to the whole process group (the main process and its pool children)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()  # the main process only: it stops its own pool
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # any pool child left behind
        except ProcessLookupError:
            pass
        self.log.close()


def start_worker(tmp_path, smtp_port, name="worker", **env):
    worker = CeleryProcess(
        ["worker"],
        service_env(smtp_port, **env),
        tmp_path / f"{name}.log",
        [
            "--loglevel=INFO",
            "--concurrency=2",
            "--pool=prefork",
            f"--hostname={name}@%h",
            "--without-gossip",
            "--without-mingle",
        ],
    )
    worker.wait_ready("ready.")
    # Its node name, as `--hostname` expands it, for remote control addressed to it alone.
    worker.node = f"{name}@{socket.gethostname()}"
    return worker


def start_beat(tmp_path, smtp_port, **env):
    beat = CeleryProcess(
        ["beat"],
        service_env(smtp_port, **env),
        tmp_path / "beat.log",
        ["--loglevel=INFO", f"--schedule={tmp_path / 'beat-schedule'}"],
    )
    beat.wait_ready("beat: Starting")
    return beat


@pytest.fixture(scope="session")
def celery_services(smtp_server, django_db_setup, django_db_blocker, tmp_path_factory):
    """A real worker and beat on the configured broker, sending to the test SMTP server."""
    tmp_path = tmp_path_factory.mktemp("celery")
    with django_db_blocker.unblock():
        celery_app.control.purge()
    worker = start_worker(tmp_path, smtp_server.port)
    beat = start_beat(tmp_path, smtp_server.port)
    _session_worker.update(node=worker.node, consuming=True)
    yield {"worker": worker, "beat": beat, "tmp_path": tmp_path}
    _session_worker.clear()
    beat.stop()
    worker.stop()


# The session's worker, while it runs: its node name and whether it takes messages from the queue.
_session_worker = {}


def _session_worker_consumes(wanted):
    """Let the session's worker take messages only during the tests that ask for it.

    A send task sends every due row it can claim, not just its own, so a worker left consuming
    would deliver rows that other tests commit and expect to stay PENDING, or route to a worker
    of their own. Stopping its consumer (Celery's remote control) and waiting for its reserved
    and running tasks keeps it alive and its connections clean, unlike pausing the process.
    """
    if not _session_worker or _session_worker["consuming"] == wanted:
        return
    node, queue = _session_worker["node"], settings.CELERY_TASK_DEFAULT_QUEUE
    if wanted:
        celery_app.control.add_consumer(queue, destination=[node], reply=True, timeout=10)
    else:
        celery_app.control.cancel_consumer(queue, destination=[node], reply=True, timeout=10)

        def idle():
            inspect = celery_app.control.inspect([node], timeout=2)
            return not any((inspect.active() or {}).get(node, [None])) and not any(
                (inspect.reserved() or {}).get(node, [None])
            )

        wait_for(idle, timeout=60, interval=0.2, message="the session's worker to finish its tasks")
    _session_worker["consuming"] = wanted


@pytest.fixture(autouse=True)
def _session_worker_only_for_its_tests(request):
    _session_worker_consumes("celery_worker" in request.fixturenames)


@pytest.fixture
def celery_worker(celery_services, smtp, transactional_db, settings):
    """Per test: the running worker, an empty SMTP mailbox, and committed database writes."""
    # Messages published here carry this process's time limits: the same as the worker's.
    settings.EMAIL_SEND_TIME_LIMIT = float(service_env(0)["EMAIL_SEND_TIME_LIMIT"])
    yield celery_services["worker"]


def pytest_report_header(config):
    db = settings.DATABASES["default"]
    broker = (
        settings.CELERY_BROKER_URL.split("@")[-1]
        if "@" in settings.CELERY_BROKER_URL
        else settings.CELERY_BROKER_URL
    )
    return [
        f"medcor services: database={db['ENGINE'].rsplit('.', 1)[-1]} ({db.get('HOST') or db['NAME']}), "
        f"broker={broker}, cache={settings.CACHES['default']['BACKEND'].rsplit('.', 1)[-1]}, "
        f"require_services={REQUIRE_SERVICES}",
    ]


# --- a real MTA (Postfix with Dovecot SASL) and stand-ins for Google ------------------------


@pytest.fixture(scope="session")
def postfix_mta():
    """One Postfix instance for the session: STARTTLS required, SASL through its own Dovecot."""
    from email_service.tests.mta import PostfixMTA, missing_binaries

    missing = missing_binaries()
    if missing:
        skip_or_fail(f"the real-MTA tests need Debian's postfix, dovecot-core and openssl: {missing}")
    server = PostfixMTA().start()
    yield server
    server.stop()


@pytest.fixture
def mta(postfix_mta):
    """The session's Postfix with the preset replies, logins checked and an empty sink."""
    postfix_mta.reset()
    yield postfix_mta
    postfix_mta.reset()


@pytest.fixture
def google_token_endpoint():
    """A local stand-in for Google's OAuth2 token endpoint (the refresh grant)."""
    from email_service.tests.google import TokenEndpoint

    endpoint = TokenEndpoint().start()
    yield endpoint
    endpoint.stop()


@pytest.fixture
def google_smtp(google_token_endpoint, tmp_path):
    """A Gmail stand-in: STARTTLS, then only AUTH XOAUTH2 with the endpoint's newest live token."""
    from email_service.tests.google import XOAuth2SMTP
    from email_service.tests.mta import OPENSSL, make_certificates

    if not os.access(OPENSSL, os.X_OK):
        skip_or_fail("the Gmail stand-in needs openssl for its certificate")
    certificates = make_certificates(tmp_path / "google-tls")
    server = XOAuth2SMTP(google_token_endpoint, port=free_port(), certificates=certificates)
    server.start()
    yield server
    server.stop()


# --- a stand-in for the CAPTCHA providers ----------------------------------------------------


@pytest.fixture
def siteverify():
    """A local siteverify (email_service/tests/siteverify.py) for the CAPTCHA tests."""
    from email_service.tests.siteverify import start_siteverify, stop_siteverify

    server = start_siteverify()
    yield server
    stop_siteverify(server)


# --- log lines as the configured handler writes them (issue 14) -------------------------------
@pytest.fixture
def log_output():
    """The root's configured handler, writing JSON to a buffer for this test; yields the buffer."""
    import io
    import logging

    from medcor_backend2.logs import JsonFormatter, ScrubPersonalData

    [handler] = [
        h for h in logging.getLogger().handlers if any(isinstance(f, ScrubPersonalData) for f in h.filters)
    ]
    buffer = io.StringIO()
    old_stream, old_formatter, old_level = handler.setStream(buffer), handler.formatter, handler.level
    handler.setFormatter(JsonFormatter())
    handler.setLevel(logging.DEBUG)
    root_level = logging.getLogger().level
    logging.getLogger().setLevel(logging.DEBUG)
    yield buffer
    handler.setStream(old_stream)
    handler.setFormatter(old_formatter)
    handler.setLevel(old_level)
    logging.getLogger().setLevel(root_level)


# --- S3: moto's server on loopback ----------------------------------------------------------


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """A moto S3 server (moto[server]) in its own process on 127.0.0.1; yield its URL."""
    try:
        import boto3  # noqa: F401
        import moto.server  # noqa: F401
    except ImportError as exc:
        skip_or_fail(f"boto3 or moto[server] is not installed: {exc}")
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log
    )
    endpoint = f"http://127.0.0.1:{port}"

    def answers():
        import urllib.request

        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1):
                return True
        except OSError:
            return server.poll() is not None

    try:
        wait_for(answers, timeout=60, interval=0.2, message="moto's server")
        if server.poll() is not None:
            pytest.fail("moto's server exited early")
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()


S3_CREDENTIALS = {"aws_access_key_id": "test", "aws_secret_access_key": "test", "region_name": "us-east-1"}


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh bucket on the moto server; return (boto3 client, bucket name)."""
    import boto3

    bucket = f"medcor-{os.urandom(4).hex()}"
    client = boto3.client("s3", endpoint_url=s3_endpoint, **S3_CREDENTIALS)
    client.create_bucket(Bucket=bucket)
    return client, bucket


@pytest.fixture(autouse=True)
def _fresh_brake():
    """Each test starts with no cached read of the sending brake (its row rolls back with the test)."""
    from email_service import brake

    brake.forget()
    yield
    brake.forget()


@pytest.fixture(autouse=True)
def _free_wake_slots(settings):
    """Each test starts with every wake slot free: one left taken by an earlier test's message
    (on a queue nobody consumes now) would keep new rows from publishing."""
    from email_service import outbox

    for slot in range(settings.EMAIL_DISPATCH_WAKE_SLOTS):
        outbox.clear_wake(slot)
