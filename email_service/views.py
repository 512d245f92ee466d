"""The HTTP surface: a thin viewset over the services, on DRF's own hooks."""

import logging
import uuid

from django.core.files.storage import default_storage
from django.db import transaction
from django.http import FileResponse
from drf_spectacular.utils import extend_schema_view
from rest_framework import status, viewsets
from rest_framework.authentication import SessionAuthentication, TokenAuthentication
from rest_framework.decorators import action
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.permissions import AllowAny
from rest_framework.response import Response

from . import actions, audit, outbox, reports, schema
from .audit import AuditAction, AuditChannel
from .exceptions import Conflict, SizeLimitedJSONParser
from .filters import EmailRequestFilter
from .idempotency import Replay, idempotent
from .models import EmailRequest, EmailStatus
from .pagination import EmailRequestPagination
from .permissions import EmailRequestPermission, can_view_personal_data, required_permission
from .serializers import (
    EmailRequestCreateSerializer,
    EmailRequestJSONSerializer,
    EmailRequestPublicSerializer,
    EmailRequestStaffSerializer,
    EmailRequestUpdateSerializer,
)
from .throttling import CreateRateThrottle, ReadRateThrottle, client_ip

logger = logging.getLogger(__name__)

ACCEPTED_MESSAGE = "Your message has been received and will be delivered to our support team."
# List filters whose value is a person's data: a list using one is recorded as a search.
SEARCH_FILTERS = ("search", "email")


@extend_schema_view(**schema.EMAIL_REQUEST_VIEWSET)
class EmailRequestViewSet(viewsets.ModelViewSet):
    """Contact-form submissions and their delivery."""

    queryset = EmailRequest.objects.all()
    authentication_classes = [TokenAuthentication, SessionAuthentication]
    permission_classes = [EmailRequestPermission]
    parser_classes = [SizeLimitedJSONParser, MultiPartParser, FormParser]
    filterset_class = EmailRequestFilter
    pagination_class = EmailRequestPagination
    # The rate limits per action; an action not listed here is not limited.
    throttle_classes_by_action = {
        "create": [CreateRateThrottle],
        "list": [ReadRateThrottle],
        "retrieve": [ReadRateThrottle],
        "statistics": [ReadRateThrottle],
    }

    def get_permissions(self):
        if required_permission(self.action) is None:
            return [AllowAny()]
        return super().get_permissions()

    def get_throttles(self):
        return [throttle() for throttle in self.throttle_classes_by_action.get(self.action, [])]

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
            return {
                "message": ACCEPTED_MESSAGE,
                "email_request_id": str(uuid.uuid4()),
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

    # --- the audit trail: staff reads of personal data and every staff action ---------------------
    def list(self, request, *args, **kwargs):
        response = super().list(request, *args, **kwargs)
        # Anonymous callers get the redacted shape and cost nothing here.
        if can_view_personal_data(request):
            searched = any(request.query_params.get(name) for name in SEARCH_FILTERS)
            page = response.data.get("results", []) if isinstance(response.data, dict) else response.data
            self._record(AuditAction.SEARCH if searched else AuditAction.LIST, [row["id"] for row in page])
        return response

    def retrieve(self, request, *args, **kwargs):
        response = super().retrieve(request, *args, **kwargs)
        if can_view_personal_data(request):
            self._record(AuditAction.VIEW, [response.data["id"]])
        return response

    def _record(self, action, request_ids, **detail):
        audit.record(
            action, request=self.request, channel=AuditChannel.API, request_ids=request_ids, detail=detail
        )

    def get_object(self):
        email_request = super().get_object()
        # A SENT request is refused before its body is read: 409 whatever the body holds.
        if self.action in ("update", "partial_update") and not email_request.is_editable():
            raise Conflict("A SENT request can no longer be edited.")
        return email_request

    def perform_update(self, serializer):
        try:
            # The action and its entry commit together: no change goes unrecorded.
            with transaction.atomic():
                actions.edit_email_request(serializer.instance, serializer.validated_data)
                self._record(AuditAction.UPDATE, [serializer.instance], fields=len(serializer.validated_data))
        except actions.TransitionNotAllowed as exc:
            raise Conflict(str(exc)) from exc
        serializer.instance.refresh_from_db()

    def perform_destroy(self, instance):
        pk = instance.pk  # deleting sets it to None
        with transaction.atomic():
            super().perform_destroy(instance)
            self._record(AuditAction.DELETE, [pk])

    @action(detail=False, methods=["get"])
    def statistics(self, request):
        return Response(reports.cached_statistics())

    @action(detail=False, methods=["post"])
    def retry_failed(self, request):
        with transaction.atomic():
            requeued = actions.retry_failed_requests()
            self._record(AuditAction.RETRY, requeued, requests=len(requeued))
        count = len(requeued)
        return Response({"message": f"{count} failed request(s) requeued.", "count": count})

    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        email_request = self.get_object()
        try:
            with transaction.atomic():
                actions.cancel_email_request(email_request)
                self._record(AuditAction.CANCEL, [email_request])
        except actions.TransitionNotAllowed as exc:
            raise Conflict(str(exc)) from exc
        email_request.refresh_from_db()
        return Response(EmailRequestPublicSerializer(email_request).data)

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
        # Once the file opened: a download that cannot start is no access.
        self._record(AuditAction.DOWNLOAD, [email_request])
        return response
