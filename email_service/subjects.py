"""Subject access and erasure: everything kept about one person, as a zip, and its removal.

A person is found by their address, written however they wrote it (case, a +tag, Gmail's dots).
Their requests come with their attempts, their replies (the EmailReply model, when installed)
and their files, read through the storage API so that sealed files come out decrypted. Both
operations leave an entry on the audit trail with the ids concerned and counts, never the address.
"""

import json
import os
import shutil
import zipfile
from dataclasses import dataclass, field

from django.core.serializers.json import DjangoJSONEncoder
from django.db import models, transaction
from django.db.models.fields.files import FieldFile
from django.utils import timezone

from . import audit
from .audit import AuditAction
from .models import EmailAttempt, EmailReply, EmailRequest
from .storage import clean_filename

# The name of the JSON document inside an export, beside its `files/` folder.
DOCUMENT_NAME = "subject.json"
# What an export or erasure counts, in the order it reports them.
COUNT_KEYS = ("requests", "attempts", "replies", "files")


@dataclass
class SubjectRecords:
    """What is kept about one person: their requests, and for each its attempts, replies and files."""

    requests: list
    attempts: dict = field(default_factory=dict)
    replies: dict = field(default_factory=dict)

    @property
    def request_ids(self):
        return [row.pk for row in self.requests]

    def files(self, row):
        """Return (archive name, stored file) for each file kept for `row` and its replies."""
        found = [(_file_name(row, row.file_attached, row.attachment_name), row.file_attached)]
        for reply in self.replies.get(row.pk, []):
            for stored in _stored_files(reply):
                found.append((_file_name(row, stored, prefix=f"replies/{reply.pk}"), stored))
        return [(name, stored) for name, stored in found if stored]

    def counts(self):
        """Return how many requests, attempts, replies and files there are, for the trail and output."""
        counts = (
            len(self.requests),
            sum(len(rows) for rows in self.attempts.values()),
            sum(len(rows) for rows in self.replies.values()),
            sum(len(self.files(row)) for row in self.requests),
        )
        return dict(zip(COUNT_KEYS, counts, strict=True))


def requests_of(address):
    """Return a QuerySet of every request whose address reaches the same mailbox as `address`."""
    # Through the keyed address index: the address columns are encrypted.
    return EmailRequest.objects.for_address(address)


def find_subject(address, *, lock=False):
    """Collect everything kept about the person at `address`."""
    rows = requests_of(address).order_by("created_at")
    requests = list(rows.select_for_update() if lock else rows)
    records = SubjectRecords(requests=requests)
    pks = records.request_ids
    for attempt in EmailAttempt.objects.filter(request__in=pks).order_by("number"):
        records.attempts.setdefault(attempt.request_id, []).append(attempt)
    for reply in EmailReply.objects.filter(parent__in=pks).order_by("created_at", "pk"):
        records.replies.setdefault(reply.parent_id, []).append(reply)
    return records


def export_subject(address, out, *, channel, request=None):
    """Write everything kept about the person at `address` as a zip to the file `out`; return counts."""
    records = find_subject(address)
    document = {
        "exported_at": timezone.now(),
        "address": address,
        "requests": [_request_document(records, row) for row in records.requests],
    }
    missing = 0
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for row in records.requests:
            for name, stored in records.files(row):
                missing += not _copy_into(archive, name, stored)
        document["missing_files"] = missing
        archive.writestr(DOCUMENT_NAME, json.dumps(document, cls=DjangoJSONEncoder, indent=2))
    counts = {**records.counts(), "missing_files": missing}
    audit.record(
        AuditAction.SUBJECT_EXPORT,
        request=request,
        channel=channel,
        request_ids=records.request_ids,
        detail=counts,
    )
    return counts


def export_subject_to_path(address, path, *, channel, request=None):
    """Export to a new file at `path`, readable by its owner only; refuse to replace one."""
    if os.path.exists(path):
        raise FileExistsError(path)
    partial = f"{path}.partial"
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as out:
            counts = export_subject(address, out, channel=channel, request=request)
        os.replace(partial, path)
    except BaseException:
        if os.path.exists(partial):
            os.remove(partial)
        raise
    return counts


def erase_subject(address, *, channel, request=None, dry_run=False):
    """Remove the person's requests, attempts, replies and files; return what went (or would go).

    A dry run is a lookup of the person and is on the trail as a search.
    """
    with transaction.atomic():
        records = find_subject(address, lock=not dry_run)
        counts = records.counts()
        if not dry_run:
            files = [stored for row in records.requests for _, stored in records.files(row)]
            EmailReply.objects.filter(parent__in=records.request_ids).delete()
            EmailRequest.objects.filter(pk__in=records.request_ids).delete()
            # Only once the rows are gone for good: a rolled-back erasure keeps its files.
            for stored in files:
                transaction.on_commit(_deleter(stored.storage, stored.name))
        audit.record(
            AuditAction.SEARCH if dry_run else AuditAction.SUBJECT_ERASE,
            request=request,
            channel=channel,
            request_ids=records.request_ids,
            detail=counts,
        )
    return records, counts


def _request_document(records, row):
    return {
        **_fields(row),
        "attempts": [_fields(attempt) for attempt in records.attempts.get(row.pk, [])],
        "replies": [_fields(reply) for reply in records.replies.get(row.pk, [])],
        "files": [name for name, _ in records.files(row)],
    }


def _fields(obj):
    """Return every stored column of `obj` by field name, files by their stored name."""
    values = {}
    for model_field in obj._meta.concrete_fields:
        value = model_field.value_from_object(obj)
        values[model_field.attname] = (value.name or None) if isinstance(value, FieldFile) else value
    return values


def _stored_files(obj):
    return [getattr(obj, f.name) for f in obj._meta.concrete_fields if isinstance(f, models.FileField)]


def _file_name(row, stored, original="", prefix=""):
    if not stored:
        return ""
    name = clean_filename(original or os.path.basename(stored.name))
    return "/".join(part for part in ("files", str(row.pk), prefix, name) if part)


def _copy_into(archive, name, stored):
    """Copy one stored file into the archive; return False if storage no longer has it."""
    try:
        source = stored.storage.open(stored.name, "rb")
    except FileNotFoundError:
        return False
    with source, archive.open(name, "w", force_zip64=True) as target:
        shutil.copyfileobj(source, target, 1024 * 1024)
    return True


def _deleter(storage, name):
    return lambda: storage.delete(name)
