"""The first check of every request: a body larger than the service accepts is never read."""

import tempfile

from django.core.handlers.wsgi import LimitedStream
from django.http import JsonResponse

from . import conf

_CHUNK = 64 * 1024
# A chunked body up to this size stays in memory while it is counted; a larger one goes to disk.
_SPOOL_IN_MEMORY = 1024 * 1024


class RequestBodyLimitMiddleware:
    """Answer 413 to a body over `conf.request_body_max_bytes()`, declared or streamed."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        limit = conf.request_body_max_bytes()
        declared = request.META.get("CONTENT_LENGTH", "")
        if declared.isdigit():
            if int(declared) > limit:
                return too_large(limit)
            return self.get_response(request)
        if "chunked" not in request.META.get("HTTP_TRANSFER_ENCODING", "").lower():
            return self.get_response(request)
        body = _read_at_most(request.environ["wsgi.input"], limit)
        if body is None:
            return too_large(limit)
        with body:
            # Django reads exactly CONTENT_LENGTH bytes and nothing of a body without it, so the
            # counted body is handed on as one with a length.
            size = body.seek(0, 2)
            body.seek(0)
            request.META["CONTENT_LENGTH"] = str(size)
            request._stream = LimitedStream(body, size)
            return self.get_response(request)


def too_large(limit):
    """Return the 413 answer, telling the client the limit."""
    response = JsonResponse({"detail": f"The request body is larger than {limit} bytes."}, status=413)
    # Set here because the middleware that would set it runs after this one.
    response["Content-Length"] = str(len(response.content))
    return response


def _read_at_most(stream, limit):
    """Copy `stream` into a spooled file, or return None as soon as it passes `limit` bytes."""
    body = tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY)
    size = 0
    while chunk := stream.read(_CHUNK):
        size += len(chunk)
        if size > limit:
            body.close()
            return None
        body.write(chunk)
    return body
