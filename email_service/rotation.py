"""Key rotation: bring every encrypted value and stored file under the first encryption key.

Every model of the app with encrypted fields is covered, found through the app registry, so a
model added later (replies, for one) is rotated without a change here. Rows are read as stored,
in raw SQL, a batch at a time in primary-key order; each batch commits on its own and a value
already under the first key is left alone, so an interrupted run is resumed by running it again.
A row is only rewritten if its stored value is still the one read: a worker's write meanwhile is
under the first key already. A value under a key no longer configured cannot be read by anyone:
it is counted and reported with its request's id, never skipped silently.
"""

import logging
from collections import Counter
from dataclasses import dataclass, field

from django.apps import apps
from django.core.files.storage import default_storage
from django.db import connection, transaction

from .audit import AuditAction, AuditChannel, record
from .encryption import DecryptionError, decrypt_text, encrypt_text, is_encrypted, key_index
from .fields import EncryptedTextField
from .models import EmailAttempt

logger = logging.getLogger(__name__)

BATCH_SIZE = 500
# Every count the report gives, zeros included, so that its shape never depends on the data.
VALUE_OUTCOMES = ("current", "rotated", "sealed", "empty", "unknown_key", "unreadable", "changed_meanwhile")
FILE_OUTCOMES = ("current", "rotated", "sealed", "unknown_key", "unreadable", "missing", "changed_meanwhile")


@dataclass
class RotationReport:
    """What a rotation did: counts per kind of outcome, and the request ids it could not rotate."""

    counts: Counter = field(default_factory=Counter)
    unknown_key: dict = field(default_factory=dict)  # request id -> {"model.field", ...}
    unreadable: dict = field(default_factory=dict)  # request id -> {"model.field: why", ...}

    def note_unknown(self, request_id, where):
        self.unknown_key.setdefault(str(request_id), set()).add(where)

    def note_unreadable(self, request_id, where):
        self.unreadable.setdefault(str(request_id), set()).add(where)

    def as_detail(self):
        """Return the counts, for the audit entry (which holds counts only)."""
        keys = {
            *self.counts,
            *(f"values_{outcome}" for outcome in VALUE_OUTCOMES),
            *(f"files_{outcome}" for outcome in FILE_OUTCOMES),
        }
        return {key: self.counts[key] for key in sorted(keys)}

    def affected_requests(self):
        """Return the ids of the requests with a value or file this run could not rotate."""
        return sorted({*self.unknown_key, *self.unreadable})


def encrypted_models():
    """Return (model, encrypted fields) for every model of the app that has encrypted fields."""
    found = []
    for model in apps.get_app_config("email_service").get_models():
        if model._meta.proxy:
            continue  # its rows are its concrete model's (replies are EmailRequest rows)
        fields = [f for f in model._meta.concrete_fields if isinstance(f, EncryptedTextField)]
        if fields:
            found.append((model, fields))
    return found


def _request_column(model):
    """The column that names the request a row belongs to: an attempt's request; a request's (a
    reply's too) own id."""
    return EmailAttempt._meta.get_field("request").column if model is EmailAttempt else model._meta.pk.column


def rotate_keys(*, batch_size=BATCH_SIZE, progress=None):
    """Re-encrypt every value and file under the first key, record it in the audit trail, and
    return a RotationReport."""
    report = RotationReport()
    for model, fields in encrypted_models():
        _rotate_rows(model, fields, report, batch_size, progress)
    _rotate_files(report, batch_size, progress)
    record(
        AuditAction.ROTATE_KEYS,
        channel=AuditChannel.COMMAND,
        request_ids=report.affected_requests(),
        detail=report.as_detail(),
    )
    return report


def _rotated_value(value):
    """Return (outcome, new stored value or None) for one stored value."""
    if not value:
        return "empty", None
    if not is_encrypted(value):
        # Written before encryption was switched on (or by hand): seal it now.
        return "sealed", encrypt_text(value)
    position = key_index(value)
    if position == 0:
        return "current", None
    if position is None:
        return "unknown_key", None
    return "rotated", encrypt_text(decrypt_text(value))


def _rotate_rows(model, fields, report, batch_size, progress):
    quote = connection.ops.quote_name
    table, pk_column = quote(model._meta.db_table), model._meta.pk.column
    request_column = _request_column(model)
    columns = list(dict.fromkeys([pk_column, request_column, *(f.column for f in fields)]))
    selected = ", ".join(quote(column) for column in columns)
    label = model._meta.model_name
    last = None
    while True:
        where, params = ("", []) if last is None else (f" WHERE {quote(pk_column)} > %s", [last])
        with connection.cursor() as cursor:
            cursor.execute(
                f"SELECT {selected} FROM {table}{where} ORDER BY {quote(pk_column)} LIMIT %s",
                [*params, batch_size],
            )
            rows = [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]
        if not rows:
            return
        with transaction.atomic():
            for row in rows:
                _rotate_row(table, pk_column, row, fields, report, label, request_column)
        last = rows[-1][pk_column]
        report.counts[f"{label}_rows"] += len(rows)
        if progress:
            progress(f"{label}: {report.counts[f'{label}_rows']} rows read")


def _rotate_row(table, pk_column, row, fields, report, label, request_column):
    quote = connection.ops.quote_name
    changes = {}
    for model_field in fields:
        value = row[model_field.column]
        where = f"{label}.{model_field.name}"
        try:
            outcome, new_value = _rotated_value(value)
        except DecryptionError as exc:
            outcome, new_value = "unreadable", None
            report.note_unreadable(row[request_column], f"{where}: {exc}")
        if outcome == "unknown_key":
            report.note_unknown(row[request_column], where)
        report.counts[f"values_{outcome}"] += 1
        if new_value is not None:
            changes[model_field.column] = (value, new_value)
    if not changes:
        return
    assignments = ", ".join(f"{quote(column)} = %s" for column in changes)
    guards = " AND ".join(f"{quote(column)} = %s" for column in changes)
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {table} SET {assignments} WHERE {quote(pk_column)} = %s AND {guards}",
            [*(new for _, new in changes.values()), row[pk_column], *(old for old, _ in changes.values())],
        )
        if cursor.rowcount != 1:
            # Written meanwhile, so already under the first key; the counts above overstate by these.
            report.counts["values_changed_meanwhile"] += len(changes)


def _rotate_files(report, batch_size, progress):
    request_model = apps.get_model("email_service", "EmailRequest")
    with_file = (
        request_model.objects.exclude(file_attached="").order_by("pk").values_list("pk", "file_attached")
    )
    last = None
    while True:
        batch = list((with_file if last is None else with_file.filter(pk__gt=last))[:batch_size])
        if not batch:
            return
        for pk, name in batch:
            report.counts[f"files_{_rotate_file(request_model, pk, name, report)}"] += 1
        last = batch[-1][0]
        if progress:
            progress(f"files: {sum(v for k, v in report.counts.items() if k.startswith('files_'))} read")


def _rotate_file(request_model, pk, name, report):
    try:
        if not default_storage.is_sealed(name):
            copy = default_storage.seal(name)
            outcome = "sealed"
        else:
            position = default_storage.key_index(name)
            if position == 0:
                return "current"
            if position is None:
                report.note_unknown(pk, "emailrequest.file_attached")
                return "unknown_key"
            copy = default_storage.reencrypt(name)
            outcome = "rotated"
    except FileNotFoundError:
        report.note_unreadable(pk, "emailrequest.file_attached: missing from storage")
        return "missing"
    except DecryptionError as exc:
        report.note_unreadable(pk, f"emailrequest.file_attached: {exc}")
        return "unreadable"
    # The row points at the copy only if it still points at the original; then the original goes.
    if request_model.objects.filter(pk=pk, file_attached=name).update(file_attached=copy):
        default_storage.delete(name)
        return outcome
    default_storage.delete(copy)
    return "changed_meanwhile"
