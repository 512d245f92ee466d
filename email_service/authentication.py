"""Staff authentication: API tokens that expire and are kept only as hashes, and the login trail.

A token is 32 random bytes shown once, when it is made; the database keeps its SHA-256 and a short
prefix by which staff can tell their tokens apart, so neither a database dump nor the admin gives
anyone a working token. Clients still send `Authorization: Token <key>`.

Admin logins are watched by django-axes (settings.py's staff-authentication block); each success
and each failure lands in the audit trail here.
"""

import hashlib
import hmac
import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.signals import user_logged_in, user_login_failed
from django.db import models
from django.dispatch import receiver
from django.http import JsonResponse
from django.shortcuts import render
from django.utils import timezone
from django.utils.translation import gettext_lazy as _
from rest_framework import authentication, exceptions

from . import audit, conf

# The part of a key kept in clear to tell tokens apart: 48 of its 256 bits, useless alone.
PREFIX_LENGTH = 8
# Writing last_used_at on every call would turn each API read into a write; once a minute will do.
LAST_USED_RESOLUTION_SECONDS = 60


def token_digest(key):
    """Return the hex SHA-256 under which a token's key is stored."""
    return hashlib.sha256(key.encode()).hexdigest()


class ApiTokenQuerySet(models.QuerySet):
    def issue(self, user, *, ttl=None):
        """Make a token for `user` valid for `ttl` (API_TOKEN_TTL by default); return (token, key)."""
        key = secrets.token_urlsafe(32)
        now = timezone.now()
        token = self.create(
            user=user,
            digest=token_digest(key),
            prefix=key[:PREFIX_LENGTH],
            created_at=now,
            expires_at=now + (conf.api_token_ttl() if ttl is None else ttl),
        )
        return token, key

    def expired(self, now=None):
        return self.filter(expires_at__lte=now or timezone.now())


class ApiToken(models.Model):
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens", editable=False
    )
    digest = models.CharField(_("SHA-256 of the key"), max_length=64, unique=True, editable=False)
    prefix = models.CharField(_("key starts with"), max_length=PREFIX_LENGTH, editable=False)
    created_at = models.DateTimeField(editable=False)
    expires_at = models.DateTimeField(db_index=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)

    objects = ApiTokenQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        verbose_name = _("API token")
        verbose_name_plural = _("API tokens")

    def __str__(self):
        return f"{self.prefix}… ({self.user})"

    @property
    def is_expired(self):
        return self.expires_at <= timezone.now()


def issue_token(user, *, ttl=None):
    """Make a new API token for `user` and return its key, the only time it is readable."""
    return ApiToken.objects.issue(user, ttl=ttl)[1]


class ExpiringTokenAuthentication(authentication.TokenAuthentication):
    """`Authorization: Token <key>` against hashed, expiring ApiToken rows."""

    model = ApiToken

    def authenticate_credentials(self, key):
        digest = token_digest(key)
        token = ApiToken.objects.select_related("user").filter(digest=digest).first()
        # The lookup is by digest; comparing again in constant time keeps no timing hint either way.
        if token is None or not hmac.compare_digest(token.digest, digest):
            raise exceptions.AuthenticationFailed(_("Invalid token."))
        now = timezone.now()
        if token.expires_at <= now:
            raise exceptions.AuthenticationFailed(_("Token has expired."))
        if not token.user.is_active:
            raise exceptions.AuthenticationFailed(_("User inactive or deleted."))
        if (
            token.last_used_at is None
            or (now - token.last_used_at).total_seconds() > LAST_USED_RESOLUTION_SECONDS
        ):
            ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
        return token.user, token


# --- the login trail ---------------------------------------------------------------------------


@receiver(user_logged_in, dispatch_uid="email_service.audit_login")
def record_login(sender, request, user, **kwargs):
    audit.record(audit.AuditAction.LOGIN, actor=user, request=request, channel=audit.AuditChannel.ADMIN)


@receiver(user_login_failed, dispatch_uid="email_service.audit_login_failed")
def record_login_failed(sender, credentials, request=None, **kwargs):
    username = credentials.get(get_user_model().USERNAME_FIELD) or credentials.get("username") or ""
    # Only a name that is a user's: anything else may be a password typed into the wrong box.
    known = (
        bool(username)
        and get_user_model()._default_manager.filter(**{get_user_model().USERNAME_FIELD: username}).exists()
    )
    audit.record(
        audit.AuditAction.LOGIN_FAILED,
        # An empty string, not None: record() would otherwise take the anonymous request.user.
        actor=username if known else "",
        request=request,
        channel=audit.AuditChannel.ADMIN,
    )


def lockout_response(request, original_response=None, credentials=None):
    """Answer a locked-out login: JSON under /api/, otherwise a page saying when to try again."""
    minutes = max(1, round(conf.staff_login_cooloff().total_seconds() / 60))
    message = (
        f"Too many failed logins. Logins for this account or from this address are refused for "
        f"{minutes} minute{'s' if minutes != 1 else ''} after the last failed attempt."
    )
    if request.path.startswith("/api/"):
        return JsonResponse({"detail": message}, status=429)
    return render(
        request, "email_service/lockout.html", {"message": message, "title": "Login locked"}, status=429
    )
