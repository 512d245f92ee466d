"""Settings of the MedCor backend, read from the environment (and a `.env` file).

Every setting the outside relies on is listed in ../shared/spec/CONTRACT.md and `.env.example`.
With nothing set, the service runs on embedded defaults: SQLite, kombu's filesystem broker
under `var/`, and an on-disk cache shared by every process of the machine.
"""

from pathlib import Path

import environ
from corsheaders.defaults import default_headers as cors_default_headers
from django.core.exceptions import ImproperlyConfigured

from medcor_backend2.keys import KEY_HOWTO, development_keys, is_key

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
environ.Env.read_env(BASE_DIR / ".env")

DEBUG = env.bool("DJANGO_DEBUG", default=False)
SECRET_KEY = env("DJANGO_SECRET_KEY", default="")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("DJANGO_SECRET_KEY is required when DJANGO_DEBUG is false.")
    SECRET_KEY = "insecure-development-key-only-for-debug"
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["localhost", "127.0.0.1"])

# Runtime state of the embedded defaults: broker folders, cache, mailbox, beat schedule.
VAR_DIR = BASE_DIR / env("MEDCOR_VAR_DIR", default="var")  # a relative path is taken from BASE_DIR
VAR_DIR.mkdir(parents=True, exist_ok=True)

# Encryption at rest (email_service/encryption.py). Like the secret key, the keys have no default
# outside debug; in debug, keys made once under var/ stand in, so `make run` needs no set-up.
MEDCOR_ENCRYPTION_KEYS = env.list("MEDCOR_ENCRYPTION_KEYS", default=[])
MEDCOR_INDEX_KEY = env("MEDCOR_INDEX_KEY", default="")
if DEBUG and not (MEDCOR_ENCRYPTION_KEYS and MEDCOR_INDEX_KEY):
    _dev_keys = development_keys(VAR_DIR / "dev-keys.env")
    MEDCOR_ENCRYPTION_KEYS = MEDCOR_ENCRYPTION_KEYS or [_dev_keys["MEDCOR_ENCRYPTION_KEYS"]]
    MEDCOR_INDEX_KEY = MEDCOR_INDEX_KEY or _dev_keys["MEDCOR_INDEX_KEY"]
if not MEDCOR_ENCRYPTION_KEYS:
    raise ImproperlyConfigured(f"MEDCOR_ENCRYPTION_KEYS is required when DJANGO_DEBUG is false; {KEY_HOWTO}")
if not MEDCOR_INDEX_KEY:
    raise ImproperlyConfigured(f"MEDCOR_INDEX_KEY is required when DJANGO_DEBUG is false; {KEY_HOWTO}")
for _position, _key in enumerate(MEDCOR_ENCRYPTION_KEYS, start=1):
    if not is_key(_key):
        raise ImproperlyConfigured(
            f"MEDCOR_ENCRYPTION_KEYS: key {_position} is not 32 bytes in url-safe base64; {KEY_HOWTO}"
        )
if not is_key(MEDCOR_INDEX_KEY):
    raise ImproperlyConfigured(f"MEDCOR_INDEX_KEY is not 32 bytes in url-safe base64; {KEY_HOWTO}")

INSTALLED_APPS = [
    # The admin with the staff admin site (TOTP second factor) as admin.site.
    "medcor_backend2.apps.StaffAdminConfig",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "corsheaders",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_ratelimit",
    "email_service",
    # Staff authentication and the Content-Security-Policy (see the block below).
    "axes",
    "django_otp",
    "django_otp.plugins.otp_totp",
    "csp",
]

MIDDLEWARE = [
    # First, so that an oversized body is refused before anything reads it.
    "email_service.middleware.RequestBodyLimitMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "medcor_backend2.middleware.CSPMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "corsheaders.middleware.CorsMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django_otp.middleware.OTPMiddleware",
    # Lets the audit trail name who changed a permission, from the request that did it.
    "email_service.audit_hooks.AuditContextMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as django-axes asks: it turns a locked-out login into the lockout answer.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "medcor_backend2.urls"
WSGI_APPLICATION = "medcor_backend2.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        # Project-level overrides of other apps' templates (the admin index), found before theirs.
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {"default": env.db_url("DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}")}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Web, worker and beat share one file: wait for locks instead of failing, take the write
    # lock up front so two writers never deadlock, and let readers run beside a writer.
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 30,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    # A file, not memory, so that a Celery worker started by the tests sees the test database.
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / "test-db.sqlite3")}
else:
    DATABASES["default"]["CONN_MAX_AGE"] = env.int("DATABASE_CONN_MAX_AGE", default=60)
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
    if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
        # Django's backend, with a health check that costs no round trip while the connection is quiet.
        DATABASES["default"]["ENGINE"] = "medcor_backend2.postgresql"
    # Fail fast when the database is unreachable, so /healthz answers 503 instead of hanging.
    DATABASES["default"].setdefault("OPTIONS", {})["connect_timeout"] = env.int(
        "DATABASE_CONNECT_TIMEOUT", default=5
    )
    # Parameters bound by the server and statements a connection runs again and again prepared
    # (Django's own options for psycopg 3): the send loop runs the same few statements for every
    # mail, and each then skips its parsing and planning. Django leaves both off for connection
    # poolers in transaction mode that cannot keep a prepared statement: DATABASE_PREPARE_THRESHOLD
    # empty turns them off (PgBouncer 1.21 and newer keeps them with max_prepared_statements).
    _prepare_threshold = env("DATABASE_PREPARE_THRESHOLD", default="5").strip()
    if _prepare_threshold and "postgresql" in DATABASES["default"]["ENGINE"]:
        DATABASES["default"]["OPTIONS"].update(
            server_side_binding=True, prepare_threshold=int(_prepare_threshold)
        )
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env("REDIS_URL", default="")
if REDIS_URL:
    CACHES = {"default": {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": REDIS_URL}}
else:
    CACHES = {
        "default": {
            "BACKEND": "medcor_backend2.sqlite_cache.SQLiteCache",
            "LOCATION": str(VAR_DIR / "cache.sqlite3"),
        }
    }
    # django-ratelimit warns about any backend it does not know; this one increments atomically
    # and is shared by every process of the machine, which is what the warning is about.
    SILENCED_SYSTEM_CHECKS = ["django_ratelimit.W001"]

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
# Attachments are private: MEDIA_URL is never routed, files are read through the storage API.
MEDIA_ROOT = env("MEDIA_ROOT", default="") or str(BASE_DIR / "media")
MEDIA_URL = "/media/"
# Attachments are sealed at rest (email_service/encrypted_storage.py), under MEDIA_ROOT by default
# or, with MEDCOR_STORAGE=s3, in an S3-compatible bucket (django-storages' own AWS_* settings).
MEDCOR_STORAGE = env("MEDCOR_STORAGE", default="filesystem")
if MEDCOR_STORAGE == "s3":
    _default_storage = {
        "BACKEND": "email_service.encrypted_storage.EncryptedS3Storage",
        "OPTIONS": {
            "bucket_name": env("AWS_STORAGE_BUCKET_NAME", default=""),
            "endpoint_url": env("AWS_S3_ENDPOINT_URL", default="") or None,
            "region_name": env("AWS_S3_REGION_NAME", default="") or None,
            "access_key": env("AWS_ACCESS_KEY_ID", default="") or None,
            "secret_key": env("AWS_SECRET_ACCESS_KEY", default="") or None,
            "location": env("AWS_LOCATION", default=""),
            # Random names never collide; refusing to overwrite keeps rotation's copies apart.
            "file_overwrite": False,
            "default_acl": None,
        },
    }
    if not _default_storage["OPTIONS"]["bucket_name"]:
        raise ImproperlyConfigured("MEDCOR_STORAGE=s3 needs AWS_STORAGE_BUCKET_NAME.")
elif MEDCOR_STORAGE == "filesystem":
    _default_storage = {"BACKEND": "email_service.encrypted_storage.EncryptedFileSystemStorage"}
else:
    raise ImproperlyConfigured("MEDCOR_STORAGE is filesystem (the default) or s3.")
STORAGES = {
    "default": _default_storage,
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
# Uploads larger than this go to a temporary file instead of the web process's memory.
FILE_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024 * 1024
DATA_UPLOAD_MAX_MEMORY_SIZE = 1024 * 1024

# --- Mail -------------------------------------------------------------------------------
EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
EMAIL_HOST = env("EMAIL_HOST", default="smtp.gmail.com")
EMAIL_PORT = env.int("EMAIL_PORT", default=587)
EMAIL_HOST_USER = env("EMAIL_HOST_USER", default="")
EMAIL_HOST_PASSWORD = env("EMAIL_HOST_PASSWORD", default="") or env("GMAIL_APP_PASSWORD", default="")
EMAIL_USE_TLS = env.bool("EMAIL_USE_TLS", default=True)
EMAIL_USE_SSL = env.bool("EMAIL_USE_SSL", default=False)
EMAIL_TIMEOUT = env.int("EMAIL_TIMEOUT", default=30)
DEFAULT_FROM_EMAIL = env("DEFAULT_FROM_EMAIL", default="support@tcall.ai")
SERVER_EMAIL = DEFAULT_FROM_EMAIL

# SMTP AUTH: "password" (EMAIL_HOST_PASSWORD, e.g. a Gmail app password) or "xoauth2" (Gmail
# OAuth2: an access token from the refresh grant; see email_service/oauth.py and the README).
EMAIL_AUTH_METHOD = env("EMAIL_AUTH_METHOD", default="password").strip().lower()
EMAIL_OAUTH2_CLIENT_ID = env("EMAIL_OAUTH2_CLIENT_ID", default="")
EMAIL_OAUTH2_CLIENT_SECRET = env("EMAIL_OAUTH2_CLIENT_SECRET", default="")
EMAIL_OAUTH2_REFRESH_TOKEN = env("EMAIL_OAUTH2_REFRESH_TOKEN", default="")
EMAIL_OAUTH2_TOKEN_URL = env("EMAIL_OAUTH2_TOKEN_URL", default="https://oauth2.googleapis.com/token")
if EMAIL_AUTH_METHOD not in ("password", "xoauth2"):
    raise ImproperlyConfigured("EMAIL_AUTH_METHOD must be password or xoauth2.")
if EMAIL_AUTH_METHOD == "xoauth2":
    _missing = [
        name
        for name in (
            "EMAIL_HOST_USER",
            "EMAIL_OAUTH2_CLIENT_ID",
            "EMAIL_OAUTH2_CLIENT_SECRET",
            "EMAIL_OAUTH2_REFRESH_TOKEN",
        )
        if not globals()[name]
    ]
    if _missing:
        raise ImproperlyConfigured(f"EMAIL_AUTH_METHOD=xoauth2 needs {', '.join(_missing)}.")

# --- The email service (read at call time through email_service.conf) -----------------------
SUPPORT_EMAIL = env("SUPPORT_EMAIL", default="support@tcall.ai")
EMAIL_SEND_CONFIRMATION = env.bool("EMAIL_SEND_CONFIRMATION", default=True)
EMAIL_MAX_RETRIES = env.int("EMAIL_MAX_RETRIES", default=3)
EMAIL_RETRY_DELAY = env.float("EMAIL_RETRY_DELAY", default=60)
EMAIL_RETRY_BACKOFF_MAX = env.float("EMAIL_RETRY_BACKOFF_MAX", default=3600)
EMAIL_ATTACHMENT_MAX_BYTES = env.int("EMAIL_ATTACHMENT_MAX_BYTES", default=10 * 1024 * 1024)
# JSON {"MIME type": [".ext", ...]}; unset: the allow-list in email_service/validators.py.
EMAIL_ALLOWED_ATTACHMENT_TYPES = env.json("EMAIL_ALLOWED_ATTACHMENT_TYPES", default=None)
EMAIL_RETENTION_DAYS = env.int("EMAIL_RETENTION_DAYS", default=90)
# --- Notifications without health data (issue 14) ---
# full: the support mail carries every field and the file; minimal: only the reference, the time,
# whether a file came, and a link to the request in the admin at EMAIL_ADMIN_BASE_URL.
EMAIL_NOTIFICATION_MODE = env("EMAIL_NOTIFICATION_MODE", default="full").strip().lower()
if EMAIL_NOTIFICATION_MODE not in ("full", "minimal"):
    raise ImproperlyConfigured("EMAIL_NOTIFICATION_MODE must be 'full' or 'minimal'.")
EMAIL_ADMIN_BASE_URL = env("EMAIL_ADMIN_BASE_URL", default="http://127.0.0.1:8000")
# The staff's free-text search decrypts rows to match them: at most this many, newest first.
EMAIL_SEARCH_SCAN_LIMIT = env.int("EMAIL_SEARCH_SCAN_LIMIT", default=5000)
# A request body may be the largest attachment plus this much for the other fields and the
# multipart framing; anything larger is refused with 413 before it is read.
EMAIL_FORM_ALLOWANCE_BYTES = env.int("EMAIL_FORM_ALLOWANCE_BYTES", default=1024 * 1024)
# clamd that scans every upload: `unix:///path` or `tcp://host:port`; empty means no scanning.
EMAIL_CLAMAV_URL = env("EMAIL_CLAMAV_URL", default="")
EMAIL_CLAMAV_REQUIRED = env.bool("EMAIL_CLAMAV_REQUIRED", default=False)
EMAIL_CLAMAV_TIMEOUT = env.float("EMAIL_CLAMAV_TIMEOUT", default=30)
# Intake checks (email_service/captcha.py, email_service/honeypot.py): a CAPTCHA verified server-side
# (none, turnstile, hcaptcha or recaptcha; the verify URL defaults to the provider's siteverify), and
# the seconds a person needs at least to fill in the contact page's form.
EMAIL_CAPTCHA_PROVIDER = env("EMAIL_CAPTCHA_PROVIDER", default="none")
EMAIL_CAPTCHA_SITE_KEY = env("EMAIL_CAPTCHA_SITE_KEY", default="")
EMAIL_CAPTCHA_SECRET = env("EMAIL_CAPTCHA_SECRET", default="")
EMAIL_CAPTCHA_VERIFY_URL = env("EMAIL_CAPTCHA_VERIFY_URL", default="")
EMAIL_CAPTCHA_TIMEOUT = env.float("EMAIL_CAPTCHA_TIMEOUT", default=5)
EMAIL_MIN_FILL_SECONDS = env.float("EMAIL_MIN_FILL_SECONDS", default=3)
if EMAIL_CAPTCHA_PROVIDER.strip().lower() not in ("", "none"):
    if EMAIL_CAPTCHA_PROVIDER.strip().lower() not in ("turnstile", "hcaptcha", "recaptcha"):
        raise ImproperlyConfigured("EMAIL_CAPTCHA_PROVIDER must be none, turnstile, hcaptcha or recaptcha.")
    # Without them no token could be checked, and every submission would pass as unverified.
    if not (EMAIL_CAPTCHA_SITE_KEY and EMAIL_CAPTCHA_SECRET):
        raise ImproperlyConfigured(
            "EMAIL_CAPTCHA_PROVIDER needs EMAIL_CAPTCHA_SITE_KEY and EMAIL_CAPTCHA_SECRET."
        )
EMAIL_DISPATCH_INTERVAL = env.float("EMAIL_DISPATCH_INTERVAL", default=15)
# Limits of one send; by default derived from EMAIL_TIMEOUT (see email_service/conf.py).
EMAIL_SEND_TIME_LIMIT = env.float("EMAIL_SEND_TIME_LIMIT", default=None)
EMAIL_CLAIM_LEASE = env.float("EMAIL_CLAIM_LEASE", default=None)
# Due rows one task claims and sends over one SMTP connection (see email_service/sending.py).
EMAIL_SEND_BATCH_SIZE = env.int("EMAIL_SEND_BATCH_SIZE", default=20)
EMAIL_DISPATCH_STALE_AFTER = env.float("EMAIL_DISPATCH_STALE_AFTER", default=120)
EMAIL_CONFIRMATION_INTERVAL = env.float("EMAIL_CONFIRMATION_INTERVAL", default=3600)
# Acknowledgements one destination domain may receive in a rolling 24 h (0: no cap).
EMAIL_CONFIRMATION_DOMAIN_DAILY_LIMIT = env.int("EMAIL_CONFIRMATION_DOMAIN_DAILY_LIMIT", default=50)
EMAIL_DISPATCH_ASYNC = env.bool("EMAIL_DISPATCH_ASYNC", default=True)
# perf: new rows share at most this many waiting send messages (a sender drains every due row).
EMAIL_DISPATCH_WAKE_SLOTS = env.int("EMAIL_DISPATCH_WAKE_SLOTS", default=4)
# perf: a SENT outcome's commit does not wait for the disk unless true (email_service/conf.py).
EMAIL_SYNCHRONOUS_OUTCOMES = env.bool("EMAIL_SYNCHRONOUS_OUTCOMES", default=False)
EMAIL_STATISTICS_CACHE_SECONDS = env.float("EMAIL_STATISTICS_CACHE_SECONDS", default=10)
EMAIL_LIST_COUNT_CACHE_SECONDS = env.float("EMAIL_LIST_COUNT_CACHE_SECONDS", default=10)
# The sender-wide brake and the quotas (email_service/brake.py, quotas.py).
EMAIL_DAILY_LIMIT = env.int("EMAIL_DAILY_LIMIT", default=0)
EMAIL_MINUTE_LIMIT = env.int("EMAIL_MINUTE_LIMIT", default=0)
EMAIL_ACKNOWLEDGEMENT_SHARE = env.float("EMAIL_ACKNOWLEDGEMENT_SHARE", default=0.8)
EMAIL_BRAKE_BACKOFF = env.float("EMAIL_BRAKE_BACKOFF", default=60)
EMAIL_BRAKE_BACKOFF_MAX = env.float("EMAIL_BRAKE_BACKOFF_MAX", default=3600)
EMAIL_BRAKE_CACHE_SECONDS = env.float("EMAIL_BRAKE_CACHE_SECONDS", default=2)
EMAIL_RATELIMIT_CREATE = env("EMAIL_RATELIMIT_CREATE", default="5/m")
EMAIL_RATELIMIT_READ = env("EMAIL_RATELIMIT_READ", default="60/m")
RATELIMIT_ENABLE = env.bool("RATELIMIT_ENABLE", default=True)
# How many proxies of ours stand in front of the service (see email_service/throttling.py).
RATELIMIT_TRUSTED_PROXIES = env.int("RATELIMIT_TRUSTED_PROXIES", default=0)
# The audit trail (email_service/audit.py): its chain key, required like the secret key, and
# how long entries are kept (six years, as HIPAA asks for its documentation).
AUDIT_HMAC_KEY = env("AUDIT_HMAC_KEY", default="")
if not AUDIT_HMAC_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("AUDIT_HMAC_KEY is required when DJANGO_DEBUG is false.")
    AUDIT_HMAC_KEY = "insecure-audit-key-only-for-debug"
AUDIT_RETENTION_DAYS = env.int("AUDIT_RETENTION_DAYS", default=2190)

# --- Staff authentication and the Content-Security-Policy (email_service/authentication.py) -----
# Admin logins: django-axes refuses a username, and separately an IP, after this many failures
# until the cool-off has passed since the last one; the answer is a page (JSON under /api/).
STAFF_LOGIN_FAILURE_LIMIT = env.int("STAFF_LOGIN_FAILURE_LIMIT", default=5)
STAFF_LOGIN_COOLOFF_SECONDS = env.int("STAFF_LOGIN_COOLOFF_SECONDS", default=15 * 60)
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = "email_service.conf.staff_login_failure_limit"
AXES_COOLOFF_TIME = "email_service.conf.staff_login_cooloff"
AXES_LOCKOUT_PARAMETERS = ["username", "ip_address"]
AXES_CLIENT_IP_CALLABLE = "email_service.throttling.client_ip"
AXES_LOCKOUT_CALLABLE = "email_service.authentication.lockout_response"
AXES_RESET_ON_SUCCESS = True
# The audit trail records every login and failure; axes' own log would keep them forever.
AXES_DISABLE_ACCESS_LOG = True
# A TOTP second factor in the admin for staff with a device; for every staff member when true.
ADMIN_REQUIRE_2FA = env.bool("ADMIN_REQUIRE_2FA", default=False)
OTP_TOTP_ISSUER = "MedCor email service"  # the name authenticator apps show
# A staff session ends after this long without a request; each request starts the period again.
STAFF_SESSION_IDLE_SECONDS = env.int("STAFF_SESSION_IDLE_SECONDS", default=30 * 60)
SESSION_COOKIE_AGE = STAFF_SESSION_IDLE_SECONDS
SESSION_SAVE_EVERY_REQUEST = True
# API tokens (`manage.py create_api_token`) are valid this many seconds: 30 days by default.
API_TOKEN_TTL = env.int("API_TOKEN_TTL", default=30 * 24 * 60 * 60)
# Every HTML page: scripts, styles, images and fetches from this origin only, never framed. The docs
# add their pages' nonce (medcor_backend2/docs.py); the contact page sends its own policy.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": ["'none'"],
        "script-src": ["'self'"],
        "style-src": ["'self'"],
        "img-src": ["'self'", "data:"],
        "font-src": ["'self'"],
        "connect-src": ["'self'"],
        "form-action": ["'self'"],
        "frame-ancestors": ["'none'"],
        "base-uri": ["'none'"],
    }
}
# --- Celery ----------------------------------------------------------------------------
CELERY_BROKER_URL = env("CELERY_BROKER_URL", default="filesystem://")
if CELERY_BROKER_URL.startswith("filesystem://"):
    _broker_dir = VAR_DIR / "broker"
    for _folder in ("queue", "processed", "control"):
        (_broker_dir / _folder).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker_dir / "queue"),
        "data_folder_out": str(_broker_dir / "queue"),
        "processed_folder": str(_broker_dir / "processed"),
        "store_processed": False,
        # With a control folder, broadcast works, so `celery inspect` answers on this broker too.
        "control_folder": str(_broker_dir / "control"),
    }
else:
    # Publishing happens after commit on the request thread: never wait long for the broker.
    CELERY_BROKER_TRANSPORT_OPTIONS = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2}
CELERY_BROKER_CONNECTION_TIMEOUT = env.float("CELERY_BROKER_CONNECTION_TIMEOUT", default=2)
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_RESULT_BACKEND = env("CELERY_RESULT_BACKEND", default="rpc://")
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TIMEZONE = TIME_ZONE
CELERY_TASK_DEFAULT_QUEUE = env("CELERY_TASK_DEFAULT_QUEUE", default="emails")
# A message is acknowledged only once its task has finished, and a worker takes one at a time,
# so a crash hands the message back to the broker instead of losing it.
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_WORKER_SEND_TASK_EVENTS = False
# Workers log through Django's LOGGING below (so LOG_FORMAT=json reaches them) instead of
# replacing the root handlers with Celery's own format.
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")
CELERY_BEAT_SCHEDULE = {
    "dispatch-due-emails": {
        "task": "email_service.tasks.dispatch_due_emails",
        "schedule": EMAIL_DISPATCH_INTERVAL,
    },
    "purge-old-emails": {
        "task": "email_service.tasks.purge_old_emails",
        "schedule": 24 * 60 * 60,
    },
    "purge-audit-trail": {
        "task": "email_service.tasks.purge_audit_trail",
        "schedule": 24 * 60 * 60,
    },
}

# --- REST framework and OpenAPI ----------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.SessionAuthentication",
        "email_service.authentication.ExpiringTokenAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "email_service.exceptions.json_exception_handler",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "MedCor email service",
    "DESCRIPTION": "Contact-form submissions delivered to MedCor support by email.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # Swagger UI and ReDoc from this service's static files, never a CDN (see the CSP block).
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # No badge that would fetch the schema's verdict from swagger.io.
    "SWAGGER_UI_SETTINGS": {"deepLinking": True, "validatorUrl": None},
    "COMPONENT_SPLIT_REQUEST": True,
    # Operations are tagged by the path segment after this prefix: "emails".
    "SCHEMA_PATH_PREFIX": r"/api/email",
    "ENUM_NAME_OVERRIDES": {"EmailStatusEnum": "email_service.models.EmailStatus"},
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "email_service.schema.close_response_shapes",
        "email_service.schema.merge_blank_alternatives",
    ],
}

CORS_ALLOWED_ORIGINS = env.list("CORS_ALLOWED_ORIGINS", default=[])
CORS_URLS_REGEX = r"^/api/.*$"
# The website's form sends Idempotency-Key and needs to read Retry-After on a 429; it never sends
# cookies, so credentials stay disallowed (django-cors-headers' default).
CORS_ALLOW_HEADERS = (*cors_default_headers, "idempotency-key")
CORS_EXPOSE_HEADERS = ["retry-after"]

# --- Logging ------------------------------------------------------------------------------
LOG_LEVEL = env("LOG_LEVEL", default="INFO")
LOG_FORMAT = env("LOG_FORMAT", default="text")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "text": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
        "json": {"()": "medcor_backend2.logs.JsonFormatter"},
    },
    # No address or query string reaches a log line, whichever logger wrote it (issue 14).
    "filters": {"scrub": {"()": "medcor_backend2.logs.ScrubPersonalData"}},
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": LOG_FORMAT, "filters": ["scrub"]},
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        # aiosmtpd logs every SMTP command at INFO; the sink logs one line per mail itself.
        "mail.log": {"level": "WARNING"},
        # Django's own handlers for these (console in debug, mail to ADMINS) would bypass the
        # filter: they log through the root's handler instead, and no error mail carries a form.
        "django": {"handlers": [], "level": "INFO", "propagate": True},
        "django.server": {"handlers": [], "level": "INFO", "propagate": True},
        # At DEBUG (with DJANGO_DEBUG) it logs every query with its parameters: the form's text.
        "django.db.backends": {"level": "INFO"},
    },
}

if not DEBUG:
    SESSION_COOKIE_SECURE = env.bool("DJANGO_SECURE_COOKIES", default=True)
    CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
