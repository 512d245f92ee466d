"""Tests of the side-by-side bench's own arithmetic: CPU over a process tree, and the table.

In email_service/tests, since the suite is where tests live; they import the bench as a package.
"""

import os
import subprocess
import sys

from bench.side_by_side import Sender, side_by_side_table
from bench.stack import ROOT, tree_cpu

# A child that forks a grandchild which burns `seconds` of its own CPU time and is reaped, then
# waits for a line on stdin: its tree's CPU must include the reaped grandchild's.
BURN = """
import os, sys, time
def burn(seconds):
    while time.process_time() < seconds:
        pass
pid = os.fork()
if pid == 0:
    burn(float(sys.argv[1]))
    os._exit(0)
os.waitpid(pid, 0)
print("reaped", flush=True)
if sys.argv[2] == "wait":
    sys.stdin.readline()
"""


def test_tree_cpu_counts_a_reaped_grandchild():
    child = subprocess.Popen(
        [sys.executable, "-c", BURN, "0.3", "wait"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "reaped"
        # /proc counts whole clock ticks, each of its four counters rounded down: allow one each.
        assert tree_cpu(child.pid) >= 0.3 - 4 / os.sysconf("SC_CLK_TCK")
    finally:
        child.communicate("\n")


def test_one_shot_sender_keeps_its_children_cpu_after_exit(tmp_path):
    sender = Sender("burn", [sys.executable, "-c", BURN, "0.3", "exit"], None, tmp_path, one_shot=True)
    sender.start()
    sender.wait_exit(60)
    assert sender.process.returncode == 0
    assert sender.cpu() >= 0.3
    assert (tmp_path / "sender-burn.log").read_text().strip() == "reaped"


def _system(rps, per_s, cpu, drain, lost=0, duplicated=0, lock=False, accept=True):
    result = {
        "delivery": {
            "per_s_from_start": per_s,
            "per_s_first_to_last": per_s * 1.1,
            "cpu_ms_per_mail": cpu,
            "drain_s": drain,
        },
        "kill": {
            "lost": lost,
            "duplicated": duplicated,
            "recovered_s": 3.0,
            "still_queued": lost,
            "restart_stopped_by_lock": lock,
        },
    }
    if accept:
        result["accept"] = {"rps": rps, "p99_ms": 50.0}
    return result


def test_table_has_every_system_the_limits_and_the_ratios():
    results = {
        "limits": {
            "accept": {"rps": 1000.0, "p99_ms": 20.0},
            "delivery": {"per_s_from_start": 800.0, "per_s_first_to_last": 900.0, "cpu_ms_per_mail": 0.5},
        },
        "this service": _system(400.0, 300.0, 2.0, 1.0),
        "post_office, Celery task": _system(200.0, 100.0, 4.0, 0.1, duplicated=7),
        "post_office, send_queued_mail -p 4": _system(None, 150.0, 5.0, 0.2, accept=False),
        "django-mailer, send_mail": _system(250.0, 50.0, 8.0, 0.1, lost=9, lock=True),
    }
    lines = side_by_side_table(results).splitlines()
    assert lines[0].startswith("| | this service | post_office, Celery task |")
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in lines[2:]}
    accept = rows["accept, POST JSON req/s (p99 ms), no sender running"]
    # service / best peer (250), / django-mailer (250), / the bare insert view (1000).
    assert accept[:5] == [
        "400 (50 ms)",
        "200 (50 ms)",
        "(as above)",
        "250 (50 ms)",
        "1000 (20 ms), bare insert view",
    ]
    assert accept[5:] == ["1.60", "1.60", "0.40 |"]
    delivery = rows["delivery, mails/s from sender start"]
    assert delivery[5:] == ["2.00", "6.00", "0.38 |"]
    # For CPU the best peer is the cheapest one.
    assert rows["sender CPU ms per delivered mail (startup subtracted)"][5:] == ["0.50", "0.25", "4.00 |"]
    kill = rows["after `kill -9` of the sender at half"]
    assert kill[0] == "0 lost, 0 duplicated, all sent 3 s after the restart"
    assert kill[1].startswith("0 lost, 7 duplicated")
    assert kill[3] == "9 lost, 0 duplicated (restart stopped by the killed run's lock file)"


def test_peer_projects_are_importable_from_their_directory():
    assert (ROOT / "bench" / "peers" / "manage.py").exists()
    assert (ROOT / "bench" / "peers" / "contact" / "migrations" / "0001_initial.py").exists()
