"""The contact-form POST of a peer: validate, store, queue one mail to support, answer 201."""

import json

from django.conf import settings
from django.db import transaction
from django.http import JsonResponse
from django.template.loader import render_to_string
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from .forms import ContactForm


def contact_view(queue_mail):
    """Return the view that calls `queue_mail(request_row, subject, text, html)` for each valid form."""

    @csrf_exempt
    @require_POST
    def submit(request):
        try:
            data = json.loads(request.body)
        except ValueError:
            return JsonResponse({"detail": "JSON parse error."}, status=400)
        form = ContactForm(data if isinstance(data, dict) else {})
        if not form.is_valid():
            return JsonResponse(form.errors, status=400)
        with transaction.atomic():
            row = form.save()
            context = {"row": row}
            queue_mail(
                row,
                f"Contact form: {row.subject or 'no subject'}",
                render_to_string("contact/support.txt", context),
                render_to_string("contact/support.html", context),
            )
        return JsonResponse({"message": "Queued.", "id": row.pk}, status=201)

    return submit


def support_address():
    """Where contact-form mail goes."""
    return settings.SUPPORT_EMAIL
