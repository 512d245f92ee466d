"""The contact form page: served by the service, posting to the API, and working without JavaScript.

With JavaScript, static/email_service/contact.js posts the form to the API itself. Without it, the
browser posts here, and this view hands the request to the API's own create view, so the serializer,
the honeypot, the rate limit and the Idempotency-Key behave exactly as they do for the API.
"""

import functools
import uuid

from django.shortcuts import redirect, render
from django.template.defaultfilters import filesizeformat
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_http_methods

from . import captcha, conf, honeypot
from .models import EmailRequest, EmailStatus
from .serializers import FORM_STAMP_FIELD, HONEYPOT_FIELD, EmailRequestCreateSerializer
from .validators import allowed_extensions
from .views import EmailRequestViewSet

# Scripts and styles from this origin only (no inline script), fetches to this origin, never framed;
# a CAPTCHA provider's widget adds its own sources (captcha.Provider.sources).
CONTENT_SECURITY_POLICY = {
    "default-src": ("'none'",),
    "script-src": ("'self'",),
    "style-src": ("'self'",),
    "img-src": ("'self'", "data:"),
    "connect-src": ("'self'",),
    "frame-src": (),
    "form-action": ("'self'",),
    "frame-ancestors": ("'none'",),
    "base-uri": ("'none'",),
}


def content_security_policy(provider=None):
    """Return the page's Content-Security-Policy header, with what `provider`'s widget needs."""
    extra = provider.sources if provider else {}
    directives = []
    for directive, sources in CONTENT_SECURITY_POLICY.items():
        sources = (*sources, *extra.get(directive, ()))
        if sources:  # an empty frame-src falls back to default-src 'none'
            directives.append(" ".join((directive, *sources)))
    return "; ".join(directives)


# (name, label, input type, autocomplete, hint); required and lengths come from the serializer.
FIELDS = [
    ("full_name", "Full name", "text", "name", ""),
    ("email", "Email address", "email", "email", "We reply to this address."),
    ("phone", "Phone", "tel", "tel", "Digits, spaces and + - ( ) . only."),
    ("job_profession", "Job or profession", "text", "organization-title", ""),
    ("subject", "Subject", "text", "off", ""),
    ("message", "Message", "textarea", "off", "Please do not include more health details than we need."),
]
FILE_FIELD = "file_attached"

STATUS_TEXT = {
    EmailStatus.PENDING: "Queued for delivery",
    EmailStatus.PROCESSING: "Being delivered",
    EmailStatus.SENT: "Delivered to our support team",
    EmailStatus.FAILED: "Could not be delivered",
    EmailStatus.CANCELLED: "Cancelled",
}

ALREADY_SENT = "This form was already sent once. Press Send message to send these details as a new message."

_submit_to_api = EmailRequestViewSet.as_view({"post": "create"})


def with_security_headers(view):
    """Send the page's Content-Security-Policy and nosniff with every answer of `view`."""

    @functools.wraps(view)
    def wrapper(request, *args, **kwargs):
        response = view(request, *args, **kwargs)
        response["Content-Security-Policy"] = content_security_policy(captcha.active_provider())
        response["X-Content-Type-Options"] = "nosniff"
        return response

    return wrapper


# Exempt from CSRF like the API it stands for: the form acts with no one's authority, and the
# embedded form on the website posts here from another origin, where no token can be had.
@csrf_exempt
@require_http_methods(["GET", "POST"])
@never_cache  # each rendering carries its own idempotency key: a shared cached copy would mix senders
@with_security_headers
def contact_page(request):
    """Show the contact form; without JavaScript, also take its POST through the API's create view."""
    if request.method == "GET":
        return _render_form(request)
    key = request.POST.get("idempotency_key", "").strip()
    if key:
        # A plain form cannot send headers; the key the page was rendered with makes a double
        # click of the submit button create one request, as the header does for the script.
        request.META["HTTP_IDEMPOTENCY_KEY"] = key
    response = _submit_to_api(request)
    body = response.data
    if response.status_code in (200, 201):
        return redirect("contact-sent", pk=body["email_request_id"])
    if response.status_code == 409:
        # The first of two identical posts is still being stored: it will be, once.
        return render(request, "email_service/contact_sent.html", {"reference": None}, status=202)
    if response.status_code == 422:
        # The key was used for a different message (a form sent, then edited after going back).
        errors = {"detail": [ALREADY_SENT]}
        key = ""
    elif response.status_code == 429:
        wait = int(response.get("Retry-After") or 60)
        message = f"You have sent several messages in a short time. Please try again in {wait_text(wait)}."
        errors = {"detail": [message]}
    else:
        errors = {name: _messages(messages) for name, messages in body.items()}
    page = _render_form(request, errors=errors, values=request.POST, key=key, status=response.status_code)
    if response.has_header("Retry-After"):
        page["Retry-After"] = response["Retry-After"]
    return page


@require_GET
@with_security_headers
def contact_sent(request, pk):
    """Thank the sender and show the reference and the delivery status, for the form without JavaScript."""
    status = EmailRequest.objects.filter(pk=pk).values_list("status", flat=True).first()
    if status is None:
        # The honeypot's catch is thanked exactly as a real sender is.
        decoy = honeypot.decoy_row(pk)
        status = decoy["status"] if decoy else None
    context = {
        "reference": pk,
        "status": status,
        "status_text": STATUS_TEXT.get(status, "Received"),
        "is_final": status in (EmailStatus.SENT, EmailStatus.FAILED, EmailStatus.CANCELLED),
    }
    return render(request, "email_service/contact_sent.html", context)


def wait_text(seconds):
    """Say a wait in the largest unit that keeps it readable, rounded up."""
    if seconds < 90:
        return f"{seconds} second{'s' if seconds != 1 else ''}"
    minutes = -(-seconds // 60)
    if minutes < 90:
        return f"{minutes} minutes"
    return f"{-(-minutes // 60)} hours"


def _messages(messages):
    # Each message once, in order, even if two validators of a field said the same thing.
    messages = messages if isinstance(messages, list) else [messages]
    return list(dict.fromkeys(str(message) for message in messages))


def _render_form(request, *, errors=None, values=None, key="", status=200):
    errors = errors or {}
    values = values or {}
    serializer_fields = EmailRequestCreateSerializer().fields
    fields = [
        {
            "name": name,
            "label": label,
            "type": input_type,
            "autocomplete": autocomplete,
            "hint": hint,
            "required": serializer_fields[name].required,
            "max_length": serializer_fields[name].max_length,
            "value": values.get(name, ""),
            "errors": errors.get(name, []),
        }
        for name, label, input_type, autocomplete, hint in FIELDS
    ]
    provider = captcha.active_provider()
    known = {name for name, *_ in FIELDS} | {FILE_FIELD} | ({provider.token_field} if provider else set())
    context = {
        "fields": fields,
        "file_errors": errors.get(FILE_FIELD, []),
        "other_errors": [message for name in errors if name not in known for message in errors[name]],
        "has_errors": bool(errors),
        "accept": ",".join(allowed_extensions()),
        "file_types": ", ".join(ext.lstrip(".").upper() for ext in allowed_extensions()),
        "max_size": filesizeformat(conf.attachment_max_bytes()),
        "honeypot": HONEYPOT_FIELD,
        "idempotency_key": key or uuid.uuid4(),
        "form_stamp_field": FORM_STAMP_FIELD,
        # The form sent back with errors keeps the time it was first served: the person has
        # been at it since then.
        "form_stamp": honeypot.genuine_stamp(values.get(FORM_STAMP_FIELD)) or honeypot.form_stamp(),
        "captcha": provider,
        "captcha_site_key": conf.captcha_site_key(),
        "captcha_errors": errors.get(provider.token_field, []) if provider else [],
    }
    return render(request, "email_service/contact.html", context, status=status)
