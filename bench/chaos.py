"""Chaos run: submissions keep coming while the broker goes away and a worker is killed.

Starts its own stack on this machine (gunicorn, two Celery workers, beat, an aiosmtpd sink)
against PostgreSQL and RabbitMQ. Every process reaches RabbitMQ through a TCP proxy owned by this
script, so "the broker goes away" means: every broker connection is cut and new ones are refused
for the outage, exactly as an application sees a broker restart, without touching the real
RabbitMQ that other users of the machine share.

Prints accepted, delivered, lost, duplicated and the longest delay. Expected: lost 0.

    .venv/bin/python bench/chaos.py [--submissions 300] [--outage 30]
"""

import argparse
import asyncio
import json
import os
import signal
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from email import message_from_bytes
from email.policy import default as default_policy
from pathlib import Path

import requests
from aiosmtpd.controller import Controller

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stack import (
    PG,
    ROOT,
    SERVICE_CELERY,
    SERVICE_WORKER_FLAGS,
    Processes,
    create_database,
    free_port,
    manage,
)
from medcor_backend2.keys import generate_key

RABBIT_HOST, RABBIT_PORT = "127.0.0.1", 5672


class BrokerProxy:
    """A TCP proxy to RabbitMQ that can cut every connection and refuse new ones for a while."""

    def __init__(self, port):
        self.port = port
        self.loop = asyncio.new_event_loop()
        self.server = None
        self.writers = set()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self._call(self._listen())

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    async def _listen(self):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _handle(self, reader, writer):
        try:
            up_reader, up_writer = await asyncio.open_connection(RABBIT_HOST, RABBIT_PORT)
        except OSError:
            writer.close()
            return
        self.writers.update((writer, up_writer))

        async def pipe(source, sink):
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self.writers.difference_update((writer, up_writer))

    async def _cut(self):
        self.server.close()
        await self.server.wait_closed()
        for writer in list(self.writers):
            writer.transport.abort()
        self.writers.clear()

    def go_away(self):
        self._call(self._cut())

    def come_back(self):
        self._call(self._listen())


class Sink:
    """SMTP handler that records when each request's mail arrived, and how many times."""

    def __init__(self):
        self.arrivals = {}
        self.lock = threading.Lock()

    async def handle_DATA(self, server, session, envelope):
        headers = message_from_bytes(envelope.original_content, policy=default_policy)
        with self.lock:
            self.arrivals.setdefault(headers["X-Email-Request-ID"], []).append(time.time())
        return "250 OK"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--submissions", type=int, default=300)
    parser.add_argument("--rate", type=float, default=5.0, help="submissions per second")
    parser.add_argument("--outage", type=float, default=30.0, help="seconds without a broker")
    parser.add_argument("--outage-at", type=float, default=10.0)
    parser.add_argument("--kill-at", type=float, default=20.0)
    parser.add_argument("--deadline", type=float, default=240.0, help="seconds to wait for delivery")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    run_dir = ROOT / "var" / f"chaos-{uuid.uuid4().hex[:6]}"
    run_dir.mkdir(parents=True)
    database = "medcor_chaos"
    create_database(database)
    proxy_port, web_port = free_port(), free_port()
    proxy = BrokerProxy(proxy_port)
    sink = Sink()
    smtp = Controller(sink, hostname="127.0.0.1", port=free_port())
    smtp.start()

    env = dict(os.environ)
    env.update(
        DJANGO_SECRET_KEY="chaos-run",
        AUDIT_HMAC_KEY="chaos-run",
        MEDCOR_ENCRYPTION_KEYS=generate_key(),
        MEDCOR_INDEX_KEY=generate_key(),
        DJANGO_ALLOWED_HOSTS="127.0.0.1",
        DATABASE_URL=f"{PG}/{database}",
        CELERY_BROKER_URL=f"amqp://guest:guest@127.0.0.1:{proxy_port}//",
        CELERY_TASK_DEFAULT_QUEUE=f"chaos-{uuid.uuid4().hex[:6]}",
        MEDCOR_VAR_DIR=str(run_dir),
        MEDIA_ROOT=str(run_dir / "media"),
        EMAIL_HOST="127.0.0.1",
        EMAIL_PORT=str(smtp.port),
        EMAIL_USE_TLS="false",
        EMAIL_TIMEOUT="5",
        EMAIL_SEND_CONFIRMATION="false",
        EMAIL_RETRY_DELAY="2",
        EMAIL_RETRY_BACKOFF_MAX="10",
        EMAIL_MAX_RETRIES="5",
        EMAIL_DISPATCH_INTERVAL="2",
        EMAIL_DISPATCH_STALE_AFTER="10",
        EMAIL_CLAIM_LEASE="20",
        EMAIL_SEND_TIME_LIMIT="15",
        RATELIMIT_ENABLE="false",
        LOG_LEVEL="WARNING",
    )
    env.pop("REDIS_URL", None)
    manage(env, "migrate", "--noinput")

    processes = Processes(run_dir, env)
    celery = [sys.executable, *SERVICE_CELERY]
    processes.spawn(
        "web",
        sys.executable,
        "-m",
        "gunicorn",
        "medcor_backend2.wsgi:application",
        "--bind",
        f"127.0.0.1:{web_port}",
        "--workers",
        "2",
        "--threads",
        "4",
    )
    processes.spawn(
        "worker1", *celery, "worker", *SERVICE_WORKER_FLAGS, "--concurrency=2", "--hostname=chaos1@%h"
    )
    processes.spawn(
        "worker2", *celery, "worker", *SERVICE_WORKER_FLAGS, "--concurrency=2", "--hostname=chaos2@%h"
    )
    processes.spawn("beat", *celery, "beat", f"--schedule={run_dir / 'beat-schedule'}")
    url = f"http://127.0.0.1:{web_port}/api/email/emails/"
    try:
        for _ in range(120):
            try:
                if requests.get(f"{url}statistics/", timeout=5).ok:
                    break
            except requests.RequestException:
                time.sleep(0.5)
        time.sleep(3)  # let the workers connect
        accepted, posted_at, latencies, refused = {}, {}, [], []
        start = time.monotonic()

        def submit(number):
            at = time.time()
            t0 = time.monotonic()
            try:
                response = requests.post(
                    url,
                    timeout=10,
                    json={
                        "full_name": f"Chaos {number}",
                        "email": f"chaos{number}@example.org",
                        "subject": "Chaos run",
                        "message": "Are you still there?",
                    },
                )
            except requests.RequestException as exc:
                refused.append(repr(exc))
                return
            latencies.append(time.monotonic() - t0)
            if response.status_code == 201:
                pk = response.json()["email_request_id"]
                accepted[pk] = number
                posted_at[pk] = at
            else:
                refused.append(response.status_code)

        events = []
        with ThreadPoolExecutor(max_workers=8) as pool:
            outage_started = killed = outage_over = False
            for number in range(args.submissions):
                now = time.monotonic() - start
                if not outage_started and now >= args.outage_at:
                    proxy.go_away()
                    outage_started = True
                    events.append(f"{now:5.1f}s broker gone")
                if not killed and now >= args.kill_at:
                    os.killpg(processes.running["worker1"].pid, signal.SIGKILL)
                    killed = True
                    events.append(f"{now:5.1f}s worker chaos1 killed (SIGKILL)")
                if outage_started and not outage_over and now >= args.outage_at + args.outage:
                    proxy.come_back()
                    outage_over = True
                    events.append(f"{now:5.1f}s broker back")
                pool.submit(submit, number)
                time.sleep(max(0.0, (number + 1) / args.rate - (time.monotonic() - start)))
        if not outage_over:
            time.sleep(max(0.0, args.outage_at + args.outage - (time.monotonic() - start)))
            proxy.come_back()
            events.append(f"{time.monotonic() - start:5.1f}s broker back")

        deadline = time.monotonic() + args.deadline
        while time.monotonic() < deadline and not set(accepted) <= set(sink.arrivals):
            time.sleep(1)
        time.sleep(5)  # late duplicates, if any, arrive now

        delivered = [pk for pk in accepted if pk in sink.arrivals]
        duplicated = sum(len(sink.arrivals[pk]) - 1 for pk in delivered)
        delays = [sink.arrivals[pk][0] - posted_at[pk] for pk in delivered]
        latencies.sort()
        figures = {
            "submitted": args.submissions,
            "accepted": len(accepted),
            "refused": len(refused),
            "delivered": len(delivered),
            "lost": len(accepted) - len(delivered),
            "duplicated": duplicated,
            "longest_delay_s": round(max(delays), 1) if delays else None,
            "post_p50_ms": round(1000 * latencies[len(latencies) // 2], 1) if latencies else None,
            "post_max_ms": round(1000 * latencies[-1], 1) if latencies else None,
            "outage_s": args.outage,
            "events": events,
        }
    finally:
        processes.stop()
        smtp.stop()
    for line in figures["events"]:
        print(line)
    for key in (
        "submitted",
        "accepted",
        "refused",
        "delivered",
        "lost",
        "duplicated",
        "longest_delay_s",
        "post_p50_ms",
        "post_max_ms",
    ):
        print(f"{key:>16}: {figures[key]}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0 if figures["lost"] == 0 and figures["refused"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
