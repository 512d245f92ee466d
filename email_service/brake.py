"""The sender-wide brake: one row that every worker on every host reads before it sends.

A provider-wide outcome (a quota, a throttle, refused credentials, a certificate that fails) is
about the account, not the mail: every later mail would get the same. So it engages the brake,
and no worker opens an SMTP connection while it holds. Each change is one guarded UPDATE, as
for the status, so two workers that see the same throttle engage it once:

    running --engage--> engaged (until T, or until an operator resumes)
    engaged, T passed --take_probe--> one worker sends one mail --release--> running
                                                                --engage---> engaged (longer)
    any --pause--> engaged by an operator;  engaged --resume--> running

Throttles, temporary login trouble and a server that cannot be reached release by themselves:
at T one probe mail goes, and each probe that meets the same answer doubles the wait (capped).
The daily quota waits until the rolling 24 h window frees a message (the caller says when).
Refused credentials, TLS failures, a refused support address, an attachment key this host lacks
and an operator's pause wait for `resume`.

Workers read the row at most once per EMAIL_BRAKE_CACHE_SECONDS (`current`), so the check costs
no query per mail.
"""

import enum
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django.db import models
from django.db.models import Q
from django.utils import timezone

from . import conf, delivery, quotas
from .outcomes import OPERATOR_ONLY_BRAKES, BrakeKind

logger = logging.getLogger(__name__)

ROW_ID = 1


class SendingBrake(models.Model):
    """The one row holding whether sending is paused, why and until when."""

    id = models.PositiveSmallIntegerField(primary_key=True, default=ROW_ID, editable=False)
    kind = models.CharField(max_length=16, choices=BrakeKind.choices, blank=True)
    reason = models.CharField(max_length=300, blank=True)
    engaged_at = models.DateTimeField(null=True, blank=True)
    # When a probe may go; None while engaged means only an operator's resume releases it.
    until = models.DateTimeField(null=True, blank=True)
    # Engagements in a row without a mail getting through: the exponent of the backoff.
    failures = models.PositiveIntegerField(default=0)
    probe_token = models.UUIDField(null=True, blank=True)
    probe_expires_at = models.DateTimeField(null=True, blank=True)
    changed_at = models.DateTimeField(default=timezone.now)

    class Meta:
        app_label = "email_service"
        verbose_name = "sending brake"

    def __str__(self):
        return f"sending {'paused' if self.kind else 'running'}"


class Gate(enum.Enum):
    """What a worker may do now."""

    RUN = "run"
    PROBE = "probe"  # the wait is over: one mail may go to see whether the provider takes it
    HOLD = "hold"


@dataclass(frozen=True)
class BrakeState:
    """A snapshot of the brake's row."""

    kind: str = ""
    reason: str = ""
    engaged_at: datetime | None = None
    until: datetime | None = None
    failures: int = 0

    @property
    def is_engaged(self):
        return bool(self.kind)

    @property
    def needs_operator(self):
        """Say whether only an operator's resume releases it."""
        return self.is_engaged and self.until is None

    def gate(self, now=None):
        """Say whether a worker may send, may send one probe, or must hold."""
        if not self.is_engaged:
            return Gate.RUN
        if self.until is not None and self.until <= (now or timezone.now()):
            return Gate.PROBE
        return Gate.HOLD


RUNNING = BrakeState()


class _Memo(threading.local):
    state = None
    read_at = 0.0


_memo = _Memo()


def _rows():
    # The row is created on first use, so a fresh database needs no data migration.
    SendingBrake.objects.get_or_create(pk=ROW_ID)
    return SendingBrake.objects.filter(pk=ROW_ID)


def _snapshot(row):
    return BrakeState(row.kind, row.reason, row.engaged_at, row.until, row.failures)


def current(*, refresh=False):
    """Return the brake's state, read from the database at most once per EMAIL_BRAKE_CACHE_SECONDS."""
    if refresh or _memo.state is None or time.monotonic() - _memo.read_at >= conf.brake_cache_seconds():
        row = SendingBrake.objects.filter(pk=ROW_ID).first()
        _remember(_snapshot(row) if row else RUNNING)
    return _memo.state


def _remember(state):
    _memo.state, _memo.read_at = state, time.monotonic()


def forget():
    """Drop this thread's cached state, so the next read goes to the database."""
    _memo.state = None


def backoff(failures):
    """Seconds to wait after the `failures`-th engagement in a row: doubling, capped."""
    return min(conf.brake_backoff_max(), conf.brake_backoff() * 2 ** max(0, failures - 1))


def _changed(rows, **fields):
    """Write `fields` on the brake's row if it still matches `rows`' guard; say whether it did."""
    changed = bool(rows.update(changed_at=timezone.now(), **fields))
    state = current(refresh=True)
    return changed, state


def _log_change(state, what):
    # One WARNING line per change; the reason holds codes and a category, nothing personal.
    until = state.until.isoformat() if state.until else "an operator resumes sending"
    if state.is_engaged:
        logger.warning(
            "Sending paused (%s, %s): %s; held until %s",
            state.kind,
            what,
            state.reason,
            until,
            extra={"sending": "paused", "brake": state.kind},
        )
    else:
        logger.warning("Sending resumed (%s)", what, extra={"sending": "running"})


def engage(kind, reason, *, probe=None, until=None, now=None):
    """Stop sending for every worker because of a provider-wide outcome; return the new state.

    Only the first worker to see it engages it; a probe that meets it again engages it for
    longer. An outcome that needs an operator takes over from one that would wait it out. `until`
    is the earliest time the caller knows a probe may help (the daily quota's window).
    """
    kind = BrakeKind(kind)
    now = now or timezone.now()
    rows = _rows()
    operator_only = kind in OPERATOR_ONLY_BRAKES
    if probe is not None:
        guard, failures = Q(probe_token=probe), models.F("failures") + 1
        number = (current(refresh=True).failures or 0) + 1
        what = "the probe met it again"
    else:
        guard, failures, number = Q(kind=""), 1, 1
        what = "engaged"
    fields = {
        "kind": kind,
        "reason": reason[:300],
        "until": None if operator_only else _until(number, until, now),
        "failures": failures,
        "probe_token": None,
        "probe_expires_at": None,
    }
    changed, state = _changed(rows.filter(guard), engaged_at=now, **fields)
    if not changed and operator_only:
        # A setting to fix outranks a wait already running: the wait would end in the same refusal.
        auto = Q(kind__in=[k for k in BrakeKind if k not in OPERATOR_ONLY_BRAKES])
        changed, state = _changed(rows.filter(auto), **{**fields, "failures": models.F("failures") + 1})
        what = "needs an operator now"
    if changed:
        _log_change(state, what)
    return state


def _until(failures, until, now):
    wait = now + timedelta(seconds=backoff(failures))
    return max(wait, until) if until is not None else wait


def take_probe(worker=""):
    """Become the one worker that sends a probe mail now; return the probe's token, or None."""
    now = timezone.now()
    token = uuid.uuid4()
    free = Q(probe_token__isnull=True) | Q(probe_expires_at__lt=now)
    changed, _ = _changed(
        _rows().exclude(kind="").filter(free, until__lte=now),
        probe_token=token,
        probe_expires_at=now + timedelta(seconds=conf.lease_seconds()),
    )
    if changed:
        logger.info("Sending probe taken by %s", worker or "a worker", extra={"brake": "probe"})
    return token if changed else None


def release(probe):
    """The probe got through (or was answered about itself): sending runs again. Say if it did."""
    changed, state = _changed(_rows().filter(probe_token=probe), **_running_fields())
    if changed:
        _log_change(state, "the probe mail went")
    return changed


def pause(reason=""):
    """Stop sending until an operator resumes it; return whether this changed the brake."""
    now = timezone.now()
    changed, state = _changed(
        _rows().exclude(kind=BrakeKind.OPERATOR, until__isnull=True),
        kind=BrakeKind.OPERATOR,
        reason=(reason or "paused by an operator")[:300],
        engaged_at=now,
        until=None,
        probe_token=None,
        probe_expires_at=None,
    )
    if changed:
        _log_change(state, "by an operator")
    return changed


def resume():
    """Let every worker send again, whatever engaged the brake; return whether it was engaged."""
    changed, state = _changed(_rows().exclude(kind=""), **_running_fields())
    if changed:
        _log_change(state, "by an operator")
    return changed


def _running_fields():
    return {
        "kind": "",
        "reason": "",
        "engaged_at": None,
        "until": None,
        "failures": 0,
        "probe_token": None,
        "probe_expires_at": None,
    }


def describe(state=None):
    """Return the operator-facing fields: sending, sending_paused_reason, sending_paused_until."""
    state = state or current(refresh=True)
    if not state.is_engaged:
        return {"sending": "running", "sending_paused_reason": "", "sending_paused_until": None}
    return {
        "sending": "paused",
        "sending_paused_reason": f"{BrakeKind(state.kind).label}: {state.reason}",
        "sending_paused_until": state.until.isoformat() if state.until else None,
    }


def reason_for(result):
    """Say why a result stops sending, in codes and categories only (no address, no text of a mail)."""
    code = f"{result.smtp_code} " if result.smtp_code and result.smtp_code > 0 else ""
    enhanced = result.enhanced or delivery.enhanced_code(result.error_text)
    enhanced = f"{enhanced} " if enhanced else ""
    detail = ""
    if result.brake in (BrakeKind.TLS, BrakeKind.CONNECTION, BrakeKind.ENCRYPTION_KEYS) and not code:
        # Raised here, not by the server: the text is the library's own (e.g. why a certificate failed).
        detail = f": {result.error_text}"
    return f"{code}{enhanced}{result.error_class}{detail}".strip()


def quota_until(now=None):
    """When the rolling 24 h window lets a message go, by the service's own count, else in 24 h."""
    now = now or timezone.now()
    if conf.daily_limit() and quotas.day_counts(now.timestamp()):
        return datetime.fromtimestamp(quotas.daily_frees_at(now.timestamp()), tz=UTC)
    return now + timedelta(seconds=quotas.DAY_SECONDS)


def engage_for(result, *, probe=None):
    """Engage the brake for a provider-wide DeliveryResult; return the new state."""
    until = quota_until() if result.brake == BrakeKind.QUOTA else None
    return engage(result.brake, reason_for(result), probe=probe, until=until)


def drop_probe(probe):
    """Give up a probe that found nothing to send, so the next mail may probe at once."""
    SendingBrake.objects.filter(pk=ROW_ID, probe_token=probe).update(probe_token=None, probe_expires_at=None)
    forget()
