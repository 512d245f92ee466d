"""API errors: JSON for every failure, a 500 included."""

import logging

from django.conf import settings
from django.core.exceptions import SuspiciousOperation
from rest_framework import status
from rest_framework.exceptions import APIException, ParseError
from rest_framework.parsers import JSONParser
from rest_framework.response import Response
from rest_framework.views import exception_handler

logger = logging.getLogger(__name__)


class Conflict(APIException):
    """The request's status does not allow the action."""

    status_code = status.HTTP_409_CONFLICT
    default_detail = "The request's status does not allow this action."
    default_code = "conflict"


def json_exception_handler(exc, context):
    """Answer every API error as JSON, a 500 included, never with a traceback."""
    if isinstance(exc, SuspiciousOperation):
        # Too large a body, too many fields or files: the client's doing, not ours.
        return Response({"detail": str(exc) or "Bad request."}, status=400)
    if isinstance(exc, RecursionError):
        return Response({"detail": "Malformed request body: nested too deeply."}, status=400)
    response = exception_handler(exc, context)
    if response is None:
        logger.error("Unhandled error in %s", type(context.get("view")).__name__, exc_info=exc)
        response = Response({"detail": "Internal server error."}, status=500)
    return response


class SizeLimitedJSONParser(JSONParser):
    """JSON, refused past DATA_UPLOAD_MAX_MEMORY_SIZE as Django refuses large forms."""

    def parse(self, stream, media_type=None, parser_context=None):
        request = (parser_context or {}).get("request")
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        length = int(request.META.get("CONTENT_LENGTH") or 0) if request is not None else 0
        if limit is not None and length > limit:
            raise ParseError(f"Request body larger than {limit} bytes.")
        return super().parse(stream, media_type, parser_context)
