"""The OpenAPI description of the API: every drf-spectacular annotation, and the schema's hooks."""

import re

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiExample,
    OpenApiParameter,
    OpenApiRequest,
    OpenApiResponse,
    PolymorphicProxySerializer,
    extend_schema,
)

from . import validators
from .serializers import (
    DetailSerializer,
    EmailReplyCreateSerializer,
    EmailReplySerializer,
    EmailRequestCreatedSerializer,
    EmailRequestCreateSerializer,
    EmailRequestJSONSerializer,
    EmailRequestPublicSerializer,
    EmailRequestStaffSerializer,
    RetryFailedSerializer,
    StatisticsSerializer,
)

# The attachment types announced for multipart uploads: the validator's allow-list, which decides
# by the file's content.
ATTACHMENT_MEDIA_TYPES = list(validators.ALLOWED_CONTENT_TYPES)
NO_NUL = "^[^\\x00]*$"

_ERRORS = {
    400: OpenApiResponse(OpenApiTypes.OBJECT, description="Field errors, as {field: [message]}."),
    401: OpenApiResponse(DetailSerializer, description="Not authenticated."),
    403: OpenApiResponse(DetailSerializer, description="No permission."),
    404: OpenApiResponse(DetailSerializer, description="No such request."),
    409: OpenApiResponse(DetailSerializer, description="The request's status forbids this."),
    415: OpenApiResponse(DetailSerializer, description="Unsupported content type."),
    422: OpenApiResponse(DetailSerializer, description="Idempotency-Key reused."),
    429: OpenApiResponse(DetailSerializer, description="Rate-limited; see Retry-After."),
    503: OpenApiResponse(
        DetailSerializer,
        description="The virus scanner cannot be reached and EMAIL_CLAMAV_REQUIRED refuses unscanned files.",
    ),
}


def _errors(*codes):
    return {code: _ERRORS[code] for code in codes}


def _email_request_view(many=False):
    # Anonymous callers get the public shape, staff with view permission the full one. Both are
    # closed (CLOSED_SHAPES) and the staff shape requires each of its fields, so any item the API
    # answers is valid under exactly one of the two.
    return PolymorphicProxySerializer(
        component_name="EmailRequestView",
        serializers=[EmailRequestPublicSerializer, EmailRequestStaffSerializer],
        resource_type_field_name=None,
        many=many,
    )


_CONTACT_FORM_EXAMPLE = OpenApiExample(
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

# The annotation of each action of EmailRequestViewSet, for extend_schema_view(**EMAIL_REQUEST_VIEWSET).
EMAIL_REQUEST_VIEWSET = {
    "create": extend_schema(
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
            **_errors(400, 415, 422, 429, 503),
        },
        examples=[_CONTACT_FORM_EXAMPLE],
    ),
    "list": extend_schema(
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
    "retrieve": extend_schema(
        summary="One request (redacted unless staff)",
        responses={200: _email_request_view(), **_errors(404, 429)},
    ),
    "update": extend_schema(
        summary="Edit the contact fields of a request not yet SENT",
        description="Answered in the staff shape, or the public one to a user who may change but not view.",
        responses={200: _email_request_view(), **_errors(400, 401, 403, 404, 409)},
    ),
    "partial_update": extend_schema(
        summary="Edit some contact fields of a request not yet SENT",
        description="Answered in the staff shape, or the public one to a user who may change but not view.",
        responses={200: _email_request_view(), **_errors(400, 401, 403, 404, 409)},
    ),
    "destroy": extend_schema(
        summary="Delete a request and its file",
        responses={204: None, **_errors(401, 403, 404)},
    ),
    "statistics": extend_schema(
        summary="Delivery statistics",
        responses={200: StatisticsSerializer, **_errors(429)},
    ),
    "retry_failed": extend_schema(
        summary="Requeue every FAILED request",
        request=None,
        responses={200: RetryFailedSerializer, **_errors(401, 403)},
    ),
    "cancel": extend_schema(
        summary="Cancel a PENDING request",
        request=None,
        responses={200: EmailRequestPublicSerializer, **_errors(401, 403, 404, 409)},
    ),
    "replies": [
        extend_schema(
            methods=["GET"],
            summary="The replies to a request's submitter, with their status",
            responses={200: EmailReplySerializer(many=True), **_errors(401, 403, 404)},
        ),
        extend_schema(
            methods=["POST"],
            summary="Reply to the submitter, through the outbox",
            description="Threaded under the support mail (In-Reply-To); its status is that of any mail.",
            request=EmailReplyCreateSerializer,
            responses={201: EmailReplySerializer, **_errors(400, 401, 403, 404, 409)},
        ),
    ],
    "attachment": extend_schema(
        summary="Download the attachment",
        responses={
            (200, "*/*"): OpenApiResponse(OpenApiTypes.BINARY, description="The file, as stored."),
            **_errors(401, 403, 404),
        },
    ),
}


# The shapes of what the API answers about requests, closed: an undocumented field is a schema
# violation, and no staff item can pass for a public one (the public fields are among the staff's).
CLOSED_SHAPES = ("EmailRequestPublic", "EmailRequestStaff", "EmailAttempt", "EmailReply")


def close_response_shapes(result, generator, request, public):
    """Forbid fields beyond the documented ones in each of CLOSED_SHAPES."""
    schemas = result.get("components", {}).get("schemas", {})
    for name in CLOSED_SHAPES:
        if name in schemas:
            schemas[name]["additionalProperties"] = False
    return result


# What drf-spectacular adds beside a blank-allowed field's own schema: "or the empty string".
_BLANK = {"type": "string", "maxLength": 0}


def merge_blank_alternatives(result, generator, request, public):
    """Fold `oneOf: [field, blank]` into the field's schema where that schema admits "" already.

    drf-spectacular documents `allow_blank=True` as a oneOf of the field and the empty string; when
    the field's pattern also matches "", an empty value matches both branches, which `oneOf`
    forbids, so a valid blank edit reads as invalid data (schemathesis ST201).
    """
    for component in result.get("components", {}).get("schemas", {}).values():
        for name, field in component.get("properties", {}).items():
            branches = field.get("oneOf")
            if not branches or len(branches) != 2 or branches[1] != _BLANK:
                continue
            own = branches[0]
            # JSON Schema patterns search, unanchored, as re.search does.
            if (
                own.get("type") == "string"
                and not own.get("minLength")
                and re.search(own.get("pattern", ""), "")
            ):
                component["properties"][name] = {**{k: v for k, v in field.items() if k != "oneOf"}, **own}
    return result
