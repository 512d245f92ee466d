"""Server-side CAPTCHA checks: Cloudflare Turnstile, hCaptcha and reCAPTCHA v2.

The three speak one siteverify protocol: a form-encoded POST of `secret`, `response` (the token the
widget put in the form, under the provider's own field name) and `remoteip`, answered with JSON
`{"success": bool, "error-codes": [...]}`. A provider that cannot be reached makes the check
UNAVAILABLE, never REFUSED: a person's message lost to the provider's outage costs more than one
spam message, so the caller accepts the form and marks it unverified.
"""

import logging
from dataclasses import dataclass

import requests
from django.core.exceptions import ImproperlyConfigured

from . import conf

logger = logging.getLogger(__name__)

VERIFIED, REFUSED, UNAVAILABLE = "verified", "refused", "unavailable"

# Error codes that blame our request or the provider, not the token: solving the CAPTCHA again
# would not help, so they count as an unavailable provider (and our own mistakes are logged).
NOT_THE_TOKENS_FAULT = {
    "missing-input-secret",
    "invalid-input-secret",
    "sitekey-secret-mismatch",
    "internal-error",
}
# Tokens are opaque; the providers' are a few kilobytes at most.
TOKEN_MAX_LENGTH = 8192


@dataclass(frozen=True)
class Provider:
    """One provider: its token's field name, its siteverify, its widget and what its widget loads."""

    name: str
    token_field: str
    verify_url: str
    script_url: str
    widget_class: str
    # Content-Security-Policy directive -> the sources its widget needs, from the provider's docs.
    sources: dict


PROVIDERS = {
    "turnstile": Provider(
        name="turnstile",
        token_field="cf-turnstile-response",
        verify_url="https://challenges.cloudflare.com/turnstile/v0/siteverify",
        script_url="https://challenges.cloudflare.com/turnstile/v0/api.js",
        widget_class="cf-turnstile",
        sources={
            "script-src": ("https://challenges.cloudflare.com",),
            "frame-src": ("https://challenges.cloudflare.com",),
        },
    ),
    "hcaptcha": Provider(
        name="hcaptcha",
        token_field="h-captcha-response",
        verify_url="https://api.hcaptcha.com/siteverify",
        script_url="https://js.hcaptcha.com/1/api.js",
        widget_class="h-captcha",
        sources=dict.fromkeys(
            ("script-src", "frame-src", "style-src", "connect-src"),
            ("https://hcaptcha.com", "https://*.hcaptcha.com"),
        ),
    ),
    "recaptcha": Provider(
        name="recaptcha",
        token_field="g-recaptcha-response",
        verify_url="https://www.google.com/recaptcha/api/siteverify",
        script_url="https://www.google.com/recaptcha/api.js",
        widget_class="g-recaptcha",
        sources={
            "script-src": ("https://www.google.com/recaptcha/", "https://www.gstatic.com/recaptcha/"),
            "frame-src": ("https://www.google.com/recaptcha/", "https://recaptcha.google.com/recaptcha/"),
        },
    ),
}


def active_provider():
    """Return the Provider that EMAIL_CAPTCHA_PROVIDER names, or None when it is `none`."""
    name = conf.captcha_provider()
    if not name:
        return None
    try:
        return PROVIDERS[name]
    except KeyError:
        raise ImproperlyConfigured(
            f"EMAIL_CAPTCHA_PROVIDER must be none, {', '.join(PROVIDERS)}; not {name!r}."
        ) from None


def verify(token, *, remote_ip=None, provider=None):
    """Ask the provider's siteverify about `token`; return VERIFIED, REFUSED or UNAVAILABLE."""
    provider = provider or active_provider()
    fields = {"secret": conf.captcha_secret(), "response": token}
    if remote_ip:
        fields["remoteip"] = remote_ip
    try:
        answer = requests.post(
            conf.captcha_verify_url() or provider.verify_url, data=fields, timeout=conf.captcha_timeout()
        )
        body = answer.json()
    except (requests.RequestException, ValueError) as error:
        logger.warning("CAPTCHA %s unavailable: %s", provider.name, type(error).__name__)
        return UNAVAILABLE
    if answer.status_code >= 500 or not isinstance(body, dict) or not isinstance(body.get("success"), bool):
        logger.warning("CAPTCHA %s unavailable: HTTP %s", provider.name, answer.status_code)
        return UNAVAILABLE
    if body["success"]:
        return VERIFIED
    codes = body.get("error-codes") or []
    codes = [str(code) for code in codes] if isinstance(codes, list) else [str(codes)]
    if NOT_THE_TOKENS_FAULT.intersection(codes):
        logger.error("CAPTCHA %s cannot check tokens: %s", provider.name, ", ".join(codes))
        return UNAVAILABLE
    logger.info("CAPTCHA %s refused a token: %s", provider.name, ", ".join(codes) or "no reason given")
    return REFUSED
