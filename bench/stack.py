"""Start the service's own processes on this machine for a benchmark, and look at them while they run.

The same approach as chaos.py: a scratch PostgreSQL database, a private queue on the real broker,
an in-process aiosmtpd sink, and gunicorn and Celery as subprocesses with environment overrides.
"""

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import requests

ROOT = Path(__file__).resolve().parent.parent
PG = os.environ.get("BENCH_POSTGRES", "postgres://postgres@127.0.0.1:5432")
# The marker a side-by-side run puts in each form's subject, to tell every mail apart at the sink.
TOKEN = re.compile(rb"sbs-\d+-\d+")
# The service's worker as docker-compose.yml and Procfile.dev start it: without Celery's start-up
# sync with other workers (mingle, about 1 s) and its worker-to-worker events (gossip), neither of
# which the service uses.
SERVICE_WORKER_FLAGS = ("--without-mingle", "--without-gossip")
# `celery` itself, as they start it: without Django's system checks at every worker start (about
# 0.35 s here), which `manage.py migrate` runs at each deploy before the worker starts.
SERVICE_CELERY = ("-m", "celery", "-A", "medcor_backend2", "--skip-checks")


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def create_database(name):
    """Drop and recreate a scratch database."""
    with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


class Sink:
    """aiosmtpd handler: counts mails, can take `delay` seconds per mail, can keep what it got."""

    def __init__(self):
        self.count = 0
        self.delay = 0.0
        self.kept = None
        self.seen = None
        self.lock = threading.Lock()

    async def handle_DATA(self, server, session, envelope):
        if self.delay:
            # Asleep, not busy: the sink stays able to talk to every other connection meanwhile.
            await asyncio.sleep(self.delay)
        with self.lock:
            self.count += 1
            if self.kept is not None:
                self.kept.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
            if self.seen is not None:
                found = TOKEN.search(envelope.original_content)
                self.seen.append((time.monotonic(), found and found.group().decode()))
        return "250 OK"


class Processes:
    """Subprocesses in their own sessions, with logs in `run_dir`, stopped together."""

    def __init__(self, run_dir, env):
        self.run_dir = run_dir
        self.env = env
        self.running = {}

    def spawn(self, name, *command, env=None):
        log = open(self.run_dir / f"{name}.log", "ab")
        self.running[name] = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**self.env, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self.running[name]

    def check(self):
        """Raise if any process has exited."""
        for name, process in self.running.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}; see {self.run_dir / name}.log")

    def stop(self, *names):
        """Stop the named processes (all when none is named): TERM, then KILL after 15 s."""
        chosen = {name: self.running.pop(name) for name in (names or list(self.running))}
        for process in chosen.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in chosen.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def manage(env, *args):
    """Run a management command, raising with its output if it fails."""
    done = subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def wait_http(url, processes, timeout=60):
    """Wait until `url` answers 2xx; raise if it does not in time or a process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        processes.check()
        try:
            if requests.get(url, timeout=5).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


def children(pid):
    """Pids whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # The command name is in parentheses and may hold spaces: the ppid follows the last ')'.
                if int((entry / "stat").read_text().rpartition(")")[2].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def descendants(pid):
    """`pid` and every process below it."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children(current))
    return found


def tree_cpu(pid):
    """CPU seconds of `pid`'s process tree: each live process's own and its reaped children's."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for each in descendants(pid):
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue  # exited meanwhile: its time is in its parent's cutime once reaped
        # utime, stime, cutime, cstime are fields 14-17 of proc(5); [2:] of what follows the ')'.
        total += sum(int(value) for value in fields[11:15])
    return total / ticks


def _status_kb(pid, field):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for pid {pid}")


def reset_peak(pids):
    """Reset each process's peak RSS (VmHWM) to its current RSS; return the current RSS in bytes."""
    idle = {}
    for pid in pids:
        # "5" resets the peak resident set size (Linux >= 4.0, see proc(5)).
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        idle[pid] = _status_kb(pid, "VmRSS") * 1024
    return idle


def peak_rss(pid):
    """The process's peak RSS in bytes since the last reset_peak."""
    return _status_kb(pid, "VmHWM") * 1024
