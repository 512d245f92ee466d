"""The HTTP surface: a thin viewset over the services, and JSON errors everywhere under /api/."""

import logging
import uuid

from django.core.files.storage import default_storage
from django.db import connection
from django.http import FileResponse, JsonResponse
from django.utils import timezone
from django.views import defaults
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiExample,
    OpenApiParameter,
    OpenApiRequest,
    OpenApiResponse,
    PolymorphicProxySerializer,
    extend_schema,
    extend_schema_view,
)
from rest_framework import status, viewsets
from rest_framework.authentication import SessionAuthentication, TokenAuthentication
from rest_framework.decorators import action
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.permissions import AllowAny
from rest_framework.response import Response

from . import actions, conf, outbox, reports
from .exceptions import Conflict, SizeLimitedJSONParser
from .filters import EmailRequestFilter
from .idempotency import Replay, idempotent
from .models import EmailRequest, EmailStatus
from .pagination import EmailRequestPagination
from .permissions import EmailRequestPermission, can_view_personal_data, required_permission
from .ratelimits import client_ip, rate_limited
from .serializers import (
    DetailSerializer,
    EmailRequestCreatedSerializer,
    EmailRequestCreateSerializer,
    EmailRequestJSONSerializer,
    EmailRequestPublicSerializer,
    EmailRequestStaffSerializer,
    EmailRequestUpdateSerializer,
    RetryFailedSerializer,
    StatisticsSerializer,
)

logger = logging.getLogger(__name__)

ACCEPTED_MESSAGE = "Your message has been received and will be delivered to our support team."


def _read_rate():
    return conf.ratelimit_read()


def _create_rate():
    return conf.ratelimit_create()


_ERRORS = {
    400: OpenApiResponse(OpenApiTypes.OBJECT, description="Field errors, as {field: [message]}."),
    401: OpenApiResponse(DetailSerializer, description="Not authenticated."),
    403: OpenApiResponse(DetailSerializer, description="No permission."),
    404: OpenApiResponse(DetailSerializer, description="No such request."),
    409: OpenApiResponse(DetailSerializer, description="The request's status forbids this."),
    429: OpenApiResponse(DetailSerializer, description="Rate-limited; see Retry-After."),
}


def _errors(*codes):
    return {code: _ERRORS[code] for code in codes}


# Anonymous callers get the public shape, staff with view permission the full one.
def _email_request_view(many=False):
    return PolymorphicProxySerializer(
        component_name="EmailRequestView",
        serializers=[EmailRequestPublicSerializer, EmailRequestStaffSerializer],
        resource_type_field_name=None,
        many=many,
    )


# The attachment types the schema announces: what libmagic must find in the file's content.
ATTACHMENT_MEDIA_TYPES = [
    "application/pdf",
    "image/png",
    "image/jpeg",
    "image/gif",
    "image/webp",
    "text/plain",
    "text/csv",
]
NO_NUL = "^[^\\x00]*$"


@extend_schema_view(
    list=extend_schema(
        summary="List requests (redacted unless staff)",
        parameters=[
            OpenApiParameter(
                "email", str, pattern=NO_NUL, description="Staff only: the submitter's address."
            ),
            OpenApiParameter(
                "search",
                str,
                pattern=NO_NUL,
                description="Staff only: text in name, email, subject or message.",
            ),
            OpenApiParameter(
                "ordering",
                str,
                pattern=r"^-?(created_at|sent_at)(,-?(created_at|sent_at))*$",
                description="Comma-separated fields, `-` for descending: created_at, sent_at.",
            ),
        ],
        responses={200: _email_request_view(many=True), **_errors(400, 403, 404, 429)},
    ),
    retrieve=extend_schema(
        summary="One request (redacted unless staff)",
        responses={200: _email_request_view(), **_errors(404, 429)},
    ),
    update=extend_schema(
        summary="Edit the contact fields of a request not yet SENT",
        responses={200: EmailRequestStaffSerializer, **_errors(400, 401, 403, 404, 409)},
    ),
    partial_update=extend_schema(
        summary="Edit some contact fields of a request not yet SENT",
        responses={200: EmailRequestStaffSerializer, **_errors(400, 401, 403, 404, 409)},
    ),
    destroy=extend_schema(
        summary="Delete a request and its file",
        responses={204: None, **_errors(401, 403, 404)},
    ),
)
class EmailRequestViewSet(viewsets.ModelViewSet):
    """Contact-form submissions and their delivery."""

    queryset = EmailRequest.objects.all()
    authentication_classes = [TokenAuthentication, SessionAuthentication]
    permission_classes = [EmailRequestPermission]
    parser_classes = [SizeLimitedJSONParser, MultiPartParser, FormParser]
    filterset_class = EmailRequestFilter
    pagination_class = EmailRequestPagination

    def get_permissions(self):
        if required_permission(self.action) is None:
            return [AllowAny()]
        return super().get_permissions()

    def get_queryset(self):
        queryset = super().get_queryset()
        if self.action in ("list", "retrieve") and can_view_personal_data(self.request):
            queryset = queryset.prefetch_related("attempts")
        return queryset

    def get_serializer_class(self):
        if self.action == "create":
            # Only multipart can carry a file; any other body is read without one.
            if self.request.content_type.startswith("multipart/"):
                return EmailRequestCreateSerializer
            return EmailRequestJSONSerializer
        if self.action in ("update", "partial_update"):
            return EmailRequestUpdateSerializer
        if can_view_personal_data(self.request):
            return EmailRequestStaffSerializer
        return EmailRequestPublicSerializer

    @extend_schema(
        summary="Submit the contact form",
        request={
            "application/json": EmailRequestJSONSerializer,
            "multipart/form-data": OpenApiRequest(
                EmailRequestCreateSerializer,
                encoding={"file_attached": {"contentType": ", ".join(ATTACHMENT_MEDIA_TYPES)}},
            ),
        },
        responses={
            201: EmailRequestCreatedSerializer,
            200: OpenApiResponse(
                EmailRequestCreatedSerializer, description="A repeat with the same Idempotency-Key."
            ),
            **_errors(400, 429),
            415: OpenApiResponse(DetailSerializer, description="Unsupported content type."),
            422: OpenApiResponse(DetailSerializer, description="Idempotency-Key reused."),
        },
        examples=[
            OpenApiExample(
                "Contact form",
                request_only=True,
                value={
                    "full_name": "John Doe",
                    "email": "john.doe@example.com",
                    "phone": "+1-555-123-4567",
                    "job_profession": "Software Engineer",
                    "subject": "General Inquiry",
                    "message": "I would like to know more about your services.",
                },
            )
        ],
    )
    @rate_limited("email-create", _create_rate)
    def create(self, request, *args, **kwargs):
        try:
            with idempotent(request) as remember:
                serializer = self.get_serializer(data=request.data)
                serializer.is_valid(raise_exception=True)
                body = self._accept(serializer)
                remember(body)
        except Replay as replay:
            return Response(replay.body, status=status.HTTP_200_OK)
        return Response(body, status=status.HTTP_201_CREATED)

    def _accept(self, serializer):
        if serializer.is_spam():
            # Answered like a success so that the bot learns nothing; nothing is stored or sent.
            logger.info("Honeypot submission dropped")
            fake_id = str(uuid.uuid4())
            return {
                "message": ACCEPTED_MESSAGE,
                "email_request_id": fake_id,
                "status": EmailStatus.PENDING,
                "task_id": str(uuid.uuid4()),
            }
        data = dict(serializer.validated_data)
        data.pop("website", None)
        upload = data.pop("file_attached", None)
        email_request = outbox.create_email_request(
            data=data,
            upload=upload,
            content_type=serializer.context.get("attachment_content_type", ""),
            client_ip=client_ip(self.request) or None,
        )
        return {
            "message": ACCEPTED_MESSAGE,
            "email_request_id": str(email_request.pk),
            "status": email_request.status,
            "task_id": email_request.celery_task_id,
        }

    @rate_limited("email-read", _read_rate)
    def list(self, request, *args, **kwargs):
        return super().list(request, *args, **kwargs)

    @rate_limited("email-read", _read_rate)
    def retrieve(self, request, *args, **kwargs):
        return super().retrieve(request, *args, **kwargs)

    def update(self, request, *args, **kwargs):
        partial = kwargs.pop("partial", False)
        instance = self.get_object()
        if not instance.is_editable():
            raise Conflict("A SENT request can no longer be edited.")
        serializer = self.get_serializer(instance, data=request.data, partial=partial)
        serializer.is_valid(raise_exception=True)
        # Guarded like every transition: the row is written only if it is still not SENT.
        updated = (
            EmailRequest.objects.filter(pk=instance.pk)
            .exclude(status=EmailStatus.SENT)
            .update(**serializer.validated_data, updated_at=timezone.now())
        )
        if not updated:
            raise Conflict("A SENT request can no longer be edited.")
        instance.refresh_from_db()
        return Response(EmailRequestStaffSerializer(instance, context=self.get_serializer_context()).data)

    @extend_schema(summary="Delivery statistics", responses={200: StatisticsSerializer, **_errors(429)})
    @action(detail=False, methods=["get"])
    @rate_limited("email-read", _read_rate)
    def statistics(self, request):
        return Response(reports.cached_statistics())

    @extend_schema(
        summary="Requeue every FAILED request",
        request=None,
        responses={200: RetryFailedSerializer, **_errors(401, 403)},
    )
    @action(detail=False, methods=["post"])
    def retry_failed(self, request):
        count = actions.retry_failed()
        return Response({"message": f"{count} failed request(s) requeued.", "count": count})

    @extend_schema(
        summary="Cancel a PENDING request",
        request=None,
        responses={200: EmailRequestPublicSerializer, **_errors(401, 403, 404, 409)},
    )
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        email_request = self.get_object()
        try:
            actions.cancel_email_request(email_request)
        except actions.TransitionNotAllowed as exc:
            raise Conflict(str(exc)) from exc
        email_request.refresh_from_db()
        return Response(EmailRequestPublicSerializer(email_request).data)

    @extend_schema(
        summary="Download the attachment",
        responses={
            (200, "*/*"): OpenApiResponse(OpenApiTypes.BINARY, description="The file, as stored."),
            **_errors(401, 403, 404),
        },
    )
    @action(detail=True, methods=["get"], url_name="attachment")
    def attachment(self, request, pk=None):
        email_request = self.get_object()
        if not email_request.has_attachment:
            return Response({"detail": "This request has no attachment."}, status=404)
        response = FileResponse(
            default_storage.open(email_request.file_attached.name, "rb"),
            as_attachment=True,
            filename=email_request.attachment_name or "attachment",
            content_type=email_request.attachment_content_type or "application/octet-stream",
        )
        response["X-Content-Type-Options"] = "nosniff"
        response["Cache-Control"] = "private, no-store"
        return response


def healthz(request):
    """Report whether the database and the broker answer, and how old the oldest PENDING row is."""
    checks = {"database": _check_database(), "broker": _check_broker()}
    healthy = all(value == "ok" for value in checks.values())
    body = {"status": "ok" if healthy else "error", **checks}
    if checks["database"] == "ok":
        body["oldest_pending_seconds"] = EmailRequest.objects.oldest_pending_age()
    return JsonResponse(body, status=200 if healthy else 503)


def _check_database():
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return "ok"
    except Exception as exc:
        return f"error: {type(exc).__name__}"


def _check_broker():
    from medcor_backend2.celery import app

    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        return "ok"
    except Exception as exc:
        return f"error: {type(exc).__name__}"


def not_found(request, exception=None):
    """Answer JSON under /api/, Django's page elsewhere."""
    if request.path.startswith("/api/"):
        return JsonResponse({"detail": "Not found."}, status=404)
    return defaults.page_not_found(request, exception)


def bad_request(request, exception=None):
    """Answer JSON under /api/, Django's page elsewhere."""
    if request.path.startswith("/api/"):
        return JsonResponse({"detail": "Bad request."}, status=400)
    return defaults.bad_request(request, exception)


def permission_denied(request, exception=None):
    """Answer JSON under /api/, Django's page elsewhere."""
    if request.path.startswith("/api/"):
        return JsonResponse({"detail": "Permission denied."}, status=403)
    return defaults.permission_denied(request, exception)


def server_error(request):
    """Answer JSON under /api/, Django's page elsewhere."""
    if request.path.startswith("/api/"):
        return JsonResponse({"detail": "Internal server error."}, status=500)
    return defaults.server_error(request)
