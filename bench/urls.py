"""The service's URLs plus /bench/baseline/, which exists only under bench.settings."""

import json

from django.http import JsonResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt

from email_service.models import CONTACT_FIELDS, EmailRequest, EmailStatus
from medcor_backend2.urls import handler400, handler403, handler404, handler500  # noqa: F401
from medcor_backend2.urls import urlpatterns as service_urlpatterns


@csrf_exempt
def baseline_insert(request):
    """Insert the posted contact fields as one row and answer 201: the floor under POST /api/email/emails/."""
    data = json.loads(request.body)
    # Stored CANCELLED so that the outbox relay leaves it alone: the baseline must not make mail.
    row = EmailRequest.objects.create(
        **{key: data.get(key, "") for key in CONTACT_FIELDS}, status=EmailStatus.CANCELLED
    )
    return JsonResponse({"email_request_id": str(row.pk), "status": row.status}, status=201)


urlpatterns = [path("bench/baseline/", baseline_insert), *service_urlpatterns]
