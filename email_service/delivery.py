"""Build the mails, send them over SMTP, and name every outcome: sent, transient or permanent.

This module knows SMTP and nothing of the database: callers record what it returns.
"""

import base64
import dataclasses
import email.policy
import functools
import io
import logging
import re
import secrets
import smtplib
import socket
import ssl
import threading
import time
import uuid
from dataclasses import dataclass
from email.generator import BytesGenerator
from email.mime.base import MIMEBase
from email.utils import formatdate, make_msgid, parseaddr

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.core.files.storage import default_storage
from django.core.mail import EmailMultiAlternatives
from django.core.mail.backends.smtp import EmailBackend
from django.core.mail.message import forbid_multi_line_headers, sanitize_address
from django.core.mail.utils import DNS_NAME
from django.core.signals import setting_changed
from django.dispatch import receiver
from django.template import Context, Engine
from django.urls import reverse
from django.utils.timezone import template_localtime

from . import conf, oauth
from .encryption import DecryptionError, UnknownKeyError
from .outcomes import AttemptOutcome, BrakeKind

logger = logging.getLogger(__name__)


# The templates of the mails a worker sends; load_ahead compiles them all before it forks.
SUPPORT_TEXT_TEMPLATE = "email_service/support_email.txt"
SUPPORT_HTML_TEMPLATE = "email_service/support_email.html"
MINIMAL_TEXT_TEMPLATE = "email_service/support_email_minimal.txt"
MINIMAL_HTML_TEMPLATE = "email_service/support_email_minimal.html"
REPLY_TEMPLATE = "email_service/reply_email.txt"
CONFIRMATION_TEMPLATE = "email_service/confirmation_email.txt"
MAIL_TEMPLATES = (
    SUPPORT_TEXT_TEMPLATE,
    SUPPORT_HTML_TEMPLATE,
    MINIMAL_TEXT_TEMPLATE,
    MINIMAL_HTML_TEMPLATE,
    REPLY_TEMPLATE,
    CONFIRMATION_TEMPLATE,
)
# The tag libraries a mail template may load beyond the built-in tags and filters (mail_engine).
MAIL_TEMPLATE_LIBRARIES = {
    "i18n": "django.templatetags.i18n",
    "l10n": "django.templatetags.l10n",
    "tz": "django.templatetags.tz",
}
# The request's page in the admin, which the minimal support mail links to.
ADMIN_CHANGE_VIEW = "admin:email_service_emailrequest_change"


@dataclass(frozen=True)
class DeliveryResult:
    """What became of one SMTP attempt."""

    outcome: AttemptOutcome
    smtp_code: int | None = None
    error_class: str = ""
    error_text: str = ""
    # A BrakeKind when the outcome is about the account or the server (every mail would get
    # it), "" when it is about this mail only.
    brake: str = ""
    # The RFC 3463 code of the deciding reply, "" when there was none.
    enhanced: str = ""
    # Set when a recipient refused the mail about its own mailbox (it does not exist, is full,
    # receives too fast): about that mailbox, not about the account.
    recipient_scoped: bool = False

    @property
    def is_provider_wide(self):
        """Say whether this outcome stops sending as a whole rather than this mail."""
        return bool(self.brake)

    @property
    def error_message(self):
        """The operator-facing summary kept on the row: code and text of the last failure."""
        if self.outcome == AttemptOutcome.SENT:
            return ""
        code = f"{self.smtp_code} " if self.smtp_code else ""
        return f"{code}{self.error_class}: {self.error_text}".strip()


def new_message_id():
    """Make a Message-ID in the sender's domain; no slow hostname lookup."""
    return make_msgid(domain=conf.from_email().rpartition("@")[2] or "localhost")


def build_support_message(email_request):
    """Build the mail to support: every form field and the file, or in minimal mode only a link."""
    if conf.notification_mode() == "minimal":
        return _build_minimal_support_message(email_request)
    context = {"request": email_request, "received": _received(email_request)}
    subject = email_request.subject or f"Contact form from {email_request.full_name}"
    message = SupportMessage(
        subject=f"[MedCor contact] {subject}",
        body=render_mail(SUPPORT_TEXT_TEMPLATE, context),
        from_email=conf.from_email(),
        to=[conf.support_email()],
        reply_to=[email_request.email],
        headers=_support_headers(email_request),
    )
    message.attach_alternative(render_mail(SUPPORT_HTML_TEMPLATE, context), "text/html")
    if email_request.file_attached:
        message.attach(_attachment_part(email_request))
        message.stored_attachment = email_request.file_attached.name
    return message


def _build_minimal_support_message(email_request):
    """Build the support mail that says a request came and where to read it, and nothing it says.

    Support mailboxes are often hosted by a provider that may not hold health data (Gmail without
    a BAA): so no field the submitter wrote, no file and no Reply-To with their address.
    """
    context = {
        "reference": email_request.id,
        "received": _received(email_request),
        "has_attachment": email_request.has_attachment,
        "admin_url": admin_change_url(email_request),
    }
    message = SupportMessage(
        subject=f"New contact request {short_reference(email_request)}",
        body=render_mail(MINIMAL_TEXT_TEMPLATE, context),
        from_email=conf.from_email(),
        to=[conf.support_email()],
        headers=_support_headers(email_request),
    )
    message.attach_alternative(render_mail(MINIMAL_HTML_TEMPLATE, context), "text/html")
    return message


@functools.cache
def mail_engine():
    """The template engine the mails are rendered with.

    Its templates are found where the project's Django templates are (TEMPLATES' DIRS, then each
    app's templates/ when APP_DIRS is on), so a project overrides a mail as it overrides a page.
    It is an engine of its own because Django's makes itself by importing every installed app's
    tag libraries (the admin's, REST framework's, about 0.1 s and 190 modules), which a worker
    that only sends mail never uses: a mail template loads Django's i18n, l10n or tz, or nothing.
    """
    config = next((entry for entry in settings.TEMPLATES if entry["BACKEND"].endswith("DjangoTemplates")), {})
    return Engine(
        dirs=[str(path) for path in config.get("DIRS", [])],
        app_dirs=config.get("APP_DIRS", False),
        libraries=MAIL_TEMPLATE_LIBRARIES,
    )


@receiver(setting_changed)
def _forget_mail_engine(setting, **kwargs):
    if setting in ("TEMPLATES", "INSTALLED_APPS"):
        mail_engine.cache_clear()


def render_mail(name, context):
    """Render the mail template `name` with `context` (a dict), autoescaped as Django's engine does."""
    return mail_engine().get_template(name).render(Context(context))


def load_ahead():
    """Load the mail templates now, in a process about to fork the ones that send.

    The engine's cached loader keeps each template compiled once it is first loaded; loaded
    here, every forked process has them from the start instead of compiling its own copy while
    its first mail waits.
    """
    for name in MAIL_TEMPLATES:
        mail_engine().get_template(name)
    if conf.notification_mode() == "minimal":
        # Its first link to an admin page loads the URLconf, and in a Celery process the admin.
        reverse(ADMIN_CHANGE_VIEW, args=[uuid.UUID(int=0)])


def _received(email_request):
    """When the request came, as both parts of its mail show it: formatted once, not per part.

    Django's date format "Y-m-d H:i:s e" written directly, which costs a tenth of it (e: the time
    zone's name, blank for a naive time). Unlike Django's, it names the zone in the hour that a
    change of clocks repeats too, where the name is what tells the two readings apart.
    """
    at = template_localtime(email_request.created_at)
    zone = (at.tzname() or "") if at.tzinfo else ""
    return f"{at.year:04d}-{at.month:02d}-{at.day:02d} {at.hour:02d}:{at.minute:02d}:{at.second:02d} {zone}"


def build_message(row):
    """Build the mail an outbox row carries: the support mail, or a staff reply to the submitter."""
    return build_reply_message(row) if row.is_reply else build_support_message(row)


def build_reply_message(reply):
    """Build a staff reply to the submitter, threaded under the request's support mail.

    The subject quotes nothing the submitter wrote, in either mode: only the short reference.
    Their answer goes to support, not to the sending account.
    """
    request = reply.parent
    context = {"body": reply.message, "reference": request.id}
    thread = request.message_id
    headers = {
        "X-Email-Request-ID": str(request.id),
        "X-Email-Reply-ID": str(reply.id),
        "Message-ID": reply.message_id or new_message_id(),
    }
    if thread:
        headers.update({"In-Reply-To": thread, "References": thread})
    return EmailMultiAlternatives(
        subject=f"Re: your message to MedCor ({short_reference(request)})",
        body=render_mail(REPLY_TEMPLATE, context),
        from_email=conf.from_email(),
        to=[request.email],
        reply_to=[conf.support_email()],
        headers=headers,
    )


def _support_headers(email_request):
    return {
        "X-Email-Request-ID": str(email_request.id),
        "Message-ID": email_request.message_id or new_message_id(),
    }


def short_reference(email_request):
    """The first 8 characters of the request's id: enough for staff to tell requests apart."""
    return str(email_request.id)[:8]


def admin_change_url(email_request):
    """The absolute address of the request's page in the admin."""
    path = reverse(ADMIN_CHANGE_VIEW, args=[email_request.pk])
    return f"{conf.admin_base_url()}{path}"


class SupportMessage(EmailMultiAlternatives):
    """The mail to support; its attachment's content is read from storage only while sending."""

    stored_attachment = None


# Stands in the built message for the attachment's base64 lines, which `send` streams from
# storage onto the SMTP connection, so a worker never holds the whole encoded file.
ATTACHMENT_PLACEHOLDER = "@@medcor-attachment-content@@"
# Raw bytes encoded per step: a multiple of 57, the bytes of one 76-character base64 line.
BASE64_CHUNK = 57 * 1024
CRLF = b"\r\n"


def _attachment_part(email_request):
    """Build the attachment's MIME part: headers, and a placeholder where its lines will go.

    Base64 for every type, text included, so that the bytes arrive exactly as they were sent (a
    text part would have its line endings rewritten).
    """
    content_type = email_request.attachment_content_type or "application/octet-stream"
    maintype, _, subtype = content_type.partition("/")
    part = MIMEBase(maintype, subtype or "octet-stream")
    part.set_payload(ATTACHMENT_PLACEHOLDER)
    part["Content-Transfer-Encoding"] = "base64"
    name = email_request.attachment_name or "attachment"
    # RFC 2231 for a name beyond ASCII, as Django does for the attachments it builds.
    filename = name if name.isascii() else ("utf-8", "", name)
    part.add_header("Content-Disposition", "attachment", filename=filename)
    return part


def _encoded_lines(name):
    """Yield a stored file as base64 lines ending in CRLF, one chunk of lines at a time."""
    carry = b""
    # Read through the storage API: the worker may run on another host than the web process.
    with default_storage.open(name, "rb") as handle:
        for chunk in iter(lambda: handle.read(BASE64_CHUNK), b""):
            chunk = carry + chunk
            # A storage may return short reads: encode whole lines only, so no padding lands mid-file.
            cut = len(chunk) - len(chunk) % 57
            if cut:
                yield base64.encodebytes(chunk[:cut]).replace(b"\n", CRLF)
            carry = chunk[cut:]
    if carry:
        yield base64.encodebytes(carry).replace(b"\n", CRLF)


def _encoded_size(size):
    """Bytes that `_encoded_lines` yields for a file of `size` bytes."""
    lines, rest = divmod(size, 57)
    return lines * 78 + (4 * -(-rest // 3) + 2 if rest else 0)


# Django's own split (django.core.mail.message): a text with a longer line goes quoted-printable.
LONGEST_LINE = 998
NEWLINES = re.compile(rb"\r\n|\r|\n")
_COMPAT32 = email.policy.compat32.clone(linesep="\r\n")


def _is_plain_line(value):
    """Whether a header value is an ASCII string without a line break: the headers' fast paths."""
    return isinstance(value, str) and value.isascii() and "\n" not in value and "\r" not in value


def _header_line(name, value, fold=_COMPAT32.fold_binary, linesep=CRLF):
    """One header line: as it is when it fits on one (ASCII, no line break, at most 78
    characters with its name, which is what folding it would give), else folded by `fold`."""
    if _is_plain_line(value) and len(name) + len(value) <= 76:
        return f"{name}: {value}".encode("ascii") + linesep
    return fold(name, value)


class _WireGenerator(BytesGenerator):
    """The stdlib's byte generator with two costs taken out; the bytes are the same.

    - A header that fits on one line as it is (ASCII, no line break, at most 78 characters with
      its name) is written as `Name: value`, which is what folding it gives; only the others go
      through the policy's folding (`email.header.Header`), about a third of a mail's build time.
    - A multipart boundary is 128 random bits, which no text can hold by chance or by design
      (nobody knows it before it is sent), instead of a random number checked against the whole
      text with a regular expression compiled anew for each message.
    """

    def _write_headers(self, msg):
        for name, value in msg.raw_items():
            self._fp.write(_header_line(name, value, self.policy.fold_binary, self._encoded_NL))
        self.write(self._NL)

    @classmethod
    def _make_boundary(cls, text=None):
        return f"==============={secrets.token_hex(16)}=="


def wire_bytes(mime):
    """Flatten a built MIME message to the bytes that go onto the wire, lines ending in CRLF."""
    buffer = io.BytesIO()
    _WireGenerator(buffer, mangle_from_=False).flatten(mime, linesep="\r\n")
    return buffer.getvalue()


def _mime_bytes(headers, body):
    return b"".join(_header_line(name, value) for name, value in headers) + CRLF + body


def _text_part(text, subtype):
    """The headers and body of a SafeMIMEText(text, subtype, "utf-8") part, or None where it
    would be quoted-printable (a line over 998 bytes) or the text cannot be encoded."""
    if any(len(line.encode(errors="surrogateescape")) > LONGEST_LINE for line in text.splitlines()):
        return None
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        return None
    headers = [
        ("Content-Type", f'text/{subtype}; charset="utf-8"'),
        ("MIME-Version", "1.0"),
        ("Content-Transfer-Encoding", "7bit" if data.isascii() else "8bit"),
    ]
    return headers, NEWLINES.sub(CRLF, data)


def _multipart(subtype, parts):
    """The headers and body of a multipart of already written parts, with a new boundary."""
    boundary = _WireGenerator._make_boundary().encode("ascii")
    body = b"--" + boundary + CRLF + (CRLF + b"--" + boundary + CRLF).join(parts)
    body += CRLF + b"--" + boundary + b"--" + CRLF
    return [
        ("Content-Type", f'multipart/{subtype}; boundary="{boundary.decode()}"'),
        ("MIME-Version", "1.0"),
    ], body


def _direct_wire_bytes(message):
    """Write a text-and-alternatives mail's bytes without building Django's MIME objects.

    The same bytes as `wire_bytes(message.message())` but for the boundaries (the test compares
    them): Django's headers in Django's order, its per-part transfer encodings and the stdlib
    generator's line endings, in about a fifth of the time. Anything else (another charset, a
    part that would be quoted-printable, an attachment that is not a built MIME part) returns
    None, for the general path.
    """
    encoding = message.encoding or settings.DEFAULT_CHARSET
    if encoding.lower() != "utf-8" or message.content_subtype != "plain" or not message.body:
        return None
    alternatives = getattr(message, "alternatives", [])
    if any(not mime.startswith("text/") for _, mime in alternatives):
        return None
    if any(not isinstance(attachment, MIMEBase) for attachment in message.attachments):
        return None
    texts = [(message.body, "plain")] + [(content, mime[5:]) for content, mime in alternatives]
    parts = [_text_part(text, subtype) for text, subtype in texts]
    if None in parts:
        return None
    if len(parts) > 1:
        headers, body = _multipart(message.alternative_subtype, [_mime_bytes(*part) for part in parts])
    else:
        # The text part is the message itself: its own headers come first.
        headers, body = parts[0]
    if message.attachments:
        attached = [wire_bytes(attachment) for attachment in message.attachments]
        headers, body = _multipart(message.mixed_subtype, [_mime_bytes(headers, body), *attached])
    extra = message.extra_headers
    top = [("Subject", message.subject), ("From", extra.get("From", message.from_email))]
    for name, values in (("To", message.to), ("Cc", message.cc), ("Reply-To", message.reply_to)):
        if name in extra:
            top.append((name, extra[name]))
        elif values:
            top.append((name, ", ".join(str(value) for value in values)))
    names = {name.lower() for name in extra}
    if "date" not in names:
        top.append(("Date", formatdate(localtime=settings.EMAIL_USE_LOCALTIME)))
    if "message-id" not in names:
        top.append(("Message-ID", make_msgid(domain=DNS_NAME)))
    top += [
        (name, value) for name, value in extra.items() if name.lower() not in {"from", "to", "cc", "reply-to"}
    ]
    headers += [_checked_header(name, value, encoding) for name, value in top]
    return _mime_bytes(headers, body)


def _checked_header(name, value, encoding):
    """Django's forbid_multi_line_headers, without its cost where it changes nothing: an ASCII value
    on one line is kept as it is, a Subject too when its 76 characters or fewer fit on one line
    (email.header.Header, which Django passes a Subject through, returns those unchanged)."""
    if _is_plain_line(value) and (len(value) <= 76 or name.lower() != "subject"):
        return name, value
    return forbid_multi_line_headers(name, value, encoding)


def _framing(message):
    """Return the message's bytes before and after its streamed attachment, and the file's name."""
    raw = _direct_wire_bytes(message) or wire_bytes(message.message())
    name = getattr(message, "stored_attachment", None)
    if not name:
        return raw, b"", None
    head, _, tail = raw.partition(ATTACHMENT_PLACEHOLDER.encode())
    return head, tail, name


def message_bytes(message):
    """Return the whole message as it goes onto the wire, attachment included (before dot-stuffing)."""
    head, tail, name = _framing(message)
    return head + (b"".join(_encoded_lines(name)) if name else b"") + tail


def build_confirmation_message(email_request):
    """Build the acknowledgement to the submitter: fixed words and the reference, no form text."""
    context = {"reference": email_request.id}
    return EmailMultiAlternatives(
        subject="We received your message",
        body=render_mail(CONFIRMATION_TEMPLATE, context),
        from_email=conf.from_email(),
        to=[email_request.email],
        headers={"X-Email-Request-ID": str(email_request.id), "Auto-Submitted": "auto-replied"},
    )


# A connection idle longer than this is checked with NOOP before use: servers drop idle clients.
IDLE_CHECK_SECONDS = 5.0

# smtplib's own order of preference for a password; only the first the server offers is tried.
PASSWORD_MECHANISMS = ("CRAM-MD5", "PLAIN", "LOGIN")


def log_in(smtp, user, password):
    """Authenticate once on an open (and, where configured, TLS) connection: one AUTH command.

    smtplib's `login()` goes on to the next mechanism after a refusal, so one wrong password
    would count as two failed logins against the account; here one mechanism is chosen. With
    XOAUTH2 a refused token that came from the cache is replaced once and tried again: it may
    have been revoked or superseded, which a new token fixes.
    """
    smtp.ehlo_or_helo_if_needed()
    if not smtp.has_extn("auth"):
        raise smtplib.SMTPNotSupportedError("The SMTP server offers no AUTH (is STARTTLS needed first?)")
    offered = smtp.esmtp_features["auth"].upper().split()
    if conf.auth_method() == "xoauth2":
        if "XOAUTH2" not in offered:
            raise smtplib.SMTPNotSupportedError("The SMTP server does not offer AUTH XOAUTH2")
        source = oauth.token_source()
        token, fresh = source.access_token()
        try:
            return smtp.auth("XOAUTH2", oauth.xoauth2_response(user, token))
        except smtplib.SMTPAuthenticationError as exc:
            if exc.smtp_code != 535 or fresh:
                raise
        token, _ = source.access_token(stale=token)
        return smtp.auth("XOAUTH2", oauth.xoauth2_response(user, token))
    mechanism = next((name for name in PASSWORD_MECHANISMS if name in offered), None)
    if mechanism is None:
        raise smtplib.SMTPNotSupportedError(
            f"No AUTH mechanism in common with the server ({' '.join(offered)})"
        )
    smtp.user, smtp.password = user, password
    return smtp.auth(mechanism, getattr(smtp, "auth_" + mechanism.lower().replace("-", "_")))


class SMTPBackend(EmailBackend):
    """Django's SMTP backend with one login attempt per connection, by password or XOAUTH2."""

    def open(self):
        """Connect, start TLS as configured and log in once; keep the connection only once set up."""
        if self.connection:
            return False
        # As Django's backend: the cached FQDN (getfqdn() is slow), the timeout, the TLS context.
        params = {"local_hostname": DNS_NAME.get_fqdn()}
        if self.timeout is not None:
            params["timeout"] = self.timeout
        if self.use_ssl:
            params["context"] = self.ssl_context
        connection = self.connection_class(self.host, self.port, **params)
        try:
            if self.use_tls and not self.use_ssl:
                connection.starttls(context=self.ssl_context)
            if self.username and (self.password or conf.auth_method() == "xoauth2"):
                log_in(connection, self.username, self.password)
        except BaseException:
            connection.close()
            raise
        self.connection = connection
        return True


class _SharedConnection(threading.local):
    """One SMTP connection per worker thread, opened on first use and kept across tasks."""

    backend = None
    last_used = 0.0
    # Whether the connection has carried a mail: only such a one can have gone stale.
    used = False


_shared = _SharedConnection()


def is_connected():
    """Say whether this thread holds an open SMTP connection (its next send needs no login)."""
    return _shared.backend is not None and _shared.backend.connection is not None


def close_connection():
    """Close this thread's SMTP connection, if any."""
    backend, _shared.backend = _shared.backend, None
    if backend is not None:
        try:
            backend.close()
        except (smtplib.SMTPException, OSError):
            pass  # a connection being dropped has nothing left to say


def _is_alive(backend):
    try:
        return backend.connection.noop()[0] == 250
    except (smtplib.SMTPException, OSError):
        return False


def _connection():
    """Return this thread's open SMTP backend, reconnecting if the old one went away."""
    backend = _shared.backend
    if backend is not None and backend.connection is not None:
        if time.monotonic() - _shared.last_used < IDLE_CHECK_SECONDS or _is_alive(backend):
            return backend
    close_connection()
    backend = SMTPBackend(fail_silently=False, timeout=conf.smtp_timeout())
    backend.open()
    # DATA goes out in several writes; without this each small one after a large one could
    # wait for the server's delayed ACK.
    backend.connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _shared.backend, _shared.used = backend, False
    return backend


class _NotOpened(Exception):
    """Opening the connection (connect, STARTTLS, login) failed: no mail could go; `error` says why."""

    def __init__(self, error):
        super().__init__(str(error))
        self.error = error


def _open_connection():
    try:
        return _connection()
    except Exception as exc:
        raise _NotOpened(exc) from exc


def _opening_result(exc):
    """Classify a failure to open the connection: about the server, never about the mail.

    Every later mail would meet the same unreachable host, failed handshake or dropped
    greeting, so what has no brake of its own (a login, a certificate) waits as CONNECTION.
    """
    result = classify(exc)
    if result.brake or isinstance(exc, SoftTimeLimitExceeded):
        return result
    return dataclasses.replace(
        result,
        outcome=AttemptOutcome.TRANSIENT,
        brake=BrakeKind.CONNECTION,
        error_text=f"Could not open the SMTP connection: {result.error_text}",
    )


class _NotStarted(Exception):
    """MAIL FROM was not accepted, so the server holds nothing of the message; `error` says why."""

    stale = False  # set when the connection had carried a mail before: then it may just be stale

    def __init__(self, error):
        super().__init__(str(error))
        self.error = error


def send(message):
    """Send one message on the shared connection and return what happened.

    A failed send is never repeated here once MAIL FROM was accepted: after DATA the server may
    have kept the message, so only the caller's retry policy decides about another attempt. A
    kept connection that turns out stale before that (the server closed it, or answers 421) has
    carried nothing, so the message goes once more on a new connection.
    """
    try:
        try:
            _send_on(_open_connection(), message)
        except _NotStarted as exc:
            close_connection()
            if not exc.stale:
                raise
            logger.info(
                "The kept SMTP connection was stale (%s); sending on a new one", type(exc.error).__name__
            )
            _send_on(_open_connection(), message)
    except _NotOpened as exc:
        close_connection()
        return _opening_result(exc.error)
    except _NotStarted as exc:
        close_connection()
        return classify(exc.error)
    except Exception as exc:  # every failure becomes a result the caller records
        close_connection()
        return classify(exc)
    finally:
        _shared.last_used = time.monotonic()
    return DeliveryResult(AttemptOutcome.SENT, smtp_code=250)


def _send_on(backend, message):
    reused = _shared.used
    try:
        _transmit(backend.connection, message)
    except _NotStarted as exc:
        exc.stale = reused
        raise
    _shared.used = True


_LEADING_DOT = re.compile(rb"(?m)^\.")


def _dot_stuffed(data):
    return _LEADING_DOT.sub(b"..", data)


@functools.lru_cache(maxsize=64)
def _envelope_address(address, encoding):
    """An address as the envelope names it, and quoted as MAIL FROM and RCPT TO write it.

    smtplib's mail() and rcpt() parse the address again on every call (quoteaddr); the sender and
    the support address repeat on every mail, so both forms are worked out once.
    """
    sanitized = sanitize_address(address, encoding)
    return sanitized, smtplib.quoteaddr(sanitized)


def _transmit(smtp, message):
    """Run MAIL, RCPT and DATA for `message` on an open smtplib connection.

    What Django's SMTP backend does with smtplib's sendmail, except that DATA is written in
    pieces: the headers and text parts, the attachment's lines straight from storage, the rest.
    """
    encoding = message.encoding or settings.DEFAULT_CHARSET
    sender, quoted_sender = _envelope_address(message.from_email, encoding)
    recipients = [_envelope_address(address, encoding) for address in message.recipients()]
    head, tail, name = _framing(message)
    if not tail.endswith(CRLF):
        tail += CRLF
    size = len(head) + len(tail) + (_encoded_size(default_storage.size(name)) if name else 0)
    smtp.ehlo_or_helo_if_needed()
    options = []
    if smtp.does_esmtp and smtp.has_extn("size"):
        options.append(f"SIZE={size}")
    # Text parts may go as 8bit (the attachment is base64): say so where the server allows it.
    if smtp.does_esmtp and smtp.has_extn("8bitmime") and not (head + tail).isascii():
        options.append("BODY=8BITMIME")
    try:
        # smtplib's mail() and rcpt(), with the address quoted already.
        code, reply = smtp.docmd("mail", f"FROM:{quoted_sender}{''.join(' ' + option for option in options)}")
    except (smtplib.SMTPServerDisconnected, OSError) as exc:
        raise _NotStarted(exc) from exc
    if code == 421:
        # The server is closing this connection: a stale one answers so to the next command.
        raise _NotStarted(smtplib.SMTPSenderRefused(code, reply, sender))
    if code != 250:
        _reset(smtp)
        raise smtplib.SMTPSenderRefused(code, reply, sender)
    refused = {}
    for recipient, quoted_recipient in recipients:
        code, reply = smtp.docmd("rcpt", f"TO:{quoted_recipient}")
        if code not in (250, 251):
            refused[recipient] = (code, reply)
    if len(refused) == len(recipients):
        _reset(smtp)
        raise smtplib.SMTPRecipientsRefused(refused)
    code, reply = smtp.docmd("data")
    if code != 354:
        _reset(smtp)
        raise smtplib.SMTPDataError(code, reply)
    if name:
        smtp.send(_dot_stuffed(head))
        # Base64 lines never start with a dot: they go out as they are.
        for lines in _encoded_lines(name):
            smtp.send(lines)
        smtp.send(_dot_stuffed(tail) + b"." + CRLF)
    else:
        # One write: a second small one would wait for the server's delayed ACK (Nagle).
        smtp.send(_dot_stuffed(head + tail) + b"." + CRLF)
    code, reply = smtp.getreply()
    if code != 250:
        raise smtplib.SMTPDataError(code, reply)


def _reset(smtp):
    try:
        smtp.rset()
    except (smtplib.SMTPException, OSError):
        pass


def _by_code(code):
    return (
        AttemptOutcome.TRANSIENT
        if code is None or code < 0 or 400 <= code < 500
        else AttemptOutcome.PERMANENT
    )


def _text(value):
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class Reply:
    """One of Gmail's published SMTP replies and what it means for sending."""

    code: int
    enhanced: str
    # Words of Gmail's text that tell this reply from another with the same codes; "" for none.
    words: str
    outcome: AttemptOutcome
    brake: str = ""

    def matches(self, code, enhanced, text):
        return (
            code == self.code
            and enhanced == self.enhanced
            and (not self.words or self.words.lower() in text.lower())
        )


_T, _P = AttemptOutcome.TRANSIENT, AttemptOutcome.PERMANENT

# Gmail's replies (support.google.com/a/answer/3726730), matched by code and enhanced status code
# (RFC 3463), and by Gmail's words only where two replies share both codes. A provider-wide row
# names its brake: every later mail would get the same reply, so no mail is at fault and none
# spends a retry. The others are about this mail; codes not here keep the 4xx/5xx rule.
GMAIL_REPLIES = (
    # The account or the server: stop sending as a whole.
    Reply(421, "4.7.0", "", _T, BrakeKind.THROTTLE),  # Try again later, closing connection
    Reply(421, "4.7.28", "", _T, BrakeKind.THROTTLE),  # unusual rate of unsolicited mail
    Reply(421, "4.3.0", "", _T, BrakeKind.THROTTLE),  # Temporary System Problem
    Reply(451, "4.3.0", "", _T, BrakeKind.THROTTLE),  # Mail server temporarily rejected message
    # Every mail goes to the one support mailbox: its rate limit is everyone's.
    Reply(450, "4.2.1", "", _T, BrakeKind.THROTTLE),  # receiving mail at a rate that prevents ...
    Reply(454, "4.7.0", "", _T, BrakeKind.AUTH_TEMPORARY),  # Too many login attempts / temporary
    Reply(550, "5.4.5", "", _T, BrakeKind.QUOTA),  # Daily user sending limit exceeded
    Reply(535, "5.7.8", "", _T, BrakeKind.CREDENTIALS),  # Username and Password not accepted
    Reply(534, "5.7.9", "", _T, BrakeKind.CREDENTIALS),  # Application-specific password required
    Reply(534, "5.7.14", "", _T, BrakeKind.CREDENTIALS),  # Please log in via your web browser
    Reply(530, "5.7.0", "starttls", _T, BrakeKind.TLS),  # Must issue a STARTTLS command first
    Reply(530, "5.7.0", "", _T, BrakeKind.CREDENTIALS),  # Authentication Required
    # This mail only.
    Reply(452, "4.5.3", "", _T),  # Your message has too many recipients
    Reply(452, "4.2.2", "", _T),  # The recipient's inbox is out of storage space
    # smtp-relay's daily cap shares 5.7.1 with the content refusal: told apart by its words.
    Reply(550, "5.7.1", "daily smtp relay limit exceeded", _T, BrakeKind.QUOTA),
    Reply(550, "5.7.1", "", _P),  # rejected by policy: this content
    Reply(550, "5.7.26", "", _P),  # unauthenticated email: this message failed SPF/DKIM/DMARC
    Reply(552, "5.3.4", "", _P),  # Your message exceeded Google's message size limits
    Reply(552, "5.2.3", "", _P),  # Your message exceeded Google's message size limits
    Reply(550, "5.1.1", "", _P),  # The email account that you tried to reach does not exist
    Reply(550, "5.2.1", "", _P),  # The email account that you tried to reach is disabled
    Reply(553, "5.1.2", "", _P),  # We weren't able to find the recipient domain
    Reply(553, "5.1.3", "", _P),  # not a valid RFC-5321 address
)

_ENHANCED = re.compile(r"\s*([245]\.\d{1,3}\.\d{1,3})\b")


def enhanced_code(text):
    """Return the RFC 3463 enhanced status code a reply's text starts with, or ""."""
    found = _ENHANCED.match(text)
    return found.group(1) if found else ""


def lookup_reply(code, text):
    """Return the row of GMAIL_REPLIES that this reply is, or None."""
    enhanced = enhanced_code(text)
    return next((row for row in GMAIL_REPLIES if row.matches(code, enhanced, text)), None)


def _reply_result(code, text, name, summary=None):
    """Classify an SMTP reply by the table, or by its first digit when the table does not know it."""
    row = lookup_reply(code, text)
    enhanced = enhanced_code(text)
    if row is None:
        return DeliveryResult(_by_code(code), code, name, summary or text, enhanced=enhanced)
    return DeliveryResult(row.outcome, code, name, summary or text, brake=row.brake, enhanced=enhanced)


def _is_about_the_mailbox(code, enhanced):
    """Say whether a refusal at RCPT is about that recipient's mailbox, not the server or account.

    RFC 3463's address (x.1.y) and mailbox (x.2.y) statuses are; so are 450/550/551/553 without
    an enhanced code (RFC 5321: mailbox unavailable, not local, name not allowed). 421 is the
    server closing the connection whatever the recipient.
    """
    if code is None or code == 421 or not 400 <= code < 600:
        return False
    if enhanced:
        return enhanced.split(".")[1] in ("1", "2")
    return code in (450, 550, 551, 553)


def _is_support_address(address):
    # Both in envelope form (IDNA domain), compared as bare addresses: a display name is no part.
    support = _envelope_address(conf.support_email(), settings.DEFAULT_CHARSET)[0]
    return parseaddr(address)[1].lower() == parseaddr(support)[1].lower()


def _refusal_result(address, code, text, name):
    """Classify one recipient's refusal at RCPT by whose trouble it is.

    A submitter's mailbox (a reply, an acknowledgement) refusing is that mail's matter only: it
    never stops sending, or anyone could pause support mail with one address. The support
    mailbox refusing is everyone's: every mail goes there, so it holds them all, waiting for a
    4.x to pass and for an operator to fix a 5.x (the address is wrong or disabled).
    """
    result = _reply_result(code, text, name)
    if not _is_about_the_mailbox(code, result.enhanced):
        return result
    if not _is_support_address(address):
        return dataclasses.replace(result, brake="", recipient_scoped=True)
    if code < 500:
        kind, summary = BrakeKind.THROTTLE, text
    else:
        kind = BrakeKind.SUPPORT_ADDRESS
        summary = f"The support address was refused ({text}). Check SUPPORT_EMAIL, then resume sending."
    return dataclasses.replace(
        result, outcome=AttemptOutcome.TRANSIENT, brake=kind, error_text=summary, recipient_scoped=True
    )


def _login_result(exc, name):
    text = _text(exc.smtp_error)
    row = lookup_reply(exc.smtp_code, text)
    # A refused login not in the table: 4xx is the server's trouble, 5xx a setting to fix.
    brake = (
        row.brake
        if row and row.brake
        else (BrakeKind.AUTH_TEMPORARY if 400 <= (exc.smtp_code or 0) < 500 else BrakeKind.CREDENTIALS)
    )
    if brake == BrakeKind.AUTH_TEMPORARY:
        summary = f"The SMTP server could not check the login now ({text}); sending resumes by itself."
    else:
        secret = (
            "the EMAIL_OAUTH2_* settings"
            if conf.auth_method() == "xoauth2"
            else "EMAIL_HOST_PASSWORD (for Gmail an app password, or EMAIL_AUTH_METHOD=xoauth2)"
        )
        summary = (
            f"The SMTP server refused the login ({text}). Check EMAIL_HOST_USER and {secret}, "
            "then resume sending."
        )
    return DeliveryResult(AttemptOutcome.TRANSIENT, exc.smtp_code, name, summary, brake=brake)


def classify(exc):
    """Turn an exception from building or sending a mail into a DeliveryResult."""
    name = type(exc).__name__
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        return _login_result(exc, name)
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        replies = list(exc.recipients.items())
        text = "; ".join(f"{addr}: {c} {_text(msg)}" for addr, (c, msg) in replies)
        if not replies:
            return DeliveryResult(AttemptOutcome.TRANSIENT, None, name, "Recipient refused")
        # The worst reply decides, as before; a provider-wide one among them decides first.
        results = [_refusal_result(addr, code, _text(msg), name) for addr, (code, msg) in replies]
        worst = max(results, key=lambda result: (bool(result.brake), result.smtp_code or 0))
        if worst.brake == BrakeKind.SUPPORT_ADDRESS:
            return worst  # its text says what to fix; it names only the support address
        return dataclasses.replace(worst, error_text=f"Recipient refused: {text}")
    if isinstance(exc, smtplib.SMTPResponseException):
        return _reply_result(exc.smtp_code, _text(exc.smtp_error), name)
    if isinstance(exc, smtplib.SMTPNotSupportedError):
        return DeliveryResult(
            AttemptOutcome.TRANSIENT,
            None,
            name,
            f"{exc}. Check EMAIL_USE_TLS, EMAIL_USE_SSL and EMAIL_PORT, then resume sending.",
            brake=BrakeKind.TLS,
        )
    if isinstance(exc, SoftTimeLimitExceeded):
        return DeliveryResult(
            AttemptOutcome.TRANSIENT, None, name, "The send took longer than its time limit."
        )
    if isinstance(exc, UnknownKeyError):
        # This worker's MEDCOR_ENCRYPTION_KEYS lack the file's key: a setting on this host, and
        # every mail with a file would fail for it. Held until an operator fixes the keys.
        return DeliveryResult(
            AttemptOutcome.TRANSIENT,
            None,
            name,
            f"The attachment is under a key this worker lacks ({exc}). Check MEDCOR_ENCRYPTION_KEYS, "
            "then resume sending.",
            brake=BrakeKind.ENCRYPTION_KEYS,
        )
    if isinstance(exc, DecryptionError):
        # The bytes fail authentication: changed or damaged, another try reads the same bytes.
        return DeliveryResult(AttemptOutcome.PERMANENT, None, name, f"The attachment cannot be read: {exc}")
    if isinstance(exc, FileNotFoundError):
        # Key rotation may have repointed the row and removed the old file while this worker held
        # the old name: the retry reloads the row. A file truly gone fails once the retries are spent.
        return DeliveryResult(AttemptOutcome.TRANSIENT, None, name, "The attachment is missing from storage.")
    if isinstance(exc, ssl.SSLCertVerificationError):
        # A setting (host name, trust store) or a server in the way: waiting cannot fix either.
        return DeliveryResult(
            AttemptOutcome.TRANSIENT,
            None,
            name,
            f"The SMTP server's certificate was not accepted ({exc.verify_message or exc}). Check "
            "EMAIL_HOST and the trust store, then resume sending.",
            brake=BrakeKind.TLS,
        )
    if isinstance(exc, oauth.TokenUnavailableError):
        # No token, no login for any mail: wait it out like a temporary login failure.
        return DeliveryResult(AttemptOutcome.TRANSIENT, None, name, str(exc), brake=BrakeKind.AUTH_TEMPORARY)
    if isinstance(exc, (ConnectionRefusedError, socket.gaierror)):
        # Nothing was sent, and every other mail would meet the same closed door.
        return DeliveryResult(AttemptOutcome.TRANSIENT, None, name, str(exc), brake=BrakeKind.CONNECTION)
    if isinstance(exc, (smtplib.SMTPServerDisconnected, socket.timeout, TimeoutError, ssl.SSLError)):
        return DeliveryResult(AttemptOutcome.TRANSIENT, None, name, str(exc) or "Connection lost")
    if isinstance(exc, OSError):
        return DeliveryResult(AttemptOutcome.TRANSIENT, None, name, str(exc))
    if isinstance(exc, (ValueError, UnicodeError)):
        # A header that cannot be encoded, or another malformed message: retrying cannot help.
        return DeliveryResult(AttemptOutcome.PERMANENT, None, name, str(exc))
    logger.exception("Unexpected error while sending mail")
    return DeliveryResult(AttemptOutcome.TRANSIENT, None, name, str(exc))
