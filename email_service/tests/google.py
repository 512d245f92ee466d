"""Stand-ins for Google: an OAuth2 token endpoint and an SMTP server with AUTH XOAUTH2.

`TokenEndpoint` answers the refresh grant as oauth2.googleapis.com/token does, issuing a new
access token each time with a lifetime the test sets (seconds, so a token can expire within a
test). `XOAuth2SMTP` accepts only the newest unexpired token that endpoint issued, answers a bad
one as Gmail does (`334` with a base64 JSON error, then `535 5.7.8`), and records messages.
"""

import base64
import json
import secrets
import ssl
import threading
import time
from dataclasses import dataclass, field
from email import message_from_bytes
from email.policy import default as default_policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import MISSING, AuthResult

GMAIL_BAD_CREDENTIALS = (
    "535 5.7.8 Username and Password not accepted. For more information, go to "
    "https://support.google.com/mail/?p=BadCredentials"
)


@dataclass
class IssuedToken:
    value: str
    expires_at: float  # time.monotonic()


@dataclass
class TokenEndpoint:
    """A local OAuth2 token endpoint for the refresh grant, on 127.0.0.1."""

    client_id: str = "medcor-client.apps.googleusercontent.com"
    client_secret: str = "medcor-client-secret"
    refresh_token: str = "1//medcor-refresh-token"
    lifetime: float = 3599
    calls: int = 0
    issued: list = field(default_factory=list)

    def __post_init__(self):
        self._lock = threading.Lock()
        self._server = None

    def start(self):
        """Serve on a free port of 127.0.0.1 in a thread."""
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                form = parse_qs(self.rfile.read(length).decode(errors="replace"))
                status, body = endpoint.answer({key: values[0] for key, values in form.items()})
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format, *args):
                pass  # the test output is no place for request lines

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="token-endpoint", daemon=True).start()
        return self

    def stop(self):
        """Stop serving."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def url(self):
        """The URL to post the refresh grant to (EMAIL_OAUTH2_TOKEN_URL)."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/token"

    def answer(self, form):
        """Return (HTTP status, JSON body) for one token request, as Google answers it."""
        with self._lock:
            self.calls += 1
            if form.get("grant_type") != "refresh_token":
                return 400, {"error": "unsupported_grant_type", "error_description": "Invalid grant_type"}
            if form.get("client_id") != self.client_id or form.get("client_secret") != self.client_secret:
                return 401, {
                    "error": "invalid_client",
                    "error_description": "The OAuth client was not found.",
                }
            if form.get("refresh_token") != self.refresh_token:
                return 400, {"error": "invalid_grant", "error_description": "Bad Request"}
            token = IssuedToken("ya29." + secrets.token_urlsafe(32), time.monotonic() + self.lifetime)
            self.issued.append(token)
            return 200, {
                "access_token": token.value,
                "expires_in": int(self.lifetime),
                "scope": "https://mail.google.com/",
                "token_type": "Bearer",
            }

    def is_current(self, value):
        """Tell whether `value` is the newest token issued and has not expired."""
        with self._lock:
            newest = self.issued[-1] if self.issued else None
            return newest is not None and newest.value == value and time.monotonic() < newest.expires_at

    def expire_all(self):
        """Make every token issued so far expired now."""
        with self._lock:
            for token in self.issued:
                token.expires_at = time.monotonic()


def xoauth2_string(user, token):
    """Return the base64 SASL XOAUTH2 initial response for `user` and access `token`."""
    return base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode()).decode()


def _parse_xoauth2(blob):
    fields = dict(part.split("=", 1) for part in blob.decode(errors="replace").split("\x01") if "=" in part)
    scheme, _, token = fields.get("auth", "").partition(" ")
    return fields.get("user", ""), token if scheme == "Bearer" else ""


class XOAuth2Handler:
    """aiosmtpd handler: AUTH XOAUTH2 against a TokenEndpoint, and a record of what was sent."""

    def __init__(self, endpoint, user="support@tcall.ai"):
        self.endpoint = endpoint
        self.user = user
        self.reset()

    def reset(self):
        """Forget the messages and logins."""
        self.messages = []
        self.logins = []  # (mechanism, user, accepted) per AUTH attempt
        self.condition = threading.Condition()

    async def auth_XOAUTH2(self, server, args):
        if len(args) > 1:
            blob = base64.b64decode(args[1] + "=" * (-len(args[1]) % 4))
        else:
            blob = await server.challenge_auth("")
            if blob is MISSING:
                return AuthResult(success=False, handled=True)
        user, token = _parse_xoauth2(blob)
        accepted = user == self.user and self.endpoint.is_current(token)
        self.logins.append(("XOAUTH2", user, accepted))
        if accepted:
            return AuthResult(success=True, auth_data=user)
        # Google first sends the error as a JSON challenge; the client answers with an empty line.
        error = {"status": "400", "schemes": "Bearer", "scope": "https://mail.google.com/"}
        if await server.challenge_auth(json.dumps(error)) is MISSING:
            return AuthResult(success=False, handled=True)
        return AuthResult(success=False, handled=False, message=GMAIL_BAD_CREDENTIALS)

    def authenticate(self, server, session, envelope, mechanism, auth_data):
        """Refuse PLAIN and LOGIN as Gmail refuses a password where OAuth2 is required."""
        login = getattr(auth_data, "login", b"")
        self.logins.append((mechanism, login.decode(errors="replace"), False))
        return AuthResult(success=False, handled=False, message=GMAIL_BAD_CREDENTIALS)

    async def handle_DATA(self, server, session, envelope):
        message = message_from_bytes(envelope.original_content, policy=default_policy)
        with self.condition:
            self.messages.append(
                {
                    "mail_from": envelope.mail_from,
                    "rcpt_tos": list(envelope.rcpt_tos),
                    "login": session.auth_data,
                    "message": message,
                    "raw": envelope.original_content,
                }
            )
            self.condition.notify_all()
        return "250 2.0.0 OK"

    def received(self, timeout=10.0, count=1):
        """Wait for at least `count` messages and return all of them."""
        with self.condition:
            if not self.condition.wait_for(lambda: len(self.messages) >= count, timeout=timeout):
                raise TimeoutError(f"{len(self.messages)} of {count} messages within {timeout}s")
            return list(self.messages)


class XOAuth2SMTP(Controller):
    """An aiosmtpd server on 127.0.0.1 that requires AUTH XOAUTH2, as Gmail with OAuth2 does."""

    def __init__(self, endpoint, port, user="support@tcall.ai", certificates=None):
        handler = XOAuth2Handler(endpoint, user)
        self.endpoint, self.user, self.certificates = endpoint, user, certificates
        tls_context = None
        if certificates is not None:
            tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls_context.load_cert_chain(certificates.cert_file, certificates.key_file)
        super().__init__(
            handler,
            hostname="127.0.0.1",
            port=port,
            data_size_limit=35882577,
            authenticator=handler.authenticate,
            auth_required=True,
            # With certificates (mta.make_certificates), AUTH only after STARTTLS, as at Gmail.
            auth_require_tls=tls_context is not None,
            require_starttls=tls_context is not None,
            tls_context=tls_context,
        )

    def client_ssl_context(self):
        """An ssl context for a client that trusts this server's CA."""
        # Not `ssl_context`: Controller keeps its implicit-TLS context under that name.
        return ssl.create_default_context(cafile=str(self.certificates.ca_file))

    def env(self):
        """Environment for a worker that sends here with XOAUTH2 and the endpoint's refresh token."""
        endpoint = self.endpoint
        return {
            "EMAIL_HOST": "127.0.0.1",
            "EMAIL_PORT": str(self.port),
            "EMAIL_HOST_USER": self.user,
            "EMAIL_HOST_PASSWORD": "",
            "EMAIL_USE_TLS": "true" if self.certificates else "false",
            "EMAIL_USE_SSL": "false",
            "EMAIL_AUTH_METHOD": "xoauth2",
            "EMAIL_OAUTH2_CLIENT_ID": endpoint.client_id,
            "EMAIL_OAUTH2_CLIENT_SECRET": endpoint.client_secret,
            "EMAIL_OAUTH2_REFRESH_TOKEN": endpoint.refresh_token,
            "EMAIL_OAUTH2_TOKEN_URL": endpoint.url,
            **({"SSL_CERT_FILE": str(self.certificates.ca_file)} if self.certificates else {}),
        }
