"""The service, django-post_office and django-mailer doing the same job, and the physical limits.

Each system takes the same contact form over HTTP under the same gunicorn settings, stores it and
queues one mail to support, which its own sender delivers to the bench's sink. The peers are the
small projects under bench/peers/, run from their own virtualenv (var/peers-venv) with the same
PostgreSQL server (a database each) and broker. Per system, in this order:

1. accept: wrk POSTs the form for the run's seconds with no sender running, three times, every
   system in turn before the other phases (the median run counts);
2. startup: the sender started on an empty queue (its CPU until ready, or until it exits);
3. delivery: N forms posted with the sender stopped, then the sender started; mails/s from its start
   and from the first to the last mail, CPU per mail over its process tree minus the startup, and
   the time from the last mail to an empty queue;
4. kill: N more forms, the sender started, `kill -9` of its whole process group at half, started
   again; what the sink got twice, and what it still had not got when the restarted sender gave up.
"""

import hashlib
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg
import requests

from bench.stack import PG, ROOT, SERVICE_CELERY, SERVICE_WORKER_FLAGS, Processes, create_database, tree_cpu

PEERS = ROOT / "bench" / "peers"
VENV = ROOT / "var" / "peers-venv"
PEER_PYTHON = VENV / "bin" / "python"
# How long a restarted sender has to deliver what the killed one left: past the service's claim
# lease (EMAIL_TIMEOUT 10 s in the bench: lease 140 s) plus a relay interval. A one-shot sender
# that has exited will send nothing more, so its wait ends there.
RECOVERY_SECONDS = 180
# Accept runs per system, taken in turns (the median counts): see SideBySide.accept_rounds. Five:
# with three, one machine's slow spells (about 10 s each) fell on two of one system's rounds.
ACCEPT_ROUNDS = 5
# The service's rows (as `r`) of the current phase's forms still to send, the phase's start as the
# one parameter. Told by their creation time: other measurements leave rows parked a day ahead, and
# the subject that carries each form's marker is encrypted in its column, where no LIKE finds it.
PHASE_ROWS_LEFT = (
    "r.status IN ('PENDING', 'PROCESSING') AND r.created_at >= coalesce(%s, '-infinity'::timestamptz)"
)


def ensure_venv():
    """Create var/peers-venv from bench/peers/requirements.txt unless it already holds exactly that."""
    wanted = hashlib.sha256((PEERS / "requirements.txt").read_bytes()).hexdigest()
    stamp = VENV / ".requirements-sha256"
    if stamp.exists() and stamp.read_text() == wanted and PEER_PYTHON.exists():
        return
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
    subprocess.run(
        [str(PEER_PYTHON), "-m", "pip", "install", "--quiet", "-r", str(PEERS / "requirements.txt")],
        check=True,
    )
    stamp.write_text(wanted)


class Sender:
    """A sender process in its own session: started, sampled from /proc, killed or waited for."""

    def __init__(self, name, command, env, log_dir, one_shot):
        self.name, self.command, self.env, self.log_dir, self.one_shot = name, command, env, log_dir, one_shot
        self.process = None
        self.rusage_cpu = None

    def start(self):
        log = open(self.log_dir / f"sender-{self.name}.log", "ab")
        self.process = subprocess.Popen(
            self.command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.rusage_cpu = None
        return time.monotonic()

    def exited(self):
        """Whether a one-shot sender has finished; reaps it with wait4 to keep its tree's CPU."""
        if self.rusage_cpu is not None:
            return True
        pid, status, usage = os.wait4(self.process.pid, os.WNOHANG)
        if pid == 0:
            return False
        # wait4 counts the process and every child it reaped (post_office's pool processes).
        self.rusage_cpu = usage.ru_utime + usage.ru_stime
        self.process.returncode = os.waitstatus_to_exitcode(status)
        return True

    def cpu(self):
        """CPU seconds of the sender's tree so far (all of it, once a one-shot sender has exited)."""
        if self.rusage_cpu is not None:
            return self.rusage_cpu
        return tree_cpu(self.process.pid)

    def wait_exit(self, timeout):
        deadline = time.monotonic() + timeout
        while not self.exited():
            if time.monotonic() > deadline:
                raise RuntimeError(f"sender {self.name} did not finish within {timeout} s")
            time.sleep(0.05)

    def kill(self):
        """SIGKILL the whole process group, as a crash of the machine's sender would."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self._reap()

    def stop(self):
        if self.process and self.rusage_cpu is None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def _reap(self):
        if self.rusage_cpu is None:
            self.process.wait()


class System:
    """One system under test: where it takes forms, how its sender runs, how its queue looks."""

    label = ""
    path = "/contact/"
    # When the current phase began posting its forms (the database's clock).
    posted_since = None

    def __init__(self, bench):
        self.bench = bench

    base = property(lambda self: self.bench.base)

    def make_sender(self):
        raise NotImplementedError

    def wait_ready(self, sender):
        """Wait until a long-running sender is consuming (one-shot senders need no wait)."""

    def queued(self):
        """Forms whose mail is still to be sent."""
        raise NotImplementedError

    def is_drained(self, sender):
        return self.queued() == 0 and (not sender.one_shot or sender.exited())

    def left(self):
        """What queued() counts, where the system can say more than a number."""
        return None

    def discard(self):
        """Drop everything queued, so the next phase starts from an empty queue."""
        raise NotImplementedError


class Service(System):
    label = "this service"
    path = "/api/email/emails/"

    def make_sender(self):
        bench, args = self.bench, self.bench.args
        command = [sys.executable, *SERVICE_CELERY, "worker", *SERVICE_WORKER_FLAGS]
        command += [
            f"--concurrency={args.worker_concurrency}",
            f"--prefetch-multiplier={args.worker_prefetch}",
        ]
        command.append(f"--hostname=sbs-{bench.queue}@%h")
        return Sender("service", command, bench.processes.env, bench.run_dir, one_shot=False)

    def wait_ready(self, sender):
        _wait_consumer(self.bench, self.bench.queue, sender)

    def queued(self):
        [(count,)] = self.bench._sql(
            f"SELECT count(*) FROM email_service_emailrequest r WHERE {PHASE_ROWS_LEFT}", (self.posted_since,)
        )
        return count + self.bench._queue_depth()[0]

    def left(self):
        """What queued() counts, described: the rows (state, claimer, attempts) and the ready messages."""
        rows = self.bench._sql(
            "SELECT r.status, r.claimed_by, r.retry_count, extract(epoch FROM r.next_attempt_at - now()), "
            "r.dispatched_at IS NOT NULL, array_agg(a.outcome ORDER BY a.number) FILTER (WHERE a.id IS NOT NULL) "
            "FROM email_service_emailrequest r LEFT JOIN email_service_emailattempt a ON a.request_id = r.id "
            f"WHERE {PHASE_ROWS_LEFT} GROUP BY r.id LIMIT 10",
            (self.posted_since,),
        )
        keys = ("status", "claimed_by", "retry_count", "due_in_s", "dispatched", "attempts")
        return {
            "rows": [dict(zip(keys, row, strict=True)) for row in rows],
            "ready": self.bench._queue_depth()[0],
        }

    def discard(self):
        self.bench._sql(
            "UPDATE email_service_emailrequest SET status = 'CANCELLED' WHERE status IN ('PENDING', 'PROCESSING')"
        )
        _purge(self.bench.queue, self.bench.broker)
        # The purged messages held the service's wake slots: free them, as their tasks would have,
        # or the next phase's rows would count on messages that are gone (and wait for the relay).
        import redis

        from bench.run import REDIS

        client = redis.Redis.from_url(REDIS)
        try:
            stale = list(client.scan_iter(match="*email-service:send-wake:*"))
            if stale:
                client.delete(*stale)
        finally:
            client.close()


class Peer(System):
    """A project under bench/peers/, served by its own gunicorn from the peers' virtualenv."""

    project = ""
    table = ""

    def __init__(self, bench):
        super().__init__(bench)
        self.database = f"{bench.database}_{self.project}"
        self.queue = f"{bench.queue}-{self.project}"
        self.port = None
        self.db = None
        self.var = bench.run_dir / self.project
        self.var.mkdir(exist_ok=True)

    base = property(lambda self: f"http://127.0.0.1:{self.port}")

    def env(self):
        env = {k: v for k, v in os.environ.items() if k not in ("DJANGO_SETTINGS_MODULE", "DATABASE_URL")}
        env.update(
            DJANGO_SETTINGS_MODULE=f"{self.project}_site.settings",
            PYTHONPATH=str(PEERS),
            PEER_DB_NAME=self.database,
            PEER_VAR_DIR=str(self.var),
            EMAIL_HOST="127.0.0.1",
            EMAIL_PORT=str(self.bench.smtp.port),
            CELERY_BROKER_URL=self.bench.broker,
            CELERY_TASK_DEFAULT_QUEUE=self.queue,
            LOG_LEVEL="WARNING",
        )
        return env

    def start(self, processes, port):
        create_database(self.database)
        subprocess.run(
            [str(PEER_PYTHON), str(PEERS / "manage.py"), "migrate", "--noinput", "-v0"],
            cwd=ROOT,
            env=self.env(),
            check=True,
        )
        self.port = port
        args = self.bench.args
        processes.spawn(
            f"web-{self.project}",
            str(PEER_PYTHON),
            "-m",
            "gunicorn",
            f"{self.project}_site.wsgi:application",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            str(args.web_workers),
            "--threads",
            str(args.web_threads),
            # As deploy/gunicorn.conf.py runs the service: a listening socket per worker.
            "--reuse-port",
            env=self.env(),
        )
        self.db = psycopg.connect(f"{PG}/{self.database}", autocommit=True)

    def stop(self):
        if self.db:
            self.db.close()

    def manage(self, *args):
        return [str(PEER_PYTHON), str(PEERS / "manage.py"), *args]

    def sql(self, query):
        cursor = self.db.execute(query)
        return cursor.fetchall() if cursor.description else []


class PostOfficeCelery(Peer):
    label = "post_office, Celery task"
    project = "post_office"

    def make_sender(self):
        args = self.bench.args
        command = [str(PEER_PYTHON), "-m", "celery", "-A", "post_office_site", "worker"]
        command += [
            f"--concurrency={args.worker_concurrency}",
            f"--prefetch-multiplier={args.worker_prefetch}",
        ]
        command.append(f"--hostname=sbs-{self.queue}@%h")
        return Sender("post_office-celery", command, self.env(), self.bench.run_dir, one_shot=False)

    def wait_ready(self, sender):
        _wait_consumer(self.bench, self.queue, sender)

    def queued(self):
        # post_office's statuses: 0 sent, 1 failed, 2 queued, 3 requeued.
        [(count,)] = self.sql(
            "SELECT count(*) FROM post_office_email WHERE status IN (2, 3) OR status IS NULL"
        )
        messages = _queue_ready(self.bench.broker, self.queue)
        return count + messages

    def discard(self):
        self.sql("DELETE FROM post_office_email WHERE status IN (2, 3) OR status IS NULL")
        _purge(self.queue, self.bench.broker)
        for lock in self.var.glob("*.lock"):
            lock.unlink()


class PostOfficeCommand(PostOfficeCelery):
    label = "post_office, send_queued_mail -p 4"

    def make_sender(self):
        command = self.manage("send_queued_mail", "--processes", "4")
        return Sender("post_office-command", command, self.env(), self.bench.run_dir, one_shot=True)

    def wait_ready(self, sender):
        pass

    def queued(self):
        # The Celery messages its web still publishes are not this sender's queue: only the rows are.
        [(count,)] = self.sql(
            "SELECT count(*) FROM post_office_email WHERE status IN (2, 3) OR status IS NULL"
        )
        return count


class Mailer(Peer):
    label = "django-mailer, send_mail"
    project = "mailer"

    def make_sender(self):
        return Sender("mailer", self.manage("send_mail"), self.env(), self.bench.run_dir, one_shot=True)

    def queued(self):
        # django-mailer deletes a message once sent (and logs it in mailer_messagelog).
        [(count,)] = self.sql("SELECT count(*) FROM mailer_message")
        return count

    def discard(self):
        self.sql("DELETE FROM mailer_message")
        for lock in self.var.glob("send_mail*"):
            lock.unlink()


def _queue_ready(broker, queue):
    from amqp.exceptions import NotFound
    from kombu import Connection

    with Connection(broker) as conn:
        try:
            return conn.default_channel.queue_declare(queue, passive=True)[1]
        except NotFound:
            return 0


def _purge(queue, broker):
    from amqp.exceptions import NotFound
    from kombu import Connection

    with Connection(broker) as conn:
        try:
            conn.default_channel.queue_purge(queue)
        except NotFound:
            pass


def _delete_queue(queue, broker):
    from kombu import Connection

    with Connection(broker) as conn:
        # Celery declares it durable: it would outlive the run otherwise, as the service's would.
        conn.default_channel.queue_delete(queue)


def _has_lock_file(system):
    return isinstance(system, Peer) and any(system.var.glob("*.lock"))


def _wait_listening(system, processes, timeout=60):
    """Wait until the peer's gunicorn answers at all (a GET of the POST-only view is a 405)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        processes.check()
        try:
            requests.get(system.base + system.path, timeout=5)
            return
        except requests.RequestException:
            time.sleep(0.3)
    raise RuntimeError(f"{system.label} did not answer within {timeout} s")


def _wait_consumer(bench, queue, sender, timeout=60):
    from amqp.exceptions import NotFound
    from kombu import Connection

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sender.process.poll() is not None:
            raise RuntimeError(f"sender {sender.name} exited with {sender.process.returncode}")
        with Connection(bench.broker) as conn:
            try:
                if conn.default_channel.queue_declare(queue, passive=True)[2] >= 1:
                    return
            except NotFound:
                pass
        time.sleep(0.2)
    raise RuntimeError(f"sender {sender.name} did not start consuming within {timeout} s")


class SideBySide:
    """Run every phase for every system against the running bench stack."""

    def __init__(self, bench, count, peers=True):
        self.bench = bench
        self.count = count
        self.round = 0
        self.systems = [Service(bench)]
        self.peer_processes = None
        if peers:
            ensure_venv()
            office, mailer = PostOfficeCelery(bench), Mailer(bench)
            self.systems += [office, PostOfficeCommand(bench), mailer]
            self._office = office
            self.peer_processes = Processes(bench.run_dir, bench.processes.env)

    def run(self, step):
        from bench.stack import free_port

        results = {}
        bench = self.bench
        for system in self.systems[1:]:
            if isinstance(system, PostOfficeCommand):
                system.port, system.db = self._office.port, self._office.db
                continue
            system.start(self.peer_processes, free_port())
            _wait_listening(system, self.peer_processes)
        try:
            bench.processes.stop("worker")
            step("   side by side: accept, every system in turn")
            accepted = self.accept_rounds()
            results["limits"] = {"accept": accepted.pop("limits")}
            for system in self.systems:
                step(f"   side by side: {system.label}")
                results[system.label] = self.measure(system)
                if system.label in accepted:
                    results[system.label]["accept"] = accepted[system.label]
            results["limits"]["delivery"] = self.smtplib_limit()
        finally:
            if self.peer_processes is not None:
                self.peer_processes.stop()
            for system in self.systems[1:]:
                if isinstance(system, Peer) and not isinstance(system, PostOfficeCommand):
                    system.stop()
                    _delete_queue(system.queue, bench.broker)
        return results

    # --- the phases ----------------------------------------------------------------------------
    def accept_rounds(self):
        """Accept figures per system: the median round of ACCEPT_ROUNDS, the systems taking turns.

        The machine is shared, so its speed drifts over minutes: one run per system, minutes apart,
        once put the bare insert view below a peer. Each round runs every system (the bare insert
        view as "limits") in an order shifted by one from the round before.
        """
        rounds = 1 if self.bench.args.quick else ACCEPT_ROUNDS
        # post_office's command shares the web of its Celery run.
        turns = [("limits", System(self.bench), "/bench/baseline/")] + [
            (system.label, system, system.path)
            for system in self.systems
            if not isinstance(system, PostOfficeCommand)
        ]
        runs = {label: [] for label, _, _ in turns}
        for number in range(rounds):
            shift = number % len(turns)
            for label, system, path in turns[shift:] + turns[:shift]:
                runs[label].append(self.accept(system, path))
        accepted = {}
        for label, figures in runs.items():
            median = sorted(figures, key=lambda run: run["rps"])[len(figures) // 2]
            accepted[label] = {**median, "rounds_rps": [round(run["rps"], 1) for run in figures]}
        return accepted

    def measure(self, system):
        result = {}
        system.discard()
        result["startup_cpu_s"] = self.startup(system)
        result["delivery"] = self.delivery(system, result["startup_cpu_s"])
        result["kill"] = self.kill(system)
        system.discard()
        return result

    def accept(self, system, path):
        self.bench.wrk(path, 1, base=system.base)
        figures = self.bench.wrk(path, self.bench.args.seconds, base=system.base)
        if isinstance(system, (Service, Peer)):
            system.discard()
        return figures

    def startup(self, system):
        sender = system.make_sender()
        sender.start()
        try:
            if sender.one_shot:
                sender.wait_exit(60)
            else:
                system.wait_ready(sender)
                settle = tree_cpu(sender.process.pid)
                # Ready means consuming; let the last of its start-up finish before the reading.
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    time.sleep(0.3)
                    now = tree_cpu(sender.process.pid)
                    if now == settle:
                        break
                    settle = now
            return sender.cpu()
        finally:
            sender.stop()

    def post_forms(self, system):
        """POST `count` forms, each with its own subject marker; return the markers."""
        self.round += 1
        tokens = [f"sbs-{self.round}-{number}" for number in range(self.count)]
        # The service's subjects are sealed at rest: its count of what is left goes by this instead.
        system.posted_since = self.bench._sql("SELECT now()")[0][0]
        session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_maxsize=self.bench.args.connections)
        session.mount("http://", adapter)

        def post(token):
            body = {**self.bench.contact, "subject": token}
            response = session.post(system.base + system.path, json=body, timeout=30)
            if response.status_code != 201:
                raise RuntimeError(f"{system.label} answered {response.status_code}: {response.text[:200]}")

        with ThreadPoolExecutor(self.bench.args.connections) as pool:
            list(pool.map(post, tokens))
        return set(tokens)

    def delivery(self, system, startup_cpu):
        tokens = self.post_forms(system)
        sink = self.bench.sink
        sink.seen = []
        if isinstance(system, Service):
            sink.kept = []
        sender = system.make_sender()
        started = sender.start()
        try:
            got = self._wait_for(tokens, sender, deadline_s=600)
            if len(got["distinct"]) < len(tokens):
                raise RuntimeError(f"{system.label} delivered {len(got['distinct'])} of {len(tokens)}")
            last = got["last"]
            while not system.is_drained(sender):
                if time.monotonic() - last > 300:
                    raise RuntimeError(f"{system.label}'s queue did not empty within 300 s of its last mail")
                time.sleep(0.05)
            drained = time.monotonic()
            cpu = sender.cpu()
        finally:
            sender.stop()
            seen, sink.seen = sink.seen, None
        if isinstance(system, Service):
            self.service_mails, sink.kept = sink.kept, None
        ours = [at for at, token in seen if token in tokens]
        return {
            "mails": len(tokens),
            "per_s_from_start": len(tokens) / (last - started),
            "per_s_first_to_last": (len(tokens) - 1) / max(last - min(ours), 1e-6),
            "cpu_ms_per_mail": (cpu - startup_cpu) * 1000 / len(tokens),
            "cpu_s": cpu,
            "drain_s": drained - last,
            "duplicates": len(ours) - len({t for _, t in seen if t in tokens}),
        }

    def _wait_for(self, tokens, sender, deadline_s, stop_at=None, give_up=False):
        """Watch the sink until every token came or `stop_at` of them came; with `give_up`, until
        `deadline_s` passed or a one-shot sender exited, else raise at the deadline."""
        sink = self.bench.sink
        started = progress = time.monotonic()
        counted, distinct = 0, set()
        while True:
            with sink.lock:
                fresh = sink.seen[counted:]
            counted += len(fresh)
            for _, token in fresh:
                if token in tokens:
                    distinct.add(token)
            if fresh:
                progress = fresh[-1][0]
            now = time.monotonic()
            if len(distinct) == len(tokens) or (stop_at and len(distinct) >= stop_at):
                return {"distinct": distinct, "last": progress}
            if give_up and (
                now - started > deadline_s or (sender.one_shot and sender.exited() and not fresh)
            ):
                return {"distinct": distinct, "last": progress}
            if now - started > deadline_s:
                raise RuntimeError(f"{sender.name}: {len(distinct)} of {len(tokens)} mails in {deadline_s} s")
            if sender.one_shot and sender.exited() and not fresh:
                raise RuntimeError(f"{sender.name} exited with {len(distinct)} of {len(tokens)} mails sent")
            time.sleep(0.02)

    def kill(self, system):
        tokens = self.post_forms(system)
        sink = self.bench.sink
        sink.seen = []
        sender = system.make_sender()
        sender.start()
        try:
            self._wait_for(tokens, sender, deadline_s=600, stop_at=len(tokens) // 2)
            sender.kill()
            with sink.lock:
                at_kill = len({token for _, token in sink.seen if token in tokens})
            restarted = system.make_sender()
            restarted_at = restarted.start()
            try:
                got = self._wait_for(tokens, restarted, deadline_s=RECOVERY_SECONDS, give_up=True)
                # A one-shot sender that quit at once beside a lock file its killed run left behind.
                refused = restarted.one_shot and restarted.exited() and _has_lock_file(system)
                # The last mail may arrive before its row is marked sent (post_office marks a batch
                # at its end): give the sender a moment, so "still queued" counts only rows it left.
                settle = time.monotonic() + 10
                while not refused and system.queued() and time.monotonic() < settle:
                    time.sleep(0.1)
            finally:
                restarted.stop()
        finally:
            seen, sink.seen = sink.seen, None
        received = [token for _, token in seen if token in tokens]
        return {
            "mails": len(tokens),
            "sent_before_kill": at_kill,
            "duplicated": len(received) - len(set(received)),
            "lost": len(tokens) - len(got["distinct"]),
            "recovered_s": got["last"] - restarted_at,
            "still_queued": system.queued(),
            "left": system.left(),
            "restart_stopped_by_lock": bool(refused),
        }

    def smtplib_limit(self):
        """The service's own delivered mails sent again by smtplib over one connection, timed the same way."""
        import pickle

        path = self.bench.run_dir / "sbs-mails.pickle"
        empty = self.bench.run_dir / "sbs-empty.pickle"
        path.write_bytes(pickle.dumps(self.service_mails))
        empty.write_bytes(pickle.dumps([]))
        loop = [sys.executable, str(ROOT / "bench" / "smtp_loop.py"), "127.0.0.1", str(self.bench.smtp.port)]
        idle = Sender(
            "smtplib-empty", [*loop, str(empty)], os.environ.copy(), self.bench.run_dir, one_shot=True
        )
        idle.start()
        idle.wait_exit(60)
        sink = self.bench.sink
        sink.seen = []
        sender = Sender("smtplib", [*loop, str(path)], os.environ.copy(), self.bench.run_dir, one_shot=True)
        started = sender.start()
        sender.wait_exit(600)
        seen, sink.seen = sink.seen, None
        path.unlink()
        times = [at for at, _ in seen]
        count = len(self.service_mails)
        return {
            "mails": count,
            "per_s_from_start": count / (max(times) - started),
            "per_s_first_to_last": (count - 1) / (max(times) - min(times)),
            "cpu_ms_per_mail": (sender.cpu() - idle.cpu()) * 1000 / count,
        }


def _ratio(ours, theirs):
    return f"{ours / theirs:.2f}" if ours is not None and theirs else "-"


def side_by_side_table(results):
    """One Markdown table: a row per figure, a column per system and the limit, then the ratios."""
    labels = [label for label in results if label != "limits"]
    service, peers = labels[0], labels[1:]
    limits = results["limits"]

    def figure(label, phase, key):
        return results[label].get(phase, {}).get(key)

    def best(phase, key, pick=max):
        values = [figure(label, phase, key) for label in peers if figure(label, phase, key) is not None]
        return pick(values) if values else None

    def kill_cell(label):
        kill = results[label]["kill"]
        text = f"{kill['lost']} lost, {kill['duplicated']} duplicated"
        if not kill["lost"]:
            text += f", all sent {max(kill['recovered_s'], 0):.0f} s after the restart"
        if kill["restart_stopped_by_lock"]:
            text += " (restart stopped by the killed run's lock file)"
        elif kill["still_queued"]:
            text += f" ({kill['still_queued']} still queued)"
        return text

    rows = [
        (
            "accept, POST JSON req/s (p99 ms), no sender running",
            lambda label: (
                f"{figure(label, 'accept', 'rps'):.0f} ({figure(label, 'accept', 'p99_ms'):.0f} ms)"
                if figure(label, "accept", "rps")
                else "(as above)"
            ),
            f"{limits['accept']['rps']:.0f} ({limits['accept']['p99_ms']:.0f} ms), bare insert view",
            ("accept", "rps", max, limits["accept"]["rps"]),
        ),
        (
            "delivery, mails/s from sender start",
            lambda label: f"{figure(label, 'delivery', 'per_s_from_start'):.0f}",
            f"{limits['delivery']['per_s_from_start']:.0f}, smtplib loop",
            ("delivery", "per_s_from_start", max, limits["delivery"]["per_s_from_start"]),
        ),
        (
            "delivery, mails/s first to last mail",
            lambda label: f"{figure(label, 'delivery', 'per_s_first_to_last'):.0f}",
            f"{limits['delivery']['per_s_first_to_last']:.0f}",
            ("delivery", "per_s_first_to_last", max, limits["delivery"]["per_s_first_to_last"]),
        ),
        (
            "sender CPU ms per delivered mail (startup subtracted)",
            lambda label: f"{figure(label, 'delivery', 'cpu_ms_per_mail'):.1f}",
            f"{limits['delivery']['cpu_ms_per_mail']:.2f}",
            ("delivery", "cpu_ms_per_mail", min, limits["delivery"]["cpu_ms_per_mail"]),
        ),
        (
            "seconds from the last mail to an empty queue",
            lambda label: f"{figure(label, 'delivery', 'drain_s'):.1f}",
            "-",
            ("delivery", "drain_s", min, None),
        ),
        ("after `kill -9` of the sender at half", kill_cell, "-", None),
    ]
    mailer = next((label for label in peers if "mailer" in label), None)
    head = [service, *peers, "limit", "service / best peer", "service / django-mailer", "service / limit"]
    lines = ["| | " + " | ".join(head) + " |", "|" + " --- |" * (len(head) + 1)]
    for title, cell, limit, ratio in rows:
        cells = [cell(label) for label in [service, *peers]]
        if ratio:
            phase, key, pick, limit_value = ratio
            ours = figure(service, phase, key)
            ratios = [
                _ratio(ours, best(phase, key, pick)),
                _ratio(ours, figure(mailer, phase, key)) if mailer else "-",
                _ratio(ours, limit_value),
            ]
        else:
            ratios = ["-", "-", "-"]
        lines.append(f"| {title} | " + " | ".join([*cells, limit, *ratios]) + " |")
    return "\n".join(lines)
