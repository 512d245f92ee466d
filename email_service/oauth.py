"""Access tokens for SMTP AUTH XOAUTH2 (Gmail with OAuth2), from the refresh grant.

google-auth's `Credentials` makes the refresh grant at EMAIL_OAUTH2_TOKEN_URL. The token it
returns is kept for this process and renewed a little before it expires; a server that refuses a
kept token (revoked, or replaced by a newer one) gets one new token, through `access_token(stale=...)`.
"""

import functools
import smtplib
import threading
import time
from datetime import UTC, datetime

from django.core.exceptions import ImproperlyConfigured

from . import conf

# google-auth and requests are imported by the first TokenSource, not with this module: every
# worker imports it (delivery logs in through it), and only an xoauth2 deployment needs them,
# which cost about 0.13 s of CPU at each worker start (requests comes with DRF anyway).

# A token is renewed this long before it expires, or at a fifth of its lifetime for a short one,
# so that it never lapses between being read here and being checked by the server.
RENEW_MARGIN_SECONDS = 300.0


class TokenRefusedError(smtplib.SMTPAuthenticationError):
    """The token endpoint refused the refresh token or the OAuth client: a setting to fix.

    Raised as the login failure it is, with the code and enhanced code Gmail gives refused
    credentials, so that it is treated as one; its text says it came from the token endpoint.
    """

    def __init__(self, text):
        super().__init__(535, f"5.7.8 {text}".encode())


class TokenUnavailableError(OSError):
    """The token endpoint could not be reached or failed for now: worth trying again later."""


class TokenSource:
    """One OAuth2 client's access token, cached in this process and renewed before it expires."""

    def __init__(self, client_id, client_secret, refresh_token, token_url):
        import requests
        from google.oauth2.credentials import Credentials

        self._credentials = Credentials(
            token=None,
            refresh_token=refresh_token,
            token_uri=token_url,
            client_id=client_id,
            client_secret=client_secret,
        )
        self._lock = threading.Lock()
        self._session = requests.Session()
        self._renew_at = 0.0

    def access_token(self, *, stale=None):
        """Return (token, fresh): a live access token, and whether it was fetched by this call.

        `stale` is a token a server just refused: unless another thread has replaced it already,
        a new one is fetched whatever its expiry says.
        """
        with self._lock:
            current = self._credentials.token
            if current is not None and time.monotonic() < self._renew_at and current != stale:
                return current, False
            self._refresh()
            return self._credentials.token, True

    def _refresh(self):
        import google.auth.exceptions
        from google.auth.transport.requests import Request

        # Bounded like an SMTP command: a worker must not wait minutes for the endpoint.
        request = functools.partial(Request(self._session), timeout=conf.smtp_timeout())
        started = time.monotonic()
        issued_at = datetime.now(UTC).replace(tzinfo=None)  # google-auth keeps naive UTC
        try:
            self._credentials.refresh(request)
        except google.auth.exceptions.RefreshError as exc:
            self._renew_at = 0.0
            if getattr(exc, "retryable", False):
                raise TokenUnavailableError(f"The OAuth2 token endpoint failed for now: {exc}") from exc
            raise TokenRefusedError(
                f"The OAuth2 token endpoint refused the refresh grant ({exc}). Check "
                "EMAIL_OAUTH2_CLIENT_ID and EMAIL_OAUTH2_CLIENT_SECRET, or get a new "
                "EMAIL_OAUTH2_REFRESH_TOKEN (see the README)."
            ) from exc
        except google.auth.exceptions.TransportError as exc:
            self._renew_at = 0.0
            raise TokenUnavailableError(f"The OAuth2 token endpoint could not be reached: {exc}") from exc
        expiry = self._credentials.expiry
        lifetime = (expiry - issued_at).total_seconds() if expiry else RENEW_MARGIN_SECONDS
        self._renew_at = started + lifetime - min(RENEW_MARGIN_SECONDS, lifetime / 5)


_sources = {}
_sources_lock = threading.Lock()


def token_source():
    """Return this process's TokenSource for the configured OAuth2 client."""
    client = conf.oauth2_client()
    missing = [
        name
        for name, value in zip(
            ("EMAIL_OAUTH2_CLIENT_ID", "EMAIL_OAUTH2_CLIENT_SECRET", "EMAIL_OAUTH2_REFRESH_TOKEN"),
            client,
            strict=False,
        )
        if not value
    ]
    if missing:
        raise ImproperlyConfigured(f"EMAIL_AUTH_METHOD=xoauth2 needs {', '.join(missing)}.")
    with _sources_lock:
        source = _sources.get(client)
        if source is None:
            source = _sources[client] = TokenSource(*client)
        return source


def forget_tokens():
    """Drop every cached token, so the next login fetches a new one."""
    with _sources_lock:
        _sources.clear()


def xoauth2_response(user, token):
    """Return the SASL XOAUTH2 authobject for smtplib's `auth()`: the initial response, then "".

    After a refused token Gmail sends its error as a challenge, which a client answers with an
    empty line to get the final 535.
    """

    def respond(challenge=None):
        return f"user={user}\x01auth=Bearer {token}\x01\x01" if challenge is None else ""

    return respond
