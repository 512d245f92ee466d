"""Retention: delete rows past their time and attachment files that no row refers to."""

from datetime import timedelta

from django.core.files.storage import default_storage
from django.utils import timezone

from . import audit, conf, honeypot
from .audit import AuditAction, AuditChannel
from .models import EmailRequest
from .storage import ATTACHMENT_FOLDER


def purge_expired(*, dry_run=False):
    """Delete final rows past the retention period and orphaned attachment files; return counts."""
    expired = EmailRequest.objects.expired()
    rows = expired.count()
    files = expired.with_attachment().count()
    deleted = []
    if not dry_run:
        # Deleting row by row fires post_delete, which removes each file from storage.
        for email_request in expired.iterator():
            # Checked again row by row: staff may have requeued it since the count.
            for row in EmailRequest.objects.expired().filter(pk=email_request.pk):
                deleted.append(row.pk)
                row.delete()
    orphans = purge_orphan_files(dry_run=dry_run)
    if deleted or (orphans and not dry_run):
        # The rows go, their entries stay: the trail names which requests the purge removed.
        audit.record(
            AuditAction.PURGE,
            channel=AuditChannel.COMMAND,
            request_ids=deleted,
            detail={"requests": len(deleted), "orphan_files": orphans},
        )
    if not dry_run:
        # The honeypot's stand-ins go when real rows of their age would: read as SENT, then gone.
        honeypot.purge_decoys(timezone.now() - timedelta(days=conf.retention_days()))
    return {"rows": rows, "files": files, "orphans": orphans}


def purge_orphan_files(*, dry_run=False, root=ATTACHMENT_FOLDER, min_age=timedelta(hours=1)):
    """Delete attachment files no row refers to; return how many.

    A file younger than `min_age` is kept: its row may still be in an uncommitted transaction.
    """
    known = set(EmailRequest.objects.with_attachment().values_list("file_attached", flat=True))
    cutoff = timezone.now() - min_age
    orphans = [
        name
        for name in _walk_storage(root)
        if name not in known and default_storage.get_modified_time(name) < cutoff
    ]
    if not dry_run:
        for name in orphans:
            default_storage.delete(name)
    return len(orphans)


def _walk_storage(path):
    try:
        directories, files = default_storage.listdir(path)
    except FileNotFoundError:
        return
    for name in files:
        yield f"{path}/{name}"
    for directory in directories:
        yield from _walk_storage(f"{path}/{directory}")
