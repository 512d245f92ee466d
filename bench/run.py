"""Benchmark: the service on this machine against baselines measured in the same run.

Starts its own stack (gunicorn, Celery workers and beat, an aiosmtpd sink in this process) against
PostgreSQL, RabbitMQ and Redis, in the scratch database `medcor_bench` and a private queue, with rate
limits off. Every figure is a ratio against a baseline taken in this run, or a scaling curve:

1. accept rate: POST JSON at fixed concurrency (wrk), against a view doing only the same row insert;
2. non-blocking: the same POST while the sink takes 2 s per mail, against the fast-sink run;
3. delivery rate: PENDING rows to SENT, against the same mails sent by a plain smtplib loop;
4. attachment memory: peak RSS of web and worker processes above idle while 10 MB files go through;
5. query scaling: list, detail and statistics latency as the table grows.

Writes bench/results.json and prints a Markdown table. Exits non-zero only if the stack does not come
up or a measurement errors, never on a figure.

    .venv/bin/python bench/run.py [--quick]
"""

import argparse
import datetime
import json
import os
import pickle
import platform
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg
import requests
from aiosmtpd.controller import Controller
from amqp.exceptions import NotFound
from celery import Celery
from kombu import Connection

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.side_by_side import SideBySide, side_by_side_table
from bench.stack import (
    PG,
    ROOT,
    SERVICE_CELERY,
    SERVICE_WORKER_FLAGS,
    Processes,
    Sink,
    children,
    create_database,
    free_port,
    manage,
    peak_rss,
    reset_peak,
    wait_http,
)
from email_service.encryption import Keyring, address_index, domain_index, encrypt_text, parse_key
from medcor_backend2.keys import generate_key

DATABASE = os.environ.get("BENCH_DATABASE", "medcor_bench")
BROKER = os.environ.get("BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
REDIS = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/8")
MB = 1024 * 1024
FILE_SIZE = 10 * MB
# The warm-up before the memory measurement: 12 files of 3 MB (past the 2 MB in-memory upload limit).
WARM_UP_SIZE, WARM_UP_FILES = 3 * MB, 12
CONTACT = {
    "full_name": "Bench Marker",
    "email": "bench@example.org",
    "phone": "+1-555-123-4567",
    "job_profession": "Tester",
    "subject": "Benchmark",
    "message": "How fast can you take this? " * 10,
}
TABLE = "email_service_emailrequest"

# What the service is run with; the same values as docker-compose.yml unless a fix says otherwise.
WEB_WORKERS, WEB_THREADS = 3, 2
WORKER_CONCURRENCY, WORKER_PREFETCH = 4, 1

MEASUREMENTS = ("accept", "non_blocking", "delivery", "side_by_side", "memory", "queries")
GOALS = {
    "accept": "throughput >= 0.7x baseline",
    "non_blocking": "p99 <= 1.2x fast-sink p99",
    "delivery": "rate >= 0.5x smtplib loop",
    "memory_web": "peak - idle < 1x file size",
    "memory_worker": "peak - idle < 4x file size",
    "queries": "flat (at most 2x, or +5 ms, the smallest size's p50) and every p50 < 50 ms at the largest",
}


def pdf_of(size):
    """A PDF of `size` bytes whose content is random: nothing compresses or dedupes.

    The random bytes are one stream's data, as an image's would be: in the PDF's syntax they would
    now and then spell the script key /JS, which the upload check refuses there (it looks in stream
    data only for the long names): 2 of 40 random 3 MB files were refused that way, none of 40
    like these.
    """
    tail = b"\nendstream\nendobj\n%%EOF\n"
    # The length's digits are part of the size; the file is far too small for a nine-digit one.
    data = size - len(b"%PDF-1.4\n1 0 obj\n<< /Length 123456789 >>\nstream\n") - len(tail)
    head = b"%PDF-1.4\n1 0 obj\n<< /Length " + str(data).rjust(9).encode() + b" >>\nstream\n"
    return head + secrets.token_bytes(data) + tail


class Bench:
    def __init__(self, args):
        self.args = args
        self.run_dir = ROOT / "var" / f"bench-{uuid.uuid4().hex[:6]}"
        (self.run_dir / "media").mkdir(parents=True)
        self.queue = f"bench-{uuid.uuid4().hex[:6]}"
        self.sink = Sink()
        self.smtp = Controller(self.sink, hostname="127.0.0.1", port=free_port(), data_size_limit=64 * MB)
        self.web_port = free_port()
        self.base = f"http://127.0.0.1:{self.web_port}"
        self.db = None
        self.processes = None
        self.database, self.broker, self.contact = DATABASE, BROKER, CONTACT
        # The stack's keys, known here so that rows inserted in SQL are sealed as the service seals them.
        self.encryption_key, self.index_key = generate_key(), generate_key()
        self.keyring = Keyring([parse_key(self.encryption_key)])

    # --- the stack ---------------------------------------------------------------------------
    def start(self):
        create_database(DATABASE)
        self.smtp.start()
        env = {key: value for key, value in os.environ.items() if key != "DJANGO_SETTINGS_MODULE"}
        env.update(
            DJANGO_SECRET_KEY="bench-run",
            AUDIT_HMAC_KEY="bench-run",
            MEDCOR_ENCRYPTION_KEYS=self.encryption_key,
            MEDCOR_INDEX_KEY=self.index_key,
            DJANGO_ALLOWED_HOSTS="127.0.0.1",
            DJANGO_DEBUG="false",
            DATABASE_URL=f"{PG}/{DATABASE}",
            CELERY_BROKER_URL=BROKER,
            CELERY_TASK_DEFAULT_QUEUE=self.queue,
            REDIS_URL=REDIS,
            MEDCOR_VAR_DIR=str(self.run_dir),
            MEDIA_ROOT=str(self.run_dir / "media"),
            EMAIL_HOST="127.0.0.1",
            EMAIL_PORT=str(self.smtp.port),
            EMAIL_USE_TLS="false",
            EMAIL_USE_SSL="false",
            EMAIL_TIMEOUT="10",
            EMAIL_SEND_CONFIRMATION="false",
            EMAIL_DISPATCH_INTERVAL="5",
            RATELIMIT_ENABLE="false",
            LOG_LEVEL="WARNING",
        )
        manage(env, "migrate", "--noinput")
        self.processes = Processes(self.run_dir, env)
        args = self.args
        self.processes.spawn(
            "web",
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            "deploy/gunicorn.conf.py",
            "medcor_backend2.wsgi:application",
            "--bind",
            f"127.0.0.1:{self.web_port}",
            "--workers",
            str(args.web_workers),
            "--threads",
            str(args.web_threads),
            env={"DJANGO_SETTINGS_MODULE": "bench.settings", "GUNICORN_ACCESS_LOG": ""},
        )
        self.start_worker()
        celery = [sys.executable, "-m", "celery", "-A", "medcor_backend2"]
        self.processes.spawn("beat", *celery, "beat", f"--schedule={self.run_dir / 'beat-schedule'}")
        wait_http(f"{self.base}/healthz", self.processes)
        self.db = psycopg.connect(f"{PG}/{DATABASE}", autocommit=True)
        self.celery = Celery(broker=BROKER)
        self._wait_for_worker()

    def start_worker(self):
        args = self.args
        self.processes.spawn(
            "worker",
            sys.executable,
            *SERVICE_CELERY,
            "worker",
            *SERVICE_WORKER_FLAGS,
            f"--concurrency={args.worker_concurrency}",
            f"--prefetch-multiplier={args.worker_prefetch}",
            f"--hostname=bench-{self.queue}@%h",
        )

    def _wait_for_worker(self, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.processes.check()
            if self._queue_depth()[1] >= 1:
                return
            time.sleep(0.3)
        raise RuntimeError("the Celery worker did not start consuming")

    def stop(self):
        if self.processes:
            self.processes.stop()
        if self.db:
            self.db.close()
        self.smtp.stop()
        with Connection(BROKER) as conn:
            # Our private queue outlives the worker otherwise (Celery declares it durable).
            conn.default_channel.queue_delete(self.queue)
        # The logs stay for a look afterwards; the 10 MB files and the kept mails need not.
        shutil.rmtree(self.run_dir / "media", ignore_errors=True)
        (self.run_dir / "mails.pickle").unlink(missing_ok=True)

    def _queue_depth(self):
        """(messages ready, consumers) of our queue."""
        with Connection(BROKER) as conn:
            try:
                _, messages, consumers = conn.default_channel.queue_declare(self.queue, passive=True)
            except NotFound:  # the worker has not declared it yet
                return 0, 0
        return messages, consumers

    def sealed(self, text):
        """Encrypt `text` under the stack's key, as the service stores a personal field."""
        return encrypt_text(text, self.keyring)

    def _sql(self, query, params=None):
        cursor = self.db.execute(query, params)
        return cursor.fetchall() if cursor.description else []

    def _wait_idle(self, timeout=300):
        """Wait until nothing is PENDING-and-due or PROCESSING and the queue is empty."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.processes.check()
            [(busy,)] = self._sql(
                f"SELECT count(*) FROM {TABLE} WHERE status = 'PROCESSING' "
                "OR (status = 'PENDING' AND next_attempt_at <= now())"
            )
            if busy == 0 and self._queue_depth()[0] == 0:
                return
            time.sleep(0.5)
        raise RuntimeError(f"the stack did not drain within {timeout} s")

    # --- 1 and 2: accept rate and non-blocking ------------------------------------------------
    def wrk(self, path, seconds, base=None):
        script = self.run_dir / "post.lua"
        script.write_text(
            'wrk.method = "POST"\n'
            f"wrk.body = [[{json.dumps(CONTACT)}]]\n"
            'wrk.headers["Content-Type"] = "application/json"\n'
        )
        command = [
            "wrk",
            "-t",
            "2",
            "-c",
            str(self.args.connections),
            "-d",
            f"{seconds}s",
            "--latency",
            "--timeout",
            "10s",
            "-s",
            str(script),
            (base or self.base) + path,
        ]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        return parse_wrk(output)

    def accept(self):
        seconds = self.args.seconds
        self.wrk("/bench/baseline/", 1)  # warm both paths: imports, connections, caches
        self.wrk("/api/email/emails/", 1)
        self._wait_idle()
        runs = {"baseline": [], "service": []}
        for _ in range(self.args.rounds):
            for name, path in (("baseline", "/bench/baseline/"), ("service", "/api/email/emails/")):
                runs[name].append(self.wrk(path, seconds))
                self._wait_idle()
        result = {name: merge_runs(values) for name, values in runs.items()}
        result["ratio"] = result["service"]["rps"] / result["baseline"]["rps"]
        # Not a goal, an explanation: the same run with the worker paused shows what the web path
        # costs on its own, apart from delivering on the same cores what it accepts.
        result["web_only"] = self._with_worker_paused(lambda: self.wrk("/api/email/emails/", seconds))
        result["web_only_ratio"] = result["web_only"]["rps"] / result["baseline"]["rps"]
        self._wait_idle()
        result["runs"] = runs
        return result

    def _with_worker_paused(self, measure):
        group = os.getpgid(self.processes.running["worker"].pid)
        os.killpg(group, signal.SIGSTOP)
        try:
            return measure()
        finally:
            os.killpg(group, signal.SIGCONT)

    def fast_post(self):
        self.wrk("/api/email/emails/", 1)
        self._wait_idle()
        fast = self.wrk("/api/email/emails/", self.args.seconds)
        self._wait_idle()
        return fast

    def non_blocking(self, fast):
        self.sink.delay = 2.0
        try:
            slow = self.wrk("/api/email/emails/", self.args.seconds)
        finally:
            self.sink.delay = 0.0
        # The backlog would take hours at 2 s a mail: cancel it, so its messages are skipped at claim.
        self._sql(f"UPDATE {TABLE} SET status = 'CANCELLED' WHERE status = 'PENDING'")
        self._wait_idle()
        return {"fast": fast, "slow": slow, "ratio": slow["p99_ms"] / fast["p99_ms"]}

    # --- 3: delivery rate ----------------------------------------------------------------------
    def delivery(self):
        count = self.args.deliveries
        seal = self.sealed
        rows = self._sql(
            f"""INSERT INTO {TABLE} (id, full_name, email, email_index, email_domain_index, phone,
                job_profession, subject, message, file_attached, attachment_name, attachment_content_type,
                status, error_message, retry_count, max_retries, manual_retries, celery_task_id, message_id,
                next_attempt_at, dispatched_at, claimed_by, confirmation_error, created_at, updated_at,
                captcha_unverified, virus_scan, kind)
            SELECT gen_random_uuid(), %s, %s, %s, %s, '', '', %s, %s, '', '', '', 'PENDING', '', 0, 3, 0,
                gen_random_uuid()::text, '<bench-' || g || '-' || md5(random()::text) || '@tcall.ai>',
                now() - interval '1 second', now(), '', '', now(), now(), false, '', 'REQUEST'
            FROM generate_series(1, %s::int) AS g RETURNING id, celery_task_id""",
            (
                seal("Bench Delivery"),
                seal("bench@example.org"),
                address_index("bench@example.org", self.index_key),
                domain_index("bench@example.org", self.index_key),
                seal("Delivery bench"),
                seal(CONTACT["message"]),
                count,
            ),
        )
        self.sink.kept = []
        start = time.perf_counter()
        for pk, task_id in rows:
            self.celery.send_task(
                "email_service.tasks.send_email_task", args=[str(pk)], queue=self.queue, task_id=task_id
            )
        published = time.perf_counter() - start
        deadline = time.monotonic() + 600
        while True:
            [(sent,)] = self._sql(
                f"SELECT count(*) FROM {TABLE} WHERE message_id LIKE '<bench-%%' AND status = 'SENT'"
            )
            if sent == count:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {sent} of {count} delivery rows reached SENT")
            self.processes.check()
            time.sleep(0.05)
        service_seconds = time.perf_counter() - start
        mails, self.sink.kept = self.sink.kept, None
        if len(mails) != count:
            raise RuntimeError(f"the sink got {len(mails)} mails for {count} rows")
        # The messages of the rows other tasks took are still queued: let the worker skip them
        # first, so the baseline runs on an idle machine as the service's run began.
        self._wait_idle()
        path = self.run_dir / "mails.pickle"
        path.write_bytes(pickle.dumps(mails))
        loop = subprocess.run(
            [
                sys.executable,
                str(ROOT / "bench" / "smtp_loop.py"),
                "127.0.0.1",
                str(self.smtp.port),
                str(path),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        loop_seconds = float(loop.stdout.strip())
        return {
            "mails": count,
            "service_seconds": service_seconds,
            "publish_seconds": published,
            "service_per_s": count / service_seconds,
            "smtplib_seconds": loop_seconds,
            "smtplib_per_s": count / loop_seconds,
            "ratio": loop_seconds / service_seconds,
        }

    # --- 4: attachment memory ------------------------------------------------------------------
    def memory(self):
        web = children(self.processes.running["web"].pid)
        workers = children(self.processes.running["worker"].pid)
        if not web or not workers:
            raise RuntimeError("no gunicorn or Celery pool processes found")
        # Warm every process first: a process meeting its first upload pages in code and tables it
        # keeps (libmagic, the content checks, AES-GCM), a one-off cost that is no copy of the file.
        # Smaller files, over FILE_UPLOAD_MAX_MEMORY_SIZE so they take the measured path (a
        # temporary file); enough of them that each gunicorn process almost surely gets one.
        self._upload_and_wait(WARM_UP_SIZE, WARM_UP_FILES)
        idle = reset_peak(web + workers)
        self._upload_and_wait(FILE_SIZE, self.args.files)

        def worst(pids):
            pid = max(pids, key=lambda p: peak_rss(p) - idle[p])
            return {
                "idle_mb": idle[pid] / MB,
                "peak_mb": peak_rss(pid) / MB,
                "over_idle_mb": (peak_rss(pid) - idle[pid]) / MB,
                "ratio": (peak_rss(pid) - idle[pid]) / FILE_SIZE,
            }

        return {
            "file_mb": FILE_SIZE / MB,
            "files": self.args.files,
            "web": worst(web),
            "worker": worst(workers),
        }

    def _upload_and_wait(self, size, count):
        """Post `count` files of `size` bytes as contact forms and wait until each is SENT."""
        ids = []
        for number in range(count):
            content = pdf_of(size)
            response = requests.post(
                f"{self.base}/api/email/emails/",
                data=CONTACT,
                files={"file_attached": (f"scan{number}.pdf", content)},
                timeout=60,
            )
            if response.status_code != 201:
                raise RuntimeError(f"upload answered {response.status_code}: {response.text[:300]}")
            ids.append(response.json()["email_request_id"])
        deadline = time.monotonic() + 120
        while self._sql(
            f"SELECT count(*) FROM {TABLE} WHERE id = ANY(%s::uuid[]) AND status = 'SENT'", (ids,)
        )[0][0] < len(ids):
            if time.monotonic() > deadline:
                raise RuntimeError("the uploaded files were not all sent within 120 s")
            time.sleep(0.1)

    # --- 5: query scaling ----------------------------------------------------------------------
    def queries(self):
        self._wait_idle()
        self._sql(f"TRUNCATE {TABLE}, email_service_emailattempt")
        session = requests.Session()
        curve = {}
        current = 0
        for size in self.args.sizes:
            seed(self.db, current + 1, size, self.sealed)
            current = size
            # What autovacuum would have done by the time a table reached this size.
            self.db.execute(f"VACUUM ANALYZE {TABLE}")
            detail_ids = [row[0] for row in self._sql(f"SELECT id FROM {TABLE} ORDER BY random() LIMIT 50")]
            endpoints = {
                "list_sent": lambda _: "/api/email/emails/?status=SENT",
                "list_pending": lambda _: "/api/email/emails/?status=PENDING",
                "detail": lambda i, ids=detail_ids: f"/api/email/emails/{ids[i % len(ids)]}/",
                "statistics": lambda _: "/api/email/emails/statistics/",
            }
            curve[size] = {
                name: time_get(session, self.base, path, self.args.repeats)
                for name, path in endpoints.items()
            }
        return curve


def seed(db, first, last, seal):
    """Insert rows `first`..`last` in one statement: 90% SENT, 5% FAILED, 3% CANCELLED, 2% PENDING
    waiting for a retry tomorrow (so no worker picks them up), created over the last 90 days. Their
    personal fields are sealed by `seal` (one value for all rows: each read decrypts it all the same)."""
    db.execute(
        f"""INSERT INTO {TABLE} (id, full_name, email, email_index, email_domain_index, phone, job_profession,
            subject, message, file_attached, attachment_name, attachment_content_type, status, error_message,
            retry_count, max_retries, manual_retries, celery_task_id, message_id, next_attempt_at,
            dispatched_at, claimed_by, confirmation_error, created_at, updated_at, sent_at,
            captcha_unverified, virus_scan, kind)
        SELECT gen_random_uuid(), %s, %s, md5((g %% 50000)::text) || md5(g::text),
            md5('example.org') || md5(''), '', '', %s, %s, '', '', '', s.status, '', 0, 3, 0,
            '', '', CASE WHEN s.status = 'PENDING' THEN now() + interval '1 day' ELSE s.created END,
            s.created, '', '', s.created, s.created,
            CASE WHEN s.status = 'SENT' THEN s.created + interval '1 second' * (1 + g %% 30) END,
            false, '', 'REQUEST'
        FROM generate_series(%s::int, %s::int) AS g,
        LATERAL (SELECT now() - interval '90 days' * random() AS created,
                        CASE WHEN g %% 100 < 90 THEN 'SENT' WHEN g %% 100 < 95 THEN 'FAILED'
                             WHEN g %% 100 < 98 THEN 'CANCELLED' ELSE 'PENDING' END AS status) AS s""",
        (
            seal("Seeded Person"),
            seal("seeded@example.org"),
            seal("Seeded row"),
            seal("A seeded message for the query benchmark."),
            first,
            last,
        ),
    )


def time_get(session, base, path_for, repeats):
    """p50 and p95 milliseconds of `repeats` sequential GETs after three unmeasured ones."""
    times = []
    for i in range(repeats + 3):
        path = path_for(i)
        start = time.perf_counter()
        response = session.get(base + path, timeout=60)
        elapsed = time.perf_counter() - start
        if response.status_code != 200:
            raise RuntimeError(f"GET {path} answered {response.status_code}: {response.text[:300]}")
        if i >= 3:
            times.append(elapsed * 1000)
    times.sort()
    return {"p50_ms": statistics.median(times), "p95_ms": times[int(0.95 * (len(times) - 1))]}


UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def parse_wrk(output):
    """Requests per second, p50/p99 latency in ms and error counts from `wrk --latency` output."""

    def number(pattern):
        found = re.search(pattern, output)
        return found and found.groups()

    rps = float(number(r"Requests/sec:\s+([\d.]+)")[0])
    latency = {}
    for percent in ("50", "99"):
        value, unit = number(rf"\n\s+{percent}%\s+([\d.]+)(us|ms|s)\b")
        latency[percent] = float(value) * UNITS[unit]
    requests_done = int(number(r"(\d+) requests in")[0])
    non_2xx = int((number(r"Non-2xx or 3xx responses: (\d+)") or ["0"])[0])
    socket_errors = sum(
        map(int, number(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)") or [0])
    )
    if requests_done == 0 or non_2xx or socket_errors > requests_done // 100:
        raise RuntimeError(f"wrk saw errors:\n{output}")
    return {
        "rps": rps,
        "p50_ms": latency["50"],
        "p99_ms": latency["99"],
        "requests": requests_done,
        "non_2xx": non_2xx,
        "socket_errors": socket_errors,
    }


def merge_runs(runs):
    return {key: statistics.mean(run[key] for run in runs) for key in ("rps", "p50_ms", "p99_ms")}


def met(value):
    return "yes" if value else "**no**"


def table(results):
    """The Markdown table of every figure, its baseline, the ratio and the goal."""
    lines = [
        "| measurement | service | baseline | ratio | goal | met |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in MEASUREMENTS:
        if name in results and name in ROWS:
            lines.extend(ROWS[name](results[name]))
    return "\n".join(lines)


def _accept_rows(accept):
    svc, base = accept["service"], accept["baseline"]
    return [
        (
            f"| 1. accept, POST JSON req/s (p50 / p99 ms) | {svc['rps']:.0f} ({svc['p50_ms']:.1f} / "
            f"{svc['p99_ms']:.1f}) | {base['rps']:.0f} ({base['p50_ms']:.1f} / {base['p99_ms']:.1f}) | "
            f"{accept['ratio']:.2f} | >= 0.7 | {met(accept['ratio'] >= 0.7)} |"
        )
    ] + (
        [
            f"| 1. (for comparison) the same with the worker paused: web path alone | {accept['web_only']['rps']:.0f} "
            f"({accept['web_only']['p50_ms']:.1f} / {accept['web_only']['p99_ms']:.1f}) | {base['rps']:.0f} | "
            f"{accept['web_only_ratio']:.2f} | - | - |"
        ]
        if "web_only" in accept
        else []
    )


def _non_blocking_rows(nb):
    return [
        (
            f"| 2. POST p99 ms, sink 2 s/mail vs fast sink (req/s) | {nb['slow']['p99_ms']:.1f} "
            f"({nb['slow']['rps']:.0f}) | {nb['fast']['p99_ms']:.1f} ({nb['fast']['rps']:.0f}) | "
            f"{nb['ratio']:.2f} | <= 1.2 | {met(nb['ratio'] <= 1.2)} |"
        )
    ]


def _delivery_rows(d):
    return [
        (
            f"| 3. delivery, {d['mails']} PENDING -> SENT, mails/s | {d['service_per_s']:.0f} | "
            f"{d['smtplib_per_s']:.0f} (smtplib, one connection) | {d['ratio']:.2f} | >= 0.5 | "
            f"{met(d['ratio'] >= 0.5)} |"
        )
    ]


def _memory_rows(m):
    lines = []
    for name, limit in (("web", 1), ("worker", 4)):
        part = m[name]
        lines.append(
            f"| 4. {name} peak RSS over idle, {m['files']} x {m['file_mb']:.0f} MB files | "
            f"{part['over_idle_mb']:.1f} MB (peak {part['peak_mb']:.0f}) | {part['idle_mb']:.0f} MB idle, "
            f"file {m['file_mb']:.0f} MB | {part['ratio']:.2f}x file | < {limit}x | "
            f"{met(part['ratio'] < limit)} |"
        )
    return lines


def _query_rows(curve):
    lines = []
    sizes = list(curve)
    largest, smallest = sizes[-1], sizes[0]
    for name in curve[largest]:
        points = " / ".join(f"{curve[size][name]['p50_ms']:.1f}" for size in sizes)
        low, high = curve[smallest][name]["p50_ms"], curve[largest][name]["p50_ms"]
        lines.append(
            f"| 5. {name} p50 ms at {' / '.join(human(s) for s in sizes)} rows | {points} | "
            f"{low:.1f} at {human(smallest)} | {high / low:.2f} | "
            f"< 50 ms, flat | {met(high < 50 and is_flat(low, high))} |"
        )
    return lines


def is_flat(low, high):
    """Flat: at most twice the smallest table's time (or 5 ms more, below which timing noise rules)."""
    return high <= max(2 * low, low + 5)


ROWS = {
    "accept": _accept_rows,
    "non_blocking": _non_blocking_rows,
    "delivery": _delivery_rows,
    "memory": _memory_rows,
    "queries": _query_rows,
}


def human(n):
    return f"{n // 1_000_000}M" if n >= 1_000_000 else f"{n // 1000}k"


def machine():
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    memory = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
    return f"{os.cpu_count()} x {model}, {memory // 1024} GB RAM, {platform.system()} {platform.release()}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run in under two minutes")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results.json"))
    parser.add_argument("--web-workers", type=int, default=WEB_WORKERS)
    parser.add_argument("--web-threads", type=int, default=WEB_THREADS)
    parser.add_argument("--worker-concurrency", type=int, default=WORKER_CONCURRENCY)
    parser.add_argument("--worker-prefetch", type=int, default=WORKER_PREFETCH)
    parser.add_argument("--connections", type=int, default=16, help="wrk's fixed concurrency")
    parser.add_argument("--only", help="comma-separated subset of the measurements, for tuning")
    parser.add_argument(
        "--peers",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run django-post_office and django-mailer side by side (default: not under --quick)",
    )
    parser.add_argument("--forms", type=int, help="forms per system in the side-by-side rows")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.rounds, args.deliveries, args.files = 3, 1, 300, 1
        args.sizes, args.repeats = [1_000, 10_000], 10
    else:
        args.seconds, args.rounds, args.deliveries, args.files = 10, 2, 2000, 3
        args.sizes, args.repeats = [10_000, 100_000, 1_000_000], 30

    if args.peers is None:
        args.peers = not args.quick
    if args.forms is None:
        args.forms = 2000 if args.peers and not args.quick else 200
    chosen = set(args.only.split(",")) if args.only else set(MEASUREMENTS)
    if args.quick and not args.peers and not args.only:
        # The smoke run keeps its two minutes: no side-by-side rows unless --peers asks for them.
        chosen.discard("side_by_side")
    if chosen - set(MEASUREMENTS):
        parser.error(f"--only takes some of {','.join(MEASUREMENTS)}")

    def wanted(name):
        return name in chosen

    bench = Bench(args)
    # A killed run must still stop its stack: left running, its workers would claim the next run's
    # rows (same scratch database) and send them to a sink that is gone.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    results = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "mode": "quick" if args.quick else "full",
        "settings": {
            key: getattr(args, key)
            for key in (
                "web_workers",
                "web_threads",
                "worker_concurrency",
                "worker_prefetch",
                "connections",
                "seconds",
            )
        },
        "goals": GOALS,
    }
    try:
        bench.start()

        def step(name):
            print(f"[{time.monotonic() - started:5.0f}s] {name}", file=sys.stderr, flush=True)

        if wanted("accept"):
            step("1. accept rate")
            results["accept"] = bench.accept()
        if wanted("non_blocking"):
            step("2. non-blocking")
            fast = results["accept"]["runs"]["service"][-1] if "accept" in results else bench.fast_post()
            results["non_blocking"] = bench.non_blocking(fast)
        if wanted("delivery"):
            step("3. delivery rate")
            results["delivery"] = bench.delivery()
        if wanted("side_by_side"):
            step("side by side: the service, its peers and the limits")
            results["side_by_side"] = SideBySide(bench, args.forms, peers=args.peers).run(step)
            bench.start_worker()
            bench._wait_for_worker()
        if wanted("memory"):
            step("4. attachment memory")
            results["memory"] = bench.memory()
        if wanted("queries"):
            step("5. query scaling")
            results["queries"] = bench.queries()
    finally:
        bench.stop()
    results["seconds"] = round(time.monotonic() - started, 1)
    Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    print(
        f"{results['mode']} run, {results['date']}, {results['machine']}, {results['seconds']} s; gunicorn "
        f"{args.web_workers} workers x {args.web_threads} threads, Celery concurrency {args.worker_concurrency} "
        f"prefetch {args.worker_prefetch}, wrk {args.connections} connections\n"
    )
    print(table(results))
    if "side_by_side" in results:
        print()
        print(side_by_side_table(results["side_by_side"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
