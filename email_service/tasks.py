"""Celery tasks: each fetches by id or runs one service function."""

import contextlib
import functools
import gc
import logging
import os
import threading

import billiard.util
import celery.worker.loops
from celery import shared_task
from celery.signals import (
    celeryd_init,
    worker_before_create_process,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
)
from django.conf import settings
from django.core.cache import caches
from django.core.exceptions import ValidationError
from django.db import connections

from . import conf, delivery, outbox, retention, sending

logger = logging.getLogger(__name__)


@shared_task(
    bind=True,
    name="email_service.tasks.send_email_task",
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
)
def send_email_task(self, email_request_id, carry_on=False, wake=None):
    """Send this email request if it can be claimed, and with it other due ones, a batch at a time."""
    try:
        # The time limits came with the message, from the publisher's settings; the claim must
        # outlive the hard one whatever this worker's own settings say.
        hard_limit = (self.request.timelimit or (None, None))[0] or 0
        statuses = sending.send_due_emails(
            email_request_id,
            worker=f"{self.request.hostname or 'worker'}:{os.getpid()}",
            lease=max(conf.lease_seconds(), hard_limit + 10),
            carry_on=carry_on,
            wake=wake,
        )
    except ValidationError:
        logger.error("Malformed email request id %r dropped", email_request_id)
        return None
    return statuses.get(str(email_request_id))


@shared_task(name="email_service.tasks.dispatch_due_emails", ignore_result=True)
def dispatch_due_emails():
    """Publish due PENDING rows whose message was lost or never sent (the outbox relay)."""
    return outbox.dispatch_due()


@shared_task(name="email_service.tasks.purge_old_emails", ignore_result=True)
def purge_old_emails():
    """Delete rows and files past the retention period."""
    return retention.purge_expired()


@worker_process_shutdown.connect
def _close_smtp_connection(**kwargs):
    delivery.close_connection()


@worker_init.connect
def _load_ahead(**kwargs):
    # Once, in the main process before its pool forks: what each pool process would otherwise
    # load on its first task, so that all of them start with it: the cache backend's modules
    # (redis and django-redis, about 0.27 s of imports), the mail templates compiled. A backend
    # made and dropped only to import them: it opens no connection until it is used.
    try:
        for alias in settings.CACHES:
            caches.create_connection(alias)
        delivery.load_ahead()
    except Exception as exc:
        # Each process loads them itself then, on its first mail, as it would have anyway.
        logger.warning("Could not load the cache backend and mail templates ahead: %s", exc)
    # Each pool process sets its parent-death signal through billiard, which uses cffi when it is
    # installed (cryptography brings it): cffi parses the C declaration with pycparser, whose
    # import and parser tables cost each process about 25 ms; made once here, they are shared.
    with contextlib.suppress(OSError):
        billiard.util.get_pdeathsig()


@worker_init.connect
def _first_read_without_wait(**kwargs):
    # Celery's event loop (celery.worker.loops.asynloop) starts with one read of the consumer's
    # connection that waits up to 0.1 s for a frame, and only after it hands the tasks received
    # so far to the pool processes. By then consume() has read every message the prefetch limit
    # lets in, so on a queue with work waiting no frame comes: each start lost the whole 0.1 s
    # before its first mail. The read takes what is already there without waiting, as kombu's
    # own event-loop reader does (drain_events(timeout=0)); what comes later the loop reads.
    quick_drain = getattr(celery.worker.loops, "_quick_drain", None)
    if quick_drain is not None and not isinstance(quick_drain, functools.partial):
        celery.worker.loops._quick_drain = functools.partial(quick_drain, timeout=0)


@worker_before_create_process.connect
def _freeze_before_fork(**kwargs):
    # The prefork pool runs a full gc.collect() before it forks each process (celery#2927): over
    # the 100,000 objects Django's setup leaves that is about 50 ms per process, in the main
    # process, before the node can consume. Frozen, they are skipped by that collection and by the
    # children's own, which then leave the pages they share with the main process untouched
    # (the gc module's advice for a process that forks without exec).
    gc.freeze()


# This worker node's name (celery@host), known in the main process before its pool forks; and
# whether the node has started, so that a pool process forked after that knows it replaces one.
_node = None
_node_started = False


@celeryd_init.connect
def _remember_node(sender=None, **kwargs):
    global _node
    _node = sender


@worker_ready.connect
def _reclaim_on_start(sender=None, **kwargs):
    # The main process, once the node is up: rows its crashed predecessor held go back now.
    global _node_started
    _node_started = True
    _reclaim_from_gone_processes(getattr(sender, "hostname", None) or _node)


@worker_process_init.connect
def _reclaim_on_pool_start(**kwargs):
    # A pool process started in place of a killed one: its predecessor's row goes back now. The
    # pool's first processes start before the node is ready, whose own reclaim covers them.
    if _node_started:
        _reclaim_from_gone_processes(_node)


def _reclaim_from_gone_processes(node):
    """Reclaim in the background: a slow database must not hold up the start (a pool process
    that takes over 4 s to start is given up on)."""

    def reclaim():
        try:
            outbox.reclaim_from_gone_processes(node)
        except Exception as exc:
            # Their leases still bring them back; the worker runs either way.
            logger.warning("Could not reclaim the rows of gone processes of %s: %s", node, exc)
        finally:
            # A process forked later must not inherit this thread's database connection.
            connections.close_all()

    # A thread of its own, not the publishing executor: a pool process forked from this one
    # would inherit an executor whose thread it does not have.
    threading.Thread(target=reclaim, name="email-reclaim", daemon=True).start()


@shared_task(name="email_service.tasks.purge_audit_trail", ignore_result=True)
def purge_audit_trail():
    """Delete audit entries past AUDIT_RETENTION_DAYS."""
    from . import audit

    return audit.purge_audit()
