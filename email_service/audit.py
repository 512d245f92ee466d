"""The audit trail: who read or changed what, when, from where; append-only and tamper-evident.

Each entry's `hmac` is HMAC-SHA256 under AUDIT_HMAC_KEY over a canonical serialisation of the
entry's content, which includes `prev_hmac`, the hmac of the entry appended before it. Changing,
removing or reordering an entry therefore breaks the chain at that point, and nobody without the
key can write a replacement that verifies. Because each entry stores the link it was chained to,
the oldest remaining entry anchors the chain after the retention purge deleted those before it.

An entry never holds personal data: an actor's username and id, the client IP, the ids of the
requests concerned, and in `detail` only counts.
"""

import hashlib
import hmac
import ipaddress
import json
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django.db import connections, models, router, transaction
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime
from django.utils.translation import gettext_lazy as _

from . import conf
from .throttling import client_ip

# Key of the PostgreSQL advisory lock that serialises appends (any constant unique to this use).
CHAIN_LOCK_KEY = 0x6D6564636F72
# The transaction-local setting that the append-only trigger lets DELETE through with.
PURGE_SETTING = "medcor.audit_purge"


class AuditAction(models.TextChoices):
    LIST = "list", _("List")
    VIEW = "view", _("View")
    DOWNLOAD = "download", _("Download")
    EXPORT = "export", _("Export")
    SEARCH = "search", _("Search")
    UPDATE = "update", _("Update")
    CANCEL = "cancel", _("Cancel")
    RETRY = "retry", _("Retry")
    DELETE = "delete", _("Delete")
    PURGE = "purge", _("Purge")
    REPLY = "reply", _("Reply")
    ROTATE_KEYS = "rotate_keys", _("Rotate keys")
    PAUSE = "pause", _("Pause sending")
    RESUME = "resume", _("Resume sending")
    LOGIN = "login", _("Login")
    LOGIN_FAILED = "login_failed", _("Login failed")
    PERMISSION_CHANGE = "permission_change", _("Permission change")
    SUBJECT_EXPORT = "subject_export", _("Subject export")
    SUBJECT_ERASE = "subject_erase", _("Subject erasure")


class AuditChannel(models.TextChoices):
    API = "api", _("API")
    ADMIN = "admin", _("Admin")
    COMMAND = "command", _("Command")


class AppendOnlyError(Exception):
    """An audit entry was to be changed or deleted outside the retention purge."""


class AuditEntry(models.Model):
    time = models.DateTimeField(db_index=True, editable=False)
    # The username as it was: the trail outlives users, so this is no foreign key.
    actor = models.CharField(max_length=150, blank=True, editable=False)
    actor_user_id = models.BigIntegerField(null=True, blank=True, editable=False)
    # Kept as text in Python's normal form, so the value hashed is the value read back.
    ip = models.CharField(max_length=45, blank=True, editable=False)
    action = models.CharField(max_length=32, choices=AuditAction.choices, editable=False)
    channel = models.CharField(max_length=16, choices=AuditChannel.choices, editable=False)
    request_ids = models.JSONField(default=list, blank=True, editable=False)
    detail = models.JSONField(default=dict, blank=True, editable=False)
    prev_hmac = models.CharField(max_length=64, blank=True, editable=False)
    hmac = models.CharField(max_length=64, editable=False)

    class Meta:
        ordering = ["-pk"]
        # Read-only by design: the admin shows it to holders of this one permission.
        default_permissions = ("view",)
        verbose_name = _("audit entry")
        verbose_name_plural = _("audit trail")
        indexes = [models.Index(fields=["actor", "time"], name="audit_actor_time_idx")]

    def __str__(self):
        return f"#{self.pk} {self.action} by {self.actor or '-'} at {self.time:%Y-%m-%d %H:%M:%S}"

    def save(self, *args, **kwargs):
        if not self._state.adding:
            raise AppendOnlyError("Audit entries cannot be changed.")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise AppendOnlyError("Audit entries are deleted only by the retention purge.")

    def canonical(self):
        """Serialise the content the hmac covers, the same way on every machine."""
        content = {
            "time": self.time.astimezone(UTC).isoformat(timespec="microseconds"),
            "actor": self.actor,
            "actor_user_id": self.actor_user_id,
            "ip": self.ip,
            "action": str(self.action),
            "channel": str(self.channel),
            "request_ids": list(self.request_ids),
            "detail": self.detail,
            "prev_hmac": self.prev_hmac,
        }
        return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()

    def compute_hmac(self):
        """Return the hmac this entry's content should carry under the current key."""
        return hmac.new(conf.audit_hmac_key().encode(), self.canonical(), hashlib.sha256).hexdigest()

    def as_export(self):
        """Return the entry as `audit export` prints it."""
        return {
            "time": self.time.astimezone(UTC).isoformat(),
            "actor": self.actor or None,
            "ip": self.ip or None,
            "action": self.action,
            "channel": self.channel,
            "request_ids": list(self.request_ids),
        }


def record(action, *, actor=None, request=None, channel, request_ids=(), ip=None, detail=None):
    """Append one entry to the trail and return it.

    `request` (Django's or DRF's) supplies the actor and the client IP unless they are given;
    `actor` may be a user or, for a failed login, the username tried. `detail` holds counts only.
    """
    if request is not None:
        actor = getattr(request, "user", None) if actor is None else actor
        ip = client_ip(request) if ip is None else ip
    username, user_id = _actor(actor)
    entry = AuditEntry(
        actor=username,
        actor_user_id=user_id,
        ip=_normal_ip(ip),
        action=AuditAction(action).value,
        channel=AuditChannel(channel).value,
        request_ids=_normal_request_ids(request_ids),
        detail=_counts(detail),
    )
    alias = router.db_for_write(AuditEntry)
    with transaction.atomic(using=alias):
        _lock_chain(alias)
        # Read under the lock: the entry appended last is the one this entry chains to.
        last = AuditEntry.objects.using(alias).order_by("-pk").values_list("hmac", flat=True).first()
        entry.prev_hmac = last or ""
        entry.time = timezone.now()
        entry.hmac = entry.compute_hmac()
        entry.save(using=alias, force_insert=True)
    return entry


@dataclass(frozen=True)
class Verification:
    """What `verify()` found: how many entries, how many broken, and the first broken one."""

    count: int
    broken: int = 0
    first_broken: AuditEntry | None = None
    reason: str = ""

    @property
    def ok(self):
        return self.broken == 0


def verify():
    """Walk the chain in append order and return a `Verification`."""
    count = broken = 0
    first_broken, reason, previous = None, "", None
    for entry in AuditEntry.objects.order_by("pk").iterator(chunk_size=2000):
        count += 1
        problem = ""
        if not hmac.compare_digest(entry.hmac, entry.compute_hmac()):
            problem = "its content does not match its hmac"
        elif previous is not None and not hmac.compare_digest(entry.prev_hmac, previous):
            problem = "it does not chain to the entry before it (an entry was removed or changed)"
        if problem:
            broken += 1
            first_broken, reason = (first_broken, reason) if first_broken else (entry, problem)
        # The stored hmac, not a recomputed one: one altered entry breaks only itself.
        previous = entry.hmac
    return Verification(count=count, broken=broken, first_broken=first_broken, reason=reason)


def export(*, since=None):
    """Yield every entry from `since` on (a datetime, or None for all), oldest first, as dicts."""
    entries = AuditEntry.objects.order_by("pk")
    if since is not None:
        entries = entries.filter(time__gte=since)
    for entry in entries.iterator(chunk_size=2000):
        yield entry.as_export()


def entries_about(request_id, entries=None):
    """Return the entries (of `entries`, or of the whole trail) whose request_ids name this request."""
    entries = AuditEntry.objects.all() if entries is None else entries
    request_id = str(uuid.UUID(str(request_id)))
    if connections[entries.db].vendor == "postgresql":
        # jsonb containment (`@>`), which the GIN index on request_ids serves.
        return entries.filter(request_ids__contains=[request_id])
    # No JSON containment elsewhere (SQLite): a whole, validated UUID matched as text in the
    # JSON list finds exactly the entries naming it.
    return entries.filter(request_ids__icontains=request_id)


def parse_since(value):
    """Turn an ISO date or date-time into an aware datetime (UTC unless it names a zone)."""
    moment = parse_datetime(value)
    if moment is None:
        day = parse_date(value)
        if day is None:
            raise ValueError(f"not an ISO date or date-time: {value!r}")
        moment = datetime.combine(day, datetime.min.time())
    return moment if timezone.is_aware(moment) else moment.replace(tzinfo=UTC)


def purge_audit(now=None):
    """Delete the entries older than AUDIT_RETENTION_DAYS and return how many went.

    Only a prefix of the chain is removed (everything before the first entry inside the retention
    period, in append order), so what remains still verifies from its oldest entry.
    """
    cutoff = (now or timezone.now()) - timedelta(days=conf.audit_retention_days())
    alias = router.db_for_write(AuditEntry)
    with transaction.atomic(using=alias):
        _lock_chain(alias)
        entries = AuditEntry.objects.using(alias)
        first_kept = entries.filter(time__gte=cutoff).order_by("pk").values_list("pk", flat=True).first()
        expired = entries.all() if first_kept is None else entries.filter(pk__lt=first_kept)
        with _purging(alias):
            deleted, _ = expired.delete()
        if deleted:
            # The purge itself is on the trail, so a shortened chain is accounted for.
            record(AuditAction.PURGE, channel=AuditChannel.COMMAND, detail={"audit_entries": deleted})
    return deleted


@contextmanager
def _purging(alias):
    """Let the append-only trigger pass this block's deletes, and nothing after it."""
    connection = connections[alias]
    if connection.vendor != "postgresql":
        yield
        return
    with connection.cursor() as cursor:
        cursor.execute(f"SET LOCAL {PURGE_SETTING} = 'on'")
    # On an error the enclosing atomic block rolls back, and the setting with it.
    yield
    # SET LOCAL lasts until the outermost transaction ends, which may be a caller's.
    with connection.cursor() as cursor:
        cursor.execute(f"SET LOCAL {PURGE_SETTING} = 'off'")


def _lock_chain(alias):
    connection = connections[alias]
    # SQLite needs nothing: its transactions here BEGIN IMMEDIATE, one writer at a time.
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [CHAIN_LOCK_KEY])


def _actor(actor):
    if actor is None or not getattr(actor, "is_authenticated", True):
        return "", None
    if isinstance(actor, str):
        return actor[:150], None
    return actor.get_username(), actor.pk


def _normal_ip(value):
    if not value:
        return ""
    try:
        return str(ipaddress.ip_address(str(value).strip()))
    except ValueError:
        return ""


def _normal_request_ids(values):
    if isinstance(values, (str, uuid.UUID)) or hasattr(values, "pk"):
        values = [values]
    # Validated as UUIDs, so nothing else can travel in this field; a row stands for its pk.
    return list(dict.fromkeys(str(uuid.UUID(str(getattr(value, "pk", value)))) for value in values))


def _counts(detail):
    detail = dict(detail or {})
    for key, value in detail.items():
        if not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("An audit entry's detail holds counts only: names and whole numbers.")
    return detail
