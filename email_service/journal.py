"""Mails the SMTP server accepted whose outcome is not committed yet: a small file per sending process.

A worker killed between the server's 250 to DATA and the commit of its row's SENT leaves the row
PROCESSING, and reclaimed it would be sent again. So right after the 250 the sending process
writes the row's id and claim to its journal, and blanks it once the outcome is committed (one
record, written in place: no block of the file is allocated or freed per mail). The write goes
to the page cache: it outlives the process (kill -9, the OOM killer), not the machine. A worker
node started again on the same host, reclaiming the rows of its gone processes
(outbox.reclaim_from_gone_processes), records as SENT the rows their journals name instead of
sending them twice. What remains is the server's own time between the final dot and its reply
(RFC 1047), a crash of the machine itself, and a crash or failover of PostgreSQL that forgets a
SENT committed without waiting for its disk (conf.synchronous_outcomes), the journal blanked by
then: a mail caught in any of them still goes twice.
"""

import logging
import os
import re

from django.conf import settings

logger = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^\w.@-]")
# A record is two UUIDs, a space and a newline; blanked, the same number of spaces and a newline.
_BLANK = b" " * 73 + b"\n"


def journal_dir():
    return settings.VAR_DIR / "journal"


def journal_path(claimer):
    """The journal file of a claimer (`node:pid`, as rows' claimed_by names it)."""
    return journal_dir() / f"{_UNSAFE.sub('_', claimer)}.log"


class _Journal:
    """This process's journal, opened on its first accepted mail (again after a fork)."""

    def __init__(self):
        self.fd = None
        self.pid = None
        self.key = None
        self.failed = False

    def _file(self, claimer):
        # Known by the claimer's name and the directory: building the path costs more than the write.
        key = (claimer, settings.VAR_DIR)
        if self.fd is not None and self.pid == os.getpid() and self.key == key:
            return self.fd
        path = journal_path(claimer)
        if self.fd is not None and self.pid == os.getpid():
            os.close(self.fd)  # this process now claims under another name
        # A forked process's copy of its parent's descriptor is left open: it is the parent's too.
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.pid, self.key = os.getpid(), key
        return self.fd

    def record(self, claimer, pk, token):
        """Note that the server accepted the mail of row `pk` sent under claim `token`."""
        if self.failed:
            return
        try:
            os.pwrite(self._file(claimer), f"{pk} {token}\n".encode(), 0)
        except OSError as exc:
            # Without a journal a crash here sends the mail again, as it always did.
            self.failed = True
            logger.warning("Delivery journal unavailable, not kept by this process: %s", exc)

    def settle(self):
        """Forget what was noted: the outcome is committed."""
        if self.fd is None or self.pid != os.getpid() or self.failed:
            return
        try:
            os.pwrite(self.fd, _BLANK, 0)
        except OSError as exc:
            self.failed = True
            logger.warning("Delivery journal unavailable, not kept by this process: %s", exc)


_journal = _Journal()
record = _journal.record
settle = _journal.settle


def accepted(claimer):
    """The (row id, claim token) pairs a claimer's journal holds, as strings."""
    try:
        text = journal_path(claimer).read_text()
    except (FileNotFoundError, UnicodeDecodeError):
        return set()
    return {tuple(line.split()) for line in text.splitlines() if len(line.split()) == 2}


def forget(claimer):
    """Delete a gone claimer's journal once its rows have been dealt with."""
    try:
        journal_path(claimer).unlink()
    except FileNotFoundError:
        pass


def claimers_with_journals(node):
    """The claimer names of this node's processes that left a journal file."""
    prefix = _UNSAFE.sub("_", f"{node}:")
    try:
        names = os.listdir(journal_dir())
    except FileNotFoundError:
        return []
    return [
        f"{node}:{name[len(prefix) : -len('.log')]}"
        for name in names
        if name.startswith(prefix) and name.endswith(".log") and name[len(prefix) : -len(".log")].isdigit()
    ]
