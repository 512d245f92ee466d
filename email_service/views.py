"""The HTTP surface: a thin viewset over the services, on DRF's own hooks."""

import logging
import uuid

from django.core.files.storage import default_storage
from django.db import transaction
from django.http import FileResponse, Http404
from django.utils.cache import patch_vary_headers
from drf_spectacular.utils import extend_schema_view
from rest_framework import status, viewsets
from rest_framework.authentication import SessionAuthentication
from rest_framework.decorators import action
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.permissions import AllowAny
from rest_framework.response import Response

from . import actions, audit, honeypot, outbox, reports, schema
from .audit import AuditAction, AuditChannel
from .authentication import ExpiringTokenAuthentication
from .exceptions import Conflict, SizeLimitedJSONParser
from .filters import EmailRequestFilter
from .idempotency import Replay, idempotent
from .models import EmailRequest, EmailStatus
from .pagination import EmailRequestPagination
from .permissions import EmailRequestPermission, can_view_personal_data, required_permission
from .replies import ReplyNotAllowed, replies_of, reply_create
from .serializers import (
    EmailReplyCreateSerializer,
    EmailReplySerializer,
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

    # Replies are rows of the same outbox; they are reached through `replies` below.
    queryset = EmailRequest.objects.submissions()
    authentication_classes = [ExpiringTokenAuthentication, SessionAuthentication]
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

    def finalize_response(self, request, response, *args, **kwargs):
        response = super().finalize_response(request, response, *args, **kwargs)
        # The same URL answers differently by caller, and a staff answer may carry health data:
        # no cache may keep it or hand one caller's answer to another.
        patch_vary_headers(response, ("Authorization", "Cookie"))
        if request.user and request.user.is_authenticated:
            response["Cache-Control"] = "private, no-store"
        return response

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
        elif self.action in ("list", "retrieve"):
            # Anonymous callers get no personal field, so none is read (and none decrypted).
            queryset = queryset.only_public()
        return queryset

    def filter_queryset(self, queryset):
        filtered = super().filter_queryset(queryset)
        if self.action != "list" or can_view_personal_data(self.request):
            return filtered
        # The honeypot's catch is listed, to anyone but staff, as a real request would be: through
        # the same filters, in the same order (the filters already refused anything invalid).
        decoys = self.filterset_class(
            self.request.query_params, queryset=honeypot.decoys_as_rows(), request=self.request
        ).qs
        return honeypot.RequestsWithDecoys(filtered, decoys)

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
        data = serializer.contact_data()
        upload = data.pop("file_attached", None)
        if serializer.is_spam():
            # Answered like a success, and later read like one (see `retrieve`), so that the bot
            # learns nothing; nothing it sent is stored or sent on.
            decoy = honeypot.create_decoy(has_attachment=upload is not None)
            logger.info("Honeypot submission dropped")
            return {
                "message": ACCEPTED_MESSAGE,
                "email_request_id": str(decoy.pk),
                "status": EmailStatus.PENDING,
                "task_id": str(uuid.uuid4()),
            }
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
        try:
            response = super().retrieve(request, *args, **kwargs)
        except Http404:
            # A submission the honeypot caught reads, to anyone but staff, as a real one would.
            row = (
                None if can_view_personal_data(request) else honeypot.decoy_row(kwargs.get(self.lookup_field))
            )
            if row is None:
                raise
            return Response(EmailRequestPublicSerializer(row).data)
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
        return Response(reports.cached_statistics(public=not can_view_personal_data(request)))

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

    # Few per request: answered whole, not paged nor filtered.
    @action(detail=True, methods=["get", "post"], pagination_class=None, filter_backends=[])
    def replies(self, request, pk=None):
        email_request = self.get_object()
        if request.method == "POST":
            serializer = EmailReplyCreateSerializer(data=request.data)
            serializer.is_valid(raise_exception=True)
            try:
                reply = reply_create(
                    email_request=email_request,
                    body=serializer.validated_data["body"],
                    request=request,
                    channel=AuditChannel.API,
                )
            except ReplyNotAllowed as exc:
                raise Conflict(str(exc)) from exc
            return Response(EmailReplySerializer(reply).data, status=status.HTTP_201_CREATED)
        replies = list(replies_of(email_request))
        self._record(AuditAction.VIEW, [email_request], replies=len(replies))
        return Response(EmailReplySerializer(replies, many=True).data)

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
