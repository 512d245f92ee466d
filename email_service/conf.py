"""The email service's settings, read at call time so that `override_settings` reaches them."""

from datetime import timedelta

from django.conf import settings


def support_email():
    return settings.SUPPORT_EMAIL


def from_email():
    return settings.DEFAULT_FROM_EMAIL


def send_confirmation():
    return settings.EMAIL_SEND_CONFIRMATION


def max_retries():
    return settings.EMAIL_MAX_RETRIES


def retry_delay():
    return settings.EMAIL_RETRY_DELAY


def retry_backoff_max():
    return settings.EMAIL_RETRY_BACKOFF_MAX


def attachment_max_bytes():
    return settings.EMAIL_ATTACHMENT_MAX_BYTES


def allowed_attachment_types():
    """The attachment allow-list set in settings (MIME type -> extensions), or None for the default."""
    return settings.EMAIL_ALLOWED_ATTACHMENT_TYPES


def retention_days():
    return settings.EMAIL_RETENTION_DAYS


def smtp_timeout():
    return settings.EMAIL_TIMEOUT


def soft_time_limit():
    """Seconds a send may take: by default a slow connect plus a slow DATA phase, and a margin."""
    return settings.EMAIL_SEND_TIME_LIMIT or smtp_timeout() * 2 + 30


def hard_time_limit():
    """Seconds after which a send's worker process is killed: the soft limit plus a grace."""
    return soft_time_limit() + min(30, soft_time_limit())


def lease_seconds():
    """Seconds a claim holds its row: past the task's hard limit, so only a dead worker loses it."""
    return settings.EMAIL_CLAIM_LEASE or hard_time_limit() + 60


def send_batch_size():
    """Due rows a worker claims at once and sends over its connection, one commit per mail."""
    return max(1, settings.EMAIL_SEND_BATCH_SIZE)


def send_window():
    """Seconds into a task after which it starts no further mail: one more send still fits
    within the soft time limit (a slow connect and a slow DATA phase)."""
    return max(0.0, soft_time_limit() - smtp_timeout() * 2 - 10)


def dispatch_stale_after():
    """Seconds after which a dispatched PENDING row that nobody claimed is dispatched again."""
    return settings.EMAIL_DISPATCH_STALE_AFTER


def dispatch_async():
    """Publish after commit from a background thread, so the request never waits for the broker."""
    return settings.EMAIL_DISPATCH_ASYNC


def synchronous_outcomes():
    """Whether a SENT outcome's commit waits for PostgreSQL to flush it to disk, as other writes do.

    By default it does not (synchronous_commit off for that one statement): the commit's wait for
    the disk was 130 of the statement's 220 us, and without it a worker sent a fifth more mail a
    second (bench/README.md, stop 25). What the setting trades is narrow:
    a crash of PostgreSQL itself (or of its machine) can forget the SENT outcomes of its last
    moments (up to three times its wal_writer_delay, 0.6 s by default; a failover, whatever its
    standby had not received, as for any write a standby lags behind). Those rows are
    then PROCESSING under a claim whose lease runs out, and are sent again under their first
    Message-ID: a duplicate, never a loss. The 201 answer's row, the claims and every other
    outcome keep waiting for the disk.
    """
    return settings.EMAIL_SYNCHRONOUS_OUTCOMES


def dispatch_wake_slots():
    """Send messages that may wait on the broker at once for new rows; 0: one message per row."""
    return max(0, int(settings.EMAIL_DISPATCH_WAKE_SLOTS))


def confirmation_interval():
    """Seconds between two acknowledgements to the same mailbox."""
    return settings.EMAIL_CONFIRMATION_INTERVAL


def confirmation_domain_daily_limit():
    """Acknowledgements one destination domain may receive in a rolling 24 h; 0 means no cap."""
    return settings.EMAIL_CONFIRMATION_DOMAIN_DAILY_LIMIT


def ratelimit_create():
    return settings.EMAIL_RATELIMIT_CREATE


def ratelimit_read():
    return settings.EMAIL_RATELIMIT_READ


def statistics_cache_seconds():
    """Seconds the public statistics may be stale: one full-table aggregate per period at most."""
    return settings.EMAIL_STATISTICS_CACHE_SECONDS


def list_count_cache_seconds():
    """Seconds a large list count may be shared: one full count per filter per period at most."""
    return settings.EMAIL_LIST_COUNT_CACHE_SECONDS


def trusted_proxies():
    """How many proxies of ours stand in front of the service, each adding to X-Forwarded-For."""
    return settings.RATELIMIT_TRUSTED_PROXIES


def mailbox_dir():
    """Where the local SMTP sink keeps the mails it receives, by default."""
    return settings.VAR_DIR / "mailbox"


def audit_hmac_key():
    """The key of the audit trail's HMAC chain."""
    return settings.AUDIT_HMAC_KEY


def audit_retention_days():
    return settings.AUDIT_RETENTION_DAYS


def encryption_keys():
    """The keys of encryption at rest, newest first: the first encrypts, every one decrypts."""
    return settings.MEDCOR_ENCRYPTION_KEYS


def index_key():
    """The key of the address index; it never rotates with the encryption keys."""
    return settings.MEDCOR_INDEX_KEY


def request_body_max_bytes():
    """Bytes a request body may have: the largest attachment plus the form around it."""
    return attachment_max_bytes() + settings.EMAIL_FORM_ALLOWANCE_BYTES


def clamav_url():
    """`unix:///path` or `tcp://host:port` of clamd; empty means uploads are not scanned."""
    return settings.EMAIL_CLAMAV_URL


def clamav_required():
    """Whether an unreachable scanner refuses files (True) or lets them through marked (False)."""
    return settings.EMAIL_CLAMAV_REQUIRED


def clamav_timeout():
    """Seconds to wait for clamd to connect, take a chunk or answer."""
    return settings.EMAIL_CLAMAV_TIMEOUT


# --- the sender-wide brake and the quotas ----------------------------------------------------


def brake_backoff():
    """Seconds a throttle holds sending before the first probe; each probe refused doubles it."""
    return settings.EMAIL_BRAKE_BACKOFF


def brake_backoff_max():
    """Seconds a throttle's hold never goes beyond."""
    return settings.EMAIL_BRAKE_BACKOFF_MAX


def brake_cache_seconds():
    """Seconds a worker trusts its last read of the brake: one query per period, not per mail."""
    return settings.EMAIL_BRAKE_CACHE_SECONDS


def daily_limit():
    """Messages the account may send per rolling 24 hours; 0 for no limit."""
    return max(0, settings.EMAIL_DAILY_LIMIT)


def minute_limit():
    """Messages the account may send per minute; 0 for no limit."""
    return max(0, settings.EMAIL_MINUTE_LIMIT)


def acknowledgement_share():
    """Part of the daily limit past which acknowledgements stop, leaving the rest to support mail."""
    return settings.EMAIL_ACKNOWLEDGEMENT_SHARE


def auth_method():
    """How the SMTP login is made: "password" or "xoauth2"."""
    return settings.EMAIL_AUTH_METHOD


def oauth2_client():
    """The OAuth2 client and refresh token for XOAUTH2: (client id, secret, refresh token, token URL)."""
    return (
        settings.EMAIL_OAUTH2_CLIENT_ID,
        settings.EMAIL_OAUTH2_CLIENT_SECRET,
        settings.EMAIL_OAUTH2_REFRESH_TOKEN,
        settings.EMAIL_OAUTH2_TOKEN_URL,
    )


# --- Staff authentication (email_service/authentication.py) ----------------------------------


def staff_login_failure_limit(request=None, credentials=None):
    """Failed admin logins, per username and per IP, after which logins are refused (axes' hook)."""
    return settings.STAFF_LOGIN_FAILURE_LIMIT


def staff_login_cooloff(request=None):
    """How long a lockout lasts after the last failure, as a timedelta (axes' hook)."""
    return timedelta(seconds=settings.STAFF_LOGIN_COOLOFF_SECONDS)


def admin_require_2fa():
    """Whether the admin lets in only staff who passed a TOTP check in this session."""
    return settings.ADMIN_REQUIRE_2FA


def api_token_ttl():
    """How long a new API token is valid, as a timedelta."""
    return timedelta(seconds=settings.API_TOKEN_TTL)


def captcha_provider():
    """The CAPTCHA provider whose token a submission must carry: "" when none is set."""
    provider = (settings.EMAIL_CAPTCHA_PROVIDER or "none").strip().lower()
    return "" if provider == "none" else provider


def captcha_site_key():
    return settings.EMAIL_CAPTCHA_SITE_KEY


def captcha_secret():
    return settings.EMAIL_CAPTCHA_SECRET


def captcha_verify_url():
    """The siteverify URL set in settings; empty means the provider's own."""
    return settings.EMAIL_CAPTCHA_VERIFY_URL


def captcha_timeout():
    """Seconds to wait for the CAPTCHA provider's answer before accepting the form unverified."""
    return settings.EMAIL_CAPTCHA_TIMEOUT


def min_fill_seconds():
    """Seconds after the contact page was served before its form may be sent; 0 turns the check off."""
    return settings.EMAIL_MIN_FILL_SECONDS


def notification_mode():
    """`full`: the support mail carries the form and the file; `minimal`: only a reference and a link."""
    return settings.EMAIL_NOTIFICATION_MODE


def admin_base_url():
    """Where staff reach the admin, without a trailing slash, for the links in minimal mails."""
    return settings.EMAIL_ADMIN_BASE_URL.rstrip("/")


def search_scan_limit():
    """How many rows, newest first, one free-text search may decrypt and match."""
    return settings.EMAIL_SEARCH_SCAN_LIMIT
