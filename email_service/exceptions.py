"""API errors: JSON for every failure, a 500 included."""
import logging

from rest_framework import status
from rest_framework.exceptions import APIException
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
    response = exception_handler(exc, context)
    if response is None:
        logger.error("Unhandled error in %s", type(context.get("view")).__name__, exc_info=exc)
        response = Response({"detail": "Internal server error."}, status=500)
    return response
